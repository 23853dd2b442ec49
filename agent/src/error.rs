//! The crate's top-level error: one variant per module, each wrapping that module's own
//! `thiserror` enum, so callers can match on where a failure came from.

pub use crate::datapath::DatapathError;
pub use crate::k8s::K8sError;
pub use crate::kvstore::KvstoreError;
pub use crate::netns::NetnsError;
pub use crate::routing::RoutingError;
pub use crate::wire::WireError;
pub use crate::wireguard::WireguardError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Kvstore(#[from] KvstoreError),
    #[error(transparent)]
    K8s(#[from] K8sError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Wireguard(#[from] WireguardError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
}
