//! Identity allocation with Cilium's kvstore allocator protocol (behaviour reference §5), so
//! identities allocated by strait agents and Cilium agents of one cluster share one numbering:
//! - master key `cilium/state/identities/v1/id/<n>` = the sorted label list, created with a
//!   create-only transaction and no lease; agents never delete it (the GC of
//!   `strait kvstoremesh`, or Cilium's operator, does);
//! - per-node reference `cilium/state/identities/v1/value/<labels>/<suffix>` = `<n>`, on the
//!   node's lease, so a vanished node's references expire;
//! - allocation of a label set happens under the etcd lock `…/locks/<labels>` (on a 25 s lock
//!   lease), so concurrent allocators agree on one ID.
//!
//! Local users are counted per label set: the first takes the reference, the last drops it.
//! [`IdentityAllocator::run`] keeps what is in use in etcd: a lost lease is replaced and every
//! reference written again, a master key deleted while in use is created again (master-key
//! protection), and every [`IDENTITY_SYNC_INTERVAL`] both are checked.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{BuildHasher, RandomState},
    time::Duration,
};

use crate::{
    constants::{
        IDENTITY_ALLOC_ATTEMPTS, IDENTITY_SYNC_INTERVAL, LOCK_LEASE_TTL, LOCK_WAIT_TIMEOUT,
    },
    identity::{
        IdentityRange,
        labels::{LABEL_SOURCE_K8S, Label, LabelArray, POLICY_LABEL_CLUSTER},
    },
    kvstore::{
        Backoff, EtcdClient, KvLock, KvstoreError, Lease, LeaseState, ListWatcher, WatchEvent,
    },
    wire::keys,
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
    #[error("reference suffix {0:?} must be non-empty and hold no '/'")]
    BadSuffix(String),
}

/// One label set in use on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LocalKey {
    id: u32,
    users: usize,
}

struct Inner {
    /// The lease of this node's references.
    lease: Lease,
    /// The lease under allocation locks (Cilium's lock session).
    lock_lease: Option<Lease>,
    /// Label sets (sorted lists) in use here.
    local: BTreeMap<String, LocalKey>,
    /// References whose delete failed: retried by [`IdentityAllocator::run`].
    unreleased: BTreeSet<String>,
}

pub struct IdentityAllocator {
    client: EtcdClient,
    cluster: String,
    range: IdentityRange,
    /// Last segment of this node's reference keys (Cilium: the node's IP).
    suffix: String,
    ttl: Duration,
    inner: tokio::sync::Mutex<Inner>,
}

