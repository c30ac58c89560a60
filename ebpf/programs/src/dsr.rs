//! Direct server return for flows from outside sent to another node's backend
//! (`SVC_FLAG_DSR`), the way Cilium's IPv4-option DSR works, so either side may be Cilium's:
//!
//! - the node the client addressed (`send`) rewrites only the destination (the backend sees
//!   the client's own address) and, on a flow's first packet (a TCP SYN; every UDP datagram,
//!   as UDP has no first packet the backend's node could rely on), inserts an 8-byte IPv4
//!   option carrying the frontend (`DSR_OPTION_TYPE`), then routes the packet to the
//!   backend's node itself;
//! - the backend's node (`arrival`) records the flow from the option, a conntrack entry and
//!   the reverse entry `backend -> client` = the frontend, and removes the option, so the pod
//!   gets the packet as the client sent it, but for the destination;
//! - the pod's replies are translated there by `from_pod` (as a local backend's of an outside
//!   client) and routed straight to the client from the frontend: they never cross the first
//!   node. Those replies keep the recorded flow alive (`refresh`), as nothing of the client's
//!   is seen on the backend's node after its first packet.
//!
//! A packet the option would make larger than the path MTU is answered with an ICMP
//! fragmentation needed giving 8 bytes less (the client's next packets fit). A flow whose
//! reply tuple is taken on the first node (the same client port towards another frontend and
//! the same pod) is masqueraded instead: the pod could not tell the two apart.
//!
//! The option is only honoured for a frontend this node serves from outside too (every node
//! has the same services), so a packet from outside cannot make a pod answer from an
//! arbitrary address.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_ADJ_ROOM_NO_CSUM_RESET, bpf_adj_room_mode::BPF_ADJ_ROOM_NET},
    programs::TcContext,
};
use ebpf_common::{
    Backend, CT_FLAG_EXTERNAL, CT_STATE_ESTABLISHED, CT_STATE_SYN_SENT, Counter, CtEntry,
    DSR_OPTION_LEN, DSR_OPTION_TYPE, FlowKey, IPPROTO_TCP, NODEPORT_VIP, REVNAT_FLAG_DSR,
    REVNAT_FLAG_EXTERNAL, RevNat, SVC_FLAG_EXTERNAL, ServiceKey, TCP_ACK, TCP_SYN,
};

use crate::{
    external::is_local,
    forward, ifindex,
    maps::{CONNTRACK, REVNAT, SERVICES},
    now_s,
    parse::{ETH_HLEN, Fragment, IP_HLEN, Ipv4Hdr, Packet, read_at},
    reject, reversed,
    route::{self, Hop, IP_CSUM_OFF, lookup},
    stats::count,
};

/// The largest IPv4 header (15 words).
const MAX_IP_HLEN: usize = 60;

/// Whether a packet of a DSR flow carries the option: the first packet of a TCP flow, every
/// UDP datagram (its first fragment).
#[inline(always)]
pub fn carries_option(pkt: &Packet) -> bool {
    pkt.fragment != Fragment::Later
        && (pkt.flow.proto != IPPROTO_TCP || pkt.tcp_flags & TCP_SYN != 0)
}

/// Sends a client's packet of a DSR flow (`entry`) to its backend on another node: the
/// destination rewritten, the option inserted when the packet carries it, routed out here.
#[inline(always)]
pub fn send(ctx: &TcContext, pkt: &Packet, entry: &CtEntry) -> Result<i32, Counter> {
    let flow = &pkt.flow;
    let ip = read_at::<Ipv4Hdr, _>(ctx, ETH_HLEN).ok_or(Counter::DropRewrite)?;
    let option = carries_option(pkt);
    let grow = if option { DSR_OPTION_LEN as u16 } else { 0 };
    let hop = lookup(
        ctx,
        ifindex(ctx),
        ip.proto,
        u16::from_be(ip.tot_len).saturating_add(grow),
        flow.saddr,
        entry.backend.ip,
    )?;
    if let Hop::TooBig { mtu } = hop {
        // Still untranslated: the client hears what it sent, and the size that fits.
        let verdict = reject::fragmentation_needed(ctx, pkt, mtu.saturating_sub(grow))?;
        count(Counter::DropTooBig);
        return Ok(verdict);
    }
    if option && pkt.l4_off + DSR_OPTION_LEN > ETH_HLEN + MAX_IP_HLEN {
        // Options fill the header already: no room for ours.
        return Err(Counter::DropTooBig);
    }
    forward(ctx, pkt, entry, ifindex(ctx))?;
    if option {
        insert_option(ctx, &ip, flow.daddr, flow.dport)?;
        count(Counter::DsrSent);
    }
    route::out_to(ctx, &ip, hop)
}

