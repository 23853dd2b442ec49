//! `cilium/state/services/v1/<cluster>/<namespace>/<name>`: Cilium's `ClusterService`, a
//! global service's frontends and ready backends as one cluster exports them.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use super::WireError;
use super::json::helpers::null_as_default;
use super::json::{from_json, to_go_json};

/// An L4 port (`{"Protocol":"TCP","Port":80}`; the Go type has no JSON tags).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct L4Addr {
    /// `TCP`, `UDP`, `SCTP` (kept as a string so unknown protocols still decode).
    #[serde(rename = "Protocol", default)]
    pub protocol: String,
    #[serde(rename = "Port", default)]
    pub port: u16,
}

impl L4Addr {
    pub fn new(protocol: &str, port: u16) -> Self {
        L4Addr {
            protocol: protocol.to_owned(),
            port,
        }
    }
}

/// Port name (`""` for an unnamed port) → port.
pub type PortConfiguration = BTreeMap<String, L4Addr>;

/// A global service as exported by one cluster. Field order and tags are Go's; none is
/// `omitempty`, so empty maps are written as `{}` (Cilium always initialises them).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KvClusterService {
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    /// ClusterIP → ports (service ports).
    #[serde(default, deserialize_with = "ip_port_map")]
    pub frontends: BTreeMap<String, PortConfiguration>,
    /// Ready/serving endpoint IP → ports (target ports).
    #[serde(default, deserialize_with = "ip_port_map")]
    pub backends: BTreeMap<String, PortConfiguration>,
    /// Backend IP → hostname (≥ v1.16; a v1.15 value without it re-encodes with `{}`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub hostnames: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub include_external: bool,
    /// `false` means "do not use": importers treat it as a delete.
    #[serde(default)]
    pub shared: bool,
    #[serde(rename = "clusterID", default)]
    pub cluster_id: u32,
    /// Cilium main only (backend IP → zone hints); its JSON shape is not verified, so it is
    /// carried opaquely and written back only if it was present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<serde_json::Value>,
}

/// Decodes `{ip: {portName: L4Addr|null}|null}`, dropping the `null`s Go could in theory
/// write (nil maps / nil `*L4Addr`).
fn ip_port_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, PortConfiguration>, D::Error> {
    type Wire = Option<BTreeMap<String, Option<BTreeMap<String, Option<L4Addr>>>>>;
    Ok(Wire::deserialize(d)?
        .unwrap_or_default()
        .into_iter()
        .map(|(ip, ports)| {
            let ports = ports
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(name, addr)| Some((name, addr?)))
                .collect();
            (ip, ports)
        })
        .collect())
}

impl KvClusterService {
    /// An exported service as Cilium writes it: `includeExternal` and `shared` set (only
    /// shared global services are exported).
    pub fn new(cluster: &str, namespace: &str, name: &str, cluster_id: u32) -> Self {
        KvClusterService {
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            include_external: true,
            shared: true,
            cluster_id,
            ..KvClusterService::default()
        }
    }

    /// `<namespace>/<name>`: the key suffix under `…/services/v1/<cluster>/`, and the key
    /// remote backends are merged on.
    pub fn namespaced_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `<cluster>/<namespace>/<name>`: the key suffix under `cilium/state/services/v1/`.
    pub fn key_name(&self) -> String {
        format!("{}/{}/{}", self.cluster, self.namespace, self.name)
    }

    /// Go-identical JSON bytes.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        to_go_json(self, "service")
    }

    /// Decodes without validation (see `validate::decode_remote_service`).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        from_json(bytes, "service")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const GOLDEN: &str = r#"{"cluster":"c1","namespace":"default","name":"rebel-base","frontends":{"10.96.12.34":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.1.0.77":{"http":{"Protocol":"TCP","Port":8080}}},"hostnames":{},"labels":{},"selector":{"name":"rebel-base"},"includeExternal":true,"shared":true,"clusterID":1}"#;

    pub fn golden_service() -> KvClusterService {
        let mut s = KvClusterService::new("c1", "default", "rebel-base", 1);
        let port = |p| PortConfiguration::from([("http".to_owned(), L4Addr::new("TCP", p))]);
        s.frontends.insert("10.96.12.34".into(), port(80));
        s.backends.insert("10.1.0.77".into(), port(8080));
        s.selector.insert("name".into(), "rebel-base".into());
        s
    }

    #[test]
    fn golden_encode_and_round_trip() {
        assert_eq!(golden_service().encode().unwrap(), GOLDEN.as_bytes());
        let s = KvClusterService::decode(GOLDEN.as_bytes()).unwrap();
        assert_eq!(s, golden_service());
        assert_eq!(s.encode().unwrap(), GOLDEN.as_bytes());
        assert_eq!(s.namespaced_name(), "default/rebel-base");
        assert_eq!(s.key_name(), "c1/default/rebel-base");
    }

    #[test]
    fn decodes_older_and_newer() {
        // v1.15: no hostnames; nulls; unnamed port; IPv6 backend; unknown field.
        let json = r#"{"cluster":"c2","namespace":"ns","name":"s","frontends":null,"backends":{"fd00::7":{"":{"Protocol":"UDP","Port":53},"x":null},"10.0.0.9":null},"labels":null,"selector":null,"includeExternal":true,"shared":false,"clusterID":2,"newField":[]}"#;
        let s = KvClusterService::decode(json.as_bytes()).unwrap();
        assert!(s.frontends.is_empty() && !s.shared);
        assert_eq!(s.backends["fd00::7"][""], L4Addr::new("UDP", 53));
        assert_eq!(s.backends["fd00::7"].len(), 1);
        assert!(s.backends["10.0.0.9"].is_empty());
        assert_eq!(
            String::from_utf8(s.encode().unwrap()).unwrap(),
            r#"{"cluster":"c2","namespace":"ns","name":"s","frontends":{},"backends":{"10.0.0.9":{},"fd00::7":{"":{"Protocol":"UDP","Port":53}}},"hostnames":{},"labels":{},"selector":{},"includeExternal":true,"shared":false,"clusterID":2}"#
        );

        // main: zones carried through.
        let json = r#"{"cluster":"c","namespace":"n","name":"s","frontends":{},"backends":{},"hostnames":{"10.0.0.1":"pod-a"},"labels":{},"selector":{},"includeExternal":true,"shared":true,"clusterID":1,"zones":{"10.0.0.1":{"zone":"a"}}}"#;
        let s = KvClusterService::decode(json.as_bytes()).unwrap();
        assert!(s.zones.is_some());
        assert_eq!(s.encode().unwrap(), json.as_bytes());

        assert!(KvClusterService::decode(br#"{"cluster":"c","clusterID":"1"}"#).is_err());
        assert!(
            KvClusterService::decode(br#"{"backends":{"1.1.1.1":{"p":{"Port":70000}}}}"#).is_err()
        );
    }
}
