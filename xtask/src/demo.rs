//! `cargo xtask demo`: strait at work.
//!
//! Part one: two network namespaces joined by a veth pair (no route out of either), `strait
//! count` on one end, ICMP, UDP and TCP sent between them, the counters strait read from the
//! kernel map. Part two: the user's two-cluster scenario end to end (`tests/src/e2e/`, run by
//! the `strait-scenario` binary). Everything is removed on success, on failure and on Ctrl-C.

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
    /// The scenario runner: it cleans up after itself (also on Ctrl-C, which reaches it
    /// too); we only wait for it.
    scenario_pid: Option<u32>,
}

impl Created {
    fn cleanup(&mut self) {
        if let Some(pid) = self.child_pid.take() {
            // SAFETY: signalling a PID we started and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(pid) = self.scenario_pid.take() {
            // It got the same Ctrl-C and is removing its namespaces, processes, cgroups and
            // pins: wait (bounded) so the prompt returns after it.
            let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while proc.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
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

    scenario(env, &strait, &created)?;

    cmd::step("cleaning up");
    drop(guard);
    Ok(())
}

/// Part two: the user's scenario end to end (`tests/src/e2e/` through the
/// `strait-scenario` binary, the code the end-to-end test runs): two clusters of two nodes in
/// namespaces, WireGuard between every node, global services, failover, cluster loss, policy
/// across clusters, an agent restart and an overlapping cluster refused. The binary removes
/// what it created itself, also on Ctrl-C; this process waits for it.
fn scenario(
    env: &Env,
    strait: &std::path::Path,
    created: &Arc<Mutex<Created>>,
) -> anyhow::Result<()> {
    cmd::step("building the scenario runner (strait-tests' strait-scenario and sockprobe)");
    cmd::run(env.cargo().args([
        "build",
        "-p",
        "strait-tests",
        "--bin",
        "strait-scenario",
        "--bin",
        "sockprobe",
    ]))?;
    let runner = strait.with_file_name("strait-scenario");
    cmd::step("the two-cluster scenario (tests/src/e2e/): cluster-usa and cluster-europe");
    let started = std::time::Instant::now();
    let mut child = Command::new(&runner)
        .arg("--strait")
        .arg(strait)
        .spawn()
        .with_context(|| format!("starting {}", runner.display()))?;
    created
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .scenario_pid = Some(child.id());
    let status = child.wait().context("waiting for the scenario")?;
    created
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .scenario_pid = None;
    println!(
        "scenario finished in {:.0}s ({status})",
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("the scenario failed (see the summary above)");
    }
    Ok(())
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
