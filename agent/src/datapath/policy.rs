//! The policy writer: local endpoints (by host-side ifindex) and their policy entries, plus
//! the conntrack listing.
//!
//! The datapath does two LPM lookups per new flow (exact remote identity, then identity 0)
//! and lets a deny in either win. Within one identity the LPM returns only the most specific
//! entry, so an allow that a broader deny of the same identity covers is written as a deny
//! here ([`map_entries`]); the result matches [`EndpointPolicy::allows`] exactly (tested).
//!
//! Conntrack follows policy through a per-endpoint revision: a change that could deny a flow
//! allowed before gives the endpoint a new revision, and the datapath checks each
//! established flow of the endpoint again at its next packet (allowed: the entry takes the
//! revision; denied: the entry goes). Chosen over scanning the conntrack table from here
//! after each change: it takes effect at the next packet whatever the table's size, and
//! packets of unchanged policy cost no extra map write.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use aya::maps::{
    HashMap as BpfHashMap, Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use serde::Serialize;
use strait_common::{
    names,
    policy::{
        CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, EP_FLAG_EGRESS_ENFORCED, EP_FLAG_INGRESS_ENFORCED,
        EndpointInfo, POLICY_FLAG_DENY, PolicyKey, PolicyValue, policy_prefix_len,
    },
};

use super::{
    DatapathError,
    mirror::{self, KernelHash, KernelMap, MapMirror},
};
use crate::{
    metrics::Metrics,
    policy::{Direction, EndpointPolicy},
};

/// A local endpoint as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Host-side interface index of the pod's veth.
    pub ifindex: u32,
    pub address: Ipv4Addr,
    pub identity: u32,
    pub policy: EndpointPolicy,
}

