//! Cilium's list-then-watch over a key prefix (wire-format reference §6.2):
//!
//! 1. Paginated `Range` over `[prefix, prefix_end)`: 256 keys a page, serializable, key order;
//!    later pages pinned to the first page's revision and starting at `last_key + "\0"`.
//!    Listed keys become [`WatchEvent::Upsert`] (`is_create` unless the key was already known
//!    from an earlier round); keys known from an earlier round but absent now become synthetic
//!    [`WatchEvent::Delete`]s; the first complete list is followed by one
//!    [`WatchEvent::ListDone`].
//! 2. `Watch` from list revision + 1. PUT with `create_revision == mod_revision` is a create,
//!    DELETE a delete. A stream that ends cleanly is re-created from the last seen revision + 1
//!    after 50 ms; an error, a cancel or a compaction goes back to step 1 after an exponential
//!    backoff (50 ms … 1 min, reset once a watch is established).
//!
//! Keys are delivered in full (prefix included): consumers strip the prefix they registered,
//! exactly as Cilium's decoders receive the key minus the watched prefix. The watcher keeps its
//! known-key set across disconnects and etcd restarts, so a consumer never has to drop state on
//! disconnect: whatever vanished meanwhile arrives as a synthetic delete after the relist.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::backoff::{Backoff, LIST_BACKOFF_MAX, LIST_BACKOFF_MIN};
use super::client::{EtcdClient, KeyValue, LIST_PAGE_LIMIT, describe};

/// Delay before re-creating a watch whose stream ended without error.
const REWATCH_DELAY: Duration = Duration::from_millis(50);

/// One change seen by a [`ListWatcher`]. `key` is the full etcd key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key exists with this value. `is_create`: newly created (watch) or not known before
    /// (list); false for modifications and for keys re-listed after a reconnect.
    Upsert {
        key: String,
        value: Vec<u8>,
        is_create: bool,
    },
    /// The key is gone: a watch DELETE, or absent from a relist (synthetic).
    Delete { key: String },
    /// The first complete list has been delivered (sent once per watcher).
    ListDone,
}

