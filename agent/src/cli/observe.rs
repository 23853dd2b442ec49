//! `strait observe`: the datapath's flow events, Hubble-style.

use std::{io::Write as _, path::PathBuf};

use clap::Args;

use crate::constants;

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// The agent's API socket.
    #[arg(long, env = "STRAIT_API_SOCKET", default_value = constants::DEFAULT_API_SOCKET)]
    pub socket: PathBuf,
    /// How many recent flows to print first.
    #[arg(long, default_value_t = 20)]
    pub last: u32,
    /// Keep printing new flows as they happen (until Ctrl-C).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ObserveArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    let mut result = Ok(());
    crate::api::observe(&args.socket, args.last, args.follow, |flow| {
        if result.is_err() {
            return;
        }
        let line = if args.json {
            serde_json::to_string(&flow).unwrap_or_default()
        } else {
            flow.to_string()
        };
        // Flush per line: `observe -f | grep` must see flows as they happen.
        result = writeln!(out, "{line}").and_then(|()| out.flush());
    })
    .await?;
    Ok(result?)
}
