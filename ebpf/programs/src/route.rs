//! Routing a packet out by the data plane itself, for the packets the node's stack would refuse:
//! a flow from outside masqueraded to a node address arrives with that local address as its
//! source (a martian to the stack), and so does a reply whose source became a NodePort's node
//! address. The kernel's FIB says where the destination is; the frame gets the next hop's and
//! the interface's MAC addresses and is redirected out of that interface.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use ebpf_common::Counter;

use crate::{
    TCX_NEXT, ifindex,
    parse::{ETH_HLEN, Ipv4Hdr, read_at},
};

const AF_INET: u8 = 2;
/// Offsets of the TTL and the header checksum in the IPv4 header.
pub const TTL_OFF: usize = 8;
pub const IP_CSUM_OFF: usize = 10;

/// The 16-bit header word holding the TTL (with the protocol), before and after the TTL is
/// decremented, as they sit in memory (for incremental checksum updates).
#[inline(always)]
pub fn ttl_words(ip: &Ipv4Hdr) -> (u16, u16) {
    (
        u16::from_ne_bytes([ip.ttl, ip.proto]),
        u16::from_ne_bytes([ip.ttl.wrapping_sub(1), ip.proto]),
    )
}

/// Where the FIB sends a packet.
pub enum Hop {
    /// Out of `ifindex`, with these destination and source MAC addresses.
    Resolved { ifindex: u32, macs: [u8; 12] },
    /// Out of `ifindex`, to a next hop whose MAC address the kernel has not resolved yet.
    Unresolved { ifindex: u32 },
    /// To this node itself (the node's stack delivers it).
    Local,
    /// Larger than the route's MTU.
    TooBig { mtu: u16 },
}

/// Looks up the route of a packet `saddr` -> `daddr` of `tot_len` bytes that came in on
/// `ifindex` (tc or XDP context alike).
#[inline(always)]
pub fn lookup<C: EbpfContext>(
    ctx: &C,
    ifindex: u32,
    proto: u8,
    tot_len: u16,
    saddr: u32,
    daddr: u32,
) -> Result<Hop, Counter> {
    // SAFETY: a plain C struct of integers and unions of integers: all zeroes is valid.
    let mut params: bpf_fib_lookup = unsafe { zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: our context and a params struct of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&params.dmac);
        macs[6..].copy_from_slice(&params.smac);
        return Ok(Hop::Resolved {
            ifindex: params.ifindex,
            macs,
        });
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Ok(Hop::Unresolved {
            ifindex: params.ifindex,
        });
    }
    if rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 {
        return Ok(Hop::Local);
    }
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: the kernel wrote the MTU into the union's other member.
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
        return Ok(Hop::TooBig { mtu });
    }
    Err(Counter::DropNoRoute)
}

/// Redirects the (already translated) packet towards its destination. Returns the tc verdict.
#[inline(always)]
pub fn out(ctx: &TcContext) -> Result<i32, Counter> {
    let ip = read_at::<Ipv4Hdr, _>(ctx, ETH_HLEN).ok_or(Counter::DropRewrite)?;
    let hop = lookup(
        ctx,
        ifindex(ctx),
        ip.proto,
        u16::from_be(ip.tot_len),
        ip.saddr,
        ip.daddr,
    )?;
    out_to(ctx, &ip, hop)
}

/// Sends the packet, whose IPv4 header was `ip` (its TTL and protocol still are), to `hop`.
#[inline(always)]
pub fn out_to(ctx: &TcContext, ip: &Ipv4Hdr, hop: Hop) -> Result<i32, Counter> {
    let (ifindex, macs) = match hop {
        Hop::Resolved { ifindex, macs } => (ifindex, Some(macs)),
        Hop::Unresolved { ifindex } => (ifindex, None),
        // A destination on this node (a client masqueraded to a node address): its stack
        // takes it from here, through its own NAT.
        Hop::Local => return Ok(TCX_NEXT),
        Hop::TooBig { .. } => return Err(Counter::DropTooBig),
    };
    // Forwarded, as a router would: one hop less to live.
    if ip.ttl <= 1 {
        return Err(Counter::DropTtlExceeded);
    }
    ctx.store(ETH_HLEN + TTL_OFF, &(ip.ttl - 1), 0)
        .map_err(|_| Counter::DropRewrite)?;
    let (old, new) = ttl_words(ip);
    ctx.l3_csum_replace(ETH_HLEN + IP_CSUM_OFF, old as u64, new as u64, 2)
        .map_err(|_| Counter::DropRewrite)?;
    match macs {
        Some(macs) => {
            ctx.store(0, &macs, 0).map_err(|_| Counter::DropRewrite)?;
            // SAFETY: no pointers.
            Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
        }
        // The kernel resolves the next hop (and queues the packet meanwhile).
        // SAFETY: no parameters: the kernel looks the next hop up itself.
        None => Ok(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32),
    }
}
