//! The ipcache writer: every endpoint of every accepted cluster, IPv4 prefix → identity,
//! hosting node, encryption key, remote flag. Incremental: only changed prefixes are written.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{
    Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;
use strait_common::{
    ipcache::{IPCACHE_FLAG_REMOTE_CLUSTER, IpcacheValue},
    names,
};

use super::DatapathError;
use crate::state::StateModel;

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

fn key(p: &Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(p.prefix_len()),
        u32::from_ne_bytes(p.addr().octets()),
    )
}

pub struct IpcacheWriter {
    map: LpmTrie<MapData, u32, IpcacheValue>,
    max: u32,
    programmed: BTreeMap<Ipv4Net, IpcacheValue>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IpcacheSyncReport {
    pub entries: usize,
    pub writes: usize,
    pub deletes: usize,
    pub failed: Vec<(Ipv4Net, String)>,
}

impl IpcacheWriter {
    /// Takes the map and remembers what a previous agent left in it (pinned map).
    pub fn new(map: Map, max: u32) -> Result<Self, DatapathError> {
        let name = names::MAP_IPCACHE;
        let map: LpmTrie<MapData, u32, IpcacheValue> =
            LpmTrie::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        let programmed = read(&map);
        Ok(Self {
            map,
            max,
            programmed,
        })
    }

    /// Writes what changed; entries nobody wants are removed only with `delete_stale` (after
    /// the first full sync, so restored entries keep serving until then).
    pub fn sync(
        &mut self,
        desired: &BTreeMap<Ipv4Net, IpcacheValue>,
        delete_stale: bool,
    ) -> IpcacheSyncReport {
        let mut report = IpcacheSyncReport::default();
        for (prefix, value) in desired {
            if self.programmed.get(prefix) == Some(value) {
                continue;
            }
            match self.map.insert(&key(prefix), value, 0) {
                Ok(()) => {
                    self.programmed.insert(*prefix, *value);
                    report.writes += 1;
                }
                Err(e) => report.failed.push((
                    *prefix,
                    DatapathError::map(names::MAP_IPCACHE, self.max, e).to_string(),
                )),
            }
        }
        if delete_stale {
            let stale: Vec<Ipv4Net> = self
                .programmed
                .keys()
                .filter(|p| !desired.contains_key(p))
                .copied()
                .collect();
            for p in stale {
                let _ = self.map.remove(&key(&p));
                self.programmed.remove(&p);
                report.deletes += 1;
            }
        }
        report.entries = self.programmed.len();
        report
    }
}

fn read(map: &LpmTrie<MapData, u32, IpcacheValue>) -> BTreeMap<Ipv4Net, IpcacheValue> {
    map.iter()
        .flatten()
        .filter_map(|(k, v)| {
            let prefix =
                Ipv4Net::new(Ipv4Addr::from(k.data().to_ne_bytes()), k.prefix_len() as u8).ok()?;
            Some((prefix, v))
        })
        .collect()
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
    let name = names::MAP_IPCACHE;
    let map: LpmTrie<MapData, u32, IpcacheValue> =
        LpmTrie::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
    Ok(read(&map)
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
