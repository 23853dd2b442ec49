//! Wire values (what Cilium writes to etcd) → state-model objects.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use crate::state::{self, ClusterName, PortMap, Protocol};
use crate::wire::{IpIdentityPair, KvClusterService, KvIdentity, KvNode, PortConfiguration};

pub fn node(n: &KvNode, cluster: ClusterName) -> state::Node {
    state::Node {
        cluster,
        cluster_id: n.cluster_id,
        name: n.name.clone(),
        node_ip: n.node_ip(false).or_else(|| n.node_ip(true)),
        underlay_ips: n.underlay_ips(),
        pod_side_ips: n.pod_side_ips(),
        pod_cidrs: n.pod_cidrs(),
        wireguard_pubkey: n.wireguard_pub_key().map(str::to_owned),
        encryption_key: n.encryption_key,
    }
}

pub fn identity(i: &KvIdentity, cluster: ClusterName) -> state::Identity {
    state::Identity {
        id: i.id,
        cluster,
        labels: i
            .labels
            .iter()
            .map(|l| format!("{}:{}={}", l.source, l.key, l.value))
            .collect(),
    }
}

/// `None` when the pair has no usable address (the decoder refuses those already).
pub fn endpoint(p: &IpIdentityPair, cluster: ClusterName) -> Option<state::Endpoint> {
    Some(state::Endpoint {
        prefix: p.prefix()?,
        cluster,
        identity: p.id,
        host_ip: p.host_ip,
        encryption_key: p.key,
    })
}

/// A remote cluster's exported service. Exported means global; the remote's own affinity
/// does not matter to us (only the local service's affinity decides).
pub fn service(s: &KvClusterService, cluster: ClusterName) -> state::ClusterService {
    state::ClusterService {
        name: state::ServiceName::new(&s.namespace, &s.name),
        cluster,
        cluster_id: s.cluster_id,
        frontends: addresses(&s.frontends).collect(),
        backends: addresses(&s.backends)
            .map(|(ip, ports)| state::Backend {
                ip,
                ports,
                state: state::BackendState::Active,
            })
            .collect(),
        global: true,
        shared: s.shared,
        affinity: state::Affinity::None,
    }
}

/// Address → ports; entries whose address does not parse are skipped (the decoder already
/// refuses values containing them).
fn addresses(
    map: &BTreeMap<String, PortConfiguration>,
) -> impl Iterator<Item = (IpAddr, PortMap)> + '_ {
    map.iter()
        .filter_map(|(ip, ports)| Some((ip.parse().ok()?, port_map(ports))))
}

fn port_map(ports: &PortConfiguration) -> PortMap {
    ports
        .iter()
        .filter_map(|(name, l4)| Some((name.clone(), (Protocol::parse(&l4.protocol)?, l4.port))))
        .collect()
}

/// The ipcache key suffix of a deleted entry: an address (host prefix) or a CIDR.
pub fn prefix_from_key(suffix: &str) -> Option<IpNet> {
    suffix
        .parse::<IpNet>()
        .ok()
        .or_else(|| suffix.parse::<IpAddr>().ok().map(IpNet::from))
}
