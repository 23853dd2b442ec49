//! ipcache: IPv4 prefix → who is there (identity, the node hosting it, encryption key,
//! whether it is in another cluster). An LPM trie keyed by the address in network byte order.

/// Value of `IPCACHE4` (key: LPM prefix length + IPv4 address as a network-order u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Node (WireGuard peer) address, network byte order; 0 when unknown.
    pub tunnel_endpoint: u32,
    pub cluster_id: u16,
    /// Encryption key index (Cilium's; non-zero = traffic to it is encrypted).
    pub encrypt_key: u8,
    /// `IPCACHE_FLAG_*`.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 12);

/// The prefix belongs to another cluster.
pub const IPCACHE_FLAG_REMOTE_CLUSTER: u8 = 1;

/// Reserved identities (Cilium's numbering).
pub const IDENTITY_UNKNOWN: u32 = 0;
pub const IDENTITY_HOST: u32 = 1;
/// Any address the ipcache does not know.
pub const IDENTITY_WORLD: u32 = 2;

pub const DEFAULT_IPCACHE_MAX: u32 = 512_000;

#[cfg(feature = "user")]
// SAFETY: repr(C), integer fields only, no padding (size assertion above).
unsafe impl aya::Pod for IpcacheValue {}
