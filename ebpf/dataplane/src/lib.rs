//! Userspace side of the service data plane: loads the kernel programs, attaches them to
//! interfaces, pins everything under bpffs and keeps the maps equal to the services it is told
//! about.
//!
//! The calls are intent-level ([`Dataplane::upsert_service`], [`Dataplane::set_backends`],
//! [`Dataplane::delete_service`]); this crate works out which map entries change. Backend
//! ranges and Maglev tables are computed here, the kernel only indexes them.
//!
//! Restarts: programs are attached through TCX links pinned under the pin directory, and maps are
//! pinned too, so the data plane keeps forwarding while its owner is down. [`Dataplane::open`]
//! adopts what is pinned (the flows in conntrack, the services and their backend ranges), and
//! [`Dataplane::attach`] swaps the program of an existing link atomically.

mod alloc;
mod batch;
mod error;
pub mod layout;
pub mod maglev;
mod mmap;
pub mod packet;
mod ranges;
pub mod sockets;

use std::{
    collections::BTreeMap,
    ffi::CString,
    fmt, io,
    net::{Ipv4Addr, SocketAddrV4},
    os::{fd::AsFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    time::Duration,
};

pub use aya::programs::TcAttachType;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap, Map, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TestRun, TestRunOptions, Xdp,
        XdpMode as AttachMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use ebpf_common::{
    AffinityEntry, AffinityKey, Backend, COUNTER_COUNT, CtEntry, FlowKey, IPPROTO_TCP, IPPROTO_UDP,
    MAGLEV_LANES, MaglevLanes, MemberKey, NODE_ADDR_LOCAL, NODE_ADDR_PEER, NodeConfig, PodSources,
    RevNat, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_DSR, SVC_FLAG_EXTERNAL,
    SVC_FLAG_MAGLEV, SVC_FLAG_MASQ, SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue, SockFwdKey,
    SockRevKey, SourceRange, program_names,
};
pub use ebpf_common::{Counter, CounterKind, MAX_POD_SOURCES, defaults, map_names};
pub use error::Error;

use crate::{alloc::RangeAllocator, mmap::MmapArray};

/// Runs a program load again when the verifier was interrupted: it gives up with EAGAIN when a
/// signal arrives for the loading thread (a child process of the same program ending, ...), the
/// longer the program the likelier. libbpf retries the same way (up to 5 attempts).
fn retry_interrupted(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut attempts = 5;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts > 1 =>
            {
                attempts -= 1;
            }
            outcome => return outcome,
        }
    }
}

/// The tc programs attached to interfaces, with the suffix of their links' pins.
const TC_PROGRAMS: [(&str, &str); 3] = [
    (program_names::FROM_POD, "ingress"),
    (program_names::TO_POD, "egress"),
    (program_names::FROM_OUTSIDE, "outside"),
];

/// The `SOURCE_RANGES` key of a frontend's client prefix.
fn source_key(id: u32, (addr, len): SourcePrefix) -> aya::maps::lpm_trie::Key<SourceRange> {
    let len = len.min(32);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    let net = u32::from(addr) & mask;
    aya::maps::lpm_trie::Key::new(
        32 + u32::from(len),
        SourceRange {
            service_id: id,
            addr: u32::from_ne_bytes(net.to_be_bytes()),
        },
    )
}

/// Pins a link just made at `pin`, so it outlives this process (a restart adopts it).
fn pin_link<L>(link: L, pin: &Path) -> Result<(), Error>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link)
        .map_err(|source| Error::Link {
            path: pin.to_path_buf(),
            source,
        })?
        .pin(pin)
        .map_err(|source| Error::Pin {
            path: pin.to_path_buf(),
            source: io::Error::other(source),
        })?;
    Ok(())
}

/// The program a link pin (`if<ifindex>-<suffix>`) runs.
fn pinned_program(pin_name: &str) -> Option<&'static str> {
    let suffix = pin_name
        .strip_prefix("if")?
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .strip_prefix('-')?;
    TC_PROGRAMS
        .iter()
        .find(|(_, s)| *s == suffix)
        .map(|(program, _)| *program)
}

/// The compiled kernel programs (built by build.rs from `ebpf/programs`).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ebpf-programs"));

/// The cgroup hooks of socket-level load balancing.
const SOCK_PROGRAMS: [&str; 8] = [
    program_names::SOCK_CONNECT4,
    program_names::SOCK_SENDMSG4,
    program_names::SOCK_RECVMSG4,
    program_names::SOCK_GETPEERNAME4,
    program_names::SOCK_CONNECT6,
    program_names::SOCK_SENDMSG6,
    program_names::SOCK_RECVMSG6,
    program_names::SOCK_GETPEERNAME6,
];

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A service as clients address it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: SocketAddrV4,
    pub proto: Protocol,
}

impl Frontend {
    pub const fn new(addr: SocketAddrV4, proto: Protocol) -> Self {
        Self { addr, proto }
    }

    pub const fn tcp(addr: SocketAddrV4) -> Self {
        Self::new(addr, Protocol::Tcp)
    }

    pub const fn udp(addr: SocketAddrV4) -> Self {
        Self::new(addr, Protocol::Udp)
    }

    /// A NodePort: `port` on every node address of [`NodeSettings::nodeport_addrs`] (the
    /// frontend's address is 0.0.0.0).
    pub const fn node_port(port: u16, proto: Protocol) -> Self {
        Self::new(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), proto)
    }

    fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: u32::from_ne_bytes(self.addr.ip().octets()),
            port: self.addr.port().to_be(),
            proto: self.proto.number(),
            _pad: 0,
        }
    }

    fn from_key(key: &ServiceKey) -> Option<Self> {
        let proto = match key.proto {
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            _ => return None,
        };
        let ip = Ipv4Addr::from(key.vip.to_ne_bytes());
        Some(Self::new(
            SocketAddrV4::new(ip, u16::from_be(key.port)),
            proto,
        ))
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.proto, self.addr)
    }
}

impl std::str::FromStr for Frontend {
    type Err = String;

    /// Parses `tcp/10.96.0.10:80` or `udp/10.96.0.10:53`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (proto, addr) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected <tcp|udp>/<ipv4>:<port>"))?;
        let proto = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => return Err(format!("{s:?}: unknown protocol {other:?} (tcp or udp)")),
        };
        let addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Self::new(addr, proto))
    }
}

/// How a service picks a backend for a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheduler {
    /// Uniformly at random (kube-proxy's behaviour).
    #[default]
    Random,
    /// Maglev consistent hashing of the client address and port over a table of
    /// `table_size` entries (a prime larger than the number of backends; Cilium's default
    /// is [`defaults::MAGLEV_TABLE_SIZE`]).
    Maglev { table_size: u32 },
}

/// Who a frontend serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reach {
    /// Pods (and the node's own sockets, with socket-level load balancing): a cluster IP.
    #[default]
    Cluster,
    /// Clients outside the cluster arriving on the node's interfaces (a NodePort, an
    /// ExternalIP, a LoadBalancer IP), through [`Dataplane::attach_external`].
    External {
        /// How flows reach backends on other nodes.
        remote: Remote,
        /// Without backends, drop new flows instead of rejecting them (`Local` on a node
        /// without local endpoints, while the service has endpoints elsewhere).
        drop_when_empty: bool,
    },
}

/// How a flow from outside reaches a backend on another node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Remote {
    /// As it came, the client's address kept (`externalTrafficPolicy: Local`, whose frontends
    /// should be given local backends only).
    #[default]
    AsItCame,
    /// Masqueraded to a node address (`externalTrafficPolicy: Cluster`, as kube-proxy): the
    /// backend sees the node, replies come back through it.
    Masquerade,
    /// Direct server return (`externalTrafficPolicy: Cluster`, as Cilium's DSR mode): the
    /// backend sees the client; the frontend travels to its node in an IPv4 option, and that
    /// node sends the replies straight to the client. Every node must run this data plane.
    DirectReturn,
}

/// A service's load-balancing settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    pub scheduler: Scheduler,
    /// ClientIP session affinity: a client's new flows keep going to the backend of its
    /// previous one for this long (whole seconds) after its last new flow.
    pub affinity_timeout: Option<Duration>,
    pub reach: Reach,
}

/// What the programs must know of the node for traffic from outside.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSettings {
    /// This node's pod network: backends in it are local (never masqueraded). None: every
    /// backend is treated as remote.
    pub pod_cidr: Option<(Ipv4Addr, u8)>,
    /// The address flows to ExternalIPs and LoadBalancer IPs are masqueraded to (a NodePort's
    /// leave with the node address the client used).
    pub masquerade_addr: Option<Ipv4Addr>,
    /// The node addresses NodePorts answer on (kube-proxy's `--nodeport-addresses`).
    pub nodeport_addrs: Vec<Ipv4Addr>,
    /// The other nodes' addresses: pods' sockets reach NodePorts on them as on this node's
    /// (balanced here), and flows from them (pods masqueraded to them) are never sent by DSR.
    pub peer_addrs: Vec<Ipv4Addr>,
}

/// Where the data plane pins its objects and how large its maps are. Sizes apply when the maps
/// are created; a restarted data plane adopts the pinned maps as they are.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory on bpffs for maps and links (one per data plane instance).
    pub pin_dir: PathBuf,
    pub max_services: u32,
    pub backend_slots: u32,
    pub maglev_elements: u32,
    pub ct_entries: u32,
    pub affinity_entries: u32,
    /// Open even when flow state pinned by another build (conntrack, reverse NAT, affinity,
    /// socket-level UDP entries) has a layout this build cannot carry over: those flows are
    /// then balanced again. Off, [`Dataplane::open`] refuses, and the old build's data plane
    /// keeps serving.
    pub allow_state_loss: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from("/sys/fs/bpf/keel"),
            max_services: defaults::MAX_SERVICES,
            backend_slots: defaults::BACKEND_SLOTS,
            maglev_elements: defaults::MAGLEV_ELEMENTS,
            ct_entries: defaults::CT_ENTRIES,
            affinity_entries: defaults::AFFINITY_ENTRIES,
            allow_state_loss: false,
        }
    }
}

impl Config {
    /// The default sizes with objects pinned under `pin_dir`.
    pub fn with_pin_dir(pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
            ..Self::default()
        }
    }
}

/// How the XDP fast path for traffic from outside runs on an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpAcceleration {
    /// Not at all: tc's `from_outside` does everything.
    #[default]
    Off,
    /// In the driver (the fast path proper). On a veth, the peer must take XDP frames: it needs
    /// an XDP program of its own or GRO enabled, or what the fast path sends out is lost.
    Native,
    /// In the kernel's generic hook, after the skb is built (any interface; little gain).
    Generic,
}

impl std::str::FromStr for XdpAcceleration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(XdpAcceleration::Off),
            "native" => Ok(XdpAcceleration::Native),
            "generic" => Ok(XdpAcceleration::Generic),
            other => Err(format!(
                "XDP mode {other:?}: expected off, native or generic"
            )),
        }
    }
}

