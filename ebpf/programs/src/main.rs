//! The kernel side of the service data plane.
//!
//! Two tc programs on the host side of a pod's veth:
//! - `from_pod` (ingress: packets leaving the pod) translates a service address to a backend:
//!   a known flow costs one conntrack lookup; a new flow looks up the service, chooses a
//!   backend (session affinity, Maglev or random) and records the flow in both directions;
//! - `to_pod` (egress: packets entering the pod) restores the service address on replies.
//!
//! Both translate the ICMP errors about translated flows (port unreachable, fragmentation
//! needed, TTL exceeded) with them, and the later fragments of a translated datagram as its
//! first; `from_pod` drops packets whose source is not the pod's, and sends a pod that is its
//! own backend straight back into itself from a reserved address (hairpin).
//!
//! One tc program on the node's own interfaces, `from_outside` (`external`): NodePorts,
//! ExternalIPs and LoadBalancer IPs for clients outside the cluster; `from_pod` translates the
//! replies of local backends to them.
//!
//! And cgroup hooks (`sock`) that load balance pods' sockets at connect time, so their flows
//! need no per-packet translation at all.
//!
//! Userspace (`ebpf-dataplane`) owns every decision that is not per packet.
#![no_std]
#![no_main]

mod dsr;
mod external;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod route;
mod sock;
mod stats;
mod xdp;

use core::ptr::addr_of_mut;

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_ANY, BPF_NOEXIST, TC_ACT_SHOT, xdp_action},
    helpers::{bpf_ktime_get_coarse_ns, bpf_redirect_peer},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use ebpf_common::{
    CT_FLAG_CLIENT_FIN, CT_FLAG_DSR, CT_FLAG_EXTERNAL, CT_FLAG_HAIRPIN, CT_FLAG_MASQ,
    CT_FLAG_SERVER_FIN, CT_FLAG_SNAT, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_SYN_SENT,
    Counter, CtEntry, FlowKey, FragKey, FragPorts, HAIRPIN_ADDR, IPPROTO_TCP, MAX_POD_SOURCES,
    MAX_RANGES, NODE_ADDR_PEER, REMAP_PORT_FIRST, REMAP_PORTS, REVNAT_FLAG_CLOSING,
    REVNAT_FLAG_DSR, REVNAT_FLAG_EXTERNAL, REVNAT_FLAG_MASQ, REVNAT_FLAG_SNAT, RevNat,
    SVC_FLAG_DSR, SVC_FLAG_MASQ, ServiceKey, ServiceValue, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    flow_hash,
};

use crate::{
    icmp::Translation,
    lb::still_member,
    maps::{CONNTRACK, FRAGS, POD_ADDRS, RANGES, REVNAT, SERVICES},
    nat::{End, rewrite},
    parse::{Fragment, IcmpError, Packet, Parsed, parse, read_at},
    sock::Family,
    stats::count,
};

/// The verdict for every packet the data plane lets through (translated or not): the next
/// program of the interface's TCX chain runs (a policy engine, a CNI hook), and the packet
/// goes on if there is none. `TC_ACT_OK` would be `TCX_PASS`, which ends the chain at us.
pub const TCX_NEXT: i32 = -1;

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
pub fn from_outside(ctx: TcContext) -> i32 {
    match external::from_outside(&ctx) {
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
    sock::connect(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4)
}

/// The same for IPv6 sockets addressing IPv4 peers through v4-mapped addresses.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx, Family::V6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg(&ctx, Family::V6)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V6)
}

/// XDP on the node's own interfaces: the fast path for flows from outside masqueraded to
/// other nodes' backends (`xdp`); everything else goes on to `from_outside`.
#[xdp]
pub fn from_outside_xdp(ctx: XdpContext) -> u32 {
    match xdp::from_outside(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(reason);
            xdp_action::XDP_DROP
        }
    }
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

/// What the programs do with a parsed packet.
pub(crate) enum Work {
    Packet(Packet),
    Icmp(IcmpError),
}

