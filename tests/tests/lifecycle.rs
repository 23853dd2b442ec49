//! Lifecycle of the real processes: `strait agent` stopped with SIGTERM (graceful shutdown that
//! leaves the datapath in place), started again after a pod went away (restored pins
//! reconciled), readiness following the initial sync with its timeout and the live config
//! directory, and `strait kvstoremesh`'s service exporter handing over on SIGTERM and SIGKILL.

use std::{
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use strait::kvstore::EtcdClient;
use strait_tests::{
    Netns, TestCgroup,
    datapath::{PinRoot, PodNode, strait_exe},
    etcd::{CiliumConfigOptions, EtcdServer, free_port},
    require_privileges,
};

const WAIT: Duration = Duration::from_secs(60);

/// A process of ours, killed by PID on drop if still running.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Sends `signal` and waits (up to `bound`) for the exit.
    fn stop(&mut self, signal: i32, bound: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        self.signal(signal);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < bound,
                "pid {} still running {bound:?} after signal {signal}; log:\n{}",
                self.pid(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `strait args` (in `ns` when given: setns before exec, so bpffs and cgroups stay
/// visible), logging to `log`.
fn spawn_strait(ns: Option<&Netns>, args: &[&str], log: &Path) -> Proc {
    use std::os::fd::AsRawFd as _;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let netns = ns.map(|ns| {
        std::fs::File::open(Path::new(strait::constants::NETNS_RUN_DIR).join(ns.name())).unwrap()
    });
    let fd = netns.as_ref().map(|f| f.as_raw_fd());
    let mut cmd = Command::new(strait_exe());
    cmd.args(args)
        .env("STRAIT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // SAFETY: setns and prctl are async-signal-safe syscalls; `fd` stays open until spawn
    // returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("starting strait");
    Proc {
        child,
        log: log.to_owned(),
    }
}

/// etcd run by a thread inside a namespace, which writes its Cilium config to each path and
/// then waits until dropped.
struct EtcdInNetns {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EtcdInNetns {
    fn start(ns: &Netns, configs: Vec<PathBuf>) -> Self {
        let name = ns.name().to_owned();
        let (stop, wait) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _inside = strait::netns::NetnsGuard::enter(&name).unwrap();
            let etcd = EtcdServer::new();
            for path in &configs {
                etcd.write_cilium_config(path, CiliumConfigOptions::default());
            }
            let _ = ready_tx.send(());
            let _ = wait.recv();
            drop(etcd);
        });
        ready.recv().expect("etcd in the namespace did not start");
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for EtcdInNetns {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `GET path` on 127.0.0.1:port inside `ns`: the status line and body, `None` when nothing
/// answers.
fn http_get(ns: &Netns, port: u16, path: &str) -> Option<String> {
    let path = path.to_owned();
    ns.run(move || {
        use std::io::{Read as _, Write as _};
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

fn wait_until(what: &str, log: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what}: never happened; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pod_yaml(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

/// Every pod enforced: ingress only from app=a on TCP 80, so each has POLICY entries.
const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: from-a, namespace: default}\n\
spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: a}}]\n    \
toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n";

/// ENDPOINTS/POLICY as pinned: ifindex → number of policy entries (empty while the maps are
/// not pinned yet).
fn pinned_endpoints(pins: &strait::datapath::PinDir) -> std::collections::BTreeMap<u32, usize> {
    let open = |name| strait::datapath::open_pinned(pins, name).ok();
    let (Some(endpoints), Some(policy)) = (
        open(strait_common::names::MAP_ENDPOINTS),
        open(strait_common::names::MAP_POLICY),
    ) else {
        return Default::default();
    };
    strait::datapath::policy::list(endpoints, policy)
        .unwrap()
        .into_iter()
        .map(|l| (l.endpoint, l.entries.len()))
        .collect()
}

/// Pinned policy links of an interface.
fn links_of(pins: &strait::datapath::PinDir, ifindex: u32) -> usize {
    std::fs::read_dir(pins.dir().join("links"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with(&format!("-if{ifindex}"))
        })
        .count()
}

/// The rules of a graceful stop and of a restart after a pod was deleted, on the real binary
/// in a node namespace with two pods:
/// * SIGTERM with a followed `observe` stream open: exit 0 within the bound (the agent's own
///   budget is 5 s), the API socket removed, the pinned maps and both pods' links and entries
///   still in place;
/// * restarted after pod b left the source: b's ENDPOINTS/POLICY entries and links go once
///   the first full sync is done, a's stay;
/// * readiness: `/readyz` 200 once synced (an invalid config file name does not hold it),
///   `/healthz` and `/livez` 200.
#[test]
fn sigterm_leaves_the_datapath_and_a_restart_drops_pods_deleted_meanwhile() {
    require_privileges();
    let node = PodNode::new(&["10.77.0.5".parse().unwrap(), "10.77.0.6".parse().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let mesh_dir = dir.path().join("clustermesh");
    std::fs::create_dir(&mesh_dir).unwrap();
    let kvstore = dir.path().join("etcd.yaml");
    // etcd inside the node namespace (the agent reaches it on the node's loopback), run by a
    // thread that lives as long as it (etcd dies with the thread that spawned it). A file the
    // mesh ignores (not a valid cluster name) must not hold the sync back.
    let _etcd = EtcdInNetns::start(
        &node.node,
        vec![kvstore.clone(), mesh_dir.join("Not_A_Cluster")],
    );
    let cgroup = TestCgroup::new();
    let pin_root = PinRoot::new();
    let pins = strait::datapath::PinDir::new(pin_root.path());
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("a.yaml"), pod_yaml("a", "10.77.0.5")).unwrap();
    std::fs::write(manifests.join("b.yaml"), pod_yaml("b", "10.77.0.6")).unwrap();
    std::fs::write(manifests.join("policy.yaml"), POLICY).unwrap();
    let socket = dir.path().join("strait.sock");
    let port = free_port();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "cluster: {{name: cluster-usa, id: 1}}\nnode: {{name: node-1, internalIP: 198.18.77.1, podCIDRs: [10.77.0.0/24]}}\n\
             kvstoreConfig: {}\nclustermeshConfigDir: {}\nstateDir: {}\napiSocket: {}\nmetricsAddress: 127.0.0.1:{port}\n\
             wireguard: {{enabled: false}}\nmanifestsDir: {}\ndatapath: {{pinRoot: {}, cgroup: {}}}\n\
             clustermesh: {{syncTimeout: 1h}}\n",
            kvstore.display(),
            mesh_dir.display(),
            dir.path().display(),
            socket.display(),
            manifests.display(),
            pin_root.path().display(),
            cgroup.path().display()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let args = ["agent", "--config", config.to_str().unwrap()];
    let ifindex = |i: usize| {
        let iface = node.pods[i].host_iface.clone();
        node.node
            .run(move || strait::datapath::loader::ifindex(&iface).unwrap())
    };
    let (a, b) = (ifindex(0), ifindex(1));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut agent = spawn_strait(Some(&node.node), &args, &log);
    wait_until("both pods programmed with their policy", read_log, || {
        let eps = pinned_endpoints(&pins);
        eps.len() == 2 && eps.get(&a) > Some(&0) && eps.get(&b) > Some(&0)
    });
    wait_until("/readyz answers 200", read_log, || {
        http_get(&node.node, port, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    for live in ["/healthz", "/livez"] {
        let r = http_get(&node.node, port, live).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 200"), "{live}: {r}");
    }
    let before = pinned_endpoints(&pins);
    assert!(links_of(&pins, a) > 0 && links_of(&pins, b) > 0);

    // A followed flow stream is open when SIGTERM comes: it must not hold the exit.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let follower = rt.spawn({
        let socket = socket.clone();
        async move { strait::api::observe(&socket, 0, true, |_| {}).await }
    });
    wait_until("the follower is connected", read_log, || socket.exists());
    std::thread::sleep(Duration::from_millis(200));
    let (status, took) = agent.stop(libc::SIGTERM, Duration::from_secs(10));
    println!("SIGTERM → exit in {took:?}");
    assert!(status.success(), "exit {status}; log:\n{}", read_log());
    assert!(
        read_log().contains("strait::daemon: stopped"),
        "the graceful shutdown ran to its end; log:\n{}",
        read_log()
    );
    assert!(!socket.exists(), "the API socket is removed");
    let _ = rt.block_on(follower);
    assert_eq!(
        pinned_endpoints(&pins),
        before,
        "ENDPOINTS and POLICY stay as they were"
    );
    assert!(
        links_of(&pins, a) > 0 && links_of(&pins, b) > 0,
        "the pods' policy links stay pinned"
    );

    // Pod b is deleted while no agent runs; the next agent drops what it left.
    std::fs::remove_file(manifests.join("b.yaml")).unwrap();
    let mut agent = spawn_strait(Some(&node.node), &args, &log);
    wait_until("b's restored entries removed", read_log, || {
        !pinned_endpoints(&pins).contains_key(&b)
    });
    let after = pinned_endpoints(&pins);
    assert_eq!(
        after.get(&a),
        before.get(&a),
        "a's entries are kept: {after:?}"
    );
    assert_eq!(links_of(&pins, b), 0, "b's links are unpinned");
    assert!(links_of(&pins, a) > 0, "a's links stay");
    let (status, _) = agent.stop(libc::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "exit {status}; log:\n{}", read_log());
}

/// Readiness follows the initial sync over the config directory as it is now, bounded by the
/// sync timeout; and a stopped agent serves nothing any more (in-process, so what outlives
/// `run` would still be running here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_live_config_dir_and_the_sync_timeout() {
    require_privileges();
    let etcd = EtcdServer::new();
    let dir = tempfile::tempdir().unwrap();
    let kvstore = etcd.write_cilium_config(
        &dir.path().join("etcd.yaml"),
        CiliumConfigOptions::default(),
    );
    // A remote whose etcd nobody serves: it never syncs.
    let dead_dir = tempfile::tempdir().unwrap();
    let dead = {
        let mut dead = EtcdServer::new();
        dead.stop();
        dead
    };
    let start = |name: &str, timeout: &str| {
        let mesh_dir = dir.path().join(name);
        std::fs::create_dir(&mesh_dir).unwrap();
        dead.write_cilium_config(
            &mesh_dir.join("cluster-dead"),
            CiliumConfigOptions::default(),
        );
        let socket = dead_dir.path().join(format!("{name}.sock"));
        let port = free_port();
        let yaml = format!(
            "cluster: {{name: cluster-usa, id: 1}}\nnode: {{name: usa-1, internalIP: 198.18.1.1, podCIDRs: [10.1.0.0/24]}}\n\
             kvstoreConfig: {}\nclustermeshConfigDir: {}\nstateDir: {}\napiSocket: {}\nmetricsAddress: 127.0.0.1:{port}\n\
             wireguard: {{enabled: false}}\nclustermesh: {{syncTimeout: {timeout}}}\n",
            kvstore.display(),
            mesh_dir.display(),
            dir.path().display(),
            socket.display(),
        );
        let config = strait::config::AgentConfig::parse(Path::new("agent.yaml"), &yaml).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(strait::daemon::run(config, async move {
            let _ = stop_rx.await;
        }));
        (mesh_dir, socket, port, stop_tx, agent)
    };
    let readyz = |port: u16| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out.starts_with("HTTP/1.1 200"))
    };
    let wait_ready = |port: u16, what: &'static str| async move {
        let deadline = tokio::time::Instant::now() + WAIT;
        while readyz(port).await != Some(true) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: never ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    // No timeout to speak of: not ready while the dead remote is configured and our own
    // cluster has synced; ready once its file is removed.
    let (mesh_dir, socket, port, stop_tx, agent) = start("live", "1h");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let synced_local = strait::api::fetch_status(&socket)
            .await
            .is_ok_and(|s| s.cluster.kvstore_synced && !s.cluster_mesh.clusters.is_empty());
        if synced_local {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never synced its own cluster"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        readyz(port).await,
        Some(false),
        "not ready while cluster-dead has not synced"
    );
    std::fs::remove_file(mesh_dir.join("cluster-dead")).unwrap();
    wait_ready(port, "after the unsynced remote's file was removed").await;
    stop_tx.send(()).unwrap();
    agent.await.unwrap().unwrap();
    // Everything the agent ran has stopped with it: nothing serves its ports any more.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the metrics server outlived the agent"
    );
    assert!(!socket.exists(), "the API socket is removed");

    // A short timeout: ready although cluster-dead never syncs.
    let (_mesh_dir, _socket, port, stop_tx, agent) = start("timeout", "2s");
    wait_ready(port, "after the sync timeout").await;
    stop_tx.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

/// The service exporter of `strait kvstoremesh` (two real processes on real etcd): it
/// campaigns only once its Kubernetes source synced; on SIGTERM the leader resigns and revokes
/// its lease, so the standby takes over at once; after a SIGKILL the standby takes over
/// within 20 s (the lease TTL).
#[test]
fn exporter_hands_over_on_sigterm_at_once_and_on_sigkill_within_20s() {
    require_privileges();
    let etcd = EtcdServer::new();
    let dir = tempfile::tempdir().unwrap();
    let kvstore = etcd.write_cilium_config(
        &dir.path().join("etcd.yaml"),
        CiliumConfigOptions::default(),
    );
    let mesh_dir = dir.path().join("clustermesh");
    std::fs::create_dir(&mesh_dir).unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(
        manifests.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: payment-api\n  namespace: default\n  annotations:\n    \
         service.cilium.io/global: \"true\"\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 8080\n",
    )
    .unwrap();
    let start = |name: &str| {
        let port = free_port().to_string();
        spawn_strait(
            None,
            &[
                "kvstoremesh",
                "--cluster-name",
                "cluster-usa",
                "--cluster-id",
                "1",
                "--kvstore-config",
                kvstore.to_str().unwrap(),
                "--clustermesh-config-dir",
                mesh_dir.to_str().unwrap(),
                "--manifests-dir",
                manifests.to_str().unwrap(),
                "--metrics-address",
                &format!("127.0.0.1:{port}"),
            ],
            &dir.path().join(format!("{name}.log")),
        )
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(EtcdClient::connect(&etcd.config())).unwrap();
    let election = strait::mesh::exporter::election_name("cluster-usa");
    // The leader's pid (identities are `<host>-<pid>`), or none.
    let leader = || -> Option<i32> {
        rt.block_on(async {
            let resp = client
                .raw()
                .election_client()
                .leader(election.as_str())
                .await
                .ok()?;
            let value = String::from_utf8(resp.kv()?.value().to_vec()).ok()?;
            value.rsplit('-').next()?.parse().ok()
        })
    };
    let key = "cilium/state/services/v1/cluster-usa/default/payment-api";
    let exported = || {
        rt.block_on(client.list_prefix(key))
            .map(|kvs| !kvs.is_empty())
            .unwrap_or(false)
    };
    let wait = |what: &str, f: &mut dyn FnMut() -> bool| {
        let deadline = Instant::now() + WAIT;
        while !f() {
            assert!(Instant::now() < deadline, "{what}: never happened");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let mut a = start("a");
    let mut b = start("b");
    wait("a leader exports", &mut || leader().is_some() && exported());
    let first = leader().unwrap();
    let (gone, standby) = if first == a.pid() {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let standby_pid = standby.pid();

    // SIGTERM: the leader steps down; the standby is elected without waiting for a TTL.
    let (status, took) = gone.stop(libc::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "exit {status}; log:\n{}", gone.log());
    println!("SIGTERM → exit in {took:?}");
    assert!(gone.log().contains("stepped down"), "{}", gone.log());
    let t = Instant::now();
    wait("the standby takes over after SIGTERM", &mut || {
        leader() == Some(standby_pid)
    });
    println!("takeover after SIGTERM: {:?}", t.elapsed());
    wait("the new leader exports", &mut || exported());

    // SIGKILL: nobody resigns; a fresh standby takes over once the lease expires.
    let mut c = start("c");
    let c_pid = c.pid();
    wait("c campaigns (its key is in the election)", &mut || {
        rt.block_on(client.list_prefix(&format!("{election}/")))
            .map(|kvs| kvs.len() == 2)
            .unwrap_or(false)
    });
    let t = Instant::now();
    standby.stop(libc::SIGKILL, Duration::from_secs(10));
    wait("c takes over after SIGKILL", &mut || {
        leader() == Some(c_pid)
    });
    let takeover = t.elapsed();
    println!("takeover after SIGKILL: {takeover:?}");
    assert!(
        takeover < Duration::from_secs(20),
        "a standby must take over within 20 s of a crash, took {takeover:?}"
    );
    wait("c exports", &mut || exported());
    let (status, _) = c.stop(libc::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "exit {status}; log:\n{}", c.log());
}

/// The exporter does not campaign before its Kubernetes source synced: a replica whose source
/// has not listed stays out of the election, even when the leader steps down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_campaigns_only_after_its_source_synced() {
    use strait::{mesh::exporter, state::StateHandle};
    require_privileges();
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let election = exporter::election_name("cluster-usa");
    let replica = |identity: &str, synced: tokio::sync::watch::Receiver<bool>| {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(exporter::run(
            client.clone(),
            exporter::Publication {
                cluster: "cluster-usa".into(),
                cluster_id: 1,
                max_connected_clusters: 255,
            },
            identity.into(),
            StateHandle::new("cluster-usa", 1),
            Duration::from_secs(2),
            synced,
            stop,
        ));
        (stop_tx, task)
    };
    let campaigners = || async {
        client
            .list_prefix(&format!("{election}/"))
            .await
            .map(|kvs| kvs.len())
            .unwrap_or(0)
    };
    let (unsynced_tx, unsynced) = tokio::sync::watch::channel(false);
    let (_synced_tx, synced) = tokio::sync::watch::channel(true);
    let (stop_late, late) = replica("late", unsynced);
    let (stop_early, early) = replica("early", synced);
    let deadline = tokio::time::Instant::now() + WAIT;
    while campaigners().await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "early never campaigned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // early steps down; late has not synced and so is not there to take over.
    stop_early.send(true).unwrap();
    early.await.unwrap();
    for _ in 0..10 {
        assert_eq!(
            campaigners().await,
            0,
            "a replica campaigned before its source synced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unsynced_tx.send(true).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let leader = client
            .raw()
            .election_client()
            .leader(election.as_str())
            .await;
        if let Ok(resp) = leader
            && resp.kv().is_some_and(|kv| kv.value() == b"late")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "late never became leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_late.send(true).unwrap();
    late.await.unwrap();
    assert_eq!(
        campaigners().await,
        0,
        "a stopped leader leaves no election key"
    );
}
