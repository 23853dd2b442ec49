//! Local endpoints: the pods of this node, from the local source, turned into what the rest
//! of the mesh and the datapath need. For each pod with an IPv4 address: its identity (from
//! Cilium's label rules, allocated in the cluster's kvstore), its ipcache entry (published
//! for every node and cluster), and its local endpoint in the state model: the host-side
//! interface once there is one, and the entries its policies translate to (the datapath
//! enforces them).
//!
//! The host-side interface is the one the node routes the pod's /32 to (what a CNI plugin
//! sets up), read from the routing table.
//!
//! A pod's address comes from its object's `status.podIP`, or earlier from strait-cni
//! ([`CniAttachments`]): the plugin reports it during ADD, before the kubelet can write it
//! into the pod object, so the pod is policed from its first packet.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

use super::{
    allocator::IdentityAllocator,
    publisher::{self, EndpointPublisher},
};
use crate::{
    hostnet::{self, HostnetError},
    identity::LabelArray,
    k8s::{Objects, labels::pod_identity_labels},
    policy::{EndpointPolicy, translate},
    state::{HostInterface, LocalEndpoint, StateHandle, UnidentifiedEndpoint},
};

/// How often interfaces are looked for again (a pod's veth may appear after its object).
const RESCAN: Duration = Duration::from_secs(1);

/// A pod strait-cni attached on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniAttachment {
    pub namespace: String,
    pub pod: String,
    pub ip: Ipv4Addr,
}

/// The pods strait-cni attached, by container id: written by the agent API, read by the
/// endpoint source.
#[derive(Clone)]
pub struct CniAttachments {
    tx: watch::Sender<BTreeMap<String, CniAttachment>>,
}

impl Default for CniAttachments {
    fn default() -> Self {
        Self {
            tx: watch::channel(BTreeMap::new()).0,
        }
    }
}

impl CniAttachments {
    pub fn add(&self, container_id: &str, a: CniAttachment) {
        self.tx.send_if_modified(|m| {
            if m.get(container_id) == Some(&a) {
                return false;
            }
            // One pod, one sandbox: a newer sandbox replaces the pod's earlier one.
            m.retain(|_, v| !(v.namespace == a.namespace && v.pod == a.pod));
            m.insert(container_id.to_owned(), a);
            true
        });
    }

    pub fn remove(&self, container_id: &str) {
        self.tx
            .send_if_modified(|m| m.remove(container_id).is_some());
    }

    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, CniAttachment>> {
        self.tx.subscribe()
    }
}

/// A local pod as the source tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LocalPod {
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    labels: LabelArray,
}

pub struct EndpointSource {
    pub cluster: String,
    pub node: String,
    pub allocator: Arc<IdentityAllocator>,
    pub publisher: Arc<EndpointPublisher>,
    pub state: StateHandle,
    pub cni: CniAttachments,
}

/// Pods of `node` with an IPv4 address (the one strait-cni gave it, else the object's),
/// with their identity labels.
fn local_pods(
    objects: &Objects,
    node: &str,
    cluster: &str,
    cni: &BTreeMap<String, CniAttachment>,
) -> Vec<LocalPod> {
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
            let namespace = p
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = p.metadata.name.as_deref().unwrap_or_default();
            let attached = cni
                .values()
                .find(|a| a.namespace == namespace && a.pod == name)
                .map(|a| a.ip);
            let ip: Ipv4Addr = match attached {
                Some(ip) => ip,
                None => p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?,
            };
            Some(LocalPod {
                labels: pod_identity_labels(p, &ns_labels(&namespace), cluster),
                namespace,
                name: p.metadata.name.clone().unwrap_or_default(),
                ip,
            })
        })
        .collect()
}

/// Whether every local pod of `objects` is tracked as it is and written into the model.
fn all_written(
    objects: &Objects,
    node: &str,
    cluster: &str,
    cni: &BTreeMap<String, CniAttachment>,
    tracked: &BTreeMap<(String, String), Tracked>,
) -> bool {
    local_pods(objects, node, cluster, cni).iter().all(|p| {
        tracked
            .get(&(p.namespace.clone(), p.name.clone()))
            .is_some_and(|t| t.pod == *p && t.written.is_some())
    })
}

/// Host-side interface the node routes `ip/32` to (this process's network namespace).
pub async fn host_interface(ip: Ipv4Addr) -> Result<Option<HostInterface>, HostnetError> {
    let Some(ifindex) = hostnet::host_route_ifindex(ip).await? else {
        return Ok(None);
    };
    let name = hostnet::ifname(ifindex)?;
    Ok(Some(HostInterface { name, ifindex }))
}

