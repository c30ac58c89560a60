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

/// The address a pod's connections to a service appear to come from when the pod is chosen
/// as its own backend (hairpin): a pod drops packets from its own address as martians, so the
/// source is rewritten to this link-local address, as Cilium does. Network byte order.
pub const HAIRPIN_ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// The maps, as `CONSTANT = "name"`: the one place their names are written. [`map_names`]
/// holds them as constants for userspace, `map_name!(CONSTANT)` as literals for the kernel
/// programs' map definitions. Names are at most 15 characters (the kernel keeps no more).
#[macro_export]
macro_rules! for_each_map {
    ($callback:ident) => {
        $callback! {
            /// `ServiceKey -> ServiceValue`: the service frontends.
            SERVICES = "keel_services",
            /// `u32 -> Backend`: backend addresses; each service owns a contiguous range.
            BACKENDS = "keel_backends",
            /// `MemberKey -> u32`: the backends each service has, whatever their slots.
            MEMBERS = "keel_members",
            /// `u32 -> MaglevLanes`: Maglev tables; each Maglev service owns a contiguous range.
            MAGLEV = "keel_maglev",
            /// `FlowKey (client -> VIP) -> CtEntry` (LRU): the backend a flow sticks to.
            CONNTRACK = "keel_conntrack",
            /// `FlowKey (backend -> client, as the backend sees it) -> RevNat` (LRU): how to
            /// restore the service address on replies.
            REVNAT = "keel_revnat",
            /// `AffinityKey -> AffinityEntry` (LRU): ClientIP session affinity.
            AFFINITY = "keel_affinity",
            /// `FragKey -> FragPorts` (LRU): the ports of translated datagrams being fragmented,
            /// for their later fragments (which carry none).
            FRAGS = "keel_frags",
            /// `u32 ifindex -> PodSources`: the addresses each pod interface may send from.
            POD_ADDRS = "keel_pod_addrs",
            /// `u32 (0) -> Ranges`: prefixes covering every service address, so the rest of
            /// the traffic leaves at once.
            RANGES = "keel_ranges",
            /// `u32 counter index -> u64` per CPU: verdicts, events and drop reasons.
            COUNTERS = "keel_counters",
            /// `u64 netns cookie -> u32`: network namespaces (pods) whose sockets are load
            /// balanced at connect/sendmsg time.
            SOCK_NETNS = "keel_sock_netns",
            /// `SockRevKey (socket, backend) -> RevNat` (LRU): the service a socket's backend
            /// stands for, for getpeername and recvmsg.
            SOCK_REVNAT = "keel_sock_rev",
            /// `SockFwdKey (socket, service) -> Backend` (LRU): the backend an unconnected UDP
            /// socket's datagrams to a service stick to.
            SOCK_FWD = "keel_sock_fwd",
            /// `u32 (0) -> NodeConfig`: this node's pod network and the address flows from
            /// outside are masqueraded to.
            NODE = "keel_node",
            /// `u32 address -> u32`: the node addresses NodePorts answer on.
            NODE_ADDRS = "keel_node_addrs",
            /// `SourceRange (service, client prefix) -> u32` (LPM trie): the clients a
            /// LoadBalancer address accepts (`loadBalancerSourceRanges`).
            SOURCE_RANGES = "keel_src_ranges",
        }
    };
}