/// The option's two words, as they lie in the header.
#[inline(always)]
fn option_words(addr: u32, port: u16) -> [u32; 2] {
    let port = port.to_ne_bytes();
    [
        u32::from_ne_bytes([DSR_OPTION_TYPE, DSR_OPTION_LEN as u8, port[0], port[1]]),
        addr,
    ]
}

/// The header's first word (version and length, TOS, total length) as it lies in memory,
/// with `words` more header words and `words * 4` more bytes in total.
#[inline(always)]
fn first_word(ip: &Ipv4Hdr, words: i8) -> u32 {
    let tot_len = (u16::from_be(ip.tot_len) as i32 + words as i32 * 4) as u16;
    let tot_len = tot_len.to_be_bytes();
    u32::from_ne_bytes([
        (ip.version_ihl as i8 + words) as u8,
        ip.tos,
        tot_len[0],
        tot_len[1],
    ])
}

/// Inserts the option right after the fixed IPv4 header (`ip`, as it was), fixing the header
/// length, the total length and the header checksum (the L4 checksum does not cover options).
#[inline(always)]
fn insert_option(ctx: &TcContext, ip: &Ipv4Hdr, addr: u32, port: u16) -> Result<(), Counter> {
    // BPF_ADJ_ROOM_NET makes room after the fixed 20-byte header. The checksum state is kept:
    // the L4 checksum stays valid.
    ctx.adjust_room(
        DSR_OPTION_LEN as i32,
        BPF_ADJ_ROOM_NET,
        BPF_F_ADJ_ROOM_NO_CSUM_RESET as u64,
    )
    .map_err(|_| Counter::DropRewrite)?;
    let option = option_words(addr, port);
    let (old, new) = (first_word(ip, 0), first_word(ip, 2));
    ctx.store(ETH_HLEN + IP_HLEN, &option, 0)
        .map_err(|_| Counter::DropRewrite)?;
    ctx.store(ETH_HLEN, &new, 0)
        .map_err(|_| Counter::DropRewrite)?;
    let csum = ETH_HLEN + IP_CSUM_OFF;
    for (from, to) in [(old, new), (0, option[0]), (0, option[1])] {
        ctx.l3_csum_replace(csum, from as u64, to as u64, 4)
            .map_err(|_| Counter::DropRewrite)?;
    }
    Ok(())
}

/// On the backend's node (`from_outside`): a packet for a pod of this node carrying a DSR
/// option for a frontend served here. Its flow is recorded, the option removed and the packet
/// passed on to the pod; `None` for every other packet (one comparison for those without IP
/// options).
#[inline(always)]
pub fn arrival(ctx: &TcContext, pkt: &Packet) -> Result<Option<i32>, Counter> {
    if pkt.l4_off < ETH_HLEN + IP_HLEN + DSR_OPTION_LEN || pkt.fragment == Fragment::Later {
        return Ok(None);
    }
    let flow = &pkt.flow;
    if !is_local(flow.daddr) {
        return Ok(None);
    }
    let Some(words) = read_at::<[u32; 2], _>(ctx, ETH_HLEN + IP_HLEN) else {
        return Ok(None);
    };
    let head = words[0].to_ne_bytes();
    if head[0] != DSR_OPTION_TYPE || head[1] != DSR_OPTION_LEN as u8 {
        return Ok(None);
    }
    let (addr, port) = (words[1], u16::from_ne_bytes([head[2], head[3]]));
    if !serves(addr, port, flow.proto) {
        return Ok(None);
    }
    record(pkt, addr, port)?;
    let ip = read_at::<Ipv4Hdr, _>(ctx, ETH_HLEN).ok_or(Counter::DropRewrite)?;
    remove_option(ctx, &ip, words)?;
    count(Counter::DsrRecorded);
    Ok(Some(crate::TCX_NEXT))
}

/// Whether `addr:port` is a frontend this node serves from outside (a NodePort on any
/// address: the option names another node's).
#[inline(always)]
fn serves(addr: u32, port: u16, proto: u8) -> bool {
    let key = ServiceKey {
        vip: addr,
        port,
        proto,
        _pad: 0,
    };
    let found = SERVICES.get_ptr(key).or_else(|| {
        SERVICES.get_ptr(ServiceKey {
            vip: NODEPORT_VIP,
            ..key
        })
    });
    // SAFETY: SERVICES is not preallocated: a value stays valid for this RCU section.
    found.is_some_and(|svc| unsafe { (*svc).flags } & SVC_FLAG_EXTERNAL != 0)
}

