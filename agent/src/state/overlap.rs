//! Refusing clusters whose pod CIDRs overlap: an address that exists in two clusters makes
//! routing ambiguous, so the later cluster's routes and backends are refused, naming both
//! clusters and both prefixes. The local cluster always wins; among remotes, the one that
//! connected first wins. Refusal lifts by itself once the overlap is gone.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::Serialize;

use super::types::ClusterName;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overlap {
    /// The refused cluster and its offending prefix.
    pub cluster: ClusterName,
    pub prefix: IpNet,
    /// The cluster that keeps the address space, and its prefix.
    pub other_cluster: ClusterName,
    pub other_prefix: IpNet,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod CIDR {} of cluster {} overlaps pod CIDR {} of cluster {}: routes and backends of {} are refused",
            self.prefix, self.cluster, self.other_prefix, self.other_cluster, self.cluster
        )
    }
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Decides which clusters are refused. `order` lists clusters by precedence (local first,
/// then remotes in connection order); `cidrs` holds each cluster's pod CIDRs.
///
/// CIDRs are either nested or disjoint, so a prefix conflicts with the accepted set iff one of
/// its supernets (or itself) is accepted, or an accepted prefix starts inside it: a hash
/// lookup per prefix length plus one ordered range scan, instead of comparing every pair
/// (10k nodes in a 100-cluster mesh).
pub fn refusals(
    order: &[ClusterName],
    cidrs: &BTreeMap<ClusterName, Vec<IpNet>>,
) -> BTreeMap<ClusterName, Overlap> {
    let mut index = Index::default();
    let mut refused = BTreeMap::new();
    for cluster in order {
        let own = cidrs.get(cluster).map(Vec::as_slice).unwrap_or_default();
        match own
            .iter()
            .find_map(|p| index.conflict(p, cluster).map(|(c, q)| (*p, c, q)))
        {
            Some((prefix, other_cluster, other_prefix)) => {
                refused.insert(
                    cluster.clone(),
                    Overlap {
                        cluster: cluster.clone(),
                        prefix,
                        other_cluster,
                        other_prefix,
                    },
                );
            }
            None => own.iter().for_each(|p| index.insert(*p, cluster)),
        }
    }
    refused
}

/// Accepted prefixes with their owners.
#[derive(Default)]
struct Index {
    owner: HashMap<IpNet, ClusterName>,
    /// (is_v6, network address) → prefixes starting there.
    by_start: BTreeMap<(bool, u128), Vec<IpNet>>,
}

fn start_of(p: &IpNet) -> (bool, u128) {
    match p.network() {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

fn end_of(p: &IpNet) -> (bool, u128) {
    match p.broadcast() {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

impl Index {
    fn insert(&mut self, p: IpNet, cluster: &ClusterName) {
        let p = p.trunc();
        if self.owner.insert(p, cluster.clone()).is_none() {
            self.by_start.entry(start_of(&p)).or_default().push(p);
        }
    }

    /// An accepted prefix of another cluster overlapping `p`, if any.
    fn conflict(&self, p: &IpNet, cluster: &ClusterName) -> Option<(ClusterName, IpNet)> {
        let p = p.trunc();
        let foreign = |q: &IpNet| {
            self.owner
                .get(q)
                .filter(|c| *c != cluster)
                .map(|c| (c.clone(), *q))
        };
        // p itself or one of its supernets.
        let supernet = (0..=p.prefix_len()).find_map(|len| {
            IpNet::new(p.network(), len)
                .ok()
                .map(|q| q.trunc())
                .and_then(|q| foreign(&q))
        });
        supernet.or_else(|| {
            // An accepted prefix inside p.
            self.by_start
                .range(start_of(&p)..=end_of(&p))
                .flat_map(|(_, qs)| qs)
                .find_map(foreign)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClusterName {
        s.into()
    }
    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn disjoint_clusters_are_accepted() {
        let cidrs = BTreeMap::from([
            (c("usa"), vec![n("10.1.0.0/24"), n("10.1.1.0/24")]),
            (c("europe"), vec![n("10.2.0.0/24")]),
        ]);
        assert!(refusals(&[c("usa"), c("europe")], &cidrs).is_empty());
    }

    #[test]
    fn later_cluster_is_refused_naming_both_prefixes() {
        let cidrs = BTreeMap::from([
            (c("usa"), vec![n("10.1.0.0/16")]),
            (c("europe"), vec![n("10.2.0.0/16")]),
            (c("asia"), vec![n("10.3.0.0/24"), n("10.1.7.0/24")]),
        ]);
        let r = refusals(&[c("usa"), c("europe"), c("asia")], &cidrs);
        assert_eq!(r.len(), 1);
        let o = &r[&c("asia")];
        assert_eq!(
            (o.prefix, o.other_cluster.as_ref(), o.other_prefix),
            (n("10.1.7.0/24"), "usa", n("10.1.0.0/16"))
        );
        let msg = o.to_string();
        assert!(
            msg.contains("asia")
                && msg.contains("usa")
                && msg.contains("10.1.7.0/24")
                && msg.contains("10.1.0.0/16"),
            "{msg}"
        );
    }

    #[test]
    fn refused_cluster_does_not_block_others() {
        // asia is refused against usa; europe overlaps only asia, so europe stays accepted.
        let cidrs = BTreeMap::from([
            (c("usa"), vec![n("10.1.0.0/16")]),
            (c("asia"), vec![n("10.0.0.0/8")]),
            (c("europe"), vec![n("10.2.0.0/16")]),
        ]);
        let r = refusals(&[c("usa"), c("asia"), c("europe")], &cidrs);
        assert_eq!(
            r.keys().map(|k| k.as_ref()).collect::<Vec<_>>(),
            vec!["asia"]
        );
    }

    #[test]
    fn ipv4_and_ipv6_never_overlap() {
        assert!(!overlaps(&n("10.0.0.0/8"), &n("fd00::/8")));
        assert!(overlaps(&n("fd00::/8"), &n("fd00:1::/64")));
    }
}
