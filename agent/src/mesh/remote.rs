//! One remote cluster's connection: connect, retrieve and validate its cluster config,
//! register it in the state model, then list-watch its data (gated by sync canaries when
//! the remote announces them) for as long as the cluster stays configured. The list-watchers
//! reconnect by themselves; state is kept across disconnects and only drained when the
//! cluster is removed (by the manager).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{
    limits::{ClusterLimits, RemoteLimits},
    sync::{ClusterSource, KindSync, Origin, SyncFlags},
};
use crate::{
    identity::MaxConnectedClusters,
    kvstore::{EtcdClient, EtcdConfig, HeartbeatTracker, ListWatcher, WatchEvent},
    metrics::{ClusterLabels, Metrics, ObjectLabels},
    state::StateHandle,
    task::recv_opt,
    wire::{
        DataKind, KvClusterConfig, RemoteContext,
        keys::{self, canary_registration},
        timestamp, validate,
    },
};

/// The data kinds an agent consumes from every cluster.
pub const CONSUMED_KINDS: [DataKind; 4] = [
    DataKind::Nodes,
    DataKind::Services,
    DataKind::Identities,
    DataKind::IpCache,
];

/// Keys applied per kind, kept by the manager across reconnects of one cluster.
pub type PresentKeys = Arc<Mutex<HashMap<DataKind, Arc<Mutex<HashSet<String>>>>>>;

/// The local cluster, as every remote is judged against it.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    pub name: String,
    pub id: u32,
    pub max_connected_clusters: MaxConnectedClusters,
}

/// Timing knobs; Cilium's values by default, shorter in tests.
#[derive(Debug, Clone)]
pub struct RemoteTiming {
    /// How long a missing cluster config is retried before the attempt fails (Cilium: 3 min).
    pub config_timeout: Duration,
    /// Cap of the linear reconnect backoff (n × 1 s).
    pub max_backoff: Duration,
    /// How often connection state is sampled for status and metrics.
    pub status_interval: Duration,
}

impl Default for RemoteTiming {
    fn default() -> Self {
        Self {
            config_timeout: Duration::from_secs(180),
            max_backoff: Duration::from_secs(30),
            status_interval: Duration::from_secs(1),
        }
    }
}

