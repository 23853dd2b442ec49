//! `strait bpf ...`: read the datapath's pinned maps directly (works while the agent runs,
//! and while it is down: the datapath keeps working from its pins), or remove the pins.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Subcommand};
use serde::Serialize;
use strait_common::names;

use crate::{
    constants,
    datapath::{PinDir, ipcache, lb, open_pinned, pins, policy},
};

#[derive(Debug, Args)]
pub struct BpfArgs {
    /// bpffs directory holding strait's versioned pin directory (the agent's
    /// `datapath.pinRoot`).
    #[arg(long, env = "STRAIT_PIN_ROOT", default_value = constants::BPFFS_ROOT, global = true)]
    pub pin_root: PathBuf,
    /// JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: BpfCommand,
}

#[derive(Debug, Subcommand)]
pub enum BpfCommand {
    /// Service frontends and their backend slots.
    Lb {
        #[command(subcommand)]
        cmd: List,
    },
    /// IP prefix → identity, node, cluster.
    Ipcache {
        #[command(subcommand)]
        cmd: List,
    },
    /// Policy entries of local endpoints.
    Policy {
        #[command(subcommand)]
        cmd: PolicyList,
    },
    /// Connection-tracking entries.
    Ct {
        #[command(subcommand)]
        cmd: List,
    },
    /// Remove strait's pins: every `strait-v*` directory under --pin-root, its maps and its
    /// links (which detaches the programs: pods lose policy and services their socket LB).
    ///
    /// Refuses while an agent may be using them: when the agent API socket (--socket) accepts
    /// a connection, or when a process holds one of the pinned maps open (a running agent
    /// holds all of its maps; found by map ID in /proc/*/fdinfo). --force skips both checks.
    Cleanup(CleanupArgs),
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// The agent's API socket.
    #[arg(long, env = "STRAIT_API_SOCKET", default_value = constants::DEFAULT_API_SOCKET)]
    pub socket: PathBuf,
    /// Remove the pins without checking that no agent uses them.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum List {
    List,
}

#[derive(Debug, Subcommand)]
pub enum PolicyList {
    /// Every endpoint, or only one: its host-side ifindex or its pod IP.
    List { endpoint: Option<String> },
}

fn print<T: Serialize>(json: bool, rows: &[T], table: impl Fn(&T) -> String, header: &str) {
    if json {
        println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default());
        return;
    }
    println!("{header}");
    for r in rows {
        println!("{}", table(r));
    }
}

fn proto(p: u8) -> String {
    match p {
        0 => "ANY".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        1 => "ICMP".into(),
        132 => "SCTP".into(),
        other => other.to_string(),
    }
}

/// What `strait bpf cleanup` removed from one pin directory.
#[derive(Debug, Serialize)]
struct Removed {
    path: PathBuf,
    maps: usize,
    links: usize,
}

/// Bound on connecting to the agent's socket: a listener that does not accept within it (its
/// backlog full) is an agent all the same.
const SOCKET_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn cleanup(pin_root: &std::path::Path, args: CleanupArgs, json: bool) -> anyhow::Result<()> {
    let dirs = pins::versioned_dirs(pin_root);
    if !args.force {
        let probe = tokio::net::UnixStream::connect(&args.socket);
        if !matches!(
            tokio::time::timeout(SOCKET_PROBE_TIMEOUT, probe).await,
            Ok(Err(_))
        ) {
            anyhow::bail!(
                "an agent answers on {}: stop it first (or pass --force)",
                args.socket.display()
            );
        }
        if let Some(h) = pins::holders(&dirs).first() {
            anyhow::bail!(
                "process {} ({}) holds {} open: stop it first (or pass --force)",
                h.pid,
                h.command,
                h.map.display()
            );
        }
    }
    let count = |dir: PathBuf| std::fs::read_dir(dir).map_or(0, |d| d.count());
    let mut removed = Vec::new();
    for dir in dirs {
        let r = Removed {
            maps: count(dir.join("maps")),
            links: count(dir.join("links")),
            path: dir,
        };
        pins::remove_tree(&r.path)
            .map_err(|e| anyhow::anyhow!("removing {}: {e}", r.path.display()))?;
        removed.push(r);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&removed)?);
    } else if removed.is_empty() {
        println!("no strait pins under {}", pin_root.display());
    } else {
        for r in &removed {
            println!(
                "removed {} ({} maps, {} links)",
                r.path.display(),
                r.maps,
                r.links
            );
        }
    }
    Ok(())
}

