//! The ipcache writer: every endpoint of every accepted cluster, IPv4 prefix → identity,
//! hosting node, encryption key, remote flag. Incremental: only changed prefixes are written
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
use crate::{metrics::Metrics, state::StateModel};

/// What the ipcache should hold, from the state model.
pub fn desired(model: &StateModel) -> BTreeMap<Ipv4Net, IpcacheValue> {
    let local = model.local_cluster().clone();
    let mut out = BTreeMap::new();
    for ep in model.ipcache() {
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
                identity: ep.identity,
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
    out
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
