//! Identity allocation with Cilium's kvstore allocator semantics, so identities allocated by
//! strait agents and Cilium agents of one cluster share one numbering:
//! - master key `cilium/state/identities/v1/id/<n>` = the sorted label list, created with a
//!   create-only transaction and no lease (it outlives any one agent);
//! - per-node reference `cilium/state/identities/v1/value/<labels>/<node>` = `<n>`, attached
//!   to the node's lease, so a vanished node's references expire.
//!
//! An existing ID for the same labels is reused; new IDs come from the local cluster's range
//! and carry the cluster label. Nodes allocating the same new labels concurrently settle on
//! the master key created first.

use std::time::Duration;

use crate::{
    identity::{
        IdentityRange,
        labels::{LABEL_SOURCE_K8S, Label, LabelArray, POLICY_LABEL_CLUSTER},
    },
    kvstore::{EtcdClient, KvstoreError, Lease},
    wire::keys::{IDENTITIES_PATH, IDENTITY_ID_SEGMENT, IDENTITY_VALUE_SEGMENT},
};

#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    #[error(transparent)]
    Kvstore(#[from] KvstoreError),
    #[error("no free identity in range {0}")]
    Exhausted(IdentityRange),
    #[error("labels {labels} belong to cluster {found}, not {expected}")]
    ForeignCluster {
        labels: String,
        found: String,
        expected: String,
    },
}

pub struct IdentityAllocator {
    client: EtcdClient,
    cluster: String,
    range: IdentityRange,
    /// Node part of the reference keys.
    node: String,
    lease: Lease,
}

fn id_key(id: u32) -> String {
    format!("{IDENTITIES_PATH}/{IDENTITY_ID_SEGMENT}/{id}")
}

fn value_prefix(labels: &str) -> String {
    format!("{IDENTITIES_PATH}/{IDENTITY_VALUE_SEGMENT}/{labels}/")
}

impl IdentityAllocator {
    /// An allocator for `node` of `cluster`, whose references live on a lease of `ttl`.
    pub async fn new(
        client: EtcdClient,
        cluster: &str,
        range: IdentityRange,
        node: &str,
        ttl: Duration,
    ) -> Result<Self, AllocatorError> {
        let lease = Lease::grant(&client, ttl).await?;
        Ok(Self {
            client,
            cluster: cluster.into(),
            range,
            node: node.into(),
            lease,
        })
    }

    /// The labels with this cluster's label set (every pod identity carries it).
    fn with_cluster_label(&self, labels: &LabelArray) -> Result<LabelArray, AllocatorError> {
        if let Some(found) = labels.cluster_name()
            && found != self.cluster
        {
            return Err(AllocatorError::ForeignCluster {
                labels: labels.to_sorted_list(),
                found: found.into(),
                expected: self.cluster.clone(),
            });
        }
        let mut labels = labels.clone();
        labels.insert(Label::new(
            LABEL_SOURCE_K8S,
            POLICY_LABEL_CLUSTER,
            self.cluster.clone(),
        ));
        Ok(labels)
    }

    /// The numeric identity for `labels`: the existing one if any agent allocated it, else a
    /// new one from the cluster's range. Records this node's reference either way.
    pub async fn allocate(&self, labels: &LabelArray) -> Result<u32, AllocatorError> {
        let labels = self.with_cluster_label(labels)?.to_sorted_list();
        let id = match self.existing(&labels).await? {
            Some(id) => id,
            None => self.create(&labels).await?,
        };
        let reference = format!("{}{}", value_prefix(&labels), self.node);
        self.client
            .put(&reference, id.to_string(), Some(self.lease.id()))
            .await?;
        Ok(id)
    }

    /// An ID already allocated for exactly these labels: from another node's reference, or
    /// from a master key whose references are gone.
    async fn existing(&self, labels: &str) -> Result<Option<u32>, AllocatorError> {
        let by_reference = self
            .client
            .list_prefix(&value_prefix(labels))
            .await?
            .into_iter()
            .find_map(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u32>().ok());
        if by_reference.is_some() {
            return Ok(by_reference);
        }
        self.first_master(labels).await
    }

    /// The master key for exactly these labels that was created first (lowest create
    /// revision): the one every node settles on when several were created at once.
    async fn first_master(&self, labels: &str) -> Result<Option<u32>, AllocatorError> {
        let masters = self
            .client
            .list_prefix(&format!("{IDENTITIES_PATH}/{IDENTITY_ID_SEGMENT}/"))
            .await?;
        Ok(masters
            .into_iter()
            .filter(|kv| kv.value == labels.as_bytes())
            .filter_map(|kv| Some((kv.create_revision, kv.key.rsplit('/').next()?.parse().ok()?)))
            .min()
            .map(|(_, id)| id))
    }

    /// Two nodes allocating the same new labels at once both find no identity and claim
    /// different IDs (seen with two replicas of a Deployment starting on two nodes). The
    /// master key created first wins: a node whose claim came later sees the earlier one,
    /// gives its own (not yet referenced) key back and takes the winner; the node that
    /// created first sees no earlier key and keeps its own. Both end up with one ID.
    async fn settle(&self, labels: &str, mine: u32) -> Result<u32, AllocatorError> {
        match self.first_master(labels).await? {
            Some(winner) if winner != mine => {
                self.client.delete(&id_key(mine)).await?;
                tracing::info!(
                    id = winner,
                    released = mine,
                    %labels,
                    "another node allocated these labels concurrently: using its identity"
                );
                Ok(winner)
            }
            _ => Ok(mine),
        }
    }

    /// Claims the lowest free ID of the range with a create-only write; a concurrent claim of
    /// the same ID by another node makes us try the next one.
    async fn create(&self, labels: &str) -> Result<u32, AllocatorError> {
        let used: std::collections::BTreeSet<u32> = self
            .client
            .list_prefix(&format!("{IDENTITIES_PATH}/{IDENTITY_ID_SEGMENT}/"))
            .await?
            .into_iter()
            .filter_map(|kv| kv.key.rsplit('/').next()?.parse().ok())
            .collect();
        for id in (self.range.min..=self.range.max).filter(|id| !used.contains(id)) {
            if self
                .client
                .create_only(&id_key(id), labels.as_bytes().to_vec(), None)
                .await?
            {
                let id = self.settle(labels, id).await?;
                tracing::info!(id, %labels, "allocated identity");
                return Ok(id);
            }
        }
        Err(AllocatorError::Exhausted(self.range))
    }

    /// Drops this node's reference; when no node references the identity any more, its master
    /// key goes too. (Cilium leaves that to the operator's GC; a concurrent allocation that
    /// loses this race simply creates the key again.)
    pub async fn release(&self, labels: &LabelArray) -> Result<(), AllocatorError> {
        let labels = self.with_cluster_label(labels)?.to_sorted_list();
        let prefix = value_prefix(&labels);
        let Some(id) = self
            .client
            .get(&format!("{prefix}{}", self.node))
            .await?
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u32>().ok())
        else {
            return Ok(());
        };
        self.client
            .delete(&format!("{prefix}{}", self.node))
            .await?;
        if self.client.list_prefix(&prefix).await?.is_empty() {
            self.client.delete(&id_key(id)).await?;
            tracing::info!(id, %labels, "released identity");
        }
        Ok(())
    }
}
