//! `strait agent`: wires the parts together. Sources write the state model; reconcilers and
//! the API read it. Each part owns its own resources and stops when dropped.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;

use crate::{
    api,
    config::AgentConfig,
    datapath::{DatapathAgent, flows::IdentityLookup},
    identity::{IdentityRange, MaxConnectedClusters, validate_cluster_name},
    kvstore::{ClustermeshConfigDir, EtcdClient, EtcdConfig},
    mesh::{
        manager::{ClusterMesh, LocalClusterWatch},
        remote::{LocalCluster, RemoteTiming},
        sync::SyncFlags,
    },
    metrics::Metrics,
    publish::{
        allocator::IdentityAllocator,
        endpoints::{CniAttachments, EndpointSource},
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
    section: &crate::health::HealthSection,
    state: StateHandle,
    metrics: Metrics,
) -> (
    Vec<AbortOnDrop>,
    Option<tokio::sync::watch::Receiver<crate::health::HealthReport>>,
) {
    let addr = std::net::SocketAddr::new(ip, crate::health::HEALTH_PORT);
    let mut tasks = Vec::new();
    match crate::health::responder(addr).await {
        Ok(t) => tasks.push(t),
        Err(e) => {
            tracing::warn!(error = %e, "health responder not running: other nodes may take this node's cluster for down")
        }
    }
    let cfg = crate::health::HealthConfig::new(section, ip);
    tracing::info!(underlay = ?cfg.underlay, "health probes go to remote node addresses in these ranges only");
    let mut report = None;
    match crate::health::prober(std::net::SocketAddr::new(ip, 0), state, metrics, cfg).await {
        Ok((t, r)) => {
            tasks.push(t);
            report = Some(r);
        }
        Err(e) => {
            tracing::warn!(error = %e, "health prober not running: remote cluster loss is only seen through the kvstore")
        }
    }
    (tasks, report)
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
    source: &crate::k8s::LocalSource,
    cni: CniAttachments,
) -> anyhow::Result<[AbortOnDrop; 3]> {
    let (objects, listed) = (source.objects(), source.synced());
    // Cilium's reference suffix is the node's IP (`GetNodeSuffix`).
    let allocator = Arc::new(
        IdentityAllocator::new(
            client.clone(),
            &config.cluster.name,
            IdentityRange::for_cluster(config.cluster.id, max),
            &node.internal_ip.to_string(),
            crate::constants::NODE_LEASE_TTL,
        )
        .await
        .context("identity allocator")?,
    );
    let identities = tokio::spawn({
        let allocator = allocator.clone();
        async move { allocator.run().await }
    });
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
        cni,
    };
    let run = tokio::spawn(source.run(objects, listed));
    Ok([AbortOnDrop(keep), AbortOnDrop(identities), AbortOnDrop(run)])
}

/// The egress masquerade, when the config turns it on (IPv4 node address and pod CIDRs).
fn start_masquerade(
    config: &AgentConfig,
    node: &LocalNode,
    state: &StateHandle,
) -> Option<AbortOnDrop> {
    if !config.masquerade.enabled {
        return None;
    }
    let std::net::IpAddr::V4(node_ip) = node.internal_ip else {
        tracing::error!(ip = %node.internal_ip, "masquerade needs an IPv4 node address; not enabled");
        return None;
    };
    let local_pods = node
        .pod_cidrs
        .iter()
        .filter_map(|c| match c {
            ipnet::IpNet::V4(v4) => Some(v4.trunc()),
            ipnet::IpNet::V6(_) => None,
        })
        .collect();
    Some(AbortOnDrop(tokio::spawn(crate::masquerade::reconcile(
        node_ip,
        local_pods,
        config.masquerade.clone(),
        state.clone(),
    ))))
}