/// Map names, as the kernel and bpffs see them.
pub mod map_names {
    macro_rules! names {
        ($($(#[$doc:meta])* $constant:ident = $name:literal,)*) => {
            $($(#[$doc])* pub const $constant: &str = $name;)*
            /// Every map the data plane pins, in a stable order.
            pub const ALL: &[&str] = &[$($constant,)*];
        };
    }
    for_each_map!(names);
}

macro_rules! define_map_name {
    ($($(#[$doc:meta])* $constant:ident = $name:literal,)*) => {
        /// A map's name as a literal (`map_name!(SERVICES)`), for attributes.
        #[macro_export]
        macro_rules! map_name {
            $(($constant) => { $name };)*
        }
    };
}
for_each_map!(define_map_name);

/// Default map sizes: enough for 100,000+ services and 1,000,000+ backends without tuning.
/// The loader can override each one.
pub mod defaults {
    /// Service frontends (VIP, port, proto). Not preallocated.
    pub const MAX_SERVICES: u32 = 262_144;
    /// Backend slots (8 bytes each, preallocated: 16 MiB). Each service uses one per backend;
    /// the headroom absorbs fragmentation of the slot space.
    pub const BACKEND_SLOTS: u32 = 2_097_152;
    /// (service, backend) pairs: one per distinct backend of each service. Not preallocated.
    pub const MEMBERS: u32 = 2_097_152;
    /// Maglev elements of `MAGLEV_LANES` entries (8 bytes each, preallocated: 8 MiB), room for
    /// 256 Maglev services at the default table size.
    pub const MAGLEV_ELEMENTS: u32 = 1_048_576;
    /// Maglev table size M per service (a prime, as Cilium's default).
    pub const MAGLEV_TABLE_SIZE: u32 = 16_381;
    /// Maglev table size of the frontends for traffic from outside (a prime): 256 elements
    /// each, so the default Maglev space holds 4,096 of them; balanced within a few percent up
    /// to ~20 backends.
    pub const EXTERNAL_MAGLEV_TABLE_SIZE: u32 = 1_021;
    /// Conntrack and reverse-NAT entries: one LRU for all CPUs each (the least recently used
    /// flow of the node is evicted when full); closed flows are removed at once and idle ones
    /// by the userspace collector, so eviction only happens under real pressure.
    pub const CT_ENTRIES: u32 = 262_144;
    /// Session affinity entries (LRU).
    pub const AFFINITY_ENTRIES: u32 = 65_536;
    /// Fragmented datagrams in flight (LRU).
    pub const FRAG_ENTRIES: u32 = 8_192;
    /// Pod interface addresses (the anti-spoofing table).
    pub const POD_ADDR_ENTRIES: u32 = 65_536;
    /// Network namespaces with socket-level load balancing.
    pub const SOCK_NETNS_ENTRIES: u32 = 65_536;
    /// Sockets' service translations remembered for getpeername/recvmsg (LRU).
    pub const SOCK_REVNAT_ENTRIES: u32 = 131_072;
    /// Unconnected UDP sockets' backends, per service (LRU).
    pub const SOCK_FWD_ENTRIES: u32 = 65_536;
    /// Node addresses: this node's NodePort addresses and the other nodes' addresses.
    pub const NODE_ADDR_ENTRIES: u32 = 8192;
    /// Source prefixes of LoadBalancer addresses, over all services.
    pub const SOURCE_RANGE_ENTRIES: u32 = 16_384;
}

/// Program names (the Rust function names of the entry points).
pub mod program_names {
    /// tc ingress on the host side of a pod's veth: packets leaving the pod (service DNAT).
    pub const FROM_POD: &str = "from_pod";
    /// tc egress on the host side of a pod's veth: packets entering the pod (reverse NAT).
    pub const TO_POD: &str = "to_pod";
    /// tc ingress on the node's own interfaces: traffic from outside the cluster to NodePorts,
    /// ExternalIPs and LoadBalancer IPs, and the replies of the flows it sent to other nodes.
    pub const FROM_OUTSIDE: &str = "from_outside";
    /// XDP on the node's own interfaces: the fast path of `from_outside` (flows masqueraded to
    /// other nodes' backends, and their replies, sent out before the stack).
    pub const FROM_OUTSIDE_XDP: &str = "from_outside_xdp";
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
    /// The same hooks for IPv6 sockets, which reach IPv4 services through v4-mapped
    /// addresses (::ffff:a.b.c.d).
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
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
/// The frontend takes traffic from outside the cluster (a NodePort, an ExternalIP, a
/// LoadBalancer IP): `from_outside` serves it.
pub const SVC_FLAG_EXTERNAL: u32 = 1 << 2;
/// `externalTrafficPolicy: Cluster`: a flow sent to a backend on another node leaves from
/// this node's address (`NodeConfig::masq_addr`, or the node address the client used), so
/// its replies come back through this node.
pub const SVC_FLAG_MASQ: u32 = 1 << 3;
/// No backend here is not the same as none at all (`externalTrafficPolicy: Local` on a node
/// without local endpoints): new flows are dropped, not rejected, as kube-proxy does, so a
/// load balancer's health check, not the client, learns about it.
pub const SVC_FLAG_DROP_EMPTY: u32 = 1 << 4;
/// Only clients in the frontend's `SOURCE_RANGES` may open flows to it
/// (`loadBalancerSourceRanges`); the others are dropped.
pub const SVC_FLAG_SOURCE_RANGES: u32 = 1 << 5;
/// Direct server return (instead of `SVC_FLAG_MASQ`): a flow sent to a backend on another node
/// keeps the client's address and its first packet (every UDP datagram) carries the frontend
/// in an IPv4 option (`DSR_OPTION_TYPE`), so the backend's node answers the client itself,
/// from the frontend, and replies skip this node.
pub const SVC_FLAG_DSR: u32 = 1 << 6;

/// The IPv4 option carrying a DSR flow's frontend to the backend's node: type (copied on
/// fragmentation, class 0, number 26), length 8, the frontend's port and address (network
/// order). Cilium's layout, so either side may be Cilium's.
pub const DSR_OPTION_TYPE: u8 = 0x9a;
pub const DSR_OPTION_LEN: usize = 8;

/// `NODE_ADDRS` values: an address of this node NodePorts answer on; another node's address
/// (pods' sockets reach NodePorts on it too, as on this node's; DSR is never used for flows
/// from it).
pub const NODE_ADDR_LOCAL: u32 = 1;
pub const NODE_ADDR_PEER: u32 = 2;

/// `ServiceKey::vip` of a NodePort: any address of `NODE_ADDRS`.
pub const NODEPORT_VIP: u32 = 0;

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

/// A backend of a service. Flows, affinity entries and sockets remember their backend's
/// address and stay on it while this pair is in `MEMBERS`, whatever slot the backend moves to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MemberKey {
    /// The service's `ServiceValue::id`.
    pub service_id: u32,
    pub backend: Backend,
}
const _: () = assert!(size_of::<MemberKey>() == 12);

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

/// TCP flow states the conntrack entry tracks: enough to tell a retransmitted SYN (keep the
/// backend) from a new connection reusing the tuple (choose again), and to forget a flow the
/// moment it has closed in both directions.
pub const CT_STATE_SYN_SENT: u8 = 0;
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// One side sent FIN.
pub const CT_STATE_CLOSING: u8 = 2;

/// `CtEntry::flags`: the client's FIN was seen.
pub const CT_FLAG_CLIENT_FIN: u8 = 1 << 0;
/// `CtEntry::flags`: the backend's FIN was seen.
pub const CT_FLAG_SERVER_FIN: u8 = 1 << 1;
/// `CtEntry::flags`: the client is its own backend (hairpin): its source is rewritten to
/// `HAIRPIN_ADDR` and the packet sent straight back into it.
pub const CT_FLAG_HAIRPIN: u8 = 1 << 2;
/// `CtEntry::flags`: the client's port is rewritten to `CtEntry::snat_port`, because a live
/// flow of another service already gets its replies on the tuple this flow's would have (two
/// services sharing a backend, one client port): netfilter's NAT remaps the same way.
pub const CT_FLAG_SNAT: u8 = 1 << 3;
/// `CtEntry::flags`: a flow from outside the cluster.
pub const CT_FLAG_EXTERNAL: u8 = 1 << 4;
/// `CtEntry::flags`: the client's address is rewritten to `CtEntry::nat_addr` (a flow from
/// outside sent to another node's backend); always with `CT_FLAG_SNAT`.
pub const CT_FLAG_MASQ: u8 = 1 << 5;
/// `CtEntry::flags`: a flow from outside sent to another node's backend by direct server
/// return (`SVC_FLAG_DSR`): only its destination is rewritten; its replies never come here.
pub const CT_FLAG_DSR: u8 = 1 << 6;

/// Ports a clashing flow's client port is remapped to: above Linux's ephemeral range
/// (32768-60999), so they do not collide with the client's own sockets.
pub const REMAP_PORT_FIRST: u16 = 61_000;
pub const REMAP_PORTS: u32 = 4_535;

/// How long a flow without packets is kept, by state, in seconds (userspace collects entries
/// idle longer; the kernel's LRU only evicts when the map is full). TCP established: 6 h, as
/// Cilium's; a handshake: 60 s, as Cilium's SYN timeout; closing (one FIN seen): 120 s, as
/// netfilter's FIN_WAIT; UDP: 120 s, netfilter's timeout for a UDP flow that has seen replies.
pub mod lifetimes {
    pub const TCP_SYN_S: u32 = 60;
    pub const TCP_ESTABLISHED_S: u32 = 6 * 3600;
    pub const TCP_CLOSING_S: u32 = 120;
    pub const UDP_S: u32 = 120;
}

/// Conntrack entry of a flow to a service: the backend it sticks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub backend: Backend,
    /// The service's id when the backend was chosen: a UDP flow stays while the backend is
    /// still its member (`MEMBERS`).
    pub service_id: u32,
    /// Last packet from the client, in seconds of `CLOCK_MONOTONIC` (coarse); written at most
    /// once a second.
    pub last_seen: u32,
    /// `CT_STATE_*` (TCP only).
    pub state: u8,
    /// `CT_FLAG_*`.
    pub flags: u8,
    /// With `CT_FLAG_SNAT`: the port the client's packets leave with (network order).
    pub snat_port: u16,
    /// With `CT_FLAG_MASQ`: the address the client's packets leave with.
    pub nat_addr: u32,
}
const _: () = assert!(size_of::<CtEntry>() == 24);

impl CtEntry {
    /// The tuple of `flow`'s replies as the backend sends them: from the backend to the
    /// client, or to the address and port the client's were rewritten to (a hairpin, a
    /// remapped port). The key of the flow's `REVNAT` entry.
    #[inline(always)]
    pub const fn reply_key(&self, flow: &FlowKey) -> FlowKey {
        FlowKey {
            saddr: self.backend.ip,
            daddr: if self.flags & CT_FLAG_MASQ != 0 {
                self.nat_addr
            } else if self.flags & CT_FLAG_HAIRPIN != 0 {
                HAIRPIN_ADDR
            } else {
                flow.saddr
            },
            sport: self.backend.port,
            dport: if self.flags & CT_FLAG_SNAT != 0 {
                self.snat_port
            } else {
                flow.sport
            },
            proto: flow.proto,
            _pad: [0; 3],
        }
    }

    /// Seconds the entry may stay idle in its state.
    pub const fn lifetime_s(&self, proto: u8) -> u32 {
        if proto != IPPROTO_TCP {
            lifetimes::UDP_S
        } else {
            match self.state {
                CT_STATE_SYN_SENT => lifetimes::TCP_SYN_S,
                CT_STATE_ESTABLISHED => lifetimes::TCP_ESTABLISHED_S,
                _ => lifetimes::TCP_CLOSING_S,
            }
        }
    }
}

/// `RevNat::flags`: the flow is closing: replies check its conntrack entry (to see the last
/// ACK and forget the flow).
pub const REVNAT_FLAG_CLOSING: u16 = 1 << 0;
/// `RevNat::flags`: the client's port was remapped: replies go back to `client_port`.
pub const REVNAT_FLAG_SNAT: u16 = 1 << 1;
/// `RevNat::flags`: the client's address was rewritten too: replies go back to `client`.
pub const REVNAT_FLAG_MASQ: u16 = 1 << 2;
/// `RevNat::flags`: the reply of a flow from outside the cluster: its source becomes a node
/// or external address, so the data plane routes it out itself.
pub const REVNAT_FLAG_EXTERNAL: u16 = 1 << 3;
/// `RevNat::flags`: recorded on a backend's node from a DSR option (with
/// `REVNAT_FLAG_EXTERNAL`): `vip` and `port` are the frontend of another node; the replies keep
/// the flow's conntrack entry here alive, as no packet of the client's is seen here again.
pub const REVNAT_FLAG_DSR: u16 = 1 << 4;

/// How to restore a reply: the service address it must come from, and the client port it
/// must go to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat {
    pub vip: u32,
    pub port: u16,
    /// `REVNAT_FLAG_*` (0 in the socket-level maps).
    pub flags: u16,
    /// The client's own port (network order; 0 in the socket-level maps).
    pub client_port: u16,
    pub _pad: u16,
    /// The client's own address (0 in the socket-level maps).
    pub client: u32,
}
const _: () = assert!(size_of::<RevNat>() == 16);

impl RevNat {
    /// The conntrack key of the flow whose reverse entry at `reply` this is.
    #[inline(always)]
    pub const fn flow_of(&self, reply: &FlowKey) -> FlowKey {
        FlowKey {
            saddr: if self.flags & REVNAT_FLAG_MASQ != 0 {
                self.client
            } else if reply.daddr == HAIRPIN_ADDR {
                reply.saddr
            } else {
                reply.daddr
            },
            daddr: self.vip,
            sport: self.client_port,
            dport: self.port,
            proto: reply.proto,
            _pad: [0; 3],
        }
    }
}

/// A datagram being fragmented, as its fragments' IP headers name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IP identification, network order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragKey>() == 12);

/// The ports of a fragmented datagram, from its first fragment (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}
const _: () = assert!(size_of::<FragPorts>() == 4);

/// At most this many prefixes cover the service addresses.
pub const MAX_RANGES: usize = 8;

/// Prefixes covering every service address (a superset: userspace widens them before a
/// service outside them is published, and tightens them after syncs). A destination outside
/// all of them is no service: its packets skip every service lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ranges {
    /// How many of the prefixes are in use.
    pub count: u32,
    /// Network addresses and masks, network byte order.
    pub net: [u32; MAX_RANGES],
    pub mask: [u32; MAX_RANGES],
}
const _: () = assert!(size_of::<Ranges>() == 4 + 8 * MAX_RANGES);

/// The data of a `SOURCE_RANGES` key: a frontend's service id, matched whole, then a client
/// address (network order) matched to the prefix's length. A key's prefix length counts the
/// id's 32 bits too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceRange {
    pub service_id: u32,
    pub addr: u32,
}
const _: () = assert!(size_of::<SourceRange>() == 8);

/// What the programs know of the node they run on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// This node's pod network (network order, and its mask): backends in it are local.
    pub pod_net: u32,
    pub pod_mask: u32,
    /// The address masqueraded flows to ExternalIPs and LoadBalancer IPs leave with (a
    /// NodePort's leave with the node address the client used).
    pub masq_addr: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<NodeConfig>() == 16);

/// At most this many IPv4 addresses per pod interface.
pub const MAX_POD_SOURCES: usize = 4;

/// The addresses a pod interface may send from (an interface without an entry is not checked:
/// test and benchmark interfaces, the host's). One lookup per packet, of an entry as hot as
/// the pod's traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodSources {
    /// How many of `addrs` are in use.
    pub count: u32,
    /// IPv4 addresses, network byte order.
    pub addrs: [u32; MAX_POD_SOURCES],
}
const _: () = assert!(size_of::<PodSources>() == 4 + 4 * MAX_POD_SOURCES);

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
    /// Kept while it is a member of the service (`MEMBERS`) and the timeout has not passed.
    pub backend: Backend,
    /// Last use, `CLOCK_MONOTONIC` (coarse) nanoseconds.
    pub last_used_ns: u64,
}
const _: () = assert!(size_of::<AffinityEntry>() == 16);

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

