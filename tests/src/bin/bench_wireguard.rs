//! `cargo xtask bench wireguard`:
//!
//! 1. Reconcile timings: N remote WireGuard peers into an empty device, one change among them,
//!    and a no-op resync (wireguard-go here).
//! 2. Throughput: iperf3 pod->pod TCP through strait's WireGuard path next to the same path in
//!    clear, run alternately (plain, WireGuard, plain, WireGuard, ...), and their ratio.
//!
//! The two throughput paths are built identically (`strait_tests::wireguard::Topology`: two
//! node namespaces on a closed underlay with the same MTU, a pod namespace behind each node).
//! "plain": each node routes the other's pod CIDR over the underlay in clear. "WireGuard":
//! strait's encryption agent on each node (userspace backend, wireguard-go) routes it into its
//! WireGuard device. Before measuring, a capture on node 1's underlay checks that the plain
//! path really is plaintext and the WireGuard path really is only WireGuard. The iperf3 server
//! runs in node 2's pod, the client in node 1's pod: nothing is sent from the root namespace,
//! and no namespace has a route out of the machine.
//!
//! Cleanup: iperf3 and wireguard-go are ended by PID (and get `PR_SET_PDEATHSIG` where this
//! binary starts them), namespaces are removed by their guards, on success and on panic;
//! SIGINT/SIGTERM become a panic at the next check, so Ctrl-C cleans up too (a second one
//! kills at once). The end of the run verifies that nothing is left.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;
use strait::{
    constants::{NETNS_RUN_DIR, WIREGUARD_PORT},
    wireguard::{BackendChoice, BackendKind, uapi_socket},
};
use strait_tests::{
    Netns,
    wireguard::{
        Capture, NodeAgent, TcpEcho, Topology, assert_only_wireguard, bench_reconcile,
        echo_roundtrip, link_info, publish_mesh, runtime, tcp_connect,
    },
};
use tokio::runtime::Runtime;

#[derive(Parser, Debug)]
#[command(
    about = "WireGuard benchmarks: reconcile timings, then iperf3 pod->pod TCP \
                   throughput through WireGuard vs the same path in clear"
)]
struct Args {
    /// Remote peers for the reconcile timings.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    peers: u32,
    /// iperf3 rounds; each runs the plain path, then the WireGuard path.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Length of each iperf3 run, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=600))]
    seconds: u32,
    /// MTU of every underlay link, on both paths (the WireGuard device gets 80 less; pods
    /// keep 1500 and rely on PMTU discovery, as in `large_transfer_has_no_mtu_black_hole`).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(1280..=9000))]
    underlay_mtu: u32,
}

/// iperf3's port inside the server pod (each path has its own namespaces).
const IPERF_PORT: u16 = 5201;
/// Port of the TCP echo used to check each path before measuring.
const CHECK_PORT: u16 = 7000;
const CONNECT: Duration = Duration::from_secs(5);

fn main() {
    let args = Args::parse();
    strait_tests::require_privileges();
    install_interrupt_handler();

    let r = bench_reconcile(args.peers as usize);
    println!(
        "bench wireguard: {} peers: initial reconcile {}; one change {}; no change {}",
        r.peers, r.initial, r.one_change, r.no_change
    );
    check_interrupted();

    let t = throughput(&args);
    let per_round: Vec<String> = t
        .rounds
        .iter()
        .map(|r| format!("{:.3}", r.ratio()))
        .collect();
    println!(
        "bench wireguard: iperf3 pod->pod TCP, {} rounds x {} s: plain median {:.0} Mbit/s, \
         WireGuard median {:.0} Mbit/s, ratio wg/plain {:.3} (per-round: {})",
        args.rounds,
        args.seconds,
        median(t.rounds.iter().map(|r| r.plain.mbit())),
        median(t.rounds.iter().map(|r| r.wg.mbit())),
        median(t.rounds.iter().map(Round::ratio)),
        per_round.join(", ")
    );
}

// ---------------------------------------------------------------------------------------------
// Throughput

struct Round {
    plain: Iperf3Result,
    wg: Iperf3Result,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.wg.bits_per_second / self.plain.bits_per_second
    }
}

struct ThroughputReport {
    rounds: Vec<Round>,
}

