//! `strait agent`: wires the parts together. Sources write the state model; reconcilers and
//! the API read it. Each part owns its own resources and stops when dropped.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;

use crate::{
    api,
    config::AgentConfig,
    datapath::{DatapathAgent, flows::IdentityLookup},
    identity::{IdentityRange, MaxConnectedClusters},
    kvstore::{ClustermeshConfigDir, EtcdClient, EtcdConfig},
    mesh::{
        manager::{ClusterMesh, LocalClusterWatch},
        remote::{LocalCluster, RemoteTiming},
        sync::SyncFlags,
    },
    metrics::Metrics,
    publish::{
        allocator::IdentityAllocator,
        endpoints::EndpointSource,
        publisher::{self, EndpointPublisher, LocalNode},
    },
    state::StateHandle,
    status::StatusSources,
    task::AbortOnDrop,
    wireguard::{BackendChoice, EncryptionAgent, EncryptionConfig},
};

fn encryption_config(config: &AgentConfig, node_name: &str) -> anyhow::Result<EncryptionConfig> {
    let wg = &config.wireguard;
    let mut cfg = EncryptionConfig::new(&config.cluster.name, node_name);
    cfg.wireguard.device = wg.device.clone();
    cfg.wireguard.state_dir = config.state_dir.clone();
    cfg.wireguard.backend = wg
        .backend
        .parse::<BackendChoice>()
        .map_err(anyhow::Error::msg)?;
    cfg.wireguard.node_encryption = wg.node_encryption;
    cfg.routing.strict = wg.strict;
    cfg.routing.strict_cidrs = wg.strict_cidrs.clone();
    cfg.routing.underlay_mtu = wg.underlay_mtu;
    Ok(cfg)
}

/// Names identities in flow events: (cluster, labels) from the state model, with Cilium's
/// reserved identities spelled out.
fn identity_lookup(state: &StateHandle) -> IdentityLookup {
    let state = state.clone();
    Arc::new(move |id| match id {
        0 => (None, vec!["reserved:unknown".into()]),
        1 => (None, vec!["reserved:host".into()]),
        2 => (None, vec!["reserved:world".into()]),
        _ => state
            .read()
            .identity(id)
            .map(|i| (Some(i.cluster.to_string()), i.labels.clone()))
            .unwrap_or_default(),
    })
}

/// This node's pod CIDRs as Kubernetes allocated them (`spec.podCIDRs` of its Node), for
/// configs that leave `node.podCIDRs` out. Waits a bounded time for the Node object.
async fn node_pod_cidrs_from(
    source: &crate::k8s::LocalSource,
    node_name: &str,
) -> Vec<ipnet::IpNet> {
    const WAIT: Duration = Duration::from_secs(60);
    let mut objects = source.objects();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let cidrs = objects.borrow_and_update().node_pod_cidrs(node_name);
            if !cidrs.is_empty() {
                return cidrs;
            }
            if objects.changed().await.is_err() {
                return Vec::new();
            }
        }
    })
    .await
    .unwrap_or_default();
    if found.is_empty() {
        tracing::error!(
            node = node_name,
            "no pod CIDRs: node.podCIDRs is not configured and the Node object has no \
             spec.podCIDRs after {WAIT:?} (is the controller-manager allocating node CIDRs?)"
        );
    } else {
        tracing::info!(node = node_name, pod_cidrs = ?found, "pod CIDRs from the Node object");
    }
    found
}

/// Health responder and prober on the node address. Without them remote clusters are never
/// marked datapath-down; that is worth a warning, not a failed start (e.g. the port is taken).
async fn start_health(
    ip: std::net::IpAddr,
    state: StateHandle,
    metrics: Metrics,
) -> Vec<AbortOnDrop> {
    let addr = std::net::SocketAddr::new(ip, crate::health::HEALTH_PORT);
    let mut tasks = Vec::new();
    match crate::health::responder(addr).await {
        Ok(t) => tasks.push(t),
        Err(e) => {
            tracing::warn!(error = %e, "health responder not running: other nodes may take this node's cluster for down")
        }
    }
    match crate::health::prober(ip, state, metrics, Default::default()).await {
        Ok(t) => tasks.push(t),
        Err(e) => {
            tracing::warn!(error = %e, "health prober not running: remote cluster loss is only seen through the kvstore")
        }
    }
    tasks
}

