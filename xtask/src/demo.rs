//! `cargo xtask demo`: strait counting real packets on a throwaway veth pair.
//!
//! Creates two network namespaces joined by a veth pair (no route out of either), runs
//! `strait count` on one end, sends ICMP, UDP and TCP between them, prints the counters strait
//! read from the kernel map, and removes everything — on success, on failure and on Ctrl-C.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::cmd::{self, Env};

/// Everything the demo created, removed by `cleanup` exactly once.
#[derive(Default)]
struct Created {
    netns: Vec<String>,
    child_pid: Option<u32>,
    /// Processes of the mesh part (etcd, strait agent, strait kvstoremesh).
    pids: Vec<u32>,
    dirs: Vec<std::path::PathBuf>,
}

impl Created {
    fn cleanup(&mut self) {
        if let Some(pid) = self.child_pid.take() {
            // SAFETY: signalling a PID we started and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for pid in self.pids.drain(..).rev() {
            // SAFETY: signalling and reaping a child we started.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
                std::thread::sleep(Duration::from_millis(100));
                libc::kill(pid as i32, libc::SIGKILL);
                libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
            }
        }
        for dir in self.dirs.drain(..) {
            let _ = std::fs::remove_dir_all(&dir);
            println!("cleanup: removed {}", dir.display());
        }
        for ns in self.netns.drain(..) {
            // Deleting the namespace also removes the veth end inside it.
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            println!("cleanup: removed network namespace {ns}");
        }
    }
}

struct Cleanup(Arc<Mutex<Created>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).cleanup();
    }
}

