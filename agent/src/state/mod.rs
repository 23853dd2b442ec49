//! The in-memory state model: nodes, endpoints (ipcache), identities and services with
//! per-cluster backends, plus per-cluster standing (refused for overlapping CIDRs, datapath
//! down), and this node's own pods with their policy ([`local`]). Plain Rust, testable
//! without etcd or a kernel.
//!
//! Sources (kvstore watchers, the Kubernetes/manifests source) write through
//! [`StateHandle::update`]; reconcilers (eBPF maps, WireGuard peers, routes) are
//! level-triggered: they [`StateHandle::subscribe`] to per-kind version counters, and on a
//! change read the views they need and diff against what they own.

pub mod ipcache;
pub mod local;
pub mod overlap;
pub mod services;
pub mod types;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock, RwLockReadGuard},
};

use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::watch;

pub use ipcache::{IpcacheRefusal, OwnedEndpoint, Ownership, RefusalReason, owned_endpoints};
pub use local::{EncryptionRoute, HostInterface, LocalEndpoint, UnidentifiedEndpoint};
pub use overlap::Overlap;
pub use services::{SelectedBackend, ServiceView};
pub use types::*;

/// Change counters, one per kind of state, bumped whenever that kind's views change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Versions {
    pub nodes: u64,
    pub endpoints: u64,
    pub identities: u64,
    pub services: u64,
    pub local_endpoints: u64,
    pub encryption_routes: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Dirty {
    nodes: bool,
    endpoints: bool,
    identities: bool,
    services: bool,
    local_endpoints: bool,
    encryption_routes: bool,
}

impl Dirty {
    fn any(&self) -> bool {
        self.nodes
            || self.endpoints
            || self.identities
            || self.services
            || self.local_endpoints
            || self.encryption_routes
    }
}

/// A cluster's standing in the mesh.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterEntry {
    pub name: ClusterName,
    pub id: u32,
    /// Set while the cluster's pod CIDRs overlap an earlier cluster's.
    pub refused: Option<Overlap>,
    /// Set while probes say the cluster's datapath is unreachable: its backends are not used.
    pub datapath_down: bool,
    #[serde(skip)]
    order: u64,
}

/// Per-cluster object counts, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub nodes: usize,
    pub endpoints: usize,
    pub identities: usize,
    pub services: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterConflict {
    #[error("cluster ID {id} of {name} is already used by cluster {other}")]
    DuplicateId {
        name: String,
        id: u32,
        other: String,
    },
    #[error("cluster name {name} is already connected with cluster ID {id}")]
    DuplicateName { name: String, id: u32 },
}

#[derive(Debug)]
pub struct StateModel {
    local: ClusterName,
    clusters: BTreeMap<ClusterName, ClusterEntry>,
    next_order: u64,
    nodes: BTreeMap<(ClusterName, String), Node>,
    endpoints: BTreeMap<(ClusterName, IpNet), Endpoint>,
    identities: BTreeMap<u32, Identity>,
    services: BTreeMap<ServiceName, BTreeMap<ClusterName, ClusterService>>,
    /// This node's pods, by (namespace, name).
    local_endpoints: BTreeMap<(String, String), LocalEndpoint>,
    /// Every pod of the local source's first full listing is among `local_endpoints`.
    local_endpoints_synced: bool,
    /// This node's pods selected by policy that have no identity (yet), by (namespace, name).
    unidentified: BTreeMap<(String, String), UnidentifiedEndpoint>,
    encryption_routes: Option<Vec<EncryptionRoute>>,
    dirty: Dirty,
    /// Pod CIDRs changed: refusals are recomputed once per update batch, in `settle`.
    refusals_dirty: bool,
    /// Objects per cluster, kept as they change: status asks often, scanning is O(mesh).
    counts: HashMap<ClusterName, Counts>,
}

