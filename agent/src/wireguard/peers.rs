//! The desired WireGuard peers, computed from the state model, and the per-peer diff against
//! what a device holds. Pure: no kernel, no device.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use serde::Serialize;
use wireguard_control::Key;

use crate::{
    routing::{RouteInputs, plan::overlaps},
    state::{Node, StateModel, owned_endpoints},
};

/// A node, as `cluster/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NodeRef {
    pub cluster: String,
    pub name: String,
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.cluster, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub node: NodeRef,
    pub public_key: Key,
    pub endpoint: SocketAddr,
    pub allowed_ips: BTreeSet<IpNet>,
    /// The node's pod CIDRs among `allowed_ips`, plus host prefixes for its pod-side
    /// addresses outside them (a router IP set by hand): these get routes.
    pub pod_cidrs: Vec<IpNet>,
}

/// Everything the device and route reconcilers need from one pass over the model.
#[derive(Debug, Clone, Default)]
pub struct PeerPlan {
    /// By public key.
    pub peers: BTreeMap<[u8; 32], DesiredPeer>,
    /// Remote nodes without a usable peer, with their pod CIDRs (strict mode drops these).
    pub missing: Vec<(NodeRef, Vec<IpNet>)>,
    pub local_pod_cidrs: Vec<IpNet>,
    /// The local node's underlay addresses.
    pub local_node_ips: Vec<IpAddr>,
    /// Every underlay address of every remote node: never routed into the device. Pod-side
    /// addresses (router, health IPs) are not among them: they live in the pod CIDRs.
    pub remote_node_ips: Vec<IpAddr>,
}

impl PeerPlan {
    pub fn route_inputs(&self) -> RouteInputs {
        RouteInputs {
            encrypted: self
                .peers
                .values()
                .flat_map(|p| p.pod_cidrs.iter().map(|c| (*c, p.node.to_string())))
                .collect(),
            missing_peer: self
                .missing
                .iter()
                .flat_map(|(n, cidrs)| cidrs.iter().map(|c| (*c, n.to_string())))
                .collect(),
            underlay: self.remote_node_ips.clone(),
            local_pod_cidrs: self.local_pod_cidrs.clone(),
            local_node_ips: self.local_node_ips.clone(),
        }
    }

