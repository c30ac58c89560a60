//! Address and port rewrites with their checksum fix-ups.
//!
//! For the L4 checksum the kernel's csum helpers are used rather than hand-folded sums: they do
//! the right thing for every `ip_summed` state. A locally sent packet is CHECKSUM_PARTIAL, its
//! L4 checksum field holds only the pseudo-header sum, so an address change must be folded in
//! but a port change must not; CHECKSUM_COMPLETE packets need `skb->csum` kept in step.
//!
//! Everything is written with `bpf_skb_store_bytes`, never through packet pointers: a program
//! that writes packets directly makes the kernel unclone every skb it sees on entry, translated
//! or not, and most packets a pod sends are clones (TCP keeps the original for retransmission).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use ebpf_common::IPPROTO_TCP;

use crate::parse::{ETH_HLEN, Fragment, Ipv4Hdr, Packet, TCP_CSUM_OFF, UDP_CSUM_OFF, read_at};

/// Which end of a packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    /// Destination address and port (service -> backend).
    Destination,
    /// Source address and port (backend -> service, on replies; the client, when its source
    /// is rewritten).
    Source,
}

/// Rewrites one end of a TCP/UDP packet from `old` to `new` (address and port, network
/// order) and fixes the IP and L4 checksums. A later fragment has no L4 header: only its
/// address changes. `Err` if the packet could not be written.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    end: End,
    old: (u32, u16),
    new: (u32, u16),
) -> Result<(), ()> {
    if old.0 != new.0 {
        set_ip_addr(ctx, ETH_HLEN, end, new.0)?;
    }
    if pkt.fragment == Fragment::Later {
        return Ok(());
    }
    let (csum_off, mangled) = if pkt.flow.proto == IPPROTO_TCP {
        (pkt.l4_off + TCP_CSUM_OFF, 0)
    } else {
        // A zero UDP checksum means "none": keep it zero.
        (pkt.l4_off + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64)
    };
    if old.0 != new.0 {
        ctx.l4_csum_replace(
            csum_off,
            old.0 as u64,
            new.0 as u64,
            mangled | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| ())?;
    }
    if old.1 != new.1 {
        let port_off = match end {
            End::Destination => pkt.l4_off + 2,
            End::Source => pkt.l4_off,
        };
        ctx.store(port_off, &new.1, 0).map_err(|_| ())?;
        ctx.l4_csum_replace(csum_off, old.1 as u64, new.1 as u64, mangled | 2)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// Sets the source or destination address of the IPv4 header at `ip_off` and folds the change
/// into its header checksum by hand (RFC 1624), which keeps the header's sum, and so any
/// CHECKSUM_COMPLETE `skb->csum`, unchanged. Returns the old and new header checksums (for
/// callers that must also account for them elsewhere, like an ICMP checksum over a quote).
#[inline(always)]
pub fn set_ip_addr(ctx: &TcContext, ip_off: usize, end: End, new: u32) -> Result<(u16, u16), ()> {
    let ip = read_at::<Ipv4Hdr, _>(ctx, ip_off).ok_or(())?;
    let (mut saddr, mut daddr) = (ip.saddr, ip.daddr);
    let old = match end {
        End::Destination => core::mem::replace(&mut daddr, new),
        End::Source => core::mem::replace(&mut saddr, new),
    };
    let check = csum_replace4(ip.check, old, new);
    let mut header = [0u8; 10];
    header[..2].copy_from_slice(&check.to_ne_bytes());
    header[2..6].copy_from_slice(&saddr.to_ne_bytes());
    header[6..].copy_from_slice(&daddr.to_ne_bytes());
    ctx.store(ip_off + 10, &header, 0).map_err(|_| ())?;
    Ok((ip.check, check))
}

/// `check` updated for a 32-bit field changing from `from` to `to`: ~(~check + ~from + to) in
/// one's complement arithmetic. Works on native-order words whatever the byte order, as long
/// as all three are read from the packet the same way.
#[inline(always)]
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!from & 0xffff) + (!from >> 16) + (to & 0xffff) + (to >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// `check` updated for a 16-bit field changing from `from` to `to`.
#[inline(always)]
pub fn csum_replace2(check: u16, from: u16, to: u16) -> u16 {
    let mut sum = (!check) as u32 + (!from) as u32 + to as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
