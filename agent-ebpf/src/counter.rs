//! Packet counter: a tc classifier that counts packets and bytes per direction and protocol
//! class in a per-CPU array, and lets every packet pass. The first program end to end; later
//! programs follow the same shape.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use strait_common::{
    COUNTER_SLOTS, Direction, ETH_HDR_LEN, ETH_P_IP, IPV4_PROTO_OFFSET, PacketCounter, classify,
    counter_index,
};

#[map(name = "PKT_COUNTERS")]
static PKT_COUNTERS: PerCpuArray<PacketCounter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[classifier]
pub fn count_ingress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Ingress)
}

#[classifier]
pub fn count_egress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Egress)
}

/// Counting never changes the verdict: a packet we cannot account for still passes.
#[inline(always)]
fn count(ctx: &TcContext, direction: Direction) -> i32 {
    let _ = try_count(ctx, direction);
    TC_ACT_OK
}

#[inline(always)]
fn try_count(ctx: &TcContext, direction: Direction) -> Result<(), ()> {
    let ethertype = ctx
        .load::<u16>(ETH_HDR_LEN - 2)
        .map(u16::from_be)
        .unwrap_or(0);
    let proto = if ethertype == ETH_P_IP {
        ctx.load::<u8>(IPV4_PROTO_OFFSET).ok()
    } else {
        None
    };
    let slot = PKT_COUNTERS
        .get_ptr_mut(counter_index(direction, classify(ethertype, proto)))
        .ok_or(())?;
    // SAFETY: the pointer comes from the map and is valid for this CPU's slot; per-CPU
    // storage means no other CPU writes it concurrently.
    let counter = unsafe { &mut *slot };
    counter.packets += 1;
    counter.bytes += u64::from(ctx.len());
    Ok(())
}
