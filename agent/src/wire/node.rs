//! `cilium/state/nodes/v1/<cluster>/<name>`: Cilium's `nodeTypes.Node`. The Go type has no
//! JSON tags, so the Go field names are the wire names, in declaration order.
//!
//! Version differences, decided once here:
//! * `NodeIdentity` (≈ v1.13–v1.16) is decoded when present and re-emitted only if it was
//!   present (so such values round-trip); nodes we build leave it out, like v1.17+.
//! * `BootID` (newer versions) is always emitted, `""` when unknown, as in v1.17+. A v1.15
//!   value without it gains `"BootID":""` when re-encoded; Go readers of every version ignore
//!   or default it.
//! * Slices and maps Go builds by appending (addresses, secondary CIDRs, labels,
//!   annotations) are nil when empty, so an empty one is written as `null`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::WireError;
use super::gonet::{empty_as_null, go_cidr, go_cidr_list, go_ip};
use super::json::{from_json, to_go_json};

pub const ADDR_INTERNAL_IP: &str = "InternalIP";
pub const ADDR_EXTERNAL_IP: &str = "ExternalIP";
pub const ADDR_CILIUM_INTERNAL_IP: &str = "CiliumInternalIP";

/// `Source` written by a clustermesh-apiserver (from CiliumNode objects).
pub const SOURCE_CUSTOM_RESOURCE: &str = "custom-resource";
/// `Source` written by agents publishing themselves in kvstore mode.
pub const SOURCE_LOCAL: &str = "local";

/// `EncryptionKey` of a node using WireGuard.
pub const ENCRYPTION_KEY_WIREGUARD: u8 = 0xff;

/// Annotation carrying the WireGuard public key, and its older alias.
pub const WG_PUB_KEY_ANNOTATION: &str = "network.cilium.io/wg-pub-key";
pub const WG_PUB_KEY_ANNOTATION_ALIAS: &str = "io.cilium.network.wg-pub-key";

/// One node address (`{"Type":"InternalIP","IP":"172.18.0.3"}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "Type", default)]
    pub addr_type: String,
    #[serde(rename = "IP", default, with = "go_ip")]
    pub ip: Option<IpAddr>,
}

impl NodeAddress {
    pub fn new(addr_type: &str, ip: IpAddr) -> Self {
        NodeAddress {
            addr_type: addr_type.to_owned(),
            ip: Some(ip),
        }
    }
}

/// A node as published in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KvNode {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Cluster", default)]
    pub cluster: String,
    #[serde(rename = "IPAddresses", default, with = "empty_as_null")]
    pub ip_addresses: Vec<NodeAddress>,
    #[serde(rename = "IPv4AllocCIDR", default, with = "go_cidr")]
    pub ipv4_alloc_cidr: Option<IpNet>,
    #[serde(rename = "IPv4SecondaryAllocCIDRs", default, with = "go_cidr_list")]
    pub ipv4_secondary_alloc_cidrs: Vec<IpNet>,
    #[serde(rename = "IPv6AllocCIDR", default, with = "go_cidr")]
    pub ipv6_alloc_cidr: Option<IpNet>,
    #[serde(rename = "IPv6SecondaryAllocCIDRs", default, with = "go_cidr_list")]
    pub ipv6_secondary_alloc_cidrs: Vec<IpNet>,
    #[serde(rename = "IPv4HealthIP", default, with = "go_ip")]
    pub ipv4_health_ip: Option<IpAddr>,
    #[serde(rename = "IPv6HealthIP", default, with = "go_ip")]
    pub ipv6_health_ip: Option<IpAddr>,
    #[serde(rename = "IPv4IngressIP", default, with = "go_ip")]
    pub ipv4_ingress_ip: Option<IpAddr>,
    #[serde(rename = "IPv6IngressIP", default, with = "go_ip")]
    pub ipv6_ingress_ip: Option<IpAddr>,
    #[serde(rename = "ClusterID", default)]
    pub cluster_id: u32,
    #[serde(rename = "Source", default)]
    pub source: String,
    /// IPsec key index; 255 with WireGuard; 0 for none or opted out.
    #[serde(rename = "EncryptionKey", default)]
    pub encryption_key: u8,
    #[serde(rename = "Labels", default, with = "empty_as_null")]
    pub labels: BTreeMap<String, String>,
    #[serde(rename = "Annotations", default, with = "empty_as_null")]
    pub annotations: BTreeMap<String, String>,
    /// Only in ≈ v1.13–v1.16 values; see the module docs.
    #[serde(
        rename = "NodeIdentity",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub node_identity: Option<u32>,
    /// Base64 Curve25519 public key, `""` without WireGuard.
    #[serde(rename = "WireguardPubKey", default)]
    pub wireguard_pub_key: String,
    #[serde(rename = "BootID", default)]
    pub boot_id: String,
}

