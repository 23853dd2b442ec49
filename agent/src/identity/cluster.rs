//! Cluster names, cluster IDs and the `maxConnectedClusters` setting that splits the 24-bit
//! identity space between clusters (Cilium `pkg/clustermesh/types`).

use std::fmt;

use super::ClusterError;

/// Longest accepted cluster name.
pub const CLUSTER_NAME_MAX_LEN: usize = 32;

/// Name of a cluster that was not given one; it may not carry a non-zero cluster ID.
pub const DEFAULT_CLUSTER_NAME: &str = "default";

/// Width of a numeric identity on the wire.
pub const IDENTITY_BITS: u32 = 24;

/// How many clusters a mesh may hold. Only Cilium's two settings exist, so other values cannot
/// be represented. The local setting decides identity ranges for every cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MaxConnectedClusters {
    /// 255 clusters, 8 cluster-ID bits (Cilium's default).
    #[default]
    Max255,
    /// 511 clusters, 9 cluster-ID bits.
    Max511,
}

impl MaxConnectedClusters {
    /// Accepts only 255 and 511, as Cilium does.
    pub fn from_u32(v: u32) -> Result<Self, ClusterError> {
        match v {
            255 => Ok(Self::Max255),
            511 => Ok(Self::Max511),
            other => Err(ClusterError::InvalidMaxConnectedClusters(other)),
        }
    }

    /// The numeric setting (255 or 511), also the highest valid cluster ID.
    pub fn value(self) -> u32 {
        match self {
            Self::Max255 => 255,
            Self::Max511 => 511,
        }
    }

    /// Highest valid cluster ID.
    pub fn cluster_id_max(self) -> u32 {
        self.value()
    }

    /// log2(max + 1): 8 or 9.
    pub fn cluster_id_bits(self) -> u32 {
        match self {
            Self::Max255 => 8,
            Self::Max511 => 9,
        }
    }

    /// Where the cluster ID sits inside a numeric identity: 16 or 15.
    pub fn cluster_id_shift(self) -> u32 {
        IDENTITY_BITS - self.cluster_id_bits()
    }
}

impl fmt::Display for MaxConnectedClusters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value())
    }
}

/// A remote (or our own, in a mesh) cluster ID must be 1..=max; 0 means "no ClusterMesh".
pub fn validate_cluster_id(id: u32, max: MaxConnectedClusters) -> Result<(), ClusterError> {
    if id == 0 {
        return Err(ClusterError::ReservedClusterId);
    }
    if id > max.cluster_id_max() {
        return Err(ClusterError::ClusterIdOutOfRange {
            id,
            max: max.cluster_id_max(),
        });
    }
    Ok(())
}

/// Cilium's cluster name rule: non-empty, at most 32 characters, and matching
/// `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$` (lowercase alphanumerics and inner dashes).
pub fn validate_cluster_name(name: &str) -> Result<(), ClusterError> {
    let fail = |reason| {
        Err(ClusterError::InvalidClusterName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("must not be empty");
    }
    if name.len() > CLUSTER_NAME_MAX_LEN {
        return fail("must not be longer than 32 characters");
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !name.bytes().all(|b| alnum(b) || b == b'-') {
        return fail("may contain only lowercase letters, digits and '-'");
    }
    // Non-empty and ASCII was checked above, so first/last bytes exist and are characters.
    let bytes = name.as_bytes();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return fail("must start and end with a lowercase letter or digit");
    }
    Ok(())
}

/// Checks the local cluster's own settings: a valid name, and `default` only without an ID.
/// ID 0 is allowed here (a cluster not part of a mesh).
pub fn validate_local_cluster(
    name: &str,
    id: u32,
    max: MaxConnectedClusters,
) -> Result<(), ClusterError> {
    validate_cluster_name(name)?;
    if id > max.cluster_id_max() {
        return Err(ClusterError::ClusterIdOutOfRange {
            id,
            max: max.cluster_id_max(),
        });
    }
    if name == DEFAULT_CLUSTER_NAME && id != 0 {
        return Err(ClusterError::DefaultNameWithClusterId(id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connected_clusters() {
        let m = MaxConnectedClusters::from_u32(255).unwrap();
        assert_eq!((m.cluster_id_bits(), m.cluster_id_shift()), (8, 16));
        let m = MaxConnectedClusters::from_u32(511).unwrap();
        assert_eq!((m.cluster_id_bits(), m.cluster_id_shift()), (9, 15));
        for bad in [0, 127, 256, 510, 512, 1023] {
            assert!(MaxConnectedClusters::from_u32(bad).is_err(), "{bad}");
        }
        assert_eq!(MaxConnectedClusters::default().value(), 255);
    }

    #[test]
    fn cluster_ids() {
        use MaxConnectedClusters::*;
        assert!(matches!(
            validate_cluster_id(0, Max255),
            Err(ClusterError::ReservedClusterId)
        ));
        assert!(validate_cluster_id(1, Max255).is_ok());
        assert!(validate_cluster_id(255, Max255).is_ok());
        assert!(matches!(
            validate_cluster_id(256, Max255),
            Err(ClusterError::ClusterIdOutOfRange { id: 256, max: 255 })
        ));
        assert!(validate_cluster_id(511, Max511).is_ok());
        assert!(validate_cluster_id(512, Max511).is_err());
    }

    #[test]
    fn cluster_names() {
        for ok in ["a", "0", "c1", "cluster-usa", "a-b-c", &"a".repeat(32)] {
            assert!(validate_cluster_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "-",
            "A",
            "a_b",
            "a.b",
            "é",
            "a b",
            &"a".repeat(33),
        ] {
            assert!(validate_cluster_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn local_cluster() {
        use MaxConnectedClusters::*;
        assert!(validate_local_cluster("default", 0, Max255).is_ok());
        assert!(matches!(
            validate_local_cluster("default", 1, Max255),
            Err(ClusterError::DefaultNameWithClusterId(1))
        ));
        assert!(validate_local_cluster("cluster-usa", 1, Max255).is_ok());
        assert!(validate_local_cluster("cluster-usa", 0, Max255).is_ok());
        assert!(validate_local_cluster("cluster-usa", 300, Max255).is_err());
        assert!(validate_local_cluster("Bad", 1, Max255).is_err());
    }
}
