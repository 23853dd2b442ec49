//! `cargo xtask bench datapath`:
//!
//! 1. ns/packet of the policy program through `BPF_PROG_TEST_RUN` (kernel-timed, ≥ 1,000,000
//!    repeats) with 1k and 100k ipcache entries and 10k policy entries, run alternately:
//!    a new flow evaluated against policy (ipcache lookup, two policy lookups, verdict, drop
//!    accounting) and an established flow (conntrack hit).
//! 2. Connections per second to a service VIP from a pod namespace, at 10 and 10,000
//!    services: strait's socket load balancer vs the same services as a kube-proxy-style
//!    iptables ruleset (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-* with `statistic --mode
//!    random`), alternating, same client, same backends, same connection pattern. The VIP
//!    dialled is the last service (the far end of the iptables chain, as for a
//!    recently-created service).
//!
//! Everything runs in namespaces and cgroups this binary creates (removed by their guards,
//! also on panic); no namespace has a route out.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::{Command, Stdio},
    time::Duration,
};

use aya::programs::{TestRun as _, TestRunOptions};
use clap::Parser;
use ipnet::Ipv4Net;
use strait::{
    datapath::{
        Datapath, MapSizes,
        ipcache::IpcacheWriter,
        lb::{BackendAddr, DesiredService, Frontend, LbWriter},
        policy::{EndpointSpec, PolicyWriter},
    },
    policy::{Direction, EndpointPolicy, PolicyEntry},
};
use strait_common::{ipcache::IpcacheValue, names};
use strait_tests::{
    TestCgroup,
    datapath::{LbTopology, frame, sockprobe_exe},
    require_privileges,
};

#[derive(Parser, Debug)]
#[command(
    about = "Datapath benchmarks: policy ns/packet via TestRun; connections/s through \
                   the socket load balancer vs a kube-proxy-style iptables ruleset"
)]
struct Args {
    /// TestRun repeats per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Alternating rounds per comparison (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Connections per connection-rate measurement.
    #[arg(long, default_value_t = 2000)]
    connections: u32,
    /// Service counts to compare at.
    #[arg(long, value_delimiter = ',', default_value = "10,10000")]
    services: Vec<u32>,
}

const POLICY_ENTRIES: u32 = 10_000;
const DB: &str = "10.250.0.7:5432";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The i-th filler ipcache address (10.0.0.1 upwards; the measured addresses are in
/// 10.250.0.0/24, above any filler).
fn nth_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 | (i + 1))
}

struct PolicyBench {
    dp: Datapath,
}

impl PolicyBench {
    fn new(ipcache_entries: u32) -> Self {
        let sizes = MapSizes {
            ipcache: ipcache_entries + 16,
            policy: POLICY_ENTRIES * 2,
            ..Default::default()
        };
        let mut dp = Datapath::load(None, &sizes).expect("loading the datapath");
        let mut ipc =
            IpcacheWriter::new(dp.take_map(names::MAP_IPCACHE).unwrap(), sizes.ipcache).unwrap();
        let mut desired: BTreeMap<Ipv4Net, IpcacheValue> = (0..ipcache_entries)
            .map(|i| {
                (
                    Ipv4Net::new(nth_addr(i), 32).unwrap(),
                    IpcacheValue {
                        identity: 100_000 + i % 50_000,
                        cluster_id: 1 + (i % 2) as u16,
                        ..Default::default()
                    },
                )
            })
            .collect();
        // The measured denied source: known to the ipcache, with no rule.
        desired.insert(
            "10.250.0.9/32".parse().unwrap(),
            IpcacheValue {
                identity: 2000,
                cluster_id: 1,
                ..Default::default()
            },
        );
        desired.insert(
            "10.250.0.7/32".parse().unwrap(),
            IpcacheValue {
                identity: 3000,
                cluster_id: 2,
                ..Default::default()
            },
        );
        let r = ipc.sync(&desired, true);
        assert!(r.failed.is_empty(), "{:?}", r.failed.first());
        let mut policy = EndpointPolicy {
            ingress_enforced: true,
            ..Default::default()
        };
        // 10k allow entries: identities 100000.. on TCP 5432; the measured sources have other
        // identities, so the new-flow case walks both lookups and is denied.
        for i in 0..POLICY_ENTRIES {
            policy.entries.insert(PolicyEntry {
                identity: 100_000 + i,
                direction: Direction::Ingress,
                protocol: 6,
                port: 5432,
                deny: false,
            });
        }
        let mut pw = PolicyWriter::new(
            dp.take_map(names::MAP_ENDPOINTS).unwrap(),
            dp.take_map(names::MAP_POLICY).unwrap(),
            sizes.endpoints,
            sizes.policy,
        )
        .unwrap();
        pw.set_endpoint(&EndpointSpec {
            ifindex: 1, // TestRun runs tc programs on loopback
            address: "10.250.0.7".parse().unwrap(),
            identity: 3000,
            policy,
        })
        .unwrap();
        // Keep the ring buffer's consumer side away: a full ring makes event output fail fast,
        // as in a node nobody observes.
        drop(pw);
        Self { dp }
    }