/// Starts the local endpoint source: this node's pods get identities, published ipcache
/// entries and their local endpoints (with policy) in the state model. Runs until the
/// returned tasks are dropped.
async fn start_endpoints(
    config: &AgentConfig,
    client: &EtcdClient,
    node: &LocalNode,
    max: MaxConnectedClusters,
    state: StateHandle,
    objects: tokio::sync::watch::Receiver<crate::k8s::Objects>,
) -> anyhow::Result<[AbortOnDrop; 2]> {
    let allocator = IdentityAllocator::new(
        client.clone(),
        &config.cluster.name,
        IdentityRange::for_cluster(config.cluster.id, max),
        &node.name,
        crate::constants::NODE_LEASE_TTL,
    )
    .await
    .context("identity allocator")?;
    let endpoints = Arc::new(
        EndpointPublisher::new(
            client.clone(),
            node.clone(),
            crate::constants::NODE_LEASE_TTL,
        )
        .await
        .context("endpoint publisher")?,
    );
    let keep = tokio::spawn({
        let endpoints = endpoints.clone();
        async move { endpoints.keep_published().await }
    });
    let source = EndpointSource {
        cluster: config.cluster.name.clone(),
        node: node.name.clone(),
        allocator,
        publisher: endpoints,
        state,
    };
    let run = tokio::spawn(source.run(objects));
    Ok([AbortOnDrop(keep), AbortOnDrop(run)])
}

/// The eBPF datapath, when the config has a `datapath:` section.
fn start_datapath(
    config: &AgentConfig,
    state: &StateHandle,
    synced: &tokio::sync::watch::Receiver<bool>,
    metrics: &Metrics,
) -> anyhow::Result<Option<Arc<DatapathAgent>>> {
    let Some(section) = &config.datapath else {
        tracing::warn!("no `datapath:` section in the config: the eBPF datapath is not loaded");
        return Ok(None);
    };
    let agent = DatapathAgent::start(
        section,
        state.clone(),
        synced.clone(),
        metrics.clone(),
        identity_lookup(state),
    )
    .context("starting the eBPF datapath (remove the `datapath:` section to run without it)")?;
    Ok(Some(Arc::new(agent)))
}

