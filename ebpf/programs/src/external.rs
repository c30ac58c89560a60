//! Traffic from outside the cluster, on tc ingress of the node's own interfaces: NodePorts (a
//! port on any address of `NODE_ADDRS`), ExternalIPs and LoadBalancer IPs (frontends of their
//! own, flagged `SVC_FLAG_EXTERNAL`).
//!
//! A new flow gets a backend as a pod's would. A backend on this node gets the packet through
//! the node's stack with the client's address intact; so does a backend elsewhere when the
//! service keeps the client's address (`externalTrafficPolicy: Local` gives only local
//! backends anyway). With `SVC_FLAG_MASQ` (`Cluster`), a flow to another node's backend leaves
//! from a node address, so its replies come back here: they arrive on this same hook, are
//! translated back and routed out to the client. Replies of local backends are translated on
//! their way out of the pod (`from_pod`). Packets this node's stack would refuse (a node
//! address as source) are routed out by the program itself (`route`).
//!
//! A frontend with `loadBalancerSourceRanges` takes new flows only from clients in them.
//!
//! Traffic for cluster IPs and anything else passes untouched; each packet costs one lookup in
//! `NODE_ADDRS` and, for a node address, the flow lookups, or one service lookup otherwise.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use ebpf_common::{
    CT_FLAG_DSR, CT_FLAG_MASQ, Counter, CtEntry, NODE_ADDR_LOCAL, NODEPORT_VIP,
    REVNAT_FLAG_EXTERNAL, RevNat, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXTERNAL, SVC_FLAG_SOURCE_RANGES,
    ServiceKey, ServiceValue, SourceRange,
};

use crate::{
    TCX_NEXT, Work, dsr, finish_known, finish_new, forward, icmp_to_outside, ifindex, known_flow,
    maps::{CONNTRACK, NODE, NODE_ADDRS, REVNAT, SERVICES, SOURCE_RANGES},
    open_flow,
    parse::Packet,
    reject, restore, route,
    stats::count,
    work,
};

/// Whether `addr` is a pod of this node.
#[inline(always)]
pub fn is_local(addr: u32) -> bool {
    match NODE.get(0) {
        // Without a pod network to compare with, nothing is local (masquerading always works).
        Some(node) if node.pod_mask != 0 => addr & node.pod_mask == node.pod_net,
        _ => false,
    }
}

/// Whether `addr` is in `NODE_ADDRS` as `kind` (`NODE_ADDR_*`).
#[inline(always)]
pub fn is_node_addr(addr: u32, kind: u32) -> bool {
    // SAFETY: copied out at once from a successful lookup.
    NODE_ADDRS
        .get_ptr(addr)
        .is_some_and(|value| unsafe { value.read() } == kind)
}

/// What a packet from outside calls for.
pub enum Action {
    /// Not ours: let it through (this verdict counter says why).
    Pass(Counter),
    /// A packet of a known flow, for its backend; whether the flow has now ended.
    Known(CtEntry, bool),
    /// A new flow's first packet, for its backend; whether it reselected a reused tuple.
    New(CtEntry, bool),
    /// The reply of a flow masqueraded here, back to its client.
    Reply(RevNat),
    /// A new flow to a service without endpoints: refused with an ICMP error.
    Reject,
}

/// Decides what a packet from outside calls for, updating the flow state as the packet goes
/// (its flow's entry, a new flow's entries). `fast` (XDP): a known flow that is not
/// masqueraded is passed before its state is touched, so tc, which forwards it, updates it
/// once.
#[inline(always)]
pub fn decide(pkt: &Packet, fast: bool) -> Result<Action, Counter> {
    let flow = pkt.flow;
    let node_addr = is_node_addr(flow.daddr, NODE_ADDR_LOCAL);
    let mut reselect = false;
    if node_addr {
        if let Some(ct) = CONNTRACK.get_ptr_mut(flow) {
            if fast && !xdp_takes(ct, pkt) {
                return Ok(Action::Pass(Counter::PassNotService));
            }
            match known_flow(pkt, ct) {
                Some((entry, ended)) => return Ok(Action::Known(entry, ended)),
                None => reselect = true,
            }
        } else if let Some(revnat) = REVNAT.get_ptr(flow) {
            // SAFETY: copied out at once from a successful lookup.
            let revnat = unsafe { revnat.read() };
            if revnat.flags & REVNAT_FLAG_EXTERNAL != 0 {
                // The reply of a masqueraded flow: back to the client, from the address it
                // used.
                return Ok(Action::Reply(revnat));
            }
        }
    }
    let exact = ServiceKey {
        vip: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
    };
    // A node address may also be an ExternalIP of its own (`externalIPs: [<node IP>]`); else it
    // is a NodePort's.
    let found = SERVICES.get_ptr(exact).or_else(|| {
        if !node_addr {
            return None;
        }
        SERVICES.get_ptr(ServiceKey {
            vip: NODEPORT_VIP,
            ..exact
        })
    });
    let Some(svc) = found else {
        return Ok(Action::Pass(Counter::PassNotService));
    };
    // SAFETY: SERVICES is not preallocated: a value stays valid for this RCU section.
    let svc: ServiceValue = unsafe { *svc };
    if svc.flags & SVC_FLAG_EXTERNAL == 0 {
        return Ok(Action::Pass(Counter::PassClusterOnly));
    }
    if !node_addr && let Some(ct) = CONNTRACK.get_ptr_mut(flow) {
        if fast && !xdp_takes(ct, pkt) {
            return Ok(Action::Pass(Counter::PassNotService));
        }
        match known_flow(pkt, ct) {
            Some((entry, ended)) => return Ok(Action::Known(entry, ended)),
            None => reselect = true,
        }
    }
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        let key = Key::new(
            64,
            SourceRange {
                service_id: svc.id,
                addr: flow.saddr,
            },
        );
        if SOURCE_RANGES.get(&key).is_none() {
            return Err(Counter::DropSourceRange);
        }
    }
    if svc.backend_count == 0 {
        if svc.flags & SVC_FLAG_DROP_EMPTY != 0 {
            return Err(Counter::DropNoLocalEndpoint);
        }
        return Ok(Action::Reject);
    }
    let nat_addr = if node_addr {
        flow.daddr
    } else {
        match NODE.get(0) {
            Some(node) if node.masq_addr != 0 => node.masq_addr,
            _ => flow.daddr,
        }
    };
    let entry = open_flow(pkt, &svc, reselect, Some(nat_addr))?;
    Ok(Action::New(entry, reselect))
}

