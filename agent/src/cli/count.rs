//! `strait count`: the packet counter, end to end.

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use crate::{datapath::PacketCounterProgram, netns::NetnsGuard};

#[derive(Debug, Args)]
pub struct CountArgs {
    /// Interface to attach to.
    #[arg(long)]
    pub iface: String,
    /// Named network namespace (as in `ip netns list`) that holds the interface.
    #[arg(long)]
    pub netns: Option<String>,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Seconds between counter printouts.
    #[arg(long, default_value_t = 1)]
    pub interval: u64,
    /// Print JSON lines instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: CountArgs) -> anyhow::Result<()> {
    // Listen before announcing readiness, so a stop request right after it is not lost.
    let mut stop_signals = super::signals::StopSignals::new()?;
    let mut counter = PacketCounterProgram::load().context("loading the counter programs")?;
    {
        // setns affects this thread only; nothing in this block awaits.
        let _ns = args.netns.as_deref().map(NetnsGuard::enter).transpose()?;
        counter
            .attach(&args.iface)
            .with_context(|| format!("attaching to {}", args.iface))?;
    }
    let place = args.netns.as_deref().unwrap_or("host");
    if args.json {
        println!(
            "{}",
            json!({"event": "attached", "iface": args.iface, "netns": place})
        );
    } else {
        println!(
            "counting on {} (netns {place}): ingress and egress attached",
            args.iface
        );
    }

    let deadline = args
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut ticker = tokio::time::interval(Duration::from_secs(args.interval.max(1)));
    ticker.tick().await;
    loop {
        let stop = tokio::select! {
            _ = stop_signals.recv() => true,
            _ = sleep_until(deadline) => true,
            _ = ticker.tick() => false,
        };
        let snapshot = counter.snapshot()?;
        if args.json {
            println!(
                "{}",
                json!({"event": if stop { "final" } else { "counters" }, "counters": snapshot.rows})
            );
        } else {
            println!("{snapshot}");
        }
        if stop {
            break;
        }
    }
    // Dropping the program detaches its links.
    drop(counter);
    tracing::info!(iface = %args.iface, "detached");
    Ok(())
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
