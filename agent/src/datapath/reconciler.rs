//! The agent side of the datapath: loads and attaches it, then keeps its maps equal to the
//! state model (services → lb4 maps, endpoints → ipcache, local endpoints → policy programs
//! and maps, strict encryption's routes → encryption guard), reads flow events and exports
//! drop counters. It is the only writer of those maps.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use strait_common::{flow::CONFIG_FLAG_TRACE_ALLOWED, names};
use tokio::sync::watch;

use super::{
    Datapath, DatapathError, DatapathSection, DatapathStatus, PinDir, endpoints,
    flows::{self, FlowHub, IdentityLookup},
    guard::GuardWriter,
    ipcache::{self, IpcacheSyncReport, IpcacheWriter},
    lb::{self, LbSyncReport, LbWriter},
    policy::{CtGc, PolicyWriter},
};
use crate::{
    metrics::{ClusterReasonLabels, MapLabels, Metrics, ReasonLabels},
    state::{IpcacheRefusal, StateHandle, Versions},
    task::AbortOnDrop,
};

/// Idle times after which conntrack entries are collected (Cilium's defaults: 6 h for
/// established TCP, 1 min for the rest).
const CT_TCP_IDLE: Duration = Duration::from_secs(6 * 3600);
const CT_OTHER_IDLE: Duration = Duration::from_secs(60);
const CT_GC_INTERVAL: Duration = Duration::from_secs(30);
const COUNTERS_INTERVAL: Duration = Duration::from_secs(5);
/// How soon map writes and deletes that failed are tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// The cgroup v2 mount point, from /proc/mounts (never assumed: hybrid hosts mount it under
/// `/sys/fs/cgroup/unified`, Talos at `/sys/fs/cgroup`).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

pub struct DatapathAgent {
    status: Arc<Mutex<DatapathStatus>>,
    /// Local endpoints with programs attached and maps written: ifindex → identity.
    programmed: Arc<Mutex<BTreeMap<u32, u32>>>,
    flows: FlowHub,
    tasks: Vec<AbortOnDrop>,
}

impl DatapathAgent {
    /// Loads (reusing pinned maps), attaches the socket LB, and starts the reconcilers.
    /// `synced` turns true once every source has listed: only then is stale state removed.
    pub fn start(
        config: &DatapathSection,
        state: StateHandle,
        synced: watch::Receiver<bool>,
        metrics: Metrics,
        lookup: IdentityLookup,
    ) -> Result<Self, DatapathError> {
        let cgroup = match &config.cgroup {
            Some(c) => c.clone(),
            None => cgroup2_root().ok_or_else(|| {
                DatapathError::Config("no cgroup v2 mount in /proc/mounts".into())
            })?,
        };
        let sizes = config.map_sizes;
        let pins = PinDir::new(&config.pin_root);
        let mut dp = Datapath::load(Some(pins.clone()), &sizes)?;
        dp.set_config_flags(if config.trace_allowed {
            CONFIG_FLAG_TRACE_ALLOWED
        } else {
            0
        })?;
        let lb = LbWriter::new(
            dp.take_map(names::MAP_LB4_SERVICES)?,
            dp.take_map(names::MAP_LB4_BACKENDS)?,
            dp.take_map(names::MAP_LB4_REVNAT)?,
            sizes,
        )?
        .with_metrics(&metrics);
        let ipc = IpcacheWriter::new(dp.take_map(names::MAP_IPCACHE)?, sizes.ipcache)?
            .with_metrics(&metrics);
        let policy = PolicyWriter::new(
            dp.take_map(names::MAP_ENDPOINTS)?,
            dp.take_map(names::MAP_POLICY)?,
            sizes.endpoints,
            sizes.policy,
        )?
        .with_metrics(&metrics);
        let ct = CtGc::new(dp.take_map(names::MAP_CT)?)?;
        let ring = dp.take_map(names::MAP_FLOW_EVENTS)?;
        let drops = dp.take_map(names::MAP_DROP_COUNTERS)?;
        let guard =
            GuardWriter::new(dp.take_map(names::MAP_ENCRYPT_GUARD)?)?.with_metrics(&metrics);

        dp.attach_socket_lb(&cgroup)?;
        dp.remove_stale_versions();
        tracing::info!(pins = %pins.dir().display(), "datapath loaded");

        let status = Arc::new(Mutex::new(DatapathStatus {
            pin_dir: pins.dir().display().to_string(),
            cgroup: cgroup.display().to_string(),
            ..Default::default()
        }));
        let flows = FlowHub::new(4096);
        let programmed = Arc::new(Mutex::new(BTreeMap::new()));
        let mut tasks = Vec::new();
        tasks.push(AbortOnDrop(tokio::spawn(endpoints::reconcile(
            state.clone(),
            dp,
            policy,
            status.clone(),
            programmed.clone(),
            metrics.clone(),
        ))));
        tasks.push(AbortOnDrop(tokio::spawn(follow_guard(
            state.clone(),
            guard,
        ))));
        tasks.push(AbortOnDrop(tokio::spawn(reconcile(
            state,
            synced,
            lb,
            ipc,
            metrics.clone(),
            status.clone(),
        ))));
        tasks.push(AbortOnDrop(tokio::spawn({
            let hub = flows.clone();
            async move {
                if let Err(e) = flows::read_events(ring, hub, lookup).await {
                    tracing::error!(error = %e, "flow event reader stopped");
                }
            }
        })));
        tasks.push(AbortOnDrop(tokio::spawn(housekeeping(ct, drops, metrics))));
        Ok(Self {
            status,
            programmed,
            flows,
            tasks,
        })
    }

