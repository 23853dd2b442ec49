//! `cilium/.heartbeat` (wire-format reference §1.6): readers record the local time of every
//! event on the key (the value is ignored) and call the connection unhealthy when none arrived
//! for more than two write intervals; writers put an RFC 3339 timestamp with a lease every
//! minute.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::warn;

use super::client::EtcdClient;
use super::error::{KvstoreError, Result};
use super::listwatch::{ListWatcher, WatchEvent, WatcherStats};
pub use crate::wire::keys::HEARTBEAT_PATH;

/// How often clustermesh-apiserver writes the heartbeat.
pub const HEARTBEAT_WRITE_INTERVAL: Duration = Duration::from_secs(60);
/// Age after which a seen heartbeat counts as stale (2 × the write interval).
pub const HEARTBEAT_STALE_AFTER: Duration = Duration::from_secs(120);
/// Bound on one heartbeat write.
pub const HEARTBEAT_WRITE_TIMEOUT: Duration = Duration::from_secs(25);

/// Watches the heartbeat key of one etcd and remembers when it last changed.
#[derive(Debug)]
pub struct HeartbeatTracker {
    last: Arc<Mutex<Option<Instant>>>,
    watcher: ListWatcher,
    task: JoinHandle<()>,
}

impl HeartbeatTracker {
    /// Starts the list-watch on `cilium/.heartbeat` (as a prefix without a trailing slash, which
    /// is also what Cilium's read-only etcd roles grant).
    pub fn spawn(client: EtcdClient) -> Self {
        let (watcher, mut events) = ListWatcher::spawn(client, HEARTBEAT_PATH);
        let last = Arc::new(Mutex::new(None));
        let seen = last.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if matches!(event, WatchEvent::Upsert { .. } | WatchEvent::Delete { .. }) {
                    *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                }
            }
        });
        Self {
            last,
            watcher,
            task,
        }
    }

    /// Local time of the last heartbeat event; `None` until one was seen.
    pub fn last_heartbeat(&self) -> Option<Instant> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time since the last heartbeat event; `None` until one was seen.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        self.last_heartbeat().map(|t| t.elapsed())
    }

    /// True once a heartbeat was seen and the latest is older than [`HEARTBEAT_STALE_AFTER`]
    /// (never seen is not stale: an etcd whose writer does not write heartbeats is fine).
    pub fn is_stale(&self) -> bool {
        self.heartbeat_age()
            .is_some_and(|age| age > HEARTBEAT_STALE_AFTER)
    }

    pub fn watcher_stats(&self) -> WatcherStats {
        self.watcher.stats()
    }
}

impl Drop for HeartbeatTracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes the heartbeat once: `Put{cilium/.heartbeat, <RFC 3339 now>, lease}`.
pub async fn write_heartbeat(client: &EtcdClient, lease: Option<i64>) -> Result<()> {
    let value = crate::wire::timestamp::now_rfc3339();
    match tokio::time::timeout(
        HEARTBEAT_WRITE_TIMEOUT,
        client.put(HEARTBEAT_PATH, value, lease),
    )
    .await
    {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(KvstoreError::Timeout {
            op: "put",
            key: HEARTBEAT_PATH.into(),
            endpoints: client.endpoints().into(),
            timeout: HEARTBEAT_WRITE_TIMEOUT,
        }),
    }
}

/// Writes the heartbeat now and then every `interval` until dropped. Failures are logged and
/// retried at the next tick.
#[derive(Debug)]
pub struct HeartbeatWriter {
    task: JoinHandle<()>,
}

impl HeartbeatWriter {
    pub fn spawn(client: EtcdClient, lease: Option<i64>, interval: Duration) -> Self {
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(e) = write_heartbeat(&client, lease).await {
                    warn!(error = %e, "writing the etcd heartbeat failed");
                }
            }
        });
        Self { task }
    }
}

impl Drop for HeartbeatWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}
