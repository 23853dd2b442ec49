//! The load-balancer map writer: turns the state model's service views into the lb4 maps.
//!
//! Update order keeps every service consistent from the programs' point of view: backends are
//! written before any slot names them, slots before the frontend's count covers them, and
//! slots beyond a shrunk count are deleted only after the frontend stops covering them. A
//! service with backends therefore never looks empty or half-written.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::Serialize;
use strait_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    lb::{
        BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service,
        SVC_FLAG_GLOBAL,
    },
    names,
};

use super::{DatapathError, MapSizes};
use crate::state::{Protocol, SelectedBackend, ServiceView};

/// A service frontend: VIP, port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

/// A backend as the datapath knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BackendAddr {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub cluster_id: u16,
}

/// What one frontend should look like.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredService {
    pub global: bool,
    /// Backends for new connections, in slot order.
    pub active: Vec<BackendAddr>,
    /// Kept in the backend map for existing flows, never in a slot.
    pub terminating: Vec<BackendAddr>,
}

fn proto_number(p: Protocol) -> Option<u8> {
    match p {
        Protocol::Tcp => Some(IPPROTO_TCP),
        Protocol::Udp => Some(IPPROTO_UDP),
        Protocol::Sctp => None,
    }
}

/// Frontends of every service view, with the backends whose port of the same name and
/// protocol exists. IPv6 and SCTP frontends are not programmed yet (returned as skipped).
pub fn desired(views: &[ServiceView]) -> (BTreeMap<Frontend, DesiredService>, usize) {
    let mut out = BTreeMap::new();
    let mut skipped = 0;
    for view in views {
        for (ip, ports) in &view.frontends {
            let IpAddr::V4(address) = ip else {
                skipped += ports.len();
                continue;
            };
            for (port_name, (protocol, port)) in ports {
                let Some(proto) = proto_number(*protocol) else {
                    skipped += 1;
                    continue;
                };
                let pick = |list: &[SelectedBackend]| -> Vec<BackendAddr> {
                    list.iter()
                        .filter_map(|b| {
                            let IpAddr::V4(address) = b.backend.ip else {
                                return None;
                            };
                            let (bp, bport) = b.backend.ports.get(port_name)?;
                            (bp == protocol).then_some(BackendAddr {
                                address,
                                port: *bport,
                                proto,
                                cluster_id: u16::try_from(b.cluster_id).unwrap_or(u16::MAX),
                            })
                        })
                        .collect()
                };
                out.insert(
                    Frontend {
                        address: *address,
                        port: *port,
                        proto,
                    },
                    DesiredService {
                        global: view.global,
                        active: pick(&view.active),
                        terminating: pick(&view.terminating),
                    },
                );
            }
        }
    }
    (out, skipped)
}

#[derive(Debug, Clone, Default)]
struct Programmed {
    rev_nat: u16,
    flags: u8,
    slots: Vec<u32>,
    terminating: Vec<u32>,
}

/// Small id allocator: lowest free id first, ids start at 1 (0 means "none" in the maps).
#[derive(Debug, Default)]
struct Ids {
    used: std::collections::BTreeSet<u32>,
}

impl Ids {
    fn take(&mut self, max: u32) -> Option<u32> {
        let mut candidate = 1;
        for &id in &self.used {
            if id != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate <= max).then(|| {
            self.used.insert(candidate);
            candidate
        })
    }
    fn mark(&mut self, id: u32) {
        self.used.insert(id);
    }
    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// Outcome of one sync.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LbSyncReport {
    pub services: usize,
    pub backends: usize,
    pub writes: usize,
    pub deletes: usize,
    /// Frontends that could not be programmed, with why (e.g. a full map).
    pub failed: Vec<(Frontend, String)>,
}

