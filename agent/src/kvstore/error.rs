//! Errors of the kvstore layer.

use std::path::PathBuf;
use std::time::Duration;

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
    #[error("etcd lock {key} lost (its lease ended or the key was deleted)")]
    LockLost { key: String },
    #[error("invalid argument for etcd {op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },
}

pub type Result<T, E = KvstoreError> = std::result::Result<T, E>;
