//! `cargo xtask bench <name>`: benchmarks, built in release mode, printing their own report.

use crate::cmd::{self, Env};

/// Benchmarks and the binary in `tests/src/bin/` that runs each.
const BENCHES: &[(&str, &str, &str)] = &[
    (
        "sync",
        "bench_sync",
        "ingest a 100-cluster mesh from etcd into the state model: time to synced, events/s, peak RSS, put->model latency",
    ),
    (
        "wireguard",
        "bench_wireguard",
        "reconcile 1,000 remote peers into an empty WireGuard device, then one change, then a no-op resync; then iperf3 pod->pod TCP throughput through WireGuard (wireguard-go) vs the same path in clear, alternating, with the ratio (`-- --help` for --peers, --rounds, --seconds, --underlay-mtu)",
    ),
    (
        "datapath",
        "bench_datapath",
        "policy program ns/packet via BPF_PROG_TEST_RUN with 1k vs 100k ipcache entries and 10k policy entries; connections/s to a VIP through the socket load balancer vs a kube-proxy-style iptables ruleset at 10 and 10,000 services, alternating (`-- --help` for --repeat, --rounds, --connections, --services)",
    ),
];

pub fn run(env: &Env, name: &str, args: &[String]) -> anyhow::Result<()> {
    let Some((_, bin, what)) = BENCHES.iter().find(|(n, _, _)| *n == name) else {
        let known: Vec<String> = BENCHES
            .iter()
            .map(|(n, _, w)| format!("  {n}: {w}"))
            .collect();
        anyhow::bail!(
            "unknown benchmark {name:?}; available:\n{}",
            known.join("\n")
        );
    };
    cmd::step(&format!("bench {name}: {what}"));
    // Every helper binary (e.g. sockprobe) next to the benchmark, not only the one run.
    cmd::run(
        env.cargo()
            .args(["build", "--release", "-p", "strait-tests", "--bins"]),
    )?;
    cmd::run(
        env.cargo()
            .args(["run", "--release", "-p", "strait-tests", "--bin", bin, "--"])
            .args(args),
    )
}
