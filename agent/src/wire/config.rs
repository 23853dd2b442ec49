//! `cilium/cluster-config/<name>`: a cluster's ID and capabilities (Cilium
//! `CiliumClusterConfig`).

use serde::{Deserialize, Serialize};

use super::WireError;
use super::json::helpers::{is_false, is_zero_u32, null_as_default};
use super::json::{from_json, to_go_json};

/// Cluster configuration. `id` is omitted when 0 (Go `omitempty`); `capabilities` is a Go
/// struct, so it is always written, `{}` when empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KvClusterConfig {
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub id: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub capabilities: Capabilities,
}

/// What the publisher of a cluster's data supports. All fields are `omitempty` in Go.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// The publisher writes sync canaries (≥ v1.14): wait for them before watching.
    #[serde(default, skip_serializing_if = "is_false")]
    pub synced_canaries: bool,
    /// The data is a KVStoreMesh cache: read `cilium/cache/…` instead of `cilium/state/…`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cached: bool,
    /// 255 or 511 (≥ v1.15); 0 when the publisher predates it.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub max_connected_clusters: u32,
    /// `None` (null/absent) means the publisher predates MCS-API support (< v1.17), which is
    /// not the same as `Some(false)` (supports it, disabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_exports_enabled: Option<bool>,
    /// Cilium main only; values not verified in Cilium's source.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint_slices_export_mode: String,
}

impl KvClusterConfig {
    /// What a clustermesh-apiserver (v1.17/v1.18) publishes for its own cluster.
    pub fn for_publisher(id: u32, max_connected_clusters: u32, service_exports: bool) -> Self {
        KvClusterConfig {
            id,
            capabilities: Capabilities {
                synced_canaries: true,
                cached: false,
                max_connected_clusters,
                service_exports_enabled: Some(service_exports),
                endpoint_slices_export_mode: String::new(),
            },
        }
    }

    /// What KVStoreMesh publishes for a remote it caches: the source's `id`,
    /// `maxConnectedClusters` and `serviceExportsEnabled`, with `syncedCanaries` and `cached`
    /// forced on (the mirror always writes canaries, whatever the source did).
    pub fn cached_copy(&self) -> Self {
        KvClusterConfig {
            id: self.id,
            capabilities: Capabilities {
                synced_canaries: true,
                cached: true,
                max_connected_clusters: self.capabilities.max_connected_clusters,
                service_exports_enabled: self.capabilities.service_exports_enabled,
                endpoint_slices_export_mode: String::new(),
            },
        }
    }

    /// Whether readers should watch `serviceexports/v1` (the capability is known at all).
    pub fn exports_services_capability(&self) -> bool {
        self.capabilities.service_exports_enabled.is_some()
    }

    /// Go-identical JSON bytes.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        to_go_json(self, "cluster config")
    }

    /// Decodes without any validation (see `validate::decode_remote_cluster_config`).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        from_json(bytes, "cluster config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APISERVER: &str = r#"{"id":1,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#;
    const KVSTOREMESH: &str = r#"{"id":2,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#;

    #[test]
    fn golden_apiserver() {
        let c = KvClusterConfig::for_publisher(1, 255, false);
        assert_eq!(c.encode().unwrap(), APISERVER.as_bytes());
        assert_eq!(KvClusterConfig::decode(APISERVER.as_bytes()).unwrap(), c);
    }

    #[test]
    fn golden_kvstoremesh() {
        let source = KvClusterConfig::for_publisher(2, 255, false);
        let c = source.cached_copy();
        assert_eq!(c.encode().unwrap(), KVSTOREMESH.as_bytes());
        let decoded = KvClusterConfig::decode(KVSTOREMESH.as_bytes()).unwrap();
        assert_eq!(decoded, c);
        assert_eq!(decoded.encode().unwrap(), KVSTOREMESH.as_bytes());
    }

    #[test]
    fn omitempty_and_defaults() {
        assert_eq!(
            KvClusterConfig::default().encode().unwrap(),
            br#"{"capabilities":{}}"#
        );
        let old = KvClusterConfig::decode(br#"{"id":3}"#).unwrap();
        assert_eq!(old.id, 3);
        assert_eq!(old.capabilities, Capabilities::default());
        assert!(!old.exports_services_capability());

        let c = KvClusterConfig::decode(
            br#"{"id":3,"capabilities":{"serviceExportsEnabled":null,"future":[1]},"extra":true}"#,
        )
        .unwrap();
        assert_eq!(c.capabilities.service_exports_enabled, None);
        let c = KvClusterConfig::decode(br#"{"id":3,"capabilities":null}"#).unwrap();
        assert_eq!(c.capabilities, Capabilities::default());

        let c = KvClusterConfig::decode(
            br#"{"id":4,"capabilities":{"serviceExportsEnabled":true,"endpointSlicesExportMode":"endpointslices-only"}}"#,
        )
        .unwrap();
        assert!(c.exports_services_capability());
        assert_eq!(
            c.encode().unwrap(),
            br#"{"id":4,"capabilities":{"serviceExportsEnabled":true,"endpointSlicesExportMode":"endpointslices-only"}}"#
        );
        assert!(KvClusterConfig::decode(b"").is_err());
        assert!(KvClusterConfig::decode(br#"{"id":-1}"#).is_err());
    }
}
