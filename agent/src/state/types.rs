//! Domain types of the state model, independent of any wire format: the kvstore and
//! Kubernetes sources convert into these.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde::Serialize;

/// Cluster names are repeated in every object; sharing one allocation keeps the per-endpoint
/// footprint small (100k+ endpoints in a large mesh).
pub type ClusterName = Arc<str>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub cluster: ClusterName,
    pub cluster_id: u32,
    pub name: String,
    /// The address peers reach this node at (InternalIP, else ExternalIP, else any).
    pub node_ip: Option<IpAddr>,
    /// Underlay addresses (InternalIP, ExternalIP, any other type but CiliumInternalIP):
    /// never routed into the tunnel.
    pub underlay_ips: Vec<IpAddr>,
    /// Pod-side addresses: router (CiliumInternalIP), health and ingress IPs. Cilium takes them
    /// from the node's pod CIDR; they are reached through the tunnel like pods, never underlay.
    pub pod_side_ips: Vec<IpAddr>,
    /// Pod CIDRs (primary and secondary, IPv4 and IPv6).
    pub pod_cidrs: Vec<IpNet>,
    /// Base64 WireGuard public key, if the node has one.
    pub wireguard_pubkey: Option<String>,
    /// Cilium's encryption key index: 255 with WireGuard, 0 for none.
    pub encryption_key: u8,
}

/// An ipcache entry: which identity lives behind an address or prefix, and on which node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub prefix: IpNet,
    pub cluster: ClusterName,
    pub identity: u32,
    /// Node hosting the endpoint (WireGuard peer / tunnel endpoint), if known.
    pub host_ip: Option<IpAddr>,
    pub encryption_key: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub id: u32,
    pub cluster: ClusterName,
    /// Labels as `source:key=value`, sorted by key (Cilium's sorted-list order).
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    pub fn new(namespace: &str, name: &str) -> ServiceName {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Kubernetes' and Cilium's spelling (`TCP`, any case).
    pub fn parse(p: &str) -> Option<Protocol> {
        match p.to_ascii_uppercase().as_str() {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// A port of a frontend or backend: name (`""` when unnamed) → protocol and number.
pub type PortMap = BTreeMap<String, (Protocol, u16)>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    #[default]
    None,
    Local,
    Remote,
}

impl std::fmt::Display for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Affinity::None => "none",
            Affinity::Local => "local",
            Affinity::Remote => "remote",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    /// Draining: existing connections may finish, new ones must not be sent here.
    Terminating,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub ip: IpAddr,
    pub ports: PortMap,
    pub state: BackendState,
}

/// One cluster's view of a service: the local definition, or what a remote exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterService {
    pub name: ServiceName,
    pub cluster: ClusterName,
    pub cluster_id: u32,
    /// VIPs with their service ports.
    pub frontends: BTreeMap<IpAddr, PortMap>,
    pub backends: Vec<Backend>,
    /// `service.cilium.io/global`.
    pub global: bool,
    /// `service.cilium.io/shared` (only meaningful when global; default true).
    pub shared: bool,
    pub affinity: Affinity,
}
