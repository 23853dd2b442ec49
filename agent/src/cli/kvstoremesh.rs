//! `strait kvstoremesh`: one per cluster, next to the cluster's etcd. A mirror of remote
//! clusters (Cilium's KVStoreMesh); given a service source, also a candidate for this cluster's
//! publisher role, which the agents campaign for anyway (`mesh::exporter`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use crate::{
    constants,
    identity::MaxConnectedClusters,
    kvstore::{EtcdClient, EtcdConfig},
    mesh::kvstoremesh::{DRAIN_GRACE, KvstoreMesh, MeshOptions},
    metrics::Metrics,
};

#[derive(Debug, Args)]
pub struct KvstoremeshArgs {
    /// This cluster's name (its own config file in the directory is ignored).
    #[arg(long, env = "STRAIT_CLUSTER_NAME")]
    pub cluster_name: String,
    /// This cluster's ID, needed with --manifests-dir / --kubernetes-api. This cluster's own
    /// `cilium/cluster-config/<name>`, heartbeat and global services are written by the elected
    /// cluster publisher: every `strait agent` campaigns for it, and so does this process when
    /// it has a service source. A mirror is not needed for other clusters to read this etcd.
    #[arg(long, env = "STRAIT_CLUSTER_ID")]
    pub cluster_id: Option<u32>,
    /// Cilium-format etcd config of this cluster's etcd, where the cache is written.
    #[arg(long)]
    pub kvstore_config: PathBuf,
    /// Directory with one Cilium-format etcd config per remote cluster (file name = cluster).
    #[arg(long, default_value = constants::DEFAULT_CLUSTERMESH_CONFIG_DIR)]
    pub clustermesh_config_dir: PathBuf,
    /// 255 (default) or 511, as configured for every agent of this cluster.
    #[arg(long, default_value_t = constants::DEFAULT_MAX_CONNECTED_CLUSTERS)]
    pub max_connected_clusters: u32,
    /// Seconds to keep a removed cluster's cache before deleting it.
    #[arg(long, default_value_t = DRAIN_GRACE.as_secs())]
    pub drain_grace_seconds: u64,
    /// Campaign for the cluster publisher role (cluster config, heartbeat, global services to
    /// `cilium/state/services/v1/<cluster>/...`; requires --cluster-id), reading services from
    /// YAML manifests in this directory. Every candidate campaigns; only the elected one writes.
    #[arg(long)]
    pub manifests_dir: Option<PathBuf>,
    /// Export this cluster's global services read from the Kubernetes API instead
    /// (in-cluster ServiceAccount; requires --cluster-id).
    #[arg(long, conflicts_with = "manifests_dir")]
    pub kubernetes_api: bool,
    /// API server URL overriding the in-cluster address (Talos KubePrism:
    /// https://localhost:7445).
    #[arg(long, env = "STRAIT_K8S_API_SERVER", requires = "kubernetes_api")]
    pub api_server: Option<hyper::Uri>,
    /// First create the clustermesh users and roles in this cluster's etcd and enable
    /// authentication, as `strait etcd init` does (needs an `admin-<cluster>` certificate in
    /// --kvstore-config). Fails instead of mirroring when that fails.
    #[arg(long)]
    pub init_etcd_auth: bool,
    #[command(flatten)]
    pub users: super::etcd::AuthUsersArgs,
    /// Seconds between identity GC rounds (Cilium's `identity-gc-interval`); needs
    /// --cluster-id. Every replica campaigns; only the elected one collects. 0 turns it off.
    #[arg(long, default_value_t = constants::IDENTITY_GC_INTERVAL.as_secs())]
    pub identity_gc_interval_seconds: u64,
    /// Prometheus metrics address.
    #[arg(long, default_value = "0.0.0.0:9965")]
    pub metrics_address: SocketAddr,
}

pub async fn run(args: KvstoremeshArgs) -> anyhow::Result<()> {
    let local_max = MaxConnectedClusters::from_u32(args.max_connected_clusters)?;
    let etcd = EtcdConfig::from_file(&args.kvstore_config)?;
    let local = EtcdClient::connect_retrying(&etcd).await;
    if args.init_etcd_auth {
        super::etcd::init(&local, &args.cluster_name, &args.users).await?;
    } else if !args.users.remote_users.is_empty() {
        anyhow::bail!("--remote-user needs --init-etcd-auth");
    }
    let metrics = Metrics::new();
    let options = MeshOptions {
        local_max,
        drain_grace: Duration::from_secs(args.drain_grace_seconds),
        ..MeshOptions::default()
    };
    let export = args.manifests_dir.is_some() || args.kubernetes_api;
    let exporter = match (export, args.cluster_id) {
        (true, Some(id)) => {
            let state = crate::state::StateHandle::new(&args.cluster_name, id);
            let source = match &args.manifests_dir {
                Some(dir) => {
                    crate::k8s::LocalSource::Manifests(crate::k8s::ManifestsSource::spawn(
                        dir.clone(),
                        state.clone(),
                        id,
                        crate::k8s::manifests::POLL_INTERVAL,
                    ))
                }
                None => crate::k8s::LocalSource::Api(crate::k8s::ApiSource::spawn(
                    crate::k8s::api::client(args.api_server.as_ref()).await?,
                    crate::k8s::api::WatchSet::ServiceExport,
                    state.clone(),
                    id,
                )),
            };
            let identity = format!("{}-{}", crate::config::hostname(), std::process::id());
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(crate::mesh::exporter::run(
                local.clone(),
                crate::mesh::exporter::Publication {
                    cluster: args.cluster_name.clone(),
                    cluster_id: id,
                    max_connected_clusters: local_max.value(),
                },
                identity,
                state,
                constants::EXPORTER_LEASE_TTL,
                source.synced(),
                stop_rx,
            ));
            Some((source, stop_tx, task))
        }
        (true, None) => anyhow::bail!(
            "--manifests-dir and --kubernetes-api need --cluster-id: exported services carry \
             the cluster ID"
        ),
        (false, Some(_)) => {
            tracing::info!(
                "no service source: this cluster's config and global services are published by \
                 its agents (the elected cluster publisher); --cluster-id is not used"
            );
            None
        }
        (false, None) => None,
    };
    let _identity_gc = match args.cluster_id {
        Some(id) if args.identity_gc_interval_seconds > 0 => Some(crate::task::AbortOnDrop(
            tokio::spawn(crate::mesh::identity_gc::run(
                local.clone(),
                args.cluster_name.clone(),
                format!("{}-{}", crate::config::hostname(), std::process::id()),
                crate::identity::IdentityRange::for_cluster(id, local_max),
                Duration::from_secs(args.identity_gc_interval_seconds),
                constants::NODE_LEASE_TTL,
            )),
        )),
        _ => None,
    };
    let mesh = KvstoreMesh::spawn(
        args.clustermesh_config_dir,
        &args.cluster_name,
        local,
        metrics.clone(),
        options,
    );
    let mut signals = super::signals::StopSignals::new()?;
    let outcome = tokio::select! {
        _ = signals.recv() => {
            tracing::info!("stopping");
            Ok(())
        }
        r = metrics.serve(args.metrics_address) => r.map_err(anyhow::Error::from),
    };
    // The exporter resigns and revokes its lease, so a standby takes over now.
    if let Some((source, stop, mut task)) = exporter {
        let _ = stop.send(true);
        if tokio::time::timeout(constants::SHUTDOWN_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            tracing::warn!("the service exporter did not step down in time");
            task.abort();
        }
        drop(source);
    }
    drop(mesh);
    outcome
}