/// Whether a counter counts packets that went on (a verdict), packets that were dropped, or
/// events of the flows' state (which also count under a verdict).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    Verdict,
    Drop,
    Event,
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
    AffinityHit = 6, "affinity_hit", Event;
    /// A TCP SYN or a UDP flow whose backend left: a new backend was chosen for the tuple.
    Reselected = 7, "reselected", Event;
    /// IPv4 header shorter than 20 bytes, IHL below 5, or a total length beyond the frame.
    DropMalformedIpv4 = 8, "drop_malformed_ipv4", Drop;
    /// TCP or UDP header cut short, on a packet the data plane had to read it from.
    DropTruncatedL4 = 9, "drop_truncated_l4", Drop;
    /// An ICMP error about a translated flow, translated with it (addresses, quoted packet
    /// and checksums).
    IcmpTranslated = 10, "icmp_translated", Verdict;
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
    /// A conntrack entry was created (a new flow; not a tuple reused by a new connection).
    CtCreated = 17, "ct_created", Event;
    /// A TCP flow closed (the last ACK after both FINs, or a RST): its entries were removed.
    CtClosed = 18, "ct_closed", Event;
    /// Two CPUs saw a flow's first packets at once: the later one took the earlier's backend.
    CtRace = 19, "ct_race", Event;
    /// A flow's reverse-NAT entry was missing (evicted) and was put back.
    RevNatRepaired = 20, "revnat_repaired", Event;
    /// A pod reached a service and was chosen as its own backend (hairpin NAT).
    Hairpin = 21, "hairpin", Event;
    /// A packet from a pod whose source is not the pod's address (spoofed).
    DropSpoofed = 22, "drop_spoofed", Drop;
    /// A translated first fragment: its datagram's later fragments will follow it.
    FragmentTracked = 23, "fragment_tracked", Event;
    /// A packet to an address outside every service range: passed untouched without a
    /// service or conntrack lookup.
    PassOutsideRanges = 24, "pass_outside_ranges", Verdict;
    /// A new flow's client port was remapped: its reply tuple was a live flow's of another
    /// service.
    PortRemapped = 25, "port_remapped", Event;
    /// A flow from outside sent to another node's backend left from a node address.
    Masqueraded = 26, "masqueraded", Event;
    /// A packet the data plane must route itself (a flow from outside, or its reply) had no
    /// route to its destination.
    DropNoRoute = 27, "drop_no_route", Drop;
    /// A new flow from outside to a service with endpoints on other nodes only
    /// (`externalTrafficPolicy: Local`): dropped, as kube-proxy does.
    DropNoLocalEndpoint = 28, "drop_no_local_endpoint", Drop;
    /// A packet from outside to a cluster IP: not served from outside, passed untouched.
    PassClusterOnly = 29, "pass_cluster_only", Verdict;
    /// A new flow to a LoadBalancer address from a client outside its
    /// `loadBalancerSourceRanges`.
    DropSourceRange = 30, "drop_source_range", Drop;
    /// A packet the data plane had to route itself arrived with no hops left to live.
    DropTtlExceeded = 31, "drop_ttl_exceeded", Drop;
    /// A packet from outside forwarded by the XDP program: translated and sent out of the
    /// node without the kernel's stack (it also counts under its tc-path verdict).
    XdpForwarded = 32, "xdp_forwarded", Event;
    /// A packet the XDP program left to tc because its L4 checksum was only the pseudo-header
    /// sum (CHECKSUM_PARTIAL, sent by this host's own stack over a veth).
    XdpPartialChecksum = 33, "xdp_partial_checksum", Event;
    /// A flow's first packet (every UDP datagram) sent to another node's backend by direct
    /// server return, with its frontend in an IPv4 option.
    DsrSent = 34, "dsr_sent", Event;
    /// A packet from another node carrying a DSR option for a pod of this node: its flow was
    /// recorded (the pod's replies go from the frontend straight to the client) and the
    /// option removed.
    DsrRecorded = 35, "dsr_recorded", Event;
    /// A packet the data plane routes itself is larger than the path MTU (with a DSR option's
    /// 8 bytes, or no room left for them): dropped; an untranslated one is answered with an
    /// ICMP fragmentation needed giving the MTU it must fit.
    DropTooBig = 36, "drop_too_big", Drop;
    /// A TCP packet other than a SYN opened a flow: its conntrack entry was gone (evicted
    /// from a full map, or collected while idle past its lifetime), so it was balanced again
    /// and may reach another backend. Conntrack pressure shows here first.
    CtMidFlow = 37, "ct_mid_flow", Event;
}

/// Number of counters; the `COUNTERS` map has exactly this many entries.
pub const COUNTER_COUNT: u32 = 38;
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
    unsafe impl aya::Pod for PodSources {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for Ranges {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for SourceRange {}
}
