//! [`WireguardManager`]: the node's one WireGuard device. It picks the backend, owns the
//! wireguard-go child on the userspace backend, sets the key and port, applies per-peer diffs
//! and reports status. All calls are blocking (netlink or the UAPI socket, both quick); async
//! callers use `spawn_blocking`. Every call enters the device's namespace itself, so it works
//! from any thread.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    sync::Mutex,
    time::UNIX_EPOCH,
};

use ipnet::IpNet;
use serde::Serialize;
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use super::{
    BackendChoice, BackendKind, WireguardConfig, WireguardError, describe_peer,
    key::{self, PrivateKey},
    peers::{CurrentPeer, NodeRef, PeerOp, PeerPlan, PeerPlanner, PlannerOptions, diff},
    uapi_socket,
    userspace::WgGoChild,
};
use crate::routing::TargetNetns;

/// Per-peer status, for `strait status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerStatus {
    /// Node and cluster owning the key (`None` for a peer strait does not know, e.g. a leftover
    /// awaiting garbage collection).
    pub node: Option<String>,
    pub cluster: Option<String>,
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the Unix epoch of the last handshake; `None`: never.
    pub last_handshake_unix: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub allowed_ips: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceStatus {
    pub device: String,
    pub backend: BackendKind,
    pub netns: String,
    pub public_key: String,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerStatus>,
}

/// What one peer reconcile changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerReport {
    pub peers: usize,
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

struct Inner {
    /// The wireguard-go process (userspace backend, when strait started it).
    child: Option<WgGoChild>,
    /// Keys strait configured, with their nodes: removed as soon as their node goes.
    owned: HashMap<[u8; 32], NodeRef>,
    stopped: bool,
}

pub struct WireguardManager {
    cfg: WireguardConfig,
    iface: InterfaceName,
    netns: TargetNetns,
    backend: BackendKind,
    key: PrivateKey,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for WireguardManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireguardManager")
            .field("device", &self.cfg.device)
            .field("backend", &self.backend)
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

impl WireguardManager {
    /// Loads or creates the key, creates the device (starting wireguard-go on the userspace
    /// backend) and sets key and port. The namespace is `cfg.netns`, else the calling thread's.
    pub fn start(cfg: WireguardConfig) -> Result<Self, WireguardError> {
        let netns = TargetNetns::from_config(cfg.netns.as_deref())?;
        Self::start_in(cfg, netns)
    }

    /// [`start`](Self::start) in an explicit namespace.
    pub fn start_in(cfg: WireguardConfig, netns: TargetNetns) -> Result<Self, WireguardError> {
        let iface: InterfaceName =
            cfg.device
                .parse()
                .map_err(|e: wireguard_control::InvalidInterfaceName| {
                    WireguardError::DeviceName {
                        device: cfg.device.clone(),
                        reason: e.to_string(),
                    }
                })?;
        let key = key::load_or_create(&cfg.key_path())?;
        let (backend, reason, adopted) = choose_backend(&cfg, &iface, &netns)?;
        tracing::info!(device = %cfg.device, %backend, %reason, netns = %netns, "WireGuard backend chosen");

        let child = match (backend, adopted) {
            (BackendKind::Userspace, false) => {
                // A socket nobody answers on is a leftover of a crashed wireguard-go.
                let _ = std::fs::remove_file(uapi_socket(&cfg.device));
                Some(WgGoChild::spawn(
                    &cfg.wireguard_go,
                    &cfg.device,
                    &netns,
                    cfg.startup_timeout,
                )?)
            }
            _ => None,
        };
        let this = Self {
            iface,
            netns,
            backend,
            key,
            inner: Mutex::new(Inner {
                child,
                owned: HashMap::new(),
                stopped: false,
            }),
            cfg,
        };
        this.configure_device()?;
        tracing::info!(device = %this.cfg.device, port = this.cfg.port, public_key = %this.public_key(), "WireGuard device ready");
        Ok(this)
    }

    /// Base64 public key, for the node record strait publishes.
    pub fn public_key(&self) -> String {
        self.key.public().to_base64()
    }

    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    pub fn device(&self) -> &str {
        &self.cfg.device
    }

    pub fn config(&self) -> &WireguardConfig {
        &self.cfg
    }

    pub fn netns(&self) -> &TargetNetns {
        &self.netns
    }

    /// PID of the wireguard-go child strait owns, if any.
    pub fn child_pid(&self) -> Option<u32> {
        self.lock().child.as_ref().and_then(WgGoChild::pid)
    }

