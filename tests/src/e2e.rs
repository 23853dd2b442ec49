//! The user's scenario end to end on one machine: two clusters (usa, europe) of two nodes each
//! on a closed underlay, each with its own etcd and `strait kvstoremesh`, a `strait agent` per
//! node inside the node's network namespace (manifests-directory source, eBPF datapath,
//! WireGuard through wireguard-go), pods as namespaces behind their node, and the seven steps
//! of the scenario checked against the real binaries. `tests/tests/e2e.rs` runs it as a test,
//! `cargo xtask demo` runs the same code through the `strait-scenario` binary with narration.
//!
//! Topology (all of it created here, none of it routed out of the machine):
//! - underlay: a router namespace; every member (node or control plane) is `198.18.L.2/24` on
//!   a veth to the router's `198.18.L.1`, with a default route to it. The router knows no pod
//!   CIDR: pod traffic between nodes can only cross it inside WireGuard (or leak in clear, which
//!   the capture would show).
//! - per cluster a control-plane namespace running its etcd (on the underlay address, port
//!   2379) and its `strait kvstoremesh`;
//! - per node a namespace running `strait agent`, a cgroup (the socket load balancer's) and
//!   pods: a namespace each with `eth0` (/32, default route on the link), the node routing
//!   the /32 to the host-side veth with proxy ARP, and a cgroup under the node's for the pod's
//!   processes.
//!
//! Everything is recorded in [`Resources`] as it is created and removed by
//! [`Resources::cleanup`]: on success, on failure (drop) and on Ctrl-C (the binary's handler).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use strait::{netns::NetnsGuard, status::AgentStatus};

use crate::datapath::{BackendServer, EchoServer, Probe};

/// WireGuard's port (strait's constant, Cilium's too).
pub const WG_PORT: u16 = strait::constants::WIREGUARD_PORT;

/// What the scenario runs with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `strait` binary.
    pub strait: PathBuf,
    /// Print the narration (the demo); the test prints only step headers and measurements.
    pub narrate: bool,
}

/// A cluster of the scenario.
struct ClusterDef {
    name: &'static str,
    id: u32,
    /// Underlay link number of its control plane.
    cp_link: u8,
    /// ClusterIPs of payment-api (affinity local) and ledger (affinity none).
    payment_vip: Ipv4Addr,
    ledger_vip: Ipv4Addr,
}

struct NodeDef {
    name: &'static str,
    cluster: &'static str,
    link: u8,
    pod_cidr: &'static str,
    /// Short tag for machine-wide names (WireGuard device).
    tag: &'static str,
}

struct PodDef {
    name: &'static str,
    node: &'static str,
    ip: Ipv4Addr,
    app: &'static str,
}

const USA: &str = "cluster-usa";
const EUROPE: &str = "cluster-europe";
const MARS: &str = "cluster-mars";

const CLUSTERS: [ClusterDef; 2] = [
    ClusterDef {
        name: USA,
        id: 1,
        cp_link: 10,
        payment_vip: Ipv4Addr::new(10, 101, 0, 10),
        ledger_vip: Ipv4Addr::new(10, 101, 0, 20),
    },
    ClusterDef {
        name: EUROPE,
        id: 2,
        cp_link: 20,
        payment_vip: Ipv4Addr::new(10, 102, 0, 10),
        ledger_vip: Ipv4Addr::new(10, 102, 0, 20),
    },
];

const NODES: [NodeDef; 4] = [
    NodeDef {
        name: "usa-1",
        cluster: USA,
        link: 11,
        pod_cidr: "10.1.1.0/24",
        tag: "u1",
    },
    NodeDef {
        name: "usa-2",
        cluster: USA,
        link: 12,
        pod_cidr: "10.1.2.0/24",
        tag: "u2",
    },
    NodeDef {
        name: "europe-1",
        cluster: EUROPE,
        link: 21,
        pod_cidr: "10.2.1.0/24",
        tag: "e1",
    },
    NodeDef {
        name: "europe-2",
        cluster: EUROPE,
        link: 22,
        pod_cidr: "10.2.2.0/24",
        tag: "e2",
    },
];

const PODS: [PodDef; 8] = [
    PodDef {
        name: "frontend",
        node: "usa-1",
        ip: Ipv4Addr::new(10, 1, 1, 5),
        app: "frontend",
    },
    PodDef {
        name: "pay-a",
        node: "usa-1",
        ip: Ipv4Addr::new(10, 1, 1, 10),
        app: "payment-api",
    },
    PodDef {
        name: "pay-b",
        node: "usa-2",
        ip: Ipv4Addr::new(10, 1, 2, 10),
        app: "payment-api",
    },
    PodDef {
        name: "reports",
        node: "usa-2",
        ip: Ipv4Addr::new(10, 1, 2, 5),
        app: "reports",
    },
    PodDef {
        name: "frontend-eu",
        node: "europe-1",
        ip: Ipv4Addr::new(10, 2, 1, 5),
        app: "frontend",
    },
    PodDef {
        name: "pay-c",
        node: "europe-1",
        ip: Ipv4Addr::new(10, 2, 1, 10),
        app: "payment-api",
    },
    PodDef {
        name: "pay-d",
        node: "europe-2",
        ip: Ipv4Addr::new(10, 2, 2, 10),
        app: "payment-api",
    },
    PodDef {
        name: "db",
        node: "europe-2",
        ip: Ipv4Addr::new(10, 2, 2, 5),
        app: "database",
    },
];

/// Ports the pods serve: payment-api and ledger answer with the pod's address (what
/// `sockprobe` prints), echo keeps long-lived connections, the database answers like payment.
const PAYMENT_PORT: u16 = 8080;
const LEDGER_PORT: u16 = 9090;
const ECHO_PORT: u16 = 7000;
const DB_PORT: u16 = 5432;

/// The third cluster of step 7: its pod CIDR overlaps usa's.
const MARS_ID: u32 = 3;
const MARS_CP_LINK: u8 = 30;
const MARS_NODE_LINK: u8 = 31;
/// mars reused usa's 10.1.0.0/16 cluster pool: its first node got a /24 usa-1 has too.
const MARS_POD_CIDR: &str = "10.1.1.0/24";

fn cluster(name: &str) -> &'static ClusterDef {
    CLUSTERS
        .iter()
        .find(|c| c.name == name)
        .expect("known cluster")
}
fn node_def(name: &str) -> &'static NodeDef {
    NODES.iter().find(|n| n.name == name).expect("known node")
}
fn pod_def(name: &str) -> &'static PodDef {
    PODS.iter().find(|p| p.name == name).expect("known pod")
}
fn pod_cluster(pod: &PodDef) -> &'static str {
    node_def(pod.node).cluster
}
fn underlay_ip(link: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, link, 2)
}
fn short(cluster: &str) -> &str {
    cluster.trim_start_matches("cluster-")
}

/// Everything the scenario created, removed once by [`Resources::cleanup`].
#[derive(Default)]
pub struct Resources {
    /// Processes by name (agents, etcds, kvstoremeshes, captures), started with
    /// PR_SET_PDEATHSIG so even a killed harness takes them along.
    procs: Vec<(String, Child)>,
    /// WireGuard device names: a wireguard-go serving one of them is ended by the PID its UAPI
    /// socket reports (an agent restarted after SIGKILL adopts the old one and leaves it).
    wg_devices: Vec<String>,
    /// Network namespaces, deleted last-created first.
    netns: Vec<String>,
    /// cgroups, removed deepest first.
    cgroups: Vec<PathBuf>,
    /// bpffs directory holding every agent's pins.
    pin_root: Option<PathBuf>,
    /// The work directory (configs, manifests, logs, etcd data).
    dirs: Vec<PathBuf>,
    /// Servers running as threads inside pod namespaces.
    servers: Vec<Server>,
    cleaned: bool,
}

