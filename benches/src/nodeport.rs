//! `cargo xtask bench nodeport`: forwarding from outside the cluster, as network engineers
//! measure a load balancer: a packet generator on the node network floods a NodePort of one
//! node (`fwd`), whose proxy sends every packet on to a backend on another node (`backend`,
//! eTP Cluster: DNAT and SNAT to the node). What arrives at the backend node per second is the
//! figure, with the whole machine's CPU per delivered packet.
//!
//! Modes: `route`, the floor (no proxy: the generator sends to a backend itself and the
//! forwarding node routes it, the same path without load balancing or NAT); `xdp` (the eBPF data plane with its XDP fast path in the veth driver), `tc` (the
//! eBPF data plane's `from_outside` only), kube-proxy's `iptables` and `nftables` rules. Each
//! mode is measured with 1 service and with 10,000 (the others ClusterIP services, which make
//! iptables' KUBE-SERVICES long before its NodePort jump).
//!
//! Traffic, from a raw AF_PACKET socket (`sendmmsg`, qdisc bypassed, full checksums computed
//! here, as frames from a wire carry them):
//! - `udp`: 4,096 flows of 64-byte datagrams, over and over (established flows: the
//!   per-packet path) → `pps`, `cpu_ns_per_pkt`;
//! - `syn`: TCP SYNs, every one from a new (address, port) → `conn_per_s` (every packet a new
//!   flow: backend choice, conntrack and NAT entries made).
//!
//! The backend node does not hold the backend's address: it counts (the `rx_packets` of its
//! interface) and drops, sending nothing back, so the forwarding node only forwards.
//!
//! On this machine everything is one kernel: the generator's `sendmmsg` carries its frames
//! through the bridge into the forwarding node's receive path on the same CPU, so the CPU
//! figure includes the generator and the bridge, alike for every mode. The bridge's ports run
//! an XDP_PASS program in every mode (a veth hands XDP frames only to a peer running XDP).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ebpf_dataplane::{NodeSettings, XdpAcceleration, packet};
use node_agent_netns::{lab::NodeNetwork, netns::Netns};
use node_agent_proxy::{Mode, Protocol, Proxier, ProxyConfig, ProxyState, Service, ServicePort};
use serde::Serialize;

use crate::{cpu, loadgen::median};

pub const NODE_PORT: u16 = 30080;
/// The backend pods, on the backend node's pod network: 32 of them, so that masquerading to
/// the one node address has room for the SYN flows of a run (a node address towards one pod
/// port holds at most ~64k flows, and unanswered SYNs stay in conntrack for 2 minutes).
fn backends() -> Vec<SocketAddrV4> {
    (1..=32)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 250, 1, i), 8080))
        .collect()
}
const FWD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xfd, 0x01];
const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x9e, 0x01];
/// Generator source addresses: this many, from .64 of the node network.
const SOURCES: u32 = 128;
const SYN_PORTS: u32 = 60_000;
const UDP_FLOWS: u32 = 4096;
const BATCH: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub name: &'static str,
    /// None: no proxy; the generator sends to a backend itself, which the forwarding node
    /// routes (the floor: the same path without load balancing or NAT).
    pub mode: Option<Mode>,
    pub xdp: XdpAcceleration,
}

pub const VARIANTS: [Variant; 5] = [
    Variant {
        name: "route",
        mode: None,
        xdp: XdpAcceleration::Off,
    },
    Variant {
        name: "xdp",
        mode: Some(Mode::Ebpf),
        xdp: XdpAcceleration::Native,
    },
    Variant {
        name: "tc",
        mode: Some(Mode::Ebpf),
        xdp: XdpAcceleration::Off,
    },
    Variant {
        name: "iptables",
        mode: Some(Mode::Iptables),
        xdp: XdpAcceleration::Off,
    },
    Variant {
        name: "nftables",
        mode: Some(Mode::Nftables),
        xdp: XdpAcceleration::Off,
    },
];

pub struct Options {
    pub services: Vec<u32>,
    pub rounds: usize,
    pub duration: Duration,
}

impl Options {
    pub fn quick() -> Self {
        Self {
            services: vec![1],
            rounds: 1,
            duration: Duration::from_secs(2),
        }
    }
    pub fn full() -> Self {
        Self {
            services: vec![1, 10_000],
            rounds: 3,
            duration: Duration::from_secs(3),
        }
    }
}

