//! Cilium ClusterMesh wire formats: the values in etcd, byte for byte, and the checks Cilium
//! applies to what remote clusters publish. Pure: no etcd, no kernel, no state model. Mesh I/O
//! lives in [`crate::mesh`], what this node publishes in [`crate::publish`].
//!
//! * [`json`]: Go `encoding/json`-compatible encoder ([`json::to_go_json`]).
//! * [`gonet`]: serde adapters for Go's `net.IP`, `net.IPMask` and CIDR wire forms.
//! * [`keys`]: every etcd key and prefix, state vs cache, canaries, watch prefixes.
//! * [`config`], [`node`], [`service`], [`ipcache`]: the value types.
//! * [`timestamp`]: RFC 3339 values of heartbeats and sync canaries.
//! * [`users`]: the etcd users and roles of a cluster's kvstore (who reads and writes what).
//! * [`validate`]: decoding with Cilium's acceptance rules, returning [`Rejection`]s.

pub mod config;
pub mod gonet;
pub mod ipcache;
pub mod json;
pub mod keys;
pub mod node;
pub mod service;
pub mod timestamp;
pub mod users;
pub mod validate;

pub use config::{Capabilities, KvClusterConfig};
pub use ipcache::{IpIdentityPair, IpMask, NamedPort};
pub use keys::DataKind;
pub use node::{KvNode, NodeAddress};
pub use service::{KvClusterService, L4Addr, PortConfiguration};
pub use validate::{KvIdentity, RejectReason, Rejection, RemoteContext, ServiceOutcome};

pub use crate::identity::ClusterError;

/// Failures that are errors rather than rejected remote data: bad local settings, values we
/// cannot encode, malformed timestamps or keys handed to a helper.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
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
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("invalid WireGuard public key {key:?}: {reason}")]
    InvalidWireguardKey { key: String, reason: String },
}
