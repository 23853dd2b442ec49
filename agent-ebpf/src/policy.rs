//! Identity-aware policy on a pod's host-side veth, stateful: a flow is checked when
//! conntrack has never seen it, and again when the endpoint's policy revision moved since
//! (a new deny ends established flows at their next packet); otherwise packets of known flows
//! and their replies pass. ICMP errors about a known flow and later fragments of a known
//! flow's datagrams belong to that flow.

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
        EndpointInfo, FragKey, FragValue, POLICY_PREFIX_FULL, PolicyKey, PolicyVerdict,
        policy_verdict,
    },
};

use crate::maps::{
    CT4, ENCRYPT_GUARD4, ENDPOINTS, FLOW_EVENTS, FRAG4, IPCACHE4, POLICY, config_flags, count_drop,
};

const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
/// ICMP errors: they carry the header of the packet they are about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[classifier]
pub fn policy_from_pod(ctx: TcContext) -> i32 {
    policy(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn policy_to_pod(ctx: TcContext) -> i32 {
    policy(&ctx, DIR_INGRESS)
}

/// Headers the policy reads: Ethernet, IPv4 with options, the first 8 bytes of L4, and for
/// an ICMP error the embedded IPv4 header with options and 8 bytes of its L4.
const MAX_HEADERS: usize = ETH_HDR_LEN + 60 + 8 + 60 + 8;

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

/// Two bytes at `offset`, in packet order.
#[inline(always)]
fn byte_pair(ctx: &TcContext, offset: usize) -> Result<[u8; 2], ()> {
    read::<[u8; 2]>(ctx, offset)
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
    let enforced = is_enforced(&ep, direction);
    // Headers outside the linear area (rare for veth traffic): make them linear once.
    let want = ctx.len().min(MAX_HEADERS as u32);
    if ctx.data() + want as usize > ctx.data_end() {
        let _ = ctx.pull_data(want);
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
fn is_enforced(ep: &EndpointInfo, direction: u8) -> bool {
    ep.flags
        & if direction == DIR_INGRESS {
            EP_FLAG_INGRESS_ENFORCED
        } else {
            EP_FLAG_EGRESS_ENFORCED
        }
        != 0
}

#[inline(always)]
fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    )
}

/// What the policy says about a flow (keyed as it was first seen), and who the remote is.
struct Decision {
    verdict: PolicyVerdict,
    remote_identity: u32,
    remote_cluster: u16,
    unknown: bool,
    no_peer: bool,
}

#[inline(always)]
fn decide(ep: &EndpointInfo, flow: &CtKey) -> Decision {
    let direction = flow.direction;
    let remote = if direction == DIR_EGRESS {
        flow.daddr
    } else {
        flow.saddr
    };
    let (remote_identity, remote_cluster, unknown) = match IPCACHE4.get(Key::new(32, remote)) {
        Some(v) => (v.identity, v.cluster_id, false),
        None => (IDENTITY_WORLD, 0, true),
    };
    // Strict encryption, seen from the pod: a new flow to a remote pod CIDR that has no
    // WireGuard peer would leave in clear. The route is `unreachable` anyway; dropping here
    // makes it a flow event with a reason.
    let no_peer = direction == DIR_EGRESS
        && ENCRYPT_GUARD4.get(Key::new(32, flow.daddr)).copied() == Some(GUARD_NO_PEER);
    let verdict = if no_peer {
        PolicyVerdict::NoMatch
    } else if is_enforced(ep, direction) {
        let lookup = |identity: u32| {
            POLICY
                .get(Key::new(
                    POLICY_PREFIX_FULL,
                    PolicyKey {
                        endpoint: flow.endpoint,
                        identity,
                        direction,
                        proto: flow.proto,
                        dport: flow.dport,
                    },
                ))
                .map(|v| v.flags)
        };
        policy_verdict(lookup(remote_identity), lookup(0))
    } else {
        PolicyVerdict::Allow
    };
    Decision {
        verdict,
        remote_identity,
        remote_cluster,
        unknown,
        no_peer,
    }
}

#[inline(always)]
fn drop_reason(d: &Decision) -> DropReason {
    match d.verdict {
        PolicyVerdict::Allow => DropReason::None,
        PolicyVerdict::DenyRule => DropReason::PolicyDenyRule,
        PolicyVerdict::NoMatch if d.no_peer => DropReason::NoEncryptionPeer,
        PolicyVerdict::NoMatch => DropReason::PolicyDenied,
    }
}

/// A known flow's entry: checked again when the endpoint's policy moved since it was last
/// allowed (then the flow's verdict is written back once, or the entry goes). Packets of
/// unchanged policy only touch the entry's own counters: no extra write per packet.
/// `Err` carries the decision that ended the flow.
#[inline(always)]
fn follow(
    entry: *mut CtValue,
    flow: &CtKey,
    ep: &EndpointInfo,
    now: u64,
    count: Option<bool>,
) -> Result<(), Decision> {
    // SAFETY: valid map value pointer; racing writers only make counters approximate.
    unsafe {
        if (*entry).policy_revision != ep.policy_revision {
            let d = decide(ep, flow);
            if d.verdict != PolicyVerdict::Allow {
                let _ = CT4.remove(flow);
                return Err(d);
            }
            (*entry).policy_revision = ep.policy_revision;
            (*entry).remote_identity = d.remote_identity;
        }
        match count {
            Some(false) => {
                (*entry).last_seen_ns = now;
                (*entry).packets += 1;
            }
            Some(true) => {
                (*entry).last_seen_ns = now;
                (*entry).reply_packets += 1;
            }
            None => {}
        }
    }
    Ok(())
}

/// Looks `key` up as a packet of a known flow or as a reply of one. `None`: conntrack has
/// never seen the flow.
#[inline(always)]
fn established(
    key: &CtKey,
    ep: &EndpointInfo,
    now: u64,
    count: bool,
) -> Option<Result<(), Decision>> {
    if let Some(entry) = CT4.get_ptr_mut(key) {
        return Some(follow(entry, key, ep, now, count.then_some(false)));
    }
    let reply = key.reverse();
    if let Some(entry) = CT4.get_ptr_mut(reply) {
        return Some(follow(entry, &reply, ep, now, count.then_some(true)));
    }
    None
}

/// The flow an ICMP error (its message starting at `msg`) is about, keyed as the embedded
/// packet travelled: the opposite direction of the error, at the same endpoint.
#[inline(always)]
fn embedded_flow(ctx: &TcContext, msg: usize, direction: u8, ifindex: u32) -> Result<CtKey, ()> {
    let ip = msg + 8;
    // Single bytes at a variable offset are read in pairs: the compiler turns a one-byte
    // bounds check into a comparison older verifiers cannot use.
    let ihl = usize::from(byte_pair(ctx, ip)?[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(());
    }
    let frag = u16::from_be(read::<u16>(ctx, ip + 6)?);
    let proto = byte_pair(ctx, ip + 8)?[1];
    let l4 = ip + ihl;
    let (sport, dport) = match proto {
        _ if frag & IPV4_FRAG_OFFSET_MASK != 0 => (0, 0),
        IPPROTO_TCP | IPPROTO_UDP => (read::<u16>(ctx, l4)?, read::<u16>(ctx, l4 + 2)?),
        IPPROTO_ICMP => {
            let id = read::<u16>(ctx, l4 + 4)?;
            (id, id)
        }
        _ => (0, 0),
    };
    Ok(CtKey {
        saddr: read::<u32>(ctx, ip + 12)?,
        daddr: read::<u32>(ctx, ip + 16)?,
        sport,
        dport,
        proto,
        direction: direction ^ 1,
        pad: [0; 2],
        endpoint: ifindex,
    })
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
    let id = read::<u16>(ctx, ip + 4)?;
    let frag = u16::from_be(read::<u16>(ctx, ip + 6)?);
    let proto = read::<u8>(ctx, ip + 9)?;
    let saddr = read::<u32>(ctx, ip + 12)?;
    let daddr = read::<u32>(ctx, ip + 16)?;
    let l4 = ip + ihl;
    let first_fragment = frag & IPV4_FRAG_OFFSET_MASK == 0;
    let fragmented = !first_fragment || frag & IPV4_MORE_FRAGMENTS != 0;
    let frag_key = FragKey {
        saddr,
        daddr,
        id,
        proto,
        direction,
        endpoint: ifindex,
    };
    // SAFETY: helper without memory arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // A TCP packet opening a connection (SYN without ACK).
    let mut tcp_open = false;
    let (sport, dport) = if !first_fragment {
        // No L4 header here: the first fragment left the datagram's ports.
        // SAFETY: read-only copy.
        match unsafe { FRAG4.get(frag_key) }.copied() {
            Some(p) => (p.sport, p.dport),
            None if enforced => {
                count_drop(DropReason::FragNotFound);
                return Ok(TC_ACT_SHOT);
            }
            None => return Ok(TC_ACT_OK),
        }
    } else {
        match proto {
            IPPROTO_TCP | IPPROTO_UDP => {
                if proto == IPPROTO_TCP {
                    tcp_open = byte_pair(ctx, l4 + 12)?[1] & (TCP_SYN | TCP_ACK) == TCP_SYN;
                }
                (read::<u16>(ctx, l4)?, read::<u16>(ctx, l4 + 2)?)
            }
            IPPROTO_ICMP => {
                if is_icmp_error(byte_pair(ctx, l4)?[0])
                    && let Ok(about) = embedded_flow(ctx, l4, direction, ifindex)
                {
                    // Related to a known flow (e.g. fragmentation needed on its path): it
                    // passes as that flow would. Anything else is judged as a flow of its own.
                    match established(&about, ep, now, false) {
                        Some(Ok(())) => return Ok(TC_ACT_OK),
                        Some(Err(d)) => {
                            count_drop(drop_reason(&d));
                            return Ok(TC_ACT_SHOT);
                        }
                        None => {}
                    }
                }
                // Echo id in both slots: the reply carries the same id, so the swapped key of
                // the reply finds the request's entry.
                let id = read::<u16>(ctx, l4 + 4)?;
                (id, id)
            }
            _ => (0, 0),
        }
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
    let decision = match established(&key, ep, now, true) {
        Some(Ok(())) => {
            remember_fragment(first_fragment && fragmented, &frag_key, sport, dport);
            return Ok(TC_ACT_OK);
        }
        // The policy moved and no longer allows this flow: its entry is gone.
        Some(Err(d)) => d,
        // A new flow.
        None => decide(ep, &key),
    };
    let (src_identity, dst_identity) = if direction == DIR_EGRESS {
        (ep.identity, decision.remote_identity)
    } else {
        (decision.remote_identity, ep.identity)
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
        remote_cluster_id: decision.remote_cluster,
        flags: if decision.unknown {
            FLOW_FLAG_REMOTE_UNKNOWN
        } else {
            0
        },
    };
    let reason = match decision.verdict {
        // Mid-connection TCP where no policy applies passes, but opens no entry: only a
        // SYN or an explicit allow does. Otherwise the other side's retransmission would
        // re-create, as a reply leg, a flow the policy has just ended.
        PolicyVerdict::Allow if proto == IPPROTO_TCP && !tcp_open && !enforced => {
            return Ok(TC_ACT_OK);
        }
        PolicyVerdict::Allow => {
            let value = CtValue {
                created_ns: now,
                last_seen_ns: now,
                packets: 1,
                reply_packets: 0,
                remote_identity: decision.remote_identity,
                policy_revision: ep.policy_revision,
            };
            if CT4.insert(key, value, 0).is_ok() {
                remember_fragment(first_fragment && fragmented, &frag_key, sport, dport);
                if config_flags() & CONFIG_FLAG_TRACE_ALLOWED != 0 {
                    let _ = FLOW_EVENTS.output::<FlowEvent>(&event, 0);
                }
                return Ok(TC_ACT_OK);
            }
            DropReason::CtMapFull
        }
        _ => drop_reason(&decision),
    };
    if fragmented {
        // A datagram that ends here: its later fragments must not find an older datagram's
        // ports under a reused id.
        let _ = FRAG4.remove(frag_key);
    }
    count_drop(reason);
    event.verdict = VERDICT_DROPPED;
    event.reason = reason as u8;
    // A full ring buffer loses the event, never the verdict; userspace counts drops anyway.
    let _ = FLOW_EVENTS.output::<FlowEvent>(&event, 0);
    Ok(TC_ACT_SHOT)
}

/// The first fragment of an allowed datagram leaves its ports for the later fragments
/// (written once per fragmented datagram, never for whole packets).
#[inline(always)]
fn remember_fragment(first_of_many: bool, key: &FragKey, sport: u16, dport: u16) {
    if first_of_many {
        let _ = FRAG4.insert(key, FragValue { sport, dport }, 0);
    }
}
