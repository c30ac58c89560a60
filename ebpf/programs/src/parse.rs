//! Packet parsing: one bounds-checked accessor and the few header fields the data plane reads.
//! Everything the verifier needs to prove packet access safe goes through [`ptr_at`]. The
//! same parser serves tc (an skb, maybe paged) and XDP (one linear buffer): [`Frame`] is what
//! it needs of either.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use ebpf_common::{Counter, FlowKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
/// Offset of the checksum within the TCP and UDP headers.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;
/// The IPv4 header without options.
pub const IP_HLEN: usize = 20;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// A frame the parser can read: its linear data, its length, and a way to make more of it
/// linear.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole frame's length (linear data and pages).
    fn frame_len(&self) -> usize;
    /// Makes sure the first `len` bytes of the frame are in the linear data, pulling them in
    /// if the frame has pages; false if the frame is shorter. Invalidates packet pointers. The
    /// accessors still check bounds: this only makes the data reachable.
    fn ensure_linear(&self, len: usize) -> bool;
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
    /// A paged skb (GRO) has its first bytes pulled in once.
    #[inline(always)]
    fn ensure_linear(&self, len: usize) -> bool {
        if self.data() + len <= self.data_end() {
            return true;
        }
        self.pull_data(len as u32).is_ok() && self.data() + len <= self.data_end()
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }
    /// An XDP buffer (single-buffer mode, the only one the program declares) is all linear;
    /// the accessors' own bounds checks are the only ones (a second, equal check here would be
    /// merged by the compiler into one the verifier cannot follow).
    #[inline(always)]
    fn ensure_linear(&self, _len: usize) -> bool {
        true
    }
}

/// A pointer to a `T` at `offset` from the start of the frame, if the linear data holds it.
/// Packet data has no alignment guarantee: read and write through it with
/// `read_unaligned`/`write_unaligned`, or with byte arrays.
#[inline(always)]
pub fn ptr_at<T, C: Frame>(ctx: &C, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a `T` at `offset`, if the linear data holds it (any alignment).
#[inline(always)]
pub fn read_at<T: Copy, C: Frame>(ctx: &C, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; read_unaligned makes no alignment assumption.
    ptr_at::<T, C>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

/// Where a packet stands in its datagram's fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment: it carries the L4 header.
    First,
    /// A later fragment: no L4 header (the flow's ports must be remembered from the first).
    Later,
}

/// An IPv4 TCP or UDP packet the data plane may translate.
pub struct Packet {
    /// The 5-tuple; for a later fragment the ports are 0 (they are not in the packet).
    pub flow: FlowKey,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    pub fragment: Fragment,
    /// The IP identification, network order (ties fragments together).
    pub ip_id: u16,
}

/// An ICMP error and the header of the packet it quotes.
pub struct IcmpError {
    pub saddr: u32,
    pub daddr: u32,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// Offset of the quoted IP header (20 bytes: quotes with options are passed).
    pub inner_off: usize,
    /// The quoted packet's 5-tuple, in the direction it travelled.
    pub inner: FlowKey,
    /// Whether the quote holds the quoted L4 checksum field.
    pub inner_csum: bool,
}

/// What parsing found.
pub enum Parsed {
    Packet(Packet),
    Icmp(IcmpError),
    /// Not for the data plane; pass it with this verdict counter.
    Pass(Counter),
    /// Malformed; drop it with this reason.
    Drop(Counter),
}

/// More-fragments flag and fragment offset bits of `frag_off`, host order.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// ICMP error types that quote the packet they are about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Parses Ethernet, IPv4 and the TCP/UDP ports, or an ICMP error and its quote.
#[inline(always)]
pub fn parse<C: Frame>(ctx: &C) -> Parsed {
    let Some(eth_proto) = read_at::<u16, C>(ctx, 12) else {
        return Parsed::Pass(Counter::PassNotIpv4);
    };
    if eth_proto != ETH_P_IP.to_be() {
        return Parsed::Pass(Counter::PassNotIpv4);
    }
    if !ctx.ensure_linear(ETH_HLEN + IP_HLEN) {
        return Parsed::Drop(Counter::DropMalformedIpv4);
    }
    let Some(ip) = read_at::<Ipv4Hdr, C>(ctx, ETH_HLEN) else {
        return Parsed::Drop(Counter::DropMalformedIpv4);
    };
    let frag_off = u16::from_be(ip.frag_off);
    let tot_len = u16::from_be(ip.tot_len);
    let ihl = (ip.version_ihl & 0x0f) as usize * 4;
    // A total length of 0 is BIG TCP (a GRO packet over 64 KiB): its length is the skb's.
    let tot_len_bad =
        tot_len != 0 && ((tot_len as usize) < ihl || ETH_HLEN + tot_len as usize > ctx.frame_len());
    if ip.version_ihl >> 4 != 4 || ihl < IP_HLEN || tot_len_bad {
        return Parsed::Drop(Counter::DropMalformedIpv4);
    }
    let l4_off = ETH_HLEN + ihl;
    let mut flow = FlowKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        proto: ip.proto,
        ..FlowKey::default()
    };
    let fragment = if frag_off & IP_OFFSET != 0 {
        Fragment::Later
    } else if frag_off & IP_MF != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {}
        // ICMP errors are only translated without IP options (the error's headers then sit
        // at fixed offsets); those with options pass as they are.
        IPPROTO_ICMP if fragment == Fragment::None && ihl == IP_HLEN => return icmp(ctx, &flow),
        _ => return Parsed::Pass(Counter::PassNotService),
    }
    let mut tcp_flags = 0;
    // The L4 header sits at a variable offset (IP options): it is read as a byte array
    // through one bounds-checked pointer, which the verifier follows (a byte-wise unaligned
    // copy from a variable offset it does not).
    if fragment != Fragment::Later && ip.proto == IPPROTO_TCP {
        if !ctx.ensure_linear(l4_off + TCP_HLEN) {
            return Parsed::Drop(Counter::DropTruncatedL4);
        }
        let Some(tcp) = ptr_at::<[u8; TCP_HLEN], C>(ctx, l4_off) else {
            return Parsed::Drop(Counter::DropTruncatedL4);
        };
        // SAFETY: ptr_at checked the bounds; a byte array has no alignment.
        let tcp = unsafe { &*tcp };
        flow.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
        flow.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
        tcp_flags = tcp[13];
    } else if fragment != Fragment::Later {
        if !ctx.ensure_linear(l4_off + UDP_HLEN) {
            return Parsed::Drop(Counter::DropTruncatedL4);
        }
        let Some(udp) = ptr_at::<[u8; UDP_HLEN], C>(ctx, l4_off) else {
            return Parsed::Drop(Counter::DropTruncatedL4);
        };
        // SAFETY: as above.
        let udp = unsafe { &*udp };
        flow.sport = u16::from_ne_bytes([udp[0], udp[1]]);
        flow.dport = u16::from_ne_bytes([udp[2], udp[3]]);
    }
    Parsed::Packet(Packet {
        flow,
        l4_off,
        tcp_flags,
        fragment,
        ip_id: ip.id,
    })
}