/// One pod->pod path. Field order is drop order: iperf3, then the agents (wireguard-go), then
/// the namespaces.
struct PodPath {
    label: &'static str,
    server: Option<OwnedChild>,
    agents: Vec<NodeAgent>,
    topo: Topology,
}

impl PodPath {
    /// Pod CIDRs routed over the underlay in clear.
    fn plain(mtu: u32) -> Self {
        let topo = Topology::new(2, Some(mtu));
        topo.route_pods_in_clear();
        Self {
            label: "plain",
            server: None,
            agents: Vec::new(),
            topo,
        }
    }

    /// strait's encryption agent on both nodes, userspace backend, full mesh.
    fn wireguard(rt: &Runtime, mtu: u32) -> Self {
        let topo = Topology::new(2, Some(mtu));
        let (n1, n2) = (&topo.nodes[0], &topo.nodes[1]);
        let userspace = |cfg: &mut strait::wireguard::EncryptionConfig| {
            cfg.wireguard.backend = BackendChoice::Userspace;
        };
        let a = NodeAgent::start(rt, n1, "c1", 1, "node-1", userspace);
        let b = NodeAgent::start(rt, n2, "c2", 2, "node-2", userspace);
        publish_mesh(rt, &[(&a, n1), (&b, n2)]);
        for agent in [&a, &b] {
            assert_eq!(agent.agent.manager().backend(), BackendKind::Userspace);
        }
        Self {
            label: "WireGuard",
            server: None,
            agents: vec![a, b],
            topo,
        }
    }

    fn client_pod(&self) -> &Netns {
        &self.topo.nodes[0].pod
    }

    fn server_ip(&self) -> Ipv4Addr {
        self.topo.nodes[1].pod_ip
    }

    /// A TCP echo from pod 1 to pod 2 under a capture on node 1's underlay: plaintext pod
    /// addresses on the plain path, nothing but WireGuard on the other. Also completes the
    /// WireGuard handshake before the first measurement.
    fn check(&self) {
        let (n1, n2) = (&self.topo.nodes[0], &self.topo.nodes[1]);
        let echo = TcpEcho::start(&n2.pod, (n2.pod_ip, CHECK_PORT).into());
        let capture = Capture::start(&n1.ns, &n1.underlay_if);
        let mut s = tcp_connect(&n1.pod, echo.addr, CONNECT)
            .unwrap_or_else(|e| panic!("{} path: pod 1 -> pod 2: {e}", self.label));
        for i in 0..5 {
            echo_roundtrip(&mut s, format!("{} check {i}", self.label).as_bytes())
                .unwrap_or_else(|e| panic!("{} path: echo: {e}", self.label));
        }
        drop(s);
        let lines = capture.finish();
        if self.agents.is_empty() {
            let clear = format!("IP {}.", n1.pod_ip);
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(&clear) && l.contains(&format!("> {}.", n2.pod_ip))),
                "plain path: no plaintext pod->pod packet on the underlay: {lines:#?}"
            );
        } else {
            assert_only_wireguard(&lines, &[n1.underlay_ip, n2.underlay_ip], WIREGUARD_PORT);
        }
    }

    fn start_server(&mut self) {
        let pod = &self.topo.nodes[1];
        self.server = Some(start_iperf3_server(&pod.pod, pod.pod_ip));
    }

    /// What must be gone once this path is dropped.
    fn leftovers(&self) -> Leftovers {
        let mut l = Leftovers {
            netns: self.topo.netns_names(),
            ..Leftovers::default()
        };
        if let Some(server) = &self.server {
            l.processes.push((server.pid, "iperf3"));
        }
        for a in &self.agents {
            if let Some(pid) = a.agent.manager().child_pid() {
                l.processes.push((pid, "wireguard-go"));
            }
            l.sockets.push(uapi_socket(&a.device));
        }
        l
    }

    /// Stops iperf3 and the agents (gracefully), then removes the namespaces.
    fn stop(mut self, rt: &Runtime) {
        drop(self.server.take());
        for agent in self.agents.drain(..) {
            agent.stop(rt);
        }
    }
}