impl IdentityAllocator {
    /// An allocator for the node whose references end in `suffix`, in `cluster`, its
    /// references on a lease of `ttl`.
    pub async fn new(
        client: EtcdClient,
        cluster: &str,
        range: IdentityRange,
        suffix: &str,
        ttl: Duration,
    ) -> Result<Self, AllocatorError> {
        if suffix.is_empty() || suffix.contains('/') {
            return Err(AllocatorError::BadSuffix(suffix.into()));
        }
        let lease = Lease::grant(&client, ttl).await?;
        Ok(Self {
            client,
            cluster: cluster.into(),
            range,
            suffix: suffix.into(),
            ttl,
            inner: tokio::sync::Mutex::new(Inner {
                lease,
                lock_lease: None,
                local: BTreeMap::new(),
                unreleased: BTreeSet::new(),
            }),
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

    /// The numeric identity for `labels`, counting one more local user: the existing one if
    /// any agent allocated it, else a new one from the cluster's range. Every successful call
    /// must be paired with one [`IdentityAllocator::release`].
    pub async fn allocate(&self, labels: &LabelArray) -> Result<u32, AllocatorError> {
        let key = self.with_cluster_label(labels)?.to_sorted_list();
        let mut inner = self.inner.lock().await;
        if let Some(local) = inner.local.get_mut(&key) {
            local.users += 1;
            return Ok(local.id);
        }
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut attempt = 1;
        let id = loop {
            match self.locked_allocate(&mut inner, &key).await {
                Ok(id) => break id,
                Err(e @ AllocatorError::Exhausted(_)) => return Err(e),
                Err(e) if attempt >= IDENTITY_ALLOC_ATTEMPTS => return Err(e),
                Err(e) => {
                    tracing::debug!(labels = %key, attempt, error = %e, "identity allocation failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        inner
            .unreleased
            .remove(&keys::identity_value_key(&key, &self.suffix));
        inner.local.insert(key, LocalKey { id, users: 1 });
        Ok(id)
    }

    /// One attempt: takes the label set's lock, reuses the ID a master key or a reference
    /// holds, or claims a free one, and writes this node's reference.
    async fn locked_allocate(&self, inner: &mut Inner, key: &str) -> Result<u32, AllocatorError> {
        if !inner.lease.is_alive() {
            self.renew(inner).await?;
        }
        let lock_lease = match &inner.lock_lease {
            Some(l) if l.is_alive() => l.id(),
            _ => {
                let lease = Lease::grant(&self.client, LOCK_LEASE_TTL).await?;
                let id = lease.id();
                inner.lock_lease = Some(lease);
                id
            }
        };
        let lock = match KvLock::acquire(
            &self.client,
            &keys::identity_lock_path(key),
            lock_lease,
            LOCK_WAIT_TIMEOUT,
        )
        .await
        {
            Ok(lock) => lock,
            Err(e) => {
                // Perhaps the lock lease is gone (etcd restarted) before its keepalive noticed.
                inner.lock_lease = None;
                return Err(e.into());
            }
        };
        let result = self.allocate_under(&lock, inner.lease.id(), key).await;
        if let Err(e) = lock.unlock().await {
            tracing::debug!(labels = %key, error = %e, "releasing the allocation lock (it expires with its lease)");
        }
        result
    }

    async fn allocate_under(
        &self,
        lock: &KvLock,
        lease: i64,
        key: &str,
    ) -> Result<u32, AllocatorError> {
        let masters = self.client.list_prefix(&keys::identity_id_prefix()).await?;
        // The master created first for these labels: the one every node settles on.
        let by_master = masters
            .iter()
            .filter(|kv| kv.value == key.as_bytes())
            .filter_map(|kv| Some((kv.create_revision, keys::parse_identity_id_key(&kv.key)?)))
            .min()
            .map(|(_, id)| id);
        let id = match by_master {
            Some(id) => id,
            None => match self.by_reference(key).await? {
                // Referenced but its master vanished: create it again.
                Some(id)
                    if lock
                        .create_only(&keys::identity_id_key(id), key, None)
                        .await? =>
                {
                    tracing::warn!(id, labels = %key, "master key of a referenced identity was missing: created again");
                    id
                }
                _ => self.claim(lock, key, &masters).await?,
            },
        };
        lock.put(
            &keys::identity_value_key(key, &self.suffix),
            id.to_string(),
            Some(lease),
        )
        .await?;
        Ok(id)
    }

    /// An ID another node's reference holds for exactly these labels.
    async fn by_reference(&self, key: &str) -> Result<Option<u32>, AllocatorError> {
        Ok(self
            .client
            .list_prefix(&keys::identity_value_prefix(key))
            .await?
            .into_iter()
            .filter(|kv| keys::identity_value_belongs_to(key, &kv.key))
            .find_map(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u32>().ok()))
    }

    /// Claims a free ID of the range, starting at a random one (as Cilium's ID pool does, so
    /// nodes allocating different labels at once rarely try the same ID).
    async fn claim(
        &self,
        lock: &KvLock,
        key: &str,
        masters: &[crate::kvstore::KeyValue],
    ) -> Result<u32, AllocatorError> {
        let used: BTreeSet<u32> = masters
            .iter()
            .filter_map(|kv| keys::parse_identity_id_key(&kv.key))
            .collect();
        let size = u64::from(self.range.max - self.range.min) + 1;
        let start = RandomState::new().hash_one(key) % size;
        for offset in 0..size {
            let id = self.range.min + ((start + offset) % size) as u32;
            if used.contains(&id) {
                continue;
            }
            if lock
                .create_only(&keys::identity_id_key(id), key, None)
                .await?
            {
                tracing::info!(id, labels = %key, "allocated identity");
                return Ok(id);
            }
        }
        Err(AllocatorError::Exhausted(self.range))
    }

    /// Counts one local user of `labels` less; the last one drops this node's reference.
    /// Master keys stay (the GC removes unreferenced ones).
    pub async fn release(&self, labels: &LabelArray) -> Result<(), AllocatorError> {
        let key = self.with_cluster_label(labels)?.to_sorted_list();
        let mut inner = self.inner.lock().await;
        let Some(local) = inner.local.get_mut(&key) else {
            return Ok(());
        };
        local.users -= 1;
        if local.users > 0 {
            return Ok(());
        }
        let id = local.id;
        inner.local.remove(&key);
        let reference = keys::identity_value_key(&key, &self.suffix);
        match self.client.delete(&reference).await {
            Ok(_) => {
                tracing::info!(id, labels = %key, "identity no longer used on this node");
                Ok(())
            }
            Err(e) => {
                inner.unreleased.insert(reference);
                Err(e.into())
            }
        }
    }

    /// The identities in use here: sorted labels → (ID, local users).
    pub async fn in_use(&self) -> BTreeMap<String, (u32, usize)> {
        self.inner
            .lock()
            .await
            .local
            .iter()
            .map(|(k, l)| (k.clone(), (l.id, l.users)))
            .collect()
    }

    /// A new reference lease, with every reference (and missing master) written again.
    async fn renew(&self, inner: &mut Inner) -> Result<usize, AllocatorError> {
        let lease = Lease::grant(&self.client, self.ttl).await?;
        for (key, local) in &inner.local {
            self.ensure_master(local.id, key).await?;
            self.client
                .put(
                    &keys::identity_value_key(key, &self.suffix),
                    local.id.to_string(),
                    Some(lease.id()),
                )
                .await?;
        }
        inner.lease = lease;
        Ok(inner.local.len())
    }

    /// Creates the master key of `id` unless it exists (Cilium's `UpdateKey`).
    async fn ensure_master(&self, id: u32, key: &str) -> Result<(), AllocatorError> {
        if self
            .client
            .create_only(&keys::identity_id_key(id), key, None)
            .await?
        {
            tracing::warn!(id, labels = %key, "master key of an identity in use was missing: created again");
        } else if let Some(kv) = self.client.get(&keys::identity_id_key(id)).await?
            && kv.value != key.as_bytes()
        {
            tracing::error!(
                id,
                labels = %key,
                found = %String::from_utf8_lossy(&kv.value),
                "the master key of an identity in use holds other labels"
            );
        }
        Ok(())
    }

    /// The periodic check: masters of used identities exist, references are on the current
    /// lease, failed releases are retried.
    async fn sync(&self) -> Result<(), AllocatorError> {
        let mut inner = self.inner.lock().await;
        let lease = inner.lease.id();
        for (key, local) in &inner.local {
            self.ensure_master(local.id, key).await?;
            self.client
                .update_if_different(
                    &keys::identity_value_key(key, &self.suffix),
                    local.id.to_string(),
                    Some(lease),
                )
                .await?;
        }
        let pending: Vec<String> = inner.unreleased.iter().cloned().collect();
        for reference in pending {
            self.client.delete(&reference).await?;
            inner.unreleased.remove(&reference);
        }
        Ok(())
    }

    /// Master-key protection: a master key of an identity in use was deleted.
    async fn master_deleted(&self, master: &str) -> Result<(), AllocatorError> {
        let Some(id) = keys::parse_identity_id_key(master) else {
            return Ok(());
        };
        let inner = self.inner.lock().await;
        for (key, _) in inner.local.iter().filter(|(_, l)| l.id == id) {
            self.ensure_master(id, key).await?;
        }
        Ok(())
    }

    /// Keeps the identities in use in etcd; runs until dropped.
    pub async fn run(&self) {
        let (_watcher, mut masters) =
            ListWatcher::spawn(self.client.clone(), keys::identity_id_prefix());
        let mut tick = tokio::time::interval(IDENTITY_SYNC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            let mut lease = self.inner.lock().await.lease.subscribe();
            let result = tokio::select! {
                // (The guard `wait_for` returns is not Send: dropped inside.)
                _ = async { lease.wait_for(|s| *s != LeaseState::Alive).await.is_ok() } => {
                    let mut inner = self.inner.lock().await;
                    if inner.lease.is_alive() {
                        // An allocation replaced it meanwhile.
                        Ok(())
                    } else {
                        self.renew(&mut inner).await.map(|n| {
                            tracing::warn!(identities = n, "identity lease lost: references written again");
                        })
                    }
                }
                event = masters.recv() => match event {
                    Some(WatchEvent::Delete { key }) => self.master_deleted(&key).await,
                    Some(_) => Ok(()),
                    None => return,
                },
                _ = tick.tick() => self.sync().await,
            };
            match result {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(error = %e, "keeping identities in etcd failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    // A failed step is redone by the next tick at the latest; try it soon.
                    tick.reset_after(backoff.next_delay());
                }
            }
        }
    }
}
