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

use super::{
    DatapathError, MapSizes,
    mirror::{self, KernelHash, KernelMap, MapMirror, Op},
};
use crate::{
    metrics::Metrics,
    state::{Protocol, SelectedBackend, ServiceView},
};

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

/// What one frontend's entry covers.
#[derive(Debug, Clone, Default)]
struct Programmed {
    rev_nat: u16,
    /// Backend ids of the slots the frontend's count covers, in slot order.
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

/// LB4_SERVICES keyed by (frontend, slot); slot 0 is the frontend's own entry.
struct ServiceMap {
    map: BpfHashMap<MapData, Lb4Key, Lb4Service>,
    max: u32,
}

impl KernelMap for ServiceMap {
    type Key = (Frontend, u16);
    type Value = Lb4Service;
    fn name(&self) -> &'static str {
        names::MAP_LB4_SERVICES
    }
    fn entries(&self) -> Vec<((Frontend, u16), Lb4Service)> {
        self.map
            .iter()
            .flatten()
            .map(|(k, v)| ((frontend_of(&k), k.backend_slot), v))
            .collect()
    }
    fn insert(&mut self, (f, slot): &(Frontend, u16), v: &Lb4Service) -> Result<(), DatapathError> {
        self.map
            .insert(key(f, *slot), v, 0)
            .map_err(|e| DatapathError::map(names::MAP_LB4_SERVICES, self.max, e))
    }
    fn remove(&mut self, (f, slot): &(Frontend, u16)) -> Result<(), DatapathError> {
        mirror::absent_ok(self.map.remove(&key(f, *slot)))
            .map_err(|e| DatapathError::map(names::MAP_LB4_SERVICES, self.max, e))
    }
}

/// Owner of the three lb4 maps.
pub struct LbWriter {
    services: MapMirror<ServiceMap>,
    backends: MapMirror<KernelHash<u32, Lb4Backend>>,
    revnat: MapMirror<KernelHash<u16, Lb4RevNat>>,
    sizes: MapSizes,
    programmed: BTreeMap<Frontend, Programmed>,
    backend_ids: HashMap<BackendAddr, u32>,
    ids: Ids,
    rev_ids: Ids,
    /// The last sync left a frontend unprogrammed (it is retried).
    unprogrammed: bool,
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

fn frontend_of(k: &Lb4Key) -> Frontend {
    Frontend {
        address: Ipv4Addr::from(k.address.to_ne_bytes()),
        port: u16::from_be(k.dport),
        proto: k.proto,
    }
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
        let services = ServiceMap {
            map: typed(services, names::MAP_LB4_SERVICES)?,
            max: sizes.lb_services,
        };
        let backends = KernelHash::new(backends, names::MAP_LB4_BACKENDS, sizes.lb_backends)?;
        let revnat = KernelHash::new(revnat, names::MAP_LB4_REVNAT, sizes.lb_revnat)?;
        let mut w = Self {
            services: MapMirror::new(services),
            backends: MapMirror::new(backends),
            revnat: MapMirror::new(revnat),
            sizes,
            programmed: BTreeMap::new(),
            backend_ids: HashMap::new(),
            ids: Ids::default(),
            rev_ids: Ids::default(),
            unprogrammed: false,
        };
        w.restore();
        Ok(w)
    }