struct Tracked {
    pod: LocalPod,
    identity: u32,
    interface: Option<HostInterface>,
    /// What the state model holds for the pod (`None`: to be translated and written).
    written: Option<LocalEndpoint>,
}

impl EndpointSource {
    /// Runs until dropped: follows `objects` and the identities known to the state model.
    /// Once `listed` (the local source synced) holds and every pod of the listing is in the
    /// model, says so in the model (the datapath then drops restored entries of gone pods).
    pub async fn run(self, mut objects: watch::Receiver<Objects>, listed: watch::Receiver<bool>) {
        let mut announced = false;
        let mut tracked: BTreeMap<(String, String), Tracked> = BTreeMap::new();
        let mut versions = self.state.subscribe();
        let mut reported: HashSet<String> = HashSet::new();
        let mut tick = tokio::time::interval(RESCAN);
        let mut cni = self.cni.subscribe();
        // Policies are translated again only when objects or identities changed; a tick only
        // retries what is not done yet (a pod whose veth appeared, a failed allocation).
        let mut changed = true;
        loop {
            // Before the identities are read: a change while translating wakes the next pass.
            let identities = versions.borrow_and_update().identities;
            // Before the objects: the source publishes its listing before it says synced.
            let was_listed = *listed.borrow();
            let current = objects.borrow_and_update().clone();
            let attached = cni.borrow_and_update().clone();
            self.sync_pods(&current, &attached, &mut tracked).await;
            self.sync_model(&current, &mut tracked, &mut reported, changed)
                .await;
            if !announced
                && was_listed
                && all_written(&current, &self.node, &self.cluster, &attached, &tracked)
            {
                announced = true;
                tracing::info!(pods = tracked.len(), "local endpoints synced");
                self.state.update(|m| m.set_local_endpoints_synced());
            }
            changed = tokio::select! {
                r = objects.changed() => if r.is_err() { return } else { true },
                r = cni.changed() => if r.is_err() { return } else { true },
                r = versions.wait_for(|v| v.identities != identities) => {
                    if r.is_err() { return } else { true }
                }
                _ = tick.tick() => false,
            };
        }
    }

