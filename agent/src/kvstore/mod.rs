//! etcd v3 access the way Cilium's kvstore does it: config files, TLS, paginated
//! list-then-watch with relist and synthetic deletes, leases.
//!
//! * [`config`]: Cilium's etcd config YAML ([`EtcdConfig`]) and the clustermesh config
//!   directory (one file per remote cluster) with a polling watcher.
//! * [`client`]: [`EtcdClient`], connected from an [`EtcdConfig`] (plaintext, TLS, mTLS), with
//!   the single-key operations Cilium's writers use.
//! * [`lease`]: [`Lease`], a granted lease kept alive by a background task.
//! * [`listwatch`]: [`ListWatcher`], Cilium's list-then-watch over a prefix, delivering
//!   [`WatchEvent`]s through a bounded channel and surviving etcd restarts.
//! * [`heartbeat`]: `cilium/.heartbeat` tracking (reader) and writing.
//! * [`backoff`]: the exponential backoff shared by the above.

pub mod backoff;
pub mod client;
pub mod config;
pub mod heartbeat;
pub mod lease;
pub mod listwatch;

use std::path::PathBuf;
use std::time::Duration;

pub use backoff::Backoff;
pub use client::{ClientOptions, EtcdClient, KeyValue};
pub use config::{
    ClusterConfigFile, ClustermeshConfigDir, ConfigDirWatcher, ConfigEvent, EtcdConfig,
};
pub use heartbeat::{HeartbeatTracker, HeartbeatWriter};
pub use lease::{Lease, LeaseState};
pub use listwatch::{ListWatchOptions, ListWatcher, WatchEvent, WatcherStats};

/// Errors of the kvstore layer. Every variant names what it was about (file, endpoint, key) so
/// a log line alone says which remote cluster or file is at fault.
#[derive(Debug, thiserror::Error)]
pub enum KvstoreError {
    #[error("reading etcd config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing etcd config {path}: {reason}")]
    ParseConfig { path: PathBuf, reason: String },
    #[error("invalid etcd config {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("reading {what} {path} (from etcd config {config}): {source}")]
    ReadTlsFile {
        what: &'static str,
        path: PathBuf,
        config: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{feature} (etcd config {path}) is not supported")]
    Unsupported { feature: String, path: PathBuf },
    #[error("reading clustermesh config directory {path}: {source}")]
    ReadConfigDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to etcd at {endpoints}: {reason}")]
    Connect { endpoints: String, reason: String },
    #[error("etcd {op} on {key:?} at {endpoints}: {reason}")]
    Request {
        op: &'static str,
        key: String,
        endpoints: String,
        reason: String,
    },
    #[error("etcd {op} on {key:?} at {endpoints}: no answer within {timeout:?}")]
    Timeout {
        op: &'static str,
        key: String,
        endpoints: String,
        timeout: Duration,
    },
    #[error("invalid argument for etcd {op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },
}

pub type Result<T, E = KvstoreError> = std::result::Result<T, E>;

/// Cilium's key prefix constants used by this layer (see the wire-format reference §1.1).
pub mod keys {
    /// Heartbeat key written by clustermesh-apiserver every minute.
    pub const HEARTBEAT_PATH: &str = "cilium/.heartbeat";
}

/// End of the key range covering every key starting with `prefix` (etcd's "prefix end": the
/// prefix with its last byte below 0xff incremented and the rest cut). A prefix of only 0xff
/// bytes (or an empty one) has no upper bound: etcd spells that `"\0"`.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_range_end;

    #[test]
    fn prefix_range_end_increments_last_byte() {
        assert_eq!(prefix_range_end(b"a/"), b"a0");
        assert_eq!(prefix_range_end(b"cilium/.heartbeat"), b"cilium/.heartbeau");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_range_end(b""), b"\0");
    }
}