/// Parses the packet; `Ok(Err(verdict))` for packets the data plane lets through untouched.
/// A later fragment gets the ports its datagram's first fragment had, if that one was
/// translated here; the others pass.
#[inline(always)]
pub(crate) fn work(ctx: &TcContext) -> Result<Result<Work, i32>, Counter> {
    let mut pkt = match parse(ctx) {
        Parsed::Packet(pkt) => pkt,
        Parsed::Icmp(error) => return Ok(Ok(Work::Icmp(error))),
        Parsed::Pass(counter) => {
            count(counter);
            return Ok(Err(TCX_NEXT));
        }
        Parsed::Drop(reason) => return Err(reason),
    };
    if pkt.fragment == Fragment::Later {
        let Some(ports) = FRAGS.get_ptr(frag_key(&pkt)) else {
            count(Counter::PassNotService);
            return Ok(Err(TCX_NEXT));
        };
        // SAFETY: copied out at once from a successful lookup.
        let ports = unsafe { ports.read() };
        pkt.flow.sport = ports.sport;
        pkt.flow.dport = ports.dport;
    }
    Ok(Ok(Work::Packet(pkt)))
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        saddr: pkt.flow.saddr,
        daddr: pkt.flow.daddr,
        id: pkt.ip_id,
        proto: pkt.flow.proto,
        _pad: 0,
    }
}

/// After a first fragment was translated: its datagram's later fragments (which carry no
/// ports) will be translated the same way.
#[inline(always)]
fn track_fragments(pkt: &Packet) {
    if pkt.fragment == Fragment::First {
        let ports = FragPorts {
            sport: pkt.flow.sport,
            dport: pkt.flow.dport,
        };
        if FRAGS.insert(frag_key(pkt), ports, 0).is_ok() {
            count(Counter::FragmentTracked);
        }
    }
}

/// The interface the packet arrived on (tc ingress) or leaves by (tc egress).
#[inline(always)]
pub(crate) fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the program's own context; ifindex is readable by tc programs.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex }
}

