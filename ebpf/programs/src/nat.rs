//! Address and port rewrites with their checksum fix-ups.
//!
//! For the L4 checksum the kernel's csum helpers are used rather than hand-folded sums: they do
//! the right thing for every `ip_summed` state. A locally sent packet is CHECKSUM_PARTIAL, its L4 checksum field
//! holds only the pseudo-header sum, so an address change must be folded in but a port change
//! must not; CHECKSUM_COMPLETE packets need `skb->csum` kept in step.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use ebpf_common::IPPROTO_TCP;

use crate::parse::{ETH_HLEN, Ipv4Hdr, Packet, TCP_CSUM_OFF, UDP_CSUM_OFF, read_at};

/// The IPv4 checksum, source and destination: 10 contiguous bytes from here.
const IP_CHECK_OFF: usize = ETH_HLEN + 10;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    /// Destination address and port (service -> backend).
    Destination,
    /// Source address and port (backend -> service, on replies).
    Source,
}

/// Rewrites one end of a TCP/UDP packet from `old` to `new` (address and port, network
/// order) and fixes the IP and L4 checksums. `Err` if the packet could not be written.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    end: End,
    old: (u32, u16),
    new: (u32, u16),
) -> Result<(), ()> {
    let port_off = match end {
        End::Destination => pkt.l4_off + 2,
        End::Source => pkt.l4_off,
    };
    let ip = read_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(())?;
    let (check, mut saddr, mut daddr) = (ip.check, ip.saddr, ip.daddr);
    match end {
        End::Destination => daddr = new.0,
        End::Source => saddr = new.0,
    }
    // The IP header checksum is always software's: fold the change in by hand (RFC 1624),
    // which keeps the header's sum, and so any CHECKSUM_COMPLETE skb->csum, unchanged.
    let check = csum_replace4(check, old.0, new.0);
    // Written with bpf_skb_store_bytes, never through packet pointers: a program that writes
    // packets directly makes the kernel unclone every skb it sees on entry, translated or not,
    // and most packets a pod sends are clones (TCP keeps the original for retransmission).
    let mut header = [0u8; 10];
    header[..2].copy_from_slice(&check.to_ne_bytes());
    header[2..6].copy_from_slice(&saddr.to_ne_bytes());
    header[6..].copy_from_slice(&daddr.to_ne_bytes());
    ctx.store(IP_CHECK_OFF, &header, 0).map_err(|_| ())?;
    ctx.store(port_off, &new.1, 0).map_err(|_| ())?;
    let (csum_off, mangled) = if pkt.flow.proto == IPPROTO_TCP {
        (pkt.l4_off + TCP_CSUM_OFF, 0)
    } else {
        // A zero UDP checksum means "none": keep it zero.
        (pkt.l4_off + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64)
    };
    ctx.l4_csum_replace(
        csum_off,
        old.0 as u64,
        new.0 as u64,
        mangled | BPF_F_PSEUDO_HDR as u64 | 4,
    )
    .map_err(|_| ())?;
    ctx.l4_csum_replace(csum_off, old.1 as u64, new.1 as u64, mangled | 2)
        .map_err(|_| ())?;
    Ok(())
}

/// `check` updated for a 32-bit field changing from `from` to `to`: ~(~check + ~from + to) in
/// one's complement arithmetic. Works on native-order words whatever the byte order, as long
/// as all three are read from the packet the same way.
#[inline(always)]
fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!from & 0xffff) + (!from >> 16) + (to & 0xffff) + (to >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
