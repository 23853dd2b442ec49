//! Local endpoints: the pods of this node, from the local source, turned into what the rest
//! of the mesh and the datapath need. For each pod with an IPv4 address: its identity (from
//! Cilium's label rules, allocated in the cluster's kvstore), its ipcache entry (published
//! for every node and cluster), and — when the datapath runs — the policy programs on its
//! host-side interface with the entries its policies translate to.
//!
//! The host-side interface is the one the node routes the pod's /32 to (what a CNI plugin
//! sets up), read from the routing table.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

use crate::{
    datapath::{Datapath, policy::EndpointSpec, policy::PolicyWriter},
    identity::LabelArray,
    k8s::{Objects, labels::pod_identity_labels},
    policy::translate,
    publish::{
        allocator::IdentityAllocator,
        publisher::{EndpointPublisher, LocalEndpoint},
    },
    state::StateHandle,
};

/// How often interfaces are looked for again (a pod's veth may appear after its object).
const RESCAN: Duration = Duration::from_secs(1);

/// A local pod as the manager tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LocalPod {
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    labels: LabelArray,
}

/// The datapath parts the manager drives (absent when the datapath is off).
pub struct DatapathHooks {
    pub datapath: Arc<Mutex<Datapath>>,
    pub policy: Arc<Mutex<PolicyWriter>>,
}

pub struct EndpointManager {
    pub cluster: String,
    pub node: String,
    pub allocator: IdentityAllocator,
    pub publisher: Arc<EndpointPublisher>,
    pub state: StateHandle,
    pub datapath: Option<DatapathHooks>,
}

/// Pods of `node` with an IPv4 address, with their identity labels.
fn local_pods(objects: &Objects, node: &str, cluster: &str) -> Vec<LocalPod> {
    let ns_labels = |ns: &str| {
        objects
            .namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default()
    };
    objects
        .pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter_map(|p: &Pod| {
            let ip: Ipv4Addr = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            let namespace = p
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            Some(LocalPod {
                labels: pod_identity_labels(p, &ns_labels(&namespace), cluster),
                namespace,
                name: p.metadata.name.clone().unwrap_or_default(),
                ip,
            })
        })
        .collect()
}

struct Tracked {
    pod: LocalPod,
    identity: u32,
    /// Host-side ifindex once found and attached.
    ifindex: Option<u32>,
    spec: Option<EndpointSpec>,
}

impl EndpointManager {
    /// Runs until dropped: follows `objects` and the identities known to the state model.
    pub async fn run(self, mut objects: watch::Receiver<Objects>) {
        let mut tracked: BTreeMap<(String, String), Tracked> = BTreeMap::new();
        let mut versions = self.state.subscribe();
        let mut reported: HashSet<String> = HashSet::new();
        let mut tick = tokio::time::interval(RESCAN);
        // Policies are translated again only when objects or identities changed; a tick only
        // retries what is not programmed yet (a pod whose veth appeared, a failed allocation).
        let mut changed = true;
        loop {
            let current = objects.borrow_and_update().clone();
            self.sync_pods(&current, &mut tracked).await;
            self.sync_datapath(&current, &mut tracked, &mut reported, changed)
                .await;
            changed = tokio::select! {
                r = objects.changed() => if r.is_err() { return } else { true },
                r = versions.changed() => if r.is_err() { return } else { true },
                _ = tick.tick() => false,
            };
        }
    }

