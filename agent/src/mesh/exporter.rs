//! The cluster publisher: what a clustermesh-apiserver publishes for its own cluster, so other
//! clusters can read this cluster's etcd directly (no mirror needed) or mirror it:
//! `cilium/cluster-config/<cluster>` (written first, re-enforced periodically), the heartbeat,
//! and the global services at `cilium/state/services/v1/<cluster>/<ns>/<name>`. Exactly one
//! writer per cluster: every candidate (every `strait agent` with a local source, and `strait
//! kvstoremesh` replicas given a service source) campaigns in one etcd election; only the
//! leader writes, everything on its lease. Only services that are global and shared are
//! exported; the others are deleted.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{LeaderKey, ResignOptions};
use tokio::sync::watch;

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
    format!("{}/{cluster}", keys::PUBLISHER_ELECTION_PREFIX)
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

/// Why a leadership ended.
enum Ended {
    /// The lease (and with it the leadership) was lost: campaign again.
    Lost,
    /// Asked to stop: resigned and revoked.
    Stopped,
}

/// Runs until `stop` turns true (or the task is dropped): waits for the Kubernetes source to
/// have listed (`source_synced`), so a fresh leader never withdraws exports it has not read
/// yet; then campaigns, and while leader keeps this cluster's config and heartbeat published
/// and the exported set equal to the local global services; campaigns again if the lease is lost. On `stop` it resigns and revokes its lease,
/// so a standby takes over at once instead of waiting out the TTL (a crash costs at most
/// `lease_ttl`).
pub async fn run(
    local: EtcdClient,
    publication: Publication,
    identity: String,
    state: StateHandle,
    lease_ttl: Duration,
    mut source_synced: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let cluster = publication.cluster.clone();
    tokio::select! {
        r = source_synced.wait_for(|s| *s) => if r.is_err() {
            tracing::warn!(%cluster, "the Kubernetes source stopped before it synced: not exporting");
            return;
        },
        _ = stop.wait_for(|s| *s) => return,
    }
    tracing::info!(%cluster, %identity, "Kubernetes source synced: campaigning for the service export");
    loop {
        match lead(
            &local,
            &publication,
            &identity,
            &state,
            lease_ttl,
            &mut stop,
        )
        .await
        {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Lost) => {
                tracing::warn!(%cluster, "service exporter lost its leadership; campaigning again")
            }
            Err(e) => {
                tracing::warn!(%cluster, error = %e, "service exporter failed; campaigning again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

/// Gives the leadership up: resign (the next campaigner is elected now), then revoke the
/// lease (what is still bound to it goes; the successor rewrites the exports on its own).
async fn step_down(local: &EtcdClient, cluster: &str, leader: Option<LeaderKey>, lease: Lease) {
    if let Some(key) = leader
        && let Err(e) = local
            .raw()
            .election_client()
            .resign(Some(ResignOptions::new().with_leader(key)))
            .await
    {
        tracing::warn!(%cluster, error = %e, "service exporter could not resign");
    }
    if let Err(e) = lease.close().await {
        tracing::warn!(%cluster, error = %e, "service exporter could not revoke its lease");
    }
    tracing::info!(%cluster, "service exporter stepped down");
}

async fn lead(
    local: &EtcdClient,
    publication: &Publication,
    identity: &str,
    state: &StateHandle,
    ttl: Duration,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Ended> {
    enum Campaign {
        Won(Option<LeaderKey>),
        Lost,
        Stop,
    }
    let cluster = publication.cluster.as_str();
    let config = publication.config().encode()?;
    let config_key = keys::cluster_config_key(cluster);
    let lease = Lease::grant(local, ttl).await?;
    // Blocks until elected (no request timeout: waiting is the point).
    let outcome = {
        let mut election = local.raw().election_client();
        let campaign = election.campaign(election_name(cluster), identity, lease.id());
        tokio::select! {
            r = campaign => Campaign::Won(r?.leader().cloned()),
            _ = lease.wait_lost() => Campaign::Lost,
            _ = stop.wait_for(|s| *s) => Campaign::Stop,
        }
    };
    let leader = match outcome {
        Campaign::Won(leader) => leader,
        Campaign::Lost => return Ok(Ended::Lost),
        Campaign::Stop => {
            // A standby's campaign key is bound to the lease: revoking withdraws it.
            step_down(local, cluster, None, lease).await;
            return Ok(Ended::Stopped);
        }
    };
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
        enum Next {
            Changed(Result<(), watch::error::RecvError>),
            Lost,
            Stop,
            Enforce,
        }
        let next = tokio::select! {
            changed = changes.changed() => Next::Changed(changed),
            _ = lease.wait_lost() => Next::Lost,
            _ = stop.wait_for(|s| *s) => Next::Stop,
            // Cilium's EnforceClusterConfig: put back what someone deleted or changed.
            _ = enforce.tick() => Next::Enforce,
        };
        match next {
            Next::Changed(r) => r?,
            Next::Lost => return Ok(Ended::Lost),
            Next::Enforce => {
                local
                    .put(&config_key, config.clone(), Some(lease.id()))
                    .await?;
            }
            Next::Stop => {
                step_down(local, cluster, leader, lease).await;
                return Ok(Ended::Stopped);
            }
        }
    }
}
