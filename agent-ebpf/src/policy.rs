//! Identity-aware policy on a pod's host-side veth, stateful: a flow is checked once, when
//! conntrack has never seen it; packets of known flows and their replies pass.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use strait_common::{
    ETH_HDR_LEN, ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    flow::{
        CONFIG_FLAG_TRACE_ALLOWED, DropReason, FLOW_FLAG_REMOTE_UNKNOWN, FlowEvent, GUARD_NO_PEER,
        VERDICT_DROPPED, VERDICT_FORWARDED,
    },
    ipcache::IDENTITY_WORLD,
    policy::{
        CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, EP_FLAG_EGRESS_ENFORCED, EP_FLAG_INGRESS_ENFORCED,
        EndpointInfo, POLICY_PREFIX_FULL, PolicyKey, PolicyVerdict, policy_verdict,
    },
};

use crate::maps::{
    CT4, ENCRYPT_GUARD4, ENDPOINTS, FLOW_EVENTS, IPCACHE4, POLICY, config_flags, count_drop,
};

const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

#[classifier]
pub fn policy_from_pod(ctx: TcContext) -> i32 {
    policy(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn policy_to_pod(ctx: TcContext) -> i32 {
    policy(&ctx, DIR_INGRESS)
}

/// Headers the policy reads: Ethernet, IPv4 with options, the first 8 bytes of L4.
const MAX_HEADERS: usize = ETH_HDR_LEN + 60 + 8;

/// Bounds-checked pointer into the linear packet data (direct packet access: no helper call
/// per field, which is what keeps the per-packet cost low).
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, ()> {
    // SAFETY: bounds checked against data_end; unaligned reads are fine for packet data.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn policy(ctx: &TcContext, direction: u8) -> i32 {
    // SAFETY: the skb pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only copy of the endpoint entry.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }).copied() else {
        // Not an endpoint we manage (yet): nothing to enforce.
        return TC_ACT_OK;
    };
    let enforced = ep.flags
        & if direction == DIR_INGRESS {
            EP_FLAG_INGRESS_ENFORCED
        } else {
            EP_FLAG_EGRESS_ENFORCED
        }
        != 0;
    // Headers outside the linear area (rare for veth traffic): make them linear once.
    if ctx.data() + MAX_HEADERS > ctx.data_end() {
        let _ = ctx.pull_data(ctx.len().min(MAX_HEADERS as u32));
    }
    let ethertype = match read::<u16>(ctx, ETH_HDR_LEN - 2) {
        Ok(t) => u16::from_be(t),
        Err(()) => return TC_ACT_OK,
    };
    if ethertype == ETH_P_IPV6 && enforced {
        // The policy model is IPv4 only: an enforced direction never lets IPv6 through.
        count_drop(DropReason::UnsupportedL3);
        return TC_ACT_SHOT;
    }
    if ethertype != ETH_P_IP {
        return TC_ACT_OK;
    }
    match check_ipv4(ctx, ifindex, &ep, direction, enforced) {
        Ok(verdict) => verdict,
        // Truncated header: an enforced direction does not pass what it cannot read.
        Err(()) if enforced => TC_ACT_SHOT,
        Err(()) => TC_ACT_OK,
    }
}

#[inline(always)]
fn check_ipv4(
    ctx: &TcContext,
    ifindex: u32,
    ep: &EndpointInfo,
    direction: u8,
    enforced: bool,
) -> Result<i32, ()> {
    let ip = ETH_HDR_LEN;
    let vihl = read::<u8>(ctx, ip)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(());
    }
    let frag = u16::from_be(read::<u16>(ctx, ip + 6)?);
    let proto = read::<u8>(ctx, ip + 9)?;
    let saddr = read::<u32>(ctx, ip + 12)?;
    let daddr = read::<u32>(ctx, ip + 16)?;
    let l4 = ip + ihl;
    let first_fragment = frag & IPV4_FRAG_OFFSET_MASK == 0;
    let (sport, dport) = match proto {
        IPPROTO_TCP | IPPROTO_UDP if first_fragment => {
            (read::<u16>(ctx, l4)?, read::<u16>(ctx, l4 + 2)?)
        }
        IPPROTO_ICMP if first_fragment => {
            // Echo id in both slots: the reply carries the same id, so the swapped key of
            // the reply finds the request's entry.
            let id = read::<u16>(ctx, l4 + 4)?;
            (id, id)
        }
        _ => (0, 0),
    };
    let key = CtKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        direction,
        pad: [0; 2],
        endpoint: ifindex,
    };
    // SAFETY: helper without memory arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = CT4.get_ptr_mut(key) {
        // SAFETY: valid map value pointer; racing increments only make counters approximate.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).packets += 1;
        }
        return Ok(TC_ACT_OK);
    }
    if let Some(entry) = CT4.get_ptr_mut(key.reverse()) {
        // SAFETY: as above.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).reply_packets += 1;
        }
        return Ok(TC_ACT_OK);
    }

    // A new flow: who is on the other side?
    let remote = if direction == DIR_EGRESS {
        daddr
    } else {
        saddr
    };
    let (remote_identity, remote_cluster, unknown) = match IPCACHE4.get(Key::new(32, remote)) {
        Some(v) => (v.identity, v.cluster_id, false),
        None => (IDENTITY_WORLD, 0, true),
    };
    // Strict encryption, seen from the pod: a new flow to a remote pod CIDR that has no
    // WireGuard peer would leave in clear. The route is `unreachable` anyway; dropping here
    // makes it a flow event with a reason.
    let no_peer = direction == DIR_EGRESS
        && ENCRYPT_GUARD4.get(Key::new(32, daddr)).copied() == Some(GUARD_NO_PEER);
    let verdict = if no_peer {
        PolicyVerdict::NoMatch
    } else if enforced {
        let lookup = |identity: u32| {
            POLICY
                .get(Key::new(
                    POLICY_PREFIX_FULL,
                    PolicyKey {
                        endpoint: ifindex,
                        identity,
                        direction,
                        proto,
                        dport,
                    },
                ))
                .map(|v| v.flags)
        };
        policy_verdict(lookup(remote_identity), lookup(0))
    } else {
        PolicyVerdict::Allow
    };
    let (src_identity, dst_identity) = if direction == DIR_EGRESS {
        (ep.identity, remote_identity)
    } else {
        (remote_identity, ep.identity)
    };
    let mut event = FlowEvent {
        ts_ns: now,
        saddr,
        daddr,
        sport,
        dport,
        proto,
        direction,
        verdict: VERDICT_FORWARDED,
        reason: DropReason::None as u8,
        endpoint: ifindex,
        src_identity,
        dst_identity,
        remote_cluster_id: remote_cluster,
        flags: if unknown { FLOW_FLAG_REMOTE_UNKNOWN } else { 0 },
    };
    let reason = match verdict {
        PolicyVerdict::Allow => {
            let value = CtValue {
                created_ns: now,
                last_seen_ns: now,
                packets: 1,
                reply_packets: 0,
                remote_identity,
                pad: 0,
            };
            if CT4.insert(key, value, 0).is_ok() {
                if config_flags() & CONFIG_FLAG_TRACE_ALLOWED != 0 {
                    let _ = FLOW_EVENTS.output::<FlowEvent>(&event, 0);
                }
                return Ok(TC_ACT_OK);
            }
            DropReason::CtMapFull
        }
        PolicyVerdict::DenyRule => DropReason::PolicyDenyRule,
        PolicyVerdict::NoMatch if no_peer => DropReason::NoEncryptionPeer,
        PolicyVerdict::NoMatch => DropReason::PolicyDenied,
    };
    count_drop(reason);
    event.verdict = VERDICT_DROPPED;
    event.reason = reason as u8;
    // A full ring buffer loses the event, never the verdict; userspace counts drops anyway.
    let _ = FLOW_EVENTS.output::<FlowEvent>(&event, 0);
    Ok(TC_ACT_SHOT)
}