    /// Whether the wireguard-go child strait owns has exited (its device went with it): the
    /// agent then reconciles at once rather than at the next resync. `false` while another
    /// call holds the device.
    pub fn child_exited(&self) -> bool {
        self.inner
            .try_lock()
            .is_ok_and(|mut inner| inner.child.as_mut().is_some_and(|c| c.exited().is_some()))
    }

    /// A planner configured for this node and device.
    pub fn planner(&self) -> PeerPlanner {
        PeerPlanner::new(PlannerOptions {
            local_cluster: self.cfg.local_cluster.clone(),
            local_node: self.cfg.local_node.clone(),
            own_public_key: Some(self.key.public()),
            port: self.cfg.port,
            node_encryption: self.cfg.node_encryption,
            track_endpoint_ips: self.cfg.track_endpoint_ips,
        })
    }

    /// Takes the device's peers to `plan` by per-peer diff: only peers that differ are sent,
    /// a changed AllowedIPs list replaces that peer's list only, the device is never recreated.
    /// Peers strait never configured are removed only once `synced` (initial sync done).
    pub fn reconcile(&self, plan: &PeerPlan, synced: bool) -> Result<PeerReport, WireguardError> {
        let mut inner = self.lock();
        if inner.stopped {
            return Err(WireguardError::Stopped {
                device: self.cfg.device.clone(),
            });
        }
        self.ensure_running(&mut inner)?;
        let current = self.read_peers()?;
        let ops = diff(
            plan,
            &current,
            &inner.owned,
            synced,
            self.cfg.persistent_keepalive,
        );
        let mut report = PeerReport {
            peers: plan.peers.len(),
            ..PeerReport::default()
        };
        if !ops.is_empty() {
            let mut update = DeviceUpdate::new();
            let mut touched = Vec::new();
            for op in &ops {
                match op {
                    PeerOp::Remove { key, node } => {
                        update = update.remove_peer_by_key(&Key(*key));
                        let who = node
                            .as_ref()
                            .map_or_else(|| Key(*key).to_base64(), NodeRef::to_string);
                        tracing::info!(device = %self.cfg.device, peer = %who, "removing WireGuard peer");
                        touched.push(format!("remove {who}"));
                        report.removed += 1;
                    }
                    PeerOp::Add(key) => {
                        let want = &plan.peers[key];
                        let mut peer = PeerConfigBuilder::new(&want.public_key)
                            .set_endpoint(want.endpoint)
                            .replace_allowed_ips()
                            .add_allowed_ips(&allowed(&want.allowed_ips));
                        if let Some(k) = self.cfg.persistent_keepalive {
                            peer = peer.set_persistent_keepalive_interval(k);
                        }
                        update = update.add_peer(peer);
                        tracing::info!(device = %self.cfg.device, peer = %want.node, endpoint = %want.endpoint, allowed_ips = want.allowed_ips.len(), "adding WireGuard peer");
                        touched.push(format!(
                            "add {}",
                            describe_peer(&want.node, Some(want.endpoint))
                        ));
                        report.added += 1;
                    }
                    PeerOp::Update {
                        key,
                        endpoint,
                        allowed_ips,
                        keepalive,
                    } => {
                        let want = &plan.peers[key];
                        let mut peer = PeerConfigBuilder::new(&want.public_key);
                        if *endpoint {
                            peer = peer.set_endpoint(want.endpoint);
                        }
                        if *allowed_ips {
                            peer = peer
                                .replace_allowed_ips()
                                .add_allowed_ips(&allowed(&want.allowed_ips));
                        }
                        if *keepalive {
                            peer = peer.set_persistent_keepalive_interval(
                                self.cfg.persistent_keepalive.unwrap_or(0),
                            );
                        }
                        update = update.add_peer(peer);
                        tracing::info!(device = %self.cfg.device, peer = %want.node, endpoint = *endpoint, allowed_ips = *allowed_ips, keepalive = *keepalive, "updating WireGuard peer");
                        touched.push(format!(
                            "update {}",
                            describe_peer(&want.node, Some(want.endpoint))
                        ));
                        report.updated += 1;
                    }
                }
            }
            self.apply(update)
                .map_err(|source| WireguardError::ApplyPeers {
                    device: self.cfg.device.clone(),
                    peers: summarize(&touched),
                    source,
                })?;
        }
        inner.owned = plan.names();
        Ok(report)
    }