/// Status of one remote cluster, with Cilium's RemoteCluster field names (§7.1 of the
/// wire-format reference), plus `error` for what strait refuses and why.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", default)]
pub struct RemoteClusterStatus {
    pub name: String,
    pub ready: bool,
    pub connected: bool,
    pub status: String,
    pub num_nodes: usize,
    pub num_shared_services: usize,
    pub num_endpoints: usize,
    pub num_identities: usize,
    pub num_failures: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    pub synced: SyncedStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<RemoteConfigStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyncedStatus {
    pub nodes: bool,
    pub services: bool,
    pub identities: bool,
    pub endpoints: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct RemoteConfigStatus {
    pub required: bool,
    pub retrieved: bool,
    pub cluster_id: u32,
    pub kvstoremesh: bool,
    pub sync_canaries: bool,
    pub service_exports_enabled: Option<bool>,
}

/// A running remote cluster; dropping it stops the connection (state stays until drained).
pub struct RemoteHandle {
    task: JoinHandle<()>,
    status: Arc<Mutex<RemoteClusterStatus>>,
    synced: Arc<Mutex<Arc<SyncFlags>>>,
    state: StateHandle,
    limits: Arc<ClusterLimits>,
}

impl RemoteHandle {
    /// Current status, with object counts from the state model.
    pub fn status(&self) -> RemoteClusterStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let flags = self
            .synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.synced = synced_status(&flags);
        let counts = self.state.read().counts(&s.name);
        (
            s.num_nodes,
            s.num_endpoints,
            s.num_identities,
            s.num_shared_services,
        ) = (
            counts.nodes,
            counts.endpoints,
            counts.identities,
            counts.services,
        );
        s.ready = s.connected
            && s.config.as_ref().is_some_and(|c| c.retrieved)
            && flags.all()
            && s.error.is_none();
        // Refused keys are an error to show, but the rest of the cluster stays in use.
        if let Some(summary) = self.limits.summary() {
            s.error = Some(match s.error.take() {
                Some(e) => format!("{e}; {summary}"),
                None => summary,
            });
        }
        s
    }
}

impl RemoteHandle {
    /// Stops the connection and waits until its task is gone.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for RemoteHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn synced_status(flags: &SyncFlags) -> SyncedStatus {
    use std::sync::atomic::Ordering::Relaxed;
    SyncedStatus {
        nodes: flags.nodes.load(Relaxed),
        services: flags.services.load(Relaxed),
        identities: flags.identities.load(Relaxed),
        endpoints: flags.endpoints.load(Relaxed),
    }
}

pub struct RemoteCluster {
    pub name: String,
    pub etcd: EtcdConfig,
    pub local: LocalCluster,
    pub state: StateHandle,
    pub metrics: Metrics,
    pub timing: RemoteTiming,
    pub limits: RemoteLimits,
    pub present: PresentKeys,
}

/// Why a connection attempt failed.
type Failure = String;

impl RemoteCluster {
    pub fn spawn(self) -> RemoteHandle {
        let status = Arc::new(Mutex::new(RemoteClusterStatus {
            name: self.name.clone(),
            status: "Waiting for initial connection to be established".into(),
            ..Default::default()
        }));
        let synced = Arc::new(Mutex::new(Arc::new(SyncFlags::default())));
        let state = self.state.clone();
        let limits = Arc::new(ClusterLimits::new(Some(self.limits)));
        let task = tokio::spawn(self.run(status.clone(), synced.clone(), limits.clone()));
        RemoteHandle {
            task,
            status,
            synced,
            state,
            limits,
        }
    }

    async fn run(
        self,
        status: Arc<Mutex<RemoteClusterStatus>>,
        synced: Arc<Mutex<Arc<SyncFlags>>>,
        limits: Arc<ClusterLimits>,
    ) {
        let labels = ClusterLabels {
            cluster: self.name.clone(),
        };
        let mut failures: u32 = 0;
        loop {
            match self.session(&status, &synced, &limits).await {
                // Sessions only end by failing; the watchers inside reconnect on their own.
                Ok(never) => match never {},
                Err(reason) => {
                    failures += 1;
                    tracing::warn!(cluster = %self.name, %reason, "remote cluster connection failed; retrying");
                    self.metrics.remote_failures.get_or_create(&labels).inc();
                    self.metrics
                        .remote_last_failure
                        .get_or_create(&labels)
                        .set(unix_now());
                    self.metrics.remote_connected.get_or_create(&labels).set(0);
                    self.metrics.remote_ready.get_or_create(&labels).set(0);
                    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
                    s.connected = false;
                    s.num_failures += 1;
                    s.last_failure = Some(timestamp::now_rfc3339());
                    s.status = reason;
                }
            }
            let delay = Duration::from_secs(u64::from(failures)).min(self.timing.max_backoff);
            tokio::time::sleep(delay).await;
        }
    }