fn throughput(args: &Args) -> ThroughputReport {
    let rt = runtime();
    let mut plain = PodPath::plain(args.underlay_mtu);
    let mut wg = PodPath::wireguard(&rt, args.underlay_mtu);
    check_interrupted();
    let wg_mtu = link_info(&wg.topo.nodes[0].ns, &wg.agents[0].device).1;
    println!(
        "bench wireguard: throughput: two identical topologies, underlay MTU {} on both, pod MTU \
         1500; plain = pod CIDR routed over the underlay in clear; WireGuard = strait's agent, \
         backend {} (wireguard-go), device MTU {wg_mtu}; iperf3 {} -> {}:{IPERF_PORT} (pod \
         namespaces), alternating plain/WireGuard",
        args.underlay_mtu,
        wg.agents[0].agent.manager().backend(),
        plain.topo.nodes[0].pod_ip,
        plain.server_ip(),
    );
    for path in [&mut plain, &mut wg] {
        path.check();
        path.start_server();
    }
    let mut leftovers = plain.leftovers();
    leftovers.extend(wg.leftovers());
    let wg_tx_before = wg_tx_bytes(&wg);

    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        check_interrupted();
        let p = run_iperf3_client(&plain, args.seconds);
        let w = run_iperf3_client(&wg, args.seconds);
        let r = Round { plain: p, wg: w };
        println!(
            "bench wireguard: round {round}/{}: plain {:.0} Mbit/s ({} retransmits), WireGuard \
             {:.0} Mbit/s ({} retransmits), ratio wg/plain {:.3}",
            args.rounds,
            r.plain.mbit(),
            r.plain.retransmits,
            r.wg.mbit(),
            r.wg.retransmits,
            r.ratio()
        );
        rounds.push(r);
    }

    // Everything iperf3 sent on the WireGuard path went through node 1's peer.
    let sent: u64 = rounds.iter().map(|r| r.wg.bytes_sent).sum();
    let tx = wg_tx_bytes(&wg) - wg_tx_before;
    assert!(
        tx >= sent,
        "WireGuard peer sent {tx} bytes, iperf3 {sent}: traffic bypassed the tunnel"
    );

    plain.stop(&rt);
    wg.stop(&rt);
    leftovers.verify();
    println!(
        "bench wireguard: cleanup checked: {} processes ended by PID, {} UAPI sockets and {} \
         namespaces gone",
        leftovers.processes.len(),
        leftovers.sockets.len(),
        leftovers.netns.len()
    );
    ThroughputReport { rounds }
}

