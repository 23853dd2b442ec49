//! Remote-datapath health: evidence, not kvstore presence, decides whether a remote
//! cluster's backends get new connections.
//!
//! Every agent answers UDP health probes on its node address; every agent probes the nodes
//! of every remote cluster a few times a second. A cluster whose nodes have all stopped
//! answering for `down_after` is marked datapath-down in the state model (its backends leave
//! every global service at once); one answer brings it back. A kvstore disconnect alone
//! changes nothing here, so it never removes a backend. A cluster that has never answered
//! (e.g. Cilium nodes, which do not speak this probe) is never marked down: only a
//! transition from answering to silent is evidence.
//!
//! What a remote publishes decides where probes go, so the prober is not a reflector:
//! * only node addresses inside the underlay ranges (`health.underlayCIDRs`, default derived
//!   from the local node IP, [`default_underlay`]) are probed; the others are refused,
//!   counted (`strait_health_refused_targets`), logged once per cluster and reason, listed in
//!   status;
//! * at most `maxProbesPerCluster` probes per cluster per interval: the node that answered
//!   last, then the others in turn (a cluster of 10k nodes costs what one of 8 does);
//! * every probe carries a fresh 128-bit random nonce; a reply counts only from the probed
//!   address and port with the nonce of a probe in flight to it, once. An off-path sender
//!   cannot guess it, so spoofed or replayed replies never mark a cluster up. (Probing through
//!   WireGuard would also authenticate on-path traffic, but needs encryption on and peers in
//!   place; an on-path attacker can drop or pass the real probes anyway.)

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::{net::UdpSocket, sync::watch};

use crate::{
    metrics::{ClusterLabels, ClusterReasonLabels, Metrics},
    state::StateHandle,
    task::AbortOnDrop,
};

/// UDP port of strait's health responder (next to Cilium's 4240/TCP health endpoint).
pub const HEALTH_PORT: u16 = 4241;
const MAGIC: &[u8; 4] = b"STRH";
const NONCE: usize = 16;
/// Refused targets listed in the report (all are counted).
const MAX_LISTED_REFUSALS: usize = 100;

#[derive(Debug, Clone, Copy)]
pub struct HealthTiming {
    /// Probe period.
    pub interval: Duration,
    /// Silence of every node of a cluster after which it is datapath-down.
    pub down_after: Duration,
}

impl Default for HealthTiming {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(300),
            down_after: Duration::from_millis(1500),
        }
    }
}

/// `health:` — where and how much this node probes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HealthSection {
    /// Ranges a remote node address must be in to be probed. Empty: derived from the local
    /// node IP ([`default_underlay`]).
    #[serde(rename = "underlayCIDRs")]
    pub underlay_cidrs: Vec<IpNet>,
    /// Probes per remote cluster per interval.
    pub max_probes_per_cluster: usize,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            underlay_cidrs: Vec::new(),
            max_probes_per_cluster: 8,
        }
    }
}

/// The prober's settings, resolved for one node.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub timing: HealthTiming,
    pub underlay: Vec<IpNet>,
    pub max_probes_per_cluster: usize,
}

impl HealthConfig {
    /// `section` for the node at `local`: the underlay ranges configured, else derived.
    pub fn new(section: &HealthSection, local: IpAddr) -> Self {
        let underlay = if section.underlay_cidrs.is_empty() {
            vec![default_underlay(local)]
        } else {
            section.underlay_cidrs.clone()
        };
        Self {
            timing: HealthTiming::default(),
            underlay,
            max_probes_per_cluster: section.max_probes_per_cluster.max(1),
        }
    }
}

/// The underlay as the local node IP implies it: the private or shared block holding it
/// (RFC 1918, RFC 6598 CGNAT, RFC 2544 benchmarking, IPv6 ULA), where multi-cluster underlays
/// live; for any other address only its /24 (/64).
pub fn default_underlay(local: IpAddr) -> IpNet {
    const BLOCKS: [&str; 6] = [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "198.18.0.0/15",
        "fc00::/7",
    ];
    BLOCKS
        .iter()
        .filter_map(|b| b.parse::<IpNet>().ok())
        .find(|b| b.contains(&local))
        .unwrap_or_else(|| {
            let len = if local.is_ipv4() { 24 } else { 64 };
            IpNet::new(local, len).map_or(IpNet::from(local), |n| n.trunc())
        })
}

