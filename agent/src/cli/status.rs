//! `strait status`: the local agent's view of the mesh.

use std::path::PathBuf;

use clap::Args;

use crate::constants;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's API socket.
    #[arg(long, env = "STRAIT_API_SOCKET", default_value = constants::DEFAULT_API_SOCKET)]
    pub socket: PathBuf,
    /// Print the status document as JSON (Cilium's RemoteCluster field names).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status = crate::api::fetch_status(&args.socket).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render());
    }
    Ok(())
}
