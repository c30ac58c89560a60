//! Types shared by the kernel programs (`ebpf-programs`) and their userspace owner
//! (`ebpf-dataplane`): map keys and values, flags, counter indices and map names.
//!
//! Every type is `#[repr(C)]`, `Copy`, with explicit padding and a size assertion, so the two
//! sides can never drift apart. Addresses and ports are stored in network byte order, exactly as
//! they appear in packets: the kernel side compares and copies them without swapping bytes.
#![no_std]

use core::mem::size_of;

/// IP protocol numbers the data plane load balances.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;

/// TCP header flags (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Map names, as the kernel and bpffs see them (the kernel keeps 15 characters).
pub mod map_names {
    /// `ServiceKey -> ServiceValue`: the service frontends.
    pub const SERVICES: &str = "SERVICES";
    /// `u32 -> Backend`: backend addresses; each service owns a contiguous range.
    pub const BACKENDS: &str = "BACKENDS";
    /// `u32 -> MaglevLanes`: Maglev lookup tables; each Maglev service owns a contiguous range.
    pub const MAGLEV: &str = "MAGLEV";
    /// `FlowKey (client -> VIP) -> CtEntry` (LRU): which backend a flow sticks to.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// `FlowKey (backend -> client) -> RevNat` (LRU): how to restore the VIP on replies.
    pub const REVNAT: &str = "REVNAT";
    /// `AffinityKey -> AffinityEntry` (LRU): ClientIP session affinity.
    pub const AFFINITY: &str = "AFFINITY";
    /// `u32 counter index -> u64` per CPU: verdicts and drop reasons.
    pub const COUNTERS: &str = "COUNTERS";

    /// `u64 netns cookie -> u32`: network namespaces (pods) whose sockets are load balanced at
    /// connect/sendmsg time.
    pub const SOCK_NETNS: &str = "SOCK_NETNS";
    /// `SockRevKey (socket, backend) -> RevNat` (LRU): the service a socket's backend stands for,
    /// for getpeername and recvmsg.
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    /// `SockFwdKey (socket, service) -> CtEntry` (LRU): the backend an unconnected UDP socket's
    /// datagrams to a service stick to.
    pub const SOCK_FWD: &str = "SOCK_FWD";

    /// Every map the data plane pins, in a stable order.
    pub const ALL: [&str; 10] = [
        SERVICES,
        BACKENDS,
        MAGLEV,
        CONNTRACK,
        REVNAT,
        AFFINITY,
        COUNTERS,
        SOCK_NETNS,
        SOCK_REVNAT,
        SOCK_FWD,
    ];
}

/// Default map sizes: enough for 100,000+ services and 1,000,000+ backends without tuning.
/// The loader can override each one.
pub mod defaults {
    /// Service frontends (VIP, port, proto). Not preallocated.
    pub const MAX_SERVICES: u32 = 262_144;
    /// Backend slots (8 bytes each, preallocated: 16 MiB). Each service uses one per backend;
    /// the headroom absorbs fragmentation of the slot space.
    pub const BACKEND_SLOTS: u32 = 2_097_152;
    /// Maglev elements of `MAGLEV_LANES` entries (8 bytes each, preallocated: 8 MiB), room for
    /// 256 Maglev services at the default table size.
    pub const MAGLEV_ELEMENTS: u32 = 1_048_576;
    /// Maglev table size M per service (a prime, as Cilium's default).
    pub const MAGLEV_TABLE_SIZE: u32 = 16_381;
    /// Conntrack and reverse-NAT entries (LRU: the oldest flows are evicted when full).
    pub const CT_ENTRIES: u32 = 262_144;
    /// Session affinity entries (LRU).
    pub const AFFINITY_ENTRIES: u32 = 65_536;
    /// Network namespaces with socket-level load balancing.
    pub const SOCK_NETNS_ENTRIES: u32 = 65_536;
    /// Sockets' service translations remembered for getpeername/recvmsg (LRU).
    pub const SOCK_REVNAT_ENTRIES: u32 = 131_072;
    /// Unconnected UDP sockets' backends, per service (LRU).
    pub const SOCK_FWD_ENTRIES: u32 = 65_536;
}