/// One mode at one service count: medians of the rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub mode: &'static str,
    pub services: u32,
    /// UDP packets per second arriving at the backend node.
    pub pps: f64,
    /// CPU time of the whole machine per UDP packet arriving (generator and bridge included).
    pub cpu_ns_per_pkt: f64,
    /// New TCP flows (SYNs, each from a new address and port) per second arriving.
    pub conn_per_s: f64,
    /// CPU time of the whole machine per SYN arriving.
    pub cpu_ns_per_conn: f64,
    /// UDP packets per second the generator sent (what the modes were offered).
    pub offered_pps: f64,
}

/// The network: generator, forwarding node and backend node on one bridge.
struct Topology {
    generator: Netns,
    fwd: Netns,
    backend: Netns,
    fwd_addr: Ipv4Addr,
    base: u32,
    _network: NodeNetwork,
}

impl Topology {
    fn new(prefix: &str) -> Result<Self> {
        let mut network = NodeNetwork::new(prefix)?;
        network.accept_xdp_frames()?;
        let fwd = Netns::new(&format!("{prefix}-fwd"))?;
        let backend = Netns::new(&format!("{prefix}-backend"))?;
        let generator = Netns::new(&format!("{prefix}-gen"))?;
        let fwd_addr = network.add(&fwd, "eth0")?;
        let backend_addr = network.add(&backend, "eth0")?;
        network.add(&generator, "eth0")?;
        let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        fwd.ip(&["link", "set", "eth0", "address", &mac(FWD_MAC)])?;
        generator.ip(&["link", "set", "eth0", "address", &mac(GEN_MAC)])?;
        fwd.sysctl("net.ipv4.ip_forward", "1")?;
        fwd.ip(&[
            "route",
            "add",
            "10.250.1.0/24",
            "via",
            &backend_addr.to_string(),
        ])?;
        Ok(Self {
            generator,
            fwd,
            backend,
            fwd_addr,
            base: u32::from(fwd_addr) & !0xff,
            _network: network,
        })
    }

    /// Packets the backend node's interface has received.
    fn delivered(&self) -> Result<u64> {
        let dev = self
            .backend
            .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))??;
        dev.lines()
            .find_map(|l| {
                let (name, stats) = l.trim().split_once(':')?;
                (name == "eth0").then(|| stats.split_whitespace().nth(1)?.parse().ok())?
            })
            .context("no eth0 in the backend node's /proc/net/dev")
    }
}

fn services(n: u32) -> ProxyState {
    let measured = Service {
        namespace: "bench".into(),
        name: "nodeport".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
        ports: [Protocol::Tcp, Protocol::Udp]
            .into_iter()
            .map(|protocol| ServicePort {
                name: protocol.name().into(),
                protocol,
                port: 80,
                endpoints: backends(),
                node_port: Some(NODE_PORT),
                external_endpoints: None,
            })
            .collect(),
        ..Service::default()
    };
    let fillers = (1..n).map(|i| Service {
        namespace: "bench".into(),
        name: format!("filler-{i}"),
        cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i),
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            endpoints: vec![SocketAddrV4::new(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 2, 0)) + i % 250),
                8080,
            )],
            node_port: None,
            external_endpoints: None,
        }],
        ..Service::default()
    });
    fillers.chain([measured]).collect()
}

/// The proxy of one mode on the forwarding node, programmed with `state`.
fn start_mode(
    topo: &Topology,
    variant: Variant,
    mode: Mode,
    state: &ProxyState,
) -> Result<Box<dyn Proxier>> {
    let config = ProxyConfig {
        pin_dir: PathBuf::from(format!(
            "/sys/fs/bpf/keel-np-{}-{}",
            std::process::id(),
            variant.name
        )),
        xdp: variant.xdp,
        ..ProxyConfig::default()
    };
    let node = NodeSettings {
        pod_cidr: Some((Ipv4Addr::new(10, 250, 0, 0), 24)),
        masquerade_addr: Some(topo.fwd_addr),
        nodeport_addrs: vec![topo.fwd_addr],
        peer_addrs: Vec::new(),
    };
    topo.fwd.run(|| -> Result<Box<dyn Proxier>> {
        let mut proxier = node_agent_proxy::start(mode, &config)?;
        proxier.set_node(&node)?;
        let report = proxier.sync(state)?;
        if !report.failed.is_empty() {
            bail!(
                "{}: services not written: {:?}",
                variant.name,
                report.failed
            );
        }
        Ok(proxier)
    })?
}