/// Owner of the three lb4 maps.
pub struct LbWriter {
    services: BpfHashMap<MapData, Lb4Key, Lb4Service>,
    backends: BpfHashMap<MapData, u32, Lb4Backend>,
    revnat: BpfHashMap<MapData, u16, Lb4RevNat>,
    sizes: MapSizes,
    programmed: BTreeMap<Frontend, Programmed>,
    backend_ids: HashMap<BackendAddr, u32>,
    backend_values: HashMap<u32, Lb4Backend>,
    ids: Ids,
    rev_ids: Ids,
}

fn key(f: &Frontend, slot: u16) -> Lb4Key {
    Lb4Key {
        address: u32::from_ne_bytes(f.address.octets()),
        dport: f.port.to_be(),
        backend_slot: slot,
        proto: f.proto,
        pad: [0; 3],
    }
}

fn typed<K: aya::Pod, V: aya::Pod>(
    map: Map,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, DatapathError> {
    BpfHashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

impl LbWriter {
    /// Takes the maps and restores what a previous agent programmed into them (pinned maps),
    /// so ids stay stable and nothing is rewritten needlessly.
    pub fn new(
        services: Map,
        backends: Map,
        revnat: Map,
        sizes: MapSizes,
    ) -> Result<Self, DatapathError> {
        let mut w = Self {
            services: typed(services, names::MAP_LB4_SERVICES)?,
            backends: typed(backends, names::MAP_LB4_BACKENDS)?,
            revnat: typed(revnat, names::MAP_LB4_REVNAT)?,
            sizes,
            programmed: BTreeMap::new(),
            backend_ids: HashMap::new(),
            backend_values: HashMap::new(),
            ids: Ids::default(),
            rev_ids: Ids::default(),
        };
        w.restore();
        Ok(w)
    }

    fn restore(&mut self) {
        for (id, b) in self.backends.iter().flatten() {
            self.backend_ids.insert(backend_addr(&b), id);
            self.backend_values.insert(id, b);
            self.ids.mark(id);
        }
        let mut entries: Vec<(Lb4Key, Lb4Service)> = self.services.iter().flatten().collect();
        entries.sort_by_key(|(k, _)| k.backend_slot);
        for (k, v) in entries {
            let f = Frontend {
                address: Ipv4Addr::from(k.address.to_ne_bytes()),
                port: u16::from_be(k.dport),
                proto: k.proto,
            };
            let p = self.programmed.entry(f).or_default();
            if k.backend_slot == 0 {
                p.rev_nat = v.rev_nat_index;
                p.flags = v.flags;
                self.rev_ids.mark(u32::from(v.rev_nat_index));
            } else {
                p.slots.push(v.backend_id);
            }
        }
        if !self.programmed.is_empty() {
            tracing::info!(
                services = self.programmed.len(),
                backends = self.backend_ids.len(),
                "load balancer state restored from pinned maps"
            );
        }
    }

    /// Makes the maps match `desired`. Frontends and backends nobody wants any more are only
    /// removed when `delete_stale` is set, i.e. after the first full sync of every source:
    /// until then restored state keeps serving.
    pub fn sync(
        &mut self,
        desired: &BTreeMap<Frontend, DesiredService>,
        delete_stale: bool,
    ) -> LbSyncReport {
        let mut report = LbSyncReport::default();
        for (f, want) in desired {
            if let Err(e) = self.program(f, want, &mut report) {
                report.failed.push((*f, e.to_string()));
            }
        }
        if delete_stale {
            let stale: Vec<Frontend> = self
                .programmed
                .keys()
                .filter(|f| !desired.contains_key(f))
                .copied()
                .collect();
            for f in stale {
                self.remove(&f, &mut report);
            }
            self.collect_backends(&mut report);
        }
        report.services = self.programmed.len();
        report.backends = self.backend_ids.len();
        report
    }

    fn program(
        &mut self,
        f: &Frontend,
        want: &DesiredService,
        report: &mut LbSyncReport,
    ) -> Result<(), DatapathError> {
        let flags = if want.global { SVC_FLAG_GLOBAL } else { 0 };
        // 1. Backends first: every id a slot will name exists.
        let mut slots = Vec::with_capacity(want.active.len());
        for b in &want.active {
            slots.push(self.ensure_backend(b, BACKEND_STATE_ACTIVE, report)?);
        }
        let mut terminating = Vec::with_capacity(want.terminating.len());
        for b in &want.terminating {
            if !want.active.contains(b) {
                terminating.push(self.ensure_backend(b, BACKEND_STATE_TERMINATING, report)?);
            }
        }
        if slots.len() > usize::from(u16::MAX) {
            return Err(DatapathError::Config(format!(
                "{} backends exceed the 65535 slots of a service",
                slots.len()
            )));
        }
        let old = self.programmed.get(f).cloned();
        // 2. The rev-nat entry, before the frontend can translate anything.
        let rev_nat = match &old {
            Some(p) => p.rev_nat,
            None => {
                let max = self.sizes.lb_revnat.min(u32::from(u16::MAX));
                let id = self.rev_ids.take(max).ok_or(DatapathError::MapFull {
                    map: names::MAP_LB4_REVNAT,
                    max,
                })? as u16;
                let value = Lb4RevNat {
                    address: u32::from_ne_bytes(f.address.octets()),
                    port: f.port.to_be(),
                    pad: [0; 2],
                };
                if let Err(e) = self.revnat.insert(id, value, 0) {
                    self.rev_ids.free(u32::from(id));
                    return Err(DatapathError::map(names::MAP_LB4_REVNAT, max, e));
                }
                report.writes += 1;
                id
            }
        };
        let old_slots = old.as_ref().map(|p| p.slots.clone()).unwrap_or_default();
        // Record what exists so far, so a failure part-way still lets cleanup find it.
        let entry = self.programmed.entry(*f).or_insert_with(|| Programmed {
            rev_nat,
            ..Default::default()
        });
        entry.terminating = terminating;
        // 3. Slots, in place; each overwrite swaps one valid backend for another.
        for (i, id) in slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                let value = Lb4Service {
                    backend_id: *id,
                    ..Default::default()
                };
                self.services
                    .insert(key(f, i as u16 + 1), value, 0)
                    .map_err(|e| {
                        DatapathError::map(names::MAP_LB4_SERVICES, self.sizes.lb_services, e)
                    })?;
                report.writes += 1;
            }
        }
        // 4. The frontend: one atomic write switches to the new set.
        let unchanged = old
            .as_ref()
            .is_some_and(|p| p.slots.len() == slots.len() && p.flags == flags);
        if !unchanged {
            let value = Lb4Service {
                backend_id: 0,
                count: slots.len() as u16,
                rev_nat_index: rev_nat,
                flags,
                pad: [0; 3],
            };
            self.services.insert(key(f, 0), value, 0).map_err(|e| {
                DatapathError::map(names::MAP_LB4_SERVICES, self.sizes.lb_services, e)
            })?;
            report.writes += 1;
        }
        // 5. Slots the new count no longer covers.
        for i in slots.len()..old_slots.len() {
            let _ = self.services.remove(&key(f, i as u16 + 1));
            report.deletes += 1;
        }
        let entry = self.programmed.get_mut(f).expect("inserted above");
        entry.slots = slots;
        entry.flags = flags;
        Ok(())
    }

    fn ensure_backend(
        &mut self,
        b: &BackendAddr,
        state: u8,
        report: &mut LbSyncReport,
    ) -> Result<u32, DatapathError> {
        let max = self.sizes.lb_backends;
        let id = match self.backend_ids.get(b) {
            Some(id) => *id,
            None => self.ids.take(max).ok_or(DatapathError::MapFull {
                map: names::MAP_LB4_BACKENDS,
                max,
            })?,
        };
        let value = Lb4Backend {
            address: u32::from_ne_bytes(b.address.octets()),
            port: b.port.to_be(),
            proto: b.proto,
            state,
            cluster_id: b.cluster_id,
            pad: [0; 2],
        };
        if self.backend_values.get(&id) != Some(&value) {
            if let Err(e) = self.backends.insert(id, value, 0) {
                if !self.backend_ids.contains_key(b) {
                    self.ids.free(id);
                }
                return Err(DatapathError::map(names::MAP_LB4_BACKENDS, max, e));
            }
            report.writes += 1;
            self.backend_ids.insert(*b, id);
            self.backend_values.insert(id, value);
        }
        Ok(id)
    }

    fn remove(&mut self, f: &Frontend, report: &mut LbSyncReport) {
        let Some(p) = self.programmed.remove(f) else {
            return;
        };
        // Frontend first: the programs stop translating before anything else goes.
        let _ = self.services.remove(&key(f, 0));
        for i in 0..p.slots.len() {
            let _ = self.services.remove(&key(f, i as u16 + 1));
        }
        let _ = self.revnat.remove(&p.rev_nat);
        self.rev_ids.free(u32::from(p.rev_nat));
        report.deletes += 2 + p.slots.len();
    }

    fn collect_backends(&mut self, report: &mut LbSyncReport) {
        let referenced: std::collections::HashSet<u32> = self
            .programmed
            .values()
            .flat_map(|p| p.slots.iter().chain(&p.terminating))
            .copied()
            .collect();
        let unused: Vec<(BackendAddr, u32)> = self
            .backend_ids
            .iter()
            .filter(|(_, id)| !referenced.contains(id))
            .map(|(b, id)| (*b, *id))
            .collect();
        for (b, id) in unused {
            let _ = self.backends.remove(&id);
            self.backend_ids.remove(&b);
            self.backend_values.remove(&id);
            self.ids.free(id);
            report.deletes += 1;
        }
    }
}