/// A program to run under BPF_PROG_TEST_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// tc ingress of a pod's host-side veth (service DNAT).
    FromPod,
    /// tc egress of a pod's host-side veth (reverse NAT).
    ToPod,
    /// tc ingress of the node's own interface (traffic from outside the cluster).
    FromOutside,
    /// The minimal tc program (passes every packet on), the cost floor of `FromPod`'s hook.
    TcFloor,
    /// The minimal XDP_PASS program.
    XdpFloor,
    /// XDP on the node's own interface (the fast path of `FromOutside`).
    FromOutsideXdp,
}

impl Hook {
    const fn program_name(self) -> &'static str {
        match self {
            Hook::FromPod => program_names::FROM_POD,
            Hook::ToPod => program_names::TO_POD,
            Hook::FromOutside => program_names::FROM_OUTSIDE,
            Hook::TcFloor => program_names::TC_FLOOR,
            Hook::XdpFloor => program_names::XDP_FLOOR,
            Hook::FromOutsideXdp => program_names::FROM_OUTSIDE_XDP,
        }
    }
}

/// What a BPF_PROG_TEST_RUN returned.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    /// The program's verdict (`TC_ACT_*` or `XDP_*`).
    pub verdict: u32,
    /// The packet as the program left it.
    pub frame: Vec<u8>,
    /// Average time per run, as the kernel measured it.
    pub per_run: Duration,
}

/// tc verdicts as the programs return them.
pub mod verdict {
    /// Every packet the programs let through, translated or not: `TCX_NEXT` (-1), so the
    /// programs attached after ours run too.
    pub const TCX_NEXT: u32 = u32::MAX;
    pub const TC_ACT_SHOT: u32 = 2;
    pub const TC_ACT_REDIRECT: u32 = 7;
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const XDP_REDIRECT: u32 = 4;
}

/// How often the node agent collects conntrack ([`Dataplane::gc`]).
pub const GC_PERIOD: Duration = Duration::from_secs(30);

/// What one conntrack collection found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Flows tracked after the collection.
    pub entries: u64,
    /// Flows removed for being idle past their lifetime.
    pub expired: u64,
    /// Reverse entries removed because their flow was gone.
    pub orphans: u64,
}

/// The `MEMBERS` keys of a service's backends.
fn member_keys(service_id: u32, backends: &[SocketAddrV4]) -> impl Iterator<Item = MemberKey> + '_ {
    backends.iter().map(move |b| MemberKey {
        service_id,
        backend: Backend {
            ip: u32::from_ne_bytes(b.ip().octets()),
            port: b.port().to_be(),
            _pad: 0,
        },
    })
}

/// The backend of a member.
fn member_addr(key: &MemberKey) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(key.backend.ip.to_ne_bytes()),
        u16::from_be(key.backend.port),
    )
}

/// The conntrack key of a client's flow to a service.
fn flow_key(client: SocketAddrV4, service: Frontend) -> FlowKey {
    FlowKey {
        saddr: u32::from_ne_bytes(client.ip().octets()),
        daddr: u32::from_ne_bytes(service.addr.ip().octets()),
        sport: client.port().to_be(),
        dport: service.addr.port().to_be(),
        proto: service.proto.number(),
        _pad: [0; 3],
    }
}

/// Seconds of `CLOCK_MONOTONIC_COARSE`, the clock the programs stamp flows with.
fn monotonic_coarse_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// A program attached after the data plane's ([`Dataplane::attach_probe`]); detached when
/// dropped.
pub struct ChainProbe {
    _link: SchedClassifierLink,
    _stats: std::os::fd::OwnedFd,
    program_id: u32,
}

impl ChainProbe {
    /// How many packets reached the probe (the kernel's run count of its program, which
    /// counts every attachment of this data plane's `tc_floor`).
    pub fn runs(&self) -> Result<u64, Error> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|info| info.id() == self.program_id)
            .map(|info| info.run_count())
            .ok_or_else(|| Error::Inconsistent("the probe's program is gone".into()))
    }
}

/// A snapshot of the data plane's counters, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    values: [u64; COUNTER_COUNT as usize],
}

impl Stats {
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }

    /// Every counter with its value, verdicts first.
    pub fn iter(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        Counter::ALL.iter().map(|&c| (c, self.get(c)))
    }

    /// Packets dropped, all reasons together.
    pub fn drops(&self) -> u64 {
        self.iter()
            .filter(|(c, _)| c.kind() == CounterKind::Drop)
            .map(|(_, v)| v)
            .sum()
    }

    /// The change since `earlier`.
    pub fn since(&self, earlier: &Stats) -> Stats {
        let mut values = self.values;
        for (v, e) in values.iter_mut().zip(earlier.values) {
            *v = v.wrapping_sub(e);
        }
        Stats { values }
    }
}

/// A service as the data plane holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    pub spec: ServiceSpec,
    /// Backends in slot order.
    pub backends: Vec<SocketAddrV4>,
    /// The client prefixes it accepts (sorted; empty: any).
    pub source_ranges: Vec<SourcePrefix>,
    value: ServiceValue,
}

/// A client prefix: address and length.
pub type SourcePrefix = (Ipv4Addr, u8);

/// One service as a [`Dataplane::sync`] caller wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub frontend: Frontend,
    pub spec: ServiceSpec,
    pub backends: Vec<SocketAddrV4>,
    /// `loadBalancerSourceRanges`: the clients that may open flows to an external frontend
    /// (empty: any; others are dropped and counted as `drop_source_range`).
    pub source_ranges: Vec<SourcePrefix>,
}

/// What a [`Dataplane::sync`] or [`Dataplane::update`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    /// Services that could not be written, and why; the data plane serves them as before.
    pub failed: Vec<(Frontend, String)>,
    /// Backends that left a UDP service (or whose UDP service went): sockets connected to
    /// them at connect time should end ([`Dataplane::end_sockets_to`]).
    pub left_udp: Vec<SocketAddrV4>,
}

impl SyncReport {
    /// The report, or an error if some service could not be written (for callers that treat
    /// any failure as fatal: tools, tests, benchmarks).
    pub fn check(self) -> Result<Self, Error> {
        match self.failed.first() {
            None => Ok(self),
            Some((frontend, why)) => Err(Error::Unapplied {
                count: self.failed.len(),
                first: format!("{frontend}: {why}"),
            }),
        }
    }
}

/// The kernel memory the data plane's maps take, as the kernel accounts it.
#[derive(Clone, Debug, Default)]
pub struct MapMemory {
    /// (map name, bytes) for every map.
    pub maps: Vec<(&'static str, u64)>,
}

impl MapMemory {
    pub fn total(&self) -> u64 {
        self.maps.iter().map(|(_, b)| b).sum()
    }
}

/// The service data plane.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    services_map: HashMap<MapData, ServiceKey, ServiceValue>,
    counters: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    revnat: HashMap<MapData, FlowKey, RevNat>,
    pod_addrs: HashMap<MapData, u32, PodSources>,
    members: HashMap<MapData, MemberKey, u32>,
    /// What `members` holds (so only what changes is written).
    members_present: std::collections::HashSet<MemberKey>,
    source_ranges: aya::maps::LpmTrie<MapData, SourceRange, u32>,
    ranges_map: aya::maps::Array<MapData, ebpf_common::Ranges>,
    /// The prefixes `ranges_map` holds (host order).
    ranges: Vec<ranges::Prefix>,
    backends: MmapArray<Backend>,
    maglev: MmapArray<MaglevLanes>,
    services: BTreeMap<Frontend, ServiceState>,
    backend_alloc: RangeAllocator,
    maglev_alloc: RangeAllocator,
    next_id: u32,
    migrations: Vec<Migration>,
}

/// State moved from maps pinned by another build or configuration ([`Dataplane::open`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Migration {
    /// The directory the state came from (removed since).
    pub from: PathBuf,
    pub services: usize,
    /// Flow, affinity, socket and interface entries copied.
    pub entries: u64,
    /// Maps whose entries could not be carried over (missing, or of another layout when the
    /// loss was allowed): their state starts empty.
    pub skipped: Vec<&'static str>,
}