/// Seconds of the coarse monotonic clock (conntrack's time base; userspace's GC compares it
/// with `CLOCK_MONOTONIC`).
#[inline(always)]
fn now_s() -> u32 {
    // SAFETY: no arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Whether a pod interface may send from `saddr`: interfaces userspace registered addresses
/// for accept only those; others (tests, benchmarks) are not checked.
#[inline(always)]
fn source_allowed(ifindex: u32, saddr: u32) -> bool {
    let Some(sources) = POD_ADDRS.get_ptr(ifindex) else {
        return true;
    };
    // SAFETY: copied out at once from a successful lookup.
    let sources = unsafe { sources.read() };
    for i in 0..MAX_POD_SOURCES {
        if i as u32 >= sources.count {
            break;
        }
        if sources.addrs[i] == saddr {
            return true;
        }
    }
    false
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, Counter> {
    let ifindex = ifindex(ctx);
    let pkt = match work(ctx)? {
        Ok(Work::Packet(pkt)) => pkt,
        Ok(Work::Icmp(error)) => {
            if !source_allowed(ifindex, error.saddr) {
                return Err(Counter::DropSpoofed);
            }
            return icmp_from_pod(ctx, &error);
        }
        Err(verdict) => return Ok(verdict),
    };
    let flow = pkt.flow;
    // Before any conntrack or load-balancing work: a pod forging another pod's address could
    // otherwise re-balance or end that pod's flows.
    if !source_allowed(ifindex, flow.saddr) {
        return Err(Counter::DropSpoofed);
    }
    if flow.daddr == HAIRPIN_ADDR {
        return hairpin_reply(ctx, &pkt, ifindex);
    }
    if !in_service_ranges(flow.daddr) {
        if let Some(verdict) = reply_to_outside(ctx, &pkt)? {
            return Ok(verdict);
        }
        forget_stale_reply(&pkt);
        count(Counter::PassOutsideRanges);
        return Ok(TCX_NEXT);
    }
    let svc_key = ServiceKey {
        vip: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
    };

    let mut reselect = false;
    if let Some(ct) = CONNTRACK.get_ptr_mut(flow) {
        if let Some((entry, ended)) = known_flow(&pkt, ct) {
            let verdict = forward(ctx, &pkt, &entry, ifindex)?;
            finish_known(&pkt, &entry, ended);
            return Ok(verdict);
        }
        reselect = true;
    } else if let Some(verdict) = reply_to_outside(ctx, &pkt)? {
        // An outside client may have an address in the service ranges (a node's, when it is
        // also an ExternalIP; pods masqueraded to it); its replies are not new flows.
        return Ok(verdict);
    }

    let Some(svc) = SERVICES.get_ptr(svc_key) else {
        forget_stale_reply(&pkt);
        count(Counter::PassNotService);
        return Ok(TCX_NEXT);
    };
    // SAFETY: SERVICES is not preallocated: a value stays valid for this RCU section.
    let svc = unsafe { *svc };
    if svc.backend_count == 0 {
        let verdict = reject::port_unreachable(ctx, &pkt)?;
        count(Counter::RejectNoBackend);
        return Ok(verdict);
    }
    let entry = open_flow(&pkt, &svc, reselect, None)?;
    let verdict = forward(ctx, &pkt, &entry, ifindex)?;
    finish_new(&pkt, reselect);
    Ok(verdict)
}

/// A pod's reply to a client outside the cluster, if `pkt` is one: from the NodePort or
/// external address the client used (another node's, for a flow that node sent here by DSR),
/// routed out here (its source may be a node address, which the node's own stack would refuse
/// as a martian).
#[inline(always)]
fn reply_to_outside(ctx: &TcContext, pkt: &Packet) -> Result<Option<i32>, Counter> {
    let Some(revnat) = REVNAT.get_ptr(pkt.flow) else {
        return Ok(None);
    };
    // SAFETY: copied out at once from a successful lookup.
    let revnat = unsafe { revnat.read() };
    if revnat.flags & REVNAT_FLAG_EXTERNAL == 0 {
        return Ok(None);
    }
    if revnat.flags & REVNAT_FLAG_DSR != 0 {
        dsr::refresh(pkt, &revnat);
    }
    restore(ctx, pkt, &revnat, pkt.flow.daddr)?;
    count(Counter::RevNat);
    route::out(ctx).map(Some)
}

/// A packet of a flow conntrack knows (`ct`, its entry): the entry when the flow stays on its
/// backend (its last-seen time, TCP state and reverse entry kept up to date) and whether the
/// flow has now ended; `None` when a backend must be chosen again (a new connection on the
/// tuple of an old one, a UDP flow whose backend left).
#[inline(always)]
pub(crate) fn known_flow(pkt: &Packet, ct: *mut CtEntry) -> Option<(CtEntry, bool)> {
    let flow = &pkt.flow;
    // SAFETY: the pointer comes from a successful lookup; the entry is copied out and written
    // back field by field (other CPUs may be reading it). LRU entries can be recycled under
    // us, which at worst sends one packet of a flow evicted this instant to a stale backend.
    let entry = unsafe { ct.read() };
    let keep = if flow.proto == IPPROTO_TCP {
        // A SYN on the tuple of an established or closing flow opens a new connection
        // (choose afresh); while the handshake is pending it is a retransmit.
        pkt.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN || entry.state == CT_STATE_SYN_SENT
    } else {
        // UDP has no connection to close: revalidate that the backend is still in the
        // service, so a removed backend's flows move on (kube-proxy clears their conntrack).
        still_member(entry.service_id, entry.backend)
    };
    if !keep {
        return None;
    }
    let now = now_s();
    let reply = entry.reply_key(flow);
    if entry.last_seen != now {
        // SAFETY: as above.
        unsafe { addr_of_mut!((*ct).last_seen).write(now) };
        // At most once a second, the reverse entry is checked: an LRU may have evicted it
        // while the flow was idle, and replies would then show the backend.
        if REVNAT.get_ptr(reply).is_none() {
            let _ = REVNAT.insert(reply, revnat_of(flow, &entry), 0);
            count(Counter::RevNatRepaired);
        }
    }
    let ended = flow.proto == IPPROTO_TCP
        && track_tcp(ct, &entry, pkt.tcp_flags, CT_FLAG_CLIENT_FIN, &reply);
    Some((entry, ended))
}

/// After a packet of a known flow went to its backend: its fragments are tracked, an ended
/// flow forgotten.
#[inline(always)]
pub(crate) fn finish_known(pkt: &Packet, entry: &CtEntry, ended: bool) {
    track_fragments(pkt);
    if ended {
        forget(&pkt.flow, &entry.reply_key(&pkt.flow));
    }
    count(Counter::DnatEstablished);
}

/// After a new flow's first packet went to its backend.
#[inline(always)]
pub(crate) fn finish_new(pkt: &Packet, reselect: bool) {
    track_fragments(pkt);
    if reselect {
        count(Counter::Reselected);
    }
    count(Counter::DnatNew);
}

/// Chooses a backend for a new flow of `svc` (which has some) and records the flow in both
/// directions. `external`: a flow from outside the cluster, with the address it is
/// masqueraded to if its backend is on another node and the service says so (or if a DSR
/// flow cannot have its reply tuple).
#[inline(always)]
pub(crate) fn open_flow(
    pkt: &Packet,
    svc: &ServiceValue,
    reselect: bool,
    external: Option<u32>,
) -> Result<CtEntry, Counter> {
    let flow = pkt.flow;
    let backend = lb::choose(svc, &flow).ok_or(Counter::DropNoBackendSlot)?;
    let syn_only = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut entry = CtEntry {
        backend,
        service_id: svc.id,
        last_seen: now_s(),
        state: if syn_only {
            CT_STATE_SYN_SENT
        } else {
            CT_STATE_ESTABLISHED
        },
        flags: 0,
        snat_port: 0,
        nat_addr: 0,
    };
    match external {
        None if backend.ip == flow.saddr => entry.flags = CT_FLAG_HAIRPIN,
        None => {}
        Some(nat_addr) => {
            entry.flags = CT_FLAG_EXTERNAL;
            entry.nat_addr = nat_addr;
            if !external::is_local(backend.ip) {
                // A client that is another node (a pod masqueraded to it) would get its own
                // address back as a source from outside, a martian: masqueraded.
                if svc.flags & SVC_FLAG_DSR != 0
                    && !external::is_node_addr(flow.saddr, NODE_ADDR_PEER)
                {
                    entry.flags |= CT_FLAG_DSR;
                } else if svc.flags & SVC_FLAG_MASQ != 0 {
                    masquerade(&flow, &mut entry);
                }
            }
        }
    }
    // A reply tuple of its own first: the client port is remapped if a live flow of another
    // service already gets its replies on the one this flow's would have.
    claim_reply(&flow, &mut entry)?;
    if reselect {
        CONNTRACK
            .insert(flow, entry, BPF_ANY as u64)
            .map_err(|_| Counter::DropCtInsert)?;
    } else if CONNTRACK.insert(flow, entry, BPF_NOEXIST as u64).is_ok() {
        count(Counter::CtCreated);
        if flow.proto == IPPROTO_TCP && pkt.tcp_flags & TCP_SYN == 0 {
            count(Counter::CtMidFlow);
        }
    } else {
        // Another CPU created the flow since our lookup (two first packets at once): its
        // backend is the flow's.
        let winner = CONNTRACK.get_ptr(flow).ok_or(Counter::DropCtInsert)?;
        // SAFETY: copied out at once from a successful lookup.
        entry = unsafe { winner.read() };
        count(Counter::CtRace);
        // The winner claimed its reply tuple; ours, if another, is left to the collector.
        let _ = REVNAT.insert(entry.reply_key(&flow), revnat_of(&flow, &entry), 0);
    }
    Ok(entry)
}

/// Makes a flow from outside leave from `entry.nat_addr`. The client's port is kept if no
/// other flow's replies come back on it.
#[inline(always)]
fn masquerade(flow: &FlowKey, entry: &mut CtEntry) {
    entry.flags = entry.flags & !CT_FLAG_DSR | CT_FLAG_MASQ | CT_FLAG_SNAT;
    entry.snat_port = flow.sport;
    count(Counter::Masqueraded);
}

/// Whether `daddr` may be a service address (inside one of the ranges userspace keeps).
#[inline(always)]
fn in_service_ranges(daddr: u32) -> bool {
    let Some(ranges) = RANGES.get(0) else {
        return true;
    };
    for i in 0..MAX_RANGES {
        if i as u32 >= ranges.count {
            break;
        }
        if daddr & ranges.mask[i] == ranges.net[i] {
            return true;
        }
    }
    false
}

/// For a flow to no service: if it opens on the tuple an ended service flow left behind (the
/// client reused its port towards that backend directly), that flow's reverse NAT must go, or
/// the direct flow's replies would come back from the service address. Looked up first: a
/// delete takes the map's bucket lock even when there is nothing to delete.
#[inline(always)]
fn forget_stale_reply(pkt: &Packet) {
    let flow = &pkt.flow;
    if flow.proto != IPPROTO_TCP || pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        let stale = reversed(flow);
        if REVNAT.get_ptr(stale).is_some() {
            let _ = REVNAT.remove(stale);
        }
    }
}

/// The reverse-NAT entry restoring `flow`'s service address (and its client port).
#[inline(always)]
pub(crate) fn revnat_of(flow: &FlowKey, entry: &CtEntry) -> RevNat {
    let mut flags = 0;
    if entry.flags & CT_FLAG_SNAT != 0 {
        flags |= REVNAT_FLAG_SNAT;
    }
    if entry.flags & CT_FLAG_MASQ != 0 {
        flags |= REVNAT_FLAG_MASQ;
    }
    if entry.flags & CT_FLAG_EXTERNAL != 0 {
        flags |= REVNAT_FLAG_EXTERNAL;
    }
    RevNat {
        vip: flow.daddr,
        port: flow.dport,
        flags,
        client_port: flow.sport,
        _pad: 0,
        client: flow.saddr,
    }
}

/// How many remapped ports a new flow tries before giving up.
const REMAP_ATTEMPTS: u32 = 16;

/// Inserts the reverse entry of a new flow. The reply tuple may be taken: by this flow (a
/// retransmitted first packet, a reused tuple), by a flow that is gone (taken over), or by a
/// live flow of another service sharing the backend, the same client port towards another
/// service address: then the client's port is remapped so both flows keep their replies.
#[inline(always)]
fn claim_reply(flow: &FlowKey, entry: &mut CtEntry) -> Result<(), Counter> {
    for attempt in 0..=REMAP_ATTEMPTS {
        let reply = entry.reply_key(flow);
        let value = revnat_of(flow, entry);
        if REVNAT.insert(reply, value, BPF_NOEXIST as u64).is_ok() {
            return Ok(());
        }
        if let Some(existing) = REVNAT.get_ptr(reply) {
            // SAFETY: copied out at once from a successful lookup.
            let existing = unsafe { existing.read() };
            let ours = existing.vip == value.vip
                && existing.port == value.port
                && existing.client_port == value.client_port
                && existing.client == value.client;
            if ours || CONNTRACK.get_ptr(existing.flow_of(&reply)).is_none() {
                REVNAT
                    .insert(reply, value, BPF_ANY as u64)
                    .map_err(|_| Counter::DropCtInsert)?;
                return Ok(());
            }
        }
        if entry.flags & CT_FLAG_DSR != 0 {
            // The backend answers the client itself, to the port it sees: the client's port
            // cannot be remapped, and the pod could not tell the two flows apart.
            masquerade(flow, entry);
            continue;
        }
        entry.flags |= CT_FLAG_SNAT;
        entry.snat_port = remap_port(flow, attempt);
        if attempt == 0 {
            count(Counter::PortRemapped);
        }
    }
    Err(Counter::DropCtInsert)
}

/// A port for a clashing flow, different for each attempt.
#[inline(always)]
fn remap_port(flow: &FlowKey, attempt: u32) -> u16 {
    let hash = flow_hash(flow.saddr ^ flow.daddr, flow.sport ^ flow.dport)
        .wrapping_add(attempt.wrapping_mul(0x9E37_79B9));
    (REMAP_PORT_FIRST + (hash % REMAP_PORTS) as u16).to_be()
}

/// Sends a client's packet to its backend: the destination rewritten, and the source too on a
/// hairpin (the packet then goes straight back into the pod) or a remapped port.
#[inline(always)]
pub(crate) fn forward(
    ctx: &TcContext,
    pkt: &Packet,
    entry: &CtEntry,
    ifindex: u32,
) -> Result<i32, Counter> {
    let flow = &pkt.flow;
    let backend = entry.backend;
    rewrite(
        ctx,
        pkt,
        End::Destination,
        (flow.daddr, flow.dport),
        (backend.ip, backend.port),
    )
    .map_err(|()| Counter::DropRewrite)?;
    let hairpin = entry.flags & CT_FLAG_HAIRPIN != 0;
    if !hairpin && entry.flags & CT_FLAG_SNAT == 0 {
        return Ok(TCX_NEXT);
    }
    let reply = entry.reply_key(flow);
    rewrite(
        ctx,
        pkt,
        End::Source,
        (flow.saddr, flow.sport),
        (reply.daddr, reply.dport),
    )
    .map_err(|()| Counter::DropRewrite)?;
    if !hairpin {
        return Ok(TCX_NEXT);
    }
    count(Counter::Hairpin);
    back_into_pod(ctx, ifindex)
}

/// Delivers a packet that arrived from a pod straight back into it (the peer of the veth it
/// came in on), as if its gateway had sent it: the MAC addresses swap.
#[inline(always)]
fn back_into_pod(ctx: &TcContext, ifindex: u32) -> Result<i32, Counter> {
    let macs = read_at::<[u8; 12], _>(ctx, 0).ok_or(Counter::DropRewrite)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0)
        .map_err(|_| Counter::DropRewrite)?;
    // SAFETY: no pointers.
    Ok(unsafe { bpf_redirect_peer(ifindex, 0) } as i32)
}

