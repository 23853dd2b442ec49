//! [`EncryptionAgent`]: the level-triggered loop from the state model to WireGuard peers and
//! routes. On every nodes/endpoints version change (and every resync interval, and after a
//! failure with backoff) it plans from the whole model and reconciles the device and the route
//! table by diff, so missed or coalesced notifications never matter. What the routes do with
//! each prefix goes back into the state model, for the datapath's encryption guard.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};

use super::{DeviceStatus, WireguardConfig, WireguardError, WireguardManager};
use crate::{
    constants::WIREGUARD_LIVENESS_INTERVAL,
    routing::{RouteReconciler, RoutingConfig, TargetNetns},
    state::{StateHandle, Versions},
};

#[derive(Debug, Clone)]
pub struct EncryptionConfig {
    pub wireguard: WireguardConfig,
    pub routing: RoutingConfig,
    /// Full reconcile even without changes, repairing drift (someone deleting a route).
    pub resync_interval: Duration,
}

impl EncryptionConfig {
    /// Defaults for the node `local_node` of `local_cluster`.
    pub fn new(local_cluster: &str, local_node: &str) -> Self {
        Self {
            wireguard: WireguardConfig::new(local_cluster, local_node),
            routing: RoutingConfig::default(),
            resync_interval: Duration::from_secs(60),
        }
    }
}

/// The outcome of the latest reconcile pass.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Applied {
    /// Passes so far.
    pub generation: u64,
    /// Model versions the pass read.
    pub nodes_version: u64,
    pub endpoints_version: u64,
    pub synced: bool,
    pub peers: usize,
    pub routes: usize,
    /// Set when the pass failed (it is retried with backoff).
    pub error: Option<String>,
}

impl Applied {
    /// Whether this pass read at least `v` and succeeded.
    pub fn covers(&self, v: &Versions) -> bool {
        self.error.is_none()
            && self.nodes_version >= v.nodes
            && self.endpoints_version >= v.endpoints
    }
}

/// The running encryption subsystem of one node.
pub struct EncryptionAgent {
    manager: Arc<WireguardManager>,
    applied: watch::Receiver<Applied>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl EncryptionAgent {
    /// Starts the device (key, backend, wireguard-go) and the reconcile loop on the current
    /// tokio runtime. The namespace is `cfg.wireguard.netns`, else that of the thread calling
    /// this. `synced` turns true once every source finished its initial listing: only then are
    /// peers strait does not know garbage-collected.
    pub async fn start(
        cfg: EncryptionConfig,
        state: StateHandle,
        synced: watch::Receiver<bool>,
    ) -> Result<Self, WireguardError> {
        // Before the first await: the calling thread's namespace.
        let netns = TargetNetns::from_config(cfg.wireguard.netns.as_deref())?;
        let wg_cfg = cfg.wireguard.clone();
        let ns = netns.clone();
        let manager = tokio::task::spawn_blocking(move || WireguardManager::start_in(wg_cfg, ns))
            .await
            .map_err(|e| WireguardError::Task(e.to_string()))??;
        let manager = Arc::new(manager);
        let routes = RouteReconciler::new(cfg.routing.clone(), &cfg.wireguard.device, netns)?;
        let (applied_tx, applied) = watch::channel(Applied::default());
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(
            manager.clone(),
            routes,
            state,
            synced,
            stop_rx,
            applied_tx,
            cfg.resync_interval,
        ));
        Ok(Self {
            manager,
            applied,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Base64 public key to publish in the local node record.
    pub fn public_key(&self) -> String {
        self.manager.public_key()
    }

    pub fn manager(&self) -> &Arc<WireguardManager> {
        &self.manager
    }

    /// Per-peer status (blocking: reads the device).
    pub fn status(&self) -> Result<DeviceStatus, WireguardError> {
        self.manager.status()
    }

    /// The latest pass's outcome, updated after every pass.
    pub fn applied(&self) -> watch::Receiver<Applied> {
        self.applied.clone()
    }

    /// Waits until a successful pass has read at least `versions` (e.g.
    /// `state.versions()` right after an update). Returns the last outcome on timeout.
    pub async fn wait_applied(
        &self,
        versions: Versions,
        timeout: Duration,
    ) -> Result<Applied, Applied> {
        let mut rx = self.applied.clone();
        let wait = rx.wait_for(|a| a.covers(&versions));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(a)) => Ok(a.clone()),
            _ => Err(self.applied.borrow().clone()),
        }
    }

    /// Stops the loop and the device's wireguard-go. Routes stay: strict-mode `unreachable`
    /// routes (the fallbacks under the device routes among them) keep failing closed while
    /// strait is down, and routes into a userspace device vanish with it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let manager = self.manager.clone();
        let _ = tokio::task::spawn_blocking(move || manager.stop()).await;
    }
}

