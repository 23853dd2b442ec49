//! `strait etcd init`: users, roles and authentication of a cluster's kvstore etcd.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::{
    kvstore::{EtcdClient, EtcdConfig, auth},
    wire::users,
};

#[derive(Debug, Args)]
pub struct EtcdArgs {
    #[command(subcommand)]
    pub command: EtcdCommand,
}

#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// Create the clustermesh users and roles and enable authentication (idempotent).
    ///
    /// Users as Cilium's clustermesh-apiserver creates them, without passwords (etcd must run
    /// with --client-cert-auth: the client certificate's CN is the user name): `root` and
    /// `admin-<cluster>` (root role); `local-<cluster>` (read-only cilium/.heartbeat,
    /// cilium/cache/, cilium/cluster-config/, cilium/synced/); `remote` and
    /// `remote-<peer>` per --remote-user (read-only cilium/.heartbeat, cilium/state/,
    /// cilium/cluster-config/<cluster>, cilium/synced/<cluster>/); and strait's
    /// `agent-<cluster>` (read-write cilium/state/nodes/v1/<cluster>/,
    /// cilium/state/ip/v1/default/, cilium/state/identities/v1/). Re-running makes grants
    /// exactly these and removes `remote-*` users no longer listed. On a store that had no
    /// authentication yet, every key and lease is deleted once it is enabled (nobody
    /// authorised their writers). Once enabled, run it with an `admin-<cluster>` or `root`
    /// certificate.
    Init(InitArgs),
}

/// What `strait etcd init` and `strait kvstoremesh --init-etcd-auth` share.
#[derive(Debug, Clone, Args)]
pub struct AuthUsersArgs {
    /// Peer clusters that authenticate as `remote-<peer>` (Cilium's `cluster` auth mode);
    /// comma-separated or repeated. Everyone else uses the shared `remote` user.
    #[arg(long = "remote-user", value_name = "PEER", value_delimiter = ',')]
    pub remote_users: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// This cluster's name (user names and the remote role's ranges contain it).
    #[arg(long, env = "STRAIT_CLUSTER_NAME")]
    pub cluster_name: String,
    /// Cilium-format etcd config of this cluster's etcd (with an admin certificate).
    #[arg(long)]
    pub kvstore_config: PathBuf,
    #[command(flatten)]
    pub users: AuthUsersArgs,
}

pub async fn run(args: EtcdArgs) -> anyhow::Result<()> {
    match args.command {
        EtcdCommand::Init(args) => {
            let etcd = EtcdConfig::from_file(&args.kvstore_config)?;
            let client = EtcdClient::connect(&etcd).await?;
            init(&client, &args.cluster_name, &args.users).await
        }
    }
}

/// Applies the clustermesh plan of `cluster` and logs what changed.
pub async fn init(client: &EtcdClient, cluster: &str, args: &AuthUsersArgs) -> anyhow::Result<()> {
    let plan = users::clustermesh_plan(cluster, &args.remote_users);
    let report = auth::apply(client, &plan)
        .await
        .with_context(|| format!("setting up etcd users and roles at {}", client.endpoints()))?;
    if report.unchanged() {
        tracing::info!("etcd users and roles already as planned; authentication on");
    } else {
        tracing::info!(?report, "etcd users and roles set up; authentication on");
    }
    Ok(())
}