fn dir(d: Direction) -> u8 {
    match d {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

/// A policy entry's key: (identity, direction, proto, port).
pub type EntryKey = (u32, u8, u8, u16);

/// The (identity, direction, proto, port) → deny? entries for one endpoint, with deny
/// precedence resolved so the two-lookup datapath gives `EndpointPolicy::allows`' verdict.
pub fn map_entries(policy: &EndpointPolicy) -> BTreeMap<EntryKey, bool> {
    let mut out: BTreeMap<EntryKey, bool> = BTreeMap::new();
    for e in &policy.entries {
        let (proto, port) = if e.protocol == 0 {
            (0, 0)
        } else {
            (e.protocol, e.port)
        };
        let slot = out
            .entry((e.identity, dir(e.direction), proto, port))
            .or_insert(false);
        *slot |= e.deny;
    }
    let denies: Vec<EntryKey> = out
        .iter()
        .filter(|(_, deny)| **deny)
        .map(|(k, _)| *k)
        .collect();
    for (k, deny) in out.iter_mut() {
        if *deny {
            continue;
        }
        let (identity, direction, proto, port) = *k;
        *deny = denies.iter().any(|&(di, dd, dp, dport)| {
            di == identity
                && dd == direction
                && (dp == 0 || dp == proto)
                && (dport == 0 || dport == port)
        });
    }
    out
}

fn policy_key(ifindex: u32, (identity, direction, proto, port): EntryKey) -> Key<PolicyKey> {
    Key::new(
        policy_prefix_len(proto, port),
        PolicyKey {
            endpoint: ifindex,
            identity,
            direction,
            proto,
            dport: port.to_be(),
        },
    )
}

/// The POLICY trie keyed by (endpoint ifindex, entry), valued deny?.
struct PolicyMap {
    map: LpmTrie<MapData, PolicyKey, PolicyValue>,
    max: u32,
}

impl KernelMap for PolicyMap {
    type Key = (u32, EntryKey);
    type Value = bool;
    fn name(&self) -> &'static str {
        names::MAP_POLICY
    }
    fn entries(&self) -> Vec<((u32, EntryKey), bool)> {
        self.map
            .iter()
            .flatten()
            .map(|(k, v)| {
                let d = k.data();
                (
                    (
                        d.endpoint,
                        (d.identity, d.direction, d.proto, u16::from_be(d.dport)),
                    ),
                    v.flags & POLICY_FLAG_DENY != 0,
                )
            })
            .collect()
    }
    fn insert(
        &mut self,
        (ifindex, entry): &(u32, EntryKey),
        deny: &bool,
    ) -> Result<(), DatapathError> {
        let value = PolicyValue {
            flags: if *deny { POLICY_FLAG_DENY } else { 0 },
            pad: 0,
        };
        self.map
            .insert(&policy_key(*ifindex, *entry), value, 0)
            .map_err(|e| DatapathError::map(names::MAP_POLICY, self.max, e))
    }
    fn remove(&mut self, (ifindex, entry): &(u32, EntryKey)) -> Result<(), DatapathError> {
        mirror::absent_ok(self.map.remove(&policy_key(*ifindex, *entry)))
            .map_err(|e| DatapathError::map(names::MAP_POLICY, self.max, e))
    }
}

fn endpoint_info(spec: &EndpointSpec) -> EndpointInfo {
    let mut flags = 0;
    if spec.policy.ingress_enforced {
        flags |= EP_FLAG_INGRESS_ENFORCED;
    }
    if spec.policy.egress_enforced {
        flags |= EP_FLAG_EGRESS_ENFORCED;
    }
    EndpointInfo {
        identity: spec.identity,
        address: u32::from_ne_bytes(spec.address.octets()),
        flags,
        policy_revision: 0,
    }
}

/// Owner of the `ENDPOINTS` and `POLICY` maps.
pub struct PolicyWriter {
    endpoints: MapMirror<KernelHash<u32, EndpointInfo>>,
    policy: MapMirror<PolicyMap>,
    /// The last policy revision given out. Revisions are unique across endpoints (an
    /// interface index a new pod reuses never inherits old conntrack entries' revision) and
    /// continue from what a previous agent left in the pinned map.
    revision: u32,
}

impl PolicyWriter {
    /// Takes the maps, adopting what a previous agent wrote (pinned maps): it keeps serving
    /// and is diffed against.
    pub fn new(
        endpoints: Map,
        policy: Map,
        max_endpoints: u32,
        max_policy: u32,
    ) -> Result<Self, DatapathError> {
        let endpoints: KernelHash<u32, EndpointInfo> =
            KernelHash::new(endpoints, names::MAP_ENDPOINTS, max_endpoints)?;
        let policy = PolicyMap {
            map: LpmTrie::try_from(policy).map_err(|source| DatapathError::Map {
                name: names::MAP_POLICY,
                source,
            })?,
            max: max_policy,
        };
        let endpoints = MapMirror::new(endpoints);
        let revision = endpoints
            .programmed()
            .values()
            .map(|i| i.policy_revision)
            .max()
            .unwrap_or(0);
        Ok(Self {
            endpoints,
            policy: MapMirror::new(policy),
            revision,
        })
    }

    /// A revision no endpoint or conntrack entry has (0 is never given out: it is what an
    /// entry written without one holds).
    fn next_revision(&mut self) -> u32 {
        self.revision = self.revision.wrapping_add(1).max(1);
        self.revision
    }

    /// Counts map errors in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.endpoints = self.endpoints.with_metrics(metrics);
        self.policy = self.policy.with_metrics(metrics);
        self
    }

    /// Programs one endpoint. New entries go in before the endpoint's enforcement flags
    /// change, and stale entries go after, so a tightening never opens a gap. A change that
    /// could deny what was allowed (an allow gone, a deny added, a direction newly enforced)
    /// then gives the endpoint a new policy revision, last, so established flows are checked
    /// again against the complete new entries; a change that only widens does not. An error
    /// means the endpoint is not programmed as asked (a stale entry that could not be
    /// deleted among them): calling again retries.
    pub fn set_endpoint(&mut self, spec: &EndpointSpec) -> Result<(), DatapathError> {
        self.retry_deletes();
        let ifindex = spec.ifindex;
        let result = self.program(ifindex, &map_entries(&spec.policy), endpoint_info(spec));
        self.finish_pass(ifindex);
        result
    }

    fn program(
        &mut self,
        ifindex: u32,
        want: &BTreeMap<EntryKey, bool>,
        info: EndpointInfo,
    ) -> Result<(), DatapathError> {
        let old = self.endpoints.programmed().get(&ifindex).copied();
        let newly_enforced = old.is_some_and(|o| info.flags & !o.flags != 0);
        let mut narrowed = newly_enforced;
        for (k, deny) in want {
            narrowed |= self.policy.write((ifindex, *k), *deny)? && *deny;
        }
        // Established flows keep their revision until the stale entries are gone too; a new
        // endpoint starts on a revision of its own.
        let revision = match old {
            Some(o) => o.policy_revision,
            None => self.next_revision(),
        };
        self.endpoints.write(
            ifindex,
            EndpointInfo {
                policy_revision: revision,
                ..info
            },
        )?;
        let stale: Vec<((u32, EntryKey), bool)> = self
            .entries_of(ifindex)
            .filter(|(_, k)| !want.contains_key(k))
            .map(|k| (k, self.policy.programmed()[&k]))
            .collect();
        // Every stale entry is tried; a failed one stays pending.
        let mut result = Ok(());
        for (k, deny) in stale {
            match self.policy.delete(&k) {
                Ok(deleted) => narrowed |= deleted && !deny,
                Err(e) => result = result.and(Err(e)),
            }
        }
        if narrowed && old.is_some() {
            let revision = self.next_revision();
            self.endpoints.write(
                ifindex,
                EndpointInfo {
                    policy_revision: revision,
                    ..info
                },
            )?;
        }
        result
    }

    /// The policy revision `ifindex` is programmed with (tests, `strait bpf policy list`).
    pub fn revision(&self, ifindex: u32) -> Option<u32> {
        self.endpoints
            .programmed()
            .get(&ifindex)
            .map(|i| i.policy_revision)
    }

    /// Forgets an endpoint: it stops being enforced first, then its entries go. A delete
    /// that fails stays pending and is retried by the next call of either method.
    pub fn remove_endpoint(&mut self, ifindex: u32) {
        self.retry_deletes();
        let _ = self.endpoints.delete(&ifindex);
        let entries: Vec<(u32, EntryKey)> = self.entries_of(ifindex).collect();
        for k in entries {
            let _ = self.policy.delete(&k);
        }
        self.finish_pass(ifindex);
    }

    /// Every endpoint the maps hold something for (ENDPOINTS entries and POLICY entries,
    /// adopted from a previous agent among them), with its address when it has an ENDPOINTS
    /// entry.
    pub fn held(&self) -> BTreeMap<u32, Option<Ipv4Addr>> {
        let mut out: BTreeMap<u32, Option<Ipv4Addr>> = self
            .endpoints
            .programmed()
            .iter()
            .map(|(i, info)| (*i, Some(Ipv4Addr::from(info.address.to_ne_bytes()))))
            .collect();
        for (ifindex, _) in self.policy.programmed().keys() {
            out.entry(*ifindex).or_insert(None);
        }
        out
    }

    /// Endpoints currently programmed (ifindex).
    pub fn endpoints(&self) -> impl Iterator<Item = u32> + '_ {
        self.endpoints.programmed().keys().copied()
    }

    fn entries_of(&self, ifindex: u32) -> impl Iterator<Item = (u32, EntryKey)> + '_ {
        self.policy
            .programmed()
            .range((ifindex, (0, 0, 0, 0))..=(ifindex, (u32::MAX, u8::MAX, u8::MAX, u16::MAX)))
            .map(|(k, _)| *k)
    }

    /// Whether a write or delete that failed is waiting to be retried.
    pub fn pending(&self) -> bool {
        self.endpoints.pending() || self.policy.pending()
    }

    /// Deletes that failed earlier, endpoints before entries (as in `remove_endpoint`).
    pub fn retry_deletes(&mut self) {
        self.endpoints.retry_deletes();
        self.policy.retry_deletes();
    }

    /// A call touches one endpoint's keys: only their failure streaks end with it.
    fn finish_pass(&mut self, ifindex: u32) {
        self.endpoints.finish_pass(|k| *k == ifindex);
        self.policy.finish_pass(|k| k.0 == ifindex);
    }
}

