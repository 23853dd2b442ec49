//! Remote-datapath health: evidence, not kvstore presence, decides whether a remote
//! cluster's backends get new connections.
//!
//! Every agent answers UDP health probes on its node address; every agent probes every node
//! of every remote cluster a few times a second. A cluster whose nodes have all stopped
//! answering for `down_after` is marked datapath-down in the state model (its backends leave
//! every global service at once); one answer brings it back. A kvstore disconnect alone
//! changes nothing here, so it never removes a backend. A cluster that has never answered
//! (e.g. Cilium nodes, which do not speak this probe) is never marked down: only a
//! transition from answering to silent is evidence.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;

use crate::{
    metrics::{ClusterLabels, Metrics},
    state::StateHandle,
    task::AbortOnDrop,
};

/// UDP port of strait's health responder (next to Cilium's 4240/TCP health endpoint).
pub const HEALTH_PORT: u16 = 4241;
const MAGIC: &[u8; 4] = b"STRH";

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

/// Probes every remote node from `local` (port 0) and maintains the clusters'
/// datapath-down flags in `state`. Runs until dropped.
pub async fn prober(
    local: IpAddr,
    state: StateHandle,
    metrics: Metrics,
    timing: HealthTiming,
) -> Result<AbortOnDrop, HealthError> {
    let addr = SocketAddr::new(local, 0);
    let socket = Arc::new(
        UdpSocket::bind(addr)
            .await
            .map_err(|source| HealthError::Bind { addr, source })?,
    );
    Ok(AbortOnDrop(tokio::spawn(async move {
        let mut tracker = Tracker::default();
        let mut tick = tokio::time::interval(timing.interval);
        let mut buf = [0u8; 64];
        let mut seq: u32 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq = seq.wrapping_add(1);
                    let targets = remote_nodes(&state);
                    let mut probe = MAGIC.to_vec();
                    probe.extend_from_slice(&seq.to_be_bytes());
                    for ips in targets.values() {
                        for ip in ips {
                            let _ = socket.send_to(&probe, SocketAddr::new(*ip, HEALTH_PORT)).await;
                        }
                    }
                    tracker.evaluate(&targets, Instant::now(), timing.down_after, &state, &metrics);
                }
                r = socket.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r
                        && n >= MAGIC.len()
                        && &buf[..MAGIC.len()] == MAGIC
                    {
                        tracker.last_reply.insert(from.ip(), Instant::now());
                    }
                }
            }
        }
    })))
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

#[derive(Default)]
struct Tracker {
    last_reply: HashMap<IpAddr, Instant>,
}

impl Tracker {
    fn evaluate(
        &mut self,
        targets: &BTreeMap<String, Vec<IpAddr>>,
        now: Instant,
        down_after: Duration,
        state: &StateHandle,
        metrics: &Metrics,
    ) {
        for (cluster, ips) in targets {
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
    use super::*;
    use crate::state::{Node, StateHandle};

    fn node(cluster: &str, id: u32, ip: &str) -> Node {
        Node {
            cluster: cluster.into(),
            cluster_id: id,
            name: format!("{cluster}-1"),
            node_ip: Some(ip.parse().unwrap()),
            underlay_ips: vec![],
            pod_side_ips: vec![],
            pod_cidrs: vec![],
            wireguard_pubkey: None,
            encryption_key: 0,
        }
    }

    /// usa's view with europe's one node at `ip`.
    fn usa_with_europe_node(ip: &str) -> StateHandle {
        let state = StateHandle::new("usa", 1);
        state.update(|m| {
            m.register_cluster("europe", 2).unwrap();
            m.upsert_node(node("europe", 2, ip));
        });
        state
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

    /// Real UDP on loopback addresses: europe's node answers, goes silent, answers again.
    #[tokio::test]
    async fn silence_of_every_node_marks_the_cluster_down_and_an_answer_brings_it_back() {
        let state = usa_with_europe_node("127.0.0.73");
        let timing = HealthTiming {
            interval: Duration::from_millis(50),
            down_after: Duration::from_millis(300),
        };
        let remote: SocketAddr = format!("127.0.0.73:{HEALTH_PORT}").parse().unwrap();
        let answering = responder(remote).await.unwrap();
        let _prober = prober(
            "127.0.0.72".parse().unwrap(),
            state.clone(),
            Metrics::new(),
            timing,
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
        let state = usa_with_europe_node("127.0.0.83");
        let timing = HealthTiming {
            interval: Duration::from_millis(30),
            down_after: Duration::from_millis(100),
        };
        let _prober = prober(
            "127.0.0.82".parse().unwrap(),
            state.clone(),
            Metrics::new(),
            timing,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!state.read().cluster("europe").unwrap().datapath_down);
    }
}