impl KvNode {
    pub fn new(cluster: &str, name: &str) -> Self {
        KvNode {
            name: name.to_owned(),
            cluster: cluster.to_owned(),
            ..KvNode::default()
        }
    }

    /// `<cluster>/<name>`: the key suffix under `cilium/state/nodes/v1/`.
    pub fn key_name(&self) -> String {
        format!("{}/{}", self.cluster, self.name)
    }

    /// `<cluster>/<name>`, or just the name in the cluster named `default` (Cilium's
    /// `Fullname`, e.g. WireGuard peer names).
    pub fn fullname(&self) -> String {
        if self.cluster == crate::identity::cluster::DEFAULT_CLUSTER_NAME {
            self.name.clone()
        } else {
            self.key_name()
        }
    }

    /// The node IP of one family: an InternalIP, else an ExternalIP, else any other address
    /// except CiliumInternalIP (the router IP on cilium_host is not a node IP).
    pub fn node_ip(&self, ipv6: bool) -> Option<IpAddr> {
        let mut external = None;
        let mut other = None;
        for a in &self.ip_addresses {
            let Some(ip) = a.ip else { continue };
            if ip.is_ipv6() != ipv6 {
                continue;
            }
            match a.addr_type.as_str() {
                ADDR_INTERNAL_IP => return Some(ip),
                ADDR_CILIUM_INTERNAL_IP => {}
                ADDR_EXTERNAL_IP => external = external.or(Some(ip)),
                _ => other = other.or(Some(ip)),
            }
        }
        external.or(other)
    }

    /// The address peers use to reach the node (tunnel / WireGuard endpoint): the IPv4 node
    /// IP, else the IPv6 one.
    pub fn internal_ip(&self) -> Option<IpAddr> {
        self.node_ip(false).or_else(|| self.node_ip(true))
    }

    /// Underlay addresses: every address except CiliumInternalIP (InternalIP, ExternalIP and
    /// any other type), in published order. What Cilium's `ExtractNodeIP` chooses from.
    pub fn underlay_ips(&self) -> Vec<IpAddr> {
        self.ip_addresses
            .iter()
            .filter(|a| a.addr_type != ADDR_CILIUM_INTERNAL_IP)
            .filter_map(|a| a.ip)
            .collect()
    }

    /// Pod-side addresses: the router IPs (CiliumInternalIP on `cilium_host`), health and
    /// ingress IPs. Cilium allocates them from the node's pod CIDR: they are not underlay.
    pub fn pod_side_ips(&self) -> Vec<IpAddr> {
        self.ip_addresses
            .iter()
            .filter(|a| a.addr_type == ADDR_CILIUM_INTERNAL_IP)
            .filter_map(|a| a.ip)
            .chain(
                [
                    self.ipv4_health_ip,
                    self.ipv6_health_ip,
                    self.ipv4_ingress_ip,
                    self.ipv6_ingress_ip,
                ]
                .into_iter()
                .flatten(),
            )
            .collect()
    }

    /// The CiliumInternalIP (router IP) of one family.
    pub fn cilium_internal_ip(&self, ipv6: bool) -> Option<IpAddr> {
        self.ip_addresses
            .iter()
            .filter(|a| a.addr_type == ADDR_CILIUM_INTERNAL_IP)
            .filter_map(|a| a.ip)
            .find(|ip| ip.is_ipv6() == ipv6)
    }

