//! Mesh I/O: reading remote clusters' kvstores into the state model, and mirroring them.
//!
//! * [`manager`]: follows the clustermesh config directory, one [`remote`] per cluster file.
//! * [`remote`]: one remote cluster's lifecycle: connect, cluster config, heartbeat, sync.
//! * [`sync`]: list-watch events of each data kind → validated → [`convert`] → state model.
//! * [`limits`]: per remote cluster caps on keys per kind and value sizes.
//! * [`kvstoremesh`]: `strait kvstoremesh`, mirroring remotes' state into the local etcd cache.
//! * [`exporter`]: writes this cluster's global services for remotes to read.
//! * [`identity_gc`]: removes this cluster's identities no node references (one elected
//!   `strait kvstoremesh`).

pub mod convert;
pub mod exporter;
pub mod identity_gc;
pub mod kvstoremesh;
pub mod limits;
pub mod manager;
pub mod remote;
pub mod sync;
