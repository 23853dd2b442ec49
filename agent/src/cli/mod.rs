//! Command-line interface of the `strait` binary.

pub mod agent;
pub mod bpf;
pub mod count;
pub mod etcd;
pub mod kvstoremesh;
pub mod observe;
pub mod signals;
pub mod status;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// strait: eBPF datapath agent that joins Kubernetes clusters over WireGuard, ClusterMesh-style.
#[derive(Debug, Parser)]
#[command(name = "strait", version, about, long_about = None)]
pub struct Cli {
    /// Log filter in tracing's EnvFilter syntax (e.g. `info`, `strait=debug`). Without --log
    /// and STRAIT_LOG, RUST_LOG is used; without any of them, `info`.
    #[arg(long, env = "STRAIT_LOG", global = true)]
    pub log: Option<String>,

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
    /// Set up this cluster's kvstore etcd: `strait etcd init` creates the clustermesh users
    /// and roles and enables authentication.
    Etcd(etcd::EtcdArgs),
    /// Show the datapath's flow events (drops with both identities and the reason), like
    /// `hubble observe`: the last --last flows, then new ones with --follow.
    Observe(observe::ObserveArgs),
    /// Inspect the datapath's eBPF maps (read from their bpffs pins), or remove the pins.
    ///
    /// `strait bpf lb list`, `strait bpf ipcache list`, `strait bpf policy list [ENDPOINT]`,
    /// `strait bpf ct list`; add --json for scripts. `strait bpf cleanup` removes the pins
    /// once no agent runs.
    Bpf(bpf::BpfArgs),
}

/// The log filter and what set it: `--log` or `STRAIT_LOG` (clap reads both into `log`), else
/// `RUST_LOG`, else `info`.
fn log_filter(log: Option<String>, rust_log: Option<String>) -> (String, &'static str) {
    match (log, rust_log.filter(|f| !f.is_empty())) {
        (Some(f), _) => (f, "--log"),
        (None, Some(f)) => (f, "RUST_LOG"),
        (None, None) => ("info".to_owned(), "--log"),
    }
}

/// The `strait` binary: parses the command line, sets up logging, runs the command. A
/// library function so other binaries can be exactly `strait` (the end-to-end tests build one
/// next to their helper binaries, where cargo keeps it up to date).
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr so stdout stays machine-readable; tracing-subscriber also routes the
    // `log` records aya emits into tracing.
    let (filter, source) = log_filter(cli.log.clone(), std::env::var("RUST_LOG").ok());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("invalid {source} filter {filter:?}: {e}; using `info`");
        EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Count(args) => count::run(args).await,
            Command::Agent(args) => agent::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Kvstoremesh(args) => kvstoremesh::run(args).await,
            Command::Etcd(args) => etcd::run(args).await,
            Command::Observe(args) => observe::run(args).await,
            Command::Bpf(args) => bpf::run(args).await,
        }
    });
    // A blocking call still running (a status build, a netlink read) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strait_log_wins_over_rust_log() {
        // `log` is what clap read from --log or STRAIT_LOG.
        let filter = |log: Option<&str>, rust_log: Option<&str>| {
            log_filter(log.map(Into::into), rust_log.map(Into::into))
        };
        assert_eq!(
            filter(Some("debug"), Some("warn")),
            ("debug".into(), "--log")
        );
        assert_eq!(filter(None, Some("warn")), ("warn".into(), "RUST_LOG"));
        assert_eq!(filter(None, Some("")), ("info".into(), "--log"));
        assert_eq!(filter(None, None), ("info".into(), "--log"));
    }
}
