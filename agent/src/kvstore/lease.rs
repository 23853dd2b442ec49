//! A granted etcd lease and the task keeping it alive: `LeaseKeepAlive` every TTL/3, the stream
//! re-opened after connection loss, and the lease reported lost once etcd says it no longer
//! exists or no keepalive was acknowledged for a whole TTL.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::backoff::Backoff;
use super::client::{EtcdClient, describe};
use super::error::{KvstoreError, Result};

/// What the keepalive task knows about the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Kept alive.
    Alive,
    /// The keepalive was stopped on purpose ([`Lease::stop_keepalive`], [`Lease::close`]); the
    /// lease expires after its TTL unless it was revoked.
    Stopped,
    /// The lease is gone (expired, revoked elsewhere) or could not be refreshed within its
    /// TTL; keys attached to it are (or will shortly be) deleted. A new lease is needed.
    Lost(String),
}

/// A lease with its keepalive task. Dropping it stops the keepalive without revoking (the lease
/// then expires after its TTL); [`Lease::close`] revokes, deleting the attached keys at once.
#[derive(Debug)]
pub struct Lease {
    id: i64,
    ttl: Duration,
    client: EtcdClient,
    state: Arc<watch::Sender<LeaseState>>,
    task: Option<JoinHandle<()>>,
}

impl Lease {
    /// Grants a lease of `ttl` (whole seconds, at least 1) and starts keeping it alive.
    pub async fn grant(client: &EtcdClient, ttl: Duration) -> Result<Self> {
        let ttl_secs = ttl.as_secs().max(1) as i64;
        let mut lease = client.raw().lease_client();
        let resp = client
            .call("lease-grant", "", lease.grant(ttl_secs, None))
            .await?;
        if !resp.error().is_empty() {
            return Err(KvstoreError::Request {
                op: "lease-grant",
                key: String::new(),
                endpoints: client.endpoints().to_owned(),
                reason: resp.error().to_owned(),
            });
        }
        Ok(Self::start(
            client.clone(),
            resp.id(),
            Duration::from_secs(resp.ttl().max(1) as u64),
        ))
    }

    fn start(client: EtcdClient, id: i64, ttl: Duration) -> Self {
        let state = Arc::new(watch::Sender::new(LeaseState::Alive));
        let task = tokio::spawn(keepalive(client.clone(), id, ttl, state.clone()));
        Self {
            id,
            ttl,
            client,
            state,
            task: Some(task),
        }
    }

    /// The lease ID, to pass to writes.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL etcd granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn state(&self) -> LeaseState {
        self.state.borrow().clone()
    }

    pub fn is_alive(&self) -> bool {
        *self.state.borrow() == LeaseState::Alive
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.subscribe()
    }

    /// Waits until the lease is no longer kept alive and returns that state
    /// ([`LeaseState::Lost`] or [`LeaseState::Stopped`]).
    pub async fn wait_lost(&self) -> LeaseState {
        let mut rx = self.state.subscribe();
        match rx.wait_for(|s| *s != LeaseState::Alive).await {
            Ok(s) => s.clone(),
            // Unreachable while `self` holds the sender; kept total anyway.
            Err(_) => LeaseState::Stopped,
        }
    }

    /// Stops refreshing the lease; etcd expires it (and deletes its keys) after the TTL.
    pub fn stop_keepalive(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            self.state.send_if_modified(|s| {
                if *s == LeaseState::Alive {
                    *s = LeaseState::Stopped;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Stops the keepalive and revokes the lease, deleting its keys now.
    pub async fn close(mut self) -> Result<()> {
        self.stop_keepalive();
        self.client.revoke_lease(self.id).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// gRPC status code NOT_FOUND (fixed by the gRPC spec), compared numerically so this module
/// needs no direct tonic dependency.
const GRPC_NOT_FOUND: i32 = 5;

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => {
            s.code() as i32 == GRPC_NOT_FOUND || s.message().contains("lease not found")
        }
        _ => false,
    }
}

async fn keepalive(
    client: EtcdClient,
    id: i64,
    ttl: Duration,
    state: Arc<watch::Sender<LeaseState>>,
) {
    let lose = |reason: String| {
        warn!(lease = format_args!("{id:x}"), %reason, "etcd lease lost");
        state.send_replace(LeaseState::Lost(reason));
    };
    // Cilium (and Go's clientv3) re-send the lease ID every TTL/3.
    let period = (ttl / 3).max(Duration::from_millis(100));
    let request_timeout = client.options().request_timeout.min(ttl);
    // The lease was granted just before this task started.
    let mut deadline = Instant::now() + ttl;
    // Quick retries: an etcd restart must not cost the lease.
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        period.min(Duration::from_secs(1)),
    );
    loop {
        let mut leases = client.raw().lease_client();
        let opened = match tokio::time::timeout(request_timeout, leases.keep_alive(id)).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) if is_lease_not_found(&e) => {
                return lose("lease not found (expired or revoked)".into());
            }
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!("no keepalive answer within {request_timeout:?}")),
        };
        let (mut keeper, mut stream) = match opened {
            Ok(pair) => pair,
            Err(error) => {
                // Retry until the lease would have expired; the last attempt lands on the
                // deadline.
                let now = Instant::now();
                if now >= deadline {
                    return lose(format!("not refreshed within its TTL of {ttl:?}: {error}"));
                }
                tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
                continue;
            }
        };
        // Opening the stream sent and acknowledged a first keepalive.
        deadline = Instant::now() + ttl;
        backoff.reset();
        let error = loop {
            // A stream that breaks between keepalives (etcd restarted, perhaps empty) is seen
            // at once, not a period later: a lease lost with the data is replaced quickly.
            let early = tokio::select! {
                _ = tokio::time::sleep(period) => None,
                m = stream.message() => Some(m),
            };
            match early {
                None => {}
                Some(Ok(Some(resp))) if resp.ttl() <= 0 => {
                    return lose("lease not found (expired or revoked)".into());
                }
                Some(Ok(Some(_))) => continue,
                Some(Ok(None)) => break "keepalive stream closed".into(),
                Some(Err(e)) if is_lease_not_found(&e) => {
                    return lose("lease not found (expired or revoked)".into());
                }
                Some(Err(e)) => break describe(&e),
            }
            if let Err(e) = keeper.keep_alive().await {
                break describe(&e);
            }
            match tokio::time::timeout(request_timeout, stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() <= 0 => {
                    return lose("lease not found (expired or revoked)".into());
                }
                Ok(Ok(Some(resp))) => {
                    deadline = Instant::now() + Duration::from_secs(resp.ttl() as u64);
                }
                Ok(Ok(None)) => break "keepalive stream closed".into(),
                Ok(Err(e)) if is_lease_not_found(&e) => {
                    return lose("lease not found (expired or revoked)".into());
                }
                Ok(Err(e)) => break describe(&e),
                Err(_) => break format!("no keepalive answer within {request_timeout:?}"),
            }
        };
        debug!(lease = format_args!("{id:x}"), %error, "re-opening lease keepalive");
    }
}
