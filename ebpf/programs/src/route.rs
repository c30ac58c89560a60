//! Routing a packet out by the data plane itself, for the packets the node's stack would refuse:
//! a flow from outside masqueraded to a node address arrives with that local address as its
//! source (a martian to the stack), and so does a reply whose source became a NodePort's node
//! address. The kernel's FIB says where the destination is; the frame gets the next hop's and
//! the interface's MAC addresses and is redirected out of that interface.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use ebpf_common::Counter;

use crate::{
    ifindex,
    parse::{ETH_HLEN, Ipv4Hdr, read_at},
};

const AF_INET: u8 = 2;

/// Redirects the (already translated) packet towards its destination. Returns the tc verdict.
#[inline(always)]
pub fn out(ctx: &TcContext) -> Result<i32, Counter> {
    let ip = read_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(Counter::DropRewrite)?;
    // SAFETY: a plain C struct of integers and unions of integers: all zeroes is valid.
    let mut params: bpf_fib_lookup = unsafe { zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.__bindgen_anon_1.tot_len = u16::from_be(ip.tot_len);
    params.ifindex = ifindex(ctx);
    params.__bindgen_anon_3.ipv4_src = ip.saddr;
    params.__bindgen_anon_4.ipv4_dst = ip.daddr;
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
        ctx.store(0, &macs, 0).map_err(|_| Counter::DropRewrite)?;
        // SAFETY: no pointers.
        return Ok(unsafe { bpf_redirect(params.ifindex, 0) } as i32);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The next hop's address is not resolved yet: the kernel resolves it (and queues the
        // packet meanwhile).
        // SAFETY: no parameters: the kernel looks the next hop up itself.
        return Ok(
            unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32,
        );
    }
    Err(Counter::DropNoRoute)
}