enum Server {
    Backend(#[allow(dead_code)] BackendServer),
    Echo(#[allow(dead_code)] EchoServer),
}

impl Resources {
    /// Removes everything; idempotent.
    pub fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        for (_, child) in self.procs.iter_mut().rev() {
            stop_child(child, libc::SIGTERM);
        }
        self.procs.clear();
        for dev in self.wg_devices.drain(..) {
            stop_wireguard_go(&dev);
        }
        self.servers.clear();
        for ns in self.netns.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if let Some(pins) = self.pin_root.take() {
            let _ = std::fs::remove_dir_all(&pins);
        }
        for cg in self.cgroups.drain(..).rev() {
            remove_cgroup(&cg);
        }
        for dir in self.dirs.drain(..) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// SIGTERM (or `signal`) to our own child, SIGKILL after 5 s, reaped.
fn stop_child(child: &mut Child, signal: i32) {
    if child.try_wait().ok().flatten().is_none() {
        // SAFETY: kill(2) on our own unreaped child's PID.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Ends the wireguard-go serving `device`, found by the peer credentials of its UAPI socket
/// (by PID, never by name), and removes the socket.
fn stop_wireguard_go(device: &str) {
    use std::os::fd::AsRawFd as _;
    let socket = strait::wireguard::uapi_socket(device);
    if let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into `cred`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        drop(stream);
        if rc == 0 && cred.pid > 1 {
            // SAFETY: signalling the process that serves our own, uniquely named socket.
            unsafe { libc::kill(cred.pid, libc::SIGTERM) };
            let proc = PathBuf::from(format!("/proc/{}", cred.pid));
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && proc.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            if proc.exists() {
                // SAFETY: as above.
                unsafe { libc::kill(cred.pid, libc::SIGKILL) };
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
}

fn remove_cgroup(path: &Path) {
    if let (Some(parent), Ok(procs)) = (
        path.parent(),
        std::fs::read_to_string(path.join("cgroup.procs")),
    ) {
        for pid in procs.lines() {
            let _ = std::fs::write(parent.join("cgroup.procs"), pid);
        }
    }
    let _ = std::fs::remove_dir(path);
}

/// The cgroup v2 mount, from /proc/mounts.
fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .context("no cgroup v2 mount in /proc/mounts")
}

fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-q", "-w"])
        .arg(format!("{key}={value}"))
        .output()?;
    ensure!(
        out.status.success(),
        "sysctl {key}={value} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || -> anyhow::Result<T> {
        let _inside = NetnsGuard::enter(&ns).with_context(|| format!("entering {ns}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in a namespace panicked"))?
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout` with the last
/// reason it gave.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>, String>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut last = String::from("not tried");
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u8,
    pub title: &'static str,
    pub result: Result<String, String>,
}

/// The scenario's outcome, with the measurements.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub steps: Vec<StepReport>,
    /// Namespaces, cgroups, etcds and processes created.
    pub build: Duration,
    /// From then until every agent reported the whole mesh synced.
    pub synced: Duration,
    pub total: Duration,
    pub failover_local_to_remote: Option<Duration>,
    pub failback_remote_to_local: Option<Duration>,
    pub cluster_loss_failover: Option<Duration>,
    pub status_transcript: String,
}

impl Report {
    pub fn failed(&self) -> Vec<&StepReport> {
        self.steps.iter().filter(|s| s.result.is_err()).collect()
    }

    pub fn summary(&self) -> String {
        let mut out = String::new();
        for s in &self.steps {
            let _ = match &s.result {
                Ok(m) => writeln!(out, "  step {} {}: PASS — {m}", s.step, s.title),
                Err(e) => writeln!(out, "  step {} {}: FAIL — {e}", s.step, s.title),
            };
        }
        let _ = writeln!(
            out,
            "  mesh built in {:.1}s, synced {:.1}s later; scenario total {:.1}s",
            self.build.as_secs_f64(),
            self.synced.as_secs_f64(),
            self.total.as_secs_f64()
        );
        out
    }
}

/// A running mesh.
pub struct Mesh {
    opts: Options,
    /// Short, machine-unique tag for names (the process id).
    tag: String,
    dir: PathBuf,
    cgroup_root: PathBuf,
    pin_root: PathBuf,
    res: Arc<Mutex<Resources>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.res.lock().unwrap_or_else(|e| e.into_inner()).cleanup();
    }
}

impl Mesh {
    fn res(&self) -> std::sync::MutexGuard<'_, Resources> {
        self.res.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The resources, for a Ctrl-C handler to clean up.
    pub fn resources(&self) -> Arc<Mutex<Resources>> {
        self.res.clone()
    }

    fn say(&self, text: &str) {
        if self.opts.narrate {
            println!("{text}");
        }
    }

    fn progress(&self, text: &str) {
        println!("    {text}");
    }

    fn ns(&self, member: &str) -> String {
        format!("se{}-{member}", self.tag)
    }

    fn router(&self) -> String {
        self.ns("router")
    }

    fn cp_ns(&self, cluster: &str) -> String {
        self.ns(&format!("cp-{}", short(cluster)))
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    fn cluster_dir(&self, cluster: &str) -> PathBuf {
        self.dir.join(short(cluster))
    }

    fn api_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("api.sock")
    }

    fn wg_device(&self, node: &NodeDef) -> String {
        format!("wg{}{}", self.tag, node.tag)
    }

    fn pod_cgroup(&self, pod: &PodDef) -> PathBuf {
        self.cgroup_root.join(pod.node).join(pod.name)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Starts `program args` inside `ns`, logging to logs/<name>.log. The child joins the
    /// namespace with setns(2) before exec, not through `ip netns exec`: that also remounts
    /// /sys, hiding bpffs and the cgroup v2 mount the agent needs.
    fn spawn(&self, name: &str, ns: &str, program: &Path, args: &[String]) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd as _;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))?;
        let netns = std::fs::File::open(Path::new(strait::constants::NETNS_RUN_DIR).join(ns))
            .with_context(|| format!("opening network namespace {ns}"))?;
        let fd = netns.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("STRAIT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setns and prctl are plain syscalls, async-signal-safe; `fd` stays open in the
        // parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {}", program.display()))?;
        drop(netns);
        self.res().procs.push((name.to_owned(), child));
        Ok(())
    }

    /// Stops the named process with `signal` (SIGKILL after 5 s).
    fn stop(&self, name: &str, signal: i32) {
        let child = {
            let mut res = self.res();
            let i = res.procs.iter().position(|(n, _)| n == name);
            i.map(|i| res.procs.remove(i).1)
        };
        if let Some(mut child) = child {
            stop_child(&mut child, signal);
        }
    }

    fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Builds the whole mesh and waits until it is up.
    pub fn build(opts: Options, res: Arc<Mutex<Resources>>) -> anyhow::Result<Self> {
        // SAFETY: geteuid has no preconditions.
        ensure!(
            unsafe { libc::geteuid() } == 0,
            "the scenario needs root (namespaces, eBPF, cgroups)"
        );
        ensure!(
            opts.strait.exists(),
            "strait binary {} missing",
            opts.strait.display()
        );
        for tool in ["/usr/bin/etcd", "/usr/bin/etcdctl", "/usr/bin/wireguard-go"] {
            ensure!(
                Path::new(tool).exists(),
                "{tool} missing: run `cargo xtask setup`"
            );
        }
        let tag = (std::process::id() % 100_000).to_string();
        let dir = std::env::temp_dir().join(format!("strait-e2e-{tag}"));
        let cgroup_root = cgroup2_mount()?.join(format!("strait-e2e-{tag}"));
        let pin_root =
            PathBuf::from(strait::constants::BPFFS_ROOT).join(format!("strait-e2e-{tag}"));
        let mesh = Self {
            opts,
            tag,
            dir: dir.clone(),
            cgroup_root: cgroup_root.clone(),
            pin_root: pin_root.clone(),
            res,
        };
        {
            let mut res = mesh.res();
            res.dirs.push(dir.clone());
            res.pin_root = Some(pin_root.clone());
        }
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::create_dir_all(&pin_root)?;
        std::fs::create_dir(&cgroup_root)
            .with_context(|| format!("creating {}", cgroup_root.display()))?;
        mesh.res().cgroups.push(cgroup_root);
        mesh.underlay()?;
        mesh.pods()?;
        for c in &CLUSTERS {
            mesh.control_plane(c.name, c.id, c.cp_link)?;
        }
        mesh.manifests()?;
        for c in &CLUSTERS {
            mesh.say(&format!(
                "    {}: strait kvstoremesh --cluster-id {} (mirrors the other cluster's etcd into \
                 its own, exports its global services)",
                c.name, c.id
            ));
            mesh.start_kvstoremesh(c.name, Some(c.id))?;
        }
        for n in &NODES {
            mesh.write_agent_config(n)?;
            mesh.start_agent(n.name)?;
        }
        Ok(mesh)
    }

    fn add_netns(&self, name: &str) -> anyhow::Result<()> {
        run_ip(&["netns", "add", name])?;
        self.res().netns.push(name.to_owned());
        run_ip(&["-n", name, "link", "set", "lo", "up"])?;
        // No IPv6: every packet on the underlay is one of ours.
        sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")?;
        sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(())
    }

    /// A member namespace on the underlay: `198.18.L.2/24` on `eth0`, the router's end named
    /// after the member.
    fn add_member(&self, member: &str, link: u8) -> anyhow::Result<()> {
        let ns = self.ns(member);
        self.add_netns(&ns)?;
        let router = self.router();
        run_ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", member, "netns",
            &router,
        ])?;
        run_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", underlay_ip(link)),
            "dev",
            "eth0",
        ])?;
        run_ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("198.18.{link}.1/24"),
            "dev",
            member,
        ])?;
        run_ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        run_ip(&["-n", &router, "link", "set", member, "up"])?;
        run_ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{link}.1"),
        ])?;
        Ok(())
    }

    fn underlay(&self) -> anyhow::Result<()> {
        self.progress("underlay: router namespace, nodes and control planes on 198.18.0.0/15");
        let router = self.router();
        self.add_netns(&router)?;
        sysctl(&router, "net.ipv4.ip_forward", "1")?;
        for n in &NODES {
            self.add_member(n.name, n.link)?;
            let ns = self.ns(n.name);
            sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            let cg = self.cgroup_root.join(n.name);
            std::fs::create_dir(&cg)?;
            self.res().cgroups.push(cg);
            std::fs::create_dir_all(self.node_dir(n.name).join("state"))?;
        }
        Ok(())
    }

    /// Pod namespaces, veths and cgroups, and the servers inside them.
    fn pods(&self) -> anyhow::Result<()> {
        self.progress(&format!(
            "pods: {} namespaces behind their nodes, one cgroup each",
            PODS.len()
        ));
        for p in &PODS {
            let ns = self.ns(p.name);
            self.add_netns(&ns)?;
            let node_ns = self.ns(p.node);
            let host_if = format!("lxc{}", p.name.replace('-', ""));
            run_ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &host_if,
                "netns", &node_ns,
            ])?;
            run_ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/32", p.ip),
                "dev",
                "eth0",
            ])?;
            run_ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            run_ip(&["-n", &ns, "route", "add", "default", "dev", "eth0"])?;
            run_ip(&["-n", &node_ns, "link", "set", &host_if, "up"])?;
            run_ip(&[
                "-n",
                &node_ns,
                "route",
                "add",
                &format!("{}/32", p.ip),
                "dev",
                &host_if,
            ])?;
            sysctl(&node_ns, &format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
            sysctl(
                &node_ns,
                &format!("net.ipv4.neigh.{host_if}.proxy_delay"),
                "0",
            )?;
            let cg = self.pod_cgroup(p);
            std::fs::create_dir(&cg)?;
            self.res().cgroups.push(cg);
            let ip = p.ip;
            let servers: Vec<Server> = in_netns(&ns, move || match pod_def_app(ip) {
                "payment-api" => vec![
                    Server::Backend(BackendServer::start(SocketAddrV4::new(ip, PAYMENT_PORT))),
                    Server::Backend(BackendServer::start(SocketAddrV4::new(ip, LEDGER_PORT))),
                    Server::Echo(EchoServer::start(SocketAddrV4::new(ip, ECHO_PORT))),
                ],
                "database" => vec![Server::Backend(BackendServer::start(SocketAddrV4::new(
                    ip, DB_PORT,
                )))],
                _ => Vec::new(),
            })?;
            self.res().servers.extend(servers);
        }
        Ok(())
    }

    /// A control-plane namespace with the cluster's etcd on its underlay address.
    fn control_plane(&self, cluster: &str, _id: u32, link: u8) -> anyhow::Result<()> {
        self.progress(&format!(
            "{cluster}: control plane (etcd) at {}:2379",
            underlay_ip(link)
        ));
        self.add_member(&format!("cp-{}", short(cluster)), link)?;
        let cdir = self.cluster_dir(cluster);
        for sub in ["manifests", "kvstoremesh.d", "clustermesh.d"] {
            std::fs::create_dir_all(cdir.join(sub))?;
        }
        std::fs::write(
            cdir.join("etcd.yaml"),
            format!("endpoints:\n- http://{}:2379\n", underlay_ip(link)),
        )?;
        self.start_etcd(cluster, link)
    }

    fn etcd_data(&self, cluster: &str) -> PathBuf {
        // tmpfs when available: etcd fsyncs every write.
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            self.dir.clone()
        };
        base.join(format!("strait-e2e-{}-etcd-{}", self.tag, short(cluster)))
    }

    fn start_etcd(&self, cluster: &str, link: u8) -> anyhow::Result<()> {
        let data = self.etcd_data(cluster);
        if !self.res().dirs.contains(&data) {
            self.res().dirs.push(data.clone());
        }
        let url = format!("http://{}:2379", underlay_ip(link));
        let name = short(cluster).to_owned();
        self.spawn(
            &format!("etcd-{name}"),
            &self.cp_ns(cluster),
            Path::new("/usr/bin/etcd"),
            &[
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                data.display().to_string(),
                "--listen-client-urls".into(),
                url.clone(),
                "--advertise-client-urls".into(),
                url.clone(),
                "--listen-peer-urls".into(),
                "http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls".into(),
                "http://127.0.0.1:2380".into(),
                "--initial-cluster".into(),
                format!("{name}=http://127.0.0.1:2380"),
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
                "--logger".into(),
                "zap".into(),
                "--log-outputs".into(),
                "stderr".into(),
            ],
        )?;
        let ns = self.cp_ns(cluster);
        wait_for(
            &format!("etcd of {cluster}"),
            Duration::from_secs(20),
            || {
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns, "etcdctl", "--endpoints", &url])
                    .args(["--dial-timeout=1s", "--command-timeout=1s"])
                    .args(["endpoint", "health"])
                    .env("ETCDCTL_API", "3")
                    .output()
                    .map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(Some(()))
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
                }
            },
        )
    }

    /// `strait kvstoremesh` in the cluster's control plane: mirrors every cluster in its
    /// kvstoremesh.d into the local etcd, publishes this cluster's config (with an ID) and
    /// exports its global services from the manifests.
    fn start_kvstoremesh(&self, cluster: &str, id: Option<u32>) -> anyhow::Result<()> {
        let cdir = self.cluster_dir(cluster);
        let mut args: Vec<String> = vec![
            "kvstoremesh".into(),
            "--cluster-name".into(),
            cluster.into(),
            "--kvstore-config".into(),
            cdir.join("etcd.yaml").display().to_string(),
            "--clustermesh-config-dir".into(),
            cdir.join("kvstoremesh.d").display().to_string(),
            "--drain-grace-seconds".into(),
            "5".into(),
            "--metrics-address".into(),
            "127.0.0.1:9965".into(),
        ];
        if let Some(id) = id {
            args.extend(["--cluster-id".into(), id.to_string()]);
            if cdir.join("manifests").is_dir() {
                args.extend([
                    "--manifests-dir".into(),
                    cdir.join("manifests").display().to_string(),
                ]);
            }
        }
        self.spawn(
            &format!("kvstoremesh-{}", short(cluster)),
            &self.cp_ns(cluster),
            &self.opts.strait,
            &args,
        )
    }

    /// Connects `cluster` to `remote`: its kvstoremesh mirrors the remote's etcd, and its
    /// agents read the mirror from their own etcd (Cilium's KVStoreMesh layout).
    fn connect(&self, cluster: &str, remote: &str, remote_cp_link: u8) -> anyhow::Result<()> {
        let cdir = self.cluster_dir(cluster);
        std::fs::write(
            cdir.join("kvstoremesh.d").join(remote),
            format!(
                "endpoints:\n- http://{}:2379\n",
                underlay_ip(remote_cp_link)
            ),
        )?;
        std::fs::copy(
            cdir.join("etcd.yaml"),
            cdir.join("clustermesh.d").join(remote),
        )?;
        Ok(())
    }

    fn manifests(&self) -> anyhow::Result<()> {
        self.progress("manifests: Namespace, Pods, payment-api + ledger (global), the policy");
        for c in &CLUSTERS {
            let dir = self.cluster_dir(c.name).join("manifests");
            std::fs::write(
                dir.join("namespace.yaml"),
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels: {kubernetes.io/metadata.name: default}\n",
            )?;
            let mut pods = String::new();
            for p in PODS.iter().filter(|p| pod_cluster(p) == c.name) {
                let _ = write!(
                    pods,
                    "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: default\n  labels: {{app: {}}}\n\
                     spec:\n  nodeName: {}\n  containers: [{{name: main, image: example/{}}}]\nstatus:\n  podIP: {}\n",
                    p.name, p.app, p.node, p.app, p.ip
                );
            }
            std::fs::write(dir.join("pods.yaml"), pods)?;
            std::fs::write(
                dir.join("payment-api.yaml"),
                service_yaml(c, "payment-api", "local", self.backends(c.name)),
            )?;
            std::fs::write(
                dir.join("ledger.yaml"),
                service_yaml(c, "ledger", "none", self.backends(c.name)),
            )?;
        }
        std::fs::write(
            self.cluster_dir(EUROPE)
                .join("manifests")
                .join("cross-cluster-db-access.yaml"),
            POLICY,
        )?;
        self.connect(USA, EUROPE, cluster(EUROPE).cp_link)?;
        self.connect(EUROPE, USA, cluster(USA).cp_link)?;
        Ok(())
    }

    fn backends(&self, cluster: &str) -> Vec<Ipv4Addr> {
        PODS.iter()
            .filter(|p| p.app == "payment-api" && pod_cluster(p) == cluster)
            .map(|p| p.ip)
            .collect()
    }

    fn set_payment_backends(&self, cluster: &str, backends: Vec<Ipv4Addr>) -> anyhow::Result<()> {
        let path = self
            .cluster_dir(cluster)
            .join("manifests")
            .join("payment-api.yaml");
        // Written whole and renamed: the agent never reads half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            service_yaml(self::cluster(cluster), "payment-api", "local", backends),
        )?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn write_agent_config(&self, n: &NodeDef) -> anyhow::Result<()> {
        let cdir = self.cluster_dir(n.cluster);
        let ndir = self.node_dir(n.name);
        let c = cluster(n.cluster);
        let device = self.wg_device(n);
        self.res().wg_devices.push(device.clone());
        let config = format!(
            "# strait agent of node {node} (cluster {cluster}), written by the e2e harness\n\
             cluster: {{name: {cluster}, id: {id}}}\n\
             node: {{name: {node}, internalIP: {ip}, podCIDRs: [{cidr}]}}\n\
             kvstoreConfig: {etcd}\n\
             clustermeshConfigDir: {mesh}\n\
             stateDir: {state}\n\
             apiSocket: {sock}\n\
             metricsAddress: 127.0.0.1:9962\n\
             manifestsDir: {manifests}\n\
             kubernetes: {{source: manifests}}\n\
             wireguard: {{enabled: true, backend: userspace, device: {device}, strict: true, strictCIDRs: [10.1.0.0/16, 10.2.0.0/16]}}\n\
             datapath: {{pinRoot: {pins}, cgroup: {cgroup}, traceAllowed: false}}\n",
            node = n.name,
            cluster = n.cluster,
            id = c.id,
            ip = underlay_ip(n.link),
            cidr = n.pod_cidr,
            etcd = cdir.join("etcd.yaml").display(),
            mesh = cdir.join("clustermesh.d").display(),
            state = ndir.join("state").display(),
            sock = self.api_socket(n.name).display(),
            manifests = cdir.join("manifests").display(),
            pins = self.pin_root.join(n.name).display(),
            cgroup = self.cgroup_root.join(n.name).display(),
        );
        std::fs::create_dir_all(self.pin_root.join(n.name))?;
        std::fs::write(ndir.join("agent.yaml"), config)?;
        Ok(())
    }

    fn start_agent(&self, node: &str) -> anyhow::Result<()> {
        let config = self.node_dir(node).join("agent.yaml");
        self.say(&format!(
            "    {node}: strait agent --config {} (in network namespace {})",
            config.display(),
            self.ns(node)
        ));
        self.spawn(
            &format!("agent-{node}"),
            &self.ns(node),
            &self.opts.strait,
            &[
                "agent".into(),
                "--config".into(),
                config.display().to_string(),
            ],
        )
    }

    /// `strait status --json` on `node`, run inside its namespace.
    pub fn status(&self, node: &str) -> Result<AgentStatus, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(node)])
            .arg(&self.opts.strait)
            .args(["status", "--json", "--socket"])
            .arg(self.api_socket(node))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status --json: {e}"))
    }

    /// `strait status` (text) on `node`.
    pub fn status_text(&self, node: &str) -> String {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(node)])
            .arg(&self.opts.strait)
            .args(["status", "--socket"])
            .arg(self.api_socket(node))
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_else(|e| e.to_string())
    }

    /// Runs `sockprobe` as a process of `pod` (its cgroup and namespace): `count` TCP
    /// connections to `target`.
    fn probe(&self, pod: &str, target: SocketAddr, count: u32) -> Vec<Probe> {
        let p = pod_def(pod);
        crate::datapath::probe(&self.pod_cgroup(p), &self.ns(pod), target, count, false)
    }

    /// A TCP connection from inside `pod`'s namespace (a thread there; sockets keep their
    /// namespace).
    fn connect_from(&self, pod: &str, to: SocketAddr) -> anyhow::Result<TcpStream> {
        in_netns(&self.ns(pod), move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(2))
        })?
        .with_context(|| format!("connecting from {pod} to {to}"))
    }
}

fn pod_def_app(ip: Ipv4Addr) -> &'static str {
    PODS.iter().find(|p| p.ip == ip).map_or("", |p| p.app)
}

fn service_yaml(c: &ClusterDef, name: &str, affinity: &str, backends: Vec<Ipv4Addr>) -> String {
    let (vip, port) = match name {
        "payment-api" => (c.payment_vip, PAYMENT_PORT),
        _ => (c.ledger_vip, LEDGER_PORT),
    };
    let endpoints = if backends.is_empty() {
        "endpoints: []\n".to_owned()
    } else {
        let mut s = String::from("endpoints:\n");
        for b in backends {
            let _ = writeln!(s, "- addresses: [{b}]\n  conditions: {{ready: true}}");
        }
        s
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    \
         service.cilium.io/global: \"true\"\n    service.cilium.io/affinity: \"{affinity}\"\nspec:\n  type: ClusterIP\n  \
         clusterIP: {vip}\n  selector: {{app: payment-api}}\n  ports:\n  - port: {port}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{cluster}\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{port: {port}, protocol: TCP}}]\n{endpoints}",
        cluster = short(c.name)
    )
}

/// The user's policy, verbatim.
const POLICY: &str = r#"apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: cross-cluster-db-access
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: database
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
        io.cilium.k8s.policy.cluster: cluster-usa
"#;

/// Which cluster a backend address belongs to.
fn backend_cluster(answer: &str) -> &'static str {
    if answer.starts_with("10.1.") {
        USA
    } else if answer.starts_with("10.2.") {
        EUROPE
    } else {
        "?"
    }
}

fn answers(probes: &[Probe]) -> Vec<Result<String, String>> {
    probes
        .iter()
        .map(|p| match p {
            Probe::Ok { backend, .. } => Ok(backend.split(':').next().unwrap_or("").to_owned()),
            Probe::Err { errno, .. } => Err(errno.clone()),
        })
        .collect()
}

fn by_cluster(probes: &[Probe]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers(probes) {
        let key = match a {
            Ok(b) => backend_cluster(&b).to_owned(),
            Err(e) => format!("error {e}"),
        };
        *m.entry(key).or_default() += 1;
    }
    m
}

/// Sends `msg` and reads the echo.
fn echo(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf)?;
    if buf != msg {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// Runs the whole scenario: builds the mesh, runs every step (a failing step is reported and
/// the next ones still run where they can), cleans up. `on_mesh` gets the resource record
/// before anything is created (for a Ctrl-C handler).
pub fn run(opts: Options, on_mesh: impl FnOnce(Arc<Mutex<Resources>>)) -> Report {
    let started = Instant::now();
    let mut report = Report::default();
    let narrate = opts.narrate;
    banner(
        "building the mesh",
        "two clusters of two nodes on a closed underlay: etcd + strait kvstoremesh per cluster, \
         strait agent (eBPF datapath, WireGuard via wireguard-go) in every node namespace",
        narrate,
    );
    let resources = Arc::new(Mutex::new(Resources::default()));
    on_mesh(resources.clone());
    let mesh = match Mesh::build(opts, resources) {
        Ok(m) => {
            report.build = started.elapsed();
            println!(
                "    namespaces, cgroups, etcds and processes up in {:.1}s",
                report.build.as_secs_f64()
            );
            m
        }
        Err(e) => {
            report.steps.push(StepReport {
                step: 0,
                title: "build the mesh",
                result: Err(format!("{e:#}")),
            });
            report.total = started.elapsed();
            return report;
        }
    };
    let steps: [(u8, &'static str, &'static str, StepFn); 7] = [
        (
            1,
            "mesh up",
            "every agent reads both clusters (the remote one through its own cluster's \
             KVStoreMesh cache) and counts the right nodes, endpoints, identities and services",
            Mesh::step1_mesh_up,
        ),
        (
            2,
            "global service failover (affinity local)",
            "a usa client of payment-api stays in usa while a usa backend is ready, moves to \
             europe when none is, and comes back when they return",
            Mesh::step2_failover,
        ),
        (
            4,
            "cross-cluster zero trust",
            "cross-cluster-db-access lets only usa's frontend reach europe's database; every \
             drop is visible in `strait observe` with both identities and cluster names",
            Mesh::step4_policy,
        ),
        (
            6,
            "agent restart",
            "a long-lived TCP connection from usa to europe survives the usa agent's restart, and \
             new connections keep working meanwhile (pinned maps and links)",
            Mesh::step6_restart,
        ),
        (
            7,
            "overlapping cluster refused",
            "a third cluster whose pod CIDR overlaps usa's is refused with an error naming both; \
             usa and europe keep working",
            Mesh::step7_overlap,
        ),
        (
            5,
            "encryption on the underlay",
            "everything that crossed the underlay during steps 1-7 was WireGuard (UDP 51871) \
             between nodes or control-plane etcd traffic; no pod address in clear",
            Mesh::step5_encryption,
        ),
        (
            3,
            "whole-cluster loss",
            "a kvstore disconnect alone removes nothing; losing usa entirely (agents, etcd, \
             underlay) moves europe's clients of an affinity-none service to europe within 3 s; \
             restarting usa brings its backends back",
            Mesh::step3_cluster_loss,
        ),
    ];
    if narrate {
        println!(
            "\n    The steps run in the order 1, 2, 4, 6, 7, 5, 3: the underlay capture of step 5 \
             spans everything before it, and step 3 takes a whole cluster down, so it comes last."
        );
    }
    let mut ctx = Ctx::default();
    for (n, title, proves, f) in steps {
        banner(&format!("step {n}: {title}"), proves, narrate);
        let t = Instant::now();
        let result = f(&mesh, &mut ctx).map_err(|e| format!("{e:#}"));
        match &result {
            Ok(m) => println!("    PASS ({:.1}s): {m}", t.elapsed().as_secs_f64()),
            Err(e) => {
                println!("    FAIL ({:.1}s): {e}", t.elapsed().as_secs_f64());
                for name in ["agent-usa-1", "agent-europe-1", "agent-europe-2"] {
                    println!(
                        "    --- last lines of {name}.log\n{}",
                        mesh.log_tail(name, 12)
                    );
                }
            }
        }
        report.steps.push(StepReport {
            step: n,
            title,
            result,
        });
        if n == 1 && report.steps.last().is_some_and(|s| s.result.is_err()) {
            break; // nothing else can work without the mesh
        }
    }
    report.synced = ctx.synced;
    report.failover_local_to_remote = ctx.failover;
    report.failback_remote_to_local = ctx.failback;
    report.cluster_loss_failover = ctx.cluster_loss;
    report.status_transcript = ctx.transcript;
    if let Some(keep) = std::env::var_os("STRAIT_E2E_KEEP_LOGS") {
        let keep = PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        if let Ok(entries) = std::fs::read_dir(mesh.dir.join("logs")) {
            for e in entries.flatten() {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
        println!("    logs kept in {}", keep.display());
    }
    banner(
        "cleaning up",
        "processes, namespaces, cgroups, pins",
        narrate,
    );
    drop(mesh);
    report.total = started.elapsed();
    report
}

type StepFn = fn(&Mesh, &mut Ctx) -> anyhow::Result<String>;

/// State carried between steps.
#[derive(Default)]
struct Ctx {
    synced: Duration,
    captures: Vec<Capture>,
    failover: Option<Duration>,
    failback: Option<Duration>,
    cluster_loss: Option<Duration>,
    transcript: String,
}

fn banner(title: &str, text: &str, narrate: bool) {
    println!("\n==> {title}");
    if narrate {
        println!("    {text}");
    }
}

/// A tcpdump on one router-side interface.
struct Capture {
    child: Option<Child>,
    file: PathBuf,
    iface: String,
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGINT);
        }
    }
}

impl Capture {
    fn start(mesh: &Mesh, iface: &str) -> anyhow::Result<Self> {
        let file = mesh.dir.join(format!("underlay-{iface}.pcap"));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &mesh.router(), "tcpdump", "-i", iface])
            .args(["-n", "--immediate-mode", "-U", "-Z", "root", "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let this = Self {
            child: Some(child),
            file,
            iface: iface.to_owned(),
        };
        rx.recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("tcpdump did not start on {iface}"))?;
        Ok(this)
    }

    fn finish(mut self) -> anyhow::Result<Vec<String>> {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGINT);
        }
        let out = Command::new("tcpdump")
            .arg("-r")
            .arg(&self.file)
            .arg("-nn")
            .output()?;
        ensure!(
            out.status.success(),
            "tcpdump -r: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// Underlay packet counts by kind.
#[derive(Debug, Default, Clone, Copy)]
struct UnderlayCounts {
    wireguard: usize,
    /// Node or control plane talking to an etcd (port 2379).
    control_plane: usize,
    /// strait's remote-datapath health probes between node addresses (UDP 4241): node
    /// addresses and a magic only, no pod address.
    health: usize,
}

/// Classifies captured underlay packets: WireGuard between nodes, control-plane etcd traffic,
/// health probes between nodes, or a violation (anything else, and any packet naming a pod or
/// service address).
fn check_underlay(lines: &[String], nodes: &[Ipv4Addr]) -> Result<UnderlayCounts, String> {
    let wg: Vec<String> = nodes.iter().map(|ip| format!("{ip}.{WG_PORT}")).collect();
    let health: Vec<String> = nodes
        .iter()
        .map(|ip| format!("{ip}.{}", strait::health::HEALTH_PORT))
        .collect();
    // An address with or without a port (`198.18.11.2.4241`, `198.18.11.2`).
    let node_addr = |a: &str| {
        nodes
            .iter()
            .any(|ip| a == ip.to_string() || a.starts_with(&format!("{ip}.")))
    };
    let mut counts = UnderlayCounts::default();
    for line in lines {
        let packet = line.split_once(' ').map_or(line.as_str(), |(_, p)| p);
        if packet.contains(" 10.") || packet.starts_with("10.") {
            return Err(format!(
                "a pod or service address crossed the underlay in clear: {line}"
            ));
        }
        if packet.contains("ARP, ") {
            continue;
        }
        let Some(rest) = packet.strip_prefix("IP ") else {
            return Err(format!("unexpected non-IP packet: {line}"));
        };
        let mut w = rest.split_whitespace();
        let (src, _, dst) = (
            w.next().unwrap_or(""),
            w.next(),
            w.next().unwrap_or("").trim_end_matches(':'),
        );
        let udp = rest.contains("UDP");
        if wg.iter().any(|e| e == src) && wg.iter().any(|e| e == dst) && udp {
            counts.wireguard += 1;
        } else if src.ends_with(".2379") || dst.ends_with(".2379") {
            counts.control_plane += 1;
        } else if (udp
            && node_addr(src)
            && node_addr(dst)
            && (health.iter().any(|h| h == src) || health.iter().any(|h| h == dst)))
            || (rest.contains("ICMP")
                && node_addr(src)
                && node_addr(dst)
                && rest.contains(&format!(
                    "udp port {} unreachable",
                    strait::health::HEALTH_PORT
                )))
        {
            // A probe, its answer, or the kernel's "port unreachable" while an agent restarts.
            counts.health += 1;
        } else {
            return Err(format!(
                "neither WireGuard, control-plane nor health-probe traffic: {line}"
            ));
        }
    }
    Ok(counts)
}

impl Mesh {
    fn step1_mesh_up(&self, ctx: &mut Ctx) -> anyhow::Result<String> {
        // Captures start first: everything from here on crosses a watched underlay.
        for n in &NODES {
            ctx.captures.push(Capture::start(self, n.name)?);
        }
        self.say("    waiting for every agent to report both clusters synced …");
        let start = Instant::now();
        let mut last = BTreeMap::new();
        let statuses = wait_for(
            "every agent synced with the mesh",
            Duration::from_secs(90),
            || {
                let mut all = Vec::new();
                for n in &NODES {
                    let s = match self.status(n.name) {
                        Ok(s) => s,
                        Err(e) => {
                            last.insert(n.name, e.clone());
                            return Err(format!("{}: {e}", n.name));
                        }
                    };
                    if let Err(e) = mesh_complete(n, &s) {
                        last.insert(n.name, e.clone());
                        return Err(format!("{}: {e}", n.name));
                    }
                    all.push(s);
                }
                Ok(Some(all))
            },
        )?;
        ctx.synced = start.elapsed();
        let mut transcript = String::new();
        for n in &NODES {
            let _ = writeln!(
                transcript,
                "$ ip netns exec {} strait status\n{}",
                self.ns(n.name),
                self.status_text(n.name)
            );
        }
        let _ = writeln!(
            transcript,
            "$ strait status --json   (usa-1, cluster-mesh part)\n{}",
            serde_json::to_string_pretty(&serde_json::to_value(&statuses[0].cluster_mesh)?)?
        );
        println!("{}", indent(&transcript));
        ctx.transcript = transcript;
        // Pod to pod across clusters, through the tunnel.
        let probes = self.probe(
            "frontend",
            SocketAddr::from((pod_def("pay-c").ip, PAYMENT_PORT)),
            3,
        );
        ensure!(
            probes.iter().all(|p| matches!(p, Probe::Ok { .. })),
            "usa frontend cannot reach europe's pay-c directly: {probes:?}"
        );
        Ok(format!(
            "4 agents synced {:.1}s after start-up; usa frontend → europe pay-c over WireGuard",
            ctx.synced.as_secs_f64()
        ))
    }

    fn step2_failover(&self, ctx: &mut Ctx) -> anyhow::Result<String> {
        let vip = SocketAddr::from((cluster(USA).payment_vip, PAYMENT_PORT));
        let before = self.probe("frontend", vip, 20);
        let counts = by_cluster(&before);
        self.say(&format!(
            "    usa frontend → payment-api {vip}: 20 connections, by backend cluster {counts:?}"
        ));
        ensure!(
            counts.get(USA) == Some(&20),
            "with usa backends ready every connection must stay in usa: {counts:?}"
        );
        self.say("    removing every usa backend from payment-api's EndpointSlice …");
        let t0 = Instant::now();
        self.set_payment_backends(USA, Vec::new())?;
        let failover = self.time_until("frontend", vip, EUROPE, Duration::from_secs(10), t0)?;
        ctx.failover = Some(failover);
        let after = by_cluster(&self.probe("frontend", vip, 20));
        ensure!(
            after.get(EUROPE) == Some(&20),
            "with no usa backend every connection must go to europe: {after:?}"
        );
        println!(
            "    failover usa → europe: {:.0} ms after the last usa backend left the EndpointSlice",
            failover.as_secs_f64() * 1e3
        );
        self.say("    restoring the usa backends …");
        let t1 = Instant::now();
        self.set_payment_backends(USA, self.backends(USA))?;
        let failback = self.time_until("frontend", vip, USA, Duration::from_secs(10), t1)?;
        ctx.failback = Some(failback);
        let back = by_cluster(&self.probe("frontend", vip, 20));
        ensure!(
            back.get(USA) == Some(&20),
            "usa backends are back: every connection must stay local again: {back:?}"
        );
        println!(
            "    failback europe → usa: {:.0} ms after the usa backends returned",
            failback.as_secs_f64() * 1e3
        );
        ensure!(
            failover < Duration::from_secs(1),
            "failover took {failover:?}, target < 1 s"
        );
        Ok(format!(
            "20/20 local before, failover {:.0} ms, 20/20 europe, failback {:.0} ms, 20/20 local",
            failover.as_secs_f64() * 1e3,
            failback.as_secs_f64() * 1e3
        ))
    }

    /// Probes `target` from `pod` one connection at a time until one is answered by a backend
    /// of `cluster`; returns the time since `since`.
    fn time_until(
        &self,
        pod: &str,
        target: SocketAddr,
        cluster: &str,
        timeout: Duration,
        since: Instant,
    ) -> anyhow::Result<Duration> {
        let mut seen = Vec::new();
        while since.elapsed() < timeout {
            let p = self.probe(pod, target, 1);
            if let Some(Ok(b)) = answers(&p).first()
                && backend_cluster(b) == cluster
            {
                return Ok(since.elapsed());
            }
            seen.extend(answers(&p));
        }
        bail!(
            "no connection from {pod} to {target} reached {cluster} within {timeout:?} (answers: {:?})",
            &seen[seen.len().saturating_sub(5)..]
        )
    }

    fn step4_policy(&self, _ctx: &mut Ctx) -> anyhow::Result<String> {
        let db = SocketAddr::from((pod_def("db").ip, DB_PORT));
        let allowed = self.probe("frontend", db, 2);
        self.say(&format!(
            "    usa frontend (app=frontend, cluster-usa) → europe db {db}: {:?}",
            answers(&allowed)
        ));
        ensure!(
            allowed.iter().all(|p| matches!(p, Probe::Ok { .. })),
            "usa frontend must reach the database: {allowed:?}"
        );
        let mut denied = Vec::new();
        for pod in ["reports", "frontend-eu"] {
            let p = self.probe(pod, db, 1);
            self.say(&format!(
                "    {pod} ({}, {}) → europe db: {:?}",
                pod_def(pod).app,
                pod_cluster(pod_def(pod)),
                answers(&p)
            ));
            ensure!(
                p.iter().all(|p| matches!(p, Probe::Err { .. })),
                "{pod} must be dropped by cross-cluster-db-access: {p:?}"
            );
            denied.push(pod);
        }
        // The drops as the db's node agent reports them.
        let flows = wait_for(
            "both drops in strait observe",
            Duration::from_secs(10),
            || {
                let out = Command::new("ip")
                    .args(["netns", "exec", &self.ns("europe-2")])
                    .arg(&self.opts.strait)
                    .args(["observe", "--json", "--last", "200", "--socket"])
                    .arg(self.api_socket("europe-2"))
                    .output()
                    .map_err(|e| e.to_string())?;
                let flows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                let drop_from = |pod: &str, cluster: &str| {
                    flows.iter().find(|f| {
                        f["verdict"].as_str().is_some_and(|v| v.contains("DROP"))
                            && f["source"]["address"]
                                .as_str()
                                .is_some_and(|a| a.starts_with(&format!("{}:", pod_def(pod).ip)))
                            && f["source"]["cluster"].as_str() == Some(cluster)
                            && f["destination"]["cluster"].as_str() == Some(EUROPE)
                            && f["source"]["identity"].as_u64().unwrap_or(0) > 0
                            && f["destination"]["identity"].as_u64().unwrap_or(0) > 0
                    })
                };
                match (drop_from("reports", USA), drop_from("frontend-eu", EUROPE)) {
                    (Some(a), Some(b)) => Ok(Some((a.clone(), b.clone()))),
                    _ => Err(format!(
                        "{} flows, verdicts {:?}",
                        flows.len(),
                        flows
                            .iter()
                            .map(|f| format!(
                                "{} {}→{}",
                                f["verdict"], f["source"]["address"], f["destination"]["address"]
                            ))
                            .collect::<Vec<_>>()
                    )),
                }
            },
        )?;
        println!(
            "    strait observe --json on europe-2 (the db's node):\n      {}\n      {}",
            flows.0, flows.1
        );
        Ok(
            "usa frontend allowed; usa reports and europe frontend dropped, both drops in \
             strait observe with identities and clusters"
                .into(),
        )
    }

    fn step6_restart(&self, _ctx: &mut Ctx) -> anyhow::Result<String> {
        let echo_addr = SocketAddr::from((pod_def("pay-c").ip, ECHO_PORT));
        let mut long = self.connect_from("frontend", echo_addr)?;
        echo(&mut long, b"before the restart").context("long-lived connection before")?;
        self.say(&format!(
            "    long-lived TCP connection usa frontend → europe pay-c {echo_addr} open; \
             killing usa-1's agent (SIGKILL) and starting it again …"
        ));
        let started = Instant::now();
        self.stop("agent-usa-1", libc::SIGKILL);
        let _ = std::fs::remove_file(self.api_socket("usa-1"));
        self.start_agent("usa-1")?;
        // New connections while the agent is (re)starting: through the pinned socket LB
        // (payment-api VIP) and straight to a europe pod through the tunnel.
        let vip = SocketAddr::from((cluster(USA).payment_vip, PAYMENT_PORT));
        let direct = SocketAddr::from((pod_def("pay-d").ip, PAYMENT_PORT));
        let (mut ok, mut failed) = (0, Vec::new());
        let mut ready_after = None;
        while started.elapsed() < Duration::from_secs(60) {
            for target in [vip, direct] {
                for a in answers(&self.probe("frontend", target, 1)) {
                    match a {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(format!("{target}: {e}")),
                    }
                }
            }
            if let Ok(s) = self.status("usa-1")
                && mesh_complete(node_def("usa-1"), &s).is_ok()
            {
                ready_after = Some(started.elapsed());
                break;
            }
        }
        let ready_after =
            ready_after.context("the restarted usa-1 agent did not sync within 60 s")?;
        echo(&mut long, b"after the restart").context("long-lived connection after the restart")?;
        ensure!(
            failed.is_empty(),
            "{} of {} new connections failed during the restart: {failed:?}",
            failed.len(),
            ok + failed.len()
        );
        Ok(format!(
            "agent back in sync after {:.1}s; long-lived connection kept; {ok}/{ok} new connections \
             (VIP and cross-cluster) worked meanwhile",
            ready_after.as_secs_f64()
        ))
    }

    fn step7_overlap(&self, _ctx: &mut Ctx) -> anyhow::Result<String> {
        self.say(&format!(
            "    cluster-mars (id {MARS_ID}): its own etcd and kvstoremesh, one node with pod CIDR \
             {MARS_POD_CIDR} (mars reused usa's 10.1.0.0/16; usa-1 has that /24); connecting it \
             to usa …"
        ));
        self.control_plane(MARS, MARS_ID, MARS_CP_LINK)?;
        self.start_kvstoremesh(MARS, Some(MARS_ID))?;
        self.add_member("mars-1", MARS_NODE_LINK)?;
        let ndir = self.node_dir("mars-1");
        std::fs::create_dir_all(ndir.join("state"))?;
        let cdir = self.cluster_dir(MARS);
        std::fs::write(
            ndir.join("agent.yaml"),
            format!(
                "cluster: {{name: {MARS}, id: {MARS_ID}}}\nnode: {{name: mars-1, internalIP: {}, podCIDRs: [{MARS_POD_CIDR}]}}\n\
                 kvstoreConfig: {}\nclustermeshConfigDir: {}\nstateDir: {}\napiSocket: {}\nwireguard: {{enabled: false}}\n",
                underlay_ip(MARS_NODE_LINK),
                cdir.join("etcd.yaml").display(),
                cdir.join("clustermesh.d").display(),
                ndir.join("state").display(),
                self.api_socket("mars-1").display(),
            ),
        )?;
        self.start_agent("mars-1")?;
        self.connect(USA, MARS, MARS_CP_LINK)?;
        let status = wait_for(
            "usa-1 to refuse cluster-mars",
            Duration::from_secs(30),
            || {
                let s = self.status("usa-1")?;
                let mars = s
                    .cluster_mesh
                    .clusters
                    .iter()
                    .find(|c| c.name == MARS)
                    .cloned();
                match mars {
                    Some(m)
                        if m.error.as_deref().is_some_and(|e| {
                            e.contains(MARS) && e.contains(USA) && e.contains(MARS_POD_CIDR)
                        }) =>
                    {
                        Ok(Some(m))
                    }
                    other => Err(format!("cluster-mars: {other:?}")),
                }
            },
        )?;
        let error = status.error.clone().unwrap_or_default();
        println!("    usa-1 status for cluster-mars: {}", error);
        let logged = std::fs::read_to_string(self.log_path("agent-usa-1"))?
            .lines()
            .any(|l| l.contains(MARS) && l.contains(USA) && l.contains("overlap"));
        ensure!(logged, "usa-1's log does not name the overlap");
        let text = self.status_text("usa-1");
        self.say(&indent(&format!("$ strait status   (usa-1)\n{text}")));
        // The mesh keeps working.
        let vip = SocketAddr::from((cluster(USA).payment_vip, PAYMENT_PORT));
        let p = by_cluster(&self.probe("frontend", vip, 5));
        ensure!(
            p.get(USA) == Some(&5),
            "usa payment-api after the refusal: {p:?}"
        );
        let cross = self.probe(
            "frontend",
            SocketAddr::from((pod_def("pay-c").ip, PAYMENT_PORT)),
            3,
        );
        ensure!(
            cross.iter().all(|p| matches!(p, Probe::Ok { .. })),
            "usa → europe after the refusal: {cross:?}"
        );
        let eu = self.status("europe-1").map_err(anyhow::Error::msg)?;
        ensure!(
            eu.cluster_mesh
                .clusters
                .iter()
                .any(|c| c.name == USA && c.ready),
            "europe-1 lost usa: {eu:?}"
        );
        // Disconnect mars again (its cache drains) so the rest runs on the two clusters.
        let _ = std::fs::remove_file(self.cluster_dir(USA).join("clustermesh.d").join(MARS));
        let _ = std::fs::remove_file(self.cluster_dir(USA).join("kvstoremesh.d").join(MARS));
        self.stop("agent-mars-1", libc::SIGTERM);
        self.stop("kvstoremesh-mars", libc::SIGTERM);
        self.stop("etcd-mars", libc::SIGTERM);
        Ok(format!("refused: {error}; usa and europe unaffected"))
    }

    fn step5_encryption(&self, ctx: &mut Ctx) -> anyhow::Result<String> {
        // mars' node too: usa's agents probe it while it is connected (refused or not).
        let nodes: Vec<Ipv4Addr> = NODES
            .iter()
            .map(|n| underlay_ip(n.link))
            .chain([underlay_ip(MARS_NODE_LINK)])
            .collect();
        let mut out = Vec::new();
        let mut total = UnderlayCounts::default();
        for capture in ctx.captures.drain(..) {
            let iface = capture.iface.clone();
            let lines = capture.finish()?;
            let c = check_underlay(&lines, &nodes)
                .map_err(|e| anyhow::anyhow!("underlay link {iface}: {e}"))?;
            ensure!(c.wireguard > 0, "no WireGuard packet at all on {iface}");
            out.push(format!(
                "{iface}: {} wg, {} etcd, {} health",
                c.wireguard, c.control_plane, c.health
            ));
            total.wireguard += c.wireguard;
            total.control_plane += c.control_plane;
            total.health += c.health;
        }
        println!("    captured on the router: {}", out.join("; "));
        Ok(format!(
            "{} WireGuard packets (UDP {WG_PORT}) between nodes, {} control-plane etcd packets, \
             {} health probes (UDP {}, node addresses only), 0 packets with a pod or service \
             address in clear",
            total.wireguard,
            total.control_plane,
            total.health,
            strait::health::HEALTH_PORT
        ))
    }

    fn step3_cluster_loss(&self, ctx: &mut Ctx) -> anyhow::Result<String> {
        let vip = SocketAddr::from((cluster(EUROPE).ledger_vip, LEDGER_PORT));
        let spread = by_cluster(&self.probe("frontend-eu", vip, 30));
        self.say(&format!(
            "    europe frontend → ledger {vip} (global, affinity none): 30 connections {spread:?}"
        ));
        ensure!(
            spread.get(USA).is_some_and(|n| *n > 0) && spread.get(EUROPE).is_some_and(|n| *n > 0),
            "ledger must spread over both clusters: {spread:?}"
        );

        // (a) kvstore disconnect only: usa's etcd restarts, its nodes keep running.
        let mut long = self.connect_from(
            "frontend-eu",
            SocketAddr::from((pod_def("pay-a").ip, ECHO_PORT)),
        )?;
        echo(&mut long, b"hello usa")?;
        self.say("    stopping usa's etcd for 5 s (its agents and datapath keep running) …");
        self.stop("etcd-usa", libc::SIGTERM);
        let outage = Instant::now();
        let mut during = BTreeMap::new();
        while outage.elapsed() < Duration::from_secs(5) {
            for (k, v) in by_cluster(&self.probe("frontend-eu", vip, 5)) {
                *during.entry(k).or_insert(0) += v;
            }
        }
        echo(&mut long, b"still there").context("connection across the kvstore outage")?;
        self.start_etcd(USA, cluster(USA).cp_link)?;
        ensure!(
            during.get(USA).is_some_and(|n| *n > 0)
                && during.keys().all(|k| !k.starts_with("error")),
            "a kvstore disconnect must not remove usa backends or fail connections: {during:?}"
        );
        self.say(&format!(
            "    during the etcd outage: {during:?}; the long-lived connection survived"
        ));

        // (b) usa gone: agents, kvstoremesh, etcd, underlay.
        self.say("    stopping every usa agent, usa's kvstoremesh and etcd, taking usa's underlay down …");
        for n in NODES.iter().filter(|n| n.cluster == USA) {
            self.stop(&format!("agent-{}", n.name), libc::SIGTERM);
        }
        self.stop("kvstoremesh-usa", libc::SIGTERM);
        self.stop("etcd-usa", libc::SIGTERM);
        for n in NODES.iter().filter(|n| n.cluster == USA) {
            run_ip(&["-n", &self.router(), "link", "set", n.name, "down"])?;
        }
        let lost = Instant::now();
        // The time from which every connection went to europe (10 in a row at least).
        let mut all_europe_since: Option<Duration> = None;
        let mut streak = 0;
        let mut trail = Vec::new();
        while lost.elapsed() < Duration::from_secs(15) {
            let t = lost.elapsed();
            let a = answers(&self.probe("frontend-eu", vip, 1));
            let to_europe = matches!(a.first(), Some(Ok(b)) if backend_cluster(b) == EUROPE);
            trail.push(format!("{:.1}s {:?}", t.as_secs_f64(), a.first()));
            if to_europe {
                all_europe_since.get_or_insert(t);
                streak += 1;
                if streak >= 10 {
                    break;
                }
            } else {
                all_europe_since = None;
                streak = 0;
            }
        }
        let result = match (all_europe_since, streak >= 10) {
            (Some(t), true) => {
                ctx.cluster_loss = Some(t);
                println!(
                    "    europe stopped sending to usa {:.0} ms after usa went down",
                    t.as_secs_f64() * 1e3
                );
                if t <= Duration::from_secs(3) {
                    Ok(t)
                } else {
                    Err(format!("took {t:?}, target ≤ 3 s"))
                }
            }
            _ => Err(format!(
                "europe kept sending to usa's dead backends for 15 s (needs remote-datapath \
                 health): last probes {:?}",
                &trail[trail.len().saturating_sub(6)..]
            )),
        };

        // (c) usa comes back.
        self.say("    restarting usa: underlay up, etcd, kvstoremesh, agents …");
        for n in NODES.iter().filter(|n| n.cluster == USA) {
            run_ip(&["-n", &self.router(), "link", "set", n.name, "up"])?;
        }
        self.start_etcd(USA, cluster(USA).cp_link)?;
        self.start_kvstoremesh(USA, Some(cluster(USA).id))?;
        for n in NODES.iter().filter(|n| n.cluster == USA) {
            let _ = std::fs::remove_file(self.api_socket(n.name));
            self.start_agent(n.name)?;
        }
        let back = Instant::now();
        wait_for(
            "europe's ledger clients to reach usa again",
            Duration::from_secs(60),
            || {
                let c = by_cluster(&self.probe("frontend-eu", vip, 6));
                if c.get(USA).is_some_and(|n| *n > 0) {
                    Ok(Some(()))
                } else {
                    Err(format!("{c:?}"))
                }
            },
        )?;
        let restored = back.elapsed();
        println!(
            "    usa restored: europe reaches usa backends again after {:.1}s",
            restored.as_secs_f64()
        );
        match result {
            Ok(t) => Ok(format!(
                "kvstore outage removed nothing; usa loss → europe-only in {:.0} ms; restored in {:.1}s",
                t.as_secs_f64() * 1e3,
                restored.as_secs_f64()
            )),
            Err(e) => bail!("kvstore outage removed nothing (ok); cluster loss: {e}"),
        }
    }
}

/// Checks one agent's status against the scenario: its own cluster synced with two nodes,
/// the other cluster ready and synced through KVStoreMesh with its nodes, endpoints,
/// identities and services.
fn mesh_complete(n: &NodeDef, s: &AgentStatus) -> Result<(), String> {
    let other = if n.cluster == USA { EUROPE } else { USA };
    let c = &s.cluster;
    if !c.kvstore_synced || c.num_nodes != 2 {
        return Err(format!(
            "local: synced {} nodes {}",
            c.kvstore_synced, c.num_nodes
        ));
    }
    let local_pods = PODS.iter().filter(|p| pod_cluster(p) == n.cluster).count();
    if c.num_endpoints != local_pods {
        return Err(format!(
            "local endpoints {} != {local_pods}",
            c.num_endpoints
        ));
    }
    let Some(r) = s.cluster_mesh.clusters.iter().find(|r| r.name == other) else {
        return Err(format!("{other} not listed"));
    };
    let remote_pods = PODS.iter().filter(|p| pod_cluster(p) == other).count();
    let kvstoremesh = r.config.as_ref().is_some_and(|c| c.kvstoremesh);
    let synced = r.synced.nodes && r.synced.endpoints && r.synced.identities && r.synced.services;
    if !(r.ready && synced && kvstoremesh)
        || r.num_nodes != 2
        || r.num_endpoints != remote_pods
        || r.num_identities != 3
        || r.num_shared_services != 2
        || s.cluster_mesh.num_global_services != 2
    {
        return Err(format!(
            "{other}: ready {} synced {:?} kvstoremesh {kvstoremesh} nodes {} endpoints {} identities {} services {} global {}",
            r.ready,
            r.synced,
            r.num_nodes,
            r.num_endpoints,
            r.num_identities,
            r.num_shared_services,
            s.cluster_mesh.num_global_services
        ));
    }
    let peers = s.encryption.as_ref().map_or(0, |e| e.peers.len());
    if peers != NODES.len() - 1 {
        return Err(format!("{peers} WireGuard peers, want {}", NODES.len() - 1));
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
