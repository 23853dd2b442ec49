//! The local endpoints' reconciler: keeps the per-pod policy programs and the `ENDPOINTS` /
//! `POLICY` maps equal to the state model's local endpoints. It is the only writer of both
//! maps and the only one attaching the programs to pods' host-side interfaces.

use std::{
    collections::{BTreeMap, HashSet, btree_map::Entry},
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{
    Datapath, DatapathStatus,
    enforcement::{self, Failures, Reporter, UnenforcedReason},
    policy::EndpointSpec,
    policy::PolicyWriter,
};
use crate::{metrics::Metrics, state::StateHandle};

/// How often what could not be attached or programmed is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// An endpoint as the state model wants it.
struct Desired {
    /// `namespace/name`, for logs.
    pod: String,
    iface: String,
    spec: EndpointSpec,
}

/// `None` until the endpoint source has written every listed pod; then the addresses of
/// local endpoints that have no interface yet.
fn synced_waiting_addresses(state: &StateHandle) -> Option<HashSet<std::net::Ipv4Addr>> {
    let model = state.read();
    model.local_endpoints_synced().then(|| {
        model
            .local_endpoints()
            .filter(|ep| ep.interface.is_none())
            .map(|ep| ep.ip)
            .collect()
    })
}

pub(super) async fn reconcile(
    state: StateHandle,
    mut datapath: Datapath,
    mut policy: PolicyWriter,
    status: Arc<Mutex<DatapathStatus>>,
    programmed: Arc<Mutex<BTreeMap<u32, u32>>>,
    metrics: Metrics,
) {
    let mut versions = state.subscribe();
    // Why selected endpoints are not enforced, as last tried (by pod).
    let mut failures = Failures::new();
    let mut reporter = Reporter::default();
    // Interfaces with the programs attached, with what their maps hold (`None`: nothing yet).
    let mut attached: BTreeMap<u32, Option<EndpointSpec>> = BTreeMap::new();
    let mut reported: HashSet<String> = HashSet::new();
    loop {
        let seen = versions.borrow_and_update().local_endpoints;
        // Endpoints without an interface yet have nothing to attach to.
        let desired: BTreeMap<u32, Desired> = state
            .read()
            .local_endpoints()
            .filter_map(|ep| {
                let i = ep.interface.as_ref()?;
                let desired = Desired {
                    pod: format!("{}/{}", ep.namespace, ep.name),
                    iface: i.name.clone(),
                    spec: EndpointSpec {
                        ifindex: i.ifindex,
                        address: ep.ip,
                        identity: ep.identity,
                        policy: ep.policy.clone(),
                    },
                };
                Some((i.ifindex, desired))
            })
            .collect();
        // Something wanted is not in place: retried on a timer.
        let mut pending = false;
        // Gone: not enforced any more, then detached.
        let gone: Vec<u32> = attached
            .keys()
            .filter(|i| !desired.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            policy.remove_endpoint(ifindex);
            datapath.detach_endpoint(ifindex);
            attached.remove(&ifindex);
        }
        // Restored from a previous run's pins: once every pod the source lists is in the model,
        // entries no local endpoint accounts for belong to pods deleted while no agent ran.
        // A pod still waiting for its interface keeps what holds its address.
        if let Some(waiting) = synced_waiting_addresses(&state) {
            let orphans: Vec<(u32, Option<std::net::Ipv4Addr>)> = policy
                .held()
                .into_iter()
                .filter(|(i, addr)| {
                    !desired.contains_key(i)
                        && !attached.contains_key(i)
                        && !addr.is_some_and(|a| waiting.contains(&a))
                })
                .collect();
            for (ifindex, address) in orphans {
                tracing::info!(
                    ifindex,
                    ?address,
                    "removing restored policy of a pod that no longer exists"
                );
                policy.remove_endpoint(ifindex);
                datapath.detach_endpoint(ifindex);
            }
        }
        failures.retain(|pod, _| desired.values().any(|d| d.pod == *pod));
        for (ifindex, d) in desired {
            let programmed = match attached.entry(ifindex) {
                Entry::Occupied(a) => a.into_mut(),
                Entry::Vacant(slot) => match datapath.attach_endpoint(&d.iface) {
                    Ok(()) => {
                        tracing::info!(pod = %d.pod, iface = d.iface, ifindex, "policy attached");
                        slot.insert(None)
                    }
                    Err(e) => {
                        if reported.insert(format!("attach {}: {e}", d.pod)) {
                            tracing::error!(pod = %d.pod, iface = d.iface, error = %e, "cannot attach policy");
                        }
                        failures.insert(
                            d.pod.clone(),
                            (UnenforcedReason::AttachFailed, format!("{}: {e}", d.iface)),
                        );
                        pending = true;
                        continue;
                    }
                },
            };
            if programmed.as_ref() == Some(&d.spec) {
                continue;
            }
            match policy.set_endpoint(&d.spec) {
                Ok(()) => {
                    *programmed = Some(d.spec);
                    failures.remove(&d.pod);
                }
                Err(e) => {
                    if reported.insert(format!("policy {}: {e}", d.pod)) {
                        tracing::error!(pod = %d.pod, error = %e, "cannot program policy");
                    }
                    failures.insert(
                        d.pod.clone(),
                        (UnenforcedReason::MapWriteFailed, e.to_string()),
                    );
                    pending = true;
                }
            }
        }
        // Deletes of removed pods' entries that failed are retried here (writes are retried
        // through `set_endpoint` above, since `programmed` stays behind).
        policy.retry_deletes();
        pending |= policy.pending();
        let unenforced = enforcement::collect(&state.read(), &failures);
        reporter.update(&unenforced, &metrics);
        {
            let mut status = status.lock().unwrap_or_else(|p| p.into_inner());
            status.endpoints = policy.endpoints().count();
            status.unenforced = unenforced;
        }
        // What the agent API reports ready to strait-cni: attached, with its maps written.
        *programmed.lock().unwrap_or_else(|p| p.into_inner()) = attached
            .iter()
            .filter_map(|(i, spec)| Some((*i, spec.as_ref()?.identity)))
            .collect();
        tokio::select! {
            r = versions.wait_for(|v| v.local_endpoints != seen) => if r.is_err() { return },
            _ = tokio::time::sleep(RETRY), if pending => {}
        }
    }
}
