//! `strait kvstoremesh`: a KVStoreMesh-compatible mirror. For every remote cluster it copies
//! `cilium/state/...` verbatim into the local etcd under `cilium/cache/<type>/v1/<remote>/...`,
//! publishes `cilium/cluster-config/<remote>` marked `cached` with `syncedCanaries`, and writes
//! each kind's cache canary once its first list is mirrored. Agents of this cluster (strait's
//! or Cilium's) then read every remote from the local etcd. Removing a remote's config deletes
//! its cluster config at once and its cache after a grace period. This cluster's own config
//! is not the mirror's business: the elected cluster publisher (`mesh::exporter`) writes it.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle};

use super::remote::retrieve_config;
use crate::{
    identity::MaxConnectedClusters,
    kvstore::{
        ClustermeshConfigDir, ConfigEvent, EtcdClient, EtcdConfig, Lease, ListWatcher, WatchEvent,
    },
    metrics::Metrics,
    task::recv_opt,
    wire::{
        DataKind,
        keys::{self, canary_registration, state_key_to_cache_key},
        timestamp,
    },
};

/// Cilium's KVStoreMesh drain grace period.
pub const DRAIN_GRACE: Duration = Duration::from_secs(180);

/// Kinds mirrored for every remote (service exports only when the remote announces them).
const MIRRORED: [DataKind; 4] = [
    DataKind::Nodes,
    DataKind::Services,
    DataKind::Identities,
    DataKind::IpCache,
];

#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub local_max: MaxConnectedClusters,
    pub lease_ttl: Duration,
    pub config_timeout: Duration,
    pub drain_grace: Duration,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            local_max: MaxConnectedClusters::Max255,
            lease_ttl: crate::constants::NODE_LEASE_TTL,
            config_timeout: Duration::from_secs(180),
            drain_grace: DRAIN_GRACE,
        }
    }
}

/// Runs the mirror for every config file in `dir` until dropped.
pub struct KvstoreMesh {
    task: JoinHandle<()>,
}

impl Drop for KvstoreMesh {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KvstoreMesh {
    pub fn spawn(
        dir: PathBuf,
        local_cluster: &str,
        local: EtcdClient,
        metrics: Metrics,
        options: MeshOptions,
    ) -> Self {
        let (watcher, mut events) =
            ClustermeshConfigDir::new(dir, local_cluster).watch(Duration::from_secs(1));
        let task = tokio::spawn(async move {
            let _watcher = watcher;
            let mut mirrors: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
            let mut drains: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
            while let Some(event) = events.recv().await {
                match event {
                    ConfigEvent::Added(name, etcd) | ConfigEvent::Changed(name, etcd) => {
                        if let Some(drain) = drains.remove(&name) {
                            drain.abort();
                        }
                        if let Some(old) = mirrors.remove(&name) {
                            old.abort();
                        }
                        tracing::info!(cluster = %name, "mirroring remote cluster");
                        let mirror = Mirror {
                            name: name.clone(),
                            etcd,
                            local: local.clone(),
                            metrics: metrics.clone(),
                            options: options.clone(),
                        };
                        mirrors.insert(name, tokio::spawn(mirror.run()));
                    }
                    ConfigEvent::Removed(name) => {
                        if let Some(old) = mirrors.remove(&name) {
                            old.abort();
                        }
                        let (local, grace) = (local.clone(), options.drain_grace);
                        drains.insert(name.clone(), tokio::spawn(drain(local, name, grace)));
                    }
                }
            }
        });
        Self { task }
    }
}

/// Deletes the remote's cluster config now (so agents stop using it) and its cache after the
/// grace period (so a quick re-add does not flap every agent's state).
async fn drain(local: EtcdClient, name: String, grace: Duration) {
    if let Err(e) = local.delete(&keys::cluster_config_key(&name)).await {
        tracing::warn!(cluster = %name, error = %e, "cannot delete the cached cluster config");
    }
    tracing::info!(cluster = %name, ?grace, "remote removed: draining its cache after the grace period");
    tokio::time::sleep(grace).await;
    let mut prefixes = vec![keys::synced_prefix(&name)];
    prefixes.extend(
        DataKind::ALL
            .iter()
            .map(|k| format!("{}/{name}/", k.cache_prefix())),
    );
    for prefix in prefixes {
        for attempt in 0..5u32 {
            match local.delete_prefix(&prefix).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(cluster = %name, %prefix, error = %e, "drain failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2 << attempt)).await;
                }
            }
        }
    }
    tracing::info!(cluster = %name, "cache drained");
}

