//! A node with a client pod and backend pods, each a network namespace:
//!
//! ```text
//!   client ns               node ns (ip_forward)                backend ns i
//!   eth0 10.244.0.2 ── veth ── cli0 10.244.0.1                                
//!                              be<i> 10.244.<i>.1 ── veth ── eth0 10.244.<i>.2 (echo server)
//! ```
//!
//! The data plane attaches to `cli0`, the host side of the client's veth, as it would to a pod
//! of a real node. Service addresses lead nowhere (the node's default route is a dummy uplink):
//! only a proxy makes them work.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};

use crate::{
    echo::EchoServer,
    netns::{self, Netns, veth, veth_here},
};

/// The host side of the client's veth, where the data plane attaches.
pub const CLIENT_HOST_IF: &str = "cli0";
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// Port every backend serves TCP and UDP on.
pub const BACKEND_PORT: u16 = 8080;

pub struct LabBackend {
    pub name: String,
    pub addr: SocketAddrV4,
    pub ns: Netns,
    server: Option<EchoServer>,
}

impl LabBackend {
    /// Stops the backend's servers (connections to it are then refused).
    pub fn stop(&mut self) {
        self.server = None;
    }
}

/// Where labs take the addresses that link them to the host: 198.18.0.0/15, the range RFC
/// 2544 sets aside for benchmark networks, so nothing real is ever addressed.
pub const LAB_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);

/// A subnet of [`LAB_RANGE`] with prefix length `len` that no address of this network
/// namespace is in yet (its first address, as a number). The search starts at a place that
/// depends on the process, so concurrent runs rarely race for the same one.
pub fn free_subnet(len: u8) -> Result<u32> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let out = netns::ip(&["-o", "-4", "addr", "show"])?;
    let used: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.split_once('/')?.0.parse::<Ipv4Addr>().ok())
        .map(u32::from)
        .collect();
    let (range, range_len) = (u32::from(LAB_RANGE.0), LAB_RANGE.1);
    let count = 1u32 << (len - range_len);
    let size = 1u32 << (32 - len);
    let start = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    (0..count)
        .map(|i| range + ((start.wrapping_add(i)) % count) * size)
        .find(|base| !used.iter().any(|a| a & !(size - 1) == *base))
        .context("every lab subnet is in use")
}

/// Nodes on one network, as a cluster's machines are: a bridge in a namespace of its own, the
/// host linked to it (the first address of a /24 of [`LAB_RANGE`]), and node namespaces added
/// to it one by one (from .10 on). Removing it removes the bridge and the host's link.
pub struct NodeNetwork {
    pub net: Netns,
    /// The host's address on the network (where a control plane serves).
    pub host: Ipv4Addr,
    base: u32,
    nodes: u32,
    /// The bridge's ports to the nodes.
    ports: Vec<String>,
    xdp_frames: bool,
    xdp_links: Vec<std::os::fd::OwnedFd>,
    _link: HostLink,
}

impl NodeNetwork {
    /// `<prefix>-net` holds the bridge.
    pub fn new(prefix: &str) -> Result<Self> {
        let net = Netns::new(&format!("{prefix}-net"))?;
        net.ip(&["link", "add", "br0", "type", "bridge"])?;
        net.ip(&["link", "set", "br0", "up"])?;
        let base = free_subnet(24)?;
        let host = Ipv4Addr::from(base + 1);
        let host_if = format!("kn{}", (base >> 8) & 0x1ff);
        veth_here(&host_if, &net, "host")?;
        net.ip(&["link", "set", "host", "master", "br0"])?;
        netns::ip(&["addr", "add", &format!("{host}/24"), "dev", &host_if])?;
        Ok(Self {
            net,
            host,
            base,
            nodes: 0,
            ports: Vec::new(),
            xdp_frames: false,
            xdp_links: Vec::new(),
            _link: HostLink {
                host,
                node: host,
                host_if,
            },
        })
    }

