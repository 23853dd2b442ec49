//! Who may say which identity lives behind an address: the ipcache entries the datapath may
//! program. A remote cluster's kvstore is not trusted to name identities for addresses it does
//! not own, so (Cilium does not filter by pod CIDR; strait does):
//! - the local cluster's entries always stand, and no remote entry displaces them;
//! - a remote entry is accepted inside the pod CIDRs of that remote's own nodes, for its
//!   nodes' pod-side addresses (router, health, ingress IPs), and for its nodes' underlay
//!   addresses, which are `remote-node` (Cilium rewrites `host` → `remote-node`);
//! - a prefix that two remotes both claim is refused for both: neither can be believed.
//!
//! Everything else is refused with a reason, for logs, metrics and status.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use ipnet::IpNet;

use super::{StateModel, types::ClusterName, types::Endpoint};
use crate::identity::{IDENTITY_REMOTE_NODE, NumericIdentity, remote_view_of_identity};

/// An entry the datapath may program, with the identity it is programmed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnedEndpoint<'a> {
    pub endpoint: &'a Endpoint,
    pub identity: NumericIdentity,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalReason {
    /// Inside the local cluster's pod CIDRs, or an address the local cluster has an entry for.
    Local,
    /// Outside every pod CIDR of the cluster's nodes, and not one of its nodes' addresses.
    OutsidePodCidrs,
    /// Another remote claims the same prefix.
    Conflict { other: ClusterName },
}

impl RefusalReason {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            RefusalReason::Local => "local",
            RefusalReason::OutsidePodCidrs => "outside-pod-cidrs",
            RefusalReason::Conflict { .. } => "conflict",
        }
    }
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefusalReason::Local => f.write_str("address of the local cluster"),
            RefusalReason::OutsidePodCidrs => {
                f.write_str("outside the pod CIDRs and addresses of the cluster's nodes")
            }
            RefusalReason::Conflict { other } => write!(f, "also claimed by cluster {other}"),
        }
    }
}

/// A remote ipcache entry the datapath does not program.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheRefusal {
    pub cluster: ClusterName,
    pub prefix: IpNet,
    pub reason: RefusalReason,
}

impl std::fmt::Display for IpcacheRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ipcache entry {} of cluster {} refused: {}",
            self.prefix, self.cluster, self.reason
        )
    }
}

#[derive(Debug, Default)]
pub struct Ownership<'a> {
    pub entries: Vec<OwnedEndpoint<'a>>,
    /// Sorted by cluster, then prefix.
    pub refusals: Vec<IpcacheRefusal>,
}

/// Prefixes with a "does one of them contain p" lookup: one hash probe per prefix length in
/// use (a handful), not a scan of every node's CIDRs.
#[derive(Default)]
struct PrefixSet {
    lens: BTreeSet<(bool, u8)>,
    set: HashSet<IpNet>,
}

impl PrefixSet {
    fn insert(&mut self, p: IpNet) {
        self.lens.insert((p.addr().is_ipv6(), p.prefix_len()));
        self.set.insert(p.trunc());
    }

    fn covers(&self, p: &IpNet) -> bool {
        let v6 = p.addr().is_ipv6();
        self.lens
            .iter()
            .filter(|(family, len)| *family == v6 && *len <= p.prefix_len())
            .any(|(_, len)| IpNet::new(p.addr(), *len).is_ok_and(|q| self.set.contains(&q.trunc())))
    }
}

/// What each cluster's nodes own: their pod CIDRs, their underlay addresses and their
/// pod-side addresses (router, health, ingress IPs; inside the pod CIDRs in Cilium's IPAM).
#[derive(Default)]
struct NodeSpace {
    pod_cidrs: PrefixSet,
    addresses: HashSet<IpAddr>,
    pod_side: HashSet<IpAddr>,
}

