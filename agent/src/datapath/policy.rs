//! The policy writer: local endpoints (by host-side ifindex) and their policy entries, plus
//! the conntrack listing.
//!
//! The datapath does two LPM lookups per new flow (exact remote identity, then identity 0)
//! and lets a deny in either win. Within one identity the LPM returns only the most specific
//! entry, so an allow that a broader deny of the same identity covers is written as a deny
//! here ([`map_entries`]); the result matches [`EndpointPolicy::allows`] exactly (tested).

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

use super::DatapathError;
use crate::policy::{Direction, EndpointPolicy};

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

/// The (identity, direction, proto, port) → deny? entries for one endpoint, with deny
/// precedence resolved so the two-lookup datapath gives `EndpointPolicy::allows`' verdict.
pub fn map_entries(policy: &EndpointPolicy) -> BTreeMap<(u32, u8, u8, u16), bool> {
    let mut out: BTreeMap<(u32, u8, u8, u16), bool> = BTreeMap::new();
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
    let denies: Vec<(u32, u8, u8, u16)> = out
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

fn policy_key(
    ifindex: u32,
    (identity, direction, proto, port): (u32, u8, u8, u16),
) -> Key<PolicyKey> {
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
        pad: 0,
    }
}

#[derive(Debug, Default)]
struct Programmed {
    info: EndpointInfo,
    entries: BTreeMap<(u32, u8, u8, u16), bool>,
}

/// Owner of the `ENDPOINTS` and `POLICY` maps.
pub struct PolicyWriter {
    endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    max_policy: u32,
    max_endpoints: u32,
    programmed: BTreeMap<u32, Programmed>,
}

impl PolicyWriter {
    pub fn new(
        endpoints: Map,
        policy: Map,
        max_endpoints: u32,
        max_policy: u32,
    ) -> Result<Self, DatapathError> {
        let endpoints = BpfHashMap::try_from(endpoints).map_err(|source| DatapathError::Map {
            name: names::MAP_ENDPOINTS,
            source,
        })?;
        let policy = LpmTrie::try_from(policy).map_err(|source| DatapathError::Map {
            name: names::MAP_POLICY,
            source,
        })?;
        let mut w = Self {
            endpoints,
            policy,
            max_policy,
            max_endpoints,
            programmed: BTreeMap::new(),
        };
        // Restore (pinned maps): keep serving what a previous agent wrote, diff against it.
        for (ifindex, info) in w.endpoints.iter().flatten() {
            w.programmed.entry(ifindex).or_default().info = info;
        }
        for (k, v) in w.policy.iter().flatten() {
            let d = k.data();
            w.programmed.entry(d.endpoint).or_default().entries.insert(
                (d.identity, d.direction, d.proto, u16::from_be(d.dport)),
                v.flags & POLICY_FLAG_DENY != 0,
            );
        }
        Ok(w)
    }

    /// Programs one endpoint. New entries go in before the endpoint's enforcement flags
    /// change, and stale entries go after, so a tightening never opens a gap.
    pub fn set_endpoint(&mut self, spec: &EndpointSpec) -> Result<(), DatapathError> {
        let want = map_entries(&spec.policy);
        let info = endpoint_info(spec);
        let existed = self.programmed.contains_key(&spec.ifindex);
        let old = self.programmed.remove(&spec.ifindex).unwrap_or_default();
        let mut done = Programmed {
            info: old.info,
            entries: old.entries.clone(),
        };
        let result = (|| {
            for (k, deny) in &want {
                if old.entries.get(k) == Some(deny) {
                    continue;
                }
                let value = PolicyValue {
                    flags: if *deny { POLICY_FLAG_DENY } else { 0 },
                    pad: 0,
                };
                self.policy
                    .insert(&policy_key(spec.ifindex, *k), value, 0)
                    .map_err(|e| DatapathError::map(names::MAP_POLICY, self.max_policy, e))?;
                done.entries.insert(*k, *deny);
            }
            if old.info != info || !existed {
                self.endpoints
                    .insert(spec.ifindex, info, 0)
                    .map_err(|e| DatapathError::map(names::MAP_ENDPOINTS, self.max_endpoints, e))?;
                done.info = info;
            }
            for k in old.entries.keys().filter(|k| !want.contains_key(k)) {
                let _ = self.policy.remove(&policy_key(spec.ifindex, *k));
                done.entries.remove(k);
            }
            Ok(())
        })();
        self.programmed.insert(spec.ifindex, done);
        result
    }

    /// Forgets an endpoint: it stops being enforced first, then its entries go.
    pub fn remove_endpoint(&mut self, ifindex: u32) {
        let _ = self.endpoints.remove(&ifindex);
        if let Some(p) = self.programmed.remove(&ifindex) {
            for k in p.entries.keys() {
                let _ = self.policy.remove(&policy_key(ifindex, *k));
            }
        }
    }

    /// Endpoints currently programmed (ifindex).
    pub fn endpoints(&self) -> impl Iterator<Item = u32> + '_ {
        self.programmed.keys().copied()
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