/// Why a remote node address is not probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    OutsideUnderlay,
    NotUnicast,
    Local,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutsideUnderlay => "outside-underlay",
            Self::NotUnicast => "not-unicast",
            Self::Local => "local",
        }
    }
}

/// Whether `ip` (a remote node address) may be probed from `local`.
pub fn check_target(ip: IpAddr, local: IpAddr, underlay: &[IpNet]) -> Result<(), Refusal> {
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(Refusal::NotUnicast);
    }
    if ip == local {
        return Err(Refusal::Local);
    }
    if !underlay.iter().any(|n| n.contains(&ip)) {
        return Err(Refusal::OutsideUnderlay);
    }
    Ok(())
}

/// A remote node address the prober refuses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct RefusedTarget {
    pub cluster: String,
    pub address: IpAddr,
    /// outside-underlay | not-unicast | local (the metric's label).
    pub reason: String,
}

/// What the prober does, for status.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct HealthReport {
    pub underlay: Vec<IpNet>,
    /// Probe rounds so far.
    pub rounds: u64,
    pub num_refused: usize,
    /// The first refused targets.
    pub refused: Vec<RefusedTarget>,
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot bind the health socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Answers probes on `addr` until dropped.
pub async fn responder(addr: SocketAddr) -> Result<AbortOnDrop, HealthError> {
    let socket = UdpSocket::bind(addr)
        .await
        .map_err(|source| HealthError::Bind { addr, source })?;
    Ok(AbortOnDrop(tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            if let Ok((n, from)) = socket.recv_from(&mut buf).await
                && n >= MAGIC.len()
                && &buf[..MAGIC.len()] == MAGIC
            {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    })))
}

/// Probes remote nodes from `local` (port 0: any) and maintains the clusters'
/// datapath-down flags in `state`. Runs until dropped; the report is updated every round.
pub async fn prober(
    local: SocketAddr,
    state: StateHandle,
    metrics: Metrics,
    cfg: HealthConfig,
) -> Result<(AbortOnDrop, watch::Receiver<HealthReport>), HealthError> {
    let socket = Arc::new(
        UdpSocket::bind(local)
            .await
            .map_err(|source| HealthError::Bind {
                addr: local,
                source,
            })?,
    );
    let (report_tx, report) = watch::channel(HealthReport {
        underlay: cfg.underlay.clone(),
        ..HealthReport::default()
    });
    let task = tokio::spawn(async move {
        let timing = cfg.timing;
        let mut p = Prober::new(local.ip(), cfg);
        let mut tick = tokio::time::interval(timing.interval);
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = Instant::now();
                    let targets = remote_nodes(&state);
                    let probes = p.round(&targets, now, &metrics);
                    for (ip, nonce) in probes {
                        let mut probe = MAGIC.to_vec();
                        probe.extend_from_slice(&nonce);
                        if socket.send_to(&probe, SocketAddr::new(ip, HEALTH_PORT)).await.is_ok() {
                            metrics.health_probes_sent.inc();
                        }
                    }
                    p.evaluate(now, timing.down_after, &state, &metrics);
                    report_tx.send_replace(p.report());
                }
                r = socket.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r
                        && !p.reply(&buf[..n], from, Instant::now())
                    {
                        metrics.health_replies_rejected.inc();
                    }
                }
            }
        }
    });
    Ok((AbortOnDrop(task), report))
}

/// Node addresses of every remote cluster, by cluster.
fn remote_nodes(state: &StateHandle) -> BTreeMap<String, Vec<IpAddr>> {
    let model = state.read();
    let local = model.local_cluster().clone();
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for node in model.nodes() {
        if node.cluster == local {
            continue;
        }
        if let Some(ip) = node.node_ip {
            out.entry(node.cluster.to_string()).or_default().push(ip);
        }
    }
    out
}

/// Fresh random nonces (the kernel's CSPRNG).
fn nonces(n: usize) -> Option<Vec<[u8; NONCE]>> {
    let mut buf = vec![0u8; n * NONCE];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom(2) writes at most the given length into our live buffer.
        let got =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if got <= 0 {
            return None;
        }
        filled += got as usize;
    }
    Some(
        buf.chunks_exact(NONCE)
            .map(|c| c.try_into().expect("chunk of NONCE bytes"))
            .collect(),
    )
}

