//! Prometheus metrics: one registry for the process, served as text on a configurable
//! address. Families are defined here once, with the labels every module uses.

use std::{net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub cluster: String,
    /// node | service | identity | ipcache | cluster-config
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterReasonLabels {
    pub cluster: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub cluster: String,
    pub kind: String,
    /// upsert | delete
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub cluster: String,
    /// nodes | endpoints | identities | services
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapOpLabels {
    pub map: String,
    /// update | delete
    pub op: String,
}

/// Every metric strait exports. Cheap to clone (families are reference-counted).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub kvstore_rejected: Family<RejectionLabels, Counter>,
    pub kvstore_events: Family<EventLabels, Counter>,
    pub remote_connected: Family<ClusterLabels, Gauge>,
    pub remote_ready: Family<ClusterLabels, Gauge>,
    pub remote_objects: Family<ObjectLabels, Gauge>,
    pub remote_failures: Family<ClusterLabels, Counter>,
    pub remote_last_failure: Family<ClusterLabels, Gauge>,
    pub remote_datapath_up: Family<ClusterLabels, Gauge>,
    pub datapath_drops: Family<ReasonLabels, Gauge>,
    pub datapath_map_errors: Family<MapOpLabels, Counter>,
    pub datapath_map_entries: Family<MapLabels, Gauge>,
    pub ipcache_refused: Family<ClusterReasonLabels, Counter>,
    pub health_refused: Family<ClusterReasonLabels, Counter>,
    pub health_probes_sent: Counter,
    pub health_replies_rejected: Counter,
    pub endpoints_unenforced: Family<ReasonLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let (kvstore_rejected, kvstore_events) = (Family::default(), Family::default());
        let (remote_connected, remote_ready, remote_objects) =
            (Family::default(), Family::default(), Family::default());
        let (remote_failures, remote_last_failure) = (Family::default(), Family::default());
        let (datapath_drops, datapath_map_errors, datapath_map_entries) =
            (Family::default(), Family::default(), Family::default());
        let (remote_datapath_up, ipcache_refused) = (Family::default(), Family::default());
        let (health_refused, health_probes_sent, health_replies_rejected) =
            (Family::default(), Counter::default(), Counter::default());
        let endpoints_unenforced = Family::default();
        let mut registry = Registry::with_prefix("strait");
        registry.register(
            "health_refused_targets",
            "remote node addresses the health prober refuses to probe, by cluster and reason \
             (outside-underlay, not-unicast, local); each counts once when it appears",
            health_refused.clone(),
        );
        registry.register(
            "health_probes_sent",
            "health probes sent to remote nodes",
            health_probes_sent.clone(),
        );
        registry.register(
            "health_replies_rejected",
            "health replies ignored: not from a probed address and port, or not carrying the \
             nonce of a probe in flight (spoofed, replayed or late)",
            health_replies_rejected.clone(),
        );
        registry.register(
            "kvstore_rejected",
            "kvstore values refused by validation, by cluster, kind and reason",
            kvstore_rejected.clone(),
        );
        registry.register(
            "kvstore_events",
            "kvstore events applied to the state model",
            kvstore_events.clone(),
        );
        registry.register(
            "remote_cluster_connected",
            "1 while the remote cluster's kvstore is connected",
            remote_connected.clone(),
        );
        registry.register(
            "remote_cluster_ready",
            "1 while the remote cluster is connected, configured and fully synced",
            remote_ready.clone(),
        );
        registry.register(
            "remote_cluster_objects",
            "objects known from a cluster, by kind",
            remote_objects.clone(),
        );
        registry.register(
            "remote_cluster_failures",
            "connection failures per remote cluster",
            remote_failures.clone(),
        );
        registry.register(
            "remote_cluster_last_failure_timestamp_seconds",
            "Unix time of the last connection failure per remote cluster",
            remote_last_failure.clone(),
        );
        registry.register(
            "remote_cluster_datapath_up",
            "1 while some node of the remote cluster answers health probes",
            remote_datapath_up.clone(),
        );
        registry.register(
            "datapath_drops",
            "packets and connections the datapath dropped, by reason (kernel per-CPU counters, \
             summed; they only grow while the pinned maps live)",
            datapath_drops.clone(),
        );
        registry.register(
            "datapath_map_errors",
            "datapath map updates and deletes that failed (a full map among them), by map and \
             operation; each failed attempt counts (failed entries are retried)",
            datapath_map_errors.clone(),
        );
        registry.register(
            "datapath_map_entries",
            "entries the agent has programmed, by map",
            datapath_map_entries.clone(),
        );
        registry.register(
            "ipcache_refused",
            "remote ipcache entries refused by the ownership rule, by cluster and reason \
             (local, outside-pod-cidrs, conflict); each refusal counts once when it appears",
            ipcache_refused.clone(),
        );
        registry.register(
            "endpoints_unenforced",
            "local endpoints a policy selects that the datapath does not enforce, by reason \
             (no-host-route, identity-allocation-failed, attach-failed, map-write-failed)",
            endpoints_unenforced.clone(),
        );
        Self {
            registry: Arc::new(registry),
            kvstore_rejected,
            kvstore_events,
            remote_connected,
            remote_ready,
            remote_objects,
            remote_failures,
            remote_last_failure,
            remote_datapath_up,
            datapath_drops,
            datapath_map_errors,
            datapath_map_entries,
            ipcache_refused,
            health_refused,
            health_probes_sent,
            health_replies_rejected,
            endpoints_unenforced,
        }
    }

    /// The metrics in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts a rejected kvstore value.
    pub fn rejected(&self, cluster: &str, kind: &str, reason: &str) {
        self.kvstore_rejected
            .get_or_create(&RejectionLabels {
                cluster: cluster.into(),
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Serves `GET /metrics` (and `GET /healthz` for probes) on `addr` until the task is
    /// dropped. Always ready.
    pub async fn serve(self, addr: SocketAddr) -> Result<(), MetricsError> {
        let (_ready_tx, ready) = tokio::sync::watch::channel(true);
        self.serve_probes(addr, ready).await
    }

    /// Serves `GET /metrics` and the kubelet's probes on `addr` until the task is dropped:
    /// `/livez` and `/healthz` (liveness, kept for older manifests): the process serves HTTP;
    /// `/readyz` (readiness and startup): 200 once `ready` holds true, 503 before.
    pub async fn serve_probes(
        self,
        addr: SocketAddr,
        ready: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), MetricsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        tracing::info!(%addr, "serving metrics");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = self.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let service =
                    service_fn(move |req: Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        let ready = *ready.borrow();
                        async move {
                            let path = req.uri().path();
                            if path == "/healthz" || path == "/livez" {
                                // Liveness: the process runs and serves HTTP (kubelet probes).
                                Response::builder().body(Full::new(Bytes::from_static(b"ok\n")))
                            } else if path == "/readyz" {
                                if ready {
                                    Response::builder().body(Full::new(Bytes::from_static(b"ok\n")))
                                } else {
                                    Response::builder().status(503).body(Full::new(
                                        Bytes::from_static(b"initial sync not complete\n"),
                                    ))
                                }
                            } else if req.uri().path() == "/metrics" {
                                Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(metrics.render())))
                            } else {
                                Response::builder()
                                    .status(404)
                                    .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                            }
                        }
                    });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_render_with_their_labels() {
        let m = Metrics::new();
        m.rejected("europe", "node", "cluster-mismatch");
        m.rejected("europe", "node", "cluster-mismatch");
        let text = m.render();
        assert!(
            text.contains(r#"strait_kvstore_rejected_total{cluster="europe",kind="node",reason="cluster-mismatch"} 2"#),
            "{text}"
        );
    }

    async fn http_get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    }

    #[tokio::test]
    async fn readiness_waits_for_the_initial_sync_and_liveness_does_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(Metrics::new().serve_probes(addr, ready));
        let before = http_get(addr, "/readyz").await;
        assert!(before.starts_with("HTTP/1.1 503"), "{before}");
        for live in ["/livez", "/healthz"] {
            let r = http_get(addr, live).await;
            assert!(r.starts_with("HTTP/1.1 200"), "{live}: {r}");
        }
        ready_tx.send(true).unwrap();
        let after = http_get(addr, "/readyz").await;
        server.abort();
        assert!(
            after.starts_with("HTTP/1.1 200") && after.ends_with("ok\n"),
            "{after}"
        );
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let m = Metrics::new();
        m.remote_connected
            .get_or_create(&ClusterLabels {
                cluster: "europe".into(),
            })
            .set(1);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let server = tokio::spawn(m.serve(addr));
        let body = loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut body = String::new();
                s.read_to_string(&mut body).await.unwrap();
                break body;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let health = {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut health = String::new();
            s.read_to_string(&mut health).await.unwrap();
            health
        };
        server.abort();
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
            "{health}"
        );
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(
            body.contains(r#"strait_remote_cluster_connected{cluster="europe"} 1"#),
            "{body}"
        );
    }
}
