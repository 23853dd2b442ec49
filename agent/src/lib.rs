//! strait: an eBPF datapath agent that joins Kubernetes clusters the way Cilium ClusterMesh
//! does. The binary (`src/main.rs`) is a thin CLI over this library; the privileged tests in
//! `tests/` drive the same library.

pub mod cli;
pub mod constants;
pub mod datapath;
pub mod error;
pub mod netns;

pub use error::Error;