/// The prober's state between rounds (no I/O).
struct Prober {
    local: IpAddr,
    cfg: HealthConfig,
    /// Probable targets of the latest round, by cluster.
    allowed: BTreeMap<String, Vec<IpAddr>>,
    last_reply: HashMap<IpAddr, Instant>,
    /// Probes awaiting their reply: nonce → (cluster, address, sent).
    in_flight: HashMap<[u8; NONCE], (String, IpAddr, Instant)>,
    /// Per cluster: the node that answered last (probed every round) and where the rotation
    /// over the others stands.
    sticky: HashMap<String, IpAddr>,
    cursor: HashMap<String, usize>,
    /// Refused targets of the latest round; each counted once when it appears.
    refused: BTreeMap<(String, IpAddr), Refusal>,
    logged: HashSet<(String, Refusal)>,
    rounds: u64,
}

impl Prober {
    fn new(local: IpAddr, cfg: HealthConfig) -> Self {
        Self {
            local,
            cfg,
            allowed: BTreeMap::new(),
            last_reply: HashMap::new(),
            in_flight: HashMap::new(),
            sticky: HashMap::new(),
            cursor: HashMap::new(),
            refused: BTreeMap::new(),
            logged: HashSet::new(),
            rounds: 0,
        }
    }

    /// Sorts `targets` into probable and refused, and picks this round's probes with nonces.
    fn round(
        &mut self,
        targets: &BTreeMap<String, Vec<IpAddr>>,
        now: Instant,
        metrics: &Metrics,
    ) -> Vec<(IpAddr, [u8; NONCE])> {
        self.rounds += 1;
        let mut refused = BTreeMap::new();
        let mut allowed: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for (cluster, ips) in targets {
            for ip in ips {
                match check_target(*ip, self.local, &self.cfg.underlay) {
                    Ok(()) => allowed.entry(cluster.clone()).or_default().push(*ip),
                    Err(why) => {
                        let key = (cluster.clone(), *ip);
                        if !self.refused.contains_key(&key) {
                            metrics
                                .health_refused
                                .get_or_create(&ClusterReasonLabels {
                                    cluster: cluster.clone(),
                                    reason: why.as_str().into(),
                                })
                                .inc();
                            if self.logged.insert((cluster.clone(), why)) {
                                tracing::warn!(
                                    cluster,
                                    address = %ip,
                                    reason = why.as_str(),
                                    underlay = ?self.cfg.underlay,
                                    "not probing a remote node address (logged once per cluster and reason; all are counted)"
                                );
                            }
                        }
                        refused.insert(key, why);
                    }
                }
            }
        }
        self.refused = refused;
        self.allowed = allowed;
        // Forget nodes that are gone (a remote's churn must not grow this).
        let known: HashSet<IpAddr> = self.allowed.values().flatten().copied().collect();
        self.last_reply.retain(|ip, _| known.contains(ip));
        let max = self.cfg.max_probes_per_cluster;
        let mut picks = Vec::new();
        for (cluster, ips) in &self.allowed {
            let sticky = self.sticky.get(cluster).filter(|ip| ips.contains(ip));
            let mut chosen: Vec<IpAddr> = sticky.into_iter().copied().collect();
            let others: Vec<IpAddr> = ips
                .iter()
                .filter(|ip| Some(*ip) != sticky)
                .copied()
                .collect();
            let cursor = self.cursor.entry(cluster.clone()).or_default();
            let take = (max - chosen.len()).min(others.len());
            for i in 0..take {
                chosen.push(others[(*cursor + i) % others.len()]);
            }
            if !others.is_empty() {
                *cursor = (*cursor + take) % others.len();
            }
            picks.extend(chosen.into_iter().map(|ip| (cluster.clone(), ip)));
        }
        // Probes in flight longer than `down_after` are not waited for any more.
        let down_after = self.cfg.timing.down_after;
        self.in_flight
            .retain(|_, (_, _, sent)| now.duration_since(*sent) <= down_after);
        let Some(nonces) = nonces(picks.len()) else {
            tracing::warn!("no random bytes for health probe nonces; skipping a round");
            return Vec::new();
        };
        picks
            .into_iter()
            .zip(nonces)
            .map(|((cluster, ip), nonce)| {
                self.in_flight.insert(nonce, (cluster, ip, now));
                (ip, nonce)
            })
            .collect()
    }