fn backend_addr(b: &Lb4Backend) -> BackendAddr {
    BackendAddr {
        address: Ipv4Addr::from(b.address.to_ne_bytes()),
        port: u16::from_be(b.port),
        proto: b.proto,
        cluster_id: b.cluster_id,
    }
}

/// One service as read back from the maps (`strait bpf lb list`).
#[derive(Debug, Clone, Serialize)]
pub struct LbListEntry {
    pub frontend: Frontend,
    pub rev_nat: u16,
    pub global: bool,
    pub backends: Vec<LbListBackend>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LbListBackend {
    pub slot: u16,
    pub id: u32,
    pub backend: Option<BackendAddr>,
    pub state: &'static str,
}

/// Reads the lb4 maps back into a listing (works on pinned maps while the agent runs).
pub fn list(services: Map, backends: Map) -> Result<Vec<LbListEntry>, DatapathError> {
    let services: BpfHashMap<MapData, Lb4Key, Lb4Service> =
        typed(services, names::MAP_LB4_SERVICES)?;
    let backends: BpfHashMap<MapData, u32, Lb4Backend> = typed(backends, names::MAP_LB4_BACKENDS)?;
    let mut by_frontend: BTreeMap<Frontend, LbListEntry> = BTreeMap::new();
    let mut entries: Vec<(Lb4Key, Lb4Service)> = services.iter().flatten().collect();
    entries.sort_by_key(|(k, _)| k.backend_slot);
    for (k, v) in entries {
        let frontend = Frontend {
            address: Ipv4Addr::from(k.address.to_ne_bytes()),
            port: u16::from_be(k.dport),
            proto: k.proto,
        };
        let entry = by_frontend.entry(frontend).or_insert(LbListEntry {
            frontend,
            rev_nat: 0,
            global: false,
            backends: Vec::new(),
        });
        if k.backend_slot == 0 {
            entry.rev_nat = v.rev_nat_index;
            entry.global = v.flags & SVC_FLAG_GLOBAL != 0;
        } else {
            let b = backends.get(&v.backend_id, 0).ok();
            entry.backends.push(LbListBackend {
                slot: k.backend_slot,
                id: v.backend_id,
                backend: b.as_ref().map(backend_addr),
                state: match b.map(|b| b.state) {
                    Some(BACKEND_STATE_ACTIVE) => "active",
                    Some(BACKEND_STATE_TERMINATING) => "terminating",
                    _ => "missing",
                },
            });
        }
    }
    Ok(by_frontend.into_values().collect())
}