    /// Node owning each planned public key.
    pub fn names(&self) -> HashMap<[u8; 32], NodeRef> {
        self.peers
            .iter()
            .map(|(k, p)| (*k, p.node.clone()))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct PlannerOptions {
    pub local_cluster: String,
    pub local_node: String,
    /// This node's own public key: a remote record carrying it is refused.
    pub own_public_key: Option<Key>,
    pub port: u16,
    pub node_encryption: bool,
    pub track_endpoint_ips: bool,
}

/// Computes [`PeerPlan`]s. Stateful only for stability and logging: when two nodes claim one
/// key, the node that held it before keeps it; each problem is logged once while it lasts.
#[derive(Debug)]
pub struct PeerPlanner {
    opts: PlannerOptions,
    owners: HashMap<[u8; 32], NodeRef>,
    reported: HashSet<String>,
}

struct Candidate {
    node: NodeRef,
    key: Key,
    endpoint: SocketAddr,
    addresses: Vec<IpAddr>,
    pod_cidrs: Vec<IpNet>,
}

impl PeerPlanner {
    pub fn new(opts: PlannerOptions) -> Self {
        Self {
            opts,
            owners: HashMap::new(),
            reported: HashSet::new(),
        }
    }

    pub fn options(&self) -> &PlannerOptions {
        &self.opts
    }

    pub fn plan(&mut self, model: &StateModel) -> PeerPlan {
        let mut reports: Vec<(String, Problem)> = Vec::new();
        let mut plan = PeerPlan::default();
        if let Some(local) = model.node(&self.opts.local_cluster, &self.opts.local_node) {
            plan.local_pod_cidrs = dedup(local.pod_cidrs.iter().map(IpNet::trunc));
            plan.local_node_ips = addresses(local.node_ip, &local.underlay_ips);
        }

        // 1. Every remote node of a routable cluster, with a usable key and endpoint.
        let mut candidates: Vec<Candidate> = Vec::new();
        for node in model.routable_nodes() {
            if node.cluster.as_ref() == self.opts.local_cluster && node.name == self.opts.local_node
            {
                continue;
            }
            let node_ref = NodeRef {
                cluster: node.cluster.to_string(),
                name: node.name.clone(),
            };
            let pod_cidrs = routed_prefixes(node);
            let node_ips = addresses(node.node_ip, &node.underlay_ips);
            plan.remote_node_ips.extend(node_ips.iter().copied());
            let key = match node.wireguard_pubkey.as_deref().map(str::trim) {
                None | Some("") => {
                    plan.missing.push((node_ref, pod_cidrs));
                    continue;
                }
                Some(text) => match Key::from_base64(text) {
                    Ok(key) => key,
                    Err(_) => {
                        reports.push((
                            format!("badkey {node_ref} {text}"),
                            Problem::error(format!(
                                "node {node_ref} publishes an invalid WireGuard public key {text:?}: no peer for it"
                            )),
                        ));
                        plan.missing.push((node_ref, pod_cidrs));
                        continue;
                    }
                },
            };
            if self.opts.own_public_key.as_ref() == Some(&key) {
                reports.push((
                    format!("ownkey {node_ref}"),
                    Problem::error(format!(
                        "node {node_ref} publishes this node's own WireGuard public key: no peer for it"
                    )),
                ));
                plan.missing.push((node_ref, pod_cidrs));
                continue;
            }
            let Some(ip) = node.node_ip else {
                reports.push((
                    format!("noip {node_ref}"),
                    Problem::warn(format!(
                        "node {node_ref} has a WireGuard key but no node IP: no peer for it yet"
                    )),
                ));
                plan.missing.push((node_ref, pod_cidrs));
                continue;
            };
            candidates.push(Candidate {
                node: node_ref,
                key,
                endpoint: SocketAddr::new(ip, self.opts.port),
                addresses: node_ips,
                pod_cidrs,
            });
        }

        // 2. One node per key: the previous holder, else the first in (cluster, name) order.
        let mut by_key: BTreeMap<[u8; 32], Vec<usize>> = BTreeMap::new();
        for (i, c) in candidates.iter().enumerate() {
            by_key.entry(c.key.0).or_default().push(i);
        }
        let mut winners: BTreeSet<usize> = BTreeSet::new();
        for (key, claimants) in &by_key {
            let winner = claimants
                .iter()
                .copied()
                .find(|i| self.owners.get(key) == Some(&candidates[*i].node))
                .unwrap_or(claimants[0]);
            winners.insert(winner);
            for &loser in claimants.iter().filter(|i| **i != winner) {
                let (w, l) = (&candidates[winner].node, &candidates[loser].node);
                reports.push((
                    format!("dupkey {l} {w}"),
                    Problem::error(format!(
                        "node {l} publishes the WireGuard public key of node {w}: refusing {l}"
                    )),
                ));
                plan.missing
                    .push((l.clone(), candidates[loser].pod_cidrs.clone()));
            }
        }

        // 3. AllowedIPs: each prefix goes to one peer only (WireGuard would move it to whichever
        //    peer was configured last, flapping between reconciles).
        let mut claimed: HashMap<IpNet, NodeRef> = HashMap::new();
        let mut peers: Vec<DesiredPeer> = Vec::new();
        for &i in &winners {
            let c = &candidates[i];
            let mut peer = DesiredPeer {
                node: c.node.clone(),
                public_key: c.key.clone(),
                endpoint: c.endpoint,
                allowed_ips: BTreeSet::new(),
                pod_cidrs: Vec::new(),
            };
            for cidr in &c.pod_cidrs {
                if self.claim(
                    &mut claimed,
                    &plan.local_pod_cidrs,
                    &mut reports,
                    &c.node,
                    *cidr,
                ) {
                    peer.allowed_ips.insert(*cidr);
                    peer.pod_cidrs.push(*cidr);
                }
            }
            if self.opts.node_encryption {
                for ip in &c.addresses {
                    let host = IpNet::from(*ip);
                    if self.claim(
                        &mut claimed,
                        &plan.local_pod_cidrs,
                        &mut reports,
                        &c.node,
                        host,
                    ) {
                        peer.allowed_ips.insert(host);
                    }
                }
            }
            peers.push(peer);
        }
        if self.opts.track_endpoint_ips {
            let by_host: HashMap<IpAddr, usize> = winners
                .iter()
                .enumerate()
                .flat_map(|(p, &i)| candidates[i].addresses.iter().map(move |ip| (*ip, p)))
                .collect();
            // Only entries the datapath may program (a remote's own node space), and only
            // towards a node of the entry's own cluster: a remote cannot pull another
            // cluster's addresses into its peer by naming that cluster's node as host.
            for owned in owned_endpoints(model).entries {
                let ep = owned.endpoint;
                let Some(p) = ep.host_ip.and_then(|h| by_host.get(&h).copied()) else {
                    continue;
                };
                if peers[p].node.cluster != ep.cluster.as_ref() {
                    continue;
                }
                let prefix = ep.prefix.trunc();
                // Already covered by this peer's own pod CIDR: WireGuard would only store a
                // redundant entry.
                if peers[p].pod_cidrs.iter().any(|c| c.contains(&prefix)) {
                    continue;
                }
                let node = peers[p].node.clone();
                if self.claim(
                    &mut claimed,
                    &plan.local_pod_cidrs,
                    &mut reports,
                    &node,
                    prefix,
                ) {
                    peers[p].allowed_ips.insert(prefix);
                }
            }
        }
        plan.peers = peers.into_iter().map(|p| (p.public_key.0, p)).collect();
        self.owners = plan.names();

        // 4. Log each problem once while it lasts.
        let mut now = HashSet::new();
        for (id, problem) in reports {
            if !self.reported.contains(&id) {
                problem.log();
            }
            now.insert(id);
        }
        self.reported = now;
        plan
    }

    fn claim(
        &self,
        claimed: &mut HashMap<IpNet, NodeRef>,
        local_pod_cidrs: &[IpNet],
        reports: &mut Vec<(String, Problem)>,
        node: &NodeRef,
        prefix: IpNet,
    ) -> bool {
        if let Some(local) = local_pod_cidrs.iter().find(|l| overlaps(l, &prefix)) {
            reports.push((
                format!("localoverlap {node} {prefix}"),
                Problem::error(format!(
                    "node {node} claims {prefix}, which overlaps this node's pod CIDR {local}: not allowed through WireGuard"
                )),
            ));
            return false;
        }
        match claimed.get(&prefix) {
            Some(owner) if owner != node => {
                reports.push((
                    format!("dupprefix {node} {prefix}"),
                    Problem::error(format!(
                        "node {node} claims {prefix}, already allowed for node {owner}: ignored"
                    )),
                ));
                false
            }
            _ => {
                claimed.insert(prefix, node.clone());
                true
            }
        }
    }
}

struct Problem {
    error: bool,
    message: String,
}

impl Problem {
    fn error(message: String) -> Self {
        Self {
            error: true,
            message,
        }
    }

    fn warn(message: String) -> Self {
        Self {
            error: false,
            message,
        }
    }

    fn log(&self) {
        if self.error {
            tracing::error!("{}", self.message);
        } else {
            tracing::warn!("{}", self.message);
        }
    }
}

/// A node's pod CIDRs, then host prefixes for its pod-side addresses outside every one of
/// them: all reached through the tunnel.
fn routed_prefixes(node: &Node) -> Vec<IpNet> {
    let cidrs: Vec<IpNet> = node.pod_cidrs.iter().map(IpNet::trunc).collect();
    let outside = node
        .pod_side_ips
        .iter()
        .filter(|ip| !cidrs.iter().any(|c| c.contains(*ip)))
        .map(|ip| IpNet::from(*ip));
    dedup(cidrs.iter().copied().chain(outside))
}

fn dedup(it: impl Iterator<Item = IpNet>) -> Vec<IpNet> {
    let mut seen = BTreeSet::new();
    it.filter(|n| seen.insert(*n)).collect()
}

fn addresses(node_ip: Option<IpAddr>, others: &[IpAddr]) -> Vec<IpAddr> {
    let mut seen = BTreeSet::new();
    node_ip
        .into_iter()
        .chain(others.iter().copied())
        .filter(|ip| seen.insert(*ip))
        .collect()
}

/// A peer as the device holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentPeer {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub keepalive: Option<u16>,
}

/// One change to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerOp {
    /// A new peer with its endpoint and AllowedIPs.
    Add([u8; 32]),
    /// Only the fields that differ are sent; `allowed_ips` replaces that peer's list.
    Update {
        key: [u8; 32],
        endpoint: bool,
        allowed_ips: bool,
        keepalive: bool,
    },
    Remove {
        key: [u8; 32],
        /// The node it belonged to, when known.
        node: Option<NodeRef>,
    },
}

