//! Applying one cluster's kvstore events to the state model: decode with the rules that fit
//! where the data comes from (our own cluster, or a remote one), convert, update. Rejected
//! values are logged once per key and reason (within the cluster's log budget), counted, and
//! never touch other entries; a remote's [`limits`](super::limits) cap what it makes us hold.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use super::{
    convert,
    limits::{ClusterLimits, LimitError, LogAdmit, Refused},
};
use crate::{
    kvstore::WatchEvent,
    metrics::Metrics,
    state::{StateHandle, StateModel},
    wire::{
        DataKind, Rejection, RemoteContext, ServiceOutcome,
        validate::{self as v},
    },
};

/// Whose data this is, which decides the validation rules.
#[derive(Debug, Clone)]
pub enum Origin {
    /// Our own cluster's kvstore (Cilium's kvstore mode): decodability and key checks only.
    Local,
    /// A remote cluster: Cilium's remote acceptance rules.
    Remote(RemoteContext),
}

/// Per-kind "initial list complete" flags of one cluster.
#[derive(Debug, Default)]
pub struct SyncFlags {
    pub nodes: AtomicBool,
    pub services: AtomicBool,
    pub identities: AtomicBool,
    pub endpoints: AtomicBool,
}

impl SyncFlags {
    pub fn flag(&self, kind: DataKind) -> Option<&AtomicBool> {
        match kind {
            DataKind::Nodes => Some(&self.nodes),
            DataKind::Services => Some(&self.services),
            DataKind::Identities => Some(&self.identities),
            DataKind::IpCache => Some(&self.endpoints),
            DataKind::ServiceExports => None,
        }
    }

    pub fn all(&self) -> bool {
        [
            &self.nodes,
            &self.services,
            &self.identities,
            &self.endpoints,
        ]
        .iter()
        .all(|f| f.load(Ordering::Relaxed))
    }
}

/// Where one cluster's data comes from and goes to, shared by its kinds.
#[derive(Clone)]
pub struct ClusterSource {
    pub cluster: String,
    /// Read from KVStoreMesh cache prefixes.
    pub cached: bool,
    pub origin: Origin,
    pub state: StateHandle,
    pub metrics: Metrics,
    pub limits: Arc<ClusterLimits>,
}

/// Applies the events of one data kind of one cluster.
pub struct KindSync {
    cluster: String,
    kind: DataKind,
    cached: bool,
    origin: Origin,
    state: StateHandle,
    metrics: Metrics,
    synced: Arc<SyncFlags>,
    /// Keys whose values are in the state model. Shared with the next `KindSync` of the same
    /// cluster and kind (after a reconnect with a changed config), so its first list can
    /// remove what vanished in between.
    present: Arc<Mutex<HashSet<String>>>,
    /// Keys seen since this sync started, until its first list is complete.
    listing: Option<HashSet<String>>,
    /// Keys currently refused, with the reason last logged (so each is logged once).
    rejected: HashMap<String, String>,
    limits: Arc<ClusterLimits>,
    /// Keys currently refused by a limit.
    limited: HashMap<String, LimitError>,
}

impl KindSync {
    pub fn new(
        source: ClusterSource,
        kind: DataKind,
        synced: Arc<SyncFlags>,
        present: Arc<Mutex<HashSet<String>>>,
    ) -> Self {
        let ClusterSource {
            cluster,
            cached,
            origin,
            state,
            metrics,
            limits,
        } = source;
        Self {
            cluster,
            kind,
            cached,
            origin,
            state,
            metrics,
            synced,
            present,
            listing: Some(HashSet::new()),
            rejected: HashMap::new(),
            limits,
            limited: HashMap::new(),
        }
    }

    fn present(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.present.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the watcher's events until it stops, in batches of what is already queued.
    pub async fn run(mut self, mut events: tokio::sync::mpsc::Receiver<WatchEvent>) {
        const MAX_BATCH: usize = 1024;
        while let Some(first) = events.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match events.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            self.apply_batch(batch);
        }
    }

