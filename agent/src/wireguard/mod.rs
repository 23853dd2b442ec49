//! Transparent WireGuard encryption between nodes, Cilium-compatible (UDP 51871, raw 32-byte
//! key file, one peer per remote node with its pod CIDRs as AllowedIPs).
//!
//! * [`key`]: the node's private key on disk.
//! * [`WireguardManager`] ([`device`]): one device per node through `wireguard-control`, on the
//!   kernel backend where the module exists, else on a `wireguard-go` child process strait
//!   owns ([`userspace`]); peer updates by per-peer diff; status.
//! * [`PeerPlanner`] ([`peers`]): the desired peers from the state model (pure).
//! * [`EncryptionAgent`] ([`agent`]): the level-triggered loop tying the state model to the
//!   peers and to the routes ([`crate::routing`]).
//!
//! Everything runs in a configurable network namespace (default: the calling thread's), so a
//! test can run one "node" per namespace.

pub mod agent;
pub mod device;
pub mod key;
pub mod peers;
pub mod userspace;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::Serialize;

pub use agent::{Applied, EncryptionAgent, EncryptionConfig};
pub use device::{DeviceStatus, PeerReport, PeerStatus, WireguardManager};
pub use peers::{DesiredPeer, NodeRef, PeerPlan, PeerPlanner, PlannerOptions};

use crate::{
    constants::{STATE_DIR, WIREGUARD_DEVICE, WIREGUARD_KEY_FILE, WIREGUARD_PORT},
    netns::NetnsError,
    routing::RoutingError,
};

/// Which WireGuard implementation to drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Kernel where the module is available, else userspace.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            other => Err(format!(
                "unknown WireGuard backend {other:?} (auto, kernel or userspace)"
            )),
        }
    }
}

/// The backend actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kernel,
    Userspace,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        })
    }
}

#[derive(Debug, Clone)]
pub struct WireguardConfig {
    /// Device name (≤ 15 bytes; machine-wide unique with the userspace backend).
    pub device: String,
    /// UDP listen port, and the port of every peer's endpoint.
    pub port: u16,
    /// Directory holding the private key file.
    pub state_dir: PathBuf,
    pub backend: BackendChoice,
    /// The userspace implementation (run as `<program> -f <device>`).
    pub wireguard_go: PathBuf,
    /// This node's cluster and name: its own record is never a peer.
    pub local_cluster: String,
    pub local_node: String,
    /// Also put every peer's node IPs (/32, /128) in its AllowedIPs (default off). This only
    /// lets the peers' node addresses through the tunnel; steering node-to-node traffic into
    /// it needs fwmark policy routing (the endpoints are node IPs), which strait does not
    /// install yet.
    pub node_encryption: bool,
    /// Native routing: also put the ipcache prefixes whose host IP is the peer's node in its
    /// AllowedIPs (default off).
    pub track_endpoint_ips: bool,
    /// Persistent keepalive in seconds (`None`: off, Cilium's default).
    pub persistent_keepalive: Option<u16>,
    /// Namespace file (e.g. `/var/run/netns/<name>`); `None`: the namespace of the thread that
    /// starts the manager.
    pub netns: Option<PathBuf>,
    /// How long wireguard-go may take to open its UAPI socket.
    pub startup_timeout: Duration,
}

impl WireguardConfig {
    /// Defaults for the node `local_node` of `local_cluster`.
    pub fn new(local_cluster: &str, local_node: &str) -> Self {
        Self {
            device: WIREGUARD_DEVICE.to_owned(),
            port: WIREGUARD_PORT,
            state_dir: PathBuf::from(STATE_DIR),
            backend: BackendChoice::Auto,
            wireguard_go: PathBuf::from("wireguard-go"),
            local_cluster: local_cluster.to_owned(),
            local_node: local_node.to_owned(),
            node_encryption: false,
            track_endpoint_ips: false,
            persistent_keepalive: None,
            netns: None,
            startup_timeout: Duration::from_secs(10),
        }
    }

    pub fn key_path(&self) -> PathBuf {
        self.state_dir.join(WIREGUARD_KEY_FILE)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("invalid WireGuard device name {device:?}: {reason}")]
    DeviceName { device: String, reason: String },
    #[error("cannot {op} WireGuard key file {path}: {source}")]
    KeyFile {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "WireGuard key file {path} holds {len} bytes, not 32: refusing to replace the node's key; \
         remove the file to generate a new one"
    )]
    BadKeyFile { path: PathBuf, len: usize },
    #[error("kernel WireGuard is not available for {device}: {source}")]
    KernelUnavailable {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {program} for {device}: {source}")]
    Spawn {
        program: PathBuf,
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wireguard-go for {device} exited ({status}) before opening its UAPI socket {socket}")]
    ExitedEarly {
        device: String,
        socket: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("wireguard-go for {device} did not open its UAPI socket {socket} within {timeout:?}")]
    SocketTimeout {
        device: String,
        socket: PathBuf,
        timeout: Duration,
    },
    #[error(
        "a wireguard-go outside {netns} already serves device {device} (UAPI socket {socket}); \
         userspace device names must be unique on the machine"
    )]
    NameInUse {
        device: String,
        netns: String,
        socket: PathBuf,
    },
    #[error("configuring {device}: {source}")]
    Configure {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("applying peer changes to {device} ({peers}): {source}")]
    ApplyPeers {
        device: String,
        /// The peers the failed update touched, e.g. `add c2/node-1 (endpoint 198.18.0.2:51871)`.
        peers: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {device}: {source}")]
    Read {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WireGuard worker task failed: {0}")]
    Task(String),
    #[error("the WireGuard manager for {device} was stopped")]
    Stopped { device: String },
}

/// Used in error messages: `peer` (node) with its endpoint.
pub(crate) fn describe_peer(node: &NodeRef, endpoint: Option<SocketAddr>) -> String {
    match endpoint {
        Some(ep) => format!("{node} (endpoint {ep})"),
        None => node.to_string(),
    }
}

/// The UAPI socket wireguard-go opens for `device`.
pub fn uapi_socket(device: &str) -> PathBuf {
    Path::new(crate::constants::WIREGUARD_RUN_DIR).join(format!("{device}.sock"))
}
