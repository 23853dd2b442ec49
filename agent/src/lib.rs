//! strait: an eBPF datapath agent that joins Kubernetes clusters the way Cilium ClusterMesh
//! does. The binary (`src/main.rs`) is a thin CLI over this library; the privileged tests in
//! `tests/` drive the same library.

pub mod cli;
pub mod clustermesh;
pub mod constants;
pub mod datapath;
pub mod error;
pub mod kvstore;
pub mod netns;
pub mod state;

pub use error::Error;
