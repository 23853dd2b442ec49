//! `strait agent`: the node daemon.

use std::path::PathBuf;

use clap::Args;

use crate::{config::AgentConfig, constants};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Agent configuration file (YAML).
    #[arg(long, env = "STRAIT_CONFIG", default_value = constants::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config = AgentConfig::load(&args.config)?;
    let mut signals = super::signals::StopSignals::new()?;
    crate::daemon::run(config, async move { signals.recv().await }).await
}