    /// Per-peer status read from the device.
    pub fn status(&self) -> Result<DeviceStatus, WireguardError> {
        let device = self.read_device()?;
        let names = self.lock().owned.clone();
        let peers = device
            .peers
            .into_iter()
            .map(|p| {
                let node = names.get(&p.config.public_key.0);
                PeerStatus {
                    node: node.map(|n| n.name.clone()),
                    cluster: node.map(|n| n.cluster.clone()),
                    public_key: p.config.public_key.to_base64(),
                    endpoint: p.config.endpoint,
                    last_handshake_unix: p
                        .stats
                        .last_handshake_time
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    rx_bytes: p.stats.rx_bytes,
                    tx_bytes: p.stats.tx_bytes,
                    allowed_ips: p.config.allowed_ips.len(),
                }
            })
            .collect();
        Ok(DeviceStatus {
            device: self.cfg.device.clone(),
            backend: self.backend,
            netns: self.netns.to_string(),
            public_key: self.public_key(),
            listen_port: device.listen_port,
            peers,
        })
    }

    /// Stops the wireguard-go child (by PID) on the userspace backend; later calls fail with
    /// [`WireguardError::Stopped`]. A kernel device is left in place with its peers, as Cilium
    /// does, so traffic keeps flowing across an agent restart; the next start reconciles it.
    /// Idempotent; also done on drop.
    pub fn stop(&self) {
        let mut inner = self.lock();
        inner.stopped = true;
        if let Some(mut child) = inner.child.take() {
            child.stop();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restarts wireguard-go if it died: the device (and its routes) went with it, and the
    /// reconcile that follows re-adds every peer.
    fn ensure_running(&self, inner: &mut Inner) -> Result<(), WireguardError> {
        if self.backend == BackendKind::Kernel {
            // Someone deleted the link: recreate it (empty; the reconcile re-adds the peers).
            let present = {
                let _inside = self.netns.enter()?;
                link_exists(&self.cfg.device)
            };
            if !present {
                tracing::error!(device = %self.cfg.device, "WireGuard device disappeared; recreating it");
                create_kernel_device(&self.iface, &self.netns).map_err(|source| {
                    WireguardError::Configure {
                        device: self.cfg.device.clone(),
                        source,
                    }
                })?;
                return self.configure_device();
            }
            return Ok(());
        }
        match inner.child.as_mut() {
            Some(child) => {
                let Some(status) = child.exited() else {
                    return Ok(());
                };
                tracing::error!(device = %self.cfg.device, %status, "wireguard-go exited; restarting it");
                child.stop();
            }
            // An adopted wireguard-go (not ours) that went away: from now on strait owns one.
            None if UnixStream::connect(uapi_socket(&self.cfg.device)).is_err() => {
                tracing::error!(device = %self.cfg.device, "the adopted wireguard-go is gone; starting one");
                let _ = std::fs::remove_file(uapi_socket(&self.cfg.device));
            }
            None => return Ok(()),
        }
        inner.child = Some(WgGoChild::spawn(
            &self.cfg.wireguard_go,
            &self.cfg.device,
            &self.netns,
            self.cfg.startup_timeout,
        )?);
        self.configure_device()
    }

    fn configure_device(&self) -> Result<(), WireguardError> {
        let update = DeviceUpdate::new()
            .set_private_key(self.key.key().clone())
            .set_listen_port(self.cfg.port);
        self.apply(update)
            .map_err(|source| WireguardError::Configure {
                device: self.cfg.device.clone(),
                source,
            })
    }

    fn apply(&self, update: DeviceUpdate) -> std::io::Result<()> {
        let backend = self.wg_backend();
        if backend == Backend::Userspace
            && UnixStream::connect(uapi_socket(&self.cfg.device)).is_err()
        {
            // wireguard-control would otherwise try to start a wireguard-go of its own, which
            // strait would not own.
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the wireguard-go UAPI socket is gone",
            ));
        }
        let _inside = self.netns.enter().map_err(std::io::Error::other)?;
        update.apply(&self.iface, backend)
    }

    fn read_device(&self) -> Result<Device, WireguardError> {
        let err = |source| WireguardError::Read {
            device: self.cfg.device.clone(),
            source,
        };
        let _inside = self.netns.enter()?;
        Device::get(&self.iface, self.wg_backend()).map_err(err)
    }

