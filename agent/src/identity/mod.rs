//! Numeric security identities: reserved and well-known values, and the slice of the 24-bit
//! space each cluster allocates from (Cilium `pkg/identity/numericidentity.go`,
//! `pkg/clustermesh/types`).
//!
//! Who is who in a mesh, shared by every layer above: [`cluster`] names and IDs, numeric
//! identities and their per-cluster ranges (here), identity [`labels`] and the [`filter`]
//! deciding which labels count. Pure Rust.

use std::fmt;

pub mod cluster;
pub mod filter;
pub mod labels;

pub use cluster::{MaxConnectedClusters, validate_cluster_id, validate_cluster_name};
pub use labels::{Label, LabelArray, LabelError};

use cluster::IDENTITY_BITS;

/// A numeric security identity as carried in etcd and in the datapath.
pub type NumericIdentity = u32;

pub const IDENTITY_UNKNOWN: NumericIdentity = 0;
pub const IDENTITY_HOST: NumericIdentity = 1;
pub const IDENTITY_WORLD: NumericIdentity = 2;
pub const IDENTITY_UNMANAGED: NumericIdentity = 3;
pub const IDENTITY_HEALTH: NumericIdentity = 4;
pub const IDENTITY_INIT: NumericIdentity = 5;
pub const IDENTITY_REMOTE_NODE: NumericIdentity = 6;
pub const IDENTITY_KUBE_APISERVER: NumericIdentity = 7;
pub const IDENTITY_INGRESS: NumericIdentity = 8;
pub const IDENTITY_WORLD_IPV4: NumericIdentity = 9;
pub const IDENTITY_WORLD_IPV6: NumericIdentity = 10;
pub const IDENTITY_ENCRYPTED_OVERLAY: NumericIdentity = 11;

/// First and last well-known identity (system pods with fixed identities).
pub const WELL_KNOWN_FIRST: NumericIdentity = 100;
pub const WELL_KNOWN_LAST: NumericIdentity = 115;

/// Range reserved for user-defined reserved identities.
pub const USER_RESERVED_FIRST: NumericIdentity = 128;
pub const USER_RESERVED_LAST: NumericIdentity = 255;

/// First allocatable identity (cluster ID 0); everything below is not cluster-scoped.
pub const MINIMAL_NUMERIC_IDENTITY: NumericIdentity = 256;

/// Bit 24 flags node-local (CIDR) identities, which are never exported.
pub const LOCAL_SCOPE_FLAG: NumericIdentity = 1 << IDENTITY_BITS;

/// Highest identity that fits the 24-bit wire width.
pub const MAX_NUMERIC_IDENTITY: NumericIdentity = (1 << IDENTITY_BITS) - 1;

/// Name of a reserved identity (0..=11), as Cilium's `reserved:` labels spell it.
pub fn reserved_identity_name(id: NumericIdentity) -> Option<&'static str> {
    Some(match id {
        IDENTITY_UNKNOWN => "unknown",
        IDENTITY_HOST => "host",
        IDENTITY_WORLD => "world",
        IDENTITY_UNMANAGED => "unmanaged",
        IDENTITY_HEALTH => "health",
        IDENTITY_INIT => "init",
        IDENTITY_REMOTE_NODE => "remote-node",
        IDENTITY_KUBE_APISERVER => "kube-apiserver",
        IDENTITY_INGRESS => "ingress",
        IDENTITY_WORLD_IPV4 => "world-ipv4",
        IDENTITY_WORLD_IPV6 => "world-ipv6",
        IDENTITY_ENCRYPTED_OVERLAY => "encrypted-overlay",
        _ => return None,
    })
}

/// Name of a well-known identity (100..=115): eight system workloads, then their "…2" twins.
pub fn well_known_identity_name(id: NumericIdentity) -> Option<&'static str> {
    const NAMES: [&str; 16] = [
        "etcd-operator",
        "cilium-kvstore",
        "kube-dns",
        "eks-kube-dns",
        "core-dns",
        "cilium-operator",
        "eks-coredns",
        "cilium-etcd-operator",
        "etcd-operator2",
        "cilium-kvstore2",
        "kube-dns2",
        "eks-kube-dns2",
        "core-dns2",
        "cilium-operator2",
        "eks-coredns2",
        "cilium-etcd-operator2",
    ];
    let idx = id.checked_sub(WELL_KNOWN_FIRST)?;
    NAMES.get(idx as usize).copied()
}

/// Reserved, well-known and user-reserved identities: global, not owned by any cluster.
pub fn is_reserved(id: NumericIdentity) -> bool {
    id < MINIMAL_NUMERIC_IDENTITY
}

/// Node-local identities (CIDR identities); never valid in etcd.
pub fn has_local_scope(id: NumericIdentity) -> bool {
    id & LOCAL_SCOPE_FLAG != 0
}