impl Drop for EncryptionAgent {
    fn drop(&mut self) {
        // Not stopped through `stop` (e.g. a panic): end the process by PID right here, whatever
        // the runtime is doing.
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.manager.stop();
    }
}

async fn run(
    manager: Arc<WireguardManager>,
    mut routes: RouteReconciler,
    state: StateHandle,
    mut synced: watch::Receiver<bool>,
    mut stop: oneshot::Receiver<()>,
    applied: watch::Sender<Applied>,
    resync: Duration,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(200);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
    let mut versions = state.subscribe();
    let mut planner = manager.planner();
    let mut backoff = MIN_BACKOFF;
    let mut synced_open = true;
    let mut generation = 0u64;
    loop {
        let v = *versions.borrow_and_update();
        let is_synced = *synced.borrow_and_update();
        let plan = {
            let model = state.read();
            planner.plan(&model)
        };
        let mut errors = Vec::new();
        let peer_plan = plan.clone();
        let mgr = manager.clone();
        match tokio::task::spawn_blocking(move || mgr.reconcile(&peer_plan, is_synced)).await {
            Ok(Ok(r)) if r.added + r.updated + r.removed > 0 => {
                tracing::debug!(
                    added = r.added,
                    updated = r.updated,
                    removed = r.removed,
                    "WireGuard peers reconciled"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(WireguardError::Stopped { .. })) => return,
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("peer reconcile task: {e}")),
        }
        // Routes even when the peers failed: strict mode must still fail closed.
        routes.set_synced(is_synced);
        let mut guard = Vec::new();
        let route_count = match routes.reconcile(&plan.route_inputs()).await {
            Ok(r) => {
                guard = r.guard;
                if r.added + r.replaced + r.removed > 0 {
                    tracing::debug!(
                        added = r.added,
                        replaced = r.replaced,
                        removed = r.removed,
                        "routes reconciled"
                    );
                }
                r.desired
            }
            Err(e) => {
                errors.push(e.to_string());
                0
            }
        };
        state.update(|m| m.set_encryption_routes(guard));
        generation += 1;
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        if let Some(e) = &error {
            tracing::warn!(error = %e, retry_in = ?backoff, "encryption reconcile failed");
        }
        applied.send_replace(Applied {
            generation,
            nodes_version: v.nodes,
            endpoints_version: v.endpoints,
            synced: is_synced,
            peers: plan.peers.len(),
            routes: route_count,
            error: error.clone(),
        });
        let wait = if error.is_some() {
            let w = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            w
        } else {
            backoff = MIN_BACKOFF;
            resync
        };
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        let mut liveness = tokio::time::interval(WIREGUARD_LIVENESS_INTERVAL);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Wait for something that matters: nodes/endpoints (not identities or services),
        // the sync flag, the timer, or stop.
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = &mut deadline => break,
                // wireguard-go died: its device and routes are gone (strict mode's fallbacks
                // drop the traffic meanwhile); the pass restarts it.
                _ = liveness.tick() => {
                    if manager.child_exited() {
                        break;
                    }
                }
                changed = versions.changed() => {
                    if changed.is_err() {
                        return; // the state model is gone
                    }
                    let now = *versions.borrow();
                    if now.nodes != v.nodes || now.endpoints != v.endpoints {
                        break;
                    }
                }
                changed = synced.changed(), if synced_open => {
                    match changed {
                        Ok(()) => break,
                        Err(_) => synced_open = false,
                    }
                }
            }
        }
    }
}