/// Advances a TCP flow's state on a packet from one side (`fin_flag` says which) and writes
/// the changes back; true when the flow has now ended (a RST, or the last ACK after both
/// FINs), so its entries can go at once instead of waiting to be evicted.
#[inline(always)]
fn track_tcp(
    ct: *mut CtEntry,
    entry: &CtEntry,
    tcp_flags: u8,
    fin_flag: u8,
    reply: &FlowKey,
) -> bool {
    if tcp_flags & TCP_RST != 0 {
        return true;
    }
    let both = CT_FLAG_CLIENT_FIN | CT_FLAG_SERVER_FIN;
    let (mut state, mut flags) = (entry.state, entry.flags);
    if tcp_flags & TCP_FIN != 0 {
        state = CT_STATE_CLOSING;
        flags |= fin_flag;
    } else if entry.flags & both == both && tcp_flags & TCP_ACK != 0 {
        return true;
    } else if state == CT_STATE_SYN_SENT
        && fin_flag == CT_FLAG_CLIENT_FIN
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK
    {
        state = CT_STATE_ESTABLISHED;
    }
    if flags != entry.flags {
        // The flow starts closing: replies must now look at its conntrack entry too (to see
        // the last ACK when the client closes second).
        if let Some(rev) = REVNAT.get_ptr_mut(*reply) {
            // SAFETY: a field write through a pointer from a successful lookup.
            unsafe { addr_of_mut!((*rev).flags).write(REVNAT_FLAG_CLOSING) };
        }
    }
    // SAFETY: `ct` comes from a successful lookup; field writes only.
    unsafe {
        if state != entry.state {
            addr_of_mut!((*ct).state).write(state);
        }
        if flags != entry.flags {
            addr_of_mut!((*ct).flags).write(flags);
        }
    }
    false
}