/// WireGuard between nodes, unless the config turns it off.
async fn start_encryption(
    config: &AgentConfig,
    node_name: &str,
    state: &StateHandle,
    synced: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<Arc<EncryptionAgent>>> {
    if !config.wireguard.enabled {
        tracing::warn!(
            "WireGuard encryption is disabled: pod traffic between nodes is not encrypted"
        );
        return Ok(None);
    }
    let agent =
        EncryptionAgent::start(encryption_config(config, node_name)?, state.clone(), synced)
            .await
            .context(
                "starting WireGuard (set `wireguard: {enabled: false}` to run without encryption)",
            )?;
    tracing::info!(public_key = %agent.public_key(), "WireGuard encryption on");
    Ok(Some(Arc::new(agent)))
}

/// Remote clusters configured at start (files whose config parses). Peers nobody claims are
/// garbage-collected only once every source has listed: our own cluster and these.
fn expected_remotes(config: &AgentConfig) -> Vec<String> {
    ClustermeshConfigDir::new(&config.clustermesh_config_dir, config.cluster.name.clone())
        .scan()
        .map(|files| {
            files
                .into_iter()
                .filter(|(_, f)| f.config.is_ok())
                .map(|(name, _)| name)
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `true` once our own cluster and every expected remote have listed nodes and
/// endpoints: from then on the reconcilers may delete what no source claims.
async fn signal_initial_sync(
    expected: Vec<String>,
    mesh: Arc<ClusterMesh>,
    local_synced: Arc<SyncFlags>,
    synced_tx: tokio::sync::watch::Sender<bool>,
) {
    loop {
        let statuses = mesh.statuses();
        let remotes_synced = expected.iter().all(|name| {
            statuses
                .iter()
                .any(|s| &s.name == name && s.synced.nodes && s.synced.endpoints)
        });
        if local_synced.all() && remotes_synced {
            tracing::info!("initial sync of every cluster complete");
            let _ = synced_tx.send(true);
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the agent until `stop` completes.
pub async fn run(
    config: AgentConfig,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let node_name = config.node_name();
    let max = MaxConnectedClusters::from_u32(config.cluster.max_connected_clusters)?;
    let state = StateHandle::new(&config.cluster.name, config.cluster.id);
    let metrics = Metrics::new();

    // The local source starts before the kvstore connection: the cluster's services (the
    // kvstore's own among them) must not wait for etcd.
    let local_source = crate::k8s::LocalSource::start(
        &config.local_source().map_err(anyhow::Error::msg)?,
        &node_name,
        state.clone(),
        config.cluster.id,
    )
    .await?;
    let pod_cidrs = match (&local_source, config.node.pod_cidrs.is_empty()) {
        (Some(source @ crate::k8s::LocalSource::Api(_)), true) => {
            node_pod_cidrs_from(source, &node_name).await
        }
        _ => config.node.pod_cidrs.clone(),
    };

    let etcd = EtcdConfig::from_file(&config.kvstore_config)?;
    let client = EtcdClient::connect_retrying(&etcd).await;
    let local_watch = LocalClusterWatch::spawn(
        &client,
        &config.cluster.name,
        state.clone(),
        metrics.clone(),
    );
    let (synced_tx, synced_rx) = tokio::sync::watch::channel(false);
    let datapath = start_datapath(&config, &state, &synced_rx, &metrics)?;
    let encryption = start_encryption(&config, &node_name, &state, synced_rx).await?;
    let node = LocalNode {
        cluster: config.cluster.name.clone(),
        cluster_id: config.cluster.id,
        name: node_name.clone(),
        internal_ip: config.node.internal_ip.context(
            "node.internalIP is not set: put it in the config or pass --node-ip / STRAIT_NODE_IP",
        )?,
        pod_cidrs,
        wireguard_pubkey: encryption.as_ref().map(|e| e.public_key()),
    };
    let _health = start_health(node.internal_ip, state.clone(), metrics.clone()).await;
    let _endpoints = match &local_source {
        Some(source) => Some(
            start_endpoints(
                &config,
                &client,
                &node,
                max,
                state.clone(),
                source.objects(),
            )
            .await?,
        ),
        None => None,
    };
    // Every agent with a local source campaigns to be this cluster's publisher (cluster
    // config, heartbeat, global services): remotes can read this etcd directly, no mirror
    // needed. Without a local source it knows no services and must not lead.
    let _cluster_publisher = match &local_source {
        Some(_) => Some(AbortOnDrop(tokio::spawn(crate::mesh::exporter::run(
            client.clone(),
            crate::mesh::exporter::Publication {
                cluster: config.cluster.name.clone(),
                cluster_id: config.cluster.id,
                max_connected_clusters: max.value(),
            },
            node_name.clone(),
            state.clone(),
            crate::constants::NODE_LEASE_TTL,
        )))),
        None => {
            tracing::warn!(
                "no local source: this agent does not campaign to publish the cluster config \
                 and global services"
            );
            None
        }
    };
    let publisher = tokio::spawn(publisher::publish_node(
        client.clone(),
        node,
        crate::constants::NODE_LEASE_TTL,
    ));

    let mesh = Arc::new(ClusterMesh::spawn_with_limits(
        config.clustermesh_config_dir.clone(),
        LocalCluster {
            name: config.cluster.name.clone(),
            id: config.cluster.id,
            max_connected_clusters: max,
        },
        state.clone(),
        metrics.clone(),
        RemoteTiming::default(),
        config.clustermesh.limits,
    ));

    let sync_signal = tokio::spawn(signal_initial_sync(
        expected_remotes(&config),
        mesh.clone(),
        local_watch.synced.clone(),
        synced_tx,
    ));

    let status = StatusSources {
        cluster: config.cluster.name.clone(),
        cluster_id: config.cluster.id,
        node: node_name,
        kvstore: etcd.endpoints.join(","),
        local_synced: local_watch.synced.clone(),
        state: state.clone(),
        mesh: mesh.clone(),
        encryption: encryption.clone(),
        datapath: datapath.clone(),
    };
    let status: api::StatusFn = Arc::new(move || status.build());
    let api_server = tokio::spawn({
        let path = config.api_socket.clone();
        let flows = datapath.as_ref().map(|d| d.flows());
        async move { api::serve(&path, status, flows).await }
    });
    let metrics_server = tokio::spawn(metrics.clone().serve(config.metrics_address));

    tokio::select! {
        _ = stop => tracing::info!("stopping"),
        r = api_server => r.context("API server task")?.context("API server")?,
        r = metrics_server => r.context("metrics task")?.context("metrics server")?,
    }
    publisher.abort();
    sync_signal.abort();
    drop(mesh);
    if let Some(agent) = encryption.and_then(|e| Arc::try_unwrap(e).ok()) {
        agent.stop().await;
    }
    let _ = std::fs::remove_file(&config.api_socket);
    Ok(())
}