    fn ns_per_packet(&mut self, f: &[u8], repeat: u32) -> (f64, u32) {
        let prog = self.dp.policy_program(false).unwrap();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(f);
        opts.repeat = repeat;
        let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        (r.duration.as_nanos() as f64, r.return_value)
    }
}

/// The floor of a tc TestRun on this machine: strait's packet counter (one per-CPU array
/// update), same frame, same repeats.
fn baseline_ns(f: &[u8], repeat: u32, rounds: u32) -> f64 {
    let mut counter = strait::datapath::PacketCounterProgram::load().expect("counter program");
    let prog = counter
        .program_mut(strait_common::Direction::Ingress)
        .unwrap();
    let runs = (0..rounds)
        .map(|_| {
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(f);
            opts.repeat = repeat;
            prog.test_run(opts)
                .expect("BPF_PROG_TEST_RUN")
                .duration
                .as_nanos() as f64
        })
        .collect();
    median(runs)
}

fn bench_policy(args: &Args) {
    println!(
        "\n== policy program, ns/packet (BPF_PROG_TEST_RUN, {} repeats) ==",
        args.repeat
    );
    let sizes = [1_000u32, 100_000];
    let mut benches: Vec<PolicyBench> = sizes.iter().map(|n| PolicyBench::new(*n)).collect();
    let denied_src: SocketAddrV4 = "10.250.0.9:40000".parse().unwrap();
    let allowed_src = SocketAddrV4::new(nth_addr(5), 40001);
    let db: SocketAddrV4 = DB.parse().unwrap();
    let cases = [
        (
            "new flow, policy evaluated (denied)",
            frame(denied_src, db, 6),
        ),
        (
            "established flow (conntrack hit)",
            frame(allowed_src, db, 6),
        ),
    ];
    println!(
        "{:<40} {:>12} {:>12} {:>8}",
        "case", "1k ipcache", "100k ipcache", "growth"
    );
    let mut policy_rows = Vec::new();
    for (name, f) in &cases {
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
        for _ in 0..args.rounds {
            for (i, b) in benches.iter_mut().enumerate() {
                let (ns, rc) = b.ns_per_packet(f, args.repeat);
                let expect = if name.starts_with("new") { 2 } else { 0 };
                assert_eq!(rc, expect, "{name}: unexpected verdict");
                results[i].push(ns);
            }
        }
        let m: Vec<f64> = results.into_iter().map(median).collect();
        policy_rows.push(m[0]);
        println!(
            "{name:<40} {:>9.1} ns {:>9.1} ns {:>7.2}x",
            m[0],
            m[1],
            m[1] / m[0]
        );
    }
    let base = baseline_ns(&cases[1].1, args.repeat, args.rounds);
    println!(
        "{:<40} {:>9.1} ns   (TestRun floor: new flow {:.1}x, established {:.1}x of it)",
        "baseline: packet counter (1 map update)",
        base,
        policy_rows[0] / base,
        policy_rows[1] / base
    );
}

const BACKENDS: [&str; 2] = ["10.1.0.11", "10.1.0.12"];
const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 | i) // 10.96.0.0/12
}

fn iptables_rules(services: u32) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..services {
        r.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
        for j in 0..BACKENDS.len() {
            r.push_str(&format!(":KUBE-SEP-{i}-{j} - [0:0]\n"));
        }
    }
    r.push_str("-A OUTPUT -j KUBE-SERVICES\n");
    for i in 0..services {
        r.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {VIP_PORT} -j KUBE-SVC-{i}\n",
            vip(i)
        ));
        let n = BACKENDS.len();
        for (j, b) in BACKENDS.iter().enumerate() {
            let remaining = n - j;
            if remaining > 1 {
                r.push_str(&format!(
                    "-A KUBE-SVC-{i} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i}-{j}\n",
                    1.0 / remaining as f64
                ));
            } else {
                r.push_str(&format!("-A KUBE-SVC-{i} -j KUBE-SEP-{i}-{j}\n"));
            }
            r.push_str(&format!(
                "-A KUBE-SEP-{i}-{j} -p tcp -m tcp -j DNAT --to-destination {b}:{BACKEND_PORT}\n"
            ));
        }
    }
    r.push_str("COMMIT\n");
    r
}

