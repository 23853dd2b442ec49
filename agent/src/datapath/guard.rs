//! The encryption guard map: a copy of strict encryption's routing decisions (prefix →
//! encrypted / no peer) so the policy program can report a would-be plaintext flow as a drop
//! with a reason. Routing stays the enforcement (fail-closed `unreachable` routes); this map
//! only makes those drops visible in `strait observe`.

use std::collections::BTreeMap;

use aya::maps::{
    Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::{IpNet, Ipv4Net};
use strait_common::{
    flow::{GUARD_ENCRYPTED, GUARD_NO_PEER},
    names,
};

use super::DatapathError;

pub struct GuardWriter {
    map: LpmTrie<MapData, u32, u32>,
    programmed: BTreeMap<Ipv4Net, u32>,
}

fn key(p: &Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(p.prefix_len()),
        u32::from_ne_bytes(p.addr().octets()),
    )
}

impl GuardWriter {
    pub fn new(map: Map) -> Result<Self, DatapathError> {
        let name = names::MAP_ENCRYPT_GUARD;
        let map: LpmTrie<MapData, u32, u32> =
            LpmTrie::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        let programmed = map
            .iter()
            .flatten()
            .filter_map(|(k, v)| {
                let net = Ipv4Net::new(k.data().to_ne_bytes().into(), k.prefix_len() as u8).ok()?;
                Some((net, v))
            })
            .collect();
        Ok(Self { map, programmed })
    }

    /// Makes the map equal to `routes` (prefix, routed into the device?); IPv6 is skipped
    /// (the datapath is IPv4 only). Returns how many writes failed.
    pub fn sync(&mut self, routes: &[(IpNet, bool)]) -> usize {
        let desired: BTreeMap<Ipv4Net, u32> = routes
            .iter()
            .filter_map(|(p, encrypted)| match p {
                IpNet::V4(p) => Some((
                    p.trunc(),
                    if *encrypted {
                        GUARD_ENCRYPTED
                    } else {
                        GUARD_NO_PEER
                    },
                )),
                IpNet::V6(_) => None,
            })
            .collect();
        let mut failed = 0;
        for (p, v) in &desired {
            if self.programmed.get(p) == Some(v) {
                continue;
            }
            if self.map.insert(&key(p), v, 0).is_ok() {
                self.programmed.insert(*p, *v);
            } else {
                failed += 1;
            }
        }
        let stale: Vec<Ipv4Net> = self
            .programmed
            .keys()
            .filter(|p| !desired.contains_key(p))
            .copied()
            .collect();
        for p in stale {
            let _ = self.map.remove(&key(&p));
            self.programmed.remove(&p);
        }
        failed
    }
}