pub async fn run(args: BpfArgs) -> anyhow::Result<()> {
    let pins = PinDir::new(&args.pin_root);
    let open = |name| open_pinned(&pins, name);
    match args.command {
        BpfCommand::Cleanup(cleanup_args) => {
            return cleanup(&args.pin_root, cleanup_args, args.json).await;
        }
        BpfCommand::Lb { .. } => {
            let rows = lb::list(
                open(names::MAP_LB4_SERVICES)?,
                open(names::MAP_LB4_BACKENDS)?,
            )?;
            print(
                args.json,
                &rows,
                |e| {
                    let backends: Vec<String> = e
                        .backends
                        .iter()
                        .map(|b| match &b.backend {
                            Some(a) => format!(
                                "{}:{} (id {}, cluster {}, {})",
                                a.address, a.port, b.id, a.cluster_id, b.state
                            ),
                            None => format!("id {} (missing)", b.id),
                        })
                        .collect();
                    format!(
                        "{:<22} {:<4} {:>6} {:<6} {}",
                        format!("{}:{}", e.frontend.address, e.frontend.port),
                        proto(e.frontend.proto),
                        e.rev_nat,
                        if e.global { "global" } else { "-" },
                        if backends.is_empty() {
                            "(no backend: connections fail with EHOSTUNREACH)".into()
                        } else {
                            backends.join(", ")
                        }
                    )
                },
                "FRONTEND               PROTO REVNAT SCOPE  BACKENDS",
            );
        }
        BpfCommand::Ipcache { .. } => {
            let rows = ipcache::list(open(names::MAP_IPCACHE)?)?;
            print(
                args.json,
                &rows,
                |e| {
                    format!(
                        "{:<20} {:>9} {:>8} {:<16} {:>3} {}",
                        e.prefix.to_string(),
                        e.identity,
                        e.cluster_id,
                        e.tunnel_endpoint
                            .map(|a| a.to_string())
                            .unwrap_or("-".into()),
                        e.encrypt_key,
                        if e.remote_cluster { "remote" } else { "local" }
                    )
                },
                "PREFIX                IDENTITY  CLUSTER NODE             KEY SCOPE",
            );
        }
        BpfCommand::Policy {
            cmd: PolicyList::List { endpoint },
        } => {
            let mut rows = policy::list(open(names::MAP_ENDPOINTS)?, open(names::MAP_POLICY)?)?;
            if let Some(want) = &endpoint {
                rows.retain(|l| l.endpoint.to_string() == *want || l.address.to_string() == *want);
                if rows.is_empty() {
                    anyhow::bail!("no endpoint {want} (give its host-side ifindex or pod IP)");
                }
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for l in &rows {
                    println!(
                        "endpoint {} ({}), identity {}, policy revision {}: ingress {}, egress {}",
                        l.endpoint,
                        l.address,
                        l.identity,
                        l.policy_revision,
                        if l.ingress_enforced {
                            "enforced"
                        } else {
                            "allow-all"
                        },
                        if l.egress_enforced {
                            "enforced"
                        } else {
                            "allow-all"
                        },
                    );
                    println!("  DIRECTION IDENTITY  PROTO PORT  VERDICT");
                    for e in &l.entries {
                        println!(
                            "  {:<9} {:>8}  {:<5} {:<5} {}",
                            e.direction,
                            if e.identity == 0 {
                                "ANY".into()
                            } else {
                                e.identity.to_string()
                            },
                            proto(e.proto),
                            if e.port == 0 {
                                "ANY".into()
                            } else {
                                e.port.to_string()
                            },
                            e.verdict
                        );
                    }
                }
            }
        }
        BpfCommand::Ct { .. } => {
            let rows = policy::ct_list(open(names::MAP_CT)?)?;
            print(
                args.json,
                &rows,
                |e| {
                    format!(
                        "{:>5} {:<7} {:<4} {:<21} -> {:<21} {:>7} {:>7} {:>9} {:>6}s",
                        e.endpoint,
                        e.direction,
                        proto(e.proto),
                        e.src.to_string(),
                        e.dst.to_string(),
                        e.packets,
                        e.reply_packets,
                        e.remote_identity,
                        e.idle_seconds
                    )
                },
                "   EP DIR     PROTO SOURCE                   DESTINATION           PACKETS REPLIES  IDENTITY   IDLE",
            );
        }
    }
    Ok(())
}
