//! The identity GC of this cluster's kvstore (what Cilium's operator does in kvstore identity
//! mode, behaviour reference §5): agents never delete master keys, so one elected
//! `strait kvstoremesh` instance removes those nobody references any more.
//!
//! Cilium's rules: only IDs of this cluster's range; per master key the lock
//! `…/locks/id/<n>` is held while its references are listed; "in use" = a reference of exactly
//! these labels whose value is the ID; an unused master is only remembered (with its mod
//! revision) in one round and deleted in the next if its mod revision is unchanged; at most
//! [`IDENTITY_GC_RATE_LIMIT`] deletions per [`IDENTITY_GC_RATE_INTERVAL`]. Lock keys seen with
//! the same mod revision and lease in two consecutive rounds are stale and removed.

use std::{collections::BTreeMap, time::Duration};

use crate::{
    constants::{
        IDENTITY_GC_RATE_INTERVAL, IDENTITY_GC_RATE_LIMIT, LOCK_LEASE_TTL, LOCK_WAIT_TIMEOUT,
    },
    identity::IdentityRange,
    kvstore::{EtcdClient, KvLock, KvstoreError, Lease},
    wire::keys,
};

/// The election every identity GC of a cluster campaigns in.
pub fn election_name(cluster: &str) -> String {
    format!("cilium/.strait/identity-gc/{cluster}")
}

/// What the GC remembers between rounds.
#[derive(Debug, Default, Clone)]
pub struct GcMemory {
    /// Unused master keys seen last round → their mod revision.
    stale_masters: BTreeMap<String, i64>,
    /// Lock keys seen last round → (mod revision, lease).
    locks: BTreeMap<String, (i64, i64)>,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcStats {
    /// Master keys of this cluster's range looked at.
    pub alive: usize,
    /// Unused master keys remembered for the next round.
    pub candidates: usize,
    /// Master keys deleted.
    pub deleted: usize,
    /// Stale lock keys deleted.
    pub locks_deleted: usize,
}

/// Caps deletions per interval.
struct RateLimit {
    window_start: tokio::time::Instant,
    in_window: u32,
    limit: u32,
    interval: Duration,
}

impl RateLimit {
    fn new(limit: u32, interval: Duration) -> Self {
        Self {
            window_start: tokio::time::Instant::now(),
            in_window: 0,
            limit: limit.max(1),
            interval,
        }
    }

    async fn wait(&mut self) {
        if self.window_start.elapsed() >= self.interval {
            self.window_start = tokio::time::Instant::now();
            self.in_window = 0;
        }
        if self.in_window >= self.limit {
            tokio::time::sleep_until(self.window_start + self.interval).await;
            self.window_start = tokio::time::Instant::now();
            self.in_window = 0;
        }
        self.in_window += 1;
    }
}

/// One GC round over the masters of `range`, with the memory of the previous round.
pub async fn gc_round(
    client: &EtcdClient,
    range: IdentityRange,
    lock_lease: i64,
    memory: &mut GcMemory,
) -> Result<GcStats, KvstoreError> {
    let mut rate = RateLimit::new(IDENTITY_GC_RATE_LIMIT, IDENTITY_GC_RATE_INTERVAL);
    let mut stats = GcStats::default();
    let mut stale = BTreeMap::new();
    for master in client.list_prefix(&keys::identity_id_prefix()).await? {
        let Some(id) = keys::parse_identity_id_key(&master.key) else {
            continue;
        };
        if !range.contains(id) || master.value.is_empty() {
            continue;
        }
        stats.alive += 1;
        let labels = String::from_utf8_lossy(&master.value).into_owned();
        let lock = KvLock::acquire(
            client,
            &keys::identity_gc_lock_path(id),
            lock_lease,
            LOCK_WAIT_TIMEOUT,
        )
        .await?;
        let step = async {
            let id_text = id.to_string();
            let in_use = client
                .list_prefix(&keys::identity_value_prefix(&labels))
                .await?
                .iter()
                .any(|r| {
                    keys::identity_value_belongs_to(&labels, &r.key)
                        && r.value == id_text.as_bytes()
                });
            if in_use {
                return Ok(false);
            }
            match memory.stale_masters.get(&master.key) {
                Some(&rev) if rev == master.mod_revision => {
                    rate.wait().await;
                    lock.delete_if_unchanged(&master.key, rev).await
                }
                _ => {
                    stale.insert(master.key.clone(), master.mod_revision);
                    Ok(false)
                }
            }
        };
        let result: Result<bool, KvstoreError> = step.await;
        if let Err(e) = lock.unlock().await {
            tracing::debug!(id, error = %e, "releasing the GC lock (it expires with its lease)");
        }
        if result? {
            stats.deleted += 1;
            tracing::info!(id, %labels, "identity GC: deleted an identity no node references");
        }
    }
    stats.candidates = stale.len();
    memory.stale_masters = stale;
    stats.locks_deleted = gc_locks(client, memory).await?;
    Ok(stats)
}

/// Cilium's `RunLocksGC`: a lock key unchanged (mod revision and lease) since the last round
/// is stuck and removed.
async fn gc_locks(client: &EtcdClient, memory: &mut GcMemory) -> Result<usize, KvstoreError> {
    let mut seen = BTreeMap::new();
    let mut deleted = 0;
    for lock in client.list_prefix(&keys::identity_locks_prefix()).await? {
        let now = (lock.mod_revision, lock.lease);
        if memory.locks.get(&lock.key) == Some(&now) {
            if client.delete(&lock.key).await? {
                deleted += 1;
                tracing::warn!(key = %lock.key, "identity GC: removed a stale lock");
            }
        } else {
            seen.insert(lock.key, now);
        }
    }
    memory.locks = seen;
    Ok(deleted)
}

/// Runs until dropped: campaign; while elected, a GC round every `interval`; campaign again
/// when the leadership lease is lost.
pub async fn run(
    client: EtcdClient,
    cluster: String,
    candidate: String,
    range: IdentityRange,
    interval: Duration,
    lease_ttl: Duration,
) {
    loop {
        match lead(&client, &cluster, &candidate, range, interval, lease_ttl).await {
            Ok(()) => {
                tracing::warn!(%cluster, "identity GC lost its leadership; campaigning again")
            }
            Err(e) => {
                tracing::warn!(%cluster, error = %e, "identity GC failed; campaigning again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn lead(
    client: &EtcdClient,
    cluster: &str,
    candidate: &str,
    range: IdentityRange,
    interval: Duration,
    lease_ttl: Duration,
) -> anyhow::Result<()> {
    let lease = Lease::grant(client, lease_ttl).await?;
    // Blocks until elected (no request timeout: waiting is the point).
    client
        .raw()
        .election_client()
        .campaign(election_name(cluster), candidate, lease.id())
        .await?;
    tracing::info!(%cluster, %candidate, %range, "elected: running the identity GC");
    let mut memory = GcMemory::default();
    let mut lock_lease: Option<Lease> = None;
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = lease.wait_lost() => return Ok(()),
        }
        let lock = match &lock_lease {
            Some(l) if l.is_alive() => l.id(),
            _ => {
                let l = Lease::grant(client, LOCK_LEASE_TTL).await?;
                let id = l.id();
                lock_lease = Some(l);
                id
            }
        };
        match gc_round(client, range, lock, &mut memory).await {
            Ok(stats) => tracing::debug!(?stats, "identity GC round"),
            Err(e) => {
                lock_lease = None;
                tracing::warn!(error = %e, "identity GC round failed; next round retries");
            }
        }
    }
}
