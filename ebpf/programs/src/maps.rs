//! Every map of the data plane, in one place. All are pinned by name under the pin directory
//! the loader chooses, so a restarted owner adopts them (and the flows they hold). Sizes here are
//! the defaults; the loader overrides them from its settings.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use ebpf_common::{
    AffinityEntry, AffinityKey, Backend, COUNTER_COUNT, CtEntry, FlowKey, MaglevLanes, RevNat,
    ServiceKey, ServiceValue, SockFwdKey, SockRevKey, defaults,
};

/// ServiceKey (VIP, port, proto) -> ServiceValue. Not preallocated: memory grows with services,
/// and a replaced value is freed after an RCU grace period, so readers never see it torn.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(defaults::MAX_SERVICES, BPF_F_NO_PREALLOC);

/// u32 slot -> Backend. A service owns `backend_count` slots from `backend_first`. Userspace
/// writes slots through mmap and publishes them with one SERVICES update.
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::pinned(defaults::BACKEND_SLOTS, BPF_F_MMAPABLE);

/// u32 element -> four Maglev table entries (u16 backend index within the service).
#[map(name = "MAGLEV")]
pub static MAGLEV: Array<MaglevLanes> = Array::pinned(defaults::MAGLEV_ELEMENTS, BPF_F_MMAPABLE);

/// FlowKey (client -> VIP) -> CtEntry: the backend a flow sticks to.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::pinned(defaults::CT_ENTRIES, BPF_F_NO_COMMON_LRU);

/// FlowKey (backend -> client) -> RevNat: the service address replies must carry.
#[map(name = "REVNAT")]
pub static REVNAT: LruHashMap<FlowKey, RevNat> =
    LruHashMap::pinned(defaults::CT_ENTRIES, BPF_F_NO_COMMON_LRU);

/// AffinityKey (client IP, service id) -> AffinityEntry: ClientIP session affinity.
#[map(name = "AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::pinned(defaults::AFFINITY_ENTRIES, 0);

/// Counter index -> packets, per CPU.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

/// Netns cookie -> enabled: the pods whose sockets are load balanced at connect/sendmsg time.
#[map(name = "SOCK_NETNS")]
pub static SOCK_NETNS: HashMap<u64, u32> =
    HashMap::pinned(defaults::SOCK_NETNS_ENTRIES, BPF_F_NO_PREALLOC);

/// SockRevKey (socket cookie, backend) -> RevNat: what getpeername and recvmsg must show.
#[map(name = "SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, RevNat> =
    LruHashMap::pinned(defaults::SOCK_REVNAT_ENTRIES, 0);

/// SockFwdKey (socket cookie, service) -> CtEntry: an unconnected UDP socket's backend.
#[map(name = "SOCK_FWD")]
pub static SOCK_FWD: LruHashMap<SockFwdKey, CtEntry> =
    LruHashMap::pinned(defaults::SOCK_FWD_ENTRIES, 0);
