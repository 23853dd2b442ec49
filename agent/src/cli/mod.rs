//! Command-line interface of the `strait` binary.

pub mod agent;
pub mod bpf;
pub mod count;
pub mod kvstoremesh;
pub mod observe;
pub mod signals;
pub mod status;

use clap::{Parser, Subcommand};

/// strait: eBPF datapath agent that joins Kubernetes clusters over WireGuard, ClusterMesh-style.
#[derive(Debug, Parser)]
#[command(name = "strait", version, about, long_about = None)]
pub struct Cli {
    /// Log filter in tracing's EnvFilter syntax (e.g. `info`, `strait=debug`).
    #[arg(long, env = "STRAIT_LOG", default_value = "info", global = true)]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the packet-counter classifier to an interface and print what crosses it.
    ///
    /// Loads strait's tc programs on ingress and egress of IFACE (optionally inside a named
    /// network namespace), prints per-direction, per-protocol packet and byte counts read from
    /// the kernel map every interval, and detaches when it stops (after --seconds, or Ctrl-C).
    Count(count::CountArgs),
    /// Run the node agent: sync the mesh state through etcd, publish this node, serve the API.
    Agent(agent::AgentArgs),
    /// Show the local agent's view of the mesh (modelled on `cilium-dbg status`).
    Status(status::StatusArgs),
    /// Mirror remote clusters into this cluster's etcd (KVStoreMesh-compatible cache).
    Kvstoremesh(kvstoremesh::KvstoremeshArgs),
    /// Show the datapath's flow events (drops with both identities and the reason), like
    /// `hubble observe`: the last --last flows, then new ones with --follow.
    Observe(observe::ObserveArgs),
    /// Inspect the datapath's eBPF maps (read from their bpffs pins).
    ///
    /// `strait bpf lb list`, `strait bpf ipcache list`, `strait bpf policy list [ENDPOINT]`,
    /// `strait bpf ct list`; add --json for scripts.
    Bpf(bpf::BpfArgs),
}