    /// Counts map errors in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.services = self.services.with_metrics(metrics);
        self.backends = self.backends.with_metrics(metrics);
        self.revnat = self.revnat.with_metrics(metrics);
        self
    }

    /// Whether something failed last time and waits for a retry.
    pub fn pending(&self) -> bool {
        self.unprogrammed
            || self.services.pending()
            || self.backends.pending()
            || self.revnat.pending()
    }

    fn restore(&mut self) {
        for (id, b) in self.backends.programmed() {
            self.backend_ids.insert(backend_addr(b), *id);
            self.ids.mark(*id);
        }
        // In key order: each frontend's slots come in slot order.
        for ((f, slot), v) in self.services.programmed() {
            let p = self.programmed.entry(*f).or_default();
            if *slot == 0 {
                p.rev_nat = v.rev_nat_index;
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
    /// until then restored state keeps serving. Deletes that failed are retried here.
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
            self.collect(&mut report);
        }
        // Each of these deletes was safe when it was decided (nothing names the entry).
        report.deletes += self.services.retry_deletes()
            + self.revnat.retry_deletes()
            + self.backends.retry_deletes();
        self.services.finish_pass(|_| true);
        self.revnat.finish_pass(|_| true);
        self.backends.finish_pass(|_| true);
        self.unprogrammed = !report.failed.is_empty();
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
        // 2. The rev-nat entry, before the frontend can translate anything.
        let rev_nat = match self.programmed.get(f) {
            Some(p) => p.rev_nat,
            None => {
                let max = self.sizes.lb_revnat.min(u32::from(u16::MAX));
                let Some(id) = self.rev_ids.take(max) else {
                    self.revnat.count_error(Op::Update);
                    return Err(DatapathError::MapFull {
                        map: names::MAP_LB4_REVNAT,
                        max,
                    });
                };
                let id = id as u16;
                let value = Lb4RevNat {
                    address: u32::from_ne_bytes(f.address.octets()),
                    port: f.port.to_be(),
                    pad: [0; 2],
                };
                if let Err(e) = self.revnat.write(id, value) {
                    self.rev_ids.free(u32::from(id));
                    return Err(e);
                }
                report.writes += 1;
                id
            }
        };
        // Record what exists so far, so a failure part-way still lets cleanup find it.
        let entry = self.programmed.entry(*f).or_insert_with(|| Programmed {
            rev_nat,
            ..Default::default()
        });
        entry.terminating = terminating;
        // 3. Slots, in place; each overwrite swaps one valid backend for another.
        for (i, id) in slots.iter().enumerate() {
            let value = Lb4Service {
                backend_id: *id,
                ..Default::default()
            };
            report.writes += usize::from(self.services.write((*f, i as u16 + 1), value)?);
        }
        // 4. The frontend: one atomic write switches to the new set.
        let value = Lb4Service {
            backend_id: 0,
            count: slots.len() as u16,
            rev_nat_index: rev_nat,
            flags,
            pad: [0; 3],
        };
        report.writes += usize::from(self.services.write((*f, 0), value)?);
        // 5. Slots the new count no longer covers (a failed delete stays pending).
        for k in self.slot_keys(f, slots.len() + 1) {
            report.deletes += usize::from(self.services.delete(&k).unwrap_or(false));
        }
        self.programmed.get_mut(f).expect("inserted above").slots = slots;
        Ok(())
    }

    /// The programmed slot keys of `f` from slot `first` on.
    fn slot_keys(&self, f: &Frontend, first: usize) -> Vec<(Frontend, u16)> {
        let Ok(first) = u16::try_from(first) else {
            return Vec::new();
        };
        self.services
            .programmed()
            .range((*f, first)..=(*f, u16::MAX))
            .map(|(k, _)| *k)
            .collect()
    }

    fn ensure_backend(
        &mut self,
        b: &BackendAddr,
        state: u8,
        report: &mut LbSyncReport,
    ) -> Result<u32, DatapathError> {
        let max = self.sizes.lb_backends;
        let known = self.backend_ids.get(b).copied();
        let id = match known.or_else(|| self.ids.take(max)) {
            Some(id) => id,
            None => {
                self.backends.count_error(Op::Update);
                return Err(DatapathError::MapFull {
                    map: names::MAP_LB4_BACKENDS,
                    max,
                });
            }
        };
        let value = Lb4Backend {
            address: u32::from_ne_bytes(b.address.octets()),
            port: b.port.to_be(),
            proto: b.proto,
            state,
            cluster_id: b.cluster_id,
            pad: [0; 2],
        };
        match self.backends.write(id, value) {
            Ok(written) => {
                report.writes += usize::from(written);
                self.backend_ids.insert(*b, id);
                Ok(id)
            }
            Err(e) => {
                if known.is_none() {
                    self.ids.free(id);
                }
                Err(e)
            }
        }
    }

    fn remove(&mut self, f: &Frontend, report: &mut LbSyncReport) {
        // Frontend first: the programs stop translating before anything else goes. While
        // that delete fails the frontend stays, and its removal is retried next sync.
        match self.services.delete(&(*f, 0)) {
            Ok(deleted) => report.deletes += usize::from(deleted),
            Err(_) => return,
        }
        let Some(p) = self.programmed.remove(f) else {
            return;
        };
        // Failed deletes below stay pending in the mirrors (retried at the end of a sync).
        for k in self.slot_keys(f, 1) {
            report.deletes += usize::from(self.services.delete(&k).unwrap_or(false));
        }
        report.deletes += usize::from(self.revnat.delete(&p.rev_nat).unwrap_or(false));
        self.rev_ids.free(u32::from(p.rev_nat));
    }

    /// Backends no frontend names, and rev-nat entries no frontend uses (left by an earlier
    /// agent).
    fn collect(&mut self, report: &mut LbSyncReport) {
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
            // A failed delete stays pending in the mirror; the id is free either way (a
            // backend that takes it overwrites the entry).
            report.deletes += usize::from(self.backends.delete(&id).unwrap_or(false));
            self.backend_ids.remove(&b);
            self.ids.free(id);
        }
        let used: std::collections::HashSet<u16> =
            self.programmed.values().map(|p| p.rev_nat).collect();
        let orphans: Vec<u16> = self
            .revnat
            .programmed()
            .keys()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        for id in orphans {
            report.deletes += usize::from(self.revnat.delete(&id).unwrap_or(false));
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
        let frontend = frontend_of(&k);
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
