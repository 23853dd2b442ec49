//! strait: an eBPF datapath agent that joins Kubernetes clusters the way Cilium ClusterMesh
//! does. The binary (`src/main.rs`) is a thin CLI over this library; the privileged tests in
//! `tests/` drive the same library.

pub mod api;
pub mod cli;
pub mod cni;
pub mod config;
pub mod constants;
pub mod daemon;
pub mod datapath;
pub mod error;
pub mod health;
pub mod hostnet;
pub mod identity;
pub mod k8s;
pub mod kvstore;
pub mod masquerade;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod publish;
pub mod routing;
pub mod state;
pub mod status;
pub mod task;
#[cfg(test)]
mod testlog;
pub mod wire;
pub mod wireguard;

pub use error::Error;
