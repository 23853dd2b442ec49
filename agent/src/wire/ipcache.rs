//! `cilium/state/ip/v1/default/<ip-or-prefix>`: Cilium's `IPIdentityPair`, one endpoint IP
//! (or prefix) with its security identity and the node hosting it.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use super::gonet::IpMask;

use super::WireError;
use super::gonet::go_ip;
use super::json::helpers::null_as_default;
use super::json::{from_json, to_go_json};
use crate::identity::NumericIdentity;

/// Prefix of the `Metadata` field kvstore-mode agents write.
pub const METADATA_GLOBAL_PREFIX: &str = "cilium-global";

/// A named container port (kvstore-mode agents only).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct NamedPort {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Port", default)]
    pub port: u16,
    #[serde(rename = "Protocol", default)]
    pub protocol: String,
}

/// An ipcache entry. Fields in Go order; the last four are `omitempty`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IpIdentityPair {
    #[serde(rename = "IP", default, with = "go_ip")]
    pub ip: Option<IpAddr>,
    /// `None` (`null`) for a host entry; set for a prefix entry.
    #[serde(rename = "Mask", default)]
    pub mask: Option<IpMask>,
    /// The node hosting the endpoint (its InternalIP): tunnel endpoint and WireGuard peer.
    #[serde(rename = "HostIP", default, with = "go_ip")]
    pub host_ip: Option<IpAddr>,
    #[serde(rename = "ID", default)]
    pub id: NumericIdentity,
    /// Encryption key index (255 with WireGuard).
    #[serde(rename = "Key", default)]
    pub key: u8,
    /// Agents: `cilium-global:<cluster>:<node>:<endpoint-id>`; apiserver: `""`.
    #[serde(rename = "Metadata", default)]
    pub metadata: String,
    #[serde(
        rename = "K8sNamespace",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub k8s_namespace: String,
    #[serde(
        rename = "K8sPodName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub k8s_pod_name: String,
    #[serde(
        rename = "K8sServiceAccount",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub k8s_service_account: String,
    /// Sorted by name when written.
    #[serde(
        rename = "NamedPorts",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub named_ports: Vec<NamedPort>,
}

impl IpIdentityPair {
    /// A host entry (no mask), as written for endpoints.
    pub fn host(ip: IpAddr, host_ip: Option<IpAddr>, id: NumericIdentity, key: u8) -> Self {
        IpIdentityPair {
            ip: Some(ip),
            host_ip,
            id,
            key,
            ..IpIdentityPair::default()
        }
    }

    /// A prefix entry (mask set, in the prefix's family).
    pub fn for_prefix(
        prefix: IpNet,
        host_ip: Option<IpAddr>,
        id: NumericIdentity,
        key: u8,
    ) -> Self {
        IpIdentityPair {
            ip: Some(prefix.addr()),
            mask: Some(IpMask::from_ipnet(&prefix)),
            host_ip,
            id,
            key,
            ..IpIdentityPair::default()
        }
    }

    /// The etcd key suffix: `10.0.1.5` for a host, `10.0.0.0/24` with a mask. Follows Go's
    /// `PrefixString`: a non-canonical mask counts as `/0`. Empty when the IP is unset.
    pub fn prefix_string(&self) -> String {
        let Some(ip) = self.ip else {
            return String::new();
        };
        match &self.mask {
            Some(mask) => format!("{ip}/{}", mask.go_size().0),
            None => ip.to_string(),
        }
    }

    /// The entry as a prefix (`/32` or `/128` for a host); `None` without an IP or with a
    /// mask that does not fit the address.
    pub fn prefix(&self) -> Option<IpNet> {
        let ip = self.ip?;
        let len = match &self.mask {
            Some(mask) => mask.prefix_len_for(ip)?,
            None => match ip {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            },
        };
        IpNet::new(ip, len).ok()
    }

    /// Go-identical JSON bytes.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        to_go_json(self, "ipcache entry")
    }

    /// Decodes without validation (see `validate::decode_remote_ipcache`).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        from_json(bytes, "ipcache entry")
    }
}

/// `cilium-global:<cluster>:<node>:<endpoint-id>`, the `Metadata` kvstore-mode agents write.
pub fn agent_metadata(cluster: &str, node: &str, endpoint_id: u64) -> String {
    format!("{METADATA_GLOBAL_PREFIX}:{cluster}:{node}:{endpoint_id}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const GOLDEN: &str = r#"{"IP":"10.6.6.43","Mask":null,"HostIP":"10.5.1.132","ID":12928,"Key":0,"Metadata":"cilium-global:default:k8s-node1:432","K8sNamespace":"istio-system","K8sPodName":"ai-ingressgateway-6bdbdbf7dc-jz85c"}"#;

    pub fn golden_pair() -> IpIdentityPair {
        let mut p = IpIdentityPair::host(
            "10.6.6.43".parse().unwrap(),
            Some("10.5.1.132".parse().unwrap()),
            12928,
            0,
        );
        p.metadata = agent_metadata("default", "k8s-node1", 432);
        p.k8s_namespace = "istio-system".into();
        p.k8s_pod_name = "ai-ingressgateway-6bdbdbf7dc-jz85c".into();
        p
    }

    #[test]
    fn golden_encode_and_round_trip() {
        assert_eq!(golden_pair().encode().unwrap(), GOLDEN.as_bytes());
        let p = IpIdentityPair::decode(GOLDEN.as_bytes()).unwrap();
        assert_eq!(p, golden_pair());
        assert_eq!(p.encode().unwrap(), GOLDEN.as_bytes());
        assert_eq!(p.prefix_string(), "10.6.6.43");
        assert_eq!(p.prefix(), Some("10.6.6.43/32".parse().unwrap()));
    }

    #[test]
    fn prefixes_and_optional_fields() {
        let mut p = IpIdentityPair::for_prefix("10.0.0.0/24".parse().unwrap(), None, 2, 0);
        p.k8s_service_account = "sa".into();
        p.named_ports = vec![NamedPort {
            name: "http".into(),
            port: 80,
            protocol: "TCP".into(),
        }];
        assert_eq!(p.prefix_string(), "10.0.0.0/24");
        assert_eq!(
            String::from_utf8(p.encode().unwrap()).unwrap(),
            r#"{"IP":"10.0.0.0","Mask":"////AA==","HostIP":"","ID":2,"Key":0,"Metadata":"","K8sServiceAccount":"sa","NamedPorts":[{"Name":"http","Port":80,"Protocol":"TCP"}]}"#
        );
        let v6 = IpIdentityPair::decode(
            br#"{"IP":"fd00::","Mask":"//////////8AAAAAAAAAAA==","HostIP":null,"ID":7,"NamedPorts":null,"Extra":1}"#,
        )
        .unwrap();
        assert_eq!(v6.prefix_string(), "fd00::/64");
        assert_eq!(v6.prefix(), Some("fd00::/64".parse().unwrap()));
        assert!(v6.named_ports.is_empty() && v6.host_ip.is_none());

        // Go's PrefixString on a non-canonical mask: "/0"; prefix() refuses it.
        let odd = IpIdentityPair::decode(br#"{"IP":"10.0.0.0","Mask":"/wD/AA=="}"#).unwrap();
        assert_eq!(odd.prefix_string(), "10.0.0.0/0");
        assert_eq!(odd.prefix(), None);
        assert_eq!(IpIdentityPair::default().prefix_string(), "");
        assert!(IpIdentityPair::decode(br#"{"IP":"10.0.0.999"}"#).is_err());
        assert!(IpIdentityPair::decode(br#"{"IP":"10.0.0.1","Mask":"***"}"#).is_err());
    }
}