impl Dataplane {
    /// Loads the programs and creates the maps, or adopts the maps a previous owner pinned
    /// under `config.pin_dir` together with the services they hold.
    pub fn open(config: &Config) -> Result<Self, Error> {
        ensure_bpffs(&config.pin_dir)?;
        let specs = layout::specs(config);
        let maps_dir = layout::dir(&config.pin_dir, &specs);
        create_dir(&maps_dir)?;
        create_dir(&config.pin_dir.join("links"))?;

        // KEEL_VERIFIER_LOG=1: the verifier's whole log in a load error (for debugging the
        // programs; by default the kernel only says why it refused).
        let log_level = if std::env::var_os("KEEL_VERIFIER_LOG").is_some() {
            aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS
        } else {
            aya::VerifierLogLevel::default()
        };
        let mut ebpf = EbpfLoader::new()
            .verifier_log_level(log_level)
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(map_names::SERVICES, config.max_services)
            .map_max_entries(map_names::BACKENDS, config.backend_slots)
            .map_max_entries(map_names::MAGLEV, config.maglev_elements)
            .map_max_entries(map_names::CONNTRACK, config.ct_entries)
            .map_max_entries(map_names::REVNAT, config.ct_entries)
            .map_max_entries(map_names::AFFINITY, config.affinity_entries)
            .load(PROGRAMS)?;
        for name in TC_PROGRAMS
            .iter()
            .map(|(name, _)| *name)
            .chain([program_names::TC_FLOOR])
        {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            retry_interrupted(|| program.load())
                .map_err(|source| Error::Program { name, source })?;
        }
        for name in [program_names::XDP_FLOOR, program_names::FROM_OUTSIDE_XDP] {
            let program: &mut Xdp = program_mut(&mut ebpf, name)?;
            retry_interrupted(|| program.load())
                .map_err(|source| Error::Program { name, source })?;
        }
        for name in SOCK_PROGRAMS {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            retry_interrupted(|| program.load())
                .map_err(|source| Error::Program { name, source })?;
        }

        layout::check(&ebpf, &specs)?;
        let services_map =
            HashMap::try_from(take_map(&mut ebpf, map_names::SERVICES)?).map_err(|source| {
                Error::Map {
                    name: map_names::SERVICES,
                    source,
                }
            })?;
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, map_names::COUNTERS)?).map_err(|source| {
                Error::Map {
                    name: map_names::COUNTERS,
                    source,
                }
            })?;
        let conntrack = typed_map(&mut ebpf, map_names::CONNTRACK)?;
        let revnat = typed_map(&mut ebpf, map_names::REVNAT)?;
        let pod_addrs = typed_map(&mut ebpf, map_names::POD_ADDRS)?;
        let members = typed_map(&mut ebpf, map_names::MEMBERS)?;
        let source_ranges =
            aya::maps::LpmTrie::try_from(take_map(&mut ebpf, map_names::SOURCE_RANGES)?).map_err(
                |source| Error::Map {
                    name: map_names::SOURCE_RANGES,
                    source,
                },
            )?;
        let ranges_map = aya::maps::Array::try_from(take_map(&mut ebpf, map_names::RANGES)?)
            .map_err(|source| Error::Map {
                name: map_names::RANGES,
                source,
            })?;
        let (backends, backend_slots) = mmap_array::<Backend>(&ebpf, map_names::BACKENDS)?;
        let (maglev, maglev_elements) = mmap_array::<MaglevLanes>(&ebpf, map_names::MAGLEV)?;

        let mut dataplane = Self {
            ebpf,
            pin_dir: config.pin_dir.clone(),
            services_map,
            counters,
            conntrack,
            revnat,
            pod_addrs,
            members,
            members_present: std::collections::HashSet::new(),
            source_ranges,
            ranges_map,
            ranges: Vec::new(),
            backends,
            maglev,
            services: BTreeMap::new(),
            backend_alloc: RangeAllocator::new(backend_slots),
            maglev_alloc: RangeAllocator::new(maglev_elements),
            next_id: 1,
            migrations: Vec::new(),
        };
        dataplane.adopt_services()?;
        for old in layout::others(&config.pin_dir, &maps_dir)? {
            let migration = match dataplane.migrate_from(&old, config.allow_state_loss) {
                Ok(migration) => migration,
                Err(e) => {
                    // Refused before anything was switched: the old maps and programs keep
                    // serving; this attempt's maps go.
                    drop(dataplane);
                    let _ = layout::remove(&maps_dir);
                    return Err(e);
                }
            };
            dataplane.migrations.push(migration);
        }
        let vips: Vec<Ipv4Addr> = dataplane.cluster_vips().collect();
        dataplane.write_ranges(ranges::cover(vips, ebpf_common::MAX_RANGES))?;
        Ok(dataplane)
    }

    /// Rebuilds the in-memory view (services, range allocations) from pinned maps.
    fn adopt_services(&mut self) -> Result<(), Error> {
        let entries: Vec<(ServiceKey, ServiceValue)> = self
            .services_map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| Error::Map {
                name: map_names::SERVICES,
                source,
            })?;
        let mut adopted_ranges: std::collections::HashMap<u32, Vec<SourcePrefix>> =
            std::collections::HashMap::new();
        for key in self.source_ranges.keys().filter_map(Result::ok) {
            let data = key.data();
            let prefix = (
                Ipv4Addr::from(data.addr.to_ne_bytes()),
                key.prefix_len().saturating_sub(32) as u8,
            );
            adopted_ranges
                .entry(data.service_id)
                .or_default()
                .push(prefix);
        }
        for prefixes in adopted_ranges.values_mut() {
            prefixes.sort();
        }
        for (key, value) in entries {
            let inconsistent = |why: &str| Error::Inconsistent(format!("service {key:?}: {why}"));
            let (frontend, spec, backends) =
                decode_service(&key, &value, &self.backends).map_err(|why| inconsistent(&why))?;
            if !self
                .backend_alloc
                .reserve(value.backend_first, value.backend_count)
            {
                return Err(inconsistent(
                    "backend range overlaps another or is out of bounds",
                ));
            }
            if let Scheduler::Maglev { table_size } = spec.scheduler
                && value.backend_count > 0
            {
                let elements = maglev_elements(table_size);
                if value.maglev_first % MAGLEV_LANES as u32 != 0
                    || !self
                        .maglev_alloc
                        .reserve(value.maglev_first / MAGLEV_LANES as u32, elements)
                {
                    return Err(inconsistent(
                        "Maglev range overlaps another or is out of bounds",
                    ));
                }
            }
            self.next_id = self.next_id.max(value.id.wrapping_add(1));
            let source_ranges = adopted_ranges.remove(&value.id).unwrap_or_default();
            self.services.insert(
                frontend,
                ServiceState {
                    spec,
                    backends,
                    source_ranges,
                    value,
                },
            );
        }
        // Prefixes of services that are gone (an owner died between the two writes) go.
        for (id, prefixes) in adopted_ranges {
            for prefix in prefixes {
                let _ = self.source_ranges.remove(&source_key(id, prefix));
            }
        }
        // Members are written around each service update; an owner that died between the two
        // writes left some missing or some extra: make them what the services say.
        let wanted: std::collections::HashSet<MemberKey> = self
            .services
            .values()
            .flat_map(|state| member_keys(state.value.id, &state.backends))
            .collect();
        let present: Vec<MemberKey> = self.members.keys().filter_map(Result::ok).collect();
        for key in present.iter().filter(|k| !wanted.contains(k)) {
            remove_entry(&mut self.members, key).map_err(|source| Error::Map {
                name: map_names::MEMBERS,
                source,
            })?;
        }
        self.members_present.clear();
        self.add_member_keys(wanted.into_iter().collect())
    }

    /// Attaches the programs to `iface` (the host side of a pod's veth): `from_pod` on tc
    /// ingress, `to_pod` on tc egress, through pinned TCX links. If this data plane's links are
    /// already on the interface (a restart), their programs are replaced atomically.
    ///
    /// Other programs on the same hooks (a policy engine, a CNI's) keep running: ours pass
    /// packets on with `TCX_NEXT`, and are placed so the others always see the backend's own
    /// address: `from_pod` first in the ingress chain (the others see the translated packet),
    /// `to_pod` last in the egress chain (before the service address is restored).
    ///
    /// `sources` are the addresses the pod behind `iface` owns: packets from any other source
    /// are dropped (`drop_spoofed`) before they touch a flow, so a pod cannot forge another
    /// pod's flows. Empty: the interface is not checked (not a pod's: tests, benchmarks).
    pub fn attach(&mut self, iface: &str, sources: &[Ipv4Addr]) -> Result<(), Error> {
        let ifindex = ifindex(iface)?;
        self.set_sources(ifindex, sources)?;
        self.attach_program(
            iface,
            ifindex,
            program_names::FROM_POD,
            TcAttachType::Ingress,
            LinkOrder::first(),
        )?;
        self.attach_program(
            iface,
            ifindex,
            program_names::TO_POD,
            TcAttachType::Egress,
            LinkOrder::last(),
        )
    }

    /// Makes the pinned tc link at `pin` run this data plane's program `name` (an atomic
    /// replacement). False if there is no such link; a link whose interface is gone is removed.
    fn relink(&mut self, pin: &Path, name: &'static str) -> Result<bool, Error> {
        let Ok(pinned) = PinnedLink::from_pin(pin) else {
            return Ok(false);
        };
        let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?;
        let link =
            SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| Error::Link {
                path: pin.to_path_buf(),
                source,
            })?;
        match program.attach_to_link(link) {
            Ok(id) => {
                // The pin keeps the link attached; our handle can go.
                drop(
                    program
                        .take_link(id)
                        .map_err(|source| Error::Program { name, source })?,
                );
                Ok(true)
            }
            // The interface the link was on is gone (ENOLINK): the pin is stale.
            Err(_) => {
                remove_file(pin)?;
                Ok(false)
            }
        }
    }

    /// Moves the state of the maps pinned in `old` (another build's or configuration's) into
    /// this data plane's, switches the pinned tc links to this data plane's programs, copies
    /// what the old programs added meanwhile, and removes the old pins. Services are carried
    /// over when this data plane has none yet and their layout is the same (the owner's next
    /// sync writes them anyway); flows, affinity, sockets and interface addresses whenever
    /// their entries have the same size. Socket hooks switch when the owner attaches them.
    /// State of another entry layout is refused (nothing switched, nothing removed) unless
    /// `allow_state_loss`.
    fn migrate_from(&mut self, old: &Path, allow_state_loss: bool) -> Result<Migration, Error> {
        let mut migration = Migration {
            from: old.to_path_buf(),
            ..Migration::default()
        };
        let mut incompatible = Vec::new();
        migration.entries += self.copy_state(old, &mut migration.skipped, &mut incompatible)?;
        if !incompatible.is_empty() && !allow_state_loss {
            return Err(Error::StateNotMigratable {
                from: old.to_path_buf(),
                maps: incompatible,
            });
        }
        migration.skipped.extend(incompatible);
        if self.services.is_empty() {
            migration.services = self.migrate_services(old).unwrap_or(0);
        }
        let links = self.pin_dir.join("links");
        let pins: Vec<PathBuf> = std::fs::read_dir(&links)
            .map_err(|source| Error::Pin {
                path: links.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        for pin in pins {
            let name = pin.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(program) = pinned_program(name) else {
                continue;
            };
            self.relink(&pin, program)?;
        }
        migration.entries += self.copy_state(old, &mut Vec::new(), &mut Vec::new())?;
        layout::remove(old)?;
        Ok(migration)
    }

    /// Services from the old maps, published with their old ids (flows and affinity entries
    /// name them). None if the old maps are missing or of another layout.
    fn migrate_services(&mut self, old: &Path) -> Result<usize, Error> {
        let open = |name: &'static str| {
            MapData::from_pin(old.join(name)).map_err(|source| Error::Map { name, source })
        };
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(Map::HashMap(open(map_names::SERVICES)?)).map_err(|source| {
                Error::Map {
                    name: map_names::SERVICES,
                    source,
                }
            })?;
        let data = open(map_names::BACKENDS)?;
        let info = data.info().map_err(|source| Error::Map {
            name: map_names::BACKENDS,
            source,
        })?;
        if info.value_size() as usize != size_of::<Backend>() {
            return Ok(0);
        }
        let backends =
            MmapArray::<Backend>::new(data.fd().as_fd(), info.max_entries()).map_err(|source| {
                Error::Pin {
                    path: old.join(map_names::BACKENDS),
                    source,
                }
            })?;
        let mut entries: Vec<(ServiceKey, ServiceValue)> =
            services.iter().filter_map(Result::ok).collect();
        entries.sort_by_key(|(_, v)| v.id);
        let mut moved = 0;
        for (key, value) in entries {
            let Ok((frontend, spec, list)) = decode_service(&key, &value, &backends) else {
                continue;
            };
            self.next_id = value.id;
            if self.publish(frontend, spec, list).is_ok() {
                moved += 1;
            }
        }
        self.next_id = self
            .services
            .values()
            .map(|s| s.value.id.wrapping_add(1))
            .max()
            .unwrap_or(1);
        Ok(moved)
    }

    /// Copies every state entry of the old maps that the new ones do not have yet; notes the
    /// maps not carried over: flow state in another entry layout (`incompatible`), the rest
    /// (`missing`).
    fn copy_state(
        &mut self,
        old: &Path,
        missing: &mut Vec<&'static str>,
        incompatible: &mut Vec<&'static str>,
    ) -> Result<u64, Error> {
        let mut seen = Seen {
            missing,
            incompatible,
        };
        let mut copied = copy_entries(old, map_names::CONNTRACK, &mut self.conntrack, &mut seen)?;
        copied += copy_entries(old, map_names::REVNAT, &mut self.revnat, &mut seen)?;
        copied += copy_entries(old, map_names::POD_ADDRS, &mut self.pod_addrs, &mut seen)?;
        copied +=
            self.copy_loaded::<AffinityKey, AffinityEntry>(old, map_names::AFFINITY, &mut seen)?;
        copied += self.copy_loaded::<u64, u32>(old, map_names::SOCK_NETNS, &mut seen)?;
        copied += self.copy_loaded::<SockRevKey, RevNat>(old, map_names::SOCK_REVNAT, &mut seen)?;
        copied += self.copy_loaded::<SockFwdKey, Backend>(old, map_names::SOCK_FWD, &mut seen)?;
        copied += self.copy_loaded::<ebpf_common::FragKey, ebpf_common::FragPorts>(
            old,
            map_names::FRAGS,
            &mut seen,
        )?;
        Ok(copied)
    }

    fn copy_loaded<K: aya::Pod, V: aya::Pod>(
        &mut self,
        old: &Path,
        name: &'static str,
        seen: &mut Seen<'_>,
    ) -> Result<u64, Error> {
        let mut map: HashMap<&mut MapData, K, V> =
            HashMap::try_from(self.ebpf.map_mut(name).ok_or(Error::MissingMap(name))?)
                .map_err(|source| Error::Map { name, source })?;
        copy_entries(old, name, &mut map, seen)
    }

    /// The (service, backend) pairs `MEMBERS` holds, read from the map (for tests: it must be
    /// every distinct backend of every service).
    pub fn member_pairs(&self) -> Result<usize, Error> {
        Ok(self.members.keys().filter_map(Result::ok).count())
    }

    /// What [`Dataplane::open`] migrated from other map layouts.
    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// Attaches the `tc_floor` program (it passes every packet on) at the end of `iface`'s TCX
    /// chain on `attach_type`, counting its runs, until the probe is dropped: what a program
    /// attached after ours sees (and the floor a tc program costs on that hook).
    pub fn attach_probe(
        &mut self,
        iface: &str,
        attach_type: TcAttachType,
    ) -> Result<ChainProbe, Error> {
        let name = program_names::TC_FLOOR;
        let program_error = |source| Error::Program { name, source };
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| Error::Pin {
            path: PathBuf::from("BPF_ENABLE_STATS"),
            source: io::Error::other(e),
        })?;
        let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?;
        let options = TcAttachOptions::TcxOrder(LinkOrder::last());
        let id = program
            .attach_with_options(iface, attach_type, options)
            .map_err(program_error)?;
        let link = program.take_link(id).map_err(program_error)?;
        let info = program.info().map_err(program_error)?;
        Ok(ChainProbe {
            _link: link,
            _stats: stats,
            program_id: info.id(),
        })
    }

    fn attach_program(
        &mut self,
        iface: &str,
        ifindex: u32,
        name: &'static str,
        attach_type: TcAttachType,
        order: LinkOrder,
    ) -> Result<(), Error> {
        let pin = self.link_pin(ifindex, name);
        if self.relink(&pin, name)? {
            return Ok(());
        }
        let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?;
        let program_error = |source| Error::Program { name, source };
        let options = TcAttachOptions::TcxOrder(order);
        let id = program
            .attach_with_options(iface, attach_type, options)
            .map_err(program_error)?;
        pin_link(program.take_link(id).map_err(program_error)?, &pin)
    }

    /// Replaces the addresses an interface may send from (none: unchecked).
    fn set_sources(&mut self, ifindex: u32, sources: &[Ipv4Addr]) -> Result<(), Error> {
        let map_error = |source| Error::Map {
            name: map_names::POD_ADDRS,
            source,
        };
        if sources.is_empty() {
            return remove_entry(&mut self.pod_addrs, &ifindex).map_err(map_error);
        }
        if sources.len() > ebpf_common::MAX_POD_SOURCES {
            return Err(Error::TooManySources {
                ifindex,
                count: sources.len(),
            });
        }
        let mut value = PodSources {
            count: sources.len() as u32,
            ..PodSources::default()
        };
        for (slot, addr) in value.addrs.iter_mut().zip(sources) {
            *slot = u32::from_ne_bytes(addr.octets());
        }
        self.pod_addrs.insert(ifindex, value, 0).map_err(map_error)
    }

    /// Detaches the programs from `iface` (a pod's or the node's).
    pub fn detach(&mut self, iface: &str) -> Result<(), Error> {
        let ifindex = ifindex(iface)?;
        self.set_sources(ifindex, &[])?;
        for program in TC_PROGRAMS
            .iter()
            .map(|(program, _)| *program)
            .chain([program_names::FROM_OUTSIDE_XDP])
        {
            let pin = self.link_pin(ifindex, program);
            if pin.exists() {
                remove_file(&pin)?;
            }
        }
        Ok(())
    }

    /// Attaches the XDP fast path of `from_outside` to one of the node's own interfaces
    /// ([`XdpAcceleration`]), or removes it (`Off`). Attaching again (a restart) replaces the program
    /// atomically. `from_outside` must be attached too: the fast path leaves it everything
    /// else.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpAcceleration) -> Result<(), Error> {
        let ifindex = ifindex(iface)?;
        let name = program_names::FROM_OUTSIDE_XDP;
        let pin = self.link_pin(ifindex, name);
        let flags = match mode {
            XdpAcceleration::Off => {
                if pin.exists() {
                    remove_file(&pin)?;
                }
                return Ok(());
            }
            XdpAcceleration::Native => AttachMode::Driver,
            XdpAcceleration::Generic => AttachMode::Skb,
        };
        let program: &mut Xdp = program_mut(&mut self.ebpf, name)?;
        let program_error = |source| Error::Program { name, source };
        if let Ok(pinned) = PinnedLink::from_pin(&pin) {
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|source| Error::Link {
                path: pin.clone(),
                source,
            })?;
            if let Ok(id) = program.attach_to_link(link) {
                // The pin keeps the link attached; our handle can go.
                drop(program.take_link(id).map_err(program_error)?);
                return Ok(());
            }
            // The interface the link was on is gone: the pin is stale.
            remove_file(&pin)?;
        }
        let id = program.attach(iface, flags).map_err(program_error)?;
        pin_link(program.take_link(id).map_err(program_error)?, &pin)
    }

    /// Attaches `from_outside` to tc ingress of one of the node's own interfaces (first in its
    /// chain, as `from_pod`): NodePorts, ExternalIPs and LoadBalancer IPs for clients outside
    /// the cluster, and the replies of the flows it masqueraded. Attaching again (a restart)
    /// replaces the program atomically.
    pub fn attach_external(&mut self, iface: &str) -> Result<(), Error> {
        let ifindex = ifindex(iface)?;
        self.attach_program(
            iface,
            ifindex,
            program_names::FROM_OUTSIDE,
            TcAttachType::Ingress,
            LinkOrder::first(),
        )
    }

    /// Tells the programs about the node, for traffic from outside: its pod network, the
    /// address flows are masqueraded to, the addresses NodePorts answer on and the other
    /// nodes' (replacing the previous ones).
    pub fn set_node(&mut self, node: &NodeSettings) -> Result<(), Error> {
        let (pod_net, pod_mask) = match node.pod_cidr {
            Some((net, len)) if len > 0 => {
                let mask = u32::MAX << (32 - u32::from(len.min(32)));
                ((u32::from(net) & mask).to_be(), mask.to_be())
            }
            _ => (0, 0),
        };
        let value = NodeConfig {
            pod_net,
            pod_mask,
            masq_addr: node
                .masquerade_addr
                .map_or(0, |a| u32::from_ne_bytes(a.octets())),
            _pad: 0,
        };
        let error = |name| move |source| Error::Map { name, source };
        let mut config: aya::maps::Array<&mut MapData, NodeConfig> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut(map_names::NODE)
                .ok_or(Error::MissingMap(map_names::NODE))?,
        )
        .map_err(error(map_names::NODE))?;
        config.set(0, value, 0).map_err(error(map_names::NODE))?;
        let mut addrs: HashMap<&mut MapData, u32, u32> = HashMap::try_from(
            self.ebpf
                .map_mut(map_names::NODE_ADDRS)
                .ok_or(Error::MissingMap(map_names::NODE_ADDRS))?,
        )
        .map_err(error(map_names::NODE_ADDRS))?;
        // This node's addresses win over the same address among the peers.
        let wanted: BTreeMap<u32, u32> = node
            .peer_addrs
            .iter()
            .map(|a| (a, NODE_ADDR_PEER))
            .chain(node.nodeport_addrs.iter().map(|a| (a, NODE_ADDR_LOCAL)))
            .map(|(a, kind)| (u32::from_ne_bytes(a.octets()), kind))
            .collect();
        let stale: Vec<u32> = addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|a| !wanted.contains_key(a))
            .collect();
        for addr in stale {
            remove_entry(&mut addrs, &addr).map_err(error(map_names::NODE_ADDRS))?;
        }
        for (addr, kind) in wanted {
            addrs
                .insert(addr, kind, 0)
                .map_err(error(map_names::NODE_ADDRS))?;
        }
        Ok(())
    }

    /// Where the link of tc program `program` on interface `ifindex` is pinned:
    /// `links/if<ifindex>-<suffix>`.
    fn link_pin(&self, ifindex: u32, program: &str) -> PathBuf {
        let suffix = if program == program_names::FROM_OUTSIDE_XDP {
            "xdp"
        } else {
            TC_PROGRAMS
                .iter()
                .find(|(p, _)| *p == program)
                .map_or(program, |(_, suffix)| suffix)
        };
        self.pin_dir
            .join("links")
            .join(format!("if{ifindex}-{suffix}"))
    }

    /// Attaches the socket-level load-balancing hooks (connect, sendmsg, recvmsg, getpeername)
    /// to a cgroup v2 directory, usually the root: every socket below it is checked, and the
    /// ones in namespaces enabled with [`Dataplane::enable_socket_lb`] are load balanced at
    /// connect time. Pinned like the tc links; attaching again (a restart) replaces them.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), Error> {
        let dir = std::fs::File::open(cgroup).map_err(|source| Error::Pin {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let inode = {
            use std::os::unix::fs::MetadataExt;
            dir.metadata()
                .map_err(|source| Error::Pin {
                    path: cgroup.to_path_buf(),
                    source,
                })?
                .ino()
        };
        for name in SOCK_PROGRAMS {
            let pin = self.pin_dir.join("links").join(format!("cg{inode}-{name}"));
            let program: &mut CgroupSockAddr = program_mut(&mut self.ebpf, name)?;
            let program_error = |source| Error::Program { name, source };
            let id = program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(program_error)?;
            let link = program.take_link(id).map_err(program_error)?;
            // The new link runs beside the old one until the old pin goes: a socket translated
            // by the first is no longer a service socket for the second, so both is harmless.
            // bpffs refuses dots in names.
            let fresh = self
                .pin_dir
                .join("links")
                .join(format!("cg{inode}-{name}-new"));
            let _ = std::fs::remove_file(&fresh);
            FdLink::try_from(link)
                .map_err(|source| Error::Link {
                    path: fresh.clone(),
                    source,
                })?
                .pin(&fresh)
                .map_err(|source| Error::Pin {
                    path: fresh.clone(),
                    source: io::Error::other(source),
                })?;
            if pin.exists() {
                remove_file(&pin)?;
            }
            std::fs::rename(&fresh, &pin).map_err(|source| Error::Pin {
                path: pin.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Load balances the sockets of the network namespace with this cookie (a pod's) at
    /// connect/sendmsg time. See [`netns_cookie`].
    pub fn enable_socket_lb(&mut self, netns_cookie: u64) -> Result<(), Error> {
        let name = map_names::SOCK_NETNS;
        let mut map: HashMap<&mut MapData, u64, u32> =
            HashMap::try_from(self.ebpf.map_mut(name).ok_or(Error::MissingMap(name))?)
                .map_err(|source| Error::Map { name, source })?;
        map.insert(netns_cookie, 1, 0)
            .map_err(|source| Error::Map { name, source })
    }

    /// Stops socket-level load balancing for a namespace (its flows fall back to the
    /// per-packet path where it is attached).
    pub fn disable_socket_lb(&mut self, netns_cookie: u64) -> Result<(), Error> {
        let name = map_names::SOCK_NETNS;
        let mut map: HashMap<&mut MapData, u64, u32> =
            HashMap::try_from(self.ebpf.map_mut(name).ok_or(Error::MissingMap(name))?)
                .map_err(|source| Error::Map { name, source })?;
        remove_entry(&mut map, &netns_cookie).map_err(|source| Error::Map { name, source })
    }

    /// Creates a service with no backends (new flows are rejected until some are set), or
    /// changes an existing service's settings, keeping its backends.
    pub fn upsert_service(&mut self, frontend: Frontend, spec: ServiceSpec) -> Result<(), Error> {
        let backends = match self.services.get(&frontend) {
            Some(current) if current.spec == spec => return Ok(()),
            Some(current) => current.backends.clone(),
            None => Vec::new(),
        };
        self.publish(frontend, spec, backends)
    }

    /// Sets a service's backends. Backends that stay keep their slot, so their session
    /// affinity survives; an unchanged set changes nothing. A backend listed k times gets k
    /// shares of new flows. The service must exist.
    pub fn set_backends(
        &mut self,
        frontend: Frontend,
        backends: &[SocketAddrV4],
    ) -> Result<(), Error> {
        let current = self
            .services
            .get(&frontend)
            .ok_or(Error::NoSuchService(frontend))?;
        let ordered = stable_order(&current.backends, backends);
        if ordered == current.backends {
            return Ok(());
        }
        let spec = current.spec;
        self.publish(frontend, spec, ordered)
    }

    /// Makes the data plane hold exactly `desired`: creates, changes and deletes services as
    /// needed, one map update per changed service; unchanged services are not touched.
    /// Deletions go first, so the space they free serves the rest; a service that cannot be
    /// written (a full map, an invalid Maglev size) is reported in
    /// [`SyncReport::failed`] and never stops the others.
    pub fn sync(&mut self, desired: impl IntoIterator<Item = DesiredService>) -> SyncReport {
        let desired: Vec<DesiredService> = desired.into_iter().collect();
        let wanted: std::collections::BTreeSet<Frontend> =
            desired.iter().map(|d| d.frontend).collect();
        let extra: Vec<Frontend> = self
            .services
            .keys()
            .filter(|f| !wanted.contains(f))
            .copied()
            .collect();
        self.update(desired, extra)
    }

    /// Removes `removed`, then creates or changes `services`; every other service stays as it
    /// is. The incremental form of [`Dataplane::sync`], with the same reporting.
    pub fn update(
        &mut self,
        services: impl IntoIterator<Item = DesiredService>,
        removed: impl IntoIterator<Item = Frontend>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut stale: Vec<MemberKey> = Vec::new();
        for frontend in removed {
            match self.unpublish(frontend) {
                Ok(keys) => {
                    report.deleted += 1;
                    if frontend.proto == Protocol::Udp {
                        report.left_udp.extend(keys.iter().map(member_addr));
                    }
                    stale.extend(keys);
                }
                Err(Error::NoSuchService(_)) => {}
                Err(e) => report.failed.push((frontend, e.to_string())),
            }
        }
        let mut plans: Vec<(Frontend, ServiceSpec, Vec<SocketAddrV4>, bool)> = Vec::new();
        let mut wanted_ranges: std::collections::HashMap<Frontend, Vec<SourcePrefix>> =
            std::collections::HashMap::new();
        for mut service in services {
            service.source_ranges.sort();
            service.source_ranges.dedup();
            let current = self.services.get(&service.frontend);
            let same_ranges = current.is_some_and(|c| c.source_ranges == service.source_ranges);
            // Most services are unchanged from one sync to the next: compare before computing.
            if same_ranges
                && current.is_some_and(|c| c.spec == service.spec && c.backends == service.backends)
            {
                report.unchanged += 1;
                continue;
            }
            let backends = stable_order(
                current.map(|c| c.backends.as_slice()).unwrap_or_default(),
                &service.backends,
            );
            let created = match current {
                Some(c) if same_ranges && c.spec == service.spec && c.backends == backends => {
                    report.unchanged += 1;
                    continue;
                }
                Some(_) => false,
                None => true,
            };
            wanted_ranges.insert(service.frontend, service.source_ranges);
            plans.push((service.frontend, service.spec, backends, created));
        }
        // Every service's members and address range first, in a few syscalls, before any
        // value that needs them is published.
        let mut ids = Vec::with_capacity(plans.len());
        for (frontend, ..) in &plans {
            ids.push(self.id_for(frontend));
        }
        let members: Vec<MemberKey> = plans
            .iter()
            .zip(&ids)
            .filter_map(|((_, _, backends, _), id)| Some(member_keys(*id.as_ref().ok()?, backends)))
            .flatten()
            .collect();
        let vips = plans
            .iter()
            .filter(|(_, spec, ..)| spec.reach == Reach::Cluster)
            .map(|(f, ..)| *f.addr.ip());
        let prepared = self
            .add_member_keys(members)
            .and_then(|()| self.widen_ranges(vips));
        for ((frontend, spec, backends, created), id) in plans.into_iter().zip(ids) {
            let written = match (&prepared, &id) {
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
                (Ok(()), Ok(id)) => {
                    let new = backends.clone();
                    let ranges = wanted_ranges.remove(&frontend).unwrap_or_default();
                    self.write_service(frontend, spec, backends, ranges, *id)
                        .map_err(|e| {
                            // The members added for it go again (those it still has stay).
                            stale.extend(self.unused_members(frontend, *id, &new));
                            e.to_string()
                        })
                }
            };
            match written {
                Ok(keys) => {
                    if frontend.proto == Protocol::Udp {
                        report.left_udp.extend(keys.iter().map(member_addr));
                    }
                    stale.extend(keys);
                    if created {
                        report.created += 1;
                    } else {
                        report.updated += 1;
                    }
                }
                Err(why) => report.failed.push((frontend, why)),
            }
        }
        // Members of backends that left; a failure leaves extra members, which only keep a
        // removed backend's UDP flows a while longer.
        let _ = self.remove_member_keys(stale);
        // Tightens the ranges after removals. If it fails they stay a superset: correct,
        // only less of the other traffic leaves early.
        if report.deleted > 0 {
            let _ = self.refresh_ranges();
        }
        report.left_udp.sort_unstable();
        report.left_udp.dedup();
        report
    }

    /// Ends the connected UDP sockets of `diag`'s network namespace that socket-level load
    /// balancing connected to one of `backends` (see the `sockets` module): their owners'
    /// next call fails with ECONNABORTED and the sockets they open instead go to a backend
    /// that is still there. Only sockets this data plane translated are ended. The number
    /// ended.
    pub fn end_sockets_to(
        &self,
        diag: &sockets::Diag,
        backends: &[SocketAddrV4],
    ) -> Result<usize, Error> {
        if backends.is_empty() {
            return Ok(0);
        }
        let name = map_names::SOCK_REVNAT;
        let translated: HashMap<&MapData, SockRevKey, RevNat> =
            HashMap::try_from(self.ebpf.map(name).ok_or(Error::MissingMap(name))?)
                .map_err(|source| Error::Map { name, source })?;
        let diag_error = |source| Error::Pin {
            path: PathBuf::from("sock_diag"),
            source,
        };
        let mut ended = 0;
        for socket in diag.connected_udp().map_err(diag_error)? {
            if !backends.contains(&socket.peer) {
                continue;
            }
            let key = SockRevKey {
                cookie: socket.id.cookie(),
                backend: Backend {
                    ip: u32::from_ne_bytes(socket.peer.ip().octets()),
                    port: socket.peer.port().to_be(),
                    _pad: 0,
                },
            };
            if translated.get(&key, 0).is_ok() {
                diag.destroy(&socket).map_err(diag_error)?;
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Removes a service. Established TCP flows to its backends keep working (as with
    /// kube-proxy's conntrack); new flows to its address are no longer translated.
    pub fn delete_service(&mut self, frontend: Frontend) -> Result<(), Error> {
        let stale = self.unpublish(frontend)?;
        self.remove_member_keys(stale)
    }

    /// Removes a service's value; returns its members (to remove once nothing needs them).
    fn unpublish(&mut self, frontend: Frontend) -> Result<Vec<MemberKey>, Error> {
        let Some(state) = self.services.remove(&frontend) else {
            return Err(Error::NoSuchService(frontend));
        };
        self.services_map
            .remove(&frontend.key())
            .map_err(|source| Error::Map {
                name: map_names::SERVICES,
                source,
            })?;
        self.release_ranges(&state.value);
        self.remove_source_ranges(state.value.id, &state.source_ranges);
        Ok(member_keys(state.value.id, &state.backends).collect())
    }

    /// Removes a frontend's client prefixes (best effort: a leftover one matches nothing once
    /// its service id is gone, and is collected when the data plane is next adopted).
    fn remove_source_ranges(&mut self, id: u32, prefixes: &[SourcePrefix]) {
        for prefix in prefixes {
            let _ = self.source_ranges.remove(&source_key(id, *prefix));
        }
    }

    /// Makes the ranges cover `vips` (before services on them are published), if they do not.
    fn widen_ranges(&mut self, vips: impl IntoIterator<Item = Ipv4Addr>) -> Result<(), Error> {
        let outside: Vec<Ipv4Addr> = vips
            .into_iter()
            .filter(|vip| !ranges::covers(&self.ranges, *vip))
            .collect();
        if outside.is_empty() {
            return Ok(());
        }
        let all = self.services.keys().map(|f| *f.addr.ip()).chain(outside);
        self.write_ranges(ranges::cover(all, ebpf_common::MAX_RANGES))
    }

    /// The addresses of the frontends pods reach (the ranges cover these only: `from_pod`
    /// looks nothing else up).
    fn cluster_vips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.services
            .iter()
            .filter(|(_, s)| s.spec.reach == Reach::Cluster)
            .map(|(f, _)| *f.addr.ip())
    }

    /// Recomputes the ranges from the services (tighter after removals).
    fn refresh_ranges(&mut self) -> Result<(), Error> {
        let vips = self.cluster_vips();
        let prefixes = ranges::cover(vips, ebpf_common::MAX_RANGES);
        if prefixes == self.ranges {
            return Ok(());
        }
        self.write_ranges(prefixes)
    }

    fn write_ranges(&mut self, prefixes: Vec<ranges::Prefix>) -> Result<(), Error> {
        self.ranges_map
            .set(0, ranges::value(&prefixes), 0)
            .map_err(|source| Error::Map {
                name: map_names::RANGES,
                source,
            })?;
        self.ranges = prefixes;
        Ok(())
    }

    /// Adds members (before the service values naming them are published), in one batch.
    fn add_member_keys(&mut self, keys: Vec<MemberKey>) -> Result<(), Error> {
        let mut new: Vec<MemberKey> = keys
            .into_iter()
            .filter(|k| !self.members_present.contains(k))
            .collect();
        new.sort_unstable_by_key(|k| (k.service_id, k.backend));
        new.dedup();
        if new.is_empty() {
            return Ok(());
        }
        let values = vec![1u32; new.len()];
        batch::update(self.members.map().fd().as_fd(), &new, &values).map_err(|e| Error::Pin {
            path: PathBuf::from(map_names::MEMBERS),
            source: e,
        })?;
        self.members_present.extend(new);
        Ok(())
    }

    /// Removes members (after the service values without them are published), in one batch.
    fn remove_member_keys(&mut self, keys: Vec<MemberKey>) -> Result<(), Error> {
        let mut gone: Vec<MemberKey> = keys
            .into_iter()
            .filter(|k| self.members_present.contains(k))
            .collect();
        gone.sort_unstable_by_key(|k| (k.service_id, k.backend));
        gone.dedup();
        if gone.is_empty() {
            return Ok(());
        }
        batch::delete(self.members.map().fd().as_fd(), &gone).map_err(|e| Error::Pin {
            path: PathBuf::from(map_names::MEMBERS),
            source: e,
        })?;
        for k in &gone {
            self.members_present.remove(k);
        }
        Ok(())
    }

    /// The id of the service at `frontend`: its own, or a new one.
    fn id_for(&mut self, frontend: &Frontend) -> Result<u32, Error> {
        if let Some(current) = self.services.get(frontend) {
            return Ok(current.value.id);
        }
        if self.services.len() as u64 >= u64::from(self.services_map_capacity()) {
            return Err(Error::Full {
                what: "services",
                wanted: 1,
            });
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        Ok(id)
    }

    /// One service: its members and address range, its value, then the members it lost.
    fn publish(
        &mut self,
        frontend: Frontend,
        spec: ServiceSpec,
        backends: Vec<SocketAddrV4>,
    ) -> Result<(), Error> {
        let id = self.id_for(&frontend)?;
        self.add_member_keys(member_keys(id, &backends).collect())?;
        if spec.reach == Reach::Cluster {
            self.widen_ranges([*frontend.addr.ip()])?;
        }
        let new = backends.clone();
        let ranges = self
            .services
            .get(&frontend)
            .map(|s| s.source_ranges.clone())
            .unwrap_or_default();
        match self.write_service(frontend, spec, backends, ranges, id) {
            Ok(stale) => self.remove_member_keys(stale),
            Err(e) => {
                let _ = self.remove_member_keys(self.unused_members(frontend, id, &new));
                Err(e)
            }
        }
    }

    /// Of the members of `backends`, those the service at `frontend` does not have (after its
    /// update failed).
    fn unused_members(
        &self,
        frontend: Frontend,
        id: u32,
        backends: &[SocketAddrV4],
    ) -> Vec<MemberKey> {
        let current: std::collections::HashSet<MemberKey> = self
            .services
            .get(&frontend)
            .map(|s| member_keys(id, &s.backends).collect())
            .unwrap_or_default();
        member_keys(id, backends)
            .filter(|k| !current.contains(k))
            .collect()
    }

    /// Writes a service's backend range and Maglev table into fresh ranges, publishes them with
    /// one SERVICES update, then frees the ranges they replace. Its members and its address's
    /// range must be there already. Returns the members of the backends it lost.
    fn write_service(
        &mut self,
        frontend: Frontend,
        spec: ServiceSpec,
        backends: Vec<SocketAddrV4>,
        source_ranges: Vec<SourcePrefix>,
        id: u32,
    ) -> Result<Vec<MemberKey>, Error> {
        let count = u32::try_from(backends.len()).map_err(|_| Error::TooManyBackends(frontend))?;
        let mut flags = 0;
        let mut maglev_size = 0;
        if let Scheduler::Maglev { table_size } = spec.scheduler {
            if !maglev::is_prime(table_size) || table_size > maglev::MAX_TABLE_SIZE {
                return Err(Error::InvalidMaglevSize(table_size));
            }
            if count >= table_size || count > u32::from(u16::MAX) {
                return Err(Error::TooManyBackends(frontend));
            }
            flags |= SVC_FLAG_MAGLEV;
            maglev_size = table_size;
        }
        if let Reach::External {
            remote,
            drop_when_empty,
        } = spec.reach
        {
            flags |= SVC_FLAG_EXTERNAL;
            flags |= match remote {
                Remote::AsItCame => 0,
                Remote::Masquerade => SVC_FLAG_MASQ,
                Remote::DirectReturn => SVC_FLAG_DSR,
            };
            if drop_when_empty {
                flags |= SVC_FLAG_DROP_EMPTY;
            }
        }
        if !source_ranges.is_empty() {
            flags |= SVC_FLAG_SOURCE_RANGES;
        }
        let mut affinity_timeout_s = 0;
        if let Some(timeout) = spec.affinity_timeout {
            flags |= SVC_FLAG_AFFINITY;
            affinity_timeout_s = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1);
        }
        let backend_first = self.backend_alloc.allocate(count).ok_or(Error::Full {
            what: "backend slots",
            wanted: count,
        })?;
        let slots: Vec<Backend> = backends
            .iter()
            .map(|b| Backend {
                ip: u32::from_ne_bytes(b.ip().octets()),
                port: b.port().to_be(),
                _pad: 0,
            })
            .collect();
        self.backends.write(backend_first, &slots);

        let mut maglev_first = 0;
        if maglev_size != 0 && count > 0 {
            let elements = maglev_elements(maglev_size);
            let Some(first) = self.maglev_alloc.allocate(elements) else {
                self.backend_alloc.release_unpublished(backend_first, count);
                return Err(Error::Full {
                    what: "Maglev table space",
                    wanted: elements,
                });
            };
            let table = maglev::table(&backends, maglev_size);
            let lanes: Vec<MaglevLanes> = table
                .chunks(MAGLEV_LANES)
                .map(|c| {
                    let mut lanes = [0; MAGLEV_LANES];
                    lanes[..c.len()].copy_from_slice(c);
                    lanes
                })
                .collect();
            self.maglev.write(first, &lanes);
            maglev_first = first * MAGLEV_LANES as u32;
        }

        let value = ServiceValue {
            id,
            backend_first,
            backend_count: count,
            maglev_first,
            // Kept without backends (the table is then empty and unallocated): the service
            // must still say which table size it uses when it is adopted and gets backends.
            maglev_size,
            affinity_timeout_s,
            flags,
            _pad: 0,
        };
        // The prefixes a frontend accepts are there before a value that checks them.
        for prefix in &source_ranges {
            if let Err(source) = self.source_ranges.insert(&source_key(id, *prefix), 1, 0) {
                self.release_unpublished(&value);
                return Err(Error::Map {
                    name: map_names::SOURCE_RANGES,
                    source,
                });
            }
        }
        if let Err(source) = self.services_map.insert(frontend.key(), value, 0) {
            self.release_unpublished(&value);
            return Err(Error::Map {
                name: map_names::SERVICES,
                source,
            });
        }
        let gone = self.services.insert(
            frontend,
            ServiceState {
                spec,
                backends,
                source_ranges,
                value,
            },
        );
        let Some(old) = gone else {
            return Ok(Vec::new());
        };
        self.release_ranges(&old.value);
        let dropped: Vec<SourcePrefix> = old
            .source_ranges
            .iter()
            .filter(|p| !self.services[&frontend].source_ranges.contains(p))
            .copied()
            .collect();
        self.remove_source_ranges(id, &dropped);
        let kept: std::collections::HashSet<MemberKey> =
            member_keys(id, &self.services[&frontend].backends).collect();
        Ok(member_keys(id, &old.backends)
            .filter(|k| !kept.contains(k))
            .collect())
    }

    /// Frees the ranges of a service value the kernel has seen (reused after the quarantine).
    fn release_ranges(&mut self, value: &ServiceValue) {
        self.backend_alloc
            .release(value.backend_first, value.backend_count);
        if let Some((first, elements)) = maglev_range(value) {
            self.maglev_alloc.release(first, elements);
        }
    }

    /// Frees the ranges of a service value that was never published.
    fn release_unpublished(&mut self, value: &ServiceValue) {
        self.backend_alloc
            .release_unpublished(value.backend_first, value.backend_count);
        if let Some((first, elements)) = maglev_range(value) {
            self.maglev_alloc.release_unpublished(first, elements);
        }
    }

    fn services_map_capacity(&self) -> u32 {
        self.services_map
            .map()
            .info()
            .map(|info| info.max_entries())
            .unwrap_or(u32::MAX)
    }

    /// The services, in frontend order.
    pub fn services(&self) -> impl Iterator<Item = (&Frontend, &ServiceState)> {
        self.services.iter()
    }

    pub fn service(&self, frontend: &Frontend) -> Option<&ServiceState> {
        self.services.get(frontend)
    }

    /// The counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, Error> {
        read_stats(&self.counters)
    }

    /// Backend slots in use and in all.
    pub fn backend_slots(&self) -> (u64, u32) {
        (self.backend_alloc.used(), self.backend_alloc.capacity())
    }

    /// Kernel memory of every map (`memlock` as /proc reports it for the map's fd).
    pub fn map_memory(&self) -> Result<MapMemory, Error> {
        let mut maps = Vec::new();
        for &name in map_names::ALL {
            let data = match name {
                map_names::SERVICES => self.services_map.map(),
                map_names::COUNTERS => self.counters.map(),
                map_names::CONNTRACK => self.conntrack.map(),
                map_names::REVNAT => self.revnat.map(),
                map_names::POD_ADDRS => self.pod_addrs.map(),
                map_names::MEMBERS => self.members.map(),
                map_names::RANGES => self.ranges_map.map(),
                _ => map_data(&self.ebpf, name)?,
            };
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| Error::Pin {
                    path: PathBuf::from(name),
                    source,
                })?;
            maps.push((name, memlock(&fd)?));
        }
        Ok(MapMemory { maps })
    }

    /// Runs a program once or `repeat` times on `frame` with BPF_PROG_TEST_RUN. Map updates the
    /// program makes are real (a test run of a new flow creates its conntrack entry).
    pub fn test_run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutput, Error> {
        let name = hook.program_name();
        // Room for what the programs may add (the ICMP reject pushes 28 bytes).
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..TestRunOptions::default()
        };
        let result = match hook {
            Hook::XdpFloor | Hook::FromOutsideXdp => {
                program_mut::<Xdp>(&mut self.ebpf, name)?.test_run(opts)
            }
            _ => program_mut::<SchedClassifier>(&mut self.ebpf, name)?.test_run(opts),
        }
        .map_err(|source| Error::Program { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: result.return_value,
            frame: out,
            per_run: result.duration,
        })
    }

    /// The backend the kernel's Maglev lookup gives `client` for a Maglev service (what a new
    /// flow without session affinity will get). `None` for other services or without backends.
    pub fn maglev_backend(
        &self,
        frontend: &Frontend,
        client: SocketAddrV4,
    ) -> Option<SocketAddrV4> {
        let state = self.services.get(frontend)?;
        if state.value.flags & SVC_FLAG_MAGLEV == 0 || state.backends.is_empty() {
            return None;
        }
        let hash = ebpf_common::flow_hash(
            u32::from_ne_bytes(client.ip().octets()),
            client.port().to_be(),
        );
        let lane = state.value.maglev_first + hash % state.value.maglev_size;
        let lanes = self.maglev.read(lane / MAGLEV_LANES as u32, 1)[0];
        state
            .backends
            .get(usize::from(lanes[(lane % MAGLEV_LANES as u32) as usize]))
            .copied()
    }

    /// Reads the conntrack entry of a flow (client -> service), if any.
    pub fn conntrack(
        &self,
        client: SocketAddrV4,
        service: Frontend,
    ) -> Result<Option<SocketAddrV4>, Error> {
        let key = flow_key(client, service);
        match self.conntrack.get(&key, 0) {
            Ok(entry) => Ok(Some(SocketAddrV4::new(
                Ipv4Addr::from(entry.backend.ip.to_ne_bytes()),
                u16::from_be(entry.backend.port),
            ))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(Error::Map {
                name: map_names::CONNTRACK,
                source,
            }),
        }
    }

    /// Collects conntrack: removes the flows idle longer than their state's lifetime
    /// (`ebpf_common::lifetimes`) with their reverse entries, and reverse entries whose flow is
    /// gone (evicted). Closed TCP flows are removed by the programs themselves; this catches
    /// the rest (UDP, flows that never closed cleanly) before the LRU has to evict live ones.
    /// Call it periodically (the node agent does every [`GC_PERIOD`]).
    pub fn gc(&mut self) -> Result<GcReport, Error> {
        let now = monotonic_coarse_s();
        let ct_error = |source| Error::Map {
            name: map_names::CONNTRACK,
            source,
        };
        let flows: Vec<(FlowKey, CtEntry)> = self.conntrack.iter().filter_map(Result::ok).collect();
        let mut report = GcReport {
            entries: flows.len() as u64,
            ..GcReport::default()
        };
        let expired = |entry: &CtEntry, proto: u8| {
            now.saturating_sub(entry.last_seen) > entry.lifetime_s(proto)
        };
        for (key, entry) in &flows {
            if !expired(entry, key.proto) {
                continue;
            }
            // Read again right before removing: a packet may have just refreshed it.
            match self.conntrack.get(key, 0) {
                Ok(now_entry) if expired(&now_entry, key.proto) => {}
                _ => continue,
            }
            remove_entry(&mut self.conntrack, key).map_err(ct_error)?;
            let _ = self.revnat.remove(&entry.reply_key(key));
            report.expired += 1;
        }
        let replies: Vec<(FlowKey, RevNat)> = self.revnat.iter().filter_map(Result::ok).collect();
        for (reply, revnat) in &replies {
            let flow = revnat.flow_of(reply);
            if matches!(
                self.conntrack.get(&flow, 0),
                Err(aya::maps::MapError::KeyNotFound)
            ) {
                let _ = self.revnat.remove(reply);
                report.orphans += 1;
            }
        }
        report.entries -= report.expired;
        Ok(report)
    }

    /// Ages every conntrack entry by `by` (tests of the collector without waiting).
    pub fn age_conntrack(&mut self, by: Duration) -> Result<(), Error> {
        let by = u32::try_from(by.as_secs()).unwrap_or(u32::MAX);
        let flows: Vec<(FlowKey, CtEntry)> = self.conntrack.iter().filter_map(Result::ok).collect();
        for (key, mut entry) in flows {
            entry.last_seen = entry.last_seen.wrapping_sub(by);
            self.conntrack
                .insert(key, entry, 0)
                .map_err(|source| Error::Map {
                    name: map_names::CONNTRACK,
                    source,
                })?;
        }
        Ok(())
    }

    /// Removes the reverse entry of a client's flow to a service, as an LRU eviction would
    /// (tests of the repair). False if the flow is not tracked.
    pub fn forget_reply(&mut self, client: SocketAddrV4, service: Frontend) -> Result<bool, Error> {
        let key = flow_key(client, service);
        let Ok(entry) = self.conntrack.get(&key, 0) else {
            return Ok(false);
        };
        Ok(self.revnat.remove(&entry.reply_key(&key)).is_ok())
    }

    /// Ages a client's session affinity entry for a service by `by` (tests of the timeout
    /// without waiting for it). False if there is no entry.
    pub fn age_affinity(
        &mut self,
        client: Ipv4Addr,
        service: Frontend,
        by: Duration,
    ) -> Result<bool, Error> {
        let Some(state) = self.services.get(&service) else {
            return Err(Error::NoSuchService(service));
        };
        let name = map_names::AFFINITY;
        let mut map: HashMap<&mut MapData, AffinityKey, AffinityEntry> =
            HashMap::try_from(self.ebpf.map_mut(name).ok_or(Error::MissingMap(name))?)
                .map_err(|source| Error::Map { name, source })?;
        let key = AffinityKey {
            client: u32::from_ne_bytes(client.octets()),
            service_id: state.value.id,
        };
        let mut entry = match map.get(&key, 0) {
            Ok(entry) => entry,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(false),
            Err(source) => return Err(Error::Map { name, source }),
        };
        entry.last_used_ns = entry.last_used_ns.wrapping_sub(by.as_nanos() as u64);
        map.insert(key, entry, 0)
            .map_err(|source| Error::Map { name, source })?;
        Ok(true)
    }

    /// Detaches from every interface and removes every pinned object: flows and services are
    /// gone for good. The next [`Dataplane::open`] starts from scratch.
    pub fn destroy(self) -> Result<(), Error> {
        let pin_dir = self.pin_dir.clone();
        drop(self);
        remove_dir_all(&pin_dir)
    }
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14), the
/// key [`Dataplane::enable_socket_lb`] takes. Call it from a thread inside the pod's namespace.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // An unbound socket: binding needs an address, and a pod's loopback may be down.
    // SAFETY: socket() with constant arguments; the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 with its size.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The order backends take in their slots: a backend that stays keeps its slot if the slot
/// still exists; newcomers (in the order given) fill the remaining slots. A backend listed k
/// times holds k slots, so it gets k shares of new flows (a weight).
fn stable_order(current: &[SocketAddrV4], wanted: &[SocketAddrV4]) -> Vec<SocketAddrV4> {
    let mut unplaced: std::collections::HashMap<SocketAddrV4, usize> =
        std::collections::HashMap::new();
    for &b in wanted {
        *unplaced.entry(b).or_default() += 1;
    }
    let mut take = |b: &SocketAddrV4| match unplaced.get_mut(b) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    };
    let mut slots: Vec<Option<SocketAddrV4>> = vec![None; wanted.len()];
    for (slot, b) in slots.iter_mut().zip(current) {
        if take(b) {
            *slot = Some(*b);
        }
    }
    let mut newcomers = wanted.iter().filter(|b| take(b));
    slots
        .into_iter()
        .map(|slot| slot.unwrap_or_else(|| *newcomers.next().expect("one newcomer per free slot")))
        .collect()
}

/// The `MAGLEV` elements a service value owns, if any.
fn maglev_range(value: &ServiceValue) -> Option<(u32, u32)> {
    (value.flags & SVC_FLAG_MAGLEV != 0 && value.maglev_size != 0 && value.backend_count > 0).then(
        || {
            (
                value.maglev_first / MAGLEV_LANES as u32,
                maglev_elements(value.maglev_size),
            )
        },
    )
}

fn maglev_elements(table_size: u32) -> u32 {
    table_size.div_ceil(MAGLEV_LANES as u32)
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// The counters summed over CPUs.
fn read_stats(counters: &PerCpuArray<MapData, u64>) -> Result<Stats, Error> {
    let mut values = [0u64; COUNTER_COUNT as usize];
    for (index, value) in values.iter_mut().enumerate() {
        let per_cpu = counters
            .get(&(index as u32), 0)
            .map_err(|source| Error::Map {
                name: map_names::COUNTERS,
                source,
            })?;
        *value = per_cpu.iter().sum();
    }
    Ok(Stats { values })
}

/// A service as its SERVICES entry and backend range describe it.
fn decode_service(
    key: &ServiceKey,
    value: &ServiceValue,
    backends: &MmapArray<Backend>,
) -> Result<(Frontend, ServiceSpec, Vec<SocketAddrV4>), String> {
    let frontend = Frontend::from_key(key).ok_or("unknown protocol")?;
    let end = u64::from(value.backend_first) + u64::from(value.backend_count);
    if end > u64::from(backends.len()) {
        return Err("backend range out of bounds".into());
    }
    let list = backends
        .read(value.backend_first, value.backend_count)
        .iter()
        .map(|b| SocketAddrV4::new(Ipv4Addr::from(b.ip.to_ne_bytes()), u16::from_be(b.port)))
        .collect();
    let scheduler = if value.flags & SVC_FLAG_MAGLEV != 0 {
        Scheduler::Maglev {
            table_size: value.maglev_size,
        }
    } else {
        Scheduler::Random
    };
    let affinity_timeout = (value.flags & SVC_FLAG_AFFINITY != 0)
        .then(|| Duration::from_secs(u64::from(value.affinity_timeout_s)));
    let reach = if value.flags & SVC_FLAG_EXTERNAL != 0 {
        Reach::External {
            remote: if value.flags & SVC_FLAG_DSR != 0 {
                Remote::DirectReturn
            } else if value.flags & SVC_FLAG_MASQ != 0 {
                Remote::Masquerade
            } else {
                Remote::AsItCame
            },
            drop_when_empty: value.flags & SVC_FLAG_DROP_EMPTY != 0,
        }
    } else {
        Reach::Cluster
    };
    Ok((
        frontend,
        ServiceSpec {
            scheduler,
            affinity_timeout,
            reach,
        },
        list,
    ))
}

/// A read-only view of a data plane's pinned maps, for inspection tools and metrics: nothing
/// is loaded, attached or written, so it can run beside the data plane's owner.
pub struct Pinned {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    counters: PerCpuArray<MapData, u64>,
    backends: MmapArray<Backend>,
}

/// How full the data plane's maps are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    pub services: u64,
    pub max_services: u32,
    pub backend_slots_used: u64,
    pub backend_slots: u32,
}

impl Pinned {
    /// Opens the maps pinned under `pin_dir` by a data plane of this build.
    pub fn open(pin_dir: &Path) -> Result<Self, Error> {
        let dir = layout::find(pin_dir)?;
        let open = |name: &'static str| -> Result<MapData, Error> {
            MapData::from_pin(dir.join(name)).map_err(|source| Error::Map { name, source })
        };
        let services =
            HashMap::try_from(Map::HashMap(open(map_names::SERVICES)?)).map_err(|source| {
                Error::Map {
                    name: map_names::SERVICES,
                    source,
                }
            })?;
        let counters = PerCpuArray::try_from(Map::PerCpuArray(open(map_names::COUNTERS)?))
            .map_err(|source| Error::Map {
                name: map_names::COUNTERS,
                source,
            })?;
        let data = open(map_names::BACKENDS)?;
        let slots = data
            .info()
            .map_err(|source| Error::Map {
                name: map_names::BACKENDS,
                source,
            })?
            .max_entries();
        let backends = MmapArray::new(data.fd().as_fd(), slots).map_err(|source| Error::Pin {
            path: dir.join(map_names::BACKENDS),
            source,
        })?;
        Ok(Self {
            services,
            counters,
            backends,
        })
    }

    /// The services and their backends, in frontend order.
    pub fn services(&self) -> Result<Vec<(Frontend, ServiceSpec, Vec<SocketAddrV4>)>, Error> {
        let mut out = Vec::new();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(|source| Error::Map {
                name: map_names::SERVICES,
                source,
            })?;
            out.push(
                decode_service(&key, &value, &self.backends)
                    .map_err(|why| Error::Inconsistent(format!("service {key:?}: {why}")))?,
            );
        }
        out.sort_by_key(|(frontend, ..)| *frontend);
        Ok(out)
    }

    /// One service's settings and backends (one map lookup), or `None` if it is not there.
    pub fn service(
        &self,
        frontend: &Frontend,
    ) -> Result<Option<(ServiceSpec, Vec<SocketAddrV4>)>, Error> {
        let key = frontend.key();
        match self.services.get(&key, 0) {
            Ok(value) => decode_service(&key, &value, &self.backends)
                .map(|(_, spec, backends)| Some((spec, backends)))
                .map_err(|why| Error::Inconsistent(format!("service {frontend}: {why}"))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(Error::Map {
                name: map_names::SERVICES,
                source,
            }),
        }
    }

    pub fn stats(&self) -> Result<Stats, Error> {
        read_stats(&self.counters)
    }

    pub fn fill(&self) -> Result<Fill, Error> {
        let mut fill = Fill {
            max_services: self
                .services
                .map()
                .info()
                .map(|i| i.max_entries())
                .unwrap_or(0),
            backend_slots: self.backends.len(),
            ..Fill::default()
        };
        for entry in self.services.iter() {
            let (_, value) = entry.map_err(|source| Error::Map {
                name: map_names::SERVICES,
                source,
            })?;
            fill.services += 1;
            fill.backend_slots_used += u64::from(value.backend_count);
        }
        Ok(fill)
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, Error> {
    ebpf.take_map(name).ok_or(Error::MissingMap(name))
}

/// What copying state from an old layout met besides entries.
struct Seen<'a> {
    /// Maps the old layout does not have, and maps the owner fills again anyway (interface
    /// sources, enabled namespaces) or whose entries live for milliseconds (fragments) held
    /// with entries of another size.
    missing: &'a mut Vec<&'static str>,
    /// Flow state held with entries of another size: losing it re-balances or breaks flows.
    incompatible: &'a mut Vec<&'static str>,
}

/// The maps whose entries are live flows (or keep clients on their backends).
const FLOW_STATE: [&str; 5] = [
    map_names::CONNTRACK,
    map_names::REVNAT,
    map_names::AFFINITY,
    map_names::SOCK_REVNAT,
    map_names::SOCK_FWD,
];

/// Copies the entries of the map `name` pinned in `old_dir` into `new`, keeping the entries
/// `new` has. A map missing there, or holding entries of another size, is noted in `seen`.
fn copy_entries<T: std::borrow::BorrowMut<MapData>, K: aya::Pod, V: aya::Pod>(
    old_dir: &Path,
    name: &'static str,
    new: &mut HashMap<T, K, V>,
    seen: &mut Seen<'_>,
) -> Result<u64, Error> {
    let note = |list: &mut Vec<&'static str>| {
        if !list.contains(&name) {
            list.push(name);
        }
    };
    let Ok(data) = MapData::from_pin(old_dir.join(name)) else {
        note(seen.missing);
        return Ok(0);
    };
    let Ok(old) = HashMap::<MapData, K, V>::try_from(Map::HashMap(data)) else {
        if FLOW_STATE.contains(&name) {
            note(seen.incompatible);
        } else {
            note(seen.missing);
        }
        return Ok(0);
    };
    const BPF_NOEXIST: u64 = 1;
    let mut copied = 0;
    for (key, value) in old.iter().filter_map(Result::ok) {
        if new.insert(key, value, BPF_NOEXIST).is_ok() {
            copied += 1;
        }
    }
    Ok(copied)
}

/// Removes a hash map entry; one that is not there (any more) is no error.
fn remove_entry<T: std::borrow::BorrowMut<MapData>, K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<T, K, V>,
    key: &K,
) -> Result<(), aya::maps::MapError> {
    match map.remove(key) {
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// Takes a hash map (plain or LRU) out of the loaded object, typed.
fn typed_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, Error> {
    HashMap::try_from(take_map(ebpf, name)?).map_err(|source| Error::Map { name, source })
}

fn map_data<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a MapData, Error> {
    match ebpf.map(name).ok_or(Error::MissingMap(name))? {
        Map::Array(data) | Map::LruHashMap(data) | Map::HashMap(data) | Map::PerCpuArray(data) => {
            Ok(data)
        }
        _ => Err(Error::Inconsistent(format!(
            "map {name} has an unexpected type"
        ))),
    }
}

/// Maps an mmapable array map; returns the mapping and the map's size.
fn mmap_array<T: Copy>(ebpf: &Ebpf, name: &'static str) -> Result<(MmapArray<T>, u32), Error> {
    let data = map_data(ebpf, name)?;
    let info = data.info().map_err(|source| Error::Map { name, source })?;
    let array =
        MmapArray::new(data.fd().as_fd(), info.max_entries()).map_err(|source| Error::Pin {
            path: PathBuf::from(name),
            source,
        })?;
    Ok((array, info.max_entries()))
}

/// bpffs must be mounted where pins go; on a machine without it (no systemd to mount it),
/// mount it at /sys/fs/bpf.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let bpffs = Path::new("/sys/fs/bpf");
    let is_bpffs = |path: &Path| -> bool {
        let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: statfs fills the struct; the path is NUL-terminated.
        unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
        }
    };
    if pin_dir.starts_with(bpffs) && !is_bpffs(bpffs) {
        let source = CString::new("bpf").expect("no NUL");
        let target = CString::new("/sys/fs/bpf").expect("no NUL");
        // SAFETY: plain mount(2) of a pseudo filesystem with NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                source.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(Error::Pin {
                path: bpffs.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
    }
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if !is_bpffs(&probe) {
        return Err(Error::NotBpffs(pin_dir.to_path_buf()));
    }
    Ok(())
}

fn ifindex(iface: &str) -> Result<u32, Error> {
    let c_name = CString::new(iface).map_err(|_| Error::NoSuchInterface(iface.to_owned()))?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(Error::NoSuchInterface(iface.to_owned()));
    }
    Ok(index)
}

/// `memlock` of a bpf object fd, from /proc/self/fdinfo.
fn memlock(fd: &std::os::fd::OwnedFd) -> Result<u64, Error> {
    use std::os::fd::AsRawFd;
    let path = PathBuf::from(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()));
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Pin {
        path: path.clone(),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Inconsistent(format!("no memlock line in {}", path.display())))
}

fn create_dir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Pin {
        path: path.to_path_buf(),
        source,
    })
}