    /// Applies events under one state-model update, so a burst (an initial list) wakes the
    /// reconcilers and recomputes derived state once, not per key.
    pub fn apply_batch(&mut self, events: Vec<WatchEvent>) {
        let state = self.state.clone();
        state.update(|m| {
            for event in events {
                self.apply_one(m, event);
            }
        });
        let mut refused = Refused::default();
        for e in self.limited.values() {
            match e {
                LimitError::OverLimit { .. } => refused.over_limit += 1,
                LimitError::ValueTooLarge { .. } => refused.too_large += 1,
            }
        }
        self.limits.set_refused(self.kind, refused);
    }

    fn apply_one(&mut self, m: &mut StateModel, event: WatchEvent) {
        match event {
            WatchEvent::ListDone => {
                // Whatever an earlier session applied and this first list no longer has is gone.
                if let Some(listed) = self.listing.take() {
                    let stale: Vec<String> = self.present().difference(&listed).cloned().collect();
                    for key in stale {
                        if let Some(suffix) = self.kind.key_suffix(&key, &self.cluster, self.cached)
                        {
                            self.delete(m, suffix);
                        }
                        self.present().remove(&key);
                    }
                }
                if let Some(flag) = self.synced.flag(self.kind) {
                    flag.store(true, Ordering::Relaxed);
                }
                tracing::info!(cluster = %self.cluster, kind = %self.kind, "initial sync complete");
            }
            WatchEvent::Upsert { key, value, .. } => {
                let Some(suffix) = self.kind.key_suffix(&key, &self.cluster, self.cached) else {
                    return;
                };
                let suffix = suffix.to_owned();
                if let Some(listed) = &mut self.listing {
                    listed.insert(key.clone());
                }
                if let Err(e) = self.admit(&key, value.len()) {
                    self.present().remove(&key);
                    self.limited.insert(key.clone(), e);
                    self.reject(
                        m,
                        &key,
                        &suffix,
                        self.wire_kind(),
                        e.reason(),
                        e.to_string(),
                    );
                    return;
                }
                self.limited.remove(&key);
                match self.upsert(m, &suffix, &value) {
                    Ok(()) => {
                        self.rejected.remove(&key);
                        self.present().insert(key);
                        self.count("upsert");
                    }
                    Err(rejection) => {
                        self.present().remove(&key);
                        let text = rejection.reason.to_string();
                        let reason = rejection.reason.as_str();
                        self.reject(m, &key, &suffix, rejection.kind, reason, text);
                    }
                }
            }
            WatchEvent::Delete { key } => {
                let Some(suffix) = self.kind.key_suffix(&key, &self.cluster, self.cached) else {
                    return;
                };
                let suffix = suffix.to_owned();
                self.rejected.remove(&key);
                self.limited.remove(&key);
                self.present().remove(&key);
                self.delete(m, &suffix);
                self.count("delete");
            }
        }
    }

    fn count(&self, action: &str) {
        self.metrics
            .kvstore_events
            .get_or_create(&crate::metrics::EventLabels {
                cluster: self.cluster.clone(),
                kind: self.kind.as_str().into(),
                action: action.into(),
            })
            .inc();
    }

    /// The remote's limits, for a value of `size` bytes at `key`.
    fn admit(&self, key: &str, size: usize) -> Result<(), LimitError> {
        let Some(limits) = self.limits.limits else {
            return Ok(());
        };
        let present = self.present();
        limits.admit(self.kind, present.contains(key), present.len(), size)
    }

