//! The etcd v3 client: connection set-up from an [`EtcdConfig`] (plaintext, TLS, mutual TLS)
//! and the single-key operations Cilium's kvstore writers use (wire-format reference §6.2).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    PutOptions, SortOrder, SortTarget, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use tracing::debug;

use super::backoff::Backoff;
use super::config::EtcdConfig;
use super::error::{KvstoreError, Result};

/// Where the system trust store lives on Debian-like systems; used for `https://` endpoints
/// when the config names no CA (Go's clientv3 would use the system roots too).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Keys per page of a paginated list (Cilium's `etcd.limit`).
pub const LIST_PAGE_LIMIT: i64 = 256;

/// Connection tuning. The defaults follow Cilium where it has a value (gRPC keepalive 15 s ping,
/// 25 s timeout).
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bound on TCP connect + TLS handshake per attempt, and on the initial probe request that
    /// [`EtcdClient::connect`] makes so an unreachable etcd fails there, naming the endpoint.
    pub connect_timeout: Duration,
    /// Bound on every unary request (get, put, txn, lease grant, list page, watch creation).
    pub request_timeout: Duration,
    /// HTTP/2 keepalive (ping interval, ping timeout): detects dead connections under a watch.
    pub keepalive: Option<(Duration, Duration)>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            keepalive: Some((Duration::from_secs(15), Duration::from_secs(25))),
        }
    }
}

/// A key-value pair as etcd stores it. Keys are UTF-8 in everything Cilium writes; a non-UTF-8
/// key is converted lossily rather than rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// 0 when the key has no lease.
    pub lease: i64,
}

impl From<&etcd_client::KeyValue> for KeyValue {
    fn from(kv: &etcd_client::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        }
    }
}

/// One page of a range read (see [`EtcdClient::range_page`]).
#[derive(Debug)]
pub(crate) struct RangePage {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    /// The raw bytes of the last key (the next page starts right after it; the `String` keys
    /// may be lossy).
    pub last_key: Option<Vec<u8>>,
    /// `header.revision`: the store revision the page was read at.
    pub revision: i64,
}

/// A connected etcd client. Cheap to clone (clones share the gRPC channel). The channel
/// reconnects by itself after etcd restarts; requests in the meantime fail with
/// [`KvstoreError::Request`] or [`KvstoreError::Timeout`].
#[derive(Clone)]
pub struct EtcdClient {
    inner: Client,
    endpoints: Arc<str>,
    options: ClientOptions,
    cluster_id: u64,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.endpoints)
            .field("cluster_id", &format_args!("{:x}", self.cluster_id))
            .finish()
    }
}

/// An etcd-client error as one line, with its causes (tonic hides the useful part, e.g.
/// "Connection refused" or the TLS alert, in the source chain).
pub(crate) fn describe(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (mut out, mut source) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            (format!("{:?}: {}", s.code(), s.message()), s.source())
        }
        etcd_client::Error::TransportError(t) => (t.to_string(), t.source()),
        etcd_client::Error::IoError(io) => (io.to_string(), io.source()),
        other => (other.to_string(), None),
    };
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn read_tls_file(what: &'static str, path: &Path, config: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| KvstoreError::ReadTlsFile {
        what,
        path: path.to_owned(),
        config: config.to_owned(),
        source,
    })
}

impl EtcdClient {
    /// Connects with default [`ClientOptions`].
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self> {
        Self::connect_with(cfg, &ClientOptions::default()).await
    }