/// One endpoint's policy as read back (`strait bpf policy list`).
#[derive(Debug, Clone, Serialize)]
pub struct PolicyListing {
    pub endpoint: u32,
    pub address: Ipv4Addr,
    pub identity: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub policy_revision: u32,
    pub entries: Vec<PolicyListEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyListEntry {
    pub direction: &'static str,
    pub identity: u32,
    pub proto: u8,
    pub port: u16,
    pub verdict: &'static str,
}

/// Reads endpoints and their entries back from the maps.
pub fn list(endpoints: Map, policy: Map) -> Result<Vec<PolicyListing>, DatapathError> {
    let endpoints: BpfHashMap<MapData, u32, EndpointInfo> = BpfHashMap::try_from(endpoints)
        .map_err(|source| DatapathError::Map {
            name: names::MAP_ENDPOINTS,
            source,
        })?;
    let policy: LpmTrie<MapData, PolicyKey, PolicyValue> =
        LpmTrie::try_from(policy).map_err(|source| DatapathError::Map {
            name: names::MAP_POLICY,
            source,
        })?;
    let mut out: BTreeMap<u32, PolicyListing> = endpoints
        .iter()
        .flatten()
        .map(|(ifindex, info)| {
            (
                ifindex,
                PolicyListing {
                    endpoint: ifindex,
                    address: Ipv4Addr::from(info.address.to_ne_bytes()),
                    identity: info.identity,
                    ingress_enforced: info.flags & EP_FLAG_INGRESS_ENFORCED != 0,
                    egress_enforced: info.flags & EP_FLAG_EGRESS_ENFORCED != 0,
                    policy_revision: info.policy_revision,
                    entries: Vec::new(),
                },
            )
        })
        .collect();
    for (k, v) in policy.iter().flatten() {
        let d = k.data();
        if let Some(l) = out.get_mut(&d.endpoint) {
            l.entries.push(PolicyListEntry {
                direction: if d.direction == DIR_INGRESS {
                    "ingress"
                } else {
                    "egress"
                },
                identity: d.identity,
                proto: d.proto,
                port: u16::from_be(d.dport),
                verdict: if v.flags & POLICY_FLAG_DENY != 0 {
                    "deny"
                } else {
                    "allow"
                },
            });
        }
    }
    for l in out.values_mut() {
        l.entries
            .sort_by_key(|e| (e.direction, e.identity, e.proto, e.port));
    }
    Ok(out.into_values().collect())
}

/// One conntrack entry as read back (`strait bpf ct list`).
#[derive(Debug, Clone, Serialize)]
pub struct CtListEntry {
    pub endpoint: u32,
    pub direction: &'static str,
    pub proto: u8,
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
    pub packets: u32,
    pub reply_packets: u32,
    pub remote_identity: u32,
    /// The endpoint's policy revision the flow was last allowed under.
    pub policy_revision: u32,
    /// Seconds since the last packet (kernel monotonic clock).
    pub idle_seconds: u64,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC is bpf_ktime_get_ns' clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ct_map(map: Map) -> Result<BpfHashMap<MapData, CtKey, CtValue>, DatapathError> {
    BpfHashMap::try_from(map).map_err(|source| DatapathError::Map {
        name: names::MAP_CT,
        source,
    })
}

pub fn ct_list(map: Map) -> Result<Vec<CtListEntry>, DatapathError> {
    let map = ct_map(map)?;
    let now = monotonic_ns();
    let addr = |a: u32, p: u16| {
        std::net::SocketAddrV4::new(Ipv4Addr::from(a.to_ne_bytes()), u16::from_be(p))
    };
    let mut out: Vec<CtListEntry> = map
        .iter()
        .flatten()
        .map(|(k, v)| CtListEntry {
            endpoint: k.endpoint,
            direction: if k.direction == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            proto: k.proto,
            src: addr(k.saddr, k.sport),
            dst: addr(k.daddr, k.dport),
            packets: v.packets,
            reply_packets: v.reply_packets,
            remote_identity: v.remote_identity,
            policy_revision: v.policy_revision,
            idle_seconds: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        })
        .collect();
    out.sort_by_key(|e| (e.endpoint, e.src, e.dst));
    Ok(out)
}

/// Deletes conntrack entries idle longer than their protocol's timeout (LRU eviction alone
/// would keep a closed flow's tuple allowed until the table fills). Returns how many.
pub struct CtGc {
    map: BpfHashMap<MapData, CtKey, CtValue>,
}

impl CtGc {
    pub fn new(map: Map) -> Result<Self, DatapathError> {
        Ok(Self { map: ct_map(map)? })
    }