/// Program names (the Rust function names of the entry points).
pub mod program_names {
    /// tc ingress on the host side of a pod's veth: packets leaving the pod (service DNAT).
    pub const FROM_POD: &str = "from_pod";
    /// tc egress on the host side of a pod's veth: packets entering the pod (reverse NAT).
    pub const TO_POD: &str = "to_pod";
    /// Minimal XDP program returning XDP_PASS.
    pub const XDP_FLOOR: &str = "xdp_floor";
    /// Minimal tc program passing every packet on (TCX_NEXT): the floor a tc program's
    /// per-packet cost is compared with, on the same hook.
    pub const TC_FLOOR: &str = "tc_floor";
    /// cgroup hooks of socket-level load balancing: connect(), sendmsg() (unconnected UDP),
    /// recvmsg() and getpeername() (which show the service address, not the backend).
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
}

/// Names of load-time settings (read-only globals overridden by the loader).
pub mod setting_names {
    /// Non-zero: every packet takes the conntrack-miss path (benchmark of the new-flow path
    /// only; a real data plane never sets it).
    pub const FORCE_CT_MISS: &str = "FORCE_CT_MISS";
}

/// A service frontend as clients address it: virtual IP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    /// Virtual IP, network byte order.
    pub vip: u32,
    /// Port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 8);

/// Backends are chosen by Maglev consistent hashing of the client's address and port
/// instead of at random.
pub const SVC_FLAG_MAGLEV: u32 = 1 << 0;
/// ClientIP session affinity: a client keeps its backend for `affinity_timeout_s` seconds.
pub const SVC_FLAG_AFFINITY: u32 = 1 << 1;

/// What the kernel needs to pick a backend for a service. Written by userspace only, in one
/// map update, so a reader never sees a half-updated service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable service id (affinity key); never reused while the service exists.
    pub id: u32,
    /// Index of the service's first backend in `BACKENDS`.
    pub backend_first: u32,
    /// Number of backends; 0 means the service rejects new flows.
    pub backend_count: u32,
    /// Index of the service's first lane in `MAGLEV` (lanes, not map elements).
    pub maglev_first: u32,
    /// Maglev table size M (a prime), 0 without `SVC_FLAG_MAGLEV`.
    pub maglev_size: u32,
    /// Session affinity timeout in seconds, with `SVC_FLAG_AFFINITY`.
    pub affinity_timeout_s: u32,
    /// `SVC_FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 32);

/// A backend address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub ip: u32,
    /// Port, network byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<Backend>() == 8);

/// Maglev table entries per `MAGLEV` map element. An entry is the index of a backend within
/// its service's range, so tables cost 2 bytes an entry.
pub const MAGLEV_LANES: usize = 4;
/// One `MAGLEV` map element: `MAGLEV_LANES` consecutive table entries.
pub type MaglevLanes = [u16; MAGLEV_LANES];

/// A flow as a 5-tuple, in the direction the packet travels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 16);

/// TCP flow states the conntrack entry tracks; enough to tell a retransmitted SYN (keep the
/// backend) from a new connection reusing the tuple (choose again).
pub const CT_STATE_SYN_SENT: u8 = 0;
pub const CT_STATE_ESTABLISHED: u8 = 1;
pub const CT_STATE_CLOSING: u8 = 2;

/// Conntrack entry of a flow to a service: the backend it sticks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub backend: Backend,
    /// Index of the backend within the service's range when chosen (revalidated for UDP).
    pub backend_index: u32,
    /// `CT_STATE_*` (TCP only).
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtEntry>() == 16);

/// How to restore the service address on a reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat {
    pub vip: u32,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<RevNat>() == 8);

/// Session affinity is per client address and service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub client: u32,
    pub service_id: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityEntry {
    pub backend: Backend,
    pub backend_index: u32,
    pub _pad: u32,
    /// Last use, `CLOCK_MONOTONIC` (coarse) nanoseconds.
    pub last_used_ns: u64,
}
const _: () = assert!(size_of::<AffinityEntry>() == 24);

