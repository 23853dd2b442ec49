//! The cluster publisher: what a clustermesh-apiserver publishes for its own cluster, so other
//! clusters can read this cluster's etcd directly (no mirror needed) or mirror it:
//! `cilium/cluster-config/<cluster>` (written first, re-enforced periodically), the heartbeat,
//! and the global services at `cilium/state/services/v1/<cluster>/<ns>/<name>`. Exactly one
//! writer per cluster: every candidate (every `strait agent` with a local source, and `strait
//! kvstoremesh` replicas given a service source) campaigns in one etcd election; only the
//! leader writes, everything on its lease. Only services that are global and shared are
//! exported; the others are deleted.

use std::{collections::BTreeMap, time::Duration};

use crate::wire::{KvClusterConfig, KvClusterService, L4Addr, keys};
use crate::{
    constants::CLUSTER_CONFIG_ENFORCE_INTERVAL,
    kvstore::{EtcdClient, HeartbeatWriter, Lease},
    state::{BackendState, ClusterService, PortMap, Protocol, StateHandle},
};

/// What the leader publishes about its cluster besides the services.
#[derive(Debug, Clone)]
pub struct Publication {
    pub cluster: String,
    pub cluster_id: u32,
    /// 255 or 511.
    pub max_connected_clusters: u32,
}

impl Publication {
    /// This cluster's config as a clustermesh-apiserver writes it, except `syncedCanaries`:
    /// every agent publishes its own node and endpoints (Cilium's kvstore mode), so no single
    /// writer can announce "synced".
    pub fn config(&self) -> KvClusterConfig {
        let mut config =
            KvClusterConfig::for_publisher(self.cluster_id, self.max_connected_clusters, false);
        config.capabilities.synced_canaries = false;
        config
    }
}

/// The election every cluster publisher of a cluster campaigns in (the name predates the
/// cluster config: kept so older exporters and newer publishers share one election).
pub fn election_name(cluster: &str) -> String {
    format!("cilium/.strait/service-exporter/{cluster}")
}

/// The wire value Cilium's exporter writes: frontends with the service ports, backends that
/// are ready or serving with the endpoint ports, `shared` and `includeExternal` true.
pub fn wire_service(svc: &ClusterService) -> KvClusterService {
    let ports = |p: &PortMap| -> BTreeMap<String, L4Addr> {
        p.iter()
            .map(|(name, (proto, port))| {
                let proto = match proto {
                    Protocol::Tcp => "TCP",
                    Protocol::Udp => "UDP",
                    Protocol::Sctp => "SCTP",
                };
                (name.clone(), L4Addr::new(proto, *port))
            })
            .collect()
    };
    let mut wire = KvClusterService::new(
        &svc.cluster,
        &svc.name.namespace,
        &svc.name.name,
        svc.cluster_id,
    );
    wire.frontends = svc
        .frontends
        .iter()
        .map(|(ip, p)| (ip.to_string(), ports(p)))
        .collect();
    wire.backends = svc
        .backends
        .iter()
        .filter(|b| matches!(b.state, BackendState::Active | BackendState::Terminating))
        .map(|b| (b.ip.to_string(), ports(&b.ports)))
        .collect();
    wire.include_external = true;
    wire.shared = true;
    wire
}

/// Runs until dropped: campaign, then, while leader, keep this cluster's config and
/// heartbeat published and the exported set equal to the local global services; campaign
/// again if the lease (and with it the leadership) is lost.
pub async fn run(
    local: EtcdClient,
    publication: Publication,
    identity: String,
    state: StateHandle,
    lease_ttl: Duration,
) {
    let cluster = publication.cluster.clone();
    loop {
        match lead(&local, &publication, &identity, &state, lease_ttl).await {
            Ok(()) => {
                tracing::warn!(%cluster, "service exporter lost its leadership; campaigning again")
            }
            Err(e) => {
                tracing::warn!(%cluster, error = %e, "service exporter failed; campaigning again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn lead(
    local: &EtcdClient,
    publication: &Publication,
    identity: &str,
    state: &StateHandle,
    ttl: Duration,
) -> anyhow::Result<()> {
    let cluster = publication.cluster.as_str();
    let config = publication.config().encode()?;
    let config_key = keys::cluster_config_key(cluster);
    let lease = Lease::grant(local, ttl).await?;
    // Blocks until elected (no request timeout: waiting is the point).
    local
        .raw()
        .election_client()
        .campaign(election_name(cluster), identity, lease.id())
        .await?;
    // The config before any data: readers refuse a cluster without one.
    local
        .put(&config_key, config.clone(), Some(lease.id()))
        .await?;
    let _heartbeat =
        HeartbeatWriter::spawn(local.clone(), Some(lease.id()), Duration::from_secs(60));
    tracing::info!(%cluster, %identity, key = %config_key, "elected: publishing this cluster's config and exporting its global services");
    let mut enforce = tokio::time::interval(CLUSTER_CONFIG_ENFORCE_INTERVAL);
    enforce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    enforce.tick().await;
    let prefix = format!("{}/{cluster}/", keys::SERVICE_STORE_PREFIX);
    let mut exported: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // What an earlier leader left: deleted unless still wanted.
    let mut stale: Vec<String> = local
        .list_prefix(&prefix)
        .await?
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    let mut changes = state.subscribe();
    loop {
        let desired: BTreeMap<String, Vec<u8>> = {
            let model = state.read();
            let local_cluster = model.local_cluster().clone();
            model
                .local_services()
                .filter(|s| s.cluster == local_cluster && s.global && s.shared)
                .filter_map(|s| {
                    let wire = wire_service(s);
                    Some((
                        keys::service_key(cluster, &s.name.namespace, &s.name.name),
                        wire.encode().ok()?,
                    ))
                })
                .collect()
        };
        for (key, value) in &desired {
            if exported.get(key) != Some(value) {
                local.put(key, value.clone(), Some(lease.id())).await?;
            }
        }
        for key in exported
            .keys()
            .chain(stale.iter())
            .filter(|k| !desired.contains_key(*k))
        {
            local.delete(key).await?;
        }
        stale.clear();
        exported = desired;
        tokio::select! {
            changed = changes.changed() => changed?,
            _ = lease.wait_lost() => return Ok(()),
            // Cilium's EnforceClusterConfig: put back what someone deleted or changed.
            _ = enforce.tick() => {
                local.put(&config_key, config.clone(), Some(lease.id())).await?;
            }
        }
    }
}