    async fn session(
        &self,
        status: &Mutex<RemoteClusterStatus>,
        synced_slot: &Mutex<Arc<SyncFlags>>,
        limits: &Arc<ClusterLimits>,
    ) -> Result<std::convert::Infallible, Failure> {
        let set = |f: &dyn Fn(&mut RemoteClusterStatus)| {
            f(&mut status.lock().unwrap_or_else(|e| e.into_inner()))
        };
        let client = EtcdClient::connect(&self.etcd)
            .await
            .map_err(|e| e.to_string())?;
        let etcd_status = format!(
            "etcd: connected to {}, ID: {:x}",
            client.endpoints(),
            client.cluster_id()
        );
        set(&|s| s.status = etcd_status.clone());

        let config = self.retrieve_config(&client, status).await?;
        let ctx =
            RemoteContext::from_config(&self.name, &config, self.local.max_connected_clusters);
        let cached = config.capabilities.cached;
        let canaries = config.capabilities.synced_canaries;
        set(&|s| {
            s.config = Some(RemoteConfigStatus {
                required: true,
                retrieved: true,
                cluster_id: config.id,
                kvstoremesh: cached,
                sync_canaries: canaries,
                service_exports_enabled: config.capabilities.service_exports_enabled,
            })
        });

        // Same name and ID: admitted. Another cluster's ID (or our own): refused and retried,
        // since the conflict may go away when the other cluster is removed.
        let admitted = self.state.update(|m| {
            if let Some(existing) = m.cluster(&self.name)
                && existing.id != config.id
            {
                tracing::warn!(cluster = %self.name, old = existing.id, new = config.id, "cluster ID changed: draining its state first");
                m.drain_cluster(&self.name);
            }
            m.register_cluster(&self.name, config.id)
        });
        if let Err(conflict) = admitted {
            let msg = conflict.to_string();
            self.metrics.rejected(
                &self.name,
                validate::KIND_CLUSTER_CONFIG,
                "cluster-id-in-use",
            );
            set(&|s| s.error = Some(msg.clone()));
            return Err(msg);
        }
        set(&|s| {
            s.error = None;
            s.connected = true;
        });

        let flags = Arc::new(SyncFlags::default());
        *synced_slot.lock().unwrap_or_else(|e| e.into_inner()) = flags.clone();
        let origin = Origin::Remote(ctx);
        let mut watchers = Vec::new();
        let mut pending: Vec<DataKind> = CONSUMED_KINDS.to_vec();
        // Cilium reports a kvstore whose heartbeat stopped (> 2 min) as unhealthy.
        let heartbeat = HeartbeatTracker::spawn(client.clone());
        let (canary_watcher, mut canary_rx) = if canaries {
            let (w, rx) = ListWatcher::spawn(client.clone(), keys::synced_prefix(&self.name));
            (Some(w), Some(rx))
        } else {
            for kind in pending.drain(..) {
                watchers.push(self.start_kind(&client, kind, cached, &origin, &flags, limits));
            }
            (None, None)
        };

        let labels = ClusterLabels {
            cluster: self.name.clone(),
        };
        let mut tick = tokio::time::interval(self.timing.status_interval);
        // Watchers that have not listed yet are starting, not disconnected: only a drop after
        // they were connected counts as a failure (a clean connect showed one).
        let mut was_connected = false;
        loop {
            tokio::select! {
                event = recv_opt(&mut canary_rx) => match event {
                    Some(WatchEvent::Upsert { key, .. }) => {
                        if let Some(prefix) = canary_registration(&key, &self.name) {
                            let ready: Vec<DataKind> =
                                pending.iter().copied().filter(|k| k.canary_prefix(cached) == prefix).collect();
                            for kind in ready {
                                tracing::info!(cluster = %self.name, %kind, "sync canary seen: watching");
                                pending.retain(|k| *k != kind);
                                watchers.push(self.start_kind(&client, kind, cached, &origin, &flags, limits));
                            }
                        }
                    }
                    Some(_) => {}
                    None => canary_rx = None,
                },
                _ = tick.tick() => {
                    let connected = watchers.iter().all(|w| w.is_connected())
                        && canary_watcher.as_ref().is_none_or(|w| w.is_connected());
                    if was_connected && !connected {
                        self.metrics.remote_failures.get_or_create(&labels).inc();
                        self.metrics.remote_last_failure.get_or_create(&labels).set(unix_now());
                    }
                    let error = watchers.iter().find_map(|w| w.stats().last_error);
                    set(&|s| {
                        if was_connected && !connected {
                            s.num_failures += 1;
                            s.last_failure = Some(timestamp::now_rfc3339());
                        }
                        s.connected = connected;
                        s.status = match (connected, heartbeat.is_stale()) {
                            (false, _) => format!("etcd: disconnected: {}", error.clone().unwrap_or_default()),
                            (true, true) => format!(
                                "{etcd_status}; {}s since last heartbeat update has been received",
                                heartbeat.heartbeat_age().unwrap_or_default().as_secs()
                            ),
                            (true, false) => etcd_status.clone(),
                        };
                        s.error = self.state.read().cluster(&self.name).and_then(|c| c.refused.as_ref().map(|o| o.to_string()));
                    });
                    was_connected = connected;
                    self.publish_gauges(connected, &flags);
                }
            }
        }
    }

