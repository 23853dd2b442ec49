//! etcd's distributed mutex as Go's `clientv3/concurrency.Mutex` lays it out on the wire (what
//! Cilium's kvstore locks are): the holder's key is `<path>/<lease hex>` on the caller's lock
//! lease; the owner is the key under `<path>/` created first; a waiter watches the deletion of
//! the key created just before its own. Writes "if locked" are transactions that also compare
//! the holder key's create revision, so a lock lost meanwhile (its lease expired) makes them
//! fail instead of racing the next holder.
//!
//! One lease holds at most one lock per path: two local callers locking the same path on the
//! same lease would share the key. Callers serialise their own use (the allocator does).

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};

use super::client::EtcdClient;
use super::error::{KvstoreError, Result};

/// A held lock. Dropping it without [`KvLock::unlock`] leaves the key until its lease ends.
#[derive(Debug)]
pub struct KvLock {
    client: EtcdClient,
    key: String,
    revision: i64,
}

impl KvLock {
    /// Takes the lock at `path` on `lease`, waiting at most `timeout` for earlier holders;
    /// on timeout our own key is removed again.
    pub async fn acquire(
        client: &EtcdClient,
        path: &str,
        lease: i64,
        timeout: Duration,
    ) -> Result<Self> {
        let prefix = format!("{}/", path.trim_end_matches('/'));
        let key = format!("{prefix}{lease:x}");
        let first_created = || {
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(1)
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    key.as_str(),
                    Vec::new(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::get(prefix.as_str(), Some(first_created())),
            ])
            .or_else([
                TxnOp::get(key.as_str(), None),
                TxnOp::get(prefix.as_str(), Some(first_created())),
            ]);
        let mut kv = client.raw().kv_client();
        let resp = client.call("lock", &key, kv.txn(txn)).await?;
        let ranges: Vec<etcd_client::GetResponse> = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => Some(g),
                _ => None,
            })
            .collect();
        let revision = if resp.succeeded() {
            resp.header().map_or(0, |h| h.revision())
        } else {
            ranges
                .first()
                .and_then(|g| g.kvs().first())
                .map_or(0, |kv| kv.create_revision())
        };
        let owner = ranges
            .last()
            .and_then(|g| g.kvs().first())
            .map(|kv| kv.create_revision());
        let lock = Self {
            client: client.clone(),
            key,
            revision,
        };
        if owner.is_none_or(|rev| rev == revision) {
            return Ok(lock);
        }
        match tokio::time::timeout(timeout, lock.wait_earlier(&prefix)).await {
            Ok(Ok(())) => Ok(lock),
            Ok(Err(e)) => {
                let _ = lock.unlock().await;
                Err(e)
            }
            Err(_) => {
                let key = lock.key.clone();
                let _ = lock.unlock().await;
                Err(KvstoreError::Timeout {
                    op: "lock",
                    key,
                    endpoints: client.endpoints().into(),
                    timeout,
                })
            }
        }
    }

    /// Waits until every key under `prefix` created before ours is gone (`waitDeletes`).
    async fn wait_earlier(&self, prefix: &str) -> Result<()> {
        loop {
            let opts = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(self.revision - 1)
                .with_limit(1);
            let mut kv = self.client.raw().kv_client();
            let resp = self
                .client
                .call("lock-wait", prefix, kv.get(prefix, Some(opts)))
                .await?;
            let Some(earlier) = resp.kvs().first() else {
                return Ok(());
            };
            let key = String::from_utf8_lossy(earlier.key()).into_owned();
            let from = resp.header().map_or(0, |h| h.revision()) + 1;
            self.wait_deleted(&key, from).await?;
        }
    }

    async fn wait_deleted(&self, key: &str, from: i64) -> Result<()> {
        let mut stream = self.client.watch_key(key, from).await?;
        loop {
            let msg = stream.message().await.map_err(|e| KvstoreError::Request {
                op: "lock-wait",
                key: key.into(),
                endpoints: self.client.endpoints().into(),
                reason: super::client::describe(&e),
            })?;
            let Some(resp) = msg else {
                // Stream ended: check again from the top.
                return Ok(());
            };
            if resp.canceled() {
                return Ok(());
            }
            // A DELETE carries version 0.
            if resp
                .events()
                .iter()
                .any(|ev| ev.kv().is_some_and(|kv| kv.version() == 0))
            {
                return Ok(());
            }
        }
    }

    /// The holder key (`<path>/<lease hex>`).
    pub fn key(&self) -> &str {
        &self.key
    }

    fn owned(&self) -> Compare {
        Compare::create_revision(self.key.as_str(), CompareOp::Equal, self.revision)
    }

    /// Runs `ops` if the lock is still held and `cmp` holds; `Ok(false)` when `cmp` failed,
    /// [`KvstoreError::LockLost`] when the lock is gone.
    async fn txn_if_locked(
        &self,
        op: &'static str,
        key: &str,
        cmp: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<bool> {
        let mut when = cmp;
        when.push(self.owned());
        let txn = Txn::new().when(when).and_then(ops);
        let mut kv = self.client.raw().kv_client();
        let resp = self.client.call(op, key, kv.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(true);
        }
        match self.client.get(&self.key).await? {
            Some(kv) if kv.create_revision == self.revision => Ok(false),
            _ => Err(KvstoreError::LockLost {
                key: self.key.clone(),
            }),
        }
    }

    /// `CreateOnlyIfLocked`: creates `key` unless it exists; returns whether it was created.
    pub async fn create_only(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<i64>,
    ) -> Result<bool> {
        self.txn_if_locked(
            "create-only-if-locked",
            key,
            vec![Compare::version(key, CompareOp::Equal, 0)],
            vec![TxnOp::put(
                key,
                value,
                lease.map(|l| PutOptions::new().with_lease(l)),
            )],
        )
        .await
    }

    /// `UpdateIfLocked`: writes `key`.
    pub async fn put(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<i64>,
    ) -> Result<()> {
        self.txn_if_locked(
            "put-if-locked",
            key,
            Vec::new(),
            vec![TxnOp::put(
                key,
                value,
                lease.map(|l| PutOptions::new().with_lease(l)),
            )],
        )
        .await
        .map(|_| ())
    }

    /// `DeleteIfLocked` with Cilium's GC condition: deletes `key` only if its mod revision is
    /// still `mod_revision`; returns whether it was deleted.
    pub async fn delete_if_unchanged(&self, key: &str, mod_revision: i64) -> Result<bool> {
        self.txn_if_locked(
            "delete-if-locked",
            key,
            vec![Compare::mod_revision(key, CompareOp::Equal, mod_revision)],
            vec![TxnOp::delete(key, None)],
        )
        .await
    }

    /// Releases the lock (deletes the holder key).
    pub async fn unlock(self) -> Result<()> {
        self.client.delete(&self.key).await.map(|_| ())
    }
}
