//! The encryption guard map: a copy of strict encryption's routing decisions (prefix →
//! encrypted / no peer) so the policy program can report a would-be plaintext flow as a drop
//! with a reason. Routing stays the enforcement (fail-closed `unreachable` routes); this map
//! only makes those drops visible in `strait observe`.

use std::collections::BTreeMap;

use aya::maps::Map;
use ipnet::{IpNet, Ipv4Net};
use strait_common::{
    flow::{DEFAULT_GUARD_MAX, GUARD_ENCRYPTED, GUARD_NO_PEER},
    names,
};

use super::{
    DatapathError,
    mirror::{KernelLpm4, MapMirror},
};
use crate::metrics::Metrics;

pub struct GuardWriter {
    map: MapMirror<KernelLpm4<u32>>,
}

impl GuardWriter {
    pub fn new(map: Map) -> Result<Self, DatapathError> {
        let map = KernelLpm4::new(map, names::MAP_ENCRYPT_GUARD, DEFAULT_GUARD_MAX)?;
        Ok(Self {
            map: MapMirror::new(map),
        })
    }

    /// Counts map errors in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.map = self.map.with_metrics(metrics);
        self
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
        self.map.sync(&desired, true).failed.len()
    }

    /// Whether a failed write or delete waits for a retry.
    pub fn pending(&self) -> bool {
        self.map.pending()
    }
}