    fn publish_gauges(&self, connected: bool, flags: &SyncFlags) {
        let labels = ClusterLabels {
            cluster: self.name.clone(),
        };
        let counts = self.state.read().counts(&self.name);
        let usable = self.state.read().usable(&self.name);
        self.metrics
            .remote_connected
            .get_or_create(&labels)
            .set(i64::from(connected));
        self.metrics
            .remote_ready
            .get_or_create(&labels)
            .set(i64::from(connected && flags.all() && usable));
        for (kind, n) in [
            ("nodes", counts.nodes),
            ("endpoints", counts.endpoints),
            ("identities", counts.identities),
            ("services", counts.services),
        ] {
            self.metrics
                .remote_objects
                .get_or_create(&ObjectLabels {
                    cluster: self.name.clone(),
                    kind: kind.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    fn start_kind(
        &self,
        client: &EtcdClient,
        kind: DataKind,
        cached: bool,
        origin: &Origin,
        flags: &Arc<SyncFlags>,
        limits: &Arc<ClusterLimits>,
    ) -> ListWatcher {
        let present = self
            .present
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default()
            .clone();
        let source = ClusterSource {
            cluster: self.name.clone(),
            cached,
            origin: origin.clone(),
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            limits: limits.clone(),
        };
        let sync = KindSync::new(source, kind, flags.clone(), present);
        let (watcher, rx) =
            ListWatcher::spawn(client.clone(), kind.watch_prefix(&self.name, cached));
        tokio::spawn(sync.run(rx));
        watcher
    }

    async fn retrieve_config(
        &self,
        client: &EtcdClient,
        status: &Mutex<RemoteClusterStatus>,
    ) -> Result<KvClusterConfig, Failure> {
        retrieve_config(
            client,
            &self.name,
            self.local.max_connected_clusters,
            self.timing.config_timeout,
            &self.metrics,
            |s| status.lock().unwrap_or_else(|e| e.into_inner()).status = s.to_owned(),
        )
        .await
    }
}

/// Cilium requires a remote's cluster config: retried with a linear backoff (1 s, 2 s, …
/// capped at 30 s) until `timeout`; `progress` hears why each attempt failed.
pub async fn retrieve_config(
    client: &EtcdClient,
    name: &str,
    local_max: MaxConnectedClusters,
    timeout: Duration,
    metrics: &Metrics,
    progress: impl Fn(&str),
) -> Result<KvClusterConfig, Failure> {
    let key = keys::cluster_config_key(name);
    let deadline = Instant::now() + timeout;
    let mut attempt = 0u64;
    loop {
        let missing = match client.get(&key).await {
            Ok(Some(kv)) => {
                return validate::decode_remote_cluster_config(local_max, &kv.value).map_err(|r| {
                    metrics.rejected(name, r.kind, r.reason.as_str());
                    format!("invalid cluster configuration at {key}: {}", r.reason)
                });
            }
            Ok(None) => format!("remote cluster configuration required but not found at {key}"),
            Err(e) => e.to_string(),
        };
        progress(&missing);
        if Instant::now() >= deadline {
            return Err(format!(
                "failed to retrieve cluster configuration: {missing}"
            ));
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_secs(attempt).min(Duration::from_secs(30))).await;
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
