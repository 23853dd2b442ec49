//! `strait agent`: wires the parts together. Sources write the state model; reconcilers and
//! the API read it. Each part owns its own resources and stops when dropped.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;

use crate::{
    api,
    clustermesh::{
        MaxConnectedClusters,
        manager::{ClusterMesh, LocalClusterWatch},
        publisher::{self, LocalNode},
        remote::{LocalCluster, RemoteTiming},
    },
    config::AgentConfig,
    kvstore::{EtcdClient, EtcdConfig},
    metrics::Metrics,
    state::StateHandle,
    status::{AgentStatus, ClusterMeshStatus, LocalStatus},
};

/// Runs the agent until `stop` completes.
pub async fn run(
    config: AgentConfig,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let node_name = config.node_name();
    let max = MaxConnectedClusters::from_u32(config.cluster.max_connected_clusters)?;
    let state = StateHandle::new(&config.cluster.name, config.cluster.id);
    let metrics = Metrics::new();

    let etcd = EtcdConfig::from_file(&config.kvstore_config)?;
    let client = connect_local(&etcd).await;
    let local_watch = LocalClusterWatch::spawn(
        &client,
        &config.cluster.name,
        state.clone(),
        metrics.clone(),
    );
    let node = LocalNode {
        cluster: config.cluster.name.clone(),
        cluster_id: config.cluster.id,
        name: node_name.clone(),
        internal_ip: config.node.internal_ip,
        pod_cidrs: config.node.pod_cidrs.clone(),
        wireguard_pubkey: None,
    };
    let publisher = tokio::spawn(publisher::publish_node(
        client.clone(),
        node,
        publisher::NODE_LEASE_TTL,
    ));

    let mesh = Arc::new(ClusterMesh::spawn(
        config.clustermesh_config_dir.clone(),
        LocalCluster {
            name: config.cluster.name.clone(),
            id: config.cluster.id,
            max_connected_clusters: max,
        },
        state.clone(),
        metrics.clone(),
        RemoteTiming::default(),
    ));

    let status: api::StatusFn = {
        let (state, mesh, synced) = (state.clone(), mesh.clone(), local_watch.synced.clone());
        let (cluster, id, kvstore) = (
            config.cluster.name.clone(),
            config.cluster.id,
            etcd.endpoints.join(","),
        );
        Arc::new(move || {
            let model = state.read();
            let counts = model.counts(&cluster);
            AgentStatus {
                version: env!("CARGO_PKG_VERSION").into(),
                cluster: LocalStatus {
                    name: cluster.clone(),
                    id,
                    node: node_name.clone(),
                    kvstore: kvstore.clone(),
                    kvstore_synced: synced.all(),
                    num_nodes: counts.nodes,
                    num_endpoints: counts.endpoints,
                    num_identities: counts.identities,
                },
                cluster_mesh: ClusterMeshStatus {
                    clusters: mesh.statuses(),
                    num_global_services: model.service_views().iter().filter(|s| s.global).count(),
                },
            }
        })
    };
    let api_server = tokio::spawn({
        let path = config.api_socket.clone();
        async move { api::serve(&path, status).await }
    });
    let metrics_server = tokio::spawn(metrics.clone().serve(config.metrics_address));

    tokio::select! {
        _ = stop => tracing::info!("stopping"),
        r = api_server => r.context("API server task")?.context("API server")?,
        r = metrics_server => r.context("metrics task")?.context("metrics server")?,
    }
    publisher.abort();
    drop(mesh);
    let _ = std::fs::remove_file(&config.api_socket);
    Ok(())
}

/// The local kvstore is required: retry until it answers, saying so.
async fn connect_local(etcd: &EtcdConfig) -> EtcdClient {
    let mut delay = Duration::from_millis(200);
    loop {
        match EtcdClient::connect(etcd).await {
            Ok(client) => return client,
            Err(e) => {
                tracing::warn!(error = %e, "local kvstore unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}
