//! WireGuard test topology and helpers: node namespaces on a closed underlay, a pod namespace
//! behind each node, strait's encryption agent per node, packet captures, hand-run
//! wireguard-go, traffic helpers and the reconcile benchmark.
//!
//! Underlay: one "router" namespace; node `i` (1-based) is `198.18.i.2/24` on a veth to the
//! router's `198.18.i.1`, with a default route to it. The router forwards between nodes and
//! knows every pod CIDR through its node, so a plaintext path between pods always exists:
//! a capture on the underlay then really shows whether traffic went through WireGuard. The
//! router has no route out of the machine, and nothing is sent from the root namespace.
//!
//! Pods: node `i` holds `10.i.0.1/24` on a veth to its pod namespace (`10.i.0.2`, default
//! route via the node); nodes forward.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use strait::{
    constants::{NETNS_RUN_DIR, WIREGUARD_GO_ENV},
    routing::{RouteReconciler, RoutingConfig},
    state::{Node, StateHandle, StateModel},
    wireguard::{
        Applied, BackendChoice, EncryptionAgent, EncryptionConfig, WireguardConfig,
        WireguardManager, uapi_socket,
    },
};
use tokio::{runtime::Runtime, sync::watch};

use crate::{Netns, VethPair, unique_name};

/// How long an agent may take to apply a model change.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// A multi-threaded runtime for the agents; the test thread does blocking socket I/O.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

/// Runs `ip -n <ns> <args>` and returns stdout; panics on failure.
pub fn ip_in(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns.name())
        .args(args)
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "`ip -n {} {}` failed: {}",
        ns.name(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Path of a named namespace's nsfs file.
pub fn netns_path(ns: &Netns) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(ns.name())
}

/// One node: its namespace, its pod namespace and addresses.
pub struct TestNode {
    pub index: u8,
    pub ns: Netns,
    pub pod: Netns,
    pub underlay_ip: Ipv4Addr,
    /// The node's end of the underlay veth.
    pub underlay_if: String,
    pub pod_cidr: IpNet,
    /// The node's address on the pod veth (the pod's default gateway).
    pub gateway: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
}

pub struct Topology {
    pub nodes: Vec<TestNode>,
    pub router: Netns,
}

impl Topology {
    /// `count` nodes (≤ 9). `underlay_mtu` sets the MTU of every underlay veth.
    pub fn new(count: u8, underlay_mtu: Option<u32>) -> Self {
        assert!((1..=9).contains(&count));
        let router = Netns::new();
        quiet(&router);
        router.sysctl("net/ipv4/ip_forward", "1");
        let mut nodes = Vec::new();
        for i in 1..=count {
            let ns = Netns::new();
            let pod = Netns::new();
            quiet(&ns);
            quiet(&pod);
            ns.sysctl("net/ipv4/ip_forward", "1");
            let underlay_ip = Ipv4Addr::new(198, 18, i, 2);
            let underlay = VethPair::new(
                &ns,
                &format!("{underlay_ip}/24"),
                &router,
                &format!("198.18.{i}.1/24"),
            );
            if let Some(mtu) = underlay_mtu {
                let mtu = mtu.to_string();
                ip_in(&ns, &["link", "set", &underlay.a, "mtu", &mtu]);
                ip_in(&router, &["link", "set", &underlay.b, "mtu", &mtu]);
            }
            ip_in(
                &ns,
                &["route", "add", "default", "via", &format!("198.18.{i}.1")],
            );
            let gateway = Ipv4Addr::new(10, i, 0, 1);
            let pod_ip = Ipv4Addr::new(10, i, 0, 2);
            VethPair::new(&ns, &format!("{gateway}/24"), &pod, &format!("{pod_ip}/24"));
            ip_in(
                &pod,
                &["route", "add", "default", "via", &gateway.to_string()],
            );
            // The plaintext path a leak would take.
            ip_in(
                &router,
                &[
                    "route",
                    "add",
                    &format!("10.{i}.0.0/24"),
                    "via",
                    &underlay_ip.to_string(),
                ],
            );
            nodes.push(TestNode {
                index: i,
                ns,
                pod,
                underlay_ip,
                underlay_if: underlay.a,
                pod_cidr: format!("10.{i}.0.0/24").parse().unwrap(),
                gateway,
                pod_ip,
            });
        }
        Self { nodes, router }
    }
}