    async fn sync_pods(
        &self,
        objects: &Objects,
        attached: &BTreeMap<String, CniAttachment>,
        tracked: &mut BTreeMap<(String, String), Tracked>,
    ) {
        let pods = local_pods(objects, &self.node, &self.cluster, attached);
        let wanted: HashSet<(String, String)> = pods
            .iter()
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        self.state.update(|m| {
            m.retain_unidentified(|ns, name| wanted.contains(&(ns.to_owned(), name.to_owned())))
        });
        // Gone pods: withdraw, release, and out of the model (the datapath detaches).
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
            self.state
                .update(|m| m.delete_local_endpoint(&key.0, &key.1));
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
                    self.unidentified(objects, &pod, e.to_string());
                    continue;
                }
            };
            let ep = publisher::LocalEndpoint {
                ip: pod.ip.into(),
                identity,
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                endpoint_id: u64::from(identity),
            };
            if let Err(e) = self.publisher.publish(&ep).await {
                tracing::warn!(pod = %format!("{}/{}", key.0, key.1), error = %e, "publishing endpoint; will retry");
                // Every allocation is paired with one release, also when it is retried.
                if let Err(e) = self.allocator.release(&pod.labels).await {
                    tracing::warn!(error = %e, "releasing identity");
                }
                continue;
            }
            tracing::info!(pod = %format!("{}/{}", key.0, key.1), ip = %pod.ip, identity, "endpoint published");
            let old = tracked.remove(&key);
            if let Some(old) = &old {
                self.replaced(old, &pod, tracked).await;
            }
            let interface = old.filter(|t| t.pod.ip == pod.ip).and_then(|t| t.interface);
            tracked.insert(
                key,
                Tracked {
                    pod,
                    identity,
                    interface,
                    written: None,
                },
            );
        }
    }

    /// A pod whose labels or IP changed: its previous identity use is released and its
    /// previous ipcache entry withdrawn (unless another pod has that IP now).
    async fn replaced(
        &self,
        old: &Tracked,
        new: &LocalPod,
        tracked: &BTreeMap<(String, String), Tracked>,
    ) {
        let pod = format!("{}/{}", new.namespace, new.name);
        if old.pod.ip != new.ip
            && !tracked.values().any(|t| t.pod.ip == old.pod.ip)
            && let Err(e) = self.publisher.withdraw(old.pod.ip.into()).await
        {
            tracing::warn!(%pod, ip = %old.pod.ip, error = %e, "withdrawing the previous endpoint entry");
        }
        if let Err(e) = self.allocator.release(&old.pod.labels).await {
            tracing::warn!(%pod, error = %e, "releasing the previous identity");
        }
        tracing::info!(%pod, old_ip = %old.pod.ip, old_identity = old.identity, "endpoint changed");
    }

    /// Writes the tracked pods into the state model: interface and translated policy.
    async fn sync_model(
        &self,
        objects: &Objects,
        tracked: &mut BTreeMap<(String, String), Tracked>,
        reported: &mut HashSet<String>,
        changed: bool,
    ) {
        if !changed
            && tracked
                .values()
                .all(|t| t.written.is_some() && t.interface.is_some())
        {
            return;
        }
        let mut universe = None;
        let mut updates = Vec::new();
        for ((ns, name), t) in tracked.iter_mut() {
            if t.interface.is_none() {
                t.interface = match host_interface(t.pod.ip).await {
                    Ok(i) => i,
                    Err(e) => {
                        if reported.insert(format!("route to {ns}/{name}: {e}")) {
                            tracing::error!(pod = %format!("{ns}/{name}"), error = %e, "cannot read the route to the pod");
                        }
                        None
                    }
                };
            }
            let policy = match &t.written {
                Some(w) if !changed => w.policy.clone(),
                _ => self.translate(objects, &t.pod, &mut universe, reported),
            };
            let ep = LocalEndpoint {
                namespace: ns.clone(),
                name: name.clone(),
                ip: t.pod.ip,
                identity: t.identity,
                interface: t.interface.clone(),
                policy,
            };
            if t.written.as_ref() != Some(&ep) {
                t.written = Some(ep.clone());
                updates.push(ep);
            }
        }
        if !updates.is_empty() {
            self.state.update(|m| {
                for ep in updates {
                    m.upsert_local_endpoint(ep);
                }
            });
        }
    }

    /// Records a pod whose identity could not be allocated, when a policy selects it (the
    /// datapath lists it as not enforced); clears it otherwise.
    fn unidentified(&self, objects: &Objects, pod: &LocalPod, error: String) {
        // Whether a policy selects the pod does not depend on the other identities.
        let selected = translate(&objects.policies, &pod.labels, &[], &self.cluster).is_enforcing();
        let ep = selected.then(|| UnidentifiedEndpoint {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ip: pod.ip,
            error,
        });
        self.state
            .update(|m| m.set_unidentified(&pod.namespace, &pod.name, ep));
    }

    /// `pod`'s policy; `universe` (the identities known mesh-wide) is read on first use.
    fn translate(
        &self,
        objects: &Objects,
        pod: &LocalPod,
        universe: &mut Option<Vec<(u32, LabelArray)>>,
        reported: &mut HashSet<String>,
    ) -> EndpointPolicy {
        let universe = universe.get_or_insert_with(|| {
            self.state
                .read()
                .identities()
                // The model holds validated label lists only; none fails here.
                .filter_map(|i| {
                    Some((
                        i.id,
                        LabelArray::parse_sorted_list(&i.labels.join(";")).ok()?,
                    ))
                })
                .collect()
        });
        // The labels carry the cluster label already (pod_identity_labels adds it).
        let policy = translate(&objects.policies, &pod.labels, universe, &self.cluster);
        for u in &policy.unsupported {
            let line = format!(
                "{}/{}: policy {}: {}",
                pod.namespace, pod.name, u.policy, u.rule
            );
            if reported.insert(line.clone()) {
                tracing::warn!("not enforced as written: {line}");
            }
        }
        policy
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
        let pods = local_pods(&objects, "usa-1", "cluster-usa", &BTreeMap::new());
        assert_eq!(pods.len(), 1, "{pods:?}");
        assert_eq!(pods[0].ip, Ipv4Addr::new(10, 1, 1, 5));
        let labels = pods[0].labels.to_sorted_list();
        assert!(labels.contains("k8s:app=frontend"), "{labels}");
        assert!(
            labels.contains("io.kubernetes.pod.namespace=shop"),
            "{labels}"
        );
    }

    #[tokio::test]
    async fn host_interface_reads_host_routes_only() {
        // Nothing routes this benchmarking address as a /32.
        let found = host_interface(Ipv4Addr::new(198, 18, 255, 254)).await;
        assert_eq!(found.unwrap(), None);
    }
}