impl StateModel {
    pub fn new(local_cluster: &str, local_id: u32) -> Self {
        let mut model = Self {
            local: local_cluster.into(),
            clusters: BTreeMap::new(),
            next_order: 0,
            nodes: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            identities: BTreeMap::new(),
            services: BTreeMap::new(),
            local_endpoints: BTreeMap::new(),
            local_endpoints_synced: false,
            unidentified: BTreeMap::new(),
            encryption_routes: None,
            dirty: Dirty::default(),
            refusals_dirty: false,
            counts: HashMap::new(),
        };
        model
            .register_cluster(local_cluster, local_id)
            .expect("an empty model has no conflicts");
        model
    }

    pub fn local_cluster(&self) -> &ClusterName {
        &self.local
    }

    /// The shared name for `cluster`, so objects do not each allocate their own.
    pub fn cluster_name(&self, cluster: &str) -> ClusterName {
        self.clusters
            .get(cluster)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| cluster.into())
    }

    /// Admits a cluster under `id`, refusing a name or ID already in use by another.
    /// Re-registering a cluster under its own ID is a no-op.
    pub fn register_cluster(&mut self, name: &str, id: u32) -> Result<(), ClusterConflict> {
        if let Some(existing) = self.clusters.get(name) {
            return if existing.id == id {
                Ok(())
            } else {
                Err(ClusterConflict::DuplicateName {
                    name: name.into(),
                    id: existing.id,
                })
            };
        }
        if let Some(other) = self.clusters.values().find(|c| c.id == id) {
            return Err(ClusterConflict::DuplicateId {
                name: name.into(),
                id,
                other: other.name.to_string(),
            });
        }
        let order = self.next_order;
        self.next_order += 1;
        self.clusters.insert(
            name.into(),
            ClusterEntry {
                name: name.into(),
                id,
                refused: None,
                datapath_down: false,
                order,
            },
        );
        Ok(())
    }

    /// Removes a cluster and everything it published (its config file went away).
    pub fn drain_cluster(&mut self, cluster: &str) {
        if cluster == self.local.as_ref() {
            return;
        }
        let before = (
            self.nodes.len(),
            self.endpoints.len(),
            self.identities.len(),
        );
        self.nodes.retain(|(c, _), _| c.as_ref() != cluster);
        self.endpoints.retain(|(c, _), _| c.as_ref() != cluster);
        self.identities.retain(|_, i| i.cluster.as_ref() != cluster);
        let mut services_changed = false;
        self.services.retain(|_, per_cluster| {
            services_changed |= per_cluster.remove(cluster).is_some();
            !per_cluster.is_empty()
        });
        self.clusters.remove(cluster);
        self.counts.remove(cluster);
        self.dirty.nodes |= before.0 != self.nodes.len();
        self.dirty.endpoints |= before.1 != self.endpoints.len();
        self.dirty.identities |= before.2 != self.identities.len();
        self.dirty.services |= services_changed;
        self.refusals_dirty = true;
    }

    pub fn clusters(&self) -> impl Iterator<Item = &ClusterEntry> {
        self.clusters.values()
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterEntry> {
        self.clusters.get(name)
    }

    /// Whether a cluster's routes and backends may be used.
    pub fn usable(&self, cluster: &str) -> bool {
        self.clusters
            .get(cluster)
            .is_some_and(|c| c.refused.is_none() && !c.datapath_down)
    }

    /// Marks a cluster's datapath down (backends unused) or up again.
    pub fn set_datapath_down(&mut self, cluster: &str, down: bool) {
        if let Some(c) = self.clusters.get_mut(cluster)
            && c.datapath_down != down
        {
            c.datapath_down = down;
            self.dirty.services = true;
        }
    }

    pub fn upsert_node(&mut self, node: Node) {
        let key = (node.cluster.clone(), node.name.clone());
        let cidrs_changed = self
            .nodes
            .get(&key)
            .is_none_or(|old| old.pod_cidrs != node.pod_cidrs);
        if self.nodes.get(&key) != Some(&node) {
            let cluster = node.cluster.clone();
            if self.nodes.insert(key, node).is_none() {
                self.count(&cluster, |c| c.nodes += 1);
            }
            self.dirty.nodes = true;
            self.refusals_dirty |= cidrs_changed;
        }
    }

    pub fn delete_node(&mut self, cluster: &str, name: &str) {
        if let Some(node) = self.nodes.remove(&(cluster.into(), name.to_owned())) {
            self.count(&node.cluster, |c| c.nodes -= 1);
            self.dirty.nodes = true;
            self.refusals_dirty = true;
        }
    }

    pub fn upsert_endpoint(&mut self, ep: Endpoint) {
        let key = (ep.cluster.clone(), ep.prefix);
        if self.endpoints.get(&key) != Some(&ep) {
            let cluster = ep.cluster.clone();
            if self.endpoints.insert(key, ep).is_none() {
                self.count(&cluster, |c| c.endpoints += 1);
            }
            self.dirty.endpoints = true;
        }
    }

    pub fn delete_endpoint(&mut self, cluster: &str, prefix: &IpNet) {
        if let Some(ep) = self.endpoints.remove(&(cluster.into(), *prefix)) {
            self.count(&ep.cluster, |c| c.endpoints -= 1);
            self.dirty.endpoints = true;
        }
    }

    pub fn upsert_identity(&mut self, identity: Identity) {
        if self.identities.get(&identity.id) != Some(&identity) {
            let cluster = identity.cluster.clone();
            if let Some(old) = self.identities.insert(identity.id, identity) {
                self.count(&old.cluster, |c| c.identities -= 1);
            }
            self.count(&cluster, |c| c.identities += 1);
            self.dirty.identities = true;
        }
    }

    pub fn delete_identity(&mut self, id: u32) {
        if let Some(old) = self.identities.remove(&id) {
            self.count(&old.cluster, |c| c.identities -= 1);
            self.dirty.identities = true;
        }
    }

    pub fn upsert_service(&mut self, svc: ClusterService) {
        let per_cluster = self.services.entry(svc.name.clone()).or_default();
        if per_cluster.get(&svc.cluster) != Some(&svc) {
            let cluster = svc.cluster.clone();
            if per_cluster.insert(cluster.clone(), svc).is_none() {
                self.count(&cluster, |c| c.services += 1);
            }
            self.dirty.services = true;
        }
    }

    pub fn delete_service(&mut self, cluster: &str, name: &ServiceName) {
        if let Some(per_cluster) = self.services.get_mut(name)
            && per_cluster.remove(cluster).is_some()
        {
            if per_cluster.is_empty() {
                self.services.remove(name);
            }
            self.count(&cluster.into(), |c| c.services -= 1);
            self.dirty.services = true;
        }
    }

    // ---- views ----

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// Nodes whose routes may be installed: every node of a usable-or-local cluster that is
    /// not refused. (A datapath-down cluster keeps its routes: probes must still reach it.)
    pub fn routable_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| {
            self.clusters
                .get(&n.cluster)
                .is_some_and(|c| c.refused.is_none())
        })
    }

    pub fn node(&self, cluster: &str, name: &str) -> Option<&Node> {
        self.nodes.get(&(cluster.into(), name.to_owned()))
    }

    /// ipcache entries of clusters that are not refused.
    pub fn ipcache(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values().filter(|e| {
            self.clusters
                .get(&e.cluster)
                .is_some_and(|c| c.refused.is_none())
        })
    }

    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.identities.values()
    }

    pub fn identity(&self, id: u32) -> Option<&Identity> {
        self.identities.get(&id)
    }

    /// The load balancer's view of every service the local cluster defines.
    pub fn service_views(&self) -> Vec<ServiceView> {
        self.services
            .values()
            .filter_map(|versions| services::select(&self.local, versions, |c| self.usable(c)))
            .collect()
    }

    /// Every service as the local cluster defines it (global or not).
    pub fn local_services(&self) -> impl Iterator<Item = &ClusterService> {
        self.services.values().filter_map(|v| v.get(&self.local))
    }

    pub fn service_view(&self, name: &ServiceName) -> Option<ServiceView> {
        services::select(&self.local, self.services.get(name)?, |c| self.usable(c))
    }

    /// Distinct services some remote cluster exports to us (Cilium's `num-global-services`:
    /// the size of its cache of remote global services), whether or not we define them.
    pub fn num_remote_global_services(&self) -> usize {
        self.services
            .values()
            .filter(|per_cluster| {
                per_cluster
                    .iter()
                    .any(|(c, s)| *c != self.local && s.global && s.shared)
            })
            .count()
    }

    pub fn counts(&self, cluster: &str) -> Counts {
        self.counts.get(cluster).copied().unwrap_or_default()
    }

    fn count(&mut self, cluster: &ClusterName, f: impl FnOnce(&mut Counts)) {
        f(self.counts.entry(cluster.clone()).or_default());
    }

    /// Brings derived state (cluster refusals) up to date after a batch of changes.
    /// [`StateHandle::update`] calls it; direct users of a `StateModel` call it before reading
    /// views.
    pub fn settle(&mut self) {
        if std::mem::take(&mut self.refusals_dirty) {
            self.recompute_refusals();
        }
    }

    fn recompute_refusals(&mut self) {
        let mut order: Vec<&ClusterEntry> = self.clusters.values().collect();
        order.sort_by_key(|c| c.order);
        let order: Vec<ClusterName> = order.into_iter().map(|c| c.name.clone()).collect();
        let mut cidrs: BTreeMap<ClusterName, Vec<IpNet>> = BTreeMap::new();
        for node in self.nodes.values() {
            cidrs
                .entry(node.cluster.clone())
                .or_default()
                .extend(node.pod_cidrs.iter().copied());
        }
        let refused = overlap::refusals(&order, &cidrs);
        for entry in self.clusters.values_mut() {
            let now = refused.get(&entry.name).cloned();
            if now != entry.refused {
                match &now {
                    Some(o) => tracing::error!(cluster = %entry.name, "{o}"),
                    None => {
                        tracing::info!(cluster = %entry.name, "pod CIDR overlap resolved: cluster accepted")
                    }
                }
                entry.refused = now;
                self.dirty.nodes = true;
                self.dirty.endpoints = true;
                self.dirty.services = true;
            }
        }
    }
}

