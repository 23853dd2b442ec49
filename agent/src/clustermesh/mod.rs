//! Cilium ClusterMesh formats and rules: the values in etcd, byte for byte, and the checks
//! Cilium applies to what remote clusters publish. Pure Rust: no etcd, no kernel.
//!
//! * [`json`]: Go `encoding/json`-compatible encoder ([`json::to_go_json`]).
//! * [`gonet`]: serde adapters for Go's `net.IP`, `net.IPMask` and CIDR wire forms.
//! * [`keys`]: every etcd key and prefix, state vs cache, canaries, watch prefixes.
//! * [`cluster`]: cluster names, cluster IDs, `maxConnectedClusters`.
//! * [`identity`]: numeric identities: reserved values and per-cluster allocation ranges.
//! * [`labels`]: identity label lists (`k8s:app=foo;…`).
//! * [`config`], [`node`], [`service`], [`ipcache`]: the value types.
//! * [`timestamp`]: RFC 3339 values of heartbeats and sync canaries.
//! * [`annotations`]: global-service annotations.
//! * [`validate`]: decoding with Cilium's acceptance rules, returning [`Rejection`]s.

pub mod allocator;
pub mod annotations;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod exporter;
pub mod gonet;
pub mod identity;
pub mod ipcache;
pub mod json;
pub mod keys;
pub mod kvstoremesh;
pub mod labels;
pub mod manager;
pub mod node;
pub mod publisher;
pub mod remote;
pub mod service;
pub mod sync;
pub mod timestamp;
pub mod validate;

pub use annotations::{Affinity, GlobalServiceAnnotations, parse_global_service_annotations};
pub use cluster::{MaxConnectedClusters, validate_cluster_id, validate_cluster_name};
pub use config::{Capabilities, ClusterConfig};
pub use identity::{IdentityRange, NumericIdentity};
pub use ipcache::{IpIdentityPair, IpMask, NamedPort};
pub use keys::DataKind;
pub use labels::{Label, LabelArray};
pub use node::{Node, NodeAddress};
pub use service::{ClusterService, L4Addr, PortConfiguration};
pub use validate::{Identity, RejectReason, Rejection, RemoteContext, ServiceOutcome};

/// Failures that are errors rather than rejected remote data: bad local settings, values we
/// cannot encode, malformed timestamps or keys handed to a helper.
#[derive(Debug, thiserror::Error)]
pub enum ClustermeshError {
    #[error("encoding {what} as JSON: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("decoding {what} JSON: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
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
    #[error("invalid WireGuard public key {key:?}: {reason}")]
    InvalidWireguardKey { key: String, reason: String },
}