/// Removes an ended flow's entries.
#[inline(always)]
fn forget(flow: &FlowKey, reply: &FlowKey) {
    let _ = CONNTRACK.remove(*flow);
    let _ = REVNAT.remove(*reply);
    count(Counter::CtClosed);
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

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, Counter> {
    let pkt = match work(ctx)? {
        Ok(Work::Packet(pkt)) => pkt,
        Ok(Work::Icmp(error)) => return icmp_to_pod(ctx, &error),
        Err(verdict) => return Ok(verdict),
    };
    let Some(revnat) = REVNAT.get_ptr(pkt.flow) else {
        count(Counter::PassNotService);
        return Ok(TCX_NEXT);
    };
    // SAFETY: the pointer comes from a successful lookup; copied out at once.
    let revnat = unsafe { revnat.read() };
    restore(ctx, &pkt, &revnat, pkt.flow.daddr)?;
    count(Counter::RevNat);
    Ok(TCX_NEXT)
}

/// A pod's reply to a connection it made to itself through a service (hairpin): from its
/// service address, back to it, straight into it.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet, ifindex: u32) -> Result<i32, Counter> {
    let Some(revnat) = REVNAT.get_ptr(pkt.flow) else {
        // Nothing of ours: the address is reserved, nothing else answers on it.
        count(Counter::PassNotService);
        return Ok(TCX_NEXT);
    };
    // SAFETY: the pointer comes from a successful lookup; copied out at once.
    let revnat = unsafe { revnat.read() };
    rewrite(
        ctx,
        pkt,
        End::Destination,
        (HAIRPIN_ADDR, pkt.flow.dport),
        (pkt.flow.saddr, pkt.flow.dport),
    )
    .map_err(|()| Counter::DropRewrite)?;
    restore(ctx, pkt, &revnat, pkt.flow.saddr)?;
    count(Counter::RevNat);
    back_into_pod(ctx, ifindex)
}

