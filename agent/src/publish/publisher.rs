//! Publishing this agent's own node to its cluster's kvstore (Cilium's kvstore mode), with a
//! lease kept alive so the entry disappears when the agent is gone for good, and re-asserted
//! whenever the lease is lost (etcd restart, network partition).

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;

use crate::kvstore::{Backoff, EtcdClient, Lease};
use crate::wire::{self, KvNode, NodeAddress, keys};

/// Annotation Cilium puts the WireGuard public key in.
pub const WG_PUBKEY_ANNOTATION: &str = "network.cilium.io/wg-pub-key";

/// Cilium's EncryptionKey for WireGuard-encrypted nodes.
pub const WIREGUARD_ENCRYPTION_KEY: u8 = 255;

/// What the agent publishes about its node.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub cluster: String,
    pub cluster_id: u32,
    pub name: String,
    pub internal_ip: IpAddr,
    pub pod_cidrs: Vec<IpNet>,
    pub wireguard_pubkey: Option<String>,
}

impl LocalNode {
    /// The node value, as a Cilium agent in kvstore mode writes it.
    pub fn to_wire(&self) -> KvNode {
        let mut node = KvNode::new(&self.cluster, &self.name);
        node.cluster_id = self.cluster_id;
        node.source = "local".into();
        node.ip_addresses = vec![NodeAddress::new("InternalIP", self.internal_ip)];
        let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = self
            .pod_cidrs
            .iter()
            .partition(|c| matches!(c, IpNet::V4(_)));
        node.ipv4_alloc_cidr = v4.first().copied();
        node.ipv4_secondary_alloc_cidrs = v4.iter().skip(1).copied().collect();
        node.ipv6_alloc_cidr = v6.first().copied();
        node.ipv6_secondary_alloc_cidrs = v6.iter().skip(1).copied().collect();
        if let Some(key) = &self.wireguard_pubkey {
            node.wireguard_pub_key = key.clone();
            node.encryption_key = WIREGUARD_ENCRYPTION_KEY;
            node.annotations
                .insert(WG_PUBKEY_ANNOTATION.into(), key.clone());
        }
        node
    }

    pub fn key(&self) -> String {
        keys::node_key(&self.cluster, &self.name)
    }
}

/// Keeps the node published until the future is dropped.
pub async fn publish_node(client: EtcdClient, node: LocalNode, ttl: Duration) {
    let key = node.key();
    let value = match node.to_wire().encode() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(%key, error = %e, "cannot encode the local node; not publishing it");
            return;
        }
    };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        let lease = match Lease::grant(&client, ttl).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot grant a lease for the local node; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        match client.put(&key, value.clone(), Some(lease.id())).await {
            Ok(_) => {
                backoff.reset();
                tracing::info!(%key, "published the local node");
                let state = lease.wait_lost().await;
                tracing::warn!(%key, ?state, "lease of the local node lost; publishing again");
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot publish the local node; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Publishes this node's endpoints to `cilium/state/ip/v1/default/<ip>` (Cilium's kvstore
/// mode), each attached to one lease; when the lease is lost every entry is written again
/// under a new one.
pub struct EndpointPublisher {
    client: EtcdClient,
    node: LocalNode,
    ttl: Duration,
    inner: tokio::sync::Mutex<Published>,
}

struct Published {
    lease: Lease,
    entries: std::collections::BTreeMap<String, Vec<u8>>,
}

/// One local endpoint as the publisher writes it.
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    pub ip: IpAddr,
    pub identity: u32,
    pub namespace: String,
    pub pod: String,
    /// Cilium's endpoint ID (goes into the `Metadata` field).
    pub endpoint_id: u64,
}

impl EndpointPublisher {
    pub async fn new(
        client: EtcdClient,
        node: LocalNode,
        ttl: Duration,
    ) -> Result<Self, crate::kvstore::KvstoreError> {
        let lease = Lease::grant(&client, ttl).await?;
        Ok(Self {
            client,
            node,
            ttl,
            inner: tokio::sync::Mutex::new(Published {
                lease,
                entries: Default::default(),
            }),
        })
    }

    fn entry(&self, ep: &LocalEndpoint) -> Result<(String, Vec<u8>), wire::WireError> {
        let key = if self.node.wireguard_pubkey.is_some() {
            WIREGUARD_ENCRYPTION_KEY
        } else {
            0
        };
        let mut pair =
            wire::IpIdentityPair::host(ep.ip, Some(self.node.internal_ip), ep.identity, key);
        pair.metadata =
            wire::ipcache::agent_metadata(&self.node.cluster, &self.node.name, ep.endpoint_id);
        pair.k8s_namespace = ep.namespace.clone();
        pair.k8s_pod_name = ep.pod.clone();
        Ok((keys::ip_key(&pair.prefix_string()), pair.encode()?))
    }

    pub async fn publish(&self, ep: &LocalEndpoint) -> anyhow::Result<()> {
        let (key, value) = self.entry(ep)?;
        let mut inner = self.inner.lock().await;
        self.client
            .put(&key, value.clone(), Some(inner.lease.id()))
            .await?;
        inner.entries.insert(key, value);
        Ok(())
    }

    pub async fn withdraw(&self, ip: IpAddr) -> anyhow::Result<()> {
        let key = keys::ip_key(&ip.to_string());
        let mut inner = self.inner.lock().await;
        inner.entries.remove(&key);
        self.client.delete(&key).await?;
        Ok(())
    }

    /// Re-publishes everything whenever the lease is lost; runs until dropped.
    pub async fn keep_published(&self) {
        loop {
            let mut lost = self.inner.lock().await.lease.subscribe();
            let _ = lost
                .wait_for(|s| !matches!(s, crate::kvstore::LeaseState::Alive))
                .await;
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
            loop {
                match self.republish().await {
                    Ok(n) => {
                        tracing::warn!(
                            entries = n,
                            "endpoint lease lost: endpoints published again"
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot publish endpoints again; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
    }

    async fn republish(&self) -> Result<usize, crate::kvstore::KvstoreError> {
        let lease = Lease::grant(&self.client, self.ttl).await?;
        let mut inner = self.inner.lock().await;
        for (key, value) in &inner.entries {
            self.client
                .put(key, value.clone(), Some(lease.id()))
                .await?;
        }
        inner.lease = lease;
        Ok(inner.entries.len())
    }
}