/// The per-peer changes taking `current` to `plan`. A device peer nobody plans is removed when
/// strait configured it earlier (`owned`), or, once the initial sync is done, whatever it is.
pub fn diff(
    plan: &PeerPlan,
    current: &[CurrentPeer],
    owned: &HashMap<[u8; 32], NodeRef>,
    synced: bool,
    keepalive: Option<u16>,
) -> Vec<PeerOp> {
    let mut ops = Vec::new();
    let current_by_key: HashMap<[u8; 32], &CurrentPeer> =
        current.iter().map(|c| (c.public_key.0, c)).collect();
    // Removals first: a replaced key frees its AllowedIPs before the new key takes them.
    for c in current {
        if plan.peers.contains_key(&c.public_key.0) {
            continue;
        }
        let node = owned.get(&c.public_key.0).cloned();
        if node.is_some() || synced {
            ops.push(PeerOp::Remove {
                key: c.public_key.0,
                node,
            });
        }
    }
    let want_keepalive = keepalive.filter(|k| *k > 0);
    for (key, want) in &plan.peers {
        match current_by_key.get(key) {
            None => ops.push(PeerOp::Add(*key)),
            Some(have) => {
                let endpoint = have.endpoint != Some(want.endpoint);
                let allowed_ips = have.allowed_ips != want.allowed_ips;
                let keepalive = have.keepalive.filter(|k| *k > 0) != want_keepalive;
                if endpoint || allowed_ips || keepalive {
                    ops.push(PeerOp::Update {
                        key: *key,
                        endpoint,
                        allowed_ips,
                        keepalive,
                    });
                }
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, Node};

    // Any 32 bytes serve as a public key; distinct bytes make assertions readable.
    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    fn node(
        cluster: &str,
        id: u32,
        name: &str,
        ip: &str,
        cidr: &str,
        pubkey: Option<String>,
    ) -> Node {
        Node {
            cluster: cluster.into(),
            cluster_id: id,
            name: name.into(),
            node_ip: Some(ip.parse().unwrap()),
            underlay_ips: vec![ip.parse().unwrap()],
            pod_side_ips: vec![],
            pod_cidrs: vec![cidr.parse().unwrap()],
            wireguard_pubkey: pubkey,
            encryption_key: 255,
        }
    }

    fn planner(own: &Key) -> PeerPlanner {
        PeerPlanner::new(PlannerOptions {
            local_cluster: "c1".into(),
            local_node: "n1".into(),
            own_public_key: Some(own.clone()),
            port: 51871,
            node_encryption: false,
            track_endpoint_ips: false,
        })
    }

    fn model() -> (StateModel, Key, Key, Key) {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let mut m = StateModel::new("c1", 1);
        m.register_cluster("c2", 2).unwrap();
        m.upsert_node(node(
            "c1",
            1,
            "n1",
            "198.18.1.2",
            "10.1.0.0/24",
            Some(k1.to_base64()),
        ));
        m.upsert_node(node(
            "c1",
            1,
            "n2",
            "198.18.2.2",
            "10.2.0.0/24",
            Some(k2.to_base64()),
        ));
        m.upsert_node(node(
            "c2",
            2,
            "n3",
            "198.18.3.2",
            "10.3.0.0/24",
            Some(k3.to_base64()),
        ));
        (m, k1, k2, k3)
    }

    #[test]
    fn one_peer_per_other_node_of_every_cluster() {
        let (m, k1, k2, k3) = model();
        let plan = planner(&k1).plan(&m);
        assert_eq!(plan.peers.len(), 2);
        let p2 = &plan.peers[&k2.0];
        assert_eq!(p2.node.to_string(), "c1/n2");
        assert_eq!(p2.endpoint, "198.18.2.2:51871".parse().unwrap());
        assert_eq!(
            p2.allowed_ips
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["10.2.0.0/24"]
        );
        assert!(plan.peers.contains_key(&k3.0));
        assert_eq!(
            plan.local_pod_cidrs,
            vec!["10.1.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(plan.missing.is_empty());
        let routes = plan.route_inputs();
        assert_eq!(routes.encrypted.len(), 2);
    }

    #[test]
    fn skips_missing_bad_own_and_duplicate_keys() {
        let (mut m, k1, k2, _) = model();
        m.upsert_node(node("c2", 2, "nokey", "198.18.4.2", "10.4.0.0/24", None));
        m.upsert_node(node(
            "c2",
            2,
            "bad",
            "198.18.5.2",
            "10.5.0.0/24",
            Some("not base64!".into()),
        ));
        m.upsert_node(node(
            "c2",
            2,
            "mine",
            "198.18.6.2",
            "10.6.0.0/24",
            Some(k1.to_base64()),
        ));
        // Sorts before c1/n2 but n2 held the key first: n2 keeps it.
        let mut p = planner(&k1);
        let first = p.plan(&m);
        assert_eq!(first.peers[&k2.0].node.name, "n2");
        m.upsert_node(node(
            "c0",
            0,
            "aaa",
            "198.18.7.2",
            "10.7.0.0/24",
            Some(k2.to_base64()),
        ));
        m.register_cluster("c0", 9).unwrap();
        let plan = p.plan(&m);
        assert_eq!(plan.peers[&k2.0].node.name, "n2");
        let missing: BTreeSet<String> = plan.missing.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            missing,
            ["c0/aaa", "c2/bad", "c2/mine", "c2/nokey"]
                .into_iter()
                .map(String::from)
                .collect()
        );
        assert_eq!(plan.peers.len(), 2);
    }

    #[test]
    fn a_bad_key_is_logged_once_while_it_lasts() {
        let (mut m, k1, _, _) = model();
        m.upsert_node(node(
            "c2",
            2,
            "bad",
            "198.18.5.2",
            "10.5.0.0/24",
            Some("AAAA".into()),
        ));
        let logs = crate::testlog::Logs::default();
        let subscriber = logs.subscriber();
        let count = || {
            logs.text()
                .matches("node c2/bad publishes an invalid WireGuard public key")
                .count()
        };
        tracing::subscriber::with_default(subscriber, || {
            let mut p = planner(&k1);
            for _ in 0..3 {
                assert!(p.plan(&m).missing.iter().any(|(n, _)| n.name == "bad"));
            }
            assert_eq!(count(), 1);
            // Fixed, then broken again: reported again.
            let mut fixed = node(
                "c2",
                2,
                "bad",
                "198.18.5.2",
                "10.5.0.0/24",
                Some(key(5).to_base64()),
            );
            m.upsert_node(fixed.clone());
            assert!(p.plan(&m).missing.is_empty());
            fixed.wireguard_pubkey = Some("AAAA".into());
            m.upsert_node(fixed);
            p.plan(&m);
            assert_eq!(count(), 2);
        });
    }

    #[test]
    fn node_ips_and_endpoint_prefixes_are_optional_allowed_ips() {
        let (mut m, k1, k2, _) = model();
        m.upsert_endpoint(Endpoint {
            prefix: "10.20.0.5/32".parse().unwrap(),
            cluster: "c1".into(),
            identity: 1000,
            host_ip: Some("198.18.2.2".parse().unwrap()),
            encryption_key: 255,
        });
        // Inside n2's pod CIDR: redundant, not added.
        m.upsert_endpoint(Endpoint {
            prefix: "10.2.0.7/32".parse().unwrap(),
            cluster: "c1".into(),
            identity: 1000,
            host_ip: Some("198.18.2.2".parse().unwrap()),
            encryption_key: 255,
        });
        let plain = planner(&k1).plan(&m);
        assert_eq!(plain.peers[&k2.0].allowed_ips.len(), 1);
        let mut p = PeerPlanner::new(PlannerOptions {
            node_encryption: true,
            track_endpoint_ips: true,
            ..planner(&k1).opts
        });
        let plan = p.plan(&m);
        let got: Vec<String> = plan.peers[&k2.0]
            .allowed_ips
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(got, ["10.2.0.0/24", "10.20.0.5/32", "198.18.2.2/32"]);
        // Node IPs are never routed into the tunnel.
        assert_eq!(plan.peers[&k2.0].pod_cidrs.len(), 1);
    }

    #[test]
    fn refused_clusters_and_the_local_cidr_are_never_peered() {
        let (mut m, k1, _, _) = model();
        // Overlaps c2's CIDR: c9 registered later is refused.
        m.register_cluster("c9", 9).unwrap();
        m.upsert_node(node(
            "c9",
            9,
            "x",
            "198.18.9.2",
            "10.3.0.0/25",
            Some(key(9).to_base64()),
        ));
        // Same cluster, claims our CIDR.
        m.upsert_node(node(
            "c1",
            1,
            "evil",
            "198.18.8.2",
            "10.1.0.0/25",
            Some(key(8).to_base64()),
        ));
        m.settle();
        let plan = planner(&k1).plan(&m);
        assert!(!plan.peers.values().any(|p| p.node.cluster == "c9"));
        let evil = plan.peers.values().find(|p| p.node.name == "evil").unwrap();
        assert!(evil.allowed_ips.is_empty());
    }

    /// The Cilium node (`wire::node` fixture) in cluster `cilium-east`, as the mesh sync puts
    /// it in the model, next to the local node c1/n1.
    fn cilium_model() -> (StateModel, Key) {
        let json = crate::wire::node::tests::cilium_dual_stack_json();
        let kv = crate::wire::KvNode::decode(json.as_bytes()).unwrap();
        let (mut m, k1, _, _) = model();
        // c1/n2 holds the same addresses as the fixture.
        m.delete_node("c1", "n2");
        m.register_cluster("cilium-east", 4).unwrap();
        let east = m.cluster_name("cilium-east");
        m.upsert_node(crate::mesh::convert::node(&kv, east));
        m.settle();
        (m, k1)
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn cilium_nodes_get_a_peer_with_both_pod_cidrs_routed_and_allowed() {
        let (m, k1) = cilium_model();
        let plan = planner(&k1).plan(&m);
        let wg_key = Key::from_base64(crate::wire::node::tests::WG_KEY).unwrap();
        let peer = &plan.peers[&wg_key.0];
        assert_eq!(peer.node.to_string(), "cilium-east/kind-worker");
        assert_eq!(peer.endpoint, "198.18.2.2:51871".parse().unwrap());
        assert_eq!(
            peer.allowed_ips.iter().copied().collect::<Vec<_>>(),
            nets(&["10.2.0.0/24", "fd00:10:2::/64"])
        );
        let inputs = plan.route_inputs();
        // Underlay: InternalIP and ExternalIP of both families, never the router/health IPs.
        for ip in ["198.18.2.2", "203.0.113.7", "fd00:198:18:2::2"] {
            assert!(inputs.underlay.contains(&ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.2.0.1", "fd00:10:2::1", "10.2.0.77", "fd00:10:2::4d"] {
            assert!(!inputs.underlay.contains(&ip.parse().unwrap()), "{ip}");
        }
        let routes = crate::routing::plan_routes(
            &crate::routing::RoutingConfig::default(),
            &inputs,
            None,
            None,
        );
        assert!(routes.skipped.is_empty(), "{:?}", routes.skipped);
        for cidr in nets(&["10.2.0.0/24", "fd00:10:2::/64"]) {
            assert_eq!(
                routes.routes[&cidr].target,
                crate::routing::RouteTarget::Device { src: None },
                "{cidr}"
            );
            assert_eq!(routes.routes[&cidr].owner, "cilium-east/kind-worker");
        }
    }

    #[test]
    fn a_router_ip_outside_the_pod_cidr_is_routed_as_a_host_prefix() {
        let (mut m, k1) = cilium_model();
        let mut node = m.node("cilium-east", "kind-worker").unwrap().clone();
        // `local-router-ipv4` set outside the pod CIDR.
        node.pod_side_ips[0] = "169.254.20.2".parse().unwrap();
        m.upsert_node(node);
        let plan = planner(&k1).plan(&m);
        let peer = plan.peers.values().find(|p| p.node.name == "kind-worker");
        let peer = peer.unwrap();
        assert!(
            peer.allowed_ips
                .contains(&"169.254.20.2/32".parse().unwrap())
        );
        let routes = crate::routing::plan_routes(
            &crate::routing::RoutingConfig::default(),
            &plan.route_inputs(),
            None,
            None,
        );
        assert!(
            routes
                .routes
                .contains_key(&"169.254.20.2/32".parse().unwrap())
        );
    }

    #[test]
    fn tracked_endpoint_ips_come_from_the_owned_view_and_the_hosts_own_cluster() {
        let (mut m, k1) = cilium_model();
        let ep = |prefix: &str, cluster: &str, host: &str| Endpoint {
            prefix: prefix.parse().unwrap(),
            cluster: cluster.into(),
            identity: 70000,
            host_ip: Some(host.parse().unwrap()),
            encryption_key: 255,
        };
        // c2/n3 owns 10.3.0.0/24; cilium-east's node is 198.18.2.2.
        m.upsert_endpoint(ep("10.3.0.9/32", "c2", "198.18.2.2")); // c2's pod, east's host
        m.upsert_endpoint(ep("10.99.0.1/32", "cilium-east", "198.18.2.2")); // outside east's space
        m.upsert_endpoint(ep("10.2.0.9/32", "cilium-east", "198.18.2.2")); // covered by the CIDR
        m.settle();
        let mut p = PeerPlanner::new(PlannerOptions {
            track_endpoint_ips: true,
            ..planner(&k1).opts
        });
        let plan = p.plan(&m);
        let east = plan
            .peers
            .values()
            .find(|p| p.node.name == "kind-worker")
            .unwrap();
        assert_eq!(
            east.allowed_ips.iter().copied().collect::<Vec<_>>(),
            nets(&["10.2.0.0/24", "fd00:10:2::/64"]),
            "neither another cluster's pod nor a refused entry joins the peer"
        );
    }

    #[test]
    fn diff_is_per_peer_and_gc_waits_for_sync() {
        let (m, k1, k2, k3) = model();
        let plan = planner(&k1).plan(&m);
        let cur = |k: &Key, ep: &str, ips: &[&str]| CurrentPeer {
            public_key: k.clone(),
            endpoint: Some(ep.parse().unwrap()),
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            keepalive: None,
        };
        // In sync: nothing to do.
        let current = vec![
            cur(&k2, "198.18.2.2:51871", &["10.2.0.0/24"]),
            cur(&k3, "198.18.3.2:51871", &["10.3.0.0/24"]),
        ];
        assert!(diff(&plan, &current, &HashMap::new(), true, None).is_empty());

        // One allowed IP differs: only that peer, only its AllowedIPs.
        let mut changed = current.clone();
        changed[1]
            .allowed_ips
            .insert("10.33.0.0/24".parse().unwrap());
        assert_eq!(
            diff(&plan, &changed, &HashMap::new(), true, None),
            vec![PeerOp::Update {
                key: k3.0,
                endpoint: false,
                allowed_ips: true,
                keepalive: false
            }]
        );

        // A stranger is kept before sync, removed after; a peer we owned goes at once.
        let stranger = key(77);
        let mine = key(78);
        let mut extra = current.clone();
        extra.push(cur(&stranger, "198.18.77.2:51871", &[]));
        extra.push(cur(&mine, "198.18.78.2:51871", &[]));
        let owned: HashMap<_, _> = [(
            mine.0,
            NodeRef {
                cluster: "c2".into(),
                name: "gone".into(),
            },
        )]
        .into();
        let before = diff(&plan, &extra, &owned, false, None);
        assert!(matches!(before.as_slice(), [PeerOp::Remove { key, .. }] if *key == mine.0));
        let after = diff(&plan, &extra, &owned, true, None);
        assert_eq!(after.len(), 2);

        // Missing peer: added.
        let ops = diff(&plan, &current[..1], &HashMap::new(), true, None);
        assert_eq!(ops, vec![PeerOp::Add(k3.0)]);
    }
}
