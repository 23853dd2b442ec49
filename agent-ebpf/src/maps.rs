//! Every map of the datapath, declared once. Sizes here are defaults: the agent overrides
//! them at load time from its config, and pins the maps so a restarted agent reuses them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use strait_common::{
    flow::{CONFIG_SLOTS, DEFAULT_FLOW_RING_BYTES, DEFAULT_GUARD_MAX, DropReason},
    ipcache::{DEFAULT_IPCACHE_MAX, IpcacheValue},
    lb::{
        DEFAULT_LB_BACKENDS_MAX, DEFAULT_LB_REVNAT_MAX, DEFAULT_LB_SERVICES_MAX,
        DEFAULT_SOCK_REVNAT_MAX, Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service, SockRevNatKey,
        SockRevNatValue,
    },
    policy::{
        CtKey, CtValue, DEFAULT_CT_MAX, DEFAULT_ENDPOINTS_MAX, DEFAULT_FRAG_MAX,
        DEFAULT_POLICY_MAX, EndpointInfo, FragKey, FragValue, PolicyKey, PolicyValue,
    },
};

/// LPM tries must be created without preallocation.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "LB4_SERVICES")]
pub static LB4_SERVICES: HashMap<Lb4Key, Lb4Service> =
    HashMap::with_max_entries(DEFAULT_LB_SERVICES_MAX, 0);

#[map(name = "LB4_BACKENDS")]
pub static LB4_BACKENDS: HashMap<u32, Lb4Backend> =
    HashMap::with_max_entries(DEFAULT_LB_BACKENDS_MAX, 0);

#[map(name = "LB4_REVNAT")]
pub static LB4_REVNAT: HashMap<u16, Lb4RevNat> =
    HashMap::with_max_entries(DEFAULT_LB_REVNAT_MAX, 0);

#[map(name = "SOCK4_REVNAT")]
pub static SOCK4_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(DEFAULT_SOCK_REVNAT_MAX, 0);

#[map(name = "IPCACHE4")]
pub static IPCACHE4: LpmTrie<u32, IpcacheValue> =
    LpmTrie::with_max_entries(DEFAULT_IPCACHE_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ENDPOINTS")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> =
    HashMap::with_max_entries(DEFAULT_ENDPOINTS_MAX, 0);

#[map(name = "POLICY")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::with_max_entries(DEFAULT_POLICY_MAX, BPF_F_NO_PREALLOC);

#[map(name = "CT4")]
pub static CT4: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(DEFAULT_CT_MAX, 0);

#[map(name = "FRAG4")]
pub static FRAG4: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(DEFAULT_FRAG_MAX, 0);

#[map(name = "FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_FLOW_RING_BYTES, 0);

#[map(name = "DROP_COUNTERS")]
pub static DROP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

#[map(name = "ENCRYPT_GUARD4")]
pub static ENCRYPT_GUARD4: LpmTrie<u32, u32> =
    LpmTrie::with_max_entries(DEFAULT_GUARD_MAX, BPF_F_NO_PREALLOC);

#[map(name = "DP_CONFIG")]
pub static DP_CONFIG: Array<u32> = Array::with_max_entries(CONFIG_SLOTS, 0);

/// Counts one drop (per CPU: no atomics needed).
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(slot) = DROP_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: valid pointer into this CPU's slot of a per-CPU array.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn config_flags() -> u32 {
    DP_CONFIG
        .get(strait_common::flow::CONFIG_SLOT_FLAGS)
        .copied()
        .unwrap_or(0)
}