/// Splits the model's ipcache entries (of clusters not refused) into those the datapath may
/// program and the refused remote ones.
pub fn owned_endpoints(model: &StateModel) -> Ownership<'_> {
    let local = model.local_cluster();
    let mut space: HashMap<&str, NodeSpace> = HashMap::new();
    for node in model.nodes() {
        let s = space.entry(node.cluster.as_ref()).or_default();
        node.pod_cidrs.iter().for_each(|c| s.pod_cidrs.insert(*c));
        s.addresses
            .extend(node.underlay_ips.iter().chain(&node.node_ip));
        s.pod_side.extend(node.pod_side_ips.iter().copied());
    }
    let none = NodeSpace::default();
    let local_space = space.get(local.as_ref()).unwrap_or(&none);
    let (locals, remotes): (Vec<&Endpoint>, Vec<&Endpoint>) =
        model.ipcache().partition(|e| e.cluster == *local);
    let local_prefixes: HashSet<IpNet> = locals.iter().map(|e| e.prefix.trunc()).collect();

    let mut out = Ownership {
        entries: locals
            .iter()
            .map(|&endpoint| OwnedEndpoint {
                endpoint,
                identity: endpoint.identity,
            })
            .collect(),
        refusals: Vec::new(),
    };
    // Remote entries that pass their own cluster's checks, by prefix, before conflicts.
    let mut candidates: HashMap<IpNet, Vec<OwnedEndpoint<'_>>> = HashMap::new();
    for ep in remotes {
        let prefix = ep.prefix.trunc();
        let own = space.get(ep.cluster.as_ref()).unwrap_or(&none);
        let single = (prefix.prefix_len() == prefix.max_prefix_len()).then(|| prefix.addr());
        let refuse = |reason| IpcacheRefusal {
            cluster: ep.cluster.clone(),
            prefix,
            reason,
        };
        let local_claim = local_prefixes.contains(&prefix)
            || local_space.pod_cidrs.covers(&prefix)
            || single.is_some_and(|a| {
                local_space.addresses.contains(&a) || local_space.pod_side.contains(&a)
            });
        let identity = if local_claim {
            out.refusals.push(refuse(RefusalReason::Local));
            continue;
        } else if single.is_some_and(|a| own.addresses.contains(&a)) {
            IDENTITY_REMOTE_NODE
        } else if own.pod_cidrs.covers(&prefix) || single.is_some_and(|a| own.pod_side.contains(&a))
        {
            // Pod side keeps its identity (a router IP's `host` becomes `remote-node`, a
            // health IP stays `health`).
            remote_view_of_identity(ep.identity)
        } else {
            out.refusals.push(refuse(RefusalReason::OutsidePodCidrs));
            continue;
        };
        candidates.entry(prefix).or_default().push(OwnedEndpoint {
            endpoint: ep,
            identity,
        });
    }
    for (prefix, claims) in candidates {
        let clusters: BTreeSet<&ClusterName> = claims.iter().map(|c| &c.endpoint.cluster).collect();
        if clusters.len() == 1 {
            out.entries.extend(claims);
            continue;
        }
        for c in &claims {
            let other = clusters
                .iter()
                .find(|o| **o != &c.endpoint.cluster)
                .map(|o| (*o).clone())
                .unwrap_or_default();
            out.refusals.push(IpcacheRefusal {
                cluster: c.endpoint.cluster.clone(),
                prefix,
                reason: RefusalReason::Conflict { other },
            });
        }
    }
    out.refusals.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Node;

    fn node(cluster: &str, id: u32, name: &str, ip: &str, cidr: &str) -> Node {
        Node {
            cluster: cluster.into(),
            cluster_id: id,
            name: name.into(),
            node_ip: Some(ip.parse().unwrap()),
            underlay_ips: vec![ip.parse().unwrap()],
            pod_side_ips: vec![],
            pod_cidrs: vec![cidr.parse().unwrap()],
            wireguard_pubkey: None,
            encryption_key: 255,
        }
    }

    fn ep(cluster: &str, prefix: &str, identity: u32) -> Endpoint {
        Endpoint {
            prefix: prefix.parse().unwrap(),
            cluster: cluster.into(),
            identity,
            host_ip: None,
            encryption_key: 255,
        }
    }

    /// usa (local, 10.1.0.0/24), europe (10.2.0.0/24) and asia (10.3.0.0/24), one node each.
    fn mesh(endpoints: &[Endpoint]) -> StateModel {
        let mut m = StateModel::new("usa", 1);
        m.register_cluster("europe", 2).unwrap();
        m.register_cluster("asia", 3).unwrap();
        m.upsert_node(node("usa", 1, "usa-1", "198.18.1.1", "10.1.0.0/24"));
        m.upsert_node(node("europe", 2, "eu-1", "198.18.2.1", "10.2.0.0/24"));
        m.upsert_node(node("asia", 3, "asia-1", "198.18.3.1", "10.3.0.0/24"));
        endpoints.iter().for_each(|e| m.upsert_endpoint(e.clone()));
        m.settle();
        m
    }

    fn accepted(o: &Ownership<'_>) -> Vec<(String, String, u32)> {
        let mut v: Vec<_> = o
            .entries
            .iter()
            .map(|e| {
                (
                    e.endpoint.cluster.to_string(),
                    e.endpoint.prefix.to_string(),
                    e.identity,
                )
            })
            .collect();
        v.sort();
        v
    }

    fn refused(o: &Ownership<'_>) -> Vec<(String, String, &'static str)> {
        o.refusals
            .iter()
            .map(|r| {
                (
                    r.cluster.to_string(),
                    r.prefix.to_string(),
                    r.reason.as_str(),
                )
            })
            .collect()
    }

    fn s(c: &str, p: &str) -> (String, String) {
        (c.into(), p.into())
    }

    #[test]
    fn valid_remote_entry_is_accepted() {
        let m = mesh(&[
            ep("usa", "10.1.0.5/32", 65537),
            ep("europe", "10.2.0.5/32", 131073),
        ]);
        let o = owned_endpoints(&m);
        assert_eq!(
            accepted(&o),
            vec![
                ("europe".into(), "10.2.0.5/32".into(), 131073),
                ("usa".into(), "10.1.0.5/32".into(), 65537)
            ]
        );
        assert!(o.refusals.is_empty());
    }

    /// Cilium publishes its router IP as `host` and its health IP as `health`; with a router
    /// IP outside the pod CIDR (`local-router-ipv4`) the entry is still the node's own.
    #[test]
    fn pod_side_addresses_keep_their_identity_and_are_owned_outside_the_pod_cidr() {
        let mut m = mesh(&[
            ep("europe", "169.254.20.2/32", crate::identity::IDENTITY_HOST),
            ep("europe", "10.2.0.77/32", crate::identity::IDENTITY_HEALTH),
            ep("asia", "169.254.20.2/32", crate::identity::IDENTITY_HOST),
        ]);
        let mut eu = m.node("europe", "eu-1").unwrap().clone();
        eu.pod_side_ips = vec![
            "169.254.20.2".parse().unwrap(),
            "10.2.0.77".parse().unwrap(),
        ];
        m.upsert_node(eu);
        m.settle();
        let o = owned_endpoints(&m);
        assert_eq!(
            accepted(&o),
            vec![
                (
                    "europe".into(),
                    "10.2.0.77/32".into(),
                    crate::identity::IDENTITY_HEALTH
                ),
                (
                    "europe".into(),
                    "169.254.20.2/32".into(),
                    IDENTITY_REMOTE_NODE
                ),
            ]
        );
        assert_eq!(
            refused(&o),
            vec![("asia".into(), "169.254.20.2/32".into(), "outside-pod-cidrs")]
        );
    }

    #[test]
    fn local_entry_wins_over_a_remote_for_the_same_prefix() {
        // Local entries outside the local pod CIDRs too (a node address, say).
        let m = mesh(&[
            ep("usa", "192.0.2.7/32", 65537),
            ep("europe", "192.0.2.7/32", 131073),
        ]);
        let o = owned_endpoints(&m);
        assert_eq!(
            accepted(&o),
            vec![("usa".into(), "192.0.2.7/32".into(), 65537)]
        );
        assert_eq!(
            refused(&o),
            vec![("europe".into(), "192.0.2.7/32".into(), "local")]
        );
    }

    #[test]
    fn remote_claiming_a_local_pod_address_is_refused() {
        // No local entry for it (yet): the local pod CIDR is still the local cluster's.
        let m = mesh(&[ep("europe", "10.1.0.9/32", 131073)]);
        let o = owned_endpoints(&m);
        assert!(o.entries.is_empty());
        assert_eq!(
            refused(&o),
            vec![("europe".into(), "10.1.0.9/32".into(), "local")]
        );
    }

    #[test]
    fn remote_prefix_outside_its_pod_cidrs_is_refused() {
        // Inside asia's pod CIDR, published by europe.
        let m = mesh(&[
            ep("europe", "10.3.0.5/32", 131073),
            ep("europe", "203.0.113.0/24", 131073),
            ep("asia", "10.3.0.5/32", 196609),
        ]);
        let o = owned_endpoints(&m);
        assert_eq!(
            accepted(&o),
            vec![("asia".into(), "10.3.0.5/32".into(), 196609)]
        );
        assert_eq!(
            refused(&o),
            vec![
                ("europe".into(), "10.3.0.5/32".into(), "outside-pod-cidrs"),
                (
                    "europe".into(),
                    "203.0.113.0/24".into(),
                    "outside-pod-cidrs"
                ),
            ]
        );
    }

    #[test]
    fn remote_default_route_is_refused() {
        let m = mesh(&[
            ep("europe", "0.0.0.0/0", 2),
            ep("europe", "10.2.0.0/16", 131073),
        ]);
        let o = owned_endpoints(&m);
        assert!(o.entries.is_empty());
        assert_eq!(
            refused(&o)
                .into_iter()
                .map(|(c, p, _)| s(&c, &p))
                .collect::<Vec<_>>(),
            vec![s("europe", "0.0.0.0/0"), s("europe", "10.2.0.0/16")]
        );
    }

    #[test]
    fn remote_node_address_maps_to_remote_node() {
        let m = mesh(&[
            ep("europe", "198.18.2.1/32", 1),
            ep("europe", "10.2.0.1/32", 1),
        ]);
        let o = owned_endpoints(&m);
        assert_eq!(
            accepted(&o),
            vec![
                ("europe".into(), "10.2.0.1/32".into(), IDENTITY_REMOTE_NODE),
                (
                    "europe".into(),
                    "198.18.2.1/32".into(),
                    IDENTITY_REMOTE_NODE
                ),
            ]
        );
        // Whatever identity it claims for its node's address.
        let m = mesh(&[ep("europe", "198.18.2.1/32", 131073)]);
        assert_eq!(
            owned_endpoints(&m).entries[0].identity,
            IDENTITY_REMOTE_NODE
        );
    }

    #[test]
    fn prefix_claimed_by_two_remotes_is_refused_for_both() {
        // Both nodes behind one address (NAT): each cluster may claim it, neither wins.
        let mut m = mesh(&[
            ep("europe", "198.18.9.9/32", 6),
            ep("asia", "198.18.9.9/32", 6),
        ]);
        m.upsert_node(node("europe", 2, "eu-2", "198.18.9.9", "10.2.1.0/24"));
        m.upsert_node(node("asia", 3, "asia-2", "198.18.9.9", "10.3.1.0/24"));
        m.settle();
        let o = owned_endpoints(&m);
        assert!(o.entries.is_empty(), "{:?}", accepted(&o));
        assert_eq!(
            o.refusals,
            vec![
                IpcacheRefusal {
                    cluster: "asia".into(),
                    prefix: "198.18.9.9/32".parse().unwrap(),
                    reason: RefusalReason::Conflict {
                        other: "europe".into()
                    },
                },
                IpcacheRefusal {
                    cluster: "europe".into(),
                    prefix: "198.18.9.9/32".parse().unwrap(),
                    reason: RefusalReason::Conflict {
                        other: "asia".into()
                    },
                },
            ]
        );
        let msg = o.refusals[0].to_string();
        assert!(msg.contains("asia") && msg.contains("europe") && msg.contains("198.18.9.9/32"));
    }

    #[test]
    fn a_remote_cannot_knock_out_another_remotes_entry() {
        // europe claims asia's pod address: europe's claim is out of range, asia's stands.
        let m = mesh(&[
            ep("europe", "10.3.0.7/32", 131073),
            ep("asia", "10.3.0.7/32", 196609),
        ]);
        let o = owned_endpoints(&m);
        assert_eq!(
            accepted(&o),
            vec![("asia".into(), "10.3.0.7/32".into(), 196609)]
        );
        assert_eq!(refused(&o).len(), 1);
    }
}
