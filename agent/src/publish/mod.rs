//! What this node publishes into its own cluster's kvstore: its node object and endpoint
//! (ipcache) entries ([`publisher`]), and identities ([`allocator`]).

pub mod allocator;
pub mod publisher;
