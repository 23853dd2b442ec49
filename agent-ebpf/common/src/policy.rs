//! Identity-aware policy: per-endpoint entries in one LPM trie, the local endpoint table,
//! and stateful connection tracking.
//!
//! The policy key puts the wildcardable fields last (protocol, then port) so one LPM lookup
//! finds the most specific L4 match for a given (endpoint, remote identity, direction); the
//! datapath does that lookup twice — exact identity, then identity 0 (any) — and a deny in
//! either wins. Deny entries that a more specific allow of the same identity would shadow are
//! resolved in userspace (`resolve_deny`) before the entries are written.

/// Data part of the `POLICY` LPM key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Endpoint: the ifindex of the pod's host-side interface.
    pub endpoint: u32,
    /// Remote identity; 0 = any.
    pub identity: u32,
    /// `DIR_INGRESS` / `DIR_EGRESS` (from the pod's point of view).
    pub direction: u8,
    /// IP protocol; 0 = any (then the port is 0 as well).
    pub proto: u8,
    /// Destination port, network byte order; 0 = any.
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

/// Prefix lengths (bits) of the three key shapes.
pub const POLICY_PREFIX_FULL: u32 = 96;
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;

/// Prefix length for an entry: the port and protocol, when 0, are wildcards.
pub const fn policy_prefix_len(proto: u8, dport: u16) -> u32 {
    if proto == 0 {
        POLICY_PREFIX_ANY_PROTO
    } else if dport == 0 {
        POLICY_PREFIX_ANY_PORT
    } else {
        POLICY_PREFIX_FULL
    }
}

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Value of `POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// `POLICY_FLAG_*`.
    pub flags: u32,
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

pub const POLICY_FLAG_DENY: u32 = 1;

/// Value of `ENDPOINTS`, keyed by the host-side ifindex (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub identity: u32,
    /// Pod address, network byte order.
    pub address: u32,
    /// `EP_FLAG_*`.
    pub flags: u32,
    /// Bumped by the agent whenever this endpoint's policy changes. A conntrack entry
    /// remembers the revision it was last checked against; a packet of an entry with another
    /// revision has its flow checked again, so a new deny applies to established flows too.
    pub policy_revision: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 16);

/// An ingress policy selects the endpoint: ingress is default-deny.
pub const EP_FLAG_INGRESS_ENFORCED: u32 = 1;
/// An egress policy selects the endpoint: egress is default-deny.
pub const EP_FLAG_EGRESS_ENFORCED: u32 = 2;

/// Verdict of the two policy lookups (exact identity, any identity): deny wins, then allow,
/// else the default (deny when the direction is enforced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyVerdict {
    Allow,
    DenyRule,
    NoMatch,
}

#[inline(always)]
pub const fn policy_verdict(exact: Option<u32>, any: Option<u32>) -> PolicyVerdict {
    const fn deny(f: Option<u32>) -> bool {
        matches!(f, Some(f) if f & POLICY_FLAG_DENY != 0)
    }
    if deny(exact) || deny(any) {
        PolicyVerdict::DenyRule
    } else if exact.is_some() || any.is_some() {
        PolicyVerdict::Allow
    } else {
        PolicyVerdict::NoMatch
    }
}

/// Key of the `CT4` LRU map: a flow as seen at one endpoint in one direction. The endpoint is
/// part of the key so a flow allowed on the client's egress is still checked on the server's
/// ingress when both pods share a node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub pad: [u8; 2],
    pub endpoint: u32,
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 20);

impl CtKey {
    /// The key a reply of this flow is recorded under: addresses and ports swapped, the other
    /// direction, same endpoint.
    #[inline(always)]
    pub const fn reverse(&self) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            direction: self.direction ^ 1,
            pad: [0; 2],
            endpoint: self.endpoint,
        }
    }
}

/// Value of `CT4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Packets in the flow's own direction and in the reply direction.
    pub packets: u32,
    pub reply_packets: u32,
    /// The remote identity when the flow was allowed.
    pub remote_identity: u32,
    /// The endpoint's `policy_revision` the flow was last allowed under.
    pub policy_revision: u32,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 32);

/// Key of the `FRAG4` LRU map: one fragmented IPv4 datagram as seen at one endpoint in one
/// direction. Only the first fragment carries the L4 header; it leaves its ports here so the
/// later fragments are judged as packets of the same flow (Cilium's `IPV4_FRAG_DATAGRAMS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IPv4 identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub direction: u8,
    pub endpoint: u32,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 16);

/// Value of `FRAG4`: the first fragment's ports, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 4);

pub const DEFAULT_ENDPOINTS_MAX: u32 = 4_096;
pub const DEFAULT_POLICY_MAX: u32 = 262_144;
pub const DEFAULT_CT_MAX: u32 = 262_144;
/// Datagrams in flight in fragments (an LRU: a lost last fragment costs nothing).
pub const DEFAULT_FRAG_MAX: u32 = 8_192;

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), integer fields only, explicit padding (size assertions above).
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_in_either_lookup_wins() {
        let (allow, deny) = (Some(0), Some(POLICY_FLAG_DENY));
        assert_eq!(policy_verdict(allow, deny), PolicyVerdict::DenyRule);
        assert_eq!(policy_verdict(deny, allow), PolicyVerdict::DenyRule);
        assert_eq!(policy_verdict(allow, None), PolicyVerdict::Allow);
        assert_eq!(policy_verdict(None, allow), PolicyVerdict::Allow);
        assert_eq!(policy_verdict(None, None), PolicyVerdict::NoMatch);
    }

    #[test]
    fn reverse_is_an_involution_across_directions() {
        let k = CtKey {
            saddr: 1,
            daddr: 2,
            sport: 3,
            dport: 4,
            proto: 6,
            direction: DIR_EGRESS,
            pad: [0; 2],
            endpoint: 9,
        };
        let r = k.reverse();
        assert_eq!((r.saddr, r.daddr, r.sport, r.dport), (2, 1, 4, 3));
        assert_eq!(r.direction, DIR_INGRESS);
        assert_eq!(r.reverse(), k);
    }

    #[test]
    fn prefix_lengths_follow_the_wildcards() {
        assert_eq!(policy_prefix_len(0, 0), 72);
        assert_eq!(policy_prefix_len(6, 0), 80);
        assert_eq!(policy_prefix_len(6, 80), 96);
    }
}
