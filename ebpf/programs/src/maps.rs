//! Every map of the data plane, in one place. All are pinned by name under the pin directory
//! the loader chooses, so a restarted owner adopts them (and the flows they hold). Sizes here are
//! the defaults; the loader overrides them from its settings. Names come from
//! `ebpf_common::for_each_map!`, the one list userspace reads too.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use ebpf_common::{
    AffinityEntry, AffinityKey, Backend, COUNTER_COUNT, CtEntry, FlowKey, FragKey, FragPorts,
    MaglevLanes, MemberKey, NodeConfig, PodSources, Ranges, RevNat, ServiceKey, ServiceValue,
    SockFwdKey, SockRevKey, SourceRange, defaults, map_name,
};

/// A map definition under its name from the shared list (what aya's `#[map]` does, with the
/// name taken from `ebpf_common` instead of written here).
macro_rules! map {
    ($(#[$doc:meta])* $constant:ident: $ty:ty = $init:expr) => {
        $(#[$doc])*
        #[unsafe(link_section = "maps")]
        #[unsafe(export_name = map_name!($constant))]
        pub static $constant: $ty = $init;
    };
}

map! {
    /// ServiceKey (VIP, port, proto) -> ServiceValue. Not preallocated: memory grows with
    /// services, and a replaced value is freed after an RCU grace period, so readers never see
    /// it torn.
    SERVICES: HashMap<ServiceKey, ServiceValue> =
        HashMap::pinned(defaults::MAX_SERVICES, BPF_F_NO_PREALLOC)
}

map! {
    /// u32 slot -> Backend. A service owns `backend_count` slots from `backend_first`.
    /// Userspace writes slots through mmap and publishes them with one SERVICES update.
    BACKENDS: Array<Backend> = Array::pinned(defaults::BACKEND_SLOTS, BPF_F_MMAPABLE)
}

map! {
    /// MemberKey (service id, backend) -> 1: the backends each service has now, whatever
    /// slots they sit in. Not preallocated.
    MEMBERS: HashMap<MemberKey, u32> = HashMap::pinned(defaults::MEMBERS, BPF_F_NO_PREALLOC)
}

map! {
    /// u32 element -> four Maglev table entries (u16 backend index within the service).
    MAGLEV: Array<MaglevLanes> = Array::pinned(defaults::MAGLEV_ELEMENTS, BPF_F_MMAPABLE)
}

map! {
    /// FlowKey (client -> VIP) -> CtEntry: the backend a flow sticks to. One LRU for all CPUs,
    /// so a full map evicts the least recently used flow of the node, not of one CPU's share.
    CONNTRACK: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(defaults::CT_ENTRIES, 0)
}

map! {
    /// FlowKey (backend -> client, as the backend sees it) -> RevNat: the service address
    /// replies must carry.
    REVNAT: LruHashMap<FlowKey, RevNat> = LruHashMap::pinned(defaults::CT_ENTRIES, 0)
}

map! {
    /// AffinityKey (client IP, service id) -> AffinityEntry: ClientIP session affinity.
    AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
        LruHashMap::pinned(defaults::AFFINITY_ENTRIES, 0)
}

map! {
    /// FragKey -> FragPorts: translated datagrams being fragmented, by their first fragment's
    /// ports.
    FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(defaults::FRAG_ENTRIES, 0)
}

map! {
    /// ifindex -> PodSources: the addresses a pod interface may send from.
    POD_ADDRS: HashMap<u32, PodSources> =
        HashMap::pinned(defaults::POD_ADDR_ENTRIES, BPF_F_NO_PREALLOC)
}

map! {
    /// 0 -> Ranges: prefixes covering every service address.
    RANGES: Array<Ranges> = Array::pinned(1, 0)
}

map! {
    /// Counter index -> packets, per CPU.
    COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0)
}

map! {
    /// Netns cookie -> enabled: the pods whose sockets are load balanced at connect/sendmsg
    /// time.
    SOCK_NETNS: HashMap<u64, u32> =
        HashMap::pinned(defaults::SOCK_NETNS_ENTRIES, BPF_F_NO_PREALLOC)
}

map! {
    /// SockRevKey (socket cookie, backend) -> RevNat: what getpeername and recvmsg must show.
    SOCK_REVNAT: LruHashMap<SockRevKey, RevNat> =
        LruHashMap::pinned(defaults::SOCK_REVNAT_ENTRIES, 0)
}

map! {
    /// SockFwdKey (socket cookie, service) -> Backend: an unconnected UDP socket's backend.
    SOCK_FWD: LruHashMap<SockFwdKey, Backend> = LruHashMap::pinned(defaults::SOCK_FWD_ENTRIES, 0)
}

map! {
    /// 0 -> NodeConfig: the node's pod network and masquerade address.
    NODE: Array<NodeConfig> = Array::pinned(1, 0)
}

map! {
    /// Node address -> `NODE_ADDR_LOCAL` (the addresses NodePorts answer on here) or
    /// `NODE_ADDR_PEER` (another node's).
    NODE_ADDRS: HashMap<u32, u32> =
        HashMap::pinned(defaults::NODE_ADDR_ENTRIES, BPF_F_NO_PREALLOC)
}

map! {
    /// (service id, client prefix) -> 1: the clients LoadBalancer addresses accept.
    SOURCE_RANGES: LpmTrie<SourceRange, u32> =
        LpmTrie::pinned(defaults::SOURCE_RANGE_ENTRIES, BPF_F_NO_PREALLOC)
}

/// Every map of the shared list is defined above (a name missing there fails to compile).
macro_rules! every_map_is_defined {
    ($($(#[$doc:meta])* $constant:ident = $name:literal,)*) => {
        #[allow(dead_code)]
        fn every_map_is_defined() {
            $(let _ = &$constant;)*
        }
    };
}
ebpf_common::for_each_map!(every_map_is_defined);