struct Mirror {
    name: String,
    etcd: EtcdConfig,
    local: EtcdClient,
    metrics: Metrics,
    options: MeshOptions,
}

impl Mirror {
    async fn run(self) {
        let mut failures = 0u64;
        loop {
            if let Err(reason) = self.session().await {
                failures += 1;
                tracing::warn!(cluster = %self.name, %reason, "mirror session failed; retrying");
                tokio::time::sleep(Duration::from_secs(failures.min(30))).await;
            }
        }
    }

    /// One session: ends with an error, or when the local lease is lost (the mirrored keys are
    /// gone with it, so everything is written again).
    async fn session(&self) -> Result<(), String> {
        let remote = EtcdClient::connect(&self.etcd)
            .await
            .map_err(|e| e.to_string())?;
        let config = retrieve_config(
            &remote,
            &self.name,
            self.options.local_max,
            self.options.config_timeout,
            &self.metrics,
            |_| {},
        )
        .await?;
        let lease = Lease::grant(&self.local, self.options.lease_ttl)
            .await
            .map_err(|e| e.to_string())?;
        let cached = config.cached_copy().encode().map_err(|e| e.to_string())?;
        self.local
            .put(
                &keys::cluster_config_key(&self.name),
                cached,
                Some(lease.id()),
            )
            .await
            .map_err(|e| e.to_string())?;

        let mut kinds: Vec<DataKind> = MIRRORED.to_vec();
        if config.exports_services_capability() {
            kinds.push(DataKind::ServiceExports);
        }
        // Kind watchers feed one channel; a canary gate holds kinds back until the source
        // announced them synced.
        let (tx, mut rx) = mpsc::channel::<(DataKind, WatchEvent)>(1024);
        let mut watchers = Vec::new();
        let (_canaries, mut canary_rx) = if config.capabilities.synced_canaries {
            let (w, r) = ListWatcher::spawn(remote.clone(), keys::synced_prefix(&self.name));
            (Some(w), Some(r))
        } else {
            for kind in kinds.drain(..) {
                watchers.push(self.watch(&remote, kind, tx.clone()));
            }
            (None, None)
        };

        let mut lost = lease.subscribe();
        loop {
            tokio::select! {
                event = recv_opt(&mut canary_rx) => {
                    // A closed channel must not be polled again (it would resolve at once).
                    let Some(event) = event else {
                        canary_rx = None;
                        continue;
                    };
                    if let WatchEvent::Upsert { key, .. } = event
                        && let Some(prefix) = canary_registration(&key, &self.name)
                    {
                        for kind in kinds.iter().copied().filter(|k| k.state_prefix() == prefix).collect::<Vec<_>>() {
                            kinds.retain(|k| *k != kind);
                            watchers.push(self.watch(&remote, kind, tx.clone()));
                        }
                    }
                }
                Some((kind, event)) = rx.recv() => self.mirror(kind, event, &lease).await?,
                changed = lost.changed() => {
                    if changed.is_err() || !lease.is_alive() {
                        return Err("local lease lost".into());
                    }
                }
            }
        }
    }

    fn watch(
        &self,
        remote: &EtcdClient,
        kind: DataKind,
        tx: mpsc::Sender<(DataKind, WatchEvent)>,
    ) -> ListWatcher {
        let (watcher, mut events) =
            ListWatcher::spawn(remote.clone(), kind.watch_prefix(&self.name, false));
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if tx.send((kind, event)).await.is_err() {
                    break;
                }
            }
        });
        watcher
    }

    async fn mirror(&self, kind: DataKind, event: WatchEvent, lease: &Lease) -> Result<(), String> {
        let result = match &event {
            WatchEvent::Upsert { key, value, .. } => {
                match state_key_to_cache_key(&self.name, key) {
                    Some(cache_key) => self
                        .local
                        .put(&cache_key, value.clone(), Some(lease.id()))
                        .await
                        .map(|_| ()),
                    None => return Ok(()),
                }
            }
            WatchEvent::Delete { key } => match state_key_to_cache_key(&self.name, key) {
                Some(cache_key) => self.local.delete(&cache_key).await.map(|_| ()),
                None => return Ok(()),
            },
            WatchEvent::ListDone => {
                tracing::info!(cluster = %self.name, %kind, "initial list mirrored");
                self.local
                    .put(
                        &kind.canary_key(&self.name, true),
                        timestamp::now_rfc3339(),
                        Some(lease.id()),
                    )
                    .await
                    .map(|_| ())
            }
        };
        result.map_err(|e| format!("mirroring {kind}: {e}"))
    }
}
