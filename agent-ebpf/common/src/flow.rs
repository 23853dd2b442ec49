//! Flow events (ring buffer to userspace), drop reasons and the datapath config array.

/// One flow event. Addresses and ports in network byte order, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub ts_ns: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `DIR_INGRESS` / `DIR_EGRESS` from the local pod's point of view.
    pub direction: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `DropReason` as u8 (0 for forwarded flows).
    pub reason: u8,
    /// Host-side ifindex of the local endpoint.
    pub endpoint: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Cluster id of the remote side (from the ipcache; 0 = unknown / world).
    pub remote_cluster_id: u16,
    /// `FLOW_FLAG_*`.
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 40);

pub const VERDICT_FORWARDED: u8 = 0;
pub const VERDICT_DROPPED: u8 = 1;

/// The remote address was not in the ipcache, so it was treated as `world` — possibly an
/// endpoint of a cluster not synced yet.
pub const FLOW_FLAG_REMOTE_UNKNOWN: u16 = 1;

/// Why a packet was dropped (index into the `DROP_COUNTERS` per-CPU array).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    None = 0,
    /// Direction enforced and no rule allows the flow.
    PolicyDenied = 1,
    /// An explicit deny rule matched.
    PolicyDenyRule = 2,
    /// A policy-enforced endpoint saw an L3 protocol the policy cannot express (IPv6 here).
    UnsupportedL3 = 3,
    /// A connect/sendmsg to a service VIP that has no backend.
    NoServiceBackend = 4,
    /// The conntrack table refused a new entry (map full).
    CtMapFull = 5,
    /// Strict encryption: the destination is a remote pod CIDR without a WireGuard peer, so
    /// the packet would leave unencrypted.
    NoEncryptionPeer = 6,
    /// A later fragment of a datagram whose first fragment was not seen (or not allowed) on
    /// an enforced direction: without ports it cannot be matched to a flow.
    FragNotFound = 7,
}

impl DropReason {
    pub const COUNT: u32 = 8;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        DropReason::None,
        DropReason::PolicyDenied,
        DropReason::PolicyDenyRule,
        DropReason::UnsupportedL3,
        DropReason::NoServiceBackend,
        DropReason::CtMapFull,
        DropReason::NoEncryptionPeer,
        DropReason::FragNotFound,
    ];

    pub const fn from_u8(v: u8) -> Option<DropReason> {
        if (v as u32) < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// Stable name (metric label, `strait observe`), in Cilium's wording where one exists.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::None => "none",
            DropReason::PolicyDenied => "policy denied",
            DropReason::PolicyDenyRule => "policy deny rule",
            DropReason::UnsupportedL3 => "unsupported L3 protocol",
            DropReason::NoServiceBackend => "no service backend",
            DropReason::CtMapFull => "conntrack map full",
            DropReason::NoEncryptionPeer => "no encryption peer (strict mode)",
            DropReason::FragNotFound => "fragment of an unknown datagram",
        }
    }
}

/// Values of the `ENCRYPT_GUARD4` LPM map (IPv4 prefix → u32), mirroring the routes strict
/// encryption installs: prefixes routed into the WireGuard device, and strict prefixes
/// without a peer (`unreachable`).
pub const GUARD_ENCRYPTED: u32 = 1;
pub const GUARD_NO_PEER: u32 = 2;
pub const DEFAULT_GUARD_MAX: u32 = 65_536;

/// Slots of the `DP_CONFIG` array (u32 each).
pub const CONFIG_SLOT_FLAGS: u32 = 0;
pub const CONFIG_SLOTS: u32 = 4;
/// Also emit an event for every new allowed flow (not only drops).
pub const CONFIG_FLAG_TRACE_ALLOWED: u32 = 1;

/// Ring buffer size in bytes (a power of two, multiple of the page size).
pub const DEFAULT_FLOW_RING_BYTES: u32 = 1 << 20;

#[cfg(feature = "user")]
// SAFETY: repr(C), integer fields only, no padding (size assertion above).
unsafe impl aya::Pod for FlowEvent {}
