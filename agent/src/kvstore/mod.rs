//! etcd v3 access the way Cilium's kvstore does it: config files, TLS, paginated
//! list-then-watch with relist and synthetic deletes, leases.
//!
//! * [`config`]: Cilium's etcd config YAML ([`EtcdConfig`]) and the clustermesh config
//!   directory (one file per remote cluster) with a polling watcher.
//! * [`client`]: [`EtcdClient`], connected from an [`EtcdConfig`] (plaintext, TLS, mTLS), with
//!   the single-key operations Cilium's writers use.
//! * [`lease`]: [`Lease`], a granted lease kept alive by a background task.
//! * [`lock`]: [`KvLock`], etcd's distributed mutex (Go's `concurrency.Mutex` layout).
//! * [`listwatch`]: [`ListWatcher`], Cilium's list-then-watch over a prefix, delivering
//!   [`WatchEvent`]s through a bounded channel and surviving etcd restarts.
//! * [`heartbeat`]: `cilium/.heartbeat` tracking (reader) and writing.
//! * [`backoff`]: the exponential backoff shared by the above.
//! * [`auth`]: applies a users-and-roles plan ([`crate::wire::users`]) through etcd's Auth API
//!   and enables authentication.
//!
//! The files depend one way: `client` uses `config`, `backoff` and `error`; `lease`, `lock`,
//! `listwatch` and `auth` use `client`; `heartbeat` uses `listwatch`. This file only declares them and
//! re-exports what callers use.

pub mod auth;
pub mod backoff;
pub mod client;
pub mod config;
mod error;
pub mod heartbeat;
pub mod lease;
pub mod listwatch;
pub mod lock;

pub use backoff::Backoff;
pub use client::{ClientOptions, EtcdClient, KeyValue};
pub use config::{
    ClusterConfigFile, ClustermeshConfigDir, ConfigDirWatcher, ConfigEvent, EtcdConfig,
};
pub use error::{KvstoreError, Result};
pub use heartbeat::{HeartbeatTracker, HeartbeatWriter};
pub use lease::{Lease, LeaseState};
pub use listwatch::{ListWatchOptions, ListWatcher, WatchEvent, WatcherStats};
pub use lock::KvLock;
