//! etcd v3 access the way Cilium's kvstore does it: config files, TLS, paginated
//! list-then-watch with relist and synthetic deletes, leases.

#[derive(Debug, thiserror::Error)]
pub enum KvstoreError {}
