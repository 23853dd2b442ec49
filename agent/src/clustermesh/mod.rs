//! Cilium ClusterMesh formats and rules: the values in etcd, byte for byte, and the checks
//! Cilium applies to what remote clusters publish.

#[derive(Debug, thiserror::Error)]
pub enum ClustermeshError {}
