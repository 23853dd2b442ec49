//! The scenario's processes: etcd, kvstoremesh and agents started inside their namespaces,
//! their configs and logs; stopping them, and the wireguard-go an agent leaves behind.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    layout::{NodeDef, cluster, short, underlay_ip},
    mesh::Mesh,
    probes::wait_for,
};

impl Mesh {
    /// Starts `program args` inside `ns`, logging to logs/<name>.log. The child joins the
    /// namespace with setns(2) before exec, not through `ip netns exec`: that also remounts
    /// /sys, hiding bpffs and the cgroup v2 mount the agent needs.
    pub(super) fn spawn(
        &self,
        name: &str,
        ns: &str,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<()> {
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
    pub(super) fn stop(&self, name: &str, signal: i32) {
        let child = {
            let mut res = self.res();
            let i = res.procs.iter().position(|(n, _)| n == name);
            i.map(|i| res.procs.remove(i).1)
        };
        if let Some(mut child) = child {
            stop_child(&mut child, signal);
        }
    }

    pub(super) fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A control-plane namespace with the cluster's etcd on its underlay address.
    pub(super) fn control_plane(&self, cluster: &str, link: u8) -> anyhow::Result<()> {
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

    pub(super) fn start_etcd(&self, cluster: &str, link: u8) -> anyhow::Result<()> {
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
    pub(super) fn start_kvstoremesh(&self, cluster: &str, id: Option<u32>) -> anyhow::Result<()> {
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
    pub(super) fn connect(
        &self,
        cluster: &str,
        remote: &str,
        remote_cp_link: u8,
    ) -> anyhow::Result<()> {
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

    pub(super) fn write_agent_config(&self, n: &NodeDef) -> anyhow::Result<()> {
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

    pub(super) fn start_agent(&self, node: &str) -> anyhow::Result<()> {
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
}

/// SIGTERM (or `signal`) to our own child, SIGKILL after 5 s, reaped.
pub(super) fn stop_child(child: &mut Child, signal: i32) {
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
pub(super) fn stop_wireguard_go(device: &str) {
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