fn remove_file(path: &Path) -> Result<(), Error> {
    std::fs::remove_file(path).map_err(|source| Error::Pin {
        path: path.to_path_buf(),
        source,
    })
}

fn remove_dir_all(path: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::Pin {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80)
    }

    #[test]
    fn staying_backends_keep_their_slots() {
        let current = [addr(1), addr(2), addr(3), addr(4)];
        // addr(2) leaves, addr(5) arrives: it takes the freed slot.
        let next = stable_order(&current, &[addr(5), addr(4), addr(3), addr(1)]);
        assert_eq!(next, [addr(1), addr(5), addr(3), addr(4)]);
        // Shrinking: the backend beyond the end moves into the hole, the others stay.
        let next = stable_order(&current, &[addr(1), addr(3), addr(4)]);
        assert_eq!(next, [addr(1), addr(4), addr(3)]);
        // Same set in another order: nothing moves.
        assert_eq!(
            stable_order(&current, &[addr(4), addr(3), addr(2), addr(1)]),
            current
        );
        // A backend listed twice holds two slots (a weight of two).
        assert_eq!(
            stable_order(&[], &[addr(1), addr(2), addr(1)]),
            [addr(1), addr(2), addr(1)]
        );
        assert_eq!(
            stable_order(&[addr(1), addr(2), addr(1)], &[addr(2), addr(1)]),
            [addr(1), addr(2)]
        );
    }

    #[test]
    fn frontend_keys_round_trip() {
        let f = Frontend::udp(SocketAddrV4::new(Ipv4Addr::new(10, 96, 3, 7), 53));
        let key = f.key();
        assert_eq!(
            key.vip.to_ne_bytes(),
            [10, 96, 3, 7],
            "VIP is stored in network order"
        );
        assert_eq!(
            key.port.to_ne_bytes(),
            53u16.to_be_bytes(),
            "port is stored in network order"
        );
        assert_eq!(Frontend::from_key(&key), Some(f));
        assert_eq!(f.to_string(), "udp/10.96.3.7:53");
    }
}