/// Bytes node 1's WireGuard device sent to its peer (node 2).
fn wg_tx_bytes(path: &PodPath) -> u64 {
    let status = path.agents[0].agent.status().expect("WireGuard status");
    assert_eq!(status.peers.len(), 1, "{status:#?}");
    status.peers[0].tx_bytes
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    assert!(!v.is_empty());
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------------
// iperf3

struct Iperf3Result {
    bits_per_second: f64,
    bytes_sent: u64,
    retransmits: u64,
}

impl Iperf3Result {
    fn mbit(&self) -> f64 {
        self.bits_per_second / 1e6
    }
}

/// `iperf3 -s` in `ns`, bound to `ip`; returns once it listens.
fn start_iperf3_server(ns: &Netns, ip: Ipv4Addr) -> OwnedChild {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("iperf3-server.log");
    let port = IPERF_PORT.to_string();
    let ip = ip.to_string();
    let args = ["-s", "-B", &ip, "-p", &port];
    let mut server = OwnedChild::spawn_in(ns, "iperf3", &args, &log, &log, dir);
    let start = Instant::now();
    loop {
        check_interrupted();
        if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "iperf3 server in {} exited ({status}): {}",
                ns.name(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if server.listens_tcp(IPERF_PORT) {
            return server;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "iperf3 server in {} not listening after 10 s",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `iperf3 -c <server pod> -t <seconds> -J` from the client pod; parses the JSON report.
fn run_iperf3_client(path: &PodPath, seconds: u32) -> Iperf3Result {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (
        dir.path().join("client.json"),
        dir.path().join("client.err"),
    );
    let (server, port, secs) = (
        path.server_ip().to_string(),
        IPERF_PORT.to_string(),
        seconds.to_string(),
    );
    let args = [
        "-c",
        &server,
        "-p",
        &port,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    let mut client = OwnedChild::spawn_in(path.client_pod(), "iperf3", &args, &out, &err, dir);
    let deadline = Instant::now() + Duration::from_secs(u64::from(seconds) + 30);
    let status = loop {
        check_interrupted();
        if let Some(status) = client.child.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{} path: iperf3 client still running 30 s past its test length",
            path.label
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{} path: iperf3 client ({status}) printed no JSON ({e}): {text}{stderr}",
            path.label
        )
    });
    if let Some(error) = json.get("error") {
        panic!("{} path: iperf3 client ({status}): {error}", path.label);
    }
    assert!(
        status.success(),
        "{} path: iperf3 client: {status}",
        path.label
    );
    let end = &json["end"];
    let bits_per_second = end["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("{} path: no end.sum_received.bits_per_second", path.label));
    assert!(bits_per_second > 0.0, "{} path: 0 bit/s", path.label);
    Iperf3Result {
        bits_per_second,
        bytes_sent: end["sum_sent"]["bytes"].as_u64().unwrap_or(0),
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes, interrupts, leftovers

/// A process this binary started inside a namespace (`ip netns exec` execs the program, so the
/// PID is the program's), ended by PID on drop: SIGTERM, SIGKILL after 3 s, reaped.
struct OwnedChild {
    child: Option<Child>,
    pid: u32,
    program: &'static str,
    _dir: tempfile::TempDir,
}

impl OwnedChild {
    /// Must be called from the main thread: `PR_SET_PDEATHSIG` fires when the spawning
    /// *thread* exits.
    fn spawn_in(
        ns: &Netns,
        program: &'static str,
        args: &[&str],
        stdout: &Path,
        stderr: &Path,
        dir: tempfile::TempDir,
    ) -> Self {
        let open = |p: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("opening {}: {e}", p.display()))
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name(), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(open(stdout))
            .stderr(open(stderr));
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no parent state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program} in {}: {e}", ns.name()));
        Self {
            pid: child.id(),
            child: Some(child),
            program,
            _dir: dir,
        }
    }

    /// Whether the process, once it is `program` (exec'd inside the namespace), has a TCP
    /// socket listening on `port` in its namespace.
    fn listens_tcp(&self, port: u16) -> bool {
        if !is_process(self.pid, self.program) {
            return false;
        }
        let Ok(table) = std::fs::read_to_string(format!("/proc/{}/net/tcp", self.pid)) else {
            return false;
        };
        let local = format!(":{port:04X}");
        table.lines().skip(1).any(|l| {
            let mut f = l.split_whitespace();
            let (_, addr, _, state) = (f.next(), f.next(), f.next(), f.next());
            addr.is_some_and(|a| a.ends_with(&local)) && state == Some("0A")
        })
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            // By PID, never by name.
            // SAFETY: kill(2) on our own unreaped child's PID, which cannot have been reused.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// Whether `pid` is alive and runs `program`.
fn is_process(pid: u32, program: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == program)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // A second signal kills at once.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

/// SIGINT/SIGTERM set a flag that [`check_interrupted`] turns into a panic, so the guards run.
fn install_interrupt_handler() {
    let handler = on_interrupt as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic and calls signal(2).
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

fn check_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        panic!("bench wireguard: interrupted; cleaning up");
    }
}

/// What a throughput path left behind, if anything: checked after everything was dropped.
#[derive(Default)]
struct Leftovers {
    processes: Vec<(u32, &'static str)>,
    sockets: Vec<PathBuf>,
    netns: Vec<String>,
}

impl Leftovers {
    fn extend(&mut self, other: Leftovers) {
        self.processes.extend(other.processes);
        self.sockets.extend(other.sockets);
        self.netns.extend(other.netns);
    }

    fn verify(&self) {
        for (pid, program) in &self.processes {
            assert!(!is_process(*pid, program), "{program} {pid} still running");
        }
        for socket in &self.sockets {
            assert!(!socket.exists(), "{} left behind", socket.display());
        }
        for ns in &self.netns {
            let path = Path::new(NETNS_RUN_DIR).join(ns);
            assert!(!path.exists(), "namespace {ns} left behind");
        }
    }
}
