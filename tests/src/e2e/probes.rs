//! What the steps look at: `strait status`/`observe` on a node (bounded in time), TCP
//! connections from a pod (sockprobe in its cgroup, or a socket in its namespace), which
//! cluster answered, and tcpdump captures on the router.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use strait::status::AgentStatus;

use super::{
    layout::{backend_cluster, pod_def},
    mesh::Mesh,
    processes::stop_child,
    topology::in_netns,
};
use crate::datapath::Probe;

impl Mesh {
    /// `strait <args> --socket <node's API socket>` inside `node`'s namespace, within
    /// [`CLI_TIMEOUT`].
    fn cli(&self, node: &str, args: &[&str]) -> Result<Output, String> {
        output_within(
            Command::new("ip")
                .args(["netns", "exec", &self.ns(node)])
                .arg(&self.opts.strait)
                .args(args)
                .arg("--socket")
                .arg(self.api_socket(node)),
            CLI_TIMEOUT,
        )
    }

    /// `strait status --json` on `node`, run inside its namespace.
    pub fn status(&self, node: &str) -> Result<AgentStatus, String> {
        let out = self
            .cli(node, &["status", "--json"])
            .map_err(|e| format!("strait status on {node}: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status --json: {e}"))
    }

    /// `strait status` (text) on `node`.
    pub fn status_text(&self, node: &str) -> String {
        self.cli(node, &["status"])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_else(|e| format!("strait status on {node}: {e}"))
    }

    /// The last `last` flows of `strait observe --json` on `node`.
    pub(super) fn observe(&self, node: &str, last: u32) -> Result<Vec<serde_json::Value>, String> {
        let out = self
            .cli(node, &["observe", "--json", "--last", &last.to_string()])
            .map_err(|e| format!("strait observe on {node}: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Runs `sockprobe` as a process of `pod` (its cgroup and namespace): `count` TCP
    /// connections to `target`.
    pub(super) fn probe(&self, pod: &str, target: SocketAddr, count: u32) -> Vec<Probe> {
        let p = pod_def(pod);
        crate::datapath::probe(&self.pod_cgroup(p), &self.ns(pod), target, count, false)
    }

    /// A TCP connection from inside `pod`'s namespace (a thread there; sockets keep their
    /// namespace).
    pub(super) fn connect_from(&self, pod: &str, to: SocketAddr) -> anyhow::Result<TcpStream> {
        in_netns(&self.ns(pod), move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(2))
        })?
        .with_context(|| format!("connecting from {pod} to {to}"))
    }
}

/// Runs `cmd` to completion within `timeout` (killed by PID after it): a CLI call against a
/// hung agent must fail the step, not hang the test.
fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let reader = std::thread::spawn(move || {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        if let Some(s) = out.as_mut() {
            let _ = s.read_to_end(&mut o);
        }
        if let Some(s) = err.as_mut() {
            let _ = s.read_to_end(&mut e);
        }
        (o, e)
    });
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let (stdout, stderr) = reader.join().unwrap_or_default();
                return Ok(Output {
                    status,
                    stdout,
                    stderr,
                });
            }
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {timeout:?}"));
            }
        }
    }
}

/// How long a `strait status` / `strait observe` call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout` with the last
/// reason it gave.
pub(super) fn wait_for<T>(
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

pub(super) fn answers(probes: &[Probe]) -> Vec<Result<String, String>> {
    probes
        .iter()
        .map(|p| match p {
            Probe::Ok { backend, .. } => Ok(backend.split(':').next().unwrap_or("").to_owned()),
            Probe::Err { errno, .. } => Err(errno.clone()),
        })
        .collect()
}

pub(super) fn by_cluster(probes: &[Probe]) -> BTreeMap<String, usize> {
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

/// Whether every connection was answered.
pub(super) fn reached(probes: &[Probe]) -> bool {
    probes.iter().all(|p| matches!(p, Probe::Ok { .. }))
}

/// A tcpdump on one router-side interface.
pub(super) struct Capture {
    child: Option<Child>,
    file: PathBuf,
    pub(super) iface: String,
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGINT);
        }
    }
}

impl Capture {
    pub(super) fn start(mesh: &Mesh, iface: &str) -> anyhow::Result<Self> {
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

    pub(super) fn finish(mut self) -> anyhow::Result<Vec<String>> {
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