/// What the generator sends.
#[derive(Clone, Copy, Debug)]
enum Traffic {
    Udp,
    Syn,
}

/// Frames to `to` from source `i` of the generator's space (address and port).
fn frame(base: u32, to: SocketAddrV4, traffic: Traffic, i: u64) -> Vec<u8> {
    let (sources, ports) = match traffic {
        Traffic::Udp => (UDP_FLOWS / 64, 64),
        Traffic::Syn => (SOURCES, SYN_PORTS),
    };
    let src_ip = Ipv4Addr::from(base + 64 + (i / u64::from(ports) % u64::from(sources)) as u32);
    let src = SocketAddrV4::new(src_ip, 1024 + (i % u64::from(ports)) as u16);
    let builder = match traffic {
        Traffic::Udp => packet::udp(src, to, &[0; 22]),
        Traffic::Syn => packet::tcp(src, to, packet::TCP_SYN),
    };
    packet::Builder {
        src_mac: GEN_MAC,
        dst_mac: FWD_MAC,
        ..builder
    }
    .build()
}

/// Sends for `duration` from a raw socket on the generator's eth0; how many frames went out.
/// `next`: the index of the first new SYN source (every SYN of the bench is new).
fn generate(
    topo: &Topology,
    to: SocketAddrV4,
    traffic: Traffic,
    duration: Duration,
    next: &mut u64,
) -> Result<u64> {
    let base = topo.base;
    let udp: Vec<Vec<u8>> = match traffic {
        Traffic::Udp => (0..u64::from(UDP_FLOWS))
            .map(|i| frame(base, to, traffic, i))
            .collect(),
        Traffic::Syn => Vec::new(),
    };
    let start = *next;
    let (sent, made) = topo.generator.run(|| -> Result<(u64, u64)> {
        let socket = RawSocket::open("eth0")?;
        let deadline = Instant::now() + duration;
        let (mut sent, mut made) = (0u64, 0u64);
        let mut syns: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
        while Instant::now() < deadline {
            let batch: Vec<&[u8]> = match traffic {
                Traffic::Udp => (0..BATCH as u64)
                    .map(|i| udp[((made + i) % u64::from(UDP_FLOWS)) as usize].as_slice())
                    .collect(),
                Traffic::Syn => {
                    syns.clear();
                    syns.extend(
                        (0..BATCH as u64).map(|i| frame(base, to, traffic, start + made + i)),
                    );
                    syns.iter().map(Vec::as_slice).collect()
                }
            };
            made += BATCH as u64;
            sent += socket.send(&batch)?;
        }
        Ok((sent, made))
    })??;
    *next += made;
    Ok(sent)
}

/// An AF_PACKET socket sending whole frames out of one interface, past the qdisc.
struct RawSocket {
    fd: std::os::fd::OwnedFd,
    addr: libc::sockaddr_ll,
}

impl RawSocket {
    fn open(ifname: &str) -> Result<Self> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain socket calls on a descriptor we own.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as u32,
            );
            let name = std::ffi::CString::new(ifname)?;
            let ifindex = libc::if_nametoindex(name.as_ptr());
            if ifindex == 0 {
                bail!("no interface {ifname}");
            }
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&FWD_MAC);
            Ok(Self { fd, addr })
        }
    }

    /// Sends the frames with one sendmmsg; how many the kernel took (a full queue takes
    /// fewer: they are not retried, a generator offers what it can).
    fn send(&self, frames: &[&[u8]]) -> Result<u64> {
        use std::os::fd::AsRawFd;
        let mut iovecs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: all-zero msghdrs are valid; each points at one iovec and the address, which
        // outlive the call.
        let mut msgs: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
                msg.msg_hdr.msg_iov = iov;
                msg.msg_hdr.msg_iovlen = 1;
                msg.msg_hdr.msg_name = (&raw const self.addr).cast_mut().cast();
                msg.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
                msg
            })
            .collect();
        // SAFETY: as above.
        let n =
            unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENOBUFS) {
                return Ok(0);
            }
            bail!("sendmmsg: {error}");
        }
        Ok(n as u64)
    }
}