    pub fn status(&self) -> DatapathStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The identity the datapath enforces for the endpoint on `ifindex`, once its programs
    /// are attached and its maps written.
    pub fn endpoint_identity(&self, ifindex: u32) -> Option<u32> {
        self.programmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ifindex)
            .copied()
    }

    pub fn flows(&self) -> FlowHub {
        self.flows.clone()
    }

    /// Stops the reconcilers and readers and waits for them. The pinned maps and links stay:
    /// the datapath keeps serving until the next agent adopts it.
    pub async fn stop(self) {
        crate::task::stop_all(self.tasks).await;
    }
}

/// Mirrors strict encryption's routing decisions into the guard map, so flows the routes
/// drop (no WireGuard peer) show as drops with a reason. Untouched while nothing routes for
/// encryption (it may be off). Failed writes and deletes are retried until they succeed.
async fn follow_guard(state: StateHandle, mut guard: GuardWriter) {
    let mut versions = state.subscribe();
    loop {
        let seen = versions.borrow_and_update().encryption_routes;
        let routes = state.read().encryption_routes().map(<[_]>::to_vec);
        if let Some(routes) = routes {
            // Failures are logged (once per entry) and counted by the map mirror.
            guard.sync(&routes);
        }
        tokio::select! {
            r = versions.wait_for(|v| v.encryption_routes != seen) => if r.is_err() { return },
            _ = tokio::time::sleep(RETRY_INTERVAL), if guard.pending() => {}
        }
    }
}

async fn reconcile(
    state: StateHandle,
    mut synced: watch::Receiver<bool>,
    mut lb: LbWriter,
    mut ipc: IpcacheWriter,
    metrics: Metrics,
    status: Arc<Mutex<DatapathStatus>>,
) {
    let mut versions = state.subscribe();
    let mut reported: HashSet<String> = HashSet::new();
    let mut refused: HashSet<IpcacheRefusal> = HashSet::new();
    let mut last = None;
    let mut last_synced = false;
    let mut retry = false;
    // The latest report of each writer (kept for status when only the other one ran).
    let (mut lr, mut ir) = (LbSyncReport::default(), IpcacheSyncReport::default());
    loop {
        let v = *versions.borrow_and_update();
        let is_synced = *synced.borrow_and_update();
        // Each map is recomputed only when its inputs moved (or the first sync completed,
        // which allows deletes): an endpoint churn does not rebuild every service.
        let first = last.is_none();
        let synced_now = is_synced != last_synced;
        // (Refusals and datapath-down bump the services and endpoints versions themselves;
        // node changes move which remote ipcache entries are accepted.)
        // A retry tick re-runs only the writer that has failures to retry.
        let lb_due = first
            || synced_now
            || last.is_some_and(|l: Versions| l.services != v.services)
            || (retry && lb.pending());
        let ipc_due = first
            || synced_now
            || last.is_some_and(|l: Versions| l.endpoints != v.endpoints || l.nodes != v.nodes)
            || (retry && ipc.pending());
        if lb_due || ipc_due {
            let started = std::time::Instant::now();
            if lb_due {
                let desired = lb::desired(&state.read().service_views()).0;
                lr = lb.sync(&desired, is_synced);
            }
            if ipc_due {
                let (desired, refusals) = ipcache::desired(&state.read());
                ir = ipc.sync(&desired, is_synced);
                report_refusals(&mut refused, refusals, &metrics);
            }
            tracing::debug!(
                services = lr.services,
                lb_writes = lr.writes,
                ipcache_writes = ir.writes,
                elapsed = ?started.elapsed(),
                "datapath maps synced"
            );
            let mut errors = Vec::new();
            for (f, e) in &lr.failed {
                let line = format!("service {}:{}/{}: {e}", f.address, f.port, f.proto);
                if reported.insert(line.clone()) {
                    tracing::error!("{line}");
                }
                errors.push(line);
            }
            // (The ipcache mirror logs its failures itself, per prefix.)
            for (p, e) in &ir.failed {
                errors.push(format!("ipcache {p}: {e}"));
            }
            for (map, n) in [
                (names::MAP_LB4_SERVICES, lr.services),
                (names::MAP_LB4_BACKENDS, lr.backends),
                (names::MAP_IPCACHE, ir.entries),
            ] {
                metrics
                    .datapath_map_entries
                    .get_or_create(&MapLabels { map: map.into() })
                    .set(n as i64);
            }
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.services = lr.services;
            s.backends = lr.backends;
            s.ipcache_entries = ir.entries;
            s.errors = errors;
            last = Some(v);
            last_synced = is_synced;
        }
        retry = false;
        tokio::select! {
            r = versions.changed() => if r.is_err() { return },
            r = synced.changed(), if !last_synced => if r.is_err() { return },
            _ = tokio::time::sleep(RETRY_INTERVAL), if lb.pending() || ipc.pending() => retry = true,
        }
    }
}