/// Whether the XDP fast path sends `pkt` of the flow of conntrack entry `ct` itself: a flow
/// masqueraded to another node's backend, or sent there by DSR (but for the packets carrying
/// the option, which tc inserts).
#[inline(always)]
fn xdp_takes(ct: *mut CtEntry, pkt: &Packet) -> bool {
    // SAFETY: the pointer comes from a successful lookup; one field read.
    let flags = unsafe { (*ct).flags };
    xdp_sends(flags, pkt)
}

/// The same, from the flow's entry's flags.
#[inline(always)]
pub fn xdp_sends(flags: u8, pkt: &Packet) -> bool {
    flags & CT_FLAG_MASQ != 0 || (flags & CT_FLAG_DSR != 0 && !dsr::carries_option(pkt))
}

#[inline(always)]
pub fn from_outside(ctx: &TcContext) -> Result<i32, Counter> {
    let pkt = match work(ctx)? {
        Ok(Work::Packet(pkt)) => pkt,
        // An error about a flow masqueraded here (the backend's port unreachable, a router's
        // fragmentation needed): to its client.
        Ok(Work::Icmp(error)) => {
            if let Some(verdict) = icmp_to_outside(ctx, &error)? {
                return Ok(verdict);
            }
            count(Counter::PassNotService);
            return Ok(TCX_NEXT);
        }
        Err(verdict) => return Ok(verdict),
    };
    // On a backend's node: a flow another node sent here by DSR.
    if let Some(verdict) = dsr::arrival(ctx, &pkt)? {
        return Ok(verdict);
    }
    match decide(&pkt, false)? {
        Action::Pass(counter) => {
            count(counter);
            Ok(TCX_NEXT)
        }
        Action::Known(entry, ended) => send(ctx, &pkt, &entry, ended),
        Action::New(entry, reselect) => {
            let verdict = to_backend(ctx, &pkt, &entry)?;
            finish_new(&pkt, reselect);
            Ok(verdict)
        }
        Action::Reply(revnat) => {
            restore(ctx, &pkt, &revnat, pkt.flow.daddr)?;
            count(Counter::RevNat);
            route::out(ctx)
        }
        Action::Reject => {
            let verdict = reject::port_unreachable(ctx, &pkt)?;
            count(Counter::RejectNoBackend);
            Ok(verdict)
        }
    }
}

/// A packet of a known flow from outside, to its backend.
#[inline(always)]
fn send(ctx: &TcContext, pkt: &Packet, entry: &CtEntry, ended: bool) -> Result<i32, Counter> {
    let verdict = to_backend(ctx, pkt, entry)?;
    finish_known(pkt, entry, ended);
    Ok(verdict)
}

/// Translates a packet from outside for its backend: a masqueraded one is routed out here
/// (its source is now a node address), as is a DSR one (with its option); the others go on
/// through the node's stack.
#[inline(always)]
fn to_backend(ctx: &TcContext, pkt: &Packet, entry: &CtEntry) -> Result<i32, Counter> {
    if entry.flags & CT_FLAG_DSR != 0 {
        return dsr::send(ctx, pkt, entry);
    }
    let verdict = forward(ctx, pkt, entry, ifindex(ctx))?;
    if entry.flags & CT_FLAG_MASQ != 0 {
        return route::out(ctx);
    }
    Ok(verdict)
}
