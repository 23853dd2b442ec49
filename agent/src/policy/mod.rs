//! CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy → per-endpoint datapath policy.
//!
//! Pure translation: [`parse_documents`] reads manifests, [`translate`] computes, for one
//! endpoint (its identity labels) and the identities known cluster-mesh-wide, the entries of
//! its policy map keyed by (remote identity, direction, protocol, port), with identity 0 and
//! port 0 as wildcards and deny taking precedence in the datapath.
//!
//! Behaviour follows Cilium's: see [`translate`] for the rules, and for what strait does with
//! the parts of a policy it cannot enforce (it never lets them widen access).

mod selector;
mod translate;
mod types;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

pub use selector::Selector;
pub use translate::translate;
pub use types::{
    Authentication, CILIUM_API_VERSION, CiliumPolicy, DEFAULT_NAMESPACE, DefaultDeny, EgressRule,
    IngressRule, LabelSelector, LabelSelectorRequirement, ObjectMeta, ParsedDocuments, PolicyKind,
    PolicyRule, PortProtocol, PortRule, SelectorOperator, parse_documents,
};

/// IP protocol numbers used in policy entries (0 = any protocol, only ever with port 0).
pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// A policy document that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The YAML stream itself is malformed at this document.
    #[error("policy document {index}: invalid YAML: {reason}")]
    Yaml { index: usize, reason: String },
    /// The document is YAML but not a valid policy.
    #[error("policy document {index} ({}): {reason}", name.as_deref().unwrap_or("<unnamed>"))]
    Invalid {
        index: usize,
        name: Option<String>,
        reason: String,
    },
}

/// Traffic direction, as seen from the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// One policy-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    /// Remote identity; 0 = any.
    pub identity: u32,
    pub direction: Direction,
    /// IP protocol: 0 any (then `port` is 0 too), 6 TCP, 17 UDP, 132 SCTP (1/58 ICMP in deny).
    pub protocol: u8,
    /// Destination port; 0 = any.
    pub port: u16,
    /// Deny entry; the datapath gives deny precedence over any allow.
    pub deny: bool,
}

/// A part of a policy selecting the endpoint that strait does not enforce as written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unsupported {
    /// `namespace/name` (or `name` for a clusterwide policy).
    pub policy: String,
    /// What and where, and what was done instead.
    pub rule: String,
}

/// The translated policy of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Ingress is default-deny: only `entries` with `Ingress` and `deny: false` pass.
    pub ingress_enforced: bool,
    /// Egress is default-deny.
    pub egress_enforced: bool,
    pub entries: BTreeSet<PolicyEntry>,
    pub unsupported: Vec<Unsupported>,
}

impl EndpointPolicy {
    /// Whether a policy selecting the endpoint asks the datapath for anything: a direction
    /// in default deny, or entries. An endpoint no policy selects is allowed everything,
    /// enforced or not.
    pub fn is_enforcing(&self) -> bool {
        self.ingress_enforced || self.egress_enforced || !self.entries.is_empty()
    }

    /// Entries of one direction.
    pub fn entries_for(&self, direction: Direction) -> impl Iterator<Item = &PolicyEntry> {
        self.entries
            .iter()
            .filter(move |e| e.direction == direction)
    }

    /// The datapath's verdict for a packet, for tests and diagnostics: deny wins, then an
    /// allow matching exactly or by wildcard, then the direction's default.
    pub fn allows(&self, direction: Direction, identity: u32, protocol: u8, port: u16) -> bool {
        let hit = |e: &&PolicyEntry| {
            (e.identity == 0 || e.identity == identity)
                && (e.protocol == PROTO_ANY || e.protocol == protocol)
                && (e.port == 0 || e.port == port)
        };
        let (mut allow, mut deny) = (false, false);
        for e in self.entries_for(direction).filter(hit) {
            if e.deny {
                deny = true;
            } else {
                allow = true;
            }
        }
        let enforced = match direction {
            Direction::Ingress => self.ingress_enforced,
            Direction::Egress => self.egress_enforced,
        };
        !deny && (allow || !enforced)
    }
}