    /// All pod CIDRs: IPv4 primary and secondaries, then IPv6 primary and secondaries.
    pub fn pod_cidrs(&self) -> Vec<IpNet> {
        self.ipv4_alloc_cidr
            .iter()
            .chain(&self.ipv4_secondary_alloc_cidrs)
            .chain(&self.ipv6_alloc_cidr)
            .chain(&self.ipv6_secondary_alloc_cidrs)
            .copied()
            .collect()
    }

    /// The WireGuard public key (base64): the field, else the annotation (or its alias).
    pub fn wireguard_pub_key(&self) -> Option<&str> {
        [
            Some(self.wireguard_pub_key.as_str()),
            self.annotations
                .get(WG_PUB_KEY_ANNOTATION)
                .map(String::as_str),
            self.annotations
                .get(WG_PUB_KEY_ANNOTATION_ALIAS)
                .map(String::as_str),
        ]
        .into_iter()
        .flatten()
        .find(|k| !k.is_empty())
    }

    /// The WireGuard public key as raw bytes; an error when present but not 32 base64 bytes.
    pub fn wireguard_pub_key_bytes(&self) -> Result<Option<[u8; 32]>, WireError> {
        let Some(key) = self.wireguard_pub_key() else {
            return Ok(None);
        };
        let invalid = |reason: String| WireError::InvalidWireguardKey {
            key: key.to_owned(),
            reason,
        };
        let bytes = BASE64
            .decode(key.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| invalid(format!("{} bytes, expected 32", b.len())))?;
        Ok(Some(arr))
    }