    /// Takes a reply; whether it answered a probe in flight (from its address and port).
    fn reply(&mut self, msg: &[u8], from: SocketAddr, now: Instant) -> bool {
        if from.port() != HEALTH_PORT
            || msg.len() != MAGIC.len() + NONCE
            || &msg[..MAGIC.len()] != MAGIC
        {
            return false;
        }
        let nonce: [u8; NONCE] = msg[MAGIC.len()..].try_into().expect("NONCE bytes");
        match self.in_flight.get(&nonce) {
            Some((_, ip, _)) if *ip == from.ip() => {}
            _ => return false,
        }
        let (cluster, ip, _) = self.in_flight.remove(&nonce).expect("just found");
        self.last_reply.insert(ip, now);
        self.sticky.insert(cluster, ip);
        true
    }

    fn report(&self) -> HealthReport {
        HealthReport {
            underlay: self.cfg.underlay.clone(),
            rounds: self.rounds,
            num_refused: self.refused.len(),
            refused: self
                .refused
                .iter()
                .take(MAX_LISTED_REFUSALS)
                .map(|((cluster, address), why)| RefusedTarget {
                    cluster: cluster.clone(),
                    address: *address,
                    reason: why.as_str().into(),
                })
                .collect(),
        }
    }

    fn evaluate(
        &mut self,
        now: Instant,
        down_after: Duration,
        state: &StateHandle,
        metrics: &Metrics,
    ) {
        for (cluster, ips) in &self.allowed {
            let latest = ips.iter().filter_map(|ip| self.last_reply.get(ip)).max();
            let down = latest.is_some_and(|t| now.duration_since(*t) > down_after);
            let was_down = state
                .read()
                .cluster(cluster)
                .is_some_and(|c| c.datapath_down);
            metrics
                .remote_datapath_up
                .get_or_create(&ClusterLabels {
                    cluster: cluster.clone(),
                })
                .set(i64::from(latest.is_some() && !down));
            if down == was_down {
                continue;
            }
            if down {
                tracing::warn!(
                    cluster,
                    nodes = ips.len(),
                    silent_for = ?now.duration_since(*latest.expect("down implies a reply")),
                    "remote cluster datapath down: no node answers health probes; its backends leave every global service"
                );
            } else {
                tracing::info!(
                    cluster,
                    "remote cluster datapath answers again; its backends are back"
                );
            }
            state.update(|m| m.set_datapath_down(cluster, down));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket as StdUdpSocket;

    use super::*;
    use crate::state::{Node, StateHandle};

    fn node(cluster: &str, id: u32, name: &str, ip: &str) -> Node {
        Node {
            cluster: cluster.into(),
            cluster_id: id,
            name: name.into(),
            node_ip: Some(ip.parse().unwrap()),
            underlay_ips: vec![],
            pod_side_ips: vec![],
            pod_cidrs: vec![],
            wireguard_pubkey: None,
            encryption_key: 0,
        }
    }

    /// usa's view with europe's nodes at `ips`.
    fn usa_with_europe_nodes(ips: &[&str]) -> StateHandle {
        let state = StateHandle::new("usa", 1);
        state.update(|m| {
            m.register_cluster("europe", 2).unwrap();
            for (i, ip) in ips.iter().enumerate() {
                m.upsert_node(node("europe", 2, &format!("europe-{i}"), ip));
            }
        });
        state
    }

    fn config(interval_ms: u64, down_after_ms: u64, underlay: &str) -> HealthConfig {
        HealthConfig {
            timing: HealthTiming {
                interval: Duration::from_millis(interval_ms),
                down_after: Duration::from_millis(down_after_ms),
            },
            underlay: vec![underlay.parse().unwrap()],
            max_probes_per_cluster: HealthSection::default().max_probes_per_cluster,
        }
    }

    fn local(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 0)
    }

    async fn wait_for(state: &StateHandle, down: bool) -> Duration {
        let start = Instant::now();
        while state.read().cluster("europe").unwrap().datapath_down != down {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "never became down={down}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    fn metric(metrics: &Metrics, line_start: &str) -> u64 {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// A socket at a node address counting the probes it gets (and echoing them if `answer`).
    fn counting_node(addr: &str, answer: bool) -> Arc<std::sync::atomic::AtomicU64> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let sock = StdUdpSocket::bind(format!("{addr}:{HEALTH_PORT}")).unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                c.fetch_add(1, Ordering::Relaxed);
                if answer {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        count
    }

    /// Real UDP on loopback addresses: europe's node answers, goes silent, answers again.
    #[tokio::test]
    async fn silence_of_every_node_marks_the_cluster_down_and_an_answer_brings_it_back() {
        let state = usa_with_europe_nodes(&["127.0.0.73"]);
        let remote: SocketAddr = format!("127.0.0.73:{HEALTH_PORT}").parse().unwrap();
        let answering = responder(remote).await.unwrap();
        let _prober = prober(
            local("127.0.0.72"),
            state.clone(),
            Metrics::new(),
            config(50, 300, "127.0.0.0/8"),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!state.read().cluster("europe").unwrap().datapath_down);

        drop(answering);
        let took = wait_for(&state, true).await;
        assert!(took <= Duration::from_secs(2), "{took:?}");
        assert!(!state.read().usable("europe"));

        let _again = responder(remote).await.unwrap();
        wait_for(&state, false).await;
        assert!(state.read().usable("europe"));
    }

    #[tokio::test]
    async fn a_cluster_that_never_answered_is_not_marked_down() {
        let state = usa_with_europe_nodes(&["127.0.0.83"]);
        let _prober = prober(
            local("127.0.0.82"),
            state.clone(),
            Metrics::new(),
            config(30, 100, "127.0.0.0/8"),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!state.read().cluster("europe").unwrap().datapath_down);
    }

    /// An off-path sender forges replies from europe's (silent) node address to the prober's
    /// port: without the probe's nonce they count for nothing and the cluster goes down.
    #[tokio::test]
    async fn spoofed_replies_without_the_probe_nonce_cannot_keep_a_silent_cluster_up() {
        let state = usa_with_europe_nodes(&["127.0.0.93"]);
        let metrics = Metrics::new();
        let remote: SocketAddr = format!("127.0.0.93:{HEALTH_PORT}").parse().unwrap();
        let answering = responder(remote).await.unwrap();
        let port = StdUdpSocket::bind("127.0.0.92:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let prober_addr: SocketAddr = format!("127.0.0.92:{port}").parse().unwrap();
        let _prober = prober(
            prober_addr,
            state.clone(),
            metrics.clone(),
            config(50, 300, "127.0.0.0/8"),
        )
        .await
        .unwrap();
        let up = "strait_remote_cluster_datapath_up{cluster=\"europe\"} ";
        let start = Instant::now();
        while metric(&metrics, up) != 1 {
            assert!(start.elapsed() < Duration::from_secs(5), "never up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(answering);
        // The forger takes the node's address and port once the responder is gone.
        let forger = loop {
            match StdUdpSocket::bind(remote) {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let forging = std::thread::spawn(move || {
            let mut seq: u32 = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                seq = seq.wrapping_add(1);
                // The old format (magic + sequence number), a zero nonce, a guessed nonce.
                let mut old = MAGIC.to_vec();
                old.extend_from_slice(&seq.to_be_bytes());
                let mut zero = MAGIC.to_vec();
                zero.extend_from_slice(&[0u8; NONCE]);
                let mut guess = MAGIC.to_vec();
                guess.extend_from_slice(&nonces(1).unwrap()[0]);
                for msg in [old, zero, guess] {
                    let _ = forger.send_to(&msg, prober_addr);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        wait_for(&state, true).await;
        assert!(metric(&metrics, "strait_health_replies_rejected_total ") > 0);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        forging.join().unwrap();
    }

    /// europe publishes node addresses outside the underlay (another range, unspecified,
    /// multicast): they are refused, counted, reported and never probed, while the node
    /// inside is.
    #[tokio::test]
    async fn node_addresses_outside_the_underlay_are_refused_counted_and_never_probed() {
        let state = usa_with_europe_nodes(&["127.0.0.113", "127.0.1.113", "0.0.0.0", "224.0.0.1"]);
        let inside = counting_node("127.0.0.113", true);
        let outside = counting_node("127.0.1.113", true);
        let metrics = Metrics::new();
        let (_prober, report) = prober(
            local("127.0.0.112"),
            state.clone(),
            metrics.clone(),
            config(20, 1000, "127.0.0.0/24"),
        )
        .await
        .unwrap();
        let start = Instant::now();
        while inside.load(std::sync::atomic::Ordering::Relaxed) < 5 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "inside never probed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(outside.load(std::sync::atomic::Ordering::Relaxed), 0);
        let report = report.borrow().clone();
        assert_eq!(report.num_refused, 3, "{report:?}");
        let reasons: Vec<(String, String)> = report
            .refused
            .iter()
            .map(|r| (r.address.to_string(), r.reason.clone()))
            .collect();
        for want in [
            ("127.0.1.113", "outside-underlay"),
            ("0.0.0.0", "not-unicast"),
            ("224.0.0.1", "not-unicast"),
        ] {
            assert!(
                reasons.contains(&(want.0.into(), want.1.into())),
                "{reasons:?}"
            );
        }
        let refused = |reason: &str| {
            metric(
                &metrics,
                &format!(
                    "strait_health_refused_targets_total{{cluster=\"europe\",reason=\"{reason}\"}} "
                ),
            )
        };
        // Counted once each, not once per round.
        assert_eq!(
            (refused("outside-underlay"), refused("not-unicast")),
            (1, 2)
        );
    }

    /// europe publishes 10k node addresses: each round probes at most `maxProbesPerCluster`
    /// of them (the one that answers among them), not all.
    #[tokio::test]
    async fn a_remote_publishing_10k_nodes_gets_a_bounded_number_of_probes_per_round() {
        let mut ips: Vec<String> = (0..10_000)
            .map(|i| format!("127.1.{}.{}", i / 250, i % 250 + 1))
            .collect();
        ips.push("127.0.0.123".into());
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let state = usa_with_europe_nodes(&refs);
        let answering = counting_node("127.0.0.123", true);
        // A sample of 100 of the silent ones.
        let sample: Vec<_> = ips[..100]
            .iter()
            .map(|ip| counting_node(ip, false))
            .collect();
        let metrics = Metrics::new();
        let cfg = config(20, 5000, "127.0.0.0/8");
        let max = cfg.max_probes_per_cluster as u64;
        let (_prober, report) = prober(local("127.0.0.122"), state.clone(), metrics.clone(), cfg)
            .await
            .unwrap();
        let start = Instant::now();
        while answering.load(std::sync::atomic::Ordering::Relaxed) < 20 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the answering node is never probed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rounds = report.borrow().rounds;
        let sent = metric(&metrics, "strait_health_probes_sent_total ");
        let sampled: u64 = sample
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        assert!(sent <= rounds * max, "{sent} probes in {rounds} rounds");
        assert!(
            sampled <= rounds * max,
            "{sampled} probes to 100 of the nodes in {rounds} rounds"
        );
        assert!(!state.read().cluster("europe").unwrap().datapath_down);
    }

    #[test]
    fn the_default_underlay_is_the_private_block_of_the_node_ip_else_its_subnet() {
        let u = |ip: &str| default_underlay(ip.parse().unwrap()).to_string();
        assert_eq!(u("10.4.5.6"), "10.0.0.0/8");
        assert_eq!(u("172.20.0.3"), "172.16.0.0/12");
        assert_eq!(u("192.168.7.8"), "192.168.0.0/16");
        assert_eq!(u("198.18.2.2"), "198.18.0.0/15");
        assert_eq!(u("fd00::5"), "fc00::/7");
        assert_eq!(u("203.0.113.9"), "203.0.113.0/24");
        assert_eq!(u("2001:db8:1:2::9"), "2001:db8:1:2::/64");
        let underlay = ["10.0.0.0/8".parse().unwrap()];
        let local: IpAddr = "10.0.0.1".parse().unwrap();
        let check = |ip: &str| check_target(ip.parse().unwrap(), local, &underlay);
        assert_eq!(check("10.9.9.9"), Ok(()));
        assert_eq!(check("8.8.8.8"), Err(Refusal::OutsideUnderlay));
        assert_eq!(check("10.0.0.1"), Err(Refusal::Local));
        assert_eq!(check("255.255.255.255"), Err(Refusal::NotUnicast));
        assert_eq!(check("0.0.0.0"), Err(Refusal::NotUnicast));
    }
}