fn load_iptables(netns: &str, services: u32) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("running iptables-restore");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(iptables_rules(services).as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "iptables-restore failed");
}

/// Connections per second of `sockprobe` from `cgroup` + `netns` to `target`.
fn conn_rate(cgroup: &TestCgroup, netns: &str, target: SocketAddr, count: u32) -> f64 {
    let out = Command::new(sockprobe_exe())
        .arg("--cgroup")
        .arg(cgroup.path())
        .args(["--netns", netns, "--target", &target.to_string()])
        .args(["--count", &count.to_string(), "--summary"])
        .output()
        .expect("running sockprobe");
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    let ["SUMMARY", ok, failed, micros] = f.as_slice() else {
        panic!("sockprobe: {text} {}", String::from_utf8_lossy(&out.stderr));
    };
    assert_eq!(*failed, "0", "connections failed ({ok} ok)");
    let ok: f64 = ok.parse().unwrap();
    ok / (micros.parse::<f64>().unwrap() / 1e6)
}

fn bench_connections(args: &Args) {
    println!(
        "\n== connections/s to a service VIP ({} connections per run, median of {} alternating rounds) ==",
        args.connections, args.rounds
    );
    println!(
        "{:>9} {:>14} {:>14} {:>8}",
        "services", "strait eBPF", "iptables", "ratio"
    );
    for &n in &args.services {
        // Two identical topologies: one client namespace per mode, so neither ruleset is
        // ever in the other's path.
        let mut ebpf_topo = LbTopology::new();
        let mut ipt_topo = LbTopology::new();
        for b in BACKENDS {
            ebpf_topo.add_backend(b.parse().unwrap(), BACKEND_PORT);
            ipt_topo.add_backend(b.parse().unwrap(), BACKEND_PORT);
        }
        let (ebpf_cg, plain_cg) = (TestCgroup::new(), TestCgroup::new());
        let sizes = MapSizes::default();
        let mut dp = Datapath::load(None, &sizes).expect("loading the datapath");
        let mut lbw = LbWriter::new(
            dp.take_map(names::MAP_LB4_SERVICES).unwrap(),
            dp.take_map(names::MAP_LB4_BACKENDS).unwrap(),
            dp.take_map(names::MAP_LB4_REVNAT).unwrap(),
            sizes,
        )
        .unwrap();
        let backends: Vec<BackendAddr> = BACKENDS
            .iter()
            .map(|b| BackendAddr {
                address: b.parse().unwrap(),
                port: BACKEND_PORT,
                proto: 6,
                cluster_id: 1,
            })
            .collect();
        let desired: BTreeMap<Frontend, DesiredService> = (0..n)
            .map(|i| {
                (
                    Frontend {
                        address: vip(i),
                        port: VIP_PORT,
                        proto: 6,
                    },
                    DesiredService {
                        global: false,
                        active: backends.clone(),
                        terminating: Vec::new(),
                    },
                )
            })
            .collect();
        let r = lbw.sync(&desired, true);
        assert!(r.failed.is_empty(), "{:?}", r.failed.first());
        dp.attach_socket_lb(ebpf_cg.path()).unwrap();
        load_iptables(ipt_topo.client.name(), n);
        let target = SocketAddr::new(vip(n - 1).into(), VIP_PORT);
        // Warm-up (ARP, caches) for both.
        conn_rate(&ebpf_cg, ebpf_topo.client.name(), target, 50);
        conn_rate(&plain_cg, ipt_topo.client.name(), target, 50);
        let (mut e, mut i) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            e.push(conn_rate(
                &ebpf_cg,
                ebpf_topo.client.name(),
                target,
                args.connections,
            ));
            i.push(conn_rate(
                &plain_cg,
                ipt_topo.client.name(),
                target,
                args.connections,
            ));
            // Let TIME_WAIT sockets of the last run drain a little between runs.
            std::thread::sleep(Duration::from_millis(200));
        }
        let (e, i) = (median(e), median(i));
        println!("{n:>9} {e:>12.0}/s {i:>12.0}/s {:>7.2}x", e / i);
    }
}

fn main() {
    let args = Args::parse();
    require_privileges();
    bench_policy(&args);
    bench_connections(&args);
}