/// Restores the service address as a reply's source, and the client's own address and port
/// as its destination where they were rewritten; tracks the end of a closing TCP flow.
/// `client` is the reply's destination address as it stands (the client's, unless it was
/// masqueraded).
#[inline(always)]
pub(crate) fn restore(
    ctx: &TcContext,
    pkt: &Packet,
    revnat: &RevNat,
    client: u32,
) -> Result<(), Counter> {
    let flow = &pkt.flow;
    rewrite(
        ctx,
        pkt,
        End::Source,
        (flow.saddr, flow.sport),
        (revnat.vip, revnat.port),
    )
    .map_err(|()| Counter::DropRewrite)?;
    let masq = revnat.flags & REVNAT_FLAG_MASQ != 0;
    let original = if masq { revnat.client } else { client };
    if revnat.flags & REVNAT_FLAG_SNAT != 0 {
        rewrite(
            ctx,
            pkt,
            End::Destination,
            (client, flow.dport),
            (original, revnat.client_port),
        )
        .map_err(|()| Counter::DropRewrite)?;
    }
    track_fragments(pkt);
    track_reply(pkt, revnat, original);
    Ok(())
}

/// A reply of a TCP flow closing: the flow's state follows the server's FIN, and the flow is
/// forgotten once it has ended. `client`: the client's own address.
#[inline(always)]
pub(crate) fn track_reply(pkt: &Packet, revnat: &RevNat, client: u32) {
    let flow = &pkt.flow;
    if flow.proto != IPPROTO_TCP
        || (pkt.tcp_flags & (TCP_FIN | TCP_RST) == 0 && revnat.flags & REVNAT_FLAG_CLOSING == 0)
    {
        return;
    }
    let client_flow = FlowKey {
        saddr: client,
        daddr: revnat.vip,
        sport: revnat.client_port,
        dport: revnat.port,
        proto: flow.proto,
        _pad: [0; 3],
    };
    if let Some(ct) = CONNTRACK.get_ptr_mut(client_flow) {
        // SAFETY: copied out from a successful lookup; written back by field.
        let entry = unsafe { ct.read() };
        if track_tcp(ct, &entry, pkt.tcp_flags, CT_FLAG_SERVER_FIN, flow) {
            forget(&client_flow, flow);
        }
    }
}

