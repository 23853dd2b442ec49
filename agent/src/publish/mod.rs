//! What this node publishes into its own cluster's kvstore: its node object and endpoint
//! (ipcache) entries ([`publisher`]), and identities ([`allocator`]); and, from its pods,
//! the local endpoints of the state model ([`endpoints`]).

pub mod allocator;
pub mod endpoints;
pub mod publisher;
