//! A simulated node for strait-cni's tests: a network namespace with an underlay interface,
//! its own etcd and a real `strait agent` (datapath on, WireGuard off) reading pods from a
//! manifests directory, and the plugin executed exactly as a container runtime does (CNI_*
//! environment, configuration on stdin) inside that namespace.
//!
//! The test's thread enters the node's namespace for the whole test (`NodeGuard`): etcd and
//! the agent it spawns live there, and so do the veths the plugin creates. Nothing touches
//! the host's namespace.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use strait::netns::NetnsGuard;

use crate::{
    Netns, TestCgroup, VethPair,
    datapath::{PinRoot, strait_exe},
    etcd::EtcdServer,
    ip,
};

/// The node's underlay address, on a /24 shared with the namespace beyond it.
pub const NODE_IP: &str = "192.168.77.1";
/// The address of the namespace beyond the node's underlay (the "internet").
pub const OUTSIDE_IP: &str = "192.168.77.254";
pub const UNDERLAY_MTU: u32 = 1500;

/// The plugin binary under test.
pub fn cni_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("strait-cni-under-test"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no strait-cni-under-test binary near {}", exe.display()))
}

/// What one plugin call printed and how it exited.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// The spec error code, asserting the call failed with a complete error object.
    pub fn error_code(&self) -> u64 {
        assert!(!self.success, "expected a failure, got {:?}", self.stdout);
        let v = self.json();
        for key in ["cniVersion", "msg", "details"] {
            assert!(v[key].is_string(), "error lacks {key}: {v}");
        }
        v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error lacks code: {v}"))
    }
}

/// One CNI call's environment.
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    pub args: String,
}

/// Runs the plugin (in the calling thread's namespace) as a runtime does.
pub fn exec(call: &Call<'_>, stdin: &Value) -> Outcome {
    let mut cmd = Command::new(cni_exe());
    cmd.env_clear()
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", &call.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = call.netns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd.spawn().expect("starting strait-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("waiting for strait-cni");
    Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// containerd's CNI_ARGS for a pod.
pub fn pod_args(namespace: &str, pod: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=x"
    )
}

/// Keeps the test's thread in the node's namespace; dropped last.
pub struct NodeGuard(#[allow(dead_code)] NetnsGuard);

/// The node: namespace, etcd, agent, the plugin's data directory and configuration.
pub struct Node {
    // Field order is drop order: the agent and etcd stop before the directories go.
    agent: Option<Child>,
    _etcd: EtcdServer,
    _cgroup: TestCgroup,
    _pins: PinRoot,
    pub dir: tempfile::TempDir,
    pub pod_cidr: String,
    pub ns: Netns,
    pub outside: Netns,
    /// The outside end of the underlay veth.
    pub outside_if: String,
    /// Last: the thread leaves the namespace after everything else is gone.
    _guard: NodeGuard,
}

impl Node {
    /// Starts a node whose pod CIDR is `pod_cidr` with `pods` (namespace `shop`, app label
    /// = name) scheduled on it. The calling thread stays inside the node's namespace until
    /// the node is dropped.
    pub fn start(pod_cidr: &str, pods: &[&str]) -> Self {
        Self::start_with(pod_cidr, pods, "")
    }

    /// As [`Node::start`], with `extra` appended to the agent's config.
    pub fn start_with(pod_cidr: &str, pods: &[&str], extra: &str) -> Self {
        let ns = Netns::new();
        // The underlay: a veth to a namespace standing in for the network beyond the node.
        let outside = Netns::new();
        let underlay = VethPair::new(
            &ns,
            &format!("{NODE_IP}/24"),
            &outside,
            &format!("{OUTSIDE_IP}/24"),
        );
        ip(&[
            "-n",
            ns.name(),
            "link",
            "set",
            &underlay.a,
            "mtu",
            &UNDERLAY_MTU.to_string(),
        ]);
        ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            "default",
            "via",
            OUTSIDE_IP,
        ]);
        let guard = NodeGuard(NetnsGuard::enter(ns.name()).expect("entering the node namespace"));
        let etcd = EtcdServer::new();
        let dir = tempfile::Builder::new()
            .prefix("strait-cni-")
            .tempdir()
            .unwrap();
        let pins = PinRoot::new();
        let cgroup = TestCgroup::new();
        let d = dir.path();
        for sub in ["manifests", "clustermesh.d", "state", "cni"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let mut manifests = String::new();
        for pod in pods {
            manifests.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: shop, labels: {{app: {pod}}}}}\n\
                 spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}\n"
            ));
        }
        std::fs::write(d.join("manifests/pods.yaml"), manifests).unwrap();
        std::fs::write(
            d.join("etcd.yaml"),
            format!("endpoints:\n- {}\n", etcd.endpoint()),
        )
        .unwrap();
        std::fs::write(
            d.join("agent.yaml"),
            format!(
                "cluster: {{name: cluster-a, id: 1}}\n\
                 node: {{name: node-1, internalIP: {NODE_IP}, podCIDRs: [{pod_cidr}]}}\n\
                 kvstoreConfig: {etcd}\n\
                 clustermeshConfigDir: {mesh}\n\
                 stateDir: {state}\n\
                 apiSocket: {sock}\n\
                 metricsAddress: 127.0.0.1:0\n\
                 manifestsDir: {manifests}\n\
                 kubernetes: {{source: manifests}}\n\
                 wireguard: {{enabled: false}}\n\
                 datapath: {{pinRoot: {pins}, cgroup: {cgroup}}}\n{extra}",
                etcd = d.join("etcd.yaml").display(),
                mesh = d.join("clustermesh.d").display(),
                state = d.join("state").display(),
                sock = d.join("strait.sock").display(),
                manifests = d.join("manifests").display(),
                pins = pins.path().display(),
                cgroup = cgroup.path().display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("agent.log")).unwrap();
        let agent = Command::new(strait_exe())
            .args(["agent", "--config"])
            .arg(d.join("agent.yaml"))
            .env("STRAIT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting strait agent");
        let node = Self {
            agent: Some(agent),
            _etcd: etcd,
            _cgroup: cgroup,
            _pins: pins,
            dir,
            pod_cidr: pod_cidr.to_owned(),
            ns,
            outside,
            outside_if: underlay.b.clone(),
            _guard: guard,
        };
        node.wait_agent_ready();
        node
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("strait.sock")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("cni")
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The plugin configuration a runtime derives from the conflist.
    pub fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "strait",
            "type": "strait-cni",
            "podCIDR": self.pod_cidr,
            "agentSocket": self.socket(),
            "agentTimeoutSeconds": 60,
            "dataDir": self.data_dir(),
        })
    }

    /// Waits until STATUS says the plugin can serve ADD (the agent answers).
    fn wait_agent_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let call = Call {
            command: "STATUS",
            container_id: "",
            netns: None,
            ifname: "",
            args: String::new(),
        };
        loop {
            let out = exec(&call, &self.conf("1.1.0"));
            if out.success {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent never became ready: {}\nagent log:\n{}",
                out.stdout,
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Allocation files in the plugin's store (addresses only).
    pub fn allocations(&self) -> Vec<String> {
        let dir = self.data_dir().join("strait");
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && agent.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

/// `ip -o <args>` output in the calling thread's namespace.
pub fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n <ns> <args>` output.
pub fn ip_in(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip_out(&all)
}
