//! Map layouts shared by the eBPF programs and the userspace agent.
//!
//! Every type that crosses the kernel boundary is defined once here, `#[repr(C)]` with
//! explicit padding and a compile-time size check, so both sides agree byte for byte.
#![no_std]

/// Bump when any map layout in this crate changes: the agent pins maps under a directory
/// named after it, so an agent never reuses pins written with another layout.
pub const SCHEMA_VERSION: u32 = 3;

/// Names of the programs and maps in the eBPF object (kernel object names: ≤ 15 bytes).
pub mod names {
    pub const PROG_COUNT_INGRESS: &str = "count_ingress";
    pub const PROG_COUNT_EGRESS: &str = "count_egress";
    pub const MAP_PACKET_COUNTERS: &str = "PKT_COUNTERS";

    pub const PROG_SOCK_CONNECT4: &str = "sock4_connect";
    pub const PROG_SOCK_SENDMSG4: &str = "sock4_sendmsg";
    pub const PROG_SOCK_RECVMSG4: &str = "sock4_recvmsg";
    pub const PROG_SOCK_GETPEERNAME4: &str = "sock4_getpeername";
    /// XDP wrapper around the socket-LB selection, for `BPF_PROG_TEST_RUN` (sock_addr
    /// programs have no test-run).
    pub const PROG_LB_TEST: &str = "lb4_test";
    /// tc ingress of a pod's host-side veth: packets FROM the pod (pod egress).
    pub const PROG_POLICY_FROM_POD: &str = "policy_from_pod";
    /// tc egress of a pod's host-side veth: packets TO the pod (pod ingress).
    pub const PROG_POLICY_TO_POD: &str = "policy_to_pod";

    pub const MAP_LB4_SERVICES: &str = "LB4_SERVICES";
    pub const MAP_LB4_BACKENDS: &str = "LB4_BACKENDS";
    pub const MAP_LB4_REVNAT: &str = "LB4_REVNAT";
    pub const MAP_SOCK_REVNAT: &str = "SOCK4_REVNAT";
    pub const MAP_IPCACHE: &str = "IPCACHE4";
    pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
    pub const MAP_POLICY: &str = "POLICY";
    pub const MAP_CT: &str = "CT4";
    pub const MAP_FLOW_EVENTS: &str = "FLOW_EVENTS";
    pub const MAP_DROP_COUNTERS: &str = "DROP_COUNTERS";
    pub const MAP_DP_CONFIG: &str = "DP_CONFIG";
    pub const MAP_ENCRYPT_GUARD: &str = "ENCRYPT_GUARD4";
    pub const MAP_FRAG: &str = "FRAG4";

    /// Every map the agent pins (the counter program's map is per-process).
    pub const PINNED_MAPS: [&str; 13] = [
        MAP_LB4_SERVICES,
        MAP_LB4_BACKENDS,
        MAP_LB4_REVNAT,
        MAP_SOCK_REVNAT,
        MAP_IPCACHE,
        MAP_ENDPOINTS,
        MAP_POLICY,
        MAP_CT,
        MAP_FLOW_EVENTS,
        MAP_DROP_COUNTERS,
        MAP_DP_CONFIG,
        MAP_ENCRYPT_GUARD,
        MAP_FRAG,
    ];
}

pub mod flow;
pub mod ipcache;
pub mod lb;
pub mod policy;

/// Which way a packet crossed the interface the counter program is attached to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Protocol class a packet is counted under.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketClass {
    /// Not IPv4, or too short to classify.
    Other = 0,
    Tcp = 1,
    Udp = 2,
    Icmp = 3,
    /// IPv4 with another protocol number.
    Ipv4Other = 4,
}

impl PacketClass {
    pub const COUNT: u32 = 5;
    pub const ALL: [PacketClass; Self::COUNT as usize] = [
        PacketClass::Other,
        PacketClass::Tcp,
        PacketClass::Udp,
        PacketClass::Icmp,
        PacketClass::Ipv4Other,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            PacketClass::Other => "other",
            PacketClass::Tcp => "tcp",
            PacketClass::Udp => "udp",
            PacketClass::Icmp => "icmp",
            PacketClass::Ipv4Other => "ipv4-other",
        }
    }
}

pub const ETH_HDR_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// Offset of the IPv4 protocol byte inside an Ethernet frame.
pub const IPV4_PROTO_OFFSET: usize = ETH_HDR_LEN + 9;

/// Classifies a frame from its EtherType (host byte order) and, for IPv4, its protocol
/// byte. Pure, so the rule is unit-tested on the host and shared with the eBPF side.
pub const fn classify(ethertype: u16, ipv4_proto: Option<u8>) -> PacketClass {
    if ethertype != ETH_P_IP {
        return PacketClass::Other;
    }
    match ipv4_proto {
        Some(IPPROTO_TCP) => PacketClass::Tcp,
        Some(IPPROTO_UDP) => PacketClass::Udp,
        Some(IPPROTO_ICMP) => PacketClass::Icmp,
        Some(_) => PacketClass::Ipv4Other,
        None => PacketClass::Other,
    }
}

/// Index into the `PKT_COUNTERS` per-CPU array.
pub const fn counter_index(direction: Direction, class: PacketClass) -> u32 {
    direction as u32 * PacketClass::COUNT + class as u32
}

/// Number of slots in the `PKT_COUNTERS` per-CPU array.
pub const COUNTER_SLOTS: u32 = 2 * PacketClass::COUNT;

/// Value of one `PKT_COUNTERS` slot on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<PacketCounter>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), only integer fields, no padding (checked by the size assertion above).
unsafe impl aya::Pod for PacketCounter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_ipv4_protocols() {
        assert_eq!(classify(ETH_P_IP, Some(IPPROTO_TCP)), PacketClass::Tcp);
        assert_eq!(classify(ETH_P_IP, Some(IPPROTO_UDP)), PacketClass::Udp);
        assert_eq!(classify(ETH_P_IP, Some(IPPROTO_ICMP)), PacketClass::Icmp);
        assert_eq!(classify(ETH_P_IP, Some(47)), PacketClass::Ipv4Other);
        assert_eq!(classify(ETH_P_IP, None), PacketClass::Other);
    }

    #[test]
    fn non_ipv4_is_other() {
        assert_eq!(classify(0x86dd, Some(IPPROTO_TCP)), PacketClass::Other);
        assert_eq!(classify(0x0806, None), PacketClass::Other);
    }

    #[test]
    fn counter_indices_are_distinct_and_in_range() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for d in Direction::ALL {
            for c in PacketClass::ALL {
                let i = counter_index(d, c);
                assert!(i < COUNTER_SLOTS);
                assert!(!seen[i as usize], "slot {i} used twice");
                seen[i as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }
}