    /// The kind as rejections name it (`node`, `identity`, …).
    fn wire_kind(&self) -> &'static str {
        match self.kind {
            DataKind::Nodes => v::KIND_NODE,
            DataKind::Services => v::KIND_SERVICE,
            DataKind::Identities => v::KIND_IDENTITY,
            DataKind::IpCache => v::KIND_IPCACHE,
            DataKind::ServiceExports => self.kind.as_str(),
        }
    }

    fn reject(
        &mut self,
        m: &mut StateModel,
        key: &str,
        suffix: &str,
        kind: &'static str,
        reason: &'static str,
        text: String,
    ) {
        self.metrics.rejected(&self.cluster, kind, reason);
        if self.rejected.get(key) != Some(&text) {
            // A flood of distinct bad keys must not flood the log.
            match self.limits.log_admit() {
                LogAdmit::Log { suppressed } => {
                    if suppressed > 0 {
                        tracing::warn!(cluster = %self.cluster, "… and {suppressed} more kvstore values rejected in the last minute (not logged)");
                    }
                    tracing::warn!(cluster = %self.cluster, %key, kind, reason = %text, "kvstore value rejected");
                }
                LogAdmit::Suppress => {}
            }
            self.rejected.insert(key.to_owned(), text);
        }
        // A value that turned invalid must not keep its old, valid version alive.
        self.delete(m, suffix);
    }

    fn upsert(&self, m: &mut StateModel, suffix: &str, value: &[u8]) -> Result<(), Rejection> {
        let name = m.cluster_name(&self.cluster);
        match (self.kind, &self.origin) {
            (DataKind::Nodes, origin) => {
                let node = match origin {
                    Origin::Local => v::decode_local_node(suffix, value)?,
                    Origin::Remote(ctx) => v::decode_remote_node(ctx, suffix, value)?,
                };
                m.upsert_node(convert::node(&node, name));
            }
            (DataKind::Identities, origin) => {
                let identity = match origin {
                    Origin::Local => v::decode_local_identity(suffix, value)?,
                    Origin::Remote(ctx) => v::decode_remote_identity(ctx, suffix, value)?,
                };
                m.upsert_identity(convert::identity(&identity, name));
            }
            (DataKind::IpCache, origin) => {
                let pair = match origin {
                    Origin::Local => v::decode_local_ipcache(suffix, value)?,
                    Origin::Remote(ctx) => v::decode_remote_ipcache(ctx, suffix, value)?,
                };
                if let Some(ep) = convert::endpoint(&pair, name) {
                    m.upsert_endpoint(ep);
                }
            }
            (DataKind::Services, Origin::Remote(ctx)) => {
                match v::decode_remote_service(ctx, suffix, value)? {
                    ServiceOutcome::Upsert(svc) => m.upsert_service(convert::service(&svc, name)),
                    ServiceOutcome::NotShared(svc) => {
                        let svc_name = crate::state::ServiceName::new(&svc.namespace, &svc.name);
                        m.delete_service(&self.cluster, &svc_name);
                    }
                }
            }
            // Local services come from the Kubernetes source; exports are not consumed yet.
            (DataKind::Services, Origin::Local) | (DataKind::ServiceExports, _) => {}
        }
        Ok(())
    }

    fn delete(&self, m: &mut StateModel, suffix: &str) {
        let cluster = self.cluster.as_str();
        match self.kind {
            DataKind::Nodes => m.delete_node(cluster, suffix),
            DataKind::Identities => {
                if let Ok(id) = suffix.parse::<u32>() {
                    // Only the owner's delete counts: IDs are cluster-scoped by range.
                    if m.identity(id)
                        .is_some_and(|i| i.cluster.as_ref() == cluster)
                    {
                        m.delete_identity(id);
                    }
                }
            }
            DataKind::IpCache => {
                if let Some(prefix) = convert::prefix_from_key(suffix) {
                    m.delete_endpoint(cluster, &prefix);
                }
            }
            DataKind::Services => {
                if let Some((ns, name)) = suffix.split_once('/') {
                    let svc = crate::state::ServiceName::new(ns, name);
                    m.delete_service(cluster, &svc);
                }
            }
            DataKind::ServiceExports => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::MaxConnectedClusters,
        mesh::limits::{ClusterLimits, RemoteLimits},
    };

    const CLUSTER: &str = "c1";

    fn labels(app: &str) -> Vec<u8> {
        format!("k8s:app={app};k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;")
            .into_bytes()
    }

    fn key(id: u32) -> String {
        DataKind::Identities.key(CLUSTER, false, &id.to_string())
    }

    fn upsert(id: u32, value: Vec<u8>) -> WatchEvent {
        WatchEvent::Upsert {
            key: key(id),
            value,
            is_create: true,
        }
    }

    /// An identity sync of remote `c1` (cluster ID 1) capped at 2 identities and 128 bytes.
    fn capped() -> (KindSync, StateHandle, Metrics, Arc<ClusterLimits>) {
        let state = StateHandle::new("local", 2);
        state.update(|m| m.register_cluster(CLUSTER, 1)).unwrap();
        let metrics = Metrics::new();
        let limits = Arc::new(ClusterLimits::new(Some(RemoteLimits {
            max_identities: 2,
            max_value_bytes: 128,
            ..RemoteLimits::default()
        })));
        let source = ClusterSource {
            cluster: CLUSTER.into(),
            cached: false,
            origin: Origin::Remote(RemoteContext::new(CLUSTER, 1, MaxConnectedClusters::Max255)),
            state: state.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
        };
        let sync = KindSync::new(source, DataKind::Identities, Arc::default(), Arc::default());
        (sync, state, metrics, limits)
    }

    fn held(state: &StateHandle) -> Vec<u32> {
        let m = state.read();
        (65536..65546)
            .filter(|id| m.identity(*id).is_some())
            .collect()
    }

    fn rejected(metrics: &Metrics, reason: &str) -> u64 {
        metrics
            .kvstore_rejected
            .get_or_create(&crate::metrics::RejectionLabels {
                cluster: CLUSTER.into(),
                kind: v::KIND_IDENTITY.into(),
                reason: reason.into(),
            })
            .get()
    }

    #[test]
    fn keys_over_the_cap_are_refused_counted_and_shown() {
        let (mut sync, state, metrics, limits) = capped();
        sync.apply_batch((65536..65540).map(|id| upsert(id, labels("a"))).collect());
        assert_eq!(held(&state), [65536, 65537]);
        assert_eq!(rejected(&metrics, "over-limit"), 2);
        assert_eq!(
            limits.summary().unwrap(),
            "limits exceeded: identities: 2 keys over maxIdentities (2)"
        );
    }

    #[test]
    fn held_keys_still_update_and_deletes_free_room() {
        let (mut sync, state, _metrics, limits) = capped();
        sync.apply_batch((65536..65539).map(|id| upsert(id, labels("a"))).collect());
        // An update of a held key applies at the cap.
        sync.apply_batch(vec![upsert(65537, labels("b"))]);
        let app = |id| {
            state
                .read()
                .identity(id)
                .map(|i| format!("{:?}", i.labels))
                .unwrap_or_default()
        };
        assert!(
            app(65537).contains("app") && app(65537).contains('b'),
            "{}",
            app(65537)
        );
        // A delete always applies, and makes room for the next new key.
        sync.apply_batch(vec![WatchEvent::Delete { key: key(65536) }]);
        assert_eq!(held(&state), [65537]);
        sync.apply_batch(vec![upsert(65538, labels("a"))]);
        assert_eq!(held(&state), [65537, 65538]);
        assert_eq!(limits.summary(), None);
    }

    #[test]
    fn oversized_values_are_refused_and_drop_the_old_version() {
        let (mut sync, state, metrics, limits) = capped();
        sync.apply_batch(vec![upsert(65536, labels("a"))]);
        let big = labels(&"x".repeat(200));
        sync.apply_batch(vec![upsert(65536, big.clone()), upsert(65537, big)]);
        assert!(held(&state).is_empty());
        assert_eq!(rejected(&metrics, "value-too-large"), 2);
        assert_eq!(
            limits.summary().unwrap(),
            "limits exceeded: identities: 2 values over maxValueBytes (128)"
        );
    }
}
