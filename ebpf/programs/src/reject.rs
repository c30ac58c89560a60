//! Rejecting new flows to a service without backends, as kube-proxy does: the client gets an
//! ICMP port unreachable from the service address (a TCP connect fails at once with
//! ECONNREFUSED) instead of a silent black hole. And telling a client its packet cannot go on
//! at its size (fragmentation needed, with the MTU it must fit), as a router would.
//!
//! The packet itself becomes the reply: trimmed to its IP and L4 headers, 28 bytes pushed
//! in front for the new IP and ICMP headers, and sent back out of the interface it came in on.

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    helpers::{bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail},
    programs::TcContext,
};
use ebpf_common::{Counter, IPPROTO_ICMP, IPPROTO_TCP};

use crate::parse::{ETH_HLEN, ETH_P_IP, EthHdr, Ipv4Hdr, Packet, TCP_HLEN, UDP_HLEN, read_at};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const NEW_HEADERS: usize = 20 + 8;
/// The quote is the IP header (at most 60 bytes) and the L4 header (at most 20 used).
const MAX_QUOTED_WORDS: usize = (60 + TCP_HLEN) / 4;

/// Turns the packet into an ICMP port unreachable to its sender and redirects it back out of
/// the interface it arrived on. Returns the tc verdict.
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<i32, Counter> {
    unreachable(ctx, pkt, ICMP_PORT_UNREACH, 0)
}

/// Turns the (untranslated) packet into an ICMP fragmentation needed saying `mtu` to its
/// sender, and redirects it back out of the interface it arrived on.
#[inline(always)]
pub fn fragmentation_needed(ctx: &TcContext, pkt: &Packet, mtu: u16) -> Result<i32, Counter> {
    unreachable(ctx, pkt, ICMP_FRAG_NEEDED, mtu)
}

/// An ICMP destination unreachable with `code` (and the next hop's MTU, RFC 1191) from the
/// address the packet was sent to.
#[inline(always)]
fn unreachable(ctx: &TcContext, pkt: &Packet, code: u8, mtu: u16) -> Result<i32, Counter> {
    let eth = read_at::<EthHdr, _>(ctx, 0).ok_or(Counter::DropReject)?;
    let (client_mac, our_mac) = (eth.src, eth.dst);
    let skb = ctx.as_ptr() as *mut __sk_buff;

    // RFC 792 asks for the IP header and 8 bytes of payload; the whole TCP header is quoted
    // because the kernel will not trim a CHECKSUM_PARTIAL skb (a locally sent segment) before
    // the end of its checksum field.
    let l4_quoted = if pkt.flow.proto == IPPROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    let quoted = pkt.l4_off - ETH_HLEN + l4_quoted;
    let keep = pkt.l4_off + l4_quoted;
    if (ctx.len() as usize) > keep {
        // SAFETY: skb is this program's context.
        if unsafe { bpf_skb_change_tail(skb, keep as u32, 0) } != 0 {
            return Err(Counter::DropReject);
        }
    }
    // SAFETY: skb is this program's context.
    if unsafe { bpf_skb_change_head(skb, NEW_HEADERS as u32, 0) } != 0 {
        return Err(Counter::DropReject);
    }

    // The new frame: [eth][ip 20][icmp 8][quoted ip header + 8 bytes].
    let quoted_off = ETH_HLEN + NEW_HEADERS;
    let type_code = ((ICMP_DEST_UNREACH as u16) << 8 | code as u16).to_be();
    let mut sum: u64 = type_code as u64 + mtu.to_be() as u64;
    for i in 0..MAX_QUOTED_WORDS {
        if i * 4 >= quoted {
            break;
        }
        // The quote starts 42 bytes into the frame: not 4-byte aligned.
        let word = read_at::<u32, _>(ctx, quoted_off + i * 4).ok_or(Counter::DropReject)?;
        sum += word as u64;
    }
    let icmp_csum = fold(sum);

    let inner = read_at::<Ipv4Hdr, _>(ctx, quoted_off).ok_or(Counter::DropReject)?;
    let (client, service) = (inner.saddr, inner.daddr);
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: ((NEW_HEADERS + quoted) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto: IPPROTO_ICMP,
        check: 0,
        saddr: service,
        daddr: client,
    };
    ip.check = fold(ip_header_sum(&ip));

    // The new headers go in with one bpf_skb_store_bytes (no direct packet writes: see
    // nat.rs for why).
    let headers = NewHeaders {
        eth: EthHdr {
            dst: client_mac,
            src: our_mac,
            proto: ETH_P_IP.to_be(),
        },
        ip,
        icmp: [type_code, icmp_csum, 0, mtu.to_be()],
    };
    ctx.store(0, &headers, 0).map_err(|_| Counter::DropReject)?;
    // SAFETY: skb is this program's context.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: no pointers.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Ethernet, IPv4 and ICMP headers of the reply, as they lie in the frame (42 bytes).
#[repr(C, packed)]
struct NewHeaders {
    eth: EthHdr,
    ip: Ipv4Hdr,
    icmp: [u16; 4],
}
const _: () = assert!(core::mem::size_of::<NewHeaders>() == ETH_HLEN + NEW_HEADERS);

#[inline(always)]
fn ip_header_sum(ip: &Ipv4Hdr) -> u64 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers, 4-byte aligned.
    let words = unsafe { &*(ip as *const Ipv4Hdr as *const [u32; 5]) };
    words.iter().map(|&w| w as u64).sum()
}

/// Folds a one's complement sum of native-order words into a checksum, in the same order.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