/// A pod's endpoint is ready for strait-cni when the state model holds it at the address and
/// interface the plugin set up (identity allocated) and, with the datapath on, its programs
/// are attached with that identity in its maps.
fn endpoint_ready(
    state: StateHandle,
    datapath: Option<Arc<DatapathAgent>>,
) -> api::EndpointReadyFn {
    Arc::new(move |namespace, name, ip, ifindex| {
        let identity = {
            let model = state.read();
            let ep = model.local_endpoint(namespace, name)?;
            let on_it = ep.interface.as_ref().map(|i| i.ifindex) == Some(ifindex);
            (ep.ip == ip && on_it && ep.identity != 0).then_some(ep.identity)?
        };
        match &datapath {
            Some(d) => (d.endpoint_identity(ifindex) == Some(identity)).then_some(identity),
            None => Some(identity),
        }
    })
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

/// Remote clusters the config directory names now: files whose config parses and whose
/// name is a valid cluster name (a file the mesh ignores must not hold the sync back).
fn configured_remotes(dir: &ClustermeshConfigDir) -> Vec<String> {
    dir.scan()
        .map(|files| {
            files
                .into_iter()
                .filter(|(name, f)| f.config.is_ok() && validate_cluster_name(name).is_ok())
                .map(|(name, _)| name)
                .collect()
        })
        .unwrap_or_default()
}

/// How often the initial sync is checked (it has no single event to wait on: flags of every
/// remote and the directory's content).
const SYNC_CHECK: Duration = Duration::from_millis(250);

/// Sends `true` once our own cluster and every remote the config directory names (read
/// again on every check, so a removed file stops counting) have listed nodes and endpoints,
/// or once `timeout` has passed with only our own cluster listed (Cilium's
/// `clustermesh-sync-timeout`): from then on the reconcilers may delete what no source
/// claims, and the agent reports ready.
async fn signal_initial_sync(
    dir: ClustermeshConfigDir,
    mesh: Arc<ClusterMesh>,
    local_synced: Arc<SyncFlags>,
    synced_tx: tokio::sync::watch::Sender<bool>,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let scan = dir.clone();
        let expected = tokio::task::spawn_blocking(move || configured_remotes(&scan))
            .await
            .unwrap_or_default();
        let statuses = mesh.statuses();
        let pending: Vec<&String> = expected
            .iter()
            .filter(|name| {
                !statuses
                    .iter()
                    .any(|s| &s.name == *name && s.synced.nodes && s.synced.endpoints)
            })
            .collect();
        if local_synced.all() {
            if pending.is_empty() {
                tracing::info!("initial sync of every cluster complete");
                let _ = synced_tx.send(true);
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    ?pending,
                    ?timeout,
                    "remote clusters not synced within the clustermesh sync timeout: \
                     proceeding without them (stale state of the others is cleaned up)"
                );
                let _ = synced_tx.send(true);
                return;
            }
        }
        tokio::time::sleep(SYNC_CHECK).await;
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
    let encryption = start_encryption(&config, &node_name, &state, synced_rx.clone()).await?;
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
    let (health, health_report) = start_health(
        node.internal_ip,
        &config.health,
        state.clone(),
        metrics.clone(),
    )
    .await;
    let _masquerade = start_masquerade(&config, &node, &state);
    let cni_attachments = CniAttachments::default();
    let endpoints = match &local_source {
        Some(source) => Some(
            start_endpoints(
                &config,
                &client,
                &node,
                max,
                state.clone(),
                source,
                cni_attachments.clone(),
            )
            .await?,
        ),
        None => None,
    };
    // Every agent with a local source campaigns to be this cluster's publisher (cluster
    // config, heartbeat, global services): remotes can read this etcd directly, no mirror
    // needed. Without a local source it knows no services and must not lead.
    // It waits for the source's first listing, and on shutdown resigns and revokes its lease
    // so another agent takes over at once.
    let (cluster_publisher_stop, stop_rx) = tokio::sync::watch::channel(false);
    let cluster_publisher = match &local_source {
        Some(source) => Some(AbortOnDrop(tokio::spawn(crate::mesh::exporter::run(
            client.clone(),
            crate::mesh::exporter::Publication {
                cluster: config.cluster.name.clone(),
                cluster_id: config.cluster.id,
                max_connected_clusters: max.value(),
            },
            node_name.clone(),
            state.clone(),
            crate::constants::EXPORTER_LEASE_TTL,
            source.synced(),
            stop_rx,
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

    let sync_signal = AbortOnDrop(tokio::spawn(signal_initial_sync(
        ClustermeshConfigDir::new(&config.clustermesh_config_dir, config.cluster.name.clone()),
        mesh.clone(),
        local_watch.synced.clone(),
        synced_tx,
        config.clustermesh.sync_timeout,
    )));

    // The API's status closure holds its sources weakly: an API call still open when the
    // agent stops must not keep the mesh, the datapath or WireGuard from stopping.
    let status = Arc::new(StatusSources {
        cluster: config.cluster.name.clone(),
        cluster_id: config.cluster.id,
        node: node_name,
        kvstore: etcd.endpoints.join(","),
        local_synced: local_watch.synced.clone(),
        state: state.clone(),
        mesh: mesh.clone(),
        encryption: encryption.clone(),
        datapath: datapath.clone(),
        health: health_report,
    });
    let status_fn: api::StatusFn = {
        let weak = Arc::downgrade(&status);
        Arc::new(move || weak.upgrade().map(|s| s.build()))
    };
    let (api_stop_tx, api_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let api_server = api::serve_until(
        &config.api_socket,
        status_fn,
        datapath.as_ref().map(|d| d.flows()),
        local_source.as_ref().map(|_| api::CniBackend {
            attachments: cni_attachments,
            ready: endpoint_ready(state.clone(), datapath.clone()),
        }),
        async move {
            let _ = api_stop_rx.await;
        },
    );
    tokio::pin!(api_server);
    let metrics_server = metrics
        .clone()
        .serve_probes(config.metrics_address, synced_rx.clone());

    let mut api_done = false;
    let outcome: anyhow::Result<()> = tokio::select! {
        _ = stop => {
            tracing::info!("stopping");
            Ok(())
        }
        r = &mut api_server => {
            api_done = true;
            r.context("API server")
        }
        r = metrics_server => r.context("metrics server"),
    };

    let shutdown = async {
        // Stop serving first; the socket goes only once nothing is served on it.
        let _ = api_stop_tx.send(());
        if !api_done && let Err(e) = api_server.await {
            tracing::warn!(error = %e, "API server while stopping");
        }
        drop(status);
        let _ = cluster_publisher_stop.send(true);
        if let Some(mut task) = cluster_publisher {
            let _ = (&mut task.0).await;
        }
        sync_signal.stop().await;
        publisher.abort();
        let _ = publisher.await;
        if let Some(tasks) = endpoints {
            crate::task::stop_all(tasks).await;
        }
        crate::task::stop_all(health).await;
        match Arc::try_unwrap(mesh) {
            Ok(mesh) => mesh.stop().await,
            Err(_) => tracing::warn!("the mesh is still referenced while stopping"),
        }
        drop(local_watch);
        // The datapath's reconcilers stop; its pinned maps and links stay attached, and so
        // do the routes: traffic flows on until the next agent adopts them.
        if let Some(agent) = datapath.and_then(|d| Arc::try_unwrap(d).ok()) {
            agent.stop().await;
        }
        if let Some(agent) = encryption.and_then(|e| Arc::try_unwrap(e).ok()) {
            agent.stop().await;
        }
        drop(local_source);
    };
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(crate::constants::SHUTDOWN_TIMEOUT, shutdown).await {
        Ok(()) => tracing::info!(elapsed = ?started.elapsed(), "stopped"),
        Err(_) => tracing::warn!(
            timeout = ?crate::constants::SHUTDOWN_TIMEOUT,
            "shutdown did not finish in time; exiting anyway"
        ),
    }
    outcome
}