    /// Connects `node` to the network as interface `ifname`; returns its address.
    pub fn add(&mut self, node: &Netns, ifname: &str) -> Result<Ipv4Addr> {
        let addr = Ipv4Addr::from(self.base + 10 + self.nodes);
        self.nodes += 1;
        let bridge_port = format!("p{}", self.nodes);
        veth(&self.net, &bridge_port, node, ifname)?;
        self.net
            .ip(&["link", "set", &bridge_port, "master", "br0"])?;
        if self.xdp_frames {
            self.accept_xdp(&bridge_port)?;
        }
        node.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
        self.ports.push(bridge_port);
        Ok(addr)
    }

    /// Makes the bridge's ports take frames a node's native XDP sends back out of its
    /// interface (XDP_TX): a veth hands XDP frames only to a peer running XDP itself, so each
    /// port gets a program that passes everything. Also for the ports of nodes added later.
    pub fn accept_xdp_frames(&mut self) -> Result<()> {
        self.xdp_frames = true;
        for port in self.ports.clone() {
            self.accept_xdp(&port)?;
        }
        Ok(())
    }

    fn accept_xdp(&mut self, port: &str) -> Result<()> {
        let link = self
            .net
            .run(|| attach_xdp_pass(port))?
            .with_context(|| format!("attach an XDP_PASS program to {port}"))?;
        self.xdp_links.push(link);
        Ok(())
    }
}

/// Attaches to interface `ifname` (of this thread's network namespace), in the driver, an XDP
/// program of two instructions that passes every frame. It stays attached as long as the
/// returned link lives. Raw bpf(2): loading the data plane's object for it would create all of
/// its maps.
pub fn attach_xdp_pass(ifname: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    // r0 = XDP_PASS (2); exit.
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 2, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = c"GPL";
    let bpf = |cmd: libc::c_long, attr: &mut [u8; 128]| -> Result<OwnedFd> {
        // SAFETY: bpf(2) reads an attribute union of the size given, zero-padded.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        anyhow::ensure!(fd >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor the kernel gave us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes());
    let program = bpf(BPF_PROG_LOAD, &mut attr)?;
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(ifindex != 0, "no interface {ifname}");
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&program) as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
    attr[12..16].copy_from_slice(&XDP_FLAGS_DRV_MODE.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// Turns transmit checksumming on or off for interface `ifname` of this thread's network
/// namespace (off: the stack computes full checksums itself). The ethtool ioctl: netlink has no
/// message for it.
pub fn set_tx_checksum(ifname: &str, on: bool) -> Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: u32::from(on),
    };
    anyhow::ensure!(
        ifname.len() < libc::IFNAMSIZ,
        "interface name {ifname:?} too long"
    );
    // SAFETY: an all-zero ifreq is valid; the name is copied in below, NUL-terminated.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(ifname.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: a socket we own and close; the request points at `value`, alive for the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &mut request);
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        anyhow::ensure!(rc == 0, "SIOCETHTOOL {ifname}: {error}");
    }
    Ok(())
}

/// The link between a lab's node and the host ([`Lab::link_host`]).
#[derive(Debug)]
pub struct HostLink {
    /// The host's end.
    pub host: Ipv4Addr,
    /// The node's end.
    pub node: Ipv4Addr,
    host_if: String,
}

impl Drop for HostLink {
    fn drop(&mut self) {
        // Gone already if the node's namespace went first.
        let _ = netns::ip(&["link", "del", &self.host_if]);
    }
}

pub struct Lab {
    pub node: Netns,
    pub client: Netns,
    /// The node's uplink peer.
    pub wan: Netns,
    pub backends: Vec<LabBackend>,
}

