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
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use self::steps::{Ctx, Step};
pub use self::{
    mesh::Mesh,
    report::{Report, StepReport},
    resources::Resources,
};

mod layout;
mod manifests;
mod mesh;
mod probes;
mod processes;
mod report;
mod resources;
mod steps;
mod topology;

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

/// The order the steps run in (see the narration below for why).
const ORDER: [&Step; 7] = [
    &steps::mesh_up::STEP,
    &steps::failover::STEP,
    &steps::zero_trust::STEP,
    &steps::agent_restart::STEP,
    &steps::overlap::STEP,
    &steps::encryption::STEP,
    &steps::cluster_loss::STEP,
];

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
    if narrate {
        println!(
            "\n    The steps run in the order 1, 2, 4, 6, 7, 5, 3: the underlay capture of step 5 \
             spans everything before it, and step 3 takes a whole cluster down, so it comes last."
        );
    }
    let mut ctx = Ctx::default();
    for step in ORDER {
        let (n, title) = (step.number, step.title);
        banner(&format!("step {n}: {title}"), step.proves, narrate);
        let t = Instant::now();
        let result = (step.run)(&mesh, &mut ctx).map_err(|e| format!("{e:#}"));
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

fn banner(title: &str, text: &str, narrate: bool) {
    println!("\n==> {title}");
    if narrate {
        println!("    {text}");
    }
}
