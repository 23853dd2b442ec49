//! The ipcache writer: every endpoint the state model accepts (local ones; remote ones inside
//! their cluster's node space), IPv4 prefix → identity, hosting node, encryption key, remote
//! flag. Incremental: only changed prefixes are written
//! (through the map mirror, which also retries failed writes and deletes).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::Map;
use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;
use strait_common::{
    ipcache::{IPCACHE_FLAG_REMOTE_CLUSTER, IpcacheValue},
    names,
};

use super::{
    DatapathError,
    mirror::{KernelLpm4, KernelMap as _, MapMirror, SyncReport},
};
use crate::{
    metrics::Metrics,
    state::{self, IpcacheRefusal, OwnedEndpoint, StateModel},
};

/// What the ipcache should hold: the entries the state model accepts (its ownership rule,
/// [`state::owned_endpoints`]), and the remote entries it refuses.
pub fn desired(model: &StateModel) -> (BTreeMap<Ipv4Net, IpcacheValue>, Vec<IpcacheRefusal>) {
    let local = model.local_cluster().clone();
    let owned = state::owned_endpoints(model);
    let mut out = BTreeMap::new();
    for OwnedEndpoint {
        endpoint: ep,
        identity,
    } in owned.entries
    {
        let IpNet::V4(prefix) = ep.prefix else {
            continue;
        };
        let cluster_id = model.cluster(&ep.cluster).map(|c| c.id).unwrap_or(0);
        let tunnel_endpoint = match ep.host_ip {
            Some(IpAddr::V4(ip)) => u32::from_ne_bytes(ip.octets()),
            _ => 0,
        };
        out.insert(
            prefix.trunc(),
            IpcacheValue {
                identity,
                tunnel_endpoint,
                cluster_id: u16::try_from(cluster_id).unwrap_or(u16::MAX),
                encrypt_key: ep.encryption_key,
                flags: if ep.cluster != local {
                    IPCACHE_FLAG_REMOTE_CLUSTER
                } else {
                    0
                },
            },
        );
    }
    (out, owned.refusals)
}

pub struct IpcacheWriter {
    map: MapMirror<KernelLpm4<IpcacheValue>>,
}

pub type IpcacheSyncReport = SyncReport<Ipv4Net>;

impl IpcacheWriter {
    /// Takes the map and remembers what a previous agent left in it (pinned map).
    pub fn new(map: Map, max: u32) -> Result<Self, DatapathError> {
        let map = KernelLpm4::new(map, names::MAP_IPCACHE, max)?;
        Ok(Self {
            map: MapMirror::new(map),
        })
    }

    /// Counts map errors in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.map = self.map.with_metrics(metrics);
        self
    }

    /// Writes what changed; entries nobody wants are removed only with `delete_stale` (after
    /// the first full sync, so restored entries keep serving until then).
    pub fn sync(
        &mut self,
        desired: &BTreeMap<Ipv4Net, IpcacheValue>,
        delete_stale: bool,
    ) -> IpcacheSyncReport {
        self.map.sync(desired, delete_stale)
    }

    /// Whether a failed write or delete waits for a retry.
    pub fn pending(&self) -> bool {
        self.map.pending()
    }
}

/// One ipcache entry as read back (`strait bpf ipcache list`).
#[derive(Debug, Clone, Serialize)]
pub struct IpcacheListEntry {
    pub prefix: Ipv4Net,
    pub identity: u32,
    pub tunnel_endpoint: Option<Ipv4Addr>,
    pub cluster_id: u16,
    pub encrypt_key: u8,
    pub remote_cluster: bool,
}

pub fn list(map: Map) -> Result<Vec<IpcacheListEntry>, DatapathError> {
    // Only read: the size matters for "map is full" errors alone.
    let mut entries = KernelLpm4::<IpcacheValue>::new(map, names::MAP_IPCACHE, 0)?.entries();
    entries.sort_by_key(|(prefix, _)| *prefix);
    Ok(entries
        .into_iter()
        .map(|(prefix, v)| IpcacheListEntry {
            prefix,
            identity: v.identity,
            tunnel_endpoint: (v.tunnel_endpoint != 0)
                .then(|| Ipv4Addr::from(v.tunnel_endpoint.to_ne_bytes())),
            cluster_id: v.cluster_id,
            encrypt_key: v.encrypt_key,
            remote_cluster: v.flags & IPCACHE_FLAG_REMOTE_CLUSTER != 0,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::IDENTITY_REMOTE_NODE,
        state::{Endpoint, Node},
    };

    fn node(cluster: &str, ip: &str, cidr: &str) -> Node {
        Node {
            cluster: cluster.into(),
            cluster_id: 0,
            name: format!("{cluster}-1"),
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

    /// The map holds only what the ownership rule accepts: before it, the remote that sorted
    /// last won a shared prefix, and any remote could program 0.0.0.0/0 or a local pod.
    #[test]
    fn only_owned_entries_are_programmed() {
        let mut m = StateModel::new("usa", 1);
        m.register_cluster("zeta", 2).unwrap();
        m.upsert_node(node("usa", "198.18.1.1", "10.1.0.0/24"));
        m.upsert_node(node("zeta", "198.18.2.1", "10.2.0.0/24"));
        for e in [
            ep("usa", "10.1.0.5/32", 65537),
            ep("zeta", "10.1.0.5/32", 131073),
            ep("zeta", "10.1.0.6/32", 131073),
            ep("zeta", "0.0.0.0/0", 2),
            ep("zeta", "10.2.0.5/32", 131074),
            ep("zeta", "198.18.2.1/32", 1),
        ] {
            m.upsert_endpoint(e);
        }
        m.settle();
        let (map, refused) = desired(&m);
        let got: Vec<(String, u32)> = map
            .iter()
            .map(|(p, v)| (p.to_string(), v.identity))
            .collect();
        assert_eq!(
            got,
            [
                ("10.1.0.5/32".into(), 65537),
                ("10.2.0.5/32".into(), 131074),
                ("198.18.2.1/32".into(), IDENTITY_REMOTE_NODE),
            ]
        );
        assert_eq!(refused.len(), 3);
        assert_eq!(
            map[&"10.2.0.5/32".parse().unwrap()].flags,
            IPCACHE_FLAG_REMOTE_CLUSTER
        );
    }
}
