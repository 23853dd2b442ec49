//! The mesh: the agent's own cluster (list-watched in Cilium's kvstore mode) and one
//! connection per remote-cluster config file — added on a new file, reconnected when a file
//! changes, drained when it is removed.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::task::JoinHandle;

use super::{
    limits::{ClusterLimits, RemoteLimits},
    remote::{
        LocalCluster, PresentKeys, RemoteCluster, RemoteClusterStatus, RemoteHandle, RemoteTiming,
    },
    sync::{ClusterSource, KindSync, Origin, SyncFlags},
};
use crate::{
    identity::validate_cluster_name,
    kvstore::{ClustermeshConfigDir, ConfigEvent, EtcdClient, ListWatcher},
    metrics::Metrics,
    state::StateHandle,
    wire::DataKind,
};

/// How often the config directory is polled.
const CONFIG_POLL: Duration = Duration::from_secs(1);

struct Entry {
    handle: RemoteHandle,
    present: PresentKeys,
}

/// Runs the mesh until dropped.
pub struct ClusterMesh {
    remotes: Arc<Mutex<BTreeMap<String, Entry>>>,
    /// Config files whose name is not a valid cluster name, with the reason.
    invalid: Arc<Mutex<BTreeMap<String, String>>>,
    task: JoinHandle<()>,
}

impl Drop for ClusterMesh {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClusterMesh {
    /// A mesh with the default [`RemoteLimits`].
    pub fn spawn(
        config_dir: PathBuf,
        local: LocalCluster,
        state: StateHandle,
        metrics: Metrics,
        timing: RemoteTiming,
    ) -> Self {
        Self::spawn_with_limits(
            config_dir,
            local,
            state,
            metrics,
            timing,
            RemoteLimits::default(),
        )
    }

    pub fn spawn_with_limits(
        config_dir: PathBuf,
        local: LocalCluster,
        state: StateHandle,
        metrics: Metrics,
        timing: RemoteTiming,
        limits: RemoteLimits,
    ) -> Self {
        let remotes: Arc<Mutex<BTreeMap<String, Entry>>> = Arc::default();
        let invalid: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let (watcher, mut events) =
            ClustermeshConfigDir::new(config_dir, local.name.clone()).watch(CONFIG_POLL);
        let task = {
            let (remotes, invalid) = (remotes.clone(), invalid.clone());
            tokio::spawn(async move {
                let _watcher = watcher;
                while let Some(event) = events.recv().await {
                    let (name, etcd) = match event {
                        ConfigEvent::Removed(name) => {
                            invalid
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&name);
                            if remotes
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&name)
                                .is_some()
                            {
                                tracing::info!(cluster = %name, "clustermesh config removed: draining the cluster");
                                state.update(|m| m.drain_cluster(&name));
                            }
                            continue;
                        }
                        ConfigEvent::Added(name, etcd) | ConfigEvent::Changed(name, etcd) => {
                            (name, etcd)
                        }
                    };
                    if let Err(e) = validate_cluster_name(&name) {
                        tracing::error!(file = %name, error = %e, "clustermesh config file name is not a valid cluster name: ignored");
                        invalid
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(name, e.to_string());
                        continue;
                    }
                    let mut remotes = remotes.lock().unwrap_or_else(|e| e.into_inner());
                    // A changed file reconnects; what was applied stays until the new first
                    // list says otherwise.
                    let present = remotes.remove(&name).map(|e| e.present).unwrap_or_default();
                    tracing::info!(cluster = %name, endpoints = ?etcd.endpoints, "connecting to remote cluster");
                    let handle = RemoteCluster {
                        name: name.clone(),
                        etcd,
                        local: local.clone(),
                        state: state.clone(),
                        metrics: metrics.clone(),
                        timing: timing.clone(),
                        limits,
                        present: present.clone(),
                    }
                    .spawn();
                    remotes.insert(name, Entry { handle, present });
                }
            })
        };
        Self {
            remotes,
            invalid,
            task,
        }
    }

    /// Stops following the config directory, then every remote connection, and waits for
    /// each (what they wrote into the state model stays).
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        let remotes: Vec<Entry> =
            std::mem::take(&mut *self.remotes.lock().unwrap_or_else(|e| e.into_inner()))
                .into_values()
                .collect();
        for entry in remotes {
            entry.handle.stop().await;
        }
    }

    /// Status of every configured remote cluster, sorted by name.
    pub fn statuses(&self) -> Vec<RemoteClusterStatus> {
        let mut out: Vec<RemoteClusterStatus> = self
            .remotes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.handle.status())
            .collect();
        for (name, reason) in self
            .invalid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            out.push(RemoteClusterStatus {
                name: name.clone(),
                status: "invalid configuration".into(),
                error: Some(reason.clone()),
                ..Default::default()
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// The agent's own cluster in kvstore mode: other nodes, endpoints and identities of this
/// cluster, so same-cluster peers are known without a Kubernetes API.
pub struct LocalClusterWatch {
    _watchers: Vec<ListWatcher>,
    pub synced: Arc<SyncFlags>,
}

impl LocalClusterWatch {
    pub fn spawn(client: &EtcdClient, cluster: &str, state: StateHandle, metrics: Metrics) -> Self {
        let synced = Arc::new(SyncFlags::default());
        let limits = Arc::new(ClusterLimits::new(None));
        // Local services come from the Kubernetes source, not the kvstore.
        synced
            .services
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let watchers = [DataKind::Nodes, DataKind::Identities, DataKind::IpCache]
            .into_iter()
            .map(|kind| {
                let source = ClusterSource {
                    cluster: cluster.into(),
                    cached: false,
                    origin: Origin::Local,
                    state: state.clone(),
                    metrics: metrics.clone(),
                    limits: limits.clone(),
                };
                let sync = KindSync::new(source, kind, synced.clone(), Arc::default());
                let (watcher, rx) =
                    ListWatcher::spawn(client.clone(), kind.watch_prefix(cluster, false));
                tokio::spawn(sync.run(rx));
                watcher
            })
            .collect();
        Self {
            _watchers: watchers,
            synced,
        }
    }
}