    fn read_peers(&self) -> Result<Vec<CurrentPeer>, WireguardError> {
        let device = self.read_device()?;
        // A large kernel dump can split one peer over several messages: merge by key.
        let mut by_key: Vec<CurrentPeer> = Vec::with_capacity(device.peers.len());
        let mut index: HashMap<[u8; 32], usize> = HashMap::new();
        for p in device.peers {
            let ips = p
                .config
                .allowed_ips
                .iter()
                .filter_map(|a| IpNet::new(a.address, a.cidr).ok().map(|n| n.trunc()));
            match index.get(&p.config.public_key.0) {
                Some(&i) => by_key[i].allowed_ips.extend(ips),
                None => {
                    index.insert(p.config.public_key.0, by_key.len());
                    by_key.push(CurrentPeer {
                        public_key: p.config.public_key.clone(),
                        endpoint: p.config.endpoint,
                        allowed_ips: ips.collect(),
                        keepalive: p.config.persistent_keepalive_interval,
                    });
                }
            }
        }
        Ok(by_key)
    }

    fn wg_backend(&self) -> Backend {
        match self.backend {
            BackendKind::Kernel => Backend::Kernel,
            BackendKind::Userspace => Backend::Userspace,
        }
    }
}

impl Drop for WireguardManager {
    fn drop(&mut self) {
        self.stop();
    }
}

fn allowed(ips: &BTreeSet<IpNet>) -> Vec<wireguard_control::AllowedIp> {
    ips.iter()
        .map(|n| wireguard_control::AllowedIp {
            address: n.addr(),
            cidr: n.prefix_len(),
        })
        .collect()
}

fn summarize(touched: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = touched
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if touched.len() > SHOWN {
        s.push_str(&format!(" and {} more", touched.len() - SHOWN));
    }
    s
}

/// Picks the backend. Returns it, why, and whether an existing userspace device is adopted.
fn choose_backend(
    cfg: &WireguardConfig,
    iface: &InterfaceName,
    netns: &TargetNetns,
) -> Result<(BackendKind, String, bool), WireguardError> {
    // A wireguard-go already serving this name: ours to adopt if its device is in our
    // namespace (e.g. left by a previous strait that was killed), a conflict otherwise.
    let socket = uapi_socket(&cfg.device);
    let live = UnixStream::connect(&socket).is_ok();
    if live && cfg.backend != BackendChoice::Kernel {
        let here = {
            let _inside = netns.enter()?;
            link_exists(&cfg.device)
        };
        if !here {
            return Err(WireguardError::NameInUse {
                device: cfg.device.clone(),
                netns: netns.to_string(),
                socket,
            });
        }
        tracing::warn!(device = %cfg.device, "adopting a running wireguard-go strait did not start: it will not be stopped by strait");
        return Ok((
            BackendKind::Userspace,
            "an existing wireguard-go serves the device".into(),
            true,
        ));
    }
    match cfg.backend {
        BackendChoice::Userspace => Ok((BackendKind::Userspace, "configured".into(), false)),
        BackendChoice::Kernel => {
            create_kernel_device(iface, netns).map_err(|source| {
                WireguardError::KernelUnavailable {
                    device: cfg.device.clone(),
                    source,
                }
            })?;
            Ok((BackendKind::Kernel, "configured".into(), false))
        }
        BackendChoice::Auto => {
            if Path::new("/sys/module/wireguard").exists() {
                create_kernel_device(iface, netns).map_err(|source| {
                    WireguardError::KernelUnavailable {
                        device: cfg.device.clone(),
                        source,
                    }
                })?;
                return Ok((
                    BackendKind::Kernel,
                    "the wireguard module is loaded".into(),
                    false,
                ));
            }
            // Creating the link lets the kernel load the module where that is allowed.
            match create_kernel_device(iface, netns) {
                Ok(()) => Ok((
                    BackendKind::Kernel,
                    "created a kernel wireguard link".into(),
                    false,
                )),
                Err(e) => Ok((
                    BackendKind::Userspace,
                    format!("no kernel WireGuard ({e}): using wireguard-go"),
                    false,
                )),
            }
        }
    }
}

/// Creates the kernel device (an existing one is kept, with its peers).
fn create_kernel_device(iface: &InterfaceName, netns: &TargetNetns) -> std::io::Result<()> {
    let _inside = netns.enter().map_err(std::io::Error::other)?;
    DeviceUpdate::new().apply(iface, Backend::Kernel)
}

fn link_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: valid NUL-terminated string; if_nametoindex only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}
