//! Service load-balancing maps (Cilium's lb4 layout): a service is a set of entries keyed by
//! (VIP, port, proto, slot); slot 0 is the frontend (backend count, rev-nat id, flags),
//! slots 1..=count hold backend ids. Backends live in their own map by id; rev-nat ids map
//! back to the VIP so replies and `getpeername()` show the address the app dialled.
//!
//! Addresses and ports are stored in network byte order, exactly as they sit in a socket
//! address or a packet, so the datapath never swaps bytes.

/// Key of `LB4_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4Key {
    /// VIP, network byte order.
    pub address: u32,
    /// Port, network byte order.
    pub dport: u16,
    /// 0 = the frontend entry, 1..=count = backend slots.
    pub backend_slot: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Lb4Key>() == 12);

/// Value of `LB4_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Service {
    /// Backend id (slots ≥ 1); 0 in the frontend entry.
    pub backend_id: u32,
    /// Number of backend slots (frontend entry only). 0 = the service has no backend: connects
    /// fail fast with EHOSTUNREACH.
    pub count: u16,
    pub rev_nat_index: u16,
    /// `SVC_FLAG_*`.
    pub flags: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Lb4Service>() == 12);

/// The service is global (its backend set may include other clusters' backends).
pub const SVC_FLAG_GLOBAL: u8 = 1;

/// Value of `LB4_BACKENDS`, keyed by backend id (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Backend {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
    pub cluster_id: u16,
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Lb4Backend>() == 12);

pub const BACKEND_STATE_ACTIVE: u8 = 0;
/// Kept for existing connections (rev-nat), never selected for new ones.
pub const BACKEND_STATE_TERMINATING: u8 = 1;

/// Value of `LB4_REVNAT`, keyed by rev-nat id (u16).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4RevNat {
    /// VIP, network byte order.
    pub address: u32,
    /// Port, network byte order.
    pub port: u16,
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Lb4RevNat>() == 8);

/// Key of the socket rev-nat LRU map: which backend a socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatKey {
    pub cookie: u64,
    /// Backend address, network byte order.
    pub address: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 16);

/// Value of the socket rev-nat LRU map: the VIP the application addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatValue {
    pub address: u32,
    pub port: u16,
    pub rev_nat_index: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 8);

/// Default map sizes (overridable in the agent's config).
pub const DEFAULT_LB_SERVICES_MAX: u32 = 65_536;
pub const DEFAULT_LB_BACKENDS_MAX: u32 = 65_536;
pub const DEFAULT_LB_REVNAT_MAX: u32 = 65_536;
pub const DEFAULT_SOCK_REVNAT_MAX: u32 = 131_072;

/// Backend slot for a random number: uniform over 1..=count. `count` must be non-zero.
#[inline(always)]
pub const fn pick_slot(random: u32, count: u16) -> u16 {
    (random % count as u32) as u16 + 1
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), integer fields only, explicit padding (size assertions above).
    unsafe impl aya::Pod for super::Lb4Key {}
    unsafe impl aya::Pod for super::Lb4Service {}
    unsafe impl aya::Pod for super::Lb4Backend {}
    unsafe impl aya::Pod for super::Lb4RevNat {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNatValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cover_exactly_one_to_count() {
        let mut seen = [false; 5];
        for r in 0..1000u32 {
            let s = pick_slot(r.wrapping_mul(2_654_435_761), 4);
            assert!((1..=4).contains(&s));
            seen[s as usize] = true;
        }
        assert_eq!(seen, [false, true, true, true, true]);
        assert_eq!(pick_slot(u32::MAX, 1), 1);
    }
}
