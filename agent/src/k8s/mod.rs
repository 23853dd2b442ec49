//! The local source: Kubernetes objects of this cluster (Services, EndpointSlices, Pods,
//! Namespaces, this Node, Cilium policies) turned into state-model objects. Two ways of
//! reading them — a manifests directory (demo, dev VMs, tests) and the API server — produce
//! the same [`Objects`], translated by the same functions.

pub mod annotations;
pub mod api;
pub mod labels;
pub mod manifests;
pub mod objects;
pub mod services;

#[cfg(test)]
mod replay_tests;

pub use api::ApiSource;
pub use manifests::ManifestsSource;
pub use objects::Objects;

use std::path::PathBuf;

use tokio::sync::watch;

use crate::state::StateHandle;

/// The local source the configuration selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalSourceConfig {
    None,
    Manifests(PathBuf),
    Api { api_server: Option<hyper::Uri> },
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("reading manifests directory {path}: {source}")]
    ReadDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("Kubernetes API client: {reason}")]
    Client { reason: String },
}

/// The running local source, whichever the configuration chose.
pub enum LocalSource {
    Manifests(ManifestsSource),
    Api(ApiSource),
}

impl LocalSource {
    /// Starts the configured source (`None` when there is none). `node` selects the pods
    /// and the Node object the API source watches.
    pub async fn start(
        config: &LocalSourceConfig,
        node: &str,
        state: StateHandle,
        cluster_id: u32,
    ) -> Result<Option<Self>, K8sError> {
        Ok(match config {
            LocalSourceConfig::None => None,
            LocalSourceConfig::Manifests(dir) => {
                tracing::info!(dir = %dir.display(), "reading local objects from the manifests directory");
                Some(Self::Manifests(ManifestsSource::spawn(
                    dir.clone(),
                    state,
                    cluster_id,
                    manifests::POLL_INTERVAL,
                )))
            }
            LocalSourceConfig::Api { api_server } => {
                let client = api::client(api_server.as_ref()).await?;
                Some(Self::Api(ApiSource::spawn(
                    client,
                    api::WatchSet::Agent {
                        node: node.to_owned(),
                    },
                    state,
                    cluster_id,
                )))
            }
        })
    }

    /// The latest objects read.
    pub fn objects(&self) -> watch::Receiver<Objects> {
        match self {
            Self::Manifests(m) => m.objects(),
            Self::Api(a) => a.objects(),
        }
    }

    /// Becomes true once the source has listed everything it watches (and the objects
    /// [`Self::objects`] holds are that listing or newer).
    pub fn synced(&self) -> watch::Receiver<bool> {
        match self {
            Self::Manifests(m) => m.synced(),
            Self::Api(a) => a.synced(),
        }
    }
}