/// Tuning of a [`ListWatcher`].
#[derive(Debug, Clone)]
pub struct ListWatchOptions {
    /// Capacity of the event channel. The watcher waits for room (it never drops events), so
    /// a consumer that stops reading stalls the watcher, which stops reading its etcd stream;
    /// etcd then buffers server-side and eventually cancels the slow watch, which ends in a
    /// relist once the consumer catches up. Size it for bursts (a relist of a large prefix).
    pub channel_capacity: usize,
    /// Keys per list page.
    pub page_limit: i64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ListWatchOptions {
    fn default() -> Self {
        Self {
            channel_capacity: 1024,
            page_limit: LIST_PAGE_LIMIT,
            backoff_min: LIST_BACKOFF_MIN,
            backoff_max: LIST_BACKOFF_MAX,
        }
    }
}

/// Counters and status of one watcher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatcherStats {
    /// Events delivered to the channel (ListDone included).
    pub events: u64,
    /// Successful lists after the first one.
    pub relists: u64,
    /// Failed lists, watch creations and watch streams.
    pub errors: u64,
    /// A list or watch currently succeeds.
    pub connected: bool,
    /// ListDone has been sent.
    pub synced: bool,
    /// The most recent error, if any.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    events: AtomicU64,
    relists: AtomicU64,
    errors: AtomicU64,
    connected: AtomicBool,
    synced: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, prefix: &str, error: String) {
        warn!(%prefix, %error, "etcd list-watch failed; relisting");
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.connected.store(false, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// A running list-then-watch; dropping it stops the watcher (as does dropping the receiver).
#[derive(Debug)]
pub struct ListWatcher {
    prefix: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl ListWatcher {
    /// Starts watching `prefix` with default options. Must be called inside a tokio runtime.
    /// Give prefixes a trailing `/` where Cilium does, so `c1/` does not match `c10/`.
    pub fn spawn(
        client: EtcdClient,
        prefix: impl Into<String>,
    ) -> (ListWatcher, mpsc::Receiver<WatchEvent>) {
        Self::spawn_with(client, prefix, ListWatchOptions::default())
    }

    pub fn spawn_with(
        client: EtcdClient,
        prefix: impl Into<String>,
        options: ListWatchOptions,
    ) -> (ListWatcher, mpsc::Receiver<WatchEvent>) {
        let prefix = prefix.into();
        let (tx, rx) = mpsc::channel(options.channel_capacity.max(1));
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            prefix: prefix.clone(),
            backoff: Backoff::new(options.backoff_min, options.backoff_max),
            page_limit: options.page_limit.max(1),
            client,
            tx,
            shared: shared.clone(),
            known: HashSet::new(),
        };
        let task = tokio::spawn(worker.run());
        (
            ListWatcher {
                prefix,
                shared,
                task,
            },
            rx,
        )
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> WatcherStats {
        WatcherStats {
            events: self.shared.events.load(Ordering::Relaxed),
            relists: self.shared.relists.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
            connected: self.shared.connected.load(Ordering::Relaxed),
            synced: self.shared.synced.load(Ordering::Relaxed),
            last_error: self
                .shared
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Stops the watcher.
    pub fn stop(self) {}
}

impl Drop for ListWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a watch phase ended.
enum WatchEnd {
    /// The consumer is gone: stop.
    Gone,
    /// Relist.
    Failed(String),
}

struct Worker {
    client: EtcdClient,
    prefix: String,
    page_limit: i64,
    backoff: Backoff,
    tx: mpsc::Sender<WatchEvent>,
    shared: Arc<Shared>,
    /// Keys the consumer currently believes exist.
    known: HashSet<String>,
}

impl Worker {
    async fn run(mut self) {
        let mut listed_once = false;
        loop {
            let revision = match self.list().await {
                Ok(Some(rev)) => rev,
                Ok(None) => return,
                Err(e) => {
                    self.shared.fail(&self.prefix, e);
                    let delay = self.backoff.next_delay();
                    if !self.sleep(delay).await {
                        return;
                    }
                    continue;
                }
            };
            if listed_once {
                self.shared.relists.fetch_add(1, Ordering::Relaxed);
            }
            listed_once = true;
            self.shared.connected.store(true, Ordering::Relaxed);
            match self.watch(revision + 1).await {
                WatchEnd::Gone => return,
                WatchEnd::Failed(e) => {
                    self.shared.fail(&self.prefix, e);
                    let delay = self.backoff.next_delay();
                    if !self.sleep(delay).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps unless the consumer goes away first; false if it did.
    async fn sleep(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.tx.closed() => false,
        }
    }

    async fn send(&self, event: WatchEvent) -> bool {
        if self.tx.send(event).await.is_err() {
            return false;
        }
        self.shared.events.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// One complete list round. `Ok(None)`: the consumer is gone.
    async fn list(&mut self) -> Result<Option<i64>, String> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut start = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let page = match self
                .client
                .range_page(self.prefix.as_bytes(), &start, revision, self.page_limit)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    // Keys already delivered this round stay known, so they get deleted later
                    // if they vanish before the next complete list.
                    self.known.extend(seen);
                    return Err(e.to_string());
                }
            };
            if revision == 0 {
                revision = page.revision;
            }
            let next_start = page.last_key.clone();
            for KeyValue { key, value, .. } in page.kvs {
                let is_create = !self.known.contains(&key);
                seen.insert(key.clone());
                if !self
                    .send(WatchEvent::Upsert {
                        key,
                        value,
                        is_create,
                    })
                    .await
                {
                    return Ok(None);
                }
            }
            match next_start {
                Some(mut last) if page.more => {
                    last.push(0);
                    start = last;
                }
                _ => break,
            }
        }
        let mut vanished: Vec<String> = self.known.difference(&seen).cloned().collect();
        vanished.sort();
        self.known = seen;
        for key in vanished {
            if !self.send(WatchEvent::Delete { key }).await {
                return Ok(None);
            }
        }
        if !self.shared.synced.load(Ordering::Relaxed) {
            if !self.send(WatchEvent::ListDone).await {
                return Ok(None);
            }
            self.shared.synced.store(true, Ordering::Relaxed);
        }
        debug!(prefix = %self.prefix, revision, keys = self.known.len(), "etcd list complete");
        Ok(Some(revision))
    }

    /// Watches from `next_revision` until an error (relist) or the consumer leaves.
    async fn watch(&mut self, mut next_revision: i64) -> WatchEnd {
        loop {
            let created = tokio::select! {
                r = self.client.watch_prefix(&self.prefix, next_revision) => r,
                _ = self.tx.closed() => return WatchEnd::Gone,
            };
            let mut stream = match created {
                Ok(s) => s,
                Err(e) => return WatchEnd::Failed(e.to_string()),
            };
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = self.tx.closed() => return WatchEnd::Gone,
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break,
                    Err(e) => {
                        return WatchEnd::Failed(format!(
                            "watch on {:?} at {}: {}",
                            self.prefix,
                            self.client.endpoints(),
                            describe(&e)
                        ));
                    }
                };
                if resp.canceled() || resp.compact_revision() > 0 {
                    return WatchEnd::Failed(format!(
                        "watch on {:?} at {} canceled (compact revision {}): {}",
                        self.prefix,
                        self.client.endpoints(),
                        resp.compact_revision(),
                        resp.cancel_reason()
                    ));
                }
                if resp.created() {
                    self.backoff.reset();
                    self.shared.connected.store(true, Ordering::Relaxed);
                } else if resp.events().is_empty() {
                    // Progress notification: every later event has a higher revision.
                    if let Some(h) = resp.header() {
                        next_revision = next_revision.max(h.revision() + 1);
                    }
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    next_revision = next_revision.max(kv.mod_revision() + 1);
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    // A DELETE carries only key and mod_revision; every PUT has version >= 1.
                    // Decided from the kv because etcd-client's `event_type()` panics on an
                    // unknown type value, and nothing a server sends may panic us.
                    let event = if kv.version() == 0 {
                        if !self.known.remove(&key) {
                            continue;
                        }
                        WatchEvent::Delete { key }
                    } else {
                        self.known.insert(key.clone());
                        WatchEvent::Upsert {
                            key,
                            value: kv.value().to_vec(),
                            is_create: kv.create_revision() == kv.mod_revision(),
                        }
                    };
                    if !self.send(event).await {
                        return WatchEnd::Gone;
                    }
                }
            }
            debug!(prefix = %self.prefix, next_revision, "etcd watch stream ended; re-creating");
            if !self.sleep(REWATCH_DELAY).await {
                return WatchEnd::Gone;
            }
        }
    }
}
