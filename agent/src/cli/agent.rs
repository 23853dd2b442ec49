//! `strait agent`: the node daemon.

use std::{net::IpAddr, path::PathBuf};

use clap::Args;

use crate::{config::AgentConfig, constants};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Agent configuration file (YAML).
    #[arg(long, env = "STRAIT_CONFIG", default_value = constants::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// This node's name, overriding `node.name` (a DaemonSet passes `spec.nodeName`, so one
    /// ConfigMap serves every node).
    #[arg(long, env = "STRAIT_NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's internal IP, overriding `node.internalIP` (a DaemonSet passes
    /// `status.hostIP`).
    #[arg(long, env = "STRAIT_NODE_IP")]
    pub node_ip: Option<IpAddr>,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let mut config = AgentConfig::load(&args.config)?;
    if let Some(name) = args.node_name.filter(|n| !n.is_empty()) {
        config.node.name = Some(name);
    }
    if let Some(ip) = args.node_ip {
        config.node.internal_ip = Some(ip);
    }
    let mut signals = super::signals::StopSignals::new()?;
    crate::daemon::run(config, async move { signals.recv().await }).await
}
