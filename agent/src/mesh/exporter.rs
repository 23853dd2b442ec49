//! Exporting this cluster's global services to `cilium/state/services/v1/<cluster>/<ns>/<name>`
//! (what Cilium's clustermesh-apiserver does), with exactly one active writer per cluster:
//! every `strait kvstoremesh` replica campaigns in an etcd election and only the leader writes.
//! Only services that are global and shared are exported; the others are deleted.

use std::{collections::BTreeMap, time::Duration};

use crate::wire::{KvClusterService, L4Addr, keys};
use crate::{
    kvstore::{EtcdClient, Lease},
    state::{BackendState, ClusterService, PortMap, Protocol, StateHandle},
};

/// The election every exporter of a cluster campaigns in.
pub fn election_name(cluster: &str) -> String {
    format!("cilium/.strait/service-exporter/{cluster}")
}

/// The wire value Cilium's exporter writes: frontends with the service ports, backends that
/// are ready or serving with the endpoint ports, `shared` and `includeExternal` true.
pub fn wire_service(svc: &ClusterService) -> KvClusterService {
    let ports = |p: &PortMap| -> BTreeMap<String, L4Addr> {
        p.iter()
            .map(|(name, (proto, port))| {
                let proto = match proto {
                    Protocol::Tcp => "TCP",
                    Protocol::Udp => "UDP",
                    Protocol::Sctp => "SCTP",
                };
                (name.clone(), L4Addr::new(proto, *port))
            })
            .collect()
    };
    let mut wire = KvClusterService::new(
        &svc.cluster,
        &svc.name.namespace,
        &svc.name.name,
        svc.cluster_id,
    );
    wire.frontends = svc
        .frontends
        .iter()
        .map(|(ip, p)| (ip.to_string(), ports(p)))
        .collect();
    wire.backends = svc
        .backends
        .iter()
        .filter(|b| matches!(b.state, BackendState::Active | BackendState::Terminating))
        .map(|b| (b.ip.to_string(), ports(&b.ports)))
        .collect();
    wire.include_external = true;
    wire.shared = true;
    wire
}

/// Runs until dropped: campaign, then keep the exported set equal to the local global
/// services while leader; campaign again if the lease (and with it the leadership) is lost.
pub async fn run(
    local: EtcdClient,
    cluster: String,
    identity: String,
    state: StateHandle,
    lease_ttl: Duration,
) {
    loop {
        match lead(&local, &cluster, &identity, &state, lease_ttl).await {
            Ok(()) => {
                tracing::warn!(%cluster, "service exporter lost its leadership; campaigning again")
            }
            Err(e) => {
                tracing::warn!(%cluster, error = %e, "service exporter failed; campaigning again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn lead(
    local: &EtcdClient,
    cluster: &str,
    identity: &str,
    state: &StateHandle,
    ttl: Duration,
) -> anyhow::Result<()> {
    let lease = Lease::grant(local, ttl).await?;
    // Blocks until elected (no request timeout: waiting is the point).
    local
        .raw()
        .election_client()
        .campaign(election_name(cluster), identity, lease.id())
        .await?;
    tracing::info!(%cluster, %identity, "elected: exporting global services");
    let prefix = format!("{}/{cluster}/", keys::SERVICE_STORE_PREFIX);
    let mut exported: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // What an earlier leader left: deleted unless still wanted.
    let mut stale: Vec<String> = local
        .list_prefix(&prefix)
        .await?
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    let mut changes = state.subscribe();
    loop {
        let desired: BTreeMap<String, Vec<u8>> = {
            let model = state.read();
            let local_cluster = model.local_cluster().clone();
            model
                .local_services()
                .filter(|s| s.cluster == local_cluster && s.global && s.shared)
                .filter_map(|s| {
                    let wire = wire_service(s);
                    Some((
                        keys::service_key(cluster, &s.name.namespace, &s.name.name),
                        wire.encode().ok()?,
                    ))
                })
                .collect()
        };
        for (key, value) in &desired {
            if exported.get(key) != Some(value) {
                local.put(key, value.clone(), Some(lease.id())).await?;
            }
        }
        for key in exported
            .keys()
            .chain(stale.iter())
            .filter(|k| !desired.contains_key(*k))
        {
            local.delete(key).await?;
        }
        stale.clear();
        exported = desired;
        tokio::select! {
            changed = changes.changed() => changed?,
            _ = lease.wait_lost() => return Ok(()),
        }
    }
}