    /// Go-identical JSON bytes.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        to_go_json(self, "node")
    }

    /// Decodes without validation (see `validate::decode_remote_node`).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        from_json(bytes, "node")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const WG_KEY: &str = "kkmwQ0G5ZrUAnvVHqW8pWQbJ1YLQzH2T3Xk7f9L0yxU=";

    /// §2.1's example with the elided key filled in.
    pub fn golden_json() -> String {
        r#"{"Name":"node-a","Cluster":"c1","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.3"},{"Type":"CiliumInternalIP","IP":"10.1.0.12"}],"IPv4AllocCIDR":{"IP":"10.1.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.1.0.55","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":1,"Source":"custom-resource","EncryptionKey":255,"Labels":{"kubernetes.io/hostname":"node-a"},"Annotations":{"network.cilium.io/wg-pub-key":"KEY"},"WireguardPubKey":"KEY","BootID":""}"#
            .replace("KEY", WG_KEY)
    }

    /// A dual-stack node exactly as Cilium 1.19 writes it (clustermesh-apiserver from the
    /// CiliumNode, WireGuard on): InternalIP and ExternalIP of both families, the router IPs
    /// (CiliumInternalIP) and health IPs inside the pod CIDRs, the key as field and annotation.
    pub fn cilium_dual_stack_json() -> String {
        r#"{"Name":"kind-worker","Cluster":"cilium-east","IPAddresses":[{"Type":"InternalIP","IP":"198.18.2.2"},{"Type":"ExternalIP","IP":"203.0.113.7"},{"Type":"InternalIP","IP":"fd00:198:18:2::2"},{"Type":"CiliumInternalIP","IP":"10.2.0.1"},{"Type":"CiliumInternalIP","IP":"fd00:10:2::1"}],"IPv4AllocCIDR":{"IP":"10.2.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:2::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.2.0.77","IPv6HealthIP":"fd00:10:2::4d","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":4,"Source":"custom-resource","EncryptionKey":255,"Labels":{"beta.kubernetes.io/arch":"amd64","beta.kubernetes.io/os":"linux","kubernetes.io/arch":"amd64","kubernetes.io/hostname":"kind-worker","kubernetes.io/os":"linux"},"Annotations":{"network.cilium.io/wg-pub-key":"KEY"},"WireguardPubKey":"KEY","BootID":"3d6e1b8f-4c1a-4f55-9a3e-2b7f0c9d8e11"}"#
            .replace("KEY", WG_KEY)
    }

    #[test]
    fn cilium_dual_stack_addressing() {
        let json = cilium_dual_stack_json();
        let n = KvNode::decode(json.as_bytes()).unwrap();
        assert_eq!(n.encode().unwrap(), json.as_bytes(), "round trip");
        let ips = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse::<IpAddr>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(n.internal_ip(), Some("198.18.2.2".parse().unwrap()));
        assert_eq!(n.node_ip(true), Some("fd00:198:18:2::2".parse().unwrap()));
        assert_eq!(
            n.underlay_ips(),
            ips(&["198.18.2.2", "203.0.113.7", "fd00:198:18:2::2"])
        );
        assert_eq!(
            n.pod_side_ips(),
            ips(&["10.2.0.1", "fd00:10:2::1", "10.2.0.77", "fd00:10:2::4d"])
        );
        assert_eq!(n.pod_cidrs().len(), 2);
        assert_eq!(n.wireguard_pub_key(), Some(WG_KEY));
    }

    pub fn golden_node() -> KvNode {
        let mut n = KvNode::new("c1", "node-a");
        n.ip_addresses = vec![
            NodeAddress::new(ADDR_INTERNAL_IP, "172.18.0.3".parse().unwrap()),
            NodeAddress::new(ADDR_CILIUM_INTERNAL_IP, "10.1.0.12".parse().unwrap()),
        ];
        n.ipv4_alloc_cidr = Some("10.1.0.0/24".parse().unwrap());
        n.ipv4_health_ip = Some("10.1.0.55".parse().unwrap());
        n.cluster_id = 1;
        n.source = SOURCE_CUSTOM_RESOURCE.into();
        n.encryption_key = ENCRYPTION_KEY_WIREGUARD;
        n.labels
            .insert("kubernetes.io/hostname".into(), "node-a".into());
        n.annotations
            .insert(WG_PUB_KEY_ANNOTATION.into(), WG_KEY.into());
        n.wireguard_pub_key = WG_KEY.into();
        n
    }

    #[test]
    fn golden_encode() {
        let out = String::from_utf8(golden_node().encode().unwrap()).unwrap();
        assert_eq!(out, golden_json());
    }

    #[test]
    fn golden_round_trip() {
        let json = golden_json();
        let n = KvNode::decode(json.as_bytes()).unwrap();
        assert_eq!(n, golden_node());
        assert_eq!(n.encode().unwrap(), json.as_bytes());
    }

    #[test]
    fn helpers() {
        let n = golden_node();
        assert_eq!(n.internal_ip(), Some("172.18.0.3".parse().unwrap()));
        assert_eq!(n.node_ip(true), None);
        assert_eq!(
            n.cilium_internal_ip(false),
            Some("10.1.0.12".parse().unwrap())
        );
        assert_eq!(n.pod_cidrs(), vec!["10.1.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(
            n.underlay_ips(),
            vec!["172.18.0.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            n.pod_side_ips(),
            ["10.1.0.12", "10.1.0.55"].map(|s| s.parse::<IpAddr>().unwrap())
        );
        assert_eq!(n.wireguard_pub_key(), Some(WG_KEY));
        assert_eq!(
            n.wireguard_pub_key_bytes().unwrap().map(|k| k.len()),
            Some(32)
        );
        assert_eq!(n.key_name(), "c1/node-a");
        assert_eq!(n.fullname(), "c1/node-a");
        assert_eq!(KvNode::new("default", "x").fullname(), "x");
    }

    #[test]
    fn node_ip_preference() {
        let mut n = KvNode::new("c", "n");
        let a = |t: &str, ip: &str| NodeAddress::new(t, ip.parse().unwrap());
        n.ip_addresses = vec![
            a(ADDR_CILIUM_INTERNAL_IP, "10.0.0.1"),
            a("Hostname", "10.0.0.2"),
            a(ADDR_EXTERNAL_IP, "10.0.0.3"),
            a(ADDR_EXTERNAL_IP, "fd00::3"),
        ];
        assert_eq!(n.node_ip(false), Some("10.0.0.3".parse().unwrap()));
        n.ip_addresses.push(a(ADDR_INTERNAL_IP, "10.0.0.4"));
        assert_eq!(n.node_ip(false), Some("10.0.0.4".parse().unwrap()));
        assert_eq!(n.node_ip(true), Some("fd00::3".parse().unwrap()));
        n.ip_addresses = vec![
            a(ADDR_CILIUM_INTERNAL_IP, "10.0.0.1"),
            a("Other", "fd00::9"),
        ];
        assert_eq!(n.node_ip(false), None);
        assert_eq!(n.internal_ip(), Some("fd00::9".parse().unwrap()));
    }

    #[test]
    fn wireguard_key_sources() {
        let mut n = KvNode::new("c", "n");
        assert_eq!(n.wireguard_pub_key(), None);
        assert!(n.wireguard_pub_key_bytes().unwrap().is_none());
        n.annotations
            .insert(WG_PUB_KEY_ANNOTATION_ALIAS.into(), WG_KEY.into());
        assert_eq!(n.wireguard_pub_key(), Some(WG_KEY));
        n.wireguard_pub_key = "AAAA".into();
        assert_eq!(n.wireguard_pub_key(), Some("AAAA"));
        assert!(n.wireguard_pub_key_bytes().is_err());
        n.wireguard_pub_key = "not base64!".into();
        assert!(n.wireguard_pub_key_bytes().is_err());
    }

    #[test]
    fn decodes_other_versions() {
        // v1.16-style: NodeIdentity, no BootID; CIDRs in string form; IPv6 mask; unknown field.
        let json = r#"{"Name":"n","Cluster":"c","IPAddresses":null,"IPv4AllocCIDR":"10.2.0.0/24","IPv4SecondaryAllocCIDRs":["10.3.0.0/16"],"IPv6AllocCIDR":{"IP":"fd00:2::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"fd00:2::5","ClusterID":2,"Source":"local","EncryptionKey":0,"Labels":null,"Annotations":null,"NodeIdentity":6,"WireguardPubKey":"","Future":{"x":1}}"#;
        let n = KvNode::decode(json.as_bytes()).unwrap();
        assert_eq!(n.node_identity, Some(6));
        assert_eq!(n.ipv4_ingress_ip, None);
        assert_eq!(n.ipv6_health_ip, Some("fd00:2::5".parse().unwrap()));
        assert_eq!(
            n.pod_cidrs(),
            ["10.2.0.0/24", "10.3.0.0/16", "fd00:2::/64"]
                .map(|s| s.parse::<IpNet>().unwrap())
                .to_vec()
        );
        let out = String::from_utf8(n.encode().unwrap()).unwrap();
        assert!(out.contains(r#""IPv4AllocCIDR":{"IP":"10.2.0.0","Mask":"////AA=="}"#));
        assert!(
            out.contains(r#""IPv6AllocCIDR":{"IP":"fd00:2::","Mask":"//////////8AAAAAAAAAAA=="}"#)
        );
        assert!(out.ends_with(r#""NodeIdentity":6,"WireguardPubKey":"","BootID":""}"#));

        // Minimal value: everything optional defaults.
        let n = KvNode::decode(br#"{"Name":"n","Cluster":"c"}"#).unwrap();
        assert_eq!(n, KvNode::new("c", "n"));
        assert_eq!(
            String::from_utf8(n.encode().unwrap()).unwrap(),
            r#"{"Name":"n","Cluster":"c","IPAddresses":null,"IPv4AllocCIDR":null,"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":0,"Source":"","EncryptionKey":0,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":""}"#
        );

        assert!(KvNode::decode(br#"{"Name":"n","IPv4HealthIP":"nope"}"#).is_err());
        assert!(KvNode::decode(br#"{"Name":"n","EncryptionKey":256}"#).is_err());
    }

    #[test]
    fn go_escaping_in_labels() {
        let mut n = KvNode::new("c", "n");
        n.labels.insert("a<b".into(), "x>y&z".into());
        let out = String::from_utf8(n.encode().unwrap()).unwrap();
        assert!(
            out.contains(r#""Labels":{"a\u003cb":"x\u003ey\u0026z"}"#),
            "{out}"
        );
        assert_eq!(KvNode::decode(out.as_bytes()).unwrap(), n);
    }
}