impl Topology {
    /// Unencrypted baseline: routes every other node's pod CIDR explicitly over the underlay,
    /// via the router, in each node: one route per remote pod CIDR, the same shape as the
    /// routes strait puts on its WireGuard device, but in clear. (Without it the nodes' default
    /// route reaches the same router; this makes the plaintext path explicit.)
    pub fn route_pods_in_clear(&self) {
        for node in &self.nodes {
            let via = format!("198.18.{}.1", node.index);
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                ip_in(
                    &node.ns,
                    &[
                        "route",
                        "add",
                        &other.pod_cidr.to_string(),
                        "via",
                        &via,
                        "dev",
                        &node.underlay_if,
                    ],
                );
            }
        }
    }

    /// Names of every namespace of this topology (router, nodes, pods).
    pub fn netns_names(&self) -> Vec<String> {
        std::iter::once(&self.router)
            .chain(self.nodes.iter().flat_map(|n| [&n.ns, &n.pod]))
            .map(|ns| ns.name().to_owned())
            .collect()
    }
}

/// No IPv6 (no router solicitations or MLD on the wire: every captured packet is ours).
fn quiet(ns: &Netns) {
    ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1");
    ns.sysctl("net/ipv6/conf/default/disable_ipv6", "1");
}

/// A node record as the state model holds it.
pub fn node_record(
    cluster: &str,
    cluster_id: u32,
    name: &str,
    node: &TestNode,
    pubkey: Option<String>,
) -> Node {
    Node {
        cluster: cluster.into(),
        cluster_id,
        name: name.to_owned(),
        node_ip: Some(IpAddr::V4(node.underlay_ip)),
        underlay_ips: vec![IpAddr::V4(node.underlay_ip)],
        pod_side_ips: vec![],
        pod_cidrs: vec![node.pod_cidr],
        wireguard_pubkey: pubkey,
        encryption_key: 255,
    }
}

/// strait's encryption agent for one test node, with its own state model and state dir.
pub struct NodeAgent {
    // Dropped first: ends wireguard-go before the namespaces go.
    pub agent: EncryptionAgent,
    pub state: StateHandle,
    pub synced: watch::Sender<bool>,
    pub cluster: String,
    pub cluster_id: u32,
    pub name: String,
    pub device: String,
    pub state_dir: tempfile::TempDir,
}

impl NodeAgent {
    /// Starts an agent in `node`'s namespace for node `cluster/name`; its own record (with its
    /// key) is put in its model. `tweak` adjusts the config (strict mode, sync flag...).
    pub fn start(
        rt: &Runtime,
        node: &TestNode,
        cluster: &str,
        cluster_id: u32,
        name: &str,
        tweak: impl FnOnce(&mut EncryptionConfig),
    ) -> Self {
        Self::start_with_dir(
            rt,
            node,
            cluster,
            cluster_id,
            name,
            tempfile::tempdir().unwrap(),
            tweak,
        )
    }

    pub fn start_with_dir(
        rt: &Runtime,
        node: &TestNode,
        cluster: &str,
        cluster_id: u32,
        name: &str,
        state_dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut EncryptionConfig),
    ) -> Self {
        let device = unique_name("wg");
        let mut cfg = EncryptionConfig::new(cluster, name);
        cfg.wireguard.device = device.clone();
        cfg.wireguard.state_dir = state_dir.path().to_path_buf();
        cfg.wireguard.netns = Some(netns_path(&node.ns));
        tweak(&mut cfg);
        let state = StateHandle::new(cluster, cluster_id);
        let (synced, synced_rx) = watch::channel(true);
        let agent = rt
            .block_on(EncryptionAgent::start(cfg, state.clone(), synced_rx))
            .unwrap_or_else(|e| panic!("starting the encryption agent for {cluster}/{name}: {e}"));
        let this = Self {
            agent,
            state,
            synced,
            cluster: cluster.to_owned(),
            cluster_id,
            name: name.to_owned(),
            device,
            state_dir,
        };
        let own = this.record(node);
        this.state.update(|m| m.upsert_node(own));
        this.wait(rt);
        this
    }

    /// This node's record with its current public key.
    pub fn record(&self, node: &TestNode) -> Node {
        node_record(
            &self.cluster,
            self.cluster_id,
            &self.name,
            node,
            Some(self.agent.public_key()),
        )
    }

    /// Waits until the agent applied everything its model holds now.
    pub fn wait(&self, rt: &Runtime) -> Applied {
        let versions = self.state.versions();
        rt.block_on(self.agent.wait_applied(versions, APPLY_TIMEOUT))
            .unwrap_or_else(|last| {
                panic!(
                    "{}/{}: model version {versions:?} not applied within {APPLY_TIMEOUT:?}; last pass: {last:?}",
                    self.cluster, self.name
                )
            })
    }

    /// Adds or replaces `nodes` (registering their clusters) in this agent's model and waits.
    pub fn learn(&self, rt: &Runtime, nodes: &[Node]) {
        self.state.update(|m| {
            for n in nodes {
                register(m, &n.cluster, n.cluster_id);
                m.upsert_node(n.clone());
            }
        });
        self.wait(rt);
    }

    pub fn stop(self, rt: &Runtime) -> tempfile::TempDir {
        rt.block_on(self.agent.stop());
        self.state_dir
    }
}

