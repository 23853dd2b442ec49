//! The agent API: gRPC over a unix socket (`proto/strait/v1/agent.proto`). The agent serves
//! it; `strait status` and `strait observe` are its clients. The messages mirror the agent's
//! types field by field (`convert`), so both ends share one schema and the CLI prints the
//! agent's types as before.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, transport::Endpoint};

use crate::{
    constants,
    datapath::flows::{FlowHub, FlowRecord},
    publish::endpoints::{CniAttachment, CniAttachments},
    status::AgentStatus,
};

mod convert;

pub use convert::ConvertError;

pub mod pb {
    tonic::include_proto!("strait.v1");
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot serve the agent API on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent API on {path} stopped: {source}")]
    Serve {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error(
        "cannot reach the agent at {path}: {reason} (is `strait agent` running, and is this the socket it uses?)"
    )]
    Connect { path: PathBuf, reason: String },
    #[error("agent at {path} answered with an error: {source}")]
    Call {
        path: PathBuf,
        source: tonic::Status,
    },
    #[error("agent at {path} sent a message strait cannot read: {source}")]
    Decode { path: PathBuf, source: ConvertError },
}

/// Produces the current status document on demand; `None` once the agent is stopping (the
/// closure holds its sources weakly, so a lingering API call keeps nothing alive).
pub type StatusFn = Arc<dyn Fn() -> Option<AgentStatus> + Send + Sync>;

/// Whether a local pod's endpoint is ready (identity allocated, policy attached when the
/// datapath runs): its identity, given namespace, name, address and host ifindex.
pub type EndpointReadyFn = Arc<dyn Fn(&str, &str, Ipv4Addr, u32) -> Option<u32> + Send + Sync>;

/// What the agent needs to serve strait-cni: where attachments go, and when they are ready.
#[derive(Clone)]
pub struct CniBackend {
    pub attachments: CniAttachments,
    pub ready: EndpointReadyFn,
}

/// How often EndpointAdd looks at readiness again while it waits.
const READY_POLL: Duration = Duration::from_millis(20);

struct Service {
    status: StatusFn,
    flows: Option<FlowHub>,
    cni: Option<CniBackend>,
}

type FlowStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Flow, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_server::Agent for Service {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, tonic::Status> {
        // Building the document may read the WireGuard device (blocking).
        let status = self.status.clone();
        let doc = tokio::task::spawn_blocking(move || status())
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .ok_or_else(|| tonic::Status::unavailable("the agent is stopping"))?;
        Ok(Response::new(pb::StatusResponse {
            status: Some(doc.into()),
        }))
    }

    type ObserveStream = FlowStream;

    async fn observe(
        &self,
        request: Request<pb::ObserveRequest>,
    ) -> Result<Response<FlowStream>, tonic::Status> {
        let req = request.into_inner();
        let Some(hub) = &self.flows else {
            return Err(tonic::Status::failed_precondition(
                "the datapath is not enabled on this agent (no `datapath:` section in its config)",
            ));
        };
        // Subscribe before reading the backlog so nothing falls between the two.
        let live = hub.subscribe();
        let backlog = tokio_stream::iter(
            hub.last(req.last as usize)
                .into_iter()
                .map(|r| Ok(r.into())),
        );
        if !req.follow {
            return Ok(Response::new(Box::pin(backlog)));
        }
        use tokio_stream::StreamExt as _;
        let live = tokio_stream::wrappers::BroadcastStream::new(live).filter_map(|r| match r {
            Ok(record) => Some(Ok(record.into())),
            // A slow reader skips what it missed rather than ending the stream.
            Err(_) => None,
        });
        Ok(Response::new(Box::pin(backlog.chain(live))))
    }

    async fn endpoint_add(
        &self,
        request: Request<pb::EndpointAddRequest>,
    ) -> Result<Response<pb::EndpointAddResponse>, tonic::Status> {
        let req = request.into_inner();
        let Some(cni) = &self.cni else {
            return Err(tonic::Status::failed_precondition(
                "this agent has no local source: it cannot know the pod's labels",
            ));
        };
        let ip: Ipv4Addr = req.ip.parse().map_err(|_| {
            tonic::Status::invalid_argument(format!("{:?} is not an IPv4 address", req.ip))
        })?;
        if req.namespace.is_empty() || req.pod.is_empty() || req.container_id.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "container_id, namespace and pod are required",
            ));
        }
        let pod = format!("{}/{}", req.namespace, req.pod);
        cni.attachments.add(
            &req.container_id,
            CniAttachment {
                namespace: req.namespace.clone(),
                pod: req.pod.clone(),
                ip,
            },
        );
        tracing::info!(%pod, %ip, iface = req.host_interface, "CNI attached pod; waiting for its endpoint");
        // The caller's deadline bounds the wait (a dropped call drops this future).
        loop {
            if let Some(identity) = (cni.ready)(&req.namespace, &req.pod, ip, req.host_ifindex) {
                tracing::info!(%pod, %ip, identity, "endpoint ready for CNI");
                return Ok(Response::new(pb::EndpointAddResponse { identity }));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    async fn endpoint_delete(
        &self,
        request: Request<pb::EndpointDeleteRequest>,
    ) -> Result<Response<pb::EndpointDeleteResponse>, tonic::Status> {
        if let Some(cni) = &self.cni {
            cni.attachments.remove(&request.into_inner().container_id);
        }
        Ok(Response::new(pb::EndpointDeleteResponse {}))
    }
}

/// Serves the API on `path` until the future is dropped. A stale socket file from an earlier
/// run is replaced.
pub async fn serve(
    path: &Path,
    status: StatusFn,
    flows: Option<FlowHub>,
    cni: Option<CniBackend>,
) -> Result<(), ApiError> {
    serve_until(path, status, flows, cni, std::future::pending()).await
}

/// Serves the API on `path` until `shutdown` completes: then no new connection is accepted,
/// calls in flight get [`constants::API_DRAIN_TIMEOUT`] to finish (a followed flow stream is
/// cut), and only once nothing is served any more is the socket file removed. Returns with
/// everything the service held (the status closure among it) dropped.
pub async fn serve_until(
    path: &Path,
    status: StatusFn,
    flows: Option<FlowHub>,
    cni: Option<CniBackend>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let listen_err = |source| ApiError::Listen {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(listen_err)?;
    tracing::info!(socket = %path.display(), "serving the agent API");
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = fired_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .add_service(pb::agent_server::AgentServer::new(Service {
            status,
            flows,
            cni,
        }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    let drained = async {
        match fired_rx.await {
            Ok(()) => tokio::time::sleep(constants::API_DRAIN_TIMEOUT).await,
            // The server ended on its own: the other branch has its result.
            Err(_) => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = server => r.map_err(|source| ApiError::Serve {
            path: path.into(),
            source,
        }),
        () = drained => {
            tracing::info!(socket = %path.display(), "agent API calls still open after the drain timeout: closed");
            Ok(())
        }
    };
    // The server (listener, connections, service) is dropped by now: nobody is served on the
    // path any more, so removing it cannot cut a client off mid-call.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove the API socket")
        }
    }
    result
}

/// Connects to the agent API on `path`.
async fn client(
    path: &Path,
) -> Result<pb::agent_client::AgentClient<tonic::transport::Channel>, ApiError> {
    let socket = path.to_path_buf();
    let connect_err = |reason: String| ApiError::Connect {
        path: path.into(),
        reason,
    };
    // The URI is required by tonic but unused: the connector always dials the socket.
    let channel = Endpoint::from_static("http://strait.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| {
            connect_err(format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ))
        })?;
    Ok(pb::agent_client::AgentClient::new(channel))
}

/// Asks the agent on `path` for its status.
pub async fn fetch_status(path: &Path) -> Result<AgentStatus, ApiError> {
    let response = client(path)
        .await?
        .status(pb::StatusRequest {})
        .await
        .map_err(|source| ApiError::Call {
            path: path.into(),
            source,
        })?;
    let decode_err = |source| ApiError::Decode {
        path: path.into(),
        source,
    };
    let status = response
        .into_inner()
        .status
        .ok_or(ConvertError::Missing("status"))
        .map_err(decode_err)?;
    status.try_into().map_err(decode_err)
}

/// Streams flows from the agent on `path`: the last `last`, then new ones with `follow`.
/// `each` gets every flow in order; the call returns when the stream ends.
pub async fn observe(
    path: &Path,
    last: u32,
    follow: bool,
    mut each: impl FnMut(FlowRecord),
) -> Result<(), ApiError> {
    let call_err = |source| ApiError::Call {
        path: path.into(),
        source,
    };
    let mut stream = client(path)
        .await?
        .observe(pb::ObserveRequest { last, follow })
        .await
        .map_err(call_err)?
        .into_inner();
    while let Some(flow) = stream.message().await.map_err(call_err)? {
        each(flow.try_into().map_err(|source| ApiError::Decode {
            path: path.into(),
            source,
        })?);
    }
    Ok(())
}

/// Tells the agent on `path` that strait-cni attached a pod; returns the pod's identity once
/// its endpoint is ready.
pub async fn endpoint_add(path: &Path, req: pb::EndpointAddRequest) -> Result<u32, ApiError> {
    let response = client(path)
        .await?
        .endpoint_add(req)
        .await
        .map_err(|source| ApiError::Call {
            path: path.into(),
            source,
        })?;
    Ok(response.into_inner().identity)
}

/// Tells the agent on `path` that strait-cni detached a pod.
pub async fn endpoint_delete(path: &Path, req: pb::EndpointDeleteRequest) -> Result<(), ApiError> {
    client(path)
        .await?
        .endpoint_delete(req)
        .await
        .map_err(|source| ApiError::Call {
            path: path.into(),
            source,
        })?;
    Ok(())
}