    pub fn collect(&mut self, tcp_idle: Duration, other_idle: Duration) -> usize {
        let now = monotonic_ns();
        let expired: Vec<CtKey> = self
            .map
            .iter()
            .flatten()
            .filter(|(k, v)| {
                let limit = if k.proto == strait_common::IPPROTO_TCP {
                    tcp_idle
                } else {
                    other_idle
                };
                now.saturating_sub(v.last_seen_ns) > limit.as_nanos() as u64
            })
            .map(|(k, _)| k)
            .collect();
        expired
            .iter()
            .filter(|k| self.map.remove(k).is_ok())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyEntry;

    /// Emulates the datapath's two LPM lookups over `map_entries`.
    fn datapath_allows(
        p: &EndpointPolicy,
        d: Direction,
        identity: u32,
        proto: u8,
        port: u16,
    ) -> bool {
        let m = map_entries(p);
        let lookup = |id: u32| {
            [(proto, port), (proto, 0), (0, 0)]
                .into_iter()
                .find_map(|(pr, po)| m.get(&(id, dir(d), pr, po)).copied())
        };
        let (exact, any) = (lookup(identity), lookup(0));
        let enforced = match d {
            Direction::Ingress => p.ingress_enforced,
            Direction::Egress => p.egress_enforced,
        };
        let deny = exact == Some(true) || any == Some(true);
        !deny && (exact.is_some() || any.is_some() || !enforced)
    }

    #[test]
    fn two_lookups_over_resolved_entries_match_the_reference_semantics() {
        let ids = [0u32, 100, 200];
        let protos = [0u8, 6, 17];
        let ports = [0u16, 80, 443];
        let mut all = Vec::new();
        for &identity in &ids {
            for &protocol in &protos {
                for &port in &ports {
                    if protocol == 0 && port != 0 {
                        continue;
                    }
                    for deny in [false, true] {
                        all.push(PolicyEntry {
                            identity,
                            direction: Direction::Ingress,
                            protocol,
                            port,
                            deny,
                        });
                    }
                }
            }
        }
        // Every pair and triple of entries from the grid, checked on every probe.
        let mut policies = 0;
        for i in 0..all.len() {
            for j in i..all.len() {
                for k in [None, Some((i * 7 + j) % all.len())] {
                    let mut p = EndpointPolicy {
                        ingress_enforced: true,
                        ..Default::default()
                    };
                    p.entries.insert(all[i]);
                    p.entries.insert(all[j]);
                    if let Some(k) = k {
                        p.entries.insert(all[k]);
                    }
                    policies += 1;
                    for identity in [100, 200, 300] {
                        for proto in [6, 17] {
                            for port in [80, 443, 8080] {
                                assert_eq!(
                                    datapath_allows(&p, Direction::Ingress, identity, proto, port),
                                    p.allows(Direction::Ingress, identity, proto, port),
                                    "{p:?} identity {identity} proto {proto} port {port}"
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(policies > 1000);
    }
}