/// Records a DSR flow on its backend's node: the client's flow to the frontend (`addr:port`)
/// goes to the pod the packet is for, and the pod's replies come from the frontend. A UDP
/// flow's later datagrams only refresh it.
#[inline(always)]
fn record(pkt: &Packet, addr: u32, port: u16) -> Result<(), Counter> {
    let flow = &pkt.flow;
    let client_flow = FlowKey {
        daddr: addr,
        dport: port,
        ..*flow
    };
    let backend = Backend {
        ip: flow.daddr,
        port: flow.dport,
        _pad: 0,
    };
    let reply = reversed(flow);
    let revnat = RevNat {
        vip: addr,
        port,
        flags: REVNAT_FLAG_EXTERNAL | REVNAT_FLAG_DSR,
        client_port: flow.sport,
        _pad: 0,
        client: flow.saddr,
    };
    if flow.proto != IPPROTO_TCP
        && let Some(ct) = CONNTRACK.get_ptr_mut(client_flow)
    {
        // SAFETY: copied out at once from a successful lookup.
        let entry = unsafe { ct.read() };
        if entry.backend == backend {
            let now = now_s();
            if entry.last_seen != now {
                // SAFETY: a field write through a pointer from a successful lookup.
                unsafe { addr_of_mut!((*ct).last_seen).write(now) };
                if REVNAT.get_ptr(reply).is_none() {
                    let _ = REVNAT.insert(reply, revnat, 0);
                    count(Counter::RevNatRepaired);
                }
            }
            return Ok(());
        }
    }
    let entry = CtEntry {
        backend,
        // No service of this node chose the backend: a packet of the flow arriving here
        // directly (a load balancer's ECMP changed) chooses again, as Maglev would.
        service_id: 0,
        last_seen: now_s(),
        state: if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            CT_STATE_SYN_SENT
        } else {
            CT_STATE_ESTABLISHED
        },
        flags: CT_FLAG_EXTERNAL,
        snat_port: 0,
        nat_addr: 0,
    };
    CONNTRACK
        .insert(client_flow, entry, BPF_ANY as u64)
        .map_err(|_| Counter::DropCtInsert)?;
    REVNAT
        .insert(reply, revnat, BPF_ANY as u64)
        .map_err(|_| Counter::DropCtInsert)?;
    Ok(())
}

/// Removes the option (`words`, the first of the header `ip`), the reverse of
/// `insert_option`.
#[inline(always)]
fn remove_option(ctx: &TcContext, ip: &Ipv4Hdr, words: [u32; 2]) -> Result<(), Counter> {
    let (old, new) = (first_word(ip, 0), first_word(ip, -2));
    ctx.adjust_room(
        -(DSR_OPTION_LEN as i32),
        BPF_ADJ_ROOM_NET,
        BPF_F_ADJ_ROOM_NO_CSUM_RESET as u64,
    )
    .map_err(|_| Counter::DropRewrite)?;
    ctx.store(ETH_HLEN, &new, 0)
        .map_err(|_| Counter::DropRewrite)?;
    let csum = ETH_HLEN + IP_CSUM_OFF;
    for (from, to) in [(old, new), (words[0], 0), (words[1], 0)] {
        ctx.l3_csum_replace(csum, from as u64, to as u64, 4)
            .map_err(|_| Counter::DropRewrite)?;
    }
    Ok(())
}

/// A pod's reply of a flow recorded from a DSR option (`revnat`): the flow's entry stays
/// alive, and a TCP flow is established once the pod sends more than its SYN-ACK.
#[inline(always)]
pub fn refresh(pkt: &Packet, revnat: &RevNat) {
    let flow = &pkt.flow;
    let client_flow = FlowKey {
        saddr: flow.daddr,
        daddr: revnat.vip,
        sport: flow.dport,
        dport: revnat.port,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let Some(ct) = CONNTRACK.get_ptr_mut(client_flow) else {
        return;
    };
    // SAFETY: field reads and writes through a pointer from a successful lookup.
    unsafe {
        let now = now_s();
        if (*ct).last_seen != now {
            addr_of_mut!((*ct).last_seen).write(now);
        }
        if (*ct).state == CT_STATE_SYN_SENT && pkt.tcp_flags & TCP_SYN == 0 {
            addr_of_mut!((*ct).state).write(CT_STATE_ESTABLISHED);
        }
    }
}
