//! The in-memory state model: nodes, endpoints (ipcache), identities and services with
//! per-cluster backends. Plain Rust, testable without etcd or a kernel; reconcilers consume
//! its changes.