    async fn sync_pods(
        &self,
        objects: &Objects,
        tracked: &mut BTreeMap<(String, String), Tracked>,
    ) {
        let pods = local_pods(objects, &self.node, &self.cluster);
        let wanted: HashSet<(String, String)> = pods
            .iter()
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        // Gone pods: withdraw, release, detach.
        let gone: Vec<(String, String)> = tracked
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            let t = tracked.remove(&key).expect("listed above");
            if let Err(e) = self.publisher.withdraw(t.pod.ip.into()).await {
                tracing::warn!(pod = %format!("{}/{}", key.0, key.1), error = %e, "withdrawing endpoint");
            }
            if let Err(e) = self.allocator.release(&t.pod.labels).await {
                tracing::warn!(error = %e, "releasing identity");
            }
            if let (Some(hooks), Some(ifindex)) = (&self.datapath, t.ifindex) {
                hooks
                    .policy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove_endpoint(ifindex);
                hooks
                    .datapath
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .detach_endpoint(ifindex);
            }
            tracing::info!(pod = %format!("{}/{}", key.0, key.1), "endpoint removed");
        }
        for pod in pods {
            let key = (pod.namespace.clone(), pod.name.clone());
            if tracked.get(&key).is_some_and(|t| t.pod == pod) {
                continue;
            }
            let identity = match self.allocator.allocate(&pod.labels).await {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", key.0, key.1), error = %e, "no identity yet; will retry");
                    continue;
                }
            };
            let ep = LocalEndpoint {
                ip: pod.ip.into(),
                identity,
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                endpoint_id: u64::from(identity),
            };
            if let Err(e) = self.publisher.publish(&ep).await {
                tracing::warn!(pod = %format!("{}/{}", key.0, key.1), error = %e, "publishing endpoint; will retry");
                continue;
            }
            tracing::info!(pod = %format!("{}/{}", key.0, key.1), ip = %pod.ip, identity, "endpoint published");
            let previous = tracked.remove(&key);
            tracked.insert(
                key,
                Tracked {
                    pod,
                    identity,
                    ifindex: previous.as_ref().and_then(|p| p.ifindex),
                    spec: None,
                },
            );
        }
    }

    async fn sync_datapath(
        &self,
        objects: &Objects,
        tracked: &mut BTreeMap<(String, String), Tracked>,
        reported: &mut HashSet<String>,
        changed: bool,
    ) {
        let Some(hooks) = &self.datapath else { return };
        if !changed && tracked.values().all(|t| t.spec.is_some()) {
            return;
        }
        let universe: Vec<(u32, LabelArray)> = {
            let model = self.state.read();
            model
                .identities()
                .map(|i| (i.id, LabelArray::parse_sorted_list(&i.labels.join(";"))))
                .collect()
        };
        for ((ns, name), t) in tracked.iter_mut() {
            if !changed && t.spec.is_some() {
                continue;
            }
            let ifindex = match t.ifindex {
                Some(i) => i,
                None => {
                    let i = match crate::routing::host_route_ifindex(t.pod.ip).await {
                        Ok(Some(i)) => i,
                        Ok(None) => continue, // no route to the pod yet
                        Err(e) => {
                            if reported.insert(format!("route to {ns}/{name}: {e}")) {
                                tracing::error!(pod = %format!("{ns}/{name}"), error = %e, "cannot read the route to the pod");
                            }
                            continue;
                        }
                    };
                    let mut dp = hooks.datapath.lock().unwrap_or_else(|p| p.into_inner());
                    let attached = crate::datapath::loader::ifname(i)
                        .and_then(|iface| dp.attach_endpoint(&iface).map(|()| iface));
                    match attached {
                        Ok(iface) => {
                            tracing::info!(pod = %format!("{ns}/{name}"), iface, ifindex = i, "policy attached");
                            t.ifindex = Some(i);
                            i
                        }
                        Err(e) => {
                            if reported.insert(format!("attach {ns}/{name}: {e}")) {
                                tracing::error!(pod = %format!("{ns}/{name}"), ifindex = i, error = %e, "cannot attach policy");
                            }
                            continue;
                        }
                    }
                }
            };
            // The labels carry the cluster label already (pod_identity_labels adds it).
            let policy = translate(&objects.policies, &t.pod.labels, &universe, &self.cluster);
            for u in &policy.unsupported {
                let line = format!("{ns}/{name}: policy {}: {}", u.policy, u.rule);
                if reported.insert(line.clone()) {
                    tracing::warn!("not enforced as written: {line}");
                }
            }
            let spec = EndpointSpec {
                ifindex,
                address: t.pod.ip,
                identity: t.identity,
                policy,
            };
            if t.spec.as_ref() == Some(&spec) {
                continue;
            }
            let result = hooks
                .policy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_endpoint(&spec);
            match result {
                Ok(()) => t.spec = Some(spec),
                Err(e) => {
                    if reported.insert(format!("policy {ns}/{name}: {e}")) {
                        tracing::error!(pod = %format!("{ns}/{name}"), error = %e, "cannot program policy");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_pods_are_this_nodes_pods_with_an_ipv4_address() {
        let mut objects = Objects::default();
        objects.add_yaml(
            "pods.yaml",
            r#"
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec: {nodeName: usa-1, serviceAccountName: web, containers: [{name: c, image: x}]}
status: {podIP: 10.1.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: shop}
spec: {nodeName: usa-2, containers: [{name: c, image: x}]}
status: {podIP: 10.1.2.5}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop}
spec: {nodeName: usa-1, containers: [{name: c, image: x}]}
"#,
        );
        let pods = local_pods(&objects, "usa-1", "cluster-usa");
        assert_eq!(pods.len(), 1, "{pods:?}");
        assert_eq!(pods[0].ip, Ipv4Addr::new(10, 1, 1, 5));
        let labels = pods[0].labels.to_sorted_list();
        assert!(labels.contains("k8s:app=frontend"), "{labels}");
        assert!(
            labels.contains("io.kubernetes.pod.namespace=shop"),
            "{labels}"
        );
    }
}
