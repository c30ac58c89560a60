//! ICMP errors about translated flows, translated with them (as netfilter's NAT does): a
//! client hears its service's port unreachable, path MTU and TTL errors as coming from the
//! service, about the packet it sent to the service; a backend hears the client's errors
//! about the replies it sent. Outer addresses, the quoted packet's addresses and ports, and
//! all four checksums (outer IP, quoted IP, quoted TCP/UDP, ICMP) are rewritten.

use aya_ebpf::programs::TcContext;
use ebpf_common::IPPROTO_TCP;

use crate::{
    nat::{End, csum_replace2, csum_replace4, set_ip_addr},
    parse::{ETH_HLEN, IP_HLEN, IcmpError, TCP_CSUM_OFF, UDP_CSUM_OFF, read_at},
};

/// What the error must look like after translation.
pub struct Translation {
    pub outer_src: u32,
    pub outer_dst: u32,
    /// The quoted packet's source and destination (address, port).
    pub inner_src: (u32, u16),
    pub inner_dst: (u32, u16),
}

#[inline(always)]
pub fn translate(ctx: &TcContext, e: &IcmpError, t: &Translation) -> Result<(), ()> {
    if t.outer_src != e.saddr {
        set_ip_addr(ctx, ETH_HLEN, End::Source, t.outer_src)?;
    }
    if t.outer_dst != e.daddr {
        set_ip_addr(ctx, ETH_HLEN, End::Destination, t.outer_dst)?;
    }
    // The ICMP checksum covers the quote, so every change below is folded into it too (ICMP
    // has no pseudo-header: the outer addresses are not in it).
    let icmp_csum = e.icmp_off + 2;
    let fold = |from: u64, to: u64, size: u64| ctx.l4_csum_replace(icmp_csum, from, to, size);
    let inner = &e.inner;
    if e.inner_csum {
        let off = e.inner_off
            + IP_HLEN
            + if inner.proto == IPPROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            };
        let old = read_at::<u16, _>(ctx, off).ok_or(())?;
        // A UDP checksum of 0 means none: it stays 0.
        if inner.proto == IPPROTO_TCP || old != 0 {
            let mut new = csum_replace4(old, inner.saddr, t.inner_src.0);
            new = csum_replace4(new, inner.daddr, t.inner_dst.0);
            new = csum_replace2(new, inner.sport, t.inner_src.1);
            new = csum_replace2(new, inner.dport, t.inner_dst.1);
            ctx.store(off, &new, 0).map_err(|_| ())?;
            fold(old as u64, new as u64, 2).map_err(|_| ())?;
        }
    }
    let ports_off = e.inner_off + IP_HLEN;
    if inner.sport != t.inner_src.1 {
        ctx.store(ports_off, &t.inner_src.1, 0).map_err(|_| ())?;
        fold(inner.sport as u64, t.inner_src.1 as u64, 2).map_err(|_| ())?;
    }
    if inner.dport != t.inner_dst.1 {
        ctx.store(ports_off + 2, &t.inner_dst.1, 0)
            .map_err(|_| ())?;
        fold(inner.dport as u64, t.inner_dst.1 as u64, 2).map_err(|_| ())?;
    }
    for (end, old, new) in [
        (End::Source, inner.saddr, t.inner_src.0),
        (End::Destination, inner.daddr, t.inner_dst.0),
    ] {
        if old != new {
            let (old_check, new_check) = set_ip_addr(ctx, e.inner_off, end, new)?;
            fold(old as u64, new as u64, 4).map_err(|_| ())?;
            fold(old_check as u64, new_check as u64, 2).map_err(|_| ())?;
        }
    }
    Ok(())
}
