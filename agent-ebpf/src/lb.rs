//! Socket-layer load balancing: `connect()`/`sendmsg()` to a service VIP are rewritten once,
//! to a backend of the merged (local + remote) set, before any packet exists; `recvmsg()` and
//! `getpeername()` translate the backend back to the VIP so the application only ever sees
//! the address it dialled.

use aya_ebpf::{
    bindings::{bpf_sock_addr, xdp_action},
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock_addr, xdp},
    programs::{SockAddrContext, XdpContext},
};
use strait_common::{
    ETH_HDR_LEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP,
    flow::DropReason,
    lb::{Lb4Backend, Lb4Key, SockRevNatKey, SockRevNatValue, pick_slot},
};

use crate::maps::{LB4_BACKENDS, LB4_REVNAT, LB4_SERVICES, SOCK4_REVNAT, count_drop};

/// sock_addr verdicts.
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;
const EHOSTUNREACH: i32 = 113;

pub enum Selection {
    /// Not a service VIP: leave the address alone.
    NotService,
    /// A service without a usable backend.
    NoBackend,
    Backend(Lb4Backend, u16),
}

/// Picks a backend for VIP:port/proto (network byte order). Shared by the socket programs
/// and the XDP test wrapper, so TestRun exercises exactly this code.
#[inline(always)]
pub fn lb4_select(address: u32, dport: u16, proto: u8, random: u32) -> Selection {
    let mut key = Lb4Key {
        address,
        dport,
        backend_slot: 0,
        proto,
        pad: [0; 3],
    };
    // SAFETY: read-only copy out of the map value.
    let Some(svc) = (unsafe { LB4_SERVICES.get(key) }).copied() else {
        return Selection::NotService;
    };
    if svc.count == 0 {
        return Selection::NoBackend;
    }
    key.backend_slot = pick_slot(random, svc.count);
    // Userspace shrinks a set by rewriting the frontend before deleting the extra slots; a
    // reader that saw the old count may miss a slot, so fall back to slot 1, always present.
    // SAFETY: as above.
    let slot = match unsafe { LB4_SERVICES.get(key) } {
        Some(s) => *s,
        None => {
            key.backend_slot = 1;
            match unsafe { LB4_SERVICES.get(key) } {
                Some(s) => *s,
                None => return Selection::NoBackend,
            }
        }
    };
    // SAFETY: as above.
    match unsafe { LB4_BACKENDS.get(slot.backend_id) } {
        Some(b) => Selection::Backend(*b, svc.rev_nat_index),
        None => Selection::NoBackend,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    sock4_forward(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    sock4_forward(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    sock4_reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    sock4_reverse(&ctx)
}

#[inline(always)]
fn sock4_forward(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid context for the whole program run.
    let (address, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let (vport, proto) = (port as u16, proto as u8);
    // SAFETY: helper without memory arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    match lb4_select(address, vport, proto, random) {
        Selection::NotService => SYS_PROCEED,
        Selection::NoBackend => {
            count_drop(DropReason::NoServiceBackend);
            // Fail fast with "no route to host" instead of the default EPERM or a hang.
            // SAFETY: helper without memory arguments.
            unsafe { bpf_set_retval(-EHOSTUNREACH) };
            SYS_REJECT
        }
        Selection::Backend(backend, rev_nat_index) => {
            // SAFETY: the context is a valid sock_addr for this run.
            let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
            let key = SockRevNatKey {
                cookie,
                address: backend.address,
                port: backend.port,
                pad: [0; 2],
            };
            let value = SockRevNatValue {
                address,
                port: vport,
                rev_nat_index,
            };
            // An LRU insert only fails on a kernel error; the connection still goes through,
            // only getpeername/recvmsg would show the backend.
            let _ = SOCK4_REVNAT.insert(key, value, 0);
            // SAFETY: writable sock_addr fields for connect4/sendmsg4.
            unsafe {
                (*sa).user_ip4 = backend.address;
                (*sa).user_port = u32::from(backend.port);
            }
            SYS_PROCEED
        }
    }
}

#[inline(always)]
fn sock4_reverse(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: valid context; cookie helper reads the socket behind it.
    let key = unsafe {
        SockRevNatKey {
            cookie: bpf_get_socket_cookie(sa.cast()),
            address: (*sa).user_ip4,
            port: (*sa).user_port as u16,
            pad: [0; 2],
        }
    };
    // SAFETY: read-only copy.
    let Some(value) = (unsafe { SOCK4_REVNAT.get(key) }).copied() else {
        return SYS_PROCEED;
    };
    // Only while the service still exists: a deleted service shows the real peer.
    // SAFETY: read-only lookup.
    if unsafe { LB4_REVNAT.get(value.rev_nat_index) }.is_none() {
        return SYS_PROCEED;
    }
    // SAFETY: writable sock_addr fields for recvmsg4/getpeername4.
    unsafe {
        (*sa).user_ip4 = value.address;
        (*sa).user_port = u32::from(value.port);
    }
    SYS_PROCEED
}

/// Test wrapper: runs [`lb4_select`] on the destination of a crafted Ethernet/IPv4/TCP|UDP
/// frame and rewrites the destination address and port in place (checksums untouched).
/// XDP_TX = translated, XDP_DROP = service without backend, XDP_PASS = not a service.
#[xdp]
pub fn lb4_test(ctx: XdpContext) -> u32 {
    try_lb4_test(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

const IPV4_DADDR: usize = ETH_HDR_LEN + 16;
const L4_DPORT: usize = ETH_HDR_LEN + 20 + 2;

#[inline(always)]
fn try_lb4_test(ctx: &XdpContext) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + L4_DPORT + 2 > end {
        return Err(());
    }
    let ptr = start as *mut u8;
    // SAFETY: bounds checked above for every offset used below.
    unsafe {
        let ethertype = u16::from_be(core::ptr::read_unaligned(ptr.add(12).cast::<u16>()));
        let proto = *ptr.add(ETH_HDR_LEN + 9);
        if ethertype != ETH_P_IP || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
            return Ok(xdp_action::XDP_PASS);
        }
        let daddr = core::ptr::read_unaligned(ptr.add(IPV4_DADDR).cast::<u32>());
        let dport = core::ptr::read_unaligned(ptr.add(L4_DPORT).cast::<u16>());
        match lb4_select(daddr, dport, proto, bpf_get_prandom_u32()) {
            Selection::NotService => Ok(xdp_action::XDP_PASS),
            Selection::NoBackend => Ok(xdp_action::XDP_DROP),
            Selection::Backend(b, _) => {
                core::ptr::write_unaligned(ptr.add(IPV4_DADDR).cast::<u32>(), b.address);
                core::ptr::write_unaligned(ptr.add(L4_DPORT).cast::<u16>(), b.port);
                Ok(xdp_action::XDP_TX)
            }
        }
    }
}