/// The cluster ID encoded in a global identity.
pub fn cluster_id_of(id: NumericIdentity, max: MaxConnectedClusters) -> u32 {
    (id & MAX_NUMERIC_IDENTITY) >> max.cluster_id_shift()
}

/// What an identity read from the kvstore means to us: another node's "host" is, from here, a
/// "remote-node" (Cilium remaps it the same way when importing ipcache entries).
pub fn remote_view_of_identity(id: NumericIdentity) -> NumericIdentity {
    if id == IDENTITY_HOST {
        IDENTITY_REMOTE_NODE
    } else {
        id
    }
}

/// Inclusive range of identities a cluster allocates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityRange {
    pub min: NumericIdentity,
    pub max: NumericIdentity,
}

impl IdentityRange {
    /// `[c << shift, ((c + 1) << shift) - 1]`; cluster 0 starts at 256 so it does not hand out
    /// reserved identities. Cluster IDs above `max` are clamped (they fail validation anyway,
    /// and clamping keeps the arithmetic inside 24 bits).
    pub fn for_cluster(cluster_id: u32, max: MaxConnectedClusters) -> IdentityRange {
        let shift = max.cluster_id_shift();
        let c = cluster_id.min(max.cluster_id_max());
        let min = if c == 0 {
            MINIMAL_NUMERIC_IDENTITY
        } else {
            c << shift
        };
        IdentityRange {
            min,
            max: ((c + 1) << shift) - 1,
        }
    }

    pub fn contains(&self, id: NumericIdentity) -> bool {
        (self.min..=self.max).contains(&id)
    }
}

impl fmt::Display for IdentityRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// A cluster name, cluster ID or `maxConnectedClusters` value that Cilium would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid cluster name {name:?}: {reason}")]
    InvalidClusterName { name: String, reason: &'static str },
    #[error("ClusterID 0 is reserved")]
    ReservedClusterId,
    #[error("ClusterID {id} is out of range (valid: 1..={max})")]
    ClusterIdOutOfRange { id: u32, max: u32 },
    #[error("max-connected-clusters must be 255 or 511, got {0}")]
    InvalidMaxConnectedClusters(u32),
    #[error("cluster name \"default\" cannot be used with a non-zero cluster ID ({0})")]
    DefaultNameWithClusterId(u32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use MaxConnectedClusters::*;

    fn r(c: u32, m: MaxConnectedClusters) -> (u32, u32) {
        let r = IdentityRange::for_cluster(c, m);
        (r.min, r.max)
    }

    #[test]
    fn ranges_from_the_reference() {
        assert_eq!(r(1, Max255), (65536, 131071));
        assert_eq!(r(2, Max255), (131072, 196607));
        assert_eq!(r(1, Max511), (32768, 65535));
        assert_eq!(r(511, Max511), (16744448, 16777215));
        assert_eq!(r(0, Max255), (256, 65535));
        assert_eq!(r(0, Max511), (256, 32767));
        assert_eq!(r(255, Max255), (16711680, 16777215));
        // Out-of-range IDs clamp instead of overflowing.
        assert_eq!(r(9999, Max255), r(255, Max255));
    }

    #[test]
    fn range_membership_and_cluster_of() {
        let range = IdentityRange::for_cluster(2, Max255);
        assert!(range.contains(131072) && range.contains(196607));
        assert!(!range.contains(131071) && !range.contains(196608));
        assert_eq!(cluster_id_of(131072, Max255), 2);
        assert_eq!(cluster_id_of(65535, Max511), 1);
        assert_eq!(range.to_string(), "131072-196607");
    }

    #[test]
    fn reserved() {
        assert_eq!(reserved_identity_name(1), Some("host"));
        assert_eq!(reserved_identity_name(6), Some("remote-node"));
        assert_eq!(reserved_identity_name(11), Some("encrypted-overlay"));
        assert_eq!(reserved_identity_name(12), None);
        assert_eq!(well_known_identity_name(100), Some("etcd-operator"));
        assert_eq!(well_known_identity_name(102), Some("kube-dns"));
        assert_eq!(well_known_identity_name(115), Some("cilium-etcd-operator2"));
        assert_eq!(well_known_identity_name(99), None);
        assert_eq!(well_known_identity_name(116), None);
        assert!(is_reserved(255) && !is_reserved(256));
        assert!(has_local_scope(LOCAL_SCOPE_FLAG | 5) && !has_local_scope(MAX_NUMERIC_IDENTITY));
        assert_eq!(remote_view_of_identity(IDENTITY_HOST), IDENTITY_REMOTE_NODE);
        assert_eq!(remote_view_of_identity(65536), 65536);
    }
}