/// One measurement: delivered per second, whole-machine CPU ns per delivered packet, offered
/// per second.
fn measure(
    topo: &Topology,
    to: SocketAddrV4,
    traffic: Traffic,
    duration: Duration,
    next: &mut u64,
) -> Result<(f64, f64, f64)> {
    let before = topo.delivered()?;
    let (cpu, wall, sent) = cpu::spent(|| generate(topo, to, traffic, duration, next))?;
    // Packets still in flight land within a few milliseconds.
    std::thread::sleep(Duration::from_millis(50));
    let delivered = topo.delivered()?.saturating_sub(before);
    let secs = wall.as_secs_f64();
    let per_packet = if delivered == 0 {
        f64::INFINITY
    } else {
        cpu.as_nanos() as f64 / delivered as f64
    };
    Ok((delivered as f64 / secs, per_packet, sent as f64 / secs))
}

/// Every mode at every service count.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    let mut next = 0u64;
    let mut rows = Vec::new();
    for &n in &opts.services {
        let state = services(n);
        for variant in VARIANTS {
            // A network of its own for each mode: no conntrack entries (nor masquerade ports)
            // left by the mode before.
            let topo = Topology::new(&format!("kb-{}-np", std::process::id()))?;
            progress(&format!("{n} services, {}: programming", variant.name));
            let (proxier, to) = match variant.mode {
                Some(mode) => (
                    Some(start_mode(&topo, variant, mode, &state)?),
                    SocketAddrV4::new(topo.fwd_addr, NODE_PORT),
                ),
                None => (None, backends()[0]),
            };
            // The first packets resolve the backend node's MAC address.
            measure(
                &topo,
                to,
                Traffic::Udp,
                Duration::from_millis(300),
                &mut next,
            )?;
            let (mut pps, mut cpu, mut conn, mut conn_cpu, mut offered) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for round in 1..=opts.rounds {
                progress(&format!(
                    "{n} services, {}: round {round}/{}",
                    variant.name, opts.rounds
                ));
                let (p, c, o) = measure(&topo, to, Traffic::Udp, opts.duration, &mut next)?;
                pps.push(p);
                cpu.push(c);
                offered.push(o);
                let (p, c, _) = measure(&topo, to, Traffic::Syn, opts.duration, &mut next)?;
                conn.push(p);
                conn_cpu.push(c);
            }
            if let Some(proxier) = proxier {
                topo.fwd.run(|| proxier.cleanup())??;
            }
            rows.push(Row {
                mode: variant.name,
                services: n,
                pps: median(&mut pps),
                cpu_ns_per_pkt: median(&mut cpu),
                conn_per_s: median(&mut conn),
                cpu_ns_per_conn: median(&mut conn_cpu),
                offered_pps: median(&mut offered),
            });
        }
    }
    Ok(rows)
}

/// The rows as a markdown table, with the targets' ratios (measured in this run).
pub fn markdown(rows: &[Row], machine: &str) -> String {
    let floor = |n: u32| {
        rows.iter()
            .find(|r| r.services == n && r.mode == "route")
            .map_or(0.0, |r| r.cpu_ns_per_pkt)
    };
    let mut out = format!(
        "NodePort forwarding to another node's backend, {machine}\n\n\
         | services | mode | UDP pps | CPU ns/pkt | − route | new TCP flows/s | CPU ns/flow | offered pps |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            r.services,
            r.mode,
            r.pps,
            r.cpu_ns_per_pkt,
            r.cpu_ns_per_pkt - floor(r.services),
            r.conn_per_s,
            r.cpu_ns_per_conn,
            r.offered_pps
        );
    }
    let services: std::collections::BTreeSet<u32> = rows.iter().map(|r| r.services).collect();
    for n in services {
        let get = |mode: &str| rows.iter().find(|r| r.services == n && r.mode == mode);
        if let (Some(xdp), Some(tc), Some(ipt)) = (get("xdp"), get("tc"), get("iptables")) {
            out += &format!(
                "\n{n} services: xdp/tc pps {:.2}× (target ≥ 3), xdp/iptables pps {:.2}× (≥ 5), \
                 xdp/iptables CPU per packet {:.2}× (≤ 0.3; above the route floor {:.2}×), \
                 tc/iptables pps {:.2}× (≥ 1.5), xdp/iptables new flows/s {:.2}×\n",
                xdp.pps / tc.pps,
                xdp.pps / ipt.pps,
                xdp.cpu_ns_per_pkt / ipt.cpu_ns_per_pkt,
                (xdp.cpu_ns_per_pkt - floor(n)) / (ipt.cpu_ns_per_pkt - floor(n)),
                tc.pps / ipt.pps,
                xdp.conn_per_s / ipt.conn_per_s,
            );
        }
    }
    out
}