/// Logs and counts each remote ipcache refusal once, when it appears (status lists them all).
fn report_refusals(
    reported: &mut HashSet<IpcacheRefusal>,
    now: Vec<IpcacheRefusal>,
    metrics: &Metrics,
) {
    let now: HashSet<IpcacheRefusal> = now.into_iter().collect();
    for r in now.difference(reported) {
        tracing::warn!(
            cluster = %r.cluster,
            prefix = %r.prefix,
            reason = r.reason.as_str(),
            "remote ipcache entry refused: {}",
            r.reason
        );
        metrics
            .ipcache_refused
            .get_or_create(&ClusterReasonLabels {
                cluster: r.cluster.to_string(),
                reason: r.reason.as_str().into(),
            })
            .inc();
    }
    *reported = now;
}

async fn housekeeping(mut ct: CtGc, drops: aya::maps::Map, metrics: Metrics) {
    let mut gc = tokio::time::interval(CT_GC_INTERVAL);
    let mut counters = tokio::time::interval(COUNTERS_INTERVAL);
    loop {
        tokio::select! {
            _ = gc.tick() => {
                let n = ct.collect(CT_TCP_IDLE, CT_OTHER_IDLE);
                if n > 0 {
                    tracing::debug!(entries = n, "conntrack entries collected");
                }
            }
            _ = counters.tick() => {
                if let Ok(counts) = flows::drop_counts(&drops) {
                    for (reason, n) in counts {
                        metrics
                            .datapath_drops
                            .get_or_create(&ReasonLabels { reason: reason.as_str().into() })
                            .set(n as i64);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{state::RefusalReason, testlog::Logs};

    #[test]
    fn each_refusal_is_logged_and_counted_once_while_it_lasts() {
        let refusal = IpcacheRefusal {
            cluster: "cluster-europe".into(),
            prefix: "0.0.0.0/0".parse().unwrap(),
            reason: RefusalReason::OutsidePodCidrs,
        };
        let (metrics, logs) = (Metrics::new(), Logs::default());
        let mut reported = HashSet::new();
        tracing::subscriber::with_default(logs.subscriber(), || {
            for _ in 0..3 {
                report_refusals(&mut reported, vec![refusal.clone()], &metrics);
            }
            // Gone, then back: a new refusal.
            report_refusals(&mut reported, vec![], &metrics);
            report_refusals(&mut reported, vec![refusal.clone()], &metrics);
        });
        let text = logs.text();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.contains("cluster-europe") && text.contains("outside-pod-cidrs"),
            "{text}"
        );
        let line = r#"strait_ipcache_refused_total{cluster="cluster-europe",reason="outside-pod-cidrs"} 2"#;
        assert!(metrics.render().contains(line), "{}", metrics.render());
    }
}