/// An ICMP error quoting a TCP or UDP packet (with at least its ports), or a pass.
#[inline(always)]
fn icmp<C: Frame>(ctx: &C, outer: &FlowKey) -> Parsed {
    let icmp_off = ETH_HLEN + IP_HLEN;
    // The ICMP header, the quoted IP header (no options), the quoted ports.
    if !ctx.ensure_linear(icmp_off + ICMP_HLEN + IP_HLEN + 4) {
        return Parsed::Pass(Counter::PassNotService);
    }
    let Some(kind) = read_at::<u8, C>(ctx, icmp_off) else {
        return Parsed::Pass(Counter::PassNotService);
    };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETERPROB {
        return Parsed::Pass(Counter::PassNotService);
    }
    let inner_off = icmp_off + ICMP_HLEN;
    let Some(inner) = read_at::<Ipv4Hdr, C>(ctx, inner_off) else {
        return Parsed::Pass(Counter::PassNotService);
    };
    let inner_ihl = (inner.version_ihl & 0x0f) as usize * 4;
    // Quotes with IP options are left alone (the ports would be elsewhere); so are quotes of
    // later fragments and of anything but TCP and UDP.
    if inner_ihl != IP_HLEN
        || u16::from_be(inner.frag_off) & IP_OFFSET != 0
        || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP)
    {
        return Parsed::Pass(Counter::PassNotService);
    }
    let Some(ports) = read_at::<[u16; 2], C>(ctx, inner_off + IP_HLEN) else {
        return Parsed::Pass(Counter::PassNotService);
    };
    let csum_off = if inner.proto == IPPROTO_TCP {
        TCP_CSUM_OFF
    } else {
        UDP_CSUM_OFF
    };
    let inner_csum = ctx.data() + inner_off + IP_HLEN + csum_off + 2 <= ctx.data_end();
    Parsed::Icmp(IcmpError {
        saddr: outer.saddr,
        daddr: outer.daddr,
        icmp_off,
        inner_off,
        inner: FlowKey {
            saddr: inner.saddr,
            daddr: inner.daddr,
            sport: ports[0],
            dport: ports[1],
            proto: inner.proto,
            _pad: [0; 3],
        },
        inner_csum,
    })
}