/// A socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    pub cookie: u64,
    pub backend: Backend,
}
const _: () = assert!(size_of::<SockRevKey>() == 16);

/// A socket and the service it addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockFwdKey {
    pub cookie: u64,
    pub service: ServiceKey,
}
const _: () = assert!(size_of::<SockFwdKey>() == 16);

/// Defines the counter indices together with their names, so userspace prints exactly what
/// the kernel counts.
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident = $idx:literal, $label:literal, $kind:ident;)*) => {
        /// Indices into the per-CPU `COUNTERS` map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $name = $idx,)*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];

            /// Stable name, as printed and as used in JSON.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }

            pub const fn kind(self) -> CounterKind {
                match self { $(Counter::$name => CounterKind::$kind,)* }
            }
        }
    };
}

/// Whether a counter counts packets that went on (a verdict) or packets that were dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    Verdict,
    Drop,
}

counters! {
    /// Not IPv4 (ARP, IPv6, ...): passed untouched.
    PassNotIpv4 = 0, "pass_not_ipv4", Verdict;
    /// IPv4 but neither to a service nor a reply of a translated flow: passed untouched.
    PassNotService = 1, "pass_not_service", Verdict;
    /// A flow's first packet: a backend was chosen and the packet translated.
    DnatNew = 2, "dnat_new", Verdict;
    /// A packet of a known flow translated to its backend.
    DnatEstablished = 3, "dnat_established", Verdict;
    /// A reply translated back to the service address.
    RevNat = 4, "revnat", Verdict;
    /// A new flow to a service without backends answered with ICMP port unreachable.
    RejectNoBackend = 5, "reject_no_backend", Verdict;
    /// A new flow whose backend came from session affinity.
    AffinityHit = 6, "affinity_hit", Verdict;
    /// A TCP SYN or a UDP flow whose backend left: a new backend was chosen for the tuple.
    Reselected = 7, "reselected", Verdict;
    /// IPv4 header shorter than 20 bytes, IHL below 5, or a total length beyond the frame.
    DropMalformedIpv4 = 8, "drop_malformed_ipv4", Drop;
    /// TCP or UDP header cut short, on a packet the data plane had to read it from.
    DropTruncatedL4 = 9, "drop_truncated_l4", Drop;
    /// An IP fragment to a service (service traffic must not be fragmented).
    DropFragment = 10, "drop_fragment", Drop;
    /// The service's backend range pointed outside `BACKENDS` (inconsistent maps).
    DropNoBackendSlot = 11, "drop_no_backend_slot", Drop;
    /// The kernel refused a conntrack or reverse-NAT insert.
    DropCtInsert = 12, "drop_ct_insert", Drop;
    /// A checksum or packet rewrite helper failed.
    DropRewrite = 13, "drop_rewrite", Drop;
    /// The ICMP reject could not be built.
    DropReject = 14, "drop_reject", Drop;
    /// A connect() or an unconnected UDP sendmsg() to a service went straight to a backend
    /// (socket-level load balancing: no per-packet translation for that flow).
    SockLbForward = 15, "sock_lb_forward", Verdict;
    /// A recvmsg() or getpeername() showed the service address instead of the backend's.
    SockLbReverse = 16, "sock_lb_reverse", Verdict;
}

/// Number of counters; the `COUNTERS` map has exactly this many entries.
pub const COUNTER_COUNT: u32 = 17;
const _: () = assert!(Counter::ALL.len() == COUNTER_COUNT as usize);

/// Hash of a client's address and port, the Maglev key. Shared so userspace can predict the
/// kernel's choice. A murmur3 finaliser: cheap, with full avalanche.
#[inline(always)]
pub const fn flow_hash(saddr: u32, sport: u16) -> u32 {
    let mut h = saddr.wrapping_mul(0x9E37_79B1) ^ (sport as u32).wrapping_mul(0x85EB_CA6B);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    h
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all types are #[repr(C)], Copy, made of integers with explicit padding: every
    // bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockFwdKey {}
}