/// An ICMP error a pod sends about a packet a service sent it (its kernel refused a reply, or
/// it routes): the backend must hear it, from the pod, about the packet the backend sent. The
/// quote is the reply as the pod got it, from the service address.
#[inline(always)]
fn icmp_from_pod(ctx: &TcContext, error: &IcmpError) -> Result<i32, Counter> {
    // A local backend's error about a packet of a client outside the cluster (port
    // unreachable): to that client, about what it sent.
    if let Some(verdict) = icmp_to_outside(ctx, error)? {
        return Ok(verdict);
    }
    let quoted = &error.inner;
    let Some(ct) = CONNTRACK.get_ptr(reversed(quoted)) else {
        count(Counter::PassNotService);
        return Ok(TCX_NEXT);
    };
    // SAFETY: copied out at once from a successful lookup.
    let entry = unsafe { ct.read() };
    if entry.flags & CT_FLAG_HAIRPIN != 0 {
        // About the pod's own connection to itself: nothing outside needs to hear it.
        count(Counter::PassNotService);
        return Ok(TCX_NEXT);
    }
    let backend = entry.backend;
    let translation = Translation {
        outer_src: error.saddr,
        outer_dst: if error.daddr == quoted.saddr {
            backend.ip
        } else {
            error.daddr
        },
        inner_src: (backend.ip, backend.port),
        inner_dst: (
            quoted.daddr,
            if entry.flags & CT_FLAG_SNAT != 0 {
                entry.snat_port
            } else {
                quoted.dport
            },
        ),
    };
    icmp::translate(ctx, error, &translation).map_err(|()| Counter::DropRewrite)?;
    count(Counter::IcmpTranslated);
    Ok(TCX_NEXT)
}