/// Shared access to the model plus change notification.
#[derive(Clone)]
pub struct StateHandle {
    model: Arc<RwLock<StateModel>>,
    versions: Arc<watch::Sender<Versions>>,
}

impl StateHandle {
    pub fn new(local_cluster: &str, local_id: u32) -> Self {
        Self {
            model: Arc::new(RwLock::new(StateModel::new(local_cluster, local_id))),
            versions: Arc::new(watch::channel(Versions::default()).0),
        }
    }

    /// Applies `f` to the model and notifies subscribers of the kinds it changed.
    pub fn update<R>(&self, f: impl FnOnce(&mut StateModel) -> R) -> R {
        let (result, dirty) = {
            let mut model = self.model.write().unwrap_or_else(|e| e.into_inner());
            let result = f(&mut model);
            model.settle();
            (result, std::mem::take(&mut model.dirty))
        };
        if dirty.any() {
            self.versions.send_modify(|v| {
                v.nodes += u64::from(dirty.nodes);
                v.endpoints += u64::from(dirty.endpoints);
                v.identities += u64::from(dirty.identities);
                v.services += u64::from(dirty.services);
                v.local_endpoints += u64::from(dirty.local_endpoints);
                v.encryption_routes += u64::from(dirty.encryption_routes);
            });
        }
        result
    }

    pub fn read(&self) -> RwLockReadGuard<'_, StateModel> {
        self.model.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<Versions> {
        self.versions.subscribe()
    }

    pub fn versions(&self) -> Versions {
        *self.versions.borrow()
    }
}

#[cfg(test)]
mod tests;
