//! The kernel side of the service data plane.
//!
//! Two tc programs on the host side of a pod's veth:
//! - `from_pod` (ingress: packets leaving the pod) translates a service address to a backend:
//!   a known flow costs one conntrack lookup; a new flow looks up the service, chooses a
//!   backend (session affinity, Maglev or random) and records the flow in both directions;
//! - `to_pod` (egress: packets entering the pod) restores the service address on replies.
//!
//! And cgroup hooks (`sock`) that load balance pods' sockets at connect time, so their flows
//! need no per-packet translation at all.
//!
//! Userspace (`ebpf-dataplane`) owns every decision that is not per packet.
#![no_std]
#![no_main]

mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use ebpf_common::{
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_SYN_SENT, Counter, CtEntry, FlowKey,
    IPPROTO_TCP, RevNat, ServiceKey, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    lb::backend_at,
    maps::{CONNTRACK, REVNAT, SERVICES},
    nat::{End, rewrite},
    parse::{Packet, Parsed, parse},
    stats::count,
};

/// The verdict for every packet the data plane lets through (translated or not): the next
/// program of the interface's TCX chain runs (a policy engine, a CNI hook), and the packet
/// goes on if there is none. `TC_ACT_OK` would be `TCX_PASS`, which ends the chain at us.
pub const TCX_NEXT: i32 = -1;

/// Load-time setting (see `ebpf_common::setting_names::FORCE_CT_MISS`): benchmarks only.
#[unsafe(no_mangle)]
static FORCE_CT_MISS: u32 = 0;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match try_to_pod(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// The per-packet cost floor of a tc program: the least one can do on the hook `from_pod`
/// runs on (passes every packet on to the rest of the chain).
#[classifier]
pub fn tc_floor(_ctx: TcContext) -> i32 {
    TCX_NEXT
}

/// The per-packet cost floor of an XDP program.
#[xdp]
pub fn xdp_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Parses the packet; `Ok(Err(verdict))` for packets the data plane lets through untouched.
#[inline(always)]
fn packet(ctx: &TcContext) -> Result<Result<Packet, i32>, Counter> {
    match parse(ctx) {
        Parsed::Packet(pkt) => Ok(Ok(pkt)),
        Parsed::Pass(counter) => {
            count(counter);
            Ok(Err(TCX_NEXT))
        }
        Parsed::Drop(reason) => Err(reason),
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, Counter> {
    let pkt = match packet(ctx)? {
        Ok(pkt) => pkt,
        Err(verdict) => return Ok(verdict),
    };
    let flow = pkt.flow;
    let svc_key = ServiceKey {
        vip: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
    };

    // SAFETY: a read-only global, set by the loader before the program is loaded.
    let force_miss = unsafe { core::ptr::read_volatile(&FORCE_CT_MISS) } != 0;
    let mut reselect = false;
    if !force_miss && let Some(ct) = CONNTRACK.get_ptr_mut(flow) {
        // SAFETY: the pointer comes from a successful lookup; LRU entries can be recycled under
        // us, which at worst sends one packet of a flow evicted this instant to a stale backend.
        let ct = unsafe { &mut *ct };
        let keep = if flow.proto == IPPROTO_TCP {
            tcp_keeps_backend(ct, pkt.tcp_flags)
        } else {
            // UDP has no connection to close: revalidate that the backend is still in the
            // service, so a removed backend's flows move on (kube-proxy clears their conntrack).
            match SERVICES.get_ptr(svc_key) {
                // SAFETY: SERVICES is not preallocated: a value stays valid for this RCU section.
                Some(svc) => backend_at(unsafe { &*svc }, ct.backend_index) == Some(ct.backend),
                None => false,
            }
        };
        if keep {
            let backend = ct.backend;
            rewrite(
                ctx,
                &pkt,
                End::Destination,
                (flow.daddr, flow.dport),
                (backend.ip, backend.port),
            )
            .map_err(|()| Counter::DropRewrite)?;
            count(Counter::DnatEstablished);
            return Ok(TCX_NEXT);
        }
        reselect = true;
    }

    let Some(svc) = SERVICES.get_ptr(svc_key) else {
        // A flow not to a service. If it opens on the tuple an ended service flow left behind
        // (the client reused its port towards that backend directly), that flow's reverse NAT
        // must go, or the direct flow's replies would come back from the service address.
        if flow.proto != IPPROTO_TCP || pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            let _ = REVNAT.remove(reversed(&flow));
        }
        count(Counter::PassNotService);
        return Ok(TCX_NEXT);
    };
    // SAFETY: SERVICES is not preallocated: a value stays valid for this RCU section.
    let svc = unsafe { *svc };
    if pkt.fragment {
        return Err(Counter::DropFragment);
    }
    if svc.backend_count == 0 {
        let verdict = reject::port_unreachable(ctx, &pkt)?;
        count(Counter::RejectNoBackend);
        return Ok(verdict);
    }
    let choice = lb::choose(&svc, &flow).ok_or(Counter::DropNoBackendSlot)?;
    let syn_only = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let entry = CtEntry {
        backend: choice.backend,
        backend_index: choice.index,
        state: if syn_only {
            CT_STATE_SYN_SENT
        } else {
            CT_STATE_ESTABLISHED
        },
        _pad: [0; 3],
    };
    CONNTRACK
        .insert(flow, entry, 0)
        .map_err(|_| Counter::DropCtInsert)?;
    let reply = reversed(&FlowKey {
        daddr: choice.backend.ip,
        dport: choice.backend.port,
        ..flow
    });
    let revnat = RevNat {
        vip: flow.daddr,
        port: flow.dport,
        _pad: 0,
    };
    REVNAT
        .insert(reply, revnat, 0)
        .map_err(|_| Counter::DropCtInsert)?;
    rewrite(
        ctx,
        &pkt,
        End::Destination,
        (flow.daddr, flow.dport),
        (choice.backend.ip, choice.backend.port),
    )
    .map_err(|()| Counter::DropRewrite)?;
    if reselect {
        count(Counter::Reselected);
    }
    count(Counter::DnatNew);
    Ok(TCX_NEXT)
}

/// The tuple of the packets going the other way.
#[inline(always)]
fn reversed(flow: &FlowKey) -> FlowKey {
    FlowKey {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

/// Advances a TCP flow's state; false when a SYN opens a new connection on the tuple of one
/// that was established or closing (the tuple is reused: choose a backend afresh). A SYN while
/// the handshake is pending is a retransmit and keeps its backend.
#[inline(always)]
fn tcp_keeps_backend(ct: &mut CtEntry, flags: u8) -> bool {
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return ct.state == CT_STATE_SYN_SENT;
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        if ct.state != CT_STATE_CLOSING {
            ct.state = CT_STATE_CLOSING;
        }
    } else if ct.state == CT_STATE_SYN_SENT && flags & TCP_ACK != 0 {
        ct.state = CT_STATE_ESTABLISHED;
    }
    true
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, Counter> {
    let pkt = match packet(ctx)? {
        Ok(pkt) => pkt,
        Err(verdict) => return Ok(verdict),
    };
    let Some(revnat) = REVNAT.get_ptr(pkt.flow) else {
        count(Counter::PassNotService);
        return Ok(TCX_NEXT);
    };
    // SAFETY: the pointer comes from a successful lookup; copied out at once.
    let revnat = unsafe { *revnat };
    rewrite(
        ctx,
        &pkt,
        End::Source,
        (pkt.flow.saddr, pkt.flow.sport),
        (revnat.vip, revnat.port),
    )
    .map_err(|()| Counter::DropRewrite)?;
    count(Counter::RevNat);
    Ok(TCX_NEXT)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
