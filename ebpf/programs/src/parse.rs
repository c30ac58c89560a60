//! Packet parsing: one bounds-checked accessor and the few header fields the data plane reads.
//! Everything the verifier needs to prove packet access safe goes through [`ptr_at`].

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use ebpf_common::{Counter, FlowKey, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
/// Offset of the checksum within the TCP and UDP headers.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

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

/// A pointer to a `T` at `offset` from the start of the frame, if the linear data holds it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// An IPv4 TCP or UDP packet the data plane may translate.
pub struct Packet {
    pub flow: FlowKey,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// The packet is the first fragment of a fragmented datagram.
    pub fragment: bool,
}

/// What parsing found.
pub enum Parsed {
    Packet(Packet),
    /// Not for the data plane; pass it with this verdict counter.
    Pass(Counter),
    /// Malformed; drop it with this reason.
    Drop(Counter),
}

/// More-fragments flag and fragment offset bits of `frag_off`, host order.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// Reads a `T` at `offset`, if the linear data holds it (packet data has no alignment
/// guarantee: never dereference a packet pointer to a wider type).
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; read_unaligned makes no alignment assumption.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

/// Makes sure the first `len` bytes of the frame are in the linear data, pulling them in once
/// if the skb is paged (GRO). False if the packet is shorter. Invalidates packet pointers.
#[inline(always)]
fn ensure_linear(ctx: &TcContext, len: usize) -> bool {
    if ctx.data() + len <= ctx.data_end() {
        return true;
    }
    ctx.pull_data(len as u32).is_ok() && ctx.data() + len <= ctx.data_end()
}

/// Parses Ethernet, IPv4 and the TCP/UDP ports.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    let Some(eth) = read_at::<EthHdr>(ctx, 0) else {
        return Parsed::Pass(Counter::PassNotIpv4);
    };
    if eth.proto != ETH_P_IP.to_be() {
        return Parsed::Pass(Counter::PassNotIpv4);
    }
    if !ensure_linear(ctx, ETH_HLEN + size_of::<Ipv4Hdr>()) {
        return Parsed::Drop(Counter::DropMalformedIpv4);
    }
    let Some(ip) = read_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Parsed::Drop(Counter::DropMalformedIpv4);
    };
    let (version_ihl, proto, frag_off, saddr, daddr, tot_len) = (
        ip.version_ihl,
        ip.proto,
        u16::from_be(ip.frag_off),
        ip.saddr,
        ip.daddr,
        u16::from_be(ip.tot_len),
    );
    let ihl = (version_ihl & 0x0f) as usize * 4;
    // A total length of 0 is BIG TCP (a GRO packet over 64 KiB): its length is the skb's.
    let tot_len_bad = tot_len != 0
        && ((tot_len as usize) < ihl || ETH_HLEN + tot_len as usize > ctx.len() as usize);
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || tot_len_bad {
        return Parsed::Drop(Counter::DropMalformedIpv4);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::Pass(Counter::PassNotService);
    }
    if frag_off & IP_OFFSET != 0 {
        // A later fragment carries no L4 header: nothing to look up or translate.
        return Parsed::Pass(Counter::PassNotService);
    }
    let l4_off = ETH_HLEN + ihl;
    let mut flow = FlowKey {
        saddr,
        daddr,
        proto,
        ..FlowKey::default()
    };
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        if !ensure_linear(ctx, l4_off + TCP_HLEN) {
            return Parsed::Drop(Counter::DropTruncatedL4);
        }
        let Some(tcp) = ptr_at::<[u8; TCP_HLEN]>(ctx, l4_off) else {
            return Parsed::Drop(Counter::DropTruncatedL4);
        };
        // SAFETY: ptr_at checked the bounds.
        let tcp = unsafe { &*tcp };
        flow.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
        flow.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
        tcp_flags = tcp[13];
    } else {
        if !ensure_linear(ctx, l4_off + UDP_HLEN) {
            return Parsed::Drop(Counter::DropTruncatedL4);
        }
        let Some(udp) = ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off) else {
            return Parsed::Drop(Counter::DropTruncatedL4);
        };
        // SAFETY: ptr_at checked the bounds.
        let udp = unsafe { &*udp };
        flow.sport = u16::from_ne_bytes([udp[0], udp[1]]);
        flow.dport = u16::from_ne_bytes([udp[2], udp[3]]);
    }
    Parsed::Packet(Packet {
        flow,
        l4_off,
        tcp_flags,
        fragment: frag_off & IP_MF != 0,
    })
}