    /// Connects and proves the connection with a `Maintenance.Status` request (allowed for
    /// Cilium's read-only `remote` user, and it yields the etcd cluster ID). Fails within
    /// `connect_timeout` with an error naming the endpoints, or the config file for bad TLS
    /// files. Certificates are read once here: reconnect to pick up rotated files.
    /// For an etcd the process cannot work without (its own cluster's): retries until it
    /// answers, saying so, with a backoff from 200 ms to 10 s. Containers and their etcd
    /// sidecar start in any order.
    pub async fn connect_retrying(cfg: &EtcdConfig) -> Self {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match Self::connect(cfg).await {
                Ok(client) => return client,
                Err(e) => {
                    tracing::warn!(error = %e, "etcd unreachable; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    pub async fn connect_with(cfg: &EtcdConfig, options: &ClientOptions) -> Result<Self> {
        let urls = cfg.endpoint_urls();
        let endpoints: Arc<str> = urls.join(",").into();
        let connect_err = |reason: String| KvstoreError::Connect {
            endpoints: endpoints.to_string(),
            reason,
        };

        // gRPC metadata `hasleader=true` on every request (Cilium sets it on its watches): a
        // member cut off from its leader refuses instead of serving a silently stale stream.
        let mut co = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_require_leader(true);
        if let Some((interval, timeout)) = options.keepalive {
            // No pings while idle: etcd's default enforcement policy answers those with GOAWAY.
            co = co
                .with_keep_alive(interval, timeout)
                .with_keep_alive_while_idle(false);
        }
        if cfg.uses_tls() {
            if cfg.insecure_skip_tls_verify {
                // tonic offers no switch for it through etcd-client; refusing beats silently
                // verifying against roots the operator did not expect.
                return Err(KvstoreError::Unsupported {
                    feature: "insecure-skip-tls-verify".into(),
                    path: cfg.source.clone(),
                });
            }
            let mut tls = TlsOptions::new().timeout(options.connect_timeout);
            let ca = match &cfg.trusted_ca_file {
                Some(path) => Some(read_tls_file("trusted CA file", path, &cfg.source)?),
                None => std::fs::read(SYSTEM_CA_BUNDLE).ok(),
            };
            if let Some(ca) = ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
                let cert = read_tls_file("client certificate file", cert, &cfg.source)?;
                let key = read_tls_file("client key file", key, &cfg.source)?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            co = co.with_tls(tls);
        }
        if let Some(user) = &cfg.username {
            co = co.with_user(user.clone(), cfg.password.clone().unwrap_or_default());
        }

        // One deadline for dialling and the probe: the channel connects lazily, so the probe is
        // what actually reaches etcd.
        let probe = async {
            let inner = Client::connect(&urls, Some(co)).await?;
            let status = inner.maintenance_client().status().await?;
            Ok::<_, etcd_client::Error>((inner, status))
        };
        let (inner, status) = match tokio::time::timeout(options.connect_timeout, probe).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(connect_err(describe(&e))),
            Err(_) => {
                return Err(connect_err(format!(
                    "no answer within {:?}",
                    options.connect_timeout
                )));
            }
        };
        let cluster_id = status.header().map_or(0, |h| h.cluster_id());
        debug!(%endpoints, version = status.version(), cluster_id = format_args!("{cluster_id:x}"), "connected to etcd");
        Ok(Self {
            inner,
            endpoints,
            options: options.clone(),
            cluster_id,
        })
    }

    /// The endpoints, comma-separated, as used in errors and status.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The etcd cluster ID seen when connecting (Cilium shows it as `ID: <hex>`).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The underlying etcd-client handle, for operations this layer does not wrap (compaction,
    /// maintenance).
    pub fn raw(&self) -> Client {
        self.inner.clone()
    }

    /// Runs one request under the request timeout, mapping failures to errors naming `key`.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.options.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(KvstoreError::Request {
                op,
                key: key.to_owned(),
                endpoints: self.endpoints.to_string(),
                reason: describe(&e),
            }),
            Err(_) => Err(KvstoreError::Timeout {
                op,
                key: key.to_owned(),
                endpoints: self.endpoints.to_string(),
                timeout: self.options.request_timeout,
            }),
        }
    }

    /// Linearizable single-key read.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut kv = self.inner.kv_client();
        let resp = self.call("get", key, kv.get(key, None)).await?;
        Ok(resp.kvs().first().map(KeyValue::from))
    }

    /// `Put{key, value, lease}`; returns the revision of the write.
    pub async fn put(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<i64>,
    ) -> Result<i64> {
        let mut kv = self.inner.kv_client();
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let resp = self.call("put", key, kv.put(key, value, opts)).await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Creates `key` only if it does not exist (`Txn{version(key) == 0 → Put}`); returns whether
    /// it was created.
    pub async fn create_only(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<i64>,
    ) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::version(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                lease.map(|l| PutOptions::new().with_lease(l)),
            )]);
        let mut kv = self.inner.kv_client();
        let resp = self.call("create-only", key, kv.txn(txn)).await?;
        Ok(resp.succeeded())
    }

    /// Writes `key` unless it already holds exactly `value` bound to the same lease (none = 0);
    /// returns whether it wrote. One atomic `Txn{value == v ∧ lease == l → nothing; else Put}`
    /// where Cilium does a Range then a Put: same outcome, one round trip, no race. (A value
    /// comparison on a missing key fails in etcd, so a missing key is written.)
    pub async fn update_if_different(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<i64>,
    ) -> Result<bool> {
        let value = value.into();
        let lease_id = lease.unwrap_or(0);
        let txn = Txn::new()
            .when([
                Compare::value(key, CompareOp::Equal, value.clone()),
                Compare::lease(key, CompareOp::Equal, lease_id),
            ])
            .or_else([TxnOp::put(
                key,
                value,
                lease.map(|l| PutOptions::new().with_lease(l)),
            )]);
        let mut kv = self.inner.kv_client();
        let resp = self.call("update-if-different", key, kv.txn(txn)).await?;
        Ok(!resp.succeeded())
    }

    /// Deletes one key; returns whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let mut kv = self.inner.kv_client();
        let resp = self.call("delete", key, kv.delete(key, None)).await?;
        Ok(resp.deleted() > 0)
    }

    /// Deletes every key under `prefix`; returns how many. An empty prefix is refused: it
    /// would wipe the whole store.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        if prefix.is_empty() {
            return Err(KvstoreError::InvalidArgument {
                op: "delete-prefix",
                reason: "empty prefix".into(),
            });
        }
        let mut kv = self.inner.kv_client();
        let opts = DeleteOptions::new().with_prefix();
        let resp = self
            .call("delete-prefix", prefix, kv.delete(prefix, Some(opts)))
            .await?;
        Ok(resp.deleted())
    }

    /// Revokes a lease by ID (its keys are deleted).
    pub async fn revoke_lease(&self, id: i64) -> Result<()> {
        let mut lease = self.inner.lease_client();
        self.call("lease-revoke", &format!("lease {id:x}"), lease.revoke(id))
            .await?;
        Ok(())
    }

    /// Every key under `prefix`, read page by page at one revision.
    pub async fn list_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let mut start = prefix.as_bytes().to_vec();
        let (mut revision, mut out) = (0, Vec::new());
        loop {
            let page = self
                .range_page(prefix.as_bytes(), &start, revision, LIST_PAGE_LIMIT)
                .await?;
            revision = page.revision;
            out.extend(page.kvs);
            match (page.more, page.last_key) {
                (true, Some(mut last)) => {
                    last.push(0);
                    start = last;
                }
                _ => return Ok(out),
            }
        }
    }

    /// One page of Cilium's paginated list of `prefix`: keys from `start` (the prefix itself,
    /// then the last key of the previous page + `\0`) to the prefix's end, ascending,
    /// serializable, at `revision` (0 = newest), at most `limit`.
    pub(crate) async fn range_page(
        &self,
        prefix: &[u8],
        start: &[u8],
        revision: i64,
        limit: i64,
    ) -> Result<RangePage> {
        // etcd-client (like Go's clientv3) sends sort_order NONE for key-ascending: it is the
        // server's natural order and spares it a full-range sort.
        let opts = GetOptions::new()
            .with_range(prefix_range_end(prefix))
            .with_limit(limit)
            .with_revision(revision)
            .with_serializable()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let mut kv = self.inner.kv_client();
        let label = String::from_utf8_lossy(start);
        let resp = self.call("list", &label, kv.get(start, Some(opts))).await?;
        Ok(RangePage {
            kvs: resp.kvs().iter().map(KeyValue::from).collect(),
            more: resp.more(),
            last_key: resp.kvs().last().map(|kv| kv.key().to_vec()),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    /// Opens a watch on every key under `prefix` from `start_revision` (no prev_kv, no
    /// filters).
    pub(crate) async fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<WatchStream> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision);
        let mut watch = self.inner.watch_client();
        self.call("watch", prefix, watch.watch(prefix, Some(opts)))
            .await
    }

    /// Opens a watch on exactly `key` from `start_revision`.
    pub(crate) async fn watch_key(&self, key: &str, start_revision: i64) -> Result<WatchStream> {
        let opts = WatchOptions::new().with_start_revision(start_revision);
        let mut watch = self.inner.watch_client();
        self.call("watch", key, watch.watch(key, Some(opts))).await
    }
}

/// End of the key range covering every key starting with `prefix` (etcd's "prefix end": the
/// prefix with its last byte below 0xff incremented and the rest cut; `"\0"`, no upper bound,
/// when there is none). etcd-client's `with_prefix()` computes the same from the request's own
/// key, which fits a watch or a delete but not the later pages of a list: they start after the
/// prefix yet must end where the prefix does, and etcd-client keeps its helper private.
fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
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