pub fn run(env: &Env) -> anyhow::Result<()> {
    cmd::build_agent(env, false)?;
    let strait = cmd::strait_bin(false);

    let created = Arc::new(Mutex::new(Created::default()));
    let guard = Cleanup(created.clone());
    {
        let created = created.clone();
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: cleaning up");
            created.lock().unwrap_or_else(|e| e.into_inner()).cleanup();
            std::process::exit(130);
        })
        .context("installing the Ctrl-C handler")?;
    }

    let id = std::process::id();
    let (ns_a, ns_b) = (format!("strait-demo-{id}-a"), format!("strait-demo-{id}-b"));
    let (veth_a, veth_b) = (format!("sd{id}a"), format!("sd{id}b"));
    let (addr_a, addr_b) = ("198.18.0.1", "198.18.0.2");

    cmd::step(&format!(
        "creating namespaces {ns_a} and {ns_b}, joined by veth {veth_a} <-> {veth_b}"
    ));
    for ns in [&ns_a, &ns_b] {
        ip(&["netns", "add", ns])?;
        created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .netns
            .push(ns.clone());
    }
    ip(&[
        "link", "add", &veth_a, "netns", &ns_a, "type", "veth", "peer", "name", &veth_b, "netns",
        &ns_b,
    ])?;
    for (ns, dev, addr) in [(&ns_a, &veth_a, addr_a), (&ns_b, &veth_b, addr_b)] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }

    cmd::step(&format!(
        "strait count --netns {ns_a} --iface {veth_a}: loading and attaching the tc programs"
    ));
    let mut child = Command::new(&strait)
        .args([
            "count",
            "--netns",
            &ns_a,
            "--iface",
            &veth_a,
            "--interval",
            "60",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", strait.display()))?;
    created.lock().unwrap_or_else(|e| e.into_inner()).child_pid = Some(child.id());
    let lines = stdout_lines(&mut child);
    let first = lines
        .recv_timeout(Duration::from_secs(30))
        .context("strait did not report that it attached (see its log above)")?;
    println!("strait: {first}");

    cmd::step(&format!(
        "sending traffic {addr_a} -> {addr_b}: 5 pings, 3 UDP datagrams, 3 TCP connection attempts"
    ));
    run_in(&ns_a, &["ping", "-q", "-c", "5", "-i", "0.2", addr_b])?;
    let udp = format!("for i in 1 2 3; do echo strait > /dev/udp/{addr_b}/9; done");
    run_in(&ns_a, &["bash", "-c", &udp])?;
    // Nothing listens: each attempt is a SYN out and a RST back.
    let tcp = format!("for i in 1 2 3; do (exec 3<>/dev/tcp/{addr_b}/9) 2>/dev/null; done; true");
    run_in(&ns_a, &["bash", "-c", &tcp])?;

    cmd::step(
        "stopping strait (SIGINT): it prints the final counters from the kernel map and detaches",
    );
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().context("waiting for strait")?;
    created.lock().unwrap_or_else(|e| e.into_inner()).child_pid = None;
    // The reader ends at EOF, after the final table.
    let table: Vec<String> = lines.iter().collect();
    for line in &table {
        println!("  {line}");
    }
    if !status.success() {
        bail!("strait exited with {status}");
    }
    let icmp_egress = table
        .iter()
        .find_map(|l| l.strip_prefix("egress    icmp"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    if icmp_egress < 5 {
        bail!("expected at least 5 ICMP packets counted on egress, strait reported {icmp_egress}");
    }
    println!(
        "\nThe counts were read by strait from its per-CPU map in the kernel: egress icmp/udp/tcp are the \
         pings, datagrams and SYNs sent from {ns_a}; ingress icmp is the echo replies plus the port-unreachable answers to the datagrams, ingress tcp the RSTs; \
         'other' is ARP and IPv6 neighbour discovery."
    );

    mesh(&strait, &created)?;

    cmd::step("cleaning up");
    drop(guard);
    Ok(())
}

/// Part two: two clusters joined through etcd, with the real binaries. europe runs
/// `strait kvstoremesh` (publishing its cluster config and exporting its global services) and
/// an agent; usa's agent connects to europe's etcd and reports the mesh in `strait status`.
/// Encryption is off here (agents run in the root namespace); the namespace scenario with
/// WireGuard is the end-to-end issue.
fn mesh(strait: &std::path::Path, created: &Arc<Mutex<Created>>) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("strait-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    created
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .dirs
        .push(dir.clone());
    let spawn = |name: &str, cmd: &mut Command| -> anyhow::Result<()> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pids
            .push(child.id());
        Ok(())
    };

    cmd::step(
        "mesh: starting an etcd per cluster (standing in for each cluster's clustermesh etcd)",
    );
    let mut endpoints = Vec::new();
    for cluster in ["usa", "europe"] {
        let (client, peer) = (free_port()?, free_port()?);
        let data = dir.join(format!("etcd-{cluster}"));
        spawn(
            &format!("etcd-{cluster}"),
            Command::new("etcd")
                .args(["--name", cluster, "--data-dir"])
                .arg(&data)
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!(
                    "--initial-cluster={cluster}=http://127.0.0.1:{peer}"
                )),
        )?;
        let config = dir.join(format!("etcd-{cluster}.yaml"));
        std::fs::write(
            &config,
            format!("endpoints:\n- http://127.0.0.1:{client}\n"),
        )?;
        println!("cluster-{cluster}: etcd on 127.0.0.1:{client}");
        endpoints.push(config);
    }
    let (usa_etcd, europe_etcd) = (&endpoints[0], &endpoints[1]);

    // payment-api in both clusters: global, affinity local (the user's manifest).
    let manifest = |cluster: &str, backend: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: payment-api\n  namespace: default\n  annotations:\n    \
             service.cilium.io/global: \"true\"\n    service.cilium.io/affinity: \"local\"\nspec:\n  type: ClusterIP\n  \
             clusterIP: 10.96.0.10\n  selector: {{app: payment-api}}\n  ports:\n  - port: 8080\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: payment-api-{cluster}\n  namespace: default\n  \
             labels: {{kubernetes.io/service-name: payment-api}}\naddressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\n\
             endpoints:\n- addresses: [{backend}]\n  conditions: {{ready: true}}\n"
        )
    };
    for (cluster, backend) in [("usa", "10.1.0.10"), ("europe", "10.2.0.10")] {
        let m = dir.join(format!("manifests-{cluster}"));
        std::fs::create_dir_all(&m)?;
        std::fs::write(m.join("payment-api.yaml"), manifest(cluster, backend))?;
        std::fs::create_dir_all(dir.join(format!("clustermesh-{cluster}")))?;
    }
    // usa connects to europe's etcd directly; europe's clustermesh dir stays empty here.
    std::fs::copy(
        europe_etcd,
        dir.join("clustermesh-usa").join("cluster-europe"),
    )?;

    cmd::step(
        "mesh: strait kvstoremesh for cluster-europe (publishes its cluster config, exports payment-api)",
    );
    spawn(
        "kvstoremesh-europe",
        Command::new(strait)
            .args([
                "kvstoremesh",
                "--cluster-name",
                "cluster-europe",
                "--cluster-id",
                "2",
                "--kvstore-config",
            ])
            .arg(europe_etcd)
            .arg("--clustermesh-config-dir")
            .arg(dir.join("clustermesh-europe"))
            .arg("--manifests-dir")
            .arg(dir.join("manifests-europe"))
            .args(["--metrics-address", &format!("127.0.0.1:{}", free_port()?)]),
    )?;

    cmd::step("mesh: strait agent on one node per cluster");
    for (cluster, id, ip, cidr, etcd) in [
        ("usa", 1, "198.18.1.1", "10.1.0.0/24", usa_etcd),
        ("europe", 2, "198.18.2.1", "10.2.0.0/24", europe_etcd),
    ] {
        let config = dir.join(format!("agent-{cluster}.yaml"));
        std::fs::write(
            &config,
            format!(
                "cluster: {{name: cluster-{cluster}, id: {id}}}\nnode: {{name: {cluster}-1, internalIP: {ip}, podCIDRs: [{cidr}]}}\n\
                 kvstoreConfig: {}\nclustermeshConfigDir: {}\nstateDir: {}\napiSocket: {}\nmetricsAddress: 127.0.0.1:{}\n\
                 manifestsDir: {}\nwireguard: {{enabled: false}}\n",
                etcd.display(),
                dir.join(format!("clustermesh-{cluster}")).display(),
                dir.join(format!("state-{cluster}")).display(),
                dir.join(format!("{cluster}.sock")).display(),
                free_port()?,
                dir.join(format!("manifests-{cluster}")).display(),
            ),
        )?;
        spawn(
            &format!("agent-{cluster}"),
            Command::new(strait)
                .arg("agent")
                .arg("--config")
                .arg(&config),
        )?;
    }

    cmd::step("mesh: waiting for cluster-usa's agent to report cluster-europe ready");
    let socket = dir.join("usa.sock");
    let started = std::time::Instant::now();
    loop {
        let out = Command::new(strait)
            .args(["status", "--json", "--socket"])
            .arg(&socket)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success()
            && text.contains("\"ready\": true")
            && text.contains("\"num-shared-services\": 1")
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            for name in ["agent-usa", "agent-europe", "kvstoremesh-europe"] {
                let log =
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                eprintln!("--- {name} (last lines)");
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
            eprintln!("--- strait status:\n{text}");
            bail!("the mesh did not come up within 60 s");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    println!(
        "mesh up in {:.1}s. `strait status` on usa-1:\n",
        started.elapsed().as_secs_f64()
    );
    cmd::run(
        Command::new(strait)
            .args(["status", "--socket"])
            .arg(&socket),
    )?;
    println!(
        "\nusa-1 sees cluster-europe's node, its global payment-api backend (exported by europe's \
         kvstoremesh, the elected writer) and europe's cluster config, all read from europe's etcd \
         in Cilium's ClusterMesh layout."
    );
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    cmd::run(Command::new("ip").args(args))
}

fn run_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    cmd::run(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(Stdio::null()),
    )
}

/// Forwards the child's stdout lines through a channel, so reading can time out.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}