/// An ICMP error about a packet a pod sent to a service, from its backend (port unreachable)
/// or a router on the way (fragmentation needed, TTL exceeded): the pod must hear it about the
/// packet it sent, to the service address, and from the service when the backend sent it.
#[inline(always)]
fn icmp_to_pod(ctx: &TcContext, error: &IcmpError) -> Result<i32, Counter> {
    let Some(revnat) = REVNAT.get_ptr(reversed(&error.inner)) else {
        count(Counter::PassNotService);
        return Ok(TCX_NEXT);
    };
    // SAFETY: copied out at once from a successful lookup.
    let revnat = unsafe { revnat.read() };
    icmp::translate(ctx, error, &to_client(error, &revnat)).map_err(|()| Counter::DropRewrite)?;
    count(Counter::IcmpTranslated);
    Ok(TCX_NEXT)
}

/// An ICMP error about a packet of a client outside the cluster (`None` if it is not one),
/// from its backend or a router on the way: translated for the client, about the packet it
/// sent to the NodePort or external address, and routed out to it by the data plane (the
/// error's source may now be a node address).
#[inline(always)]
pub(crate) fn icmp_to_outside(ctx: &TcContext, error: &IcmpError) -> Result<Option<i32>, Counter> {
    let Some(revnat) = REVNAT.get_ptr(reversed(&error.inner)) else {
        return Ok(None);
    };
    // SAFETY: copied out at once from a successful lookup.
    let revnat = unsafe { revnat.read() };
    if revnat.flags & REVNAT_FLAG_EXTERNAL == 0 {
        return Ok(None);
    }
    icmp::translate(ctx, error, &to_client(error, &revnat)).map_err(|()| Counter::DropRewrite)?;
    count(Counter::IcmpTranslated);
    route::out(ctx).map(Some)
}

/// How an ICMP error about a client's packet to a service (`revnat`: the flow's reverse
/// entry) must reach the client: from the service when its backend sent it, to the client's
/// own address, quoting the packet as the client sent it.
#[inline(always)]
fn to_client(error: &IcmpError, revnat: &RevNat) -> Translation {
    let quoted = &error.inner;
    let masqueraded = revnat.flags & REVNAT_FLAG_MASQ != 0;
    let client = if masqueraded {
        revnat.client
    } else {
        quoted.saddr
    };
    Translation {
        outer_src: if error.saddr == quoted.daddr {
            revnat.vip
        } else {
            error.saddr
        },
        outer_dst: if masqueraded { client } else { error.daddr },
        inner_src: (client, revnat.client_port),
        inner_dst: (revnat.vip, revnat.port),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
