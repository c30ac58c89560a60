//! Address and port rewrites with their checksum fix-ups.
//!
//! The kernel's csum helpers are used rather than hand-folded sums: they do the right thing for
//! every `ip_summed` state. A locally sent packet is CHECKSUM_PARTIAL, its L4 checksum field
//! holds only the pseudo-header sum, so an address change must be folded in but a port change
//! must not; CHECKSUM_COMPLETE packets need `skb->csum` kept in step.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use ebpf_common::IPPROTO_TCP;

use crate::parse::{ETH_HLEN, IP_CSUM_OFF, Packet, TCP_CSUM_OFF, UDP_CSUM_OFF, ptr_at};

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
    let (ip_off, port_off) = match end {
        End::Destination => (ETH_HLEN + 16, pkt.l4_off + 2),
        End::Source => (ETH_HLEN + 12, pkt.l4_off),
    };
    let ip = ptr_at::<u32>(ctx, ip_off).ok_or(())?;
    let port = ptr_at::<u16>(ctx, port_off).ok_or(())?;
    // SAFETY: ptr_at checked the bounds; the helpers below may move the data, so every direct
    // write happens before the first of them.
    unsafe {
        *ip = new.0;
        *port = new.1;
    }
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
    if old.1 != new.1 {
        ctx.l4_csum_replace(csum_off, old.1 as u64, new.1 as u64, mangled | 2)
            .map_err(|_| ())?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, old.0 as u64, new.0 as u64, 4)
        .map_err(|_| ())?;
    Ok(())
}