fn register(m: &mut StateModel, cluster: &str, id: u32) {
    m.register_cluster(cluster, id)
        .unwrap_or_else(|e| panic!("registering cluster {cluster}: {e}"));
}

/// Gives every agent every node's record (full mesh).
pub fn publish_mesh(rt: &Runtime, members: &[(&NodeAgent, &TestNode)]) {
    let records: Vec<Node> = members.iter().map(|(a, n)| a.record(n)).collect();
    for (agent, _) in members {
        agent.learn(rt, &records);
    }
}

/// Polls `f` until true or `timeout`; returns whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Routes strait owns in `ns` (protocol 161), as `ip route` prints them.
pub fn strait_routes(ns: &Netns) -> Vec<String> {
    ip_in(ns, &["route", "show", "proto", "161"])
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// `(ifindex, mtu)` of a link, from `ip -o link show`.
pub fn link_info(ns: &Netns, dev: &str) -> (u32, u32) {
    let out = ip_in(ns, &["-o", "link", "show", "dev", dev]);
    let index = out
        .split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex in {out:?}"));
    let mtu = out
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {out:?}"));
    (index, mtu)
}

/// A tcpdump capture inside a namespace, written to a file and read back with `-r`. The
/// process is ended by PID (on `finish` or drop).
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    /// Starts capturing on `iface` in `ns` and returns once tcpdump is listening.
    pub fn start(ns: &Netns, iface: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("capture.pcap");
        // `ip netns exec` execs tcpdump: the PID we hold is tcpdump's. Immediate mode: without
        // it libpcap holds packets in a ring block for up to a second, and a capture stopped
        // sooner loses them. `-Z root`: Debian's tcpdump would otherwise drop to its own user
        // and fail to write the file.
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "tcpdump",
                "-i",
                iface,
                "-n",
                "--immediate-mode",
            ])
            .args(["-U", "-Z", "root", "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let mut this = Self {
            child: Some(child),
            file,
            _dir: dir,
        };
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            this.stop();
            panic!(
                "tcpdump did not start listening on {iface} in {}",
                ns.name()
            );
        }
        this
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the capture and returns the packets as `tcpdump -r -nn` prints them.
    pub fn finish(mut self) -> Vec<String> {
        // Let in-flight packets land in the file.
        std::thread::sleep(Duration::from_millis(200));
        self.stop();
        let out = Command::new("tcpdump")
            .args(["-r"])
            .arg(&self.file)
            .args(["-nn"])
            .output()
            .expect("running tcpdump -r");
        assert!(
            out.status.success(),
            "tcpdump -r {}: {}",
            self.file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asserts that every IP packet in `lines` is WireGuard UDP between two of `nodes` on port
/// `port`, that none carries a pod address, and that there is at least one. Returns the count.
pub fn assert_only_wireguard(lines: &[String], nodes: &[Ipv4Addr], port: u16) -> usize {
    let endpoints: Vec<String> = nodes.iter().map(|ip| format!("{ip}.{port}")).collect();
    let mut wg = 0;
    for line in lines {
        // After the timestamp, which could itself read like `10.`.
        let packet = line.split_once(' ').map_or(line.as_str(), |(_, p)| p);
        assert!(
            !packet.contains(" 10.") && !packet.starts_with("10."),
            "a pod address crossed the underlay in clear: {line}\n{}",
            lines.join("\n")
        );
        if line.contains(" ARP, ") {
            continue;
        }
        let Some(rest) = line.split(" IP ").nth(1) else {
            panic!("unexpected non-IP packet on the underlay: {line}");
        };
        let mut words = rest.split_whitespace();
        let (src, _, dst) = (words.next(), words.next(), words.next());
        let ok = src.is_some_and(|s| endpoints.iter().any(|e| e == s))
            && dst.is_some_and(|d| endpoints.iter().any(|e| format!("{e}:") == d))
            && rest.contains("UDP");
        assert!(ok, "non-WireGuard packet on the underlay: {line}");
        wg += 1;
    }
    assert!(wg > 0, "no WireGuard packet captured at all: {lines:#?}");
    wg
}

/// A TCP echo server in a namespace, stopped on drop.
pub struct TcpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.run(move || TcpListener::bind(addr).expect("binding the echo server"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let flag = flag.clone();
                        std::thread::spawn(move || {
                            conn.set_nonblocking(false).unwrap();
                            conn.set_read_timeout(Some(Duration::from_millis(100)))
                                .unwrap();
                            let mut buf = [0u8; 16 * 1024];
                            while !flag.load(Ordering::Relaxed) {
                                match conn.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        if conn.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if e.kind() == std::io::ErrorKind::WouldBlock
                                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                                    Err(_) => break,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP echo server in a namespace, stopped on drop.
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let sock = ns.run(move || UdpSocket::bind(addr).expect("binding the UDP echo server"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns` (the socket stays bound to it).
pub fn tcp_connect(ns: &Netns, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    ns.run(move || TcpStream::connect_timeout(&to, timeout))
}

/// Sends `msg` and expects it echoed back.
pub fn echo_roundtrip(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got)?;
    if got != msg {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// One UDP datagram from `ns` to `to`, expecting the echo; retried a few times (the first
/// may wait for a handshake).
pub fn udp_roundtrip(ns: &Netns, to: SocketAddr, msg: &[u8]) -> std::io::Result<()> {
    let sock = ns.run(|| UdpSocket::bind("0.0.0.0:0"))?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 2048];
    let mut last = std::io::Error::other("no attempt");
    for _ in 0..6 {
        sock.send_to(msg, to)?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if from == to && &buf[..n] == msg => return Ok(()),
            Ok(_) => last = std::io::Error::other("unexpected datagram"),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Sends `bytes` over TCP from `from` to a sink at `to` in `sink_ns`; returns the bytes the
/// sink counted and how long the transfer took.
pub fn bulk_transfer(
    from: &Netns,
    sink_ns: &Netns,
    to: SocketAddr,
    bytes: u64,
) -> std::io::Result<(u64, Duration)> {
    let listener = sink_ns.run(move || TcpListener::bind(to))?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let start = Instant::now();
    let mut stream = tcp_connect(from, to, Duration::from_secs(5))?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    sink.join()
        .map_err(|_| std::io::Error::other("sink thread panicked"))??;
    Ok((received.load(Ordering::Relaxed), start.elapsed()))
}

/// A wireguard-go configured by hand (`wg`, `ip`), not by strait: the interop peer. Ended by
/// PID on drop.
pub struct HandWireguard {
    pub device: String,
    pub public_key: String,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl HandWireguard {
    /// Starts wireguard-go in `ns` with a fresh key from `wg genkey`, listening on `port`.
    pub fn start(ns: &Netns, port: u16) -> Self {
        let device = unique_name("wh");
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "wireguard-go", "-f", &device])
            .env(WIREGUARD_GO_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting wireguard-go by hand");
        let mut this = Self {
            device,
            public_key: String::new(),
            child: Some(child),
            _dir: dir,
        };
        let socket = uapi_socket(&this.device);
        assert!(
            wait_until(Duration::from_secs(10), || UnixStream::connect(&socket)
                .is_ok()),
            "hand-run wireguard-go did not open {}",
            socket.display()
        );
        let private = this._dir.path().join("private.key");
        let genkey = Command::new("wg")
            .arg("genkey")
            .output()
            .expect("wg genkey");
        std::fs::write(&private, &genkey.stdout).unwrap();
        let mut pubkey = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("wg pubkey");
        pubkey
            .stdin
            .take()
            .unwrap()
            .write_all(&genkey.stdout)
            .unwrap();
        let out = pubkey.wait_with_output().unwrap();
        this.public_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        this.wg(&[
            "set",
            &this.device.clone(),
            "listen-port",
            &port.to_string(),
            "private-key",
            private.to_str().unwrap(),
        ]);
        this
    }

    /// Runs `wg <args>`.
    pub fn wg(&self, args: &[&str]) -> String {
        let out = Command::new("wg").args(args).output().expect("running wg");
        assert!(
            out.status.success(),
            "`wg {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for HandWireguard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child (`ip netns exec` exec'd wireguard-go).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(uapi_socket(&self.device));
    }
}

/// Time spent in each part of one reconcile pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassTiming {
    /// Planning from the model.
    pub plan: Duration,
    /// Peer diff and device update (UAPI).
    pub peers: Duration,
    /// Route diff and table update (rtnetlink).
    pub routes: Duration,
}

impl PassTiming {
    pub fn total(&self) -> Duration {
        self.plan + self.peers + self.routes
    }
}

impl std::fmt::Display for PassTiming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} (plan {:?}, peers {:?}, routes {:?})",
            self.total(),
            self.plan,
            self.peers,
            self.routes
        )
    }
}

/// Timings of [`bench_reconcile`].
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub peers: usize,
    /// Every peer into the empty device, every route into the empty table.
    pub initial: PassTiming,
    /// One node gained a pod CIDR: one peer update, one route added.
    pub one_change: PassTiming,
    /// Nothing to change (the steady-state cost of a resync).
    pub no_change: PassTiming,
}

/// Reconciles `peers` synthetic remote nodes into an empty userspace device and route table
/// in a fresh namespace, then one change, then nothing; reports the times. For `cargo xtask
/// bench wireguard`.
pub fn bench_reconcile(peers: usize) -> BenchReport {
    assert!(peers <= 60_000);
    let ns = Netns::new();
    quiet(&ns);
    let dir = tempfile::tempdir().unwrap();
    let device = unique_name("wb");
    let mut cfg = WireguardConfig::new("bench", "local");
    cfg.device = device.clone();
    cfg.state_dir = dir.path().to_path_buf();
    cfg.netns = Some(netns_path(&ns));
    cfg.backend = BackendChoice::Userspace;
    let manager = WireguardManager::start(cfg).expect("starting the bench device");
    let rt = runtime();
    let mut routes = rt
        .block_on(async {
            RouteReconciler::new(
                RoutingConfig {
                    underlay_mtu: Some(1500),
                    ..RoutingConfig::default()
                },
                &device,
                manager.netns().clone(),
            )
        })
        .expect("route reconciler");

    let mut model = StateModel::new("bench", 1);
    model.register_cluster("remote", 2).unwrap();
    model.upsert_node(Node {
        cluster: "bench".into(),
        cluster_id: 1,
        name: "local".into(),
        node_ip: Some("198.19.255.254".parse().unwrap()),
        underlay_ips: vec![],
        pod_side_ips: vec![],
        pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        wireguard_pubkey: Some(manager.public_key()),
        encryption_key: 255,
    });
    let synthetic = |i: usize, extra: bool| {
        let (hi, lo) = ((i / 250) as u8, (i % 250) as u8);
        let mut pod_cidrs: Vec<IpNet> = vec![format!("10.{}.{lo}.0/24", 100 + hi).parse().unwrap()];
        if extra {
            pod_cidrs.push(format!("10.{}.{lo}.0/24", 200 + hi).parse().unwrap());
        }
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        key[31] = 0x5a;
        Node {
            cluster: "remote".into(),
            cluster_id: 2,
            name: format!("node-{i}"),
            node_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 19, hi, lo + 1))),
            underlay_ips: vec![],
            pod_side_ips: vec![],
            pod_cidrs,
            wireguard_pubkey: Some(wireguard_control::Key(key).to_base64()),
            encryption_key: 255,
        }
    };
    for i in 0..peers {
        model.upsert_node(synthetic(i, false));
    }
    model.settle();
    let mut planner = manager.planner();
    let mut pass = |model: &StateModel| {
        let mut timing = PassTiming::default();
        let t = Instant::now();
        let plan = planner.plan(model);
        timing.plan = t.elapsed();
        let t = Instant::now();
        let peer_report = manager.reconcile(&plan, true).expect("peer reconcile");
        timing.peers = t.elapsed();
        let t = Instant::now();
        let route_report = rt
            .block_on(routes.reconcile(&plan.route_inputs()))
            .expect("route reconcile");
        timing.routes = t.elapsed();
        (timing, peer_report, route_report)
    };

    let (initial, r, rr) = pass(&model);
    // Each route into the device comes with strict mode's unreachable fallback.
    assert_eq!((r.added, rr.added), (peers, 2 * peers));
    model.upsert_node(synthetic(peers / 2, true));
    let (one_change, r, rr) = pass(&model);
    assert_eq!((r.added, r.updated, r.removed), (0, 1, 0));
    assert_eq!((rr.added, rr.replaced, rr.removed), (2, 0, 0));
    let (no_change, r, rr) = pass(&model);
    assert_eq!((r.added, r.updated, r.removed), (0, 0, 0));
    assert_eq!((rr.added, rr.replaced, rr.removed), (0, 0, 0));
    assert_eq!(manager.status().unwrap().peers.len(), peers);

    BenchReport {
        peers,
        initial,
        one_change,
        no_change,
    }
}
