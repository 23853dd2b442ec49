//! The local source: Kubernetes objects of this cluster (Services, EndpointSlices, Pods,
//! Namespaces) turned into state-model objects. The translation functions are shared by every
//! way of reading the objects; today that is a manifests directory (demo, dev VMs, tests),
//! the API-server watcher comes next.

pub mod labels;
pub mod manifests;
pub mod objects;
pub mod services;

pub use manifests::ManifestsSource;
pub use objects::Objects;

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("reading manifests directory {path}: {source}")]
    ReadDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