impl Lab {
    /// Builds the topology with `backends` backends and no servers; namespaces are named
    /// `<prefix>-node`, `<prefix>-client`, `<prefix>-wan`, `<prefix>-b<i>`, so concurrent labs need
    /// distinct prefixes.
    pub fn bare(prefix: &str, backends: u8) -> Result<Self> {
        let node = Netns::new(&format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        // An uplink with the default route, as a real node has: traffic to a service address
        // that no proxy translated is forwarded (where kube-proxy's filter rules meet it), not
        // refused by routing. The far end is a namespace that forwards nothing.
        let wan = Netns::new(&format!("{prefix}-wan"))?;
        veth(&node, "uplink0", &wan, "eth0")?;
        node.ip(&["addr", "add", "192.168.255.1/30", "dev", "uplink0"])?;
        wan.ip(&["addr", "add", "192.168.255.2/30", "dev", "eth0"])?;
        node.ip(&["route", "add", "default", "via", "192.168.255.2"])?;
        let client = Netns::new(&format!("{prefix}-client"))?;
        veth(&node, CLIENT_HOST_IF, &client, "eth0")?;
        node.ip(&["addr", "add", "10.244.0.1/24", "dev", CLIENT_HOST_IF])?;
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"])?;
        client.ip(&["route", "add", "default", "via", "10.244.0.1"])?;
        let mut lab = Self {
            node,
            client,
            wan,
            backends: Vec::new(),
        };
        for i in 1..=backends {
            let ns = Netns::new(&format!("{prefix}-b{i}"))?;
            let host_if = format!("be{i}");
            veth(&lab.node, &host_if, &ns, "eth0")?;
            lab.node
                .ip(&["addr", "add", &format!("10.244.{i}.1/24"), "dev", &host_if])?;
            ns.ip(&["addr", "add", &format!("10.244.{i}.2/24"), "dev", "eth0"])?;
            ns.ip(&["route", "add", "default", "via", &format!("10.244.{i}.1")])?;
            let addr = SocketAddrV4::new(Ipv4Addr::new(10, 244, i, 2), BACKEND_PORT);
            let name = format!("backend-{i}");
            lab.backends.push(LabBackend {
                name,
                addr,
                ns,
                server: None,
            });
        }
        Ok(lab)
    }

    /// The topology with an echo server (TCP and UDP, answering with its name) on every
    /// backend.
    pub fn new(prefix: &str, backends: u8) -> Result<Self> {
        let mut lab = Self::bare(prefix, backends)?;
        for backend in &mut lab.backends {
            let (addr, name) = (backend.addr, backend.name.clone());
            let server = backend
                .ns
                .run(move || EchoServer::start(addr, &name))?
                .with_context(|| format!("start {}", backend.name))?;
            backend.server = Some(server);
        }
        Ok(lab)
    }

    /// Gives the client `count` more addresses (10.244.0.10 on), to spread connections over
    /// more source addresses; returns all of the client's addresses.
    pub fn add_client_addrs(&self, count: u8) -> Result<Vec<Ipv4Addr>> {
        let mut addrs = vec![CLIENT_ADDR];
        for i in 0..count {
            let addr = Ipv4Addr::new(10, 244, 0, 10 + i);
            self.client
                .ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            addrs.push(addr);
        }
        Ok(addrs)
    }

    /// Links the node to the caller's network namespace (the host's, for a test process) with
    /// a veth pair on a /30 of its own from [`LAB_RANGE`], so processes in the node (a node
    /// agent) reach a control plane serving on the host side. The pair goes with the node's
    /// namespace.
    pub fn link_host(&self) -> Result<HostLink> {
        let base = free_subnet(30)?;
        let (host, node) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let host_if = format!("kh{}", (base >> 2) & 0x7fff);
        veth_here(&host_if, &self.node, "host0")?;
        netns::ip(&["addr", "add", &format!("{host}/30"), "dev", &host_if])?;
        self.node
            .ip(&["addr", "add", &format!("{node}/30"), "dev", "host0"])?;
        Ok(HostLink {
            host,
            node,
            host_if,
        })
    }

    pub fn backend_addrs(&self) -> Vec<SocketAddrV4> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    /// The backend's name for its address.
    pub fn backend_name(&self, addr: SocketAddrV4) -> Option<&str> {
        self.backends
            .iter()
            .find(|b| b.addr == addr)
            .map(|b| b.name.as_str())
    }
}
