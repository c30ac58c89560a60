//! The XDP fast path for traffic from outside, on the same interfaces as `from_outside`: a flow
//! to a NodePort, ExternalIP or LoadBalancer address masqueraded to another node's backend,
//! and that flow's replies, are translated and sent straight back out (the FIB says where),
//! before the kernel allocates an skb; so are the packets of a flow sent to another node by
//! DSR, but for those carrying its option (a TCP SYN, UDP). Everything else passes to tc,
//! which has the full feature set: flows to this node's pods, rejects, ICMP errors,
//! fragments, IP options.
//!
//! Both programs decide alike (`external::decide`, on the same maps), so a flow may move
//! between them at any packet (a pass on a missing neighbour entry, an agent running without
//! XDP) and keeps its backend.
//!
//! The skb helpers tc uses to fix checksums do not exist here: the IPv4 and L4 checksums are
//! updated by hand (RFC 1624). That is only right for a complete L4 checksum. A packet this
//! host's own stack sent over a veth carries only its pseudo-header sum (CHECKSUM_PARTIAL, to
//! be completed by a NIC that never comes) and XDP cannot see the skb flag that says so: such
//! packets are recognised by their checksum field equal to the pseudo-header sum and left to
//! tc, whose helpers handle them. Packets from a wire always carry a complete checksum.

use core::ptr::addr_of_mut;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, programs::XdpContext};
use ebpf_common::{CT_FLAG_MASQ, Counter, CtEntry, IPPROTO_TCP, REVNAT_FLAG_SNAT, RevNat};

use crate::{
    external::{Action, decide, xdp_sends},
    finish_known, finish_new,
    parse::{
        ETH_HLEN, Fragment, IP_HLEN, Ipv4Hdr, Packet, Parsed, TCP_CSUM_OFF, TCP_HLEN, UDP_CSUM_OFF,
        UDP_HLEN, parse, ptr_at,
    },
    route::{Hop, lookup, ttl_words},
    stats::count,
    track_reply,
};

#[inline(always)]
pub fn from_outside(ctx: &XdpContext) -> Result<u32, Counter> {
    let Parsed::Packet(pkt) = parse(ctx) else {
        // ICMP, other protocols, malformed packets: tc parses, counts and handles them.
        return Ok(xdp_action::XDP_PASS);
    };
    if pkt.fragment != Fragment::None || pkt.l4_off != ETH_HLEN + IP_HLEN {
        return Ok(xdp_action::XDP_PASS);
    }
    if partial_checksum(ctx, &pkt) {
        count(Counter::XdpPartialChecksum);
        return Ok(xdp_action::XDP_PASS);
    }
    let flow = pkt.flow;
    match decide(&pkt, true)? {
        Action::Known(entry, ended) if xdp_sends(entry.flags, &pkt) => {
            let verdict = send(ctx, &pkt, forward_to(&pkt, &entry))?;
            if verdict != xdp_action::XDP_PASS {
                finish_known(&pkt, &entry, ended);
            }
            Ok(verdict)
        }
        Action::New(entry, reselect) if entry.flags & CT_FLAG_MASQ != 0 => {
            let verdict = send(ctx, &pkt, forward_to(&pkt, &entry))?;
            if verdict != xdp_action::XDP_PASS {
                finish_new(&pkt, reselect);
            }
            Ok(verdict)
        }
        Action::Reply(revnat) => {
            let to = (
                (revnat.vip, revnat.port),
                reply_to(&revnat, flow.daddr, flow.dport),
            );
            let verdict = send(ctx, &pkt, to)?;
            if verdict != xdp_action::XDP_PASS {
                track_reply(&pkt, &revnat, to.1.0);
                count(Counter::RevNat);
            }
            Ok(verdict)
        }
        // A new flow to a local backend: its entries are made, tc finds a known flow and
        // forwards it through the stack. Passes, rejects: tc counts and does them.
        Action::Known(..) | Action::New(..) | Action::Pass(_) | Action::Reject => {
            Ok(xdp_action::XDP_PASS)
        }
    }
}

/// Source and destination (address, port) of a masqueraded flow's packet to its backend.
#[inline(always)]
fn forward_to(pkt: &Packet, entry: &CtEntry) -> ((u32, u16), (u32, u16)) {
    let reply = entry.reply_key(&pkt.flow);
    (
        (reply.daddr, reply.dport),
        (entry.backend.ip, entry.backend.port),
    )
}

/// The destination of a masqueraded flow's reply: the client's own address and port.
#[inline(always)]
fn reply_to(revnat: &RevNat, daddr: u32, dport: u16) -> (u32, u16) {
    if revnat.flags & REVNAT_FLAG_SNAT != 0 {
        (revnat.client, revnat.client_port)
    } else {
        (daddr, dport)
    }
}

/// Rewrites the packet to `to` (source, destination), one hop older, and sends it out where
/// the FIB says. Passes it untouched to tc if the FIB has no resolved next hop, or no hops
/// are left (the stack sends the ICMP error).
#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Packet, to: ((u32, u16), (u32, u16))) -> Result<u32, Counter> {
    let ((saddr, sport), (daddr, dport)) = to;
    let ip = ptr_at::<Ipv4Hdr, _>(ctx, ETH_HLEN).ok_or(Counter::DropRewrite)?;
    // SAFETY: ptr_at checked the bounds; unaligned reads and writes of the header's fields.
    let header = unsafe { ip.read_unaligned() };
    if header.ttl <= 1 {
        return Ok(xdp_action::XDP_PASS);
    }
    // SAFETY: the program's own context.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let Hop::Resolved { ifindex, macs } = lookup(
        ctx,
        ingress,
        header.proto,
        u16::from_be(header.tot_len),
        saddr,
        daddr,
    )?
    else {
        return Ok(xdp_action::XDP_PASS);
    };
    let (ttl_old, ttl_new) = ttl_words(&header);
    let addr_old = [header.saddr, header.daddr];
    let addr_new = [saddr, daddr];
    let mut ip_sum = Sum::start(header.check);
    ip_sum.replace32(&addr_old, &addr_new);
    ip_sum.replace16(&[ttl_old], &[ttl_new]);
    // SAFETY: as above.
    unsafe {
        addr_of_mut!((*ip).ttl).write(header.ttl - 1);
        addr_of_mut!((*ip).saddr).write_unaligned(saddr);
        addr_of_mut!((*ip).daddr).write_unaligned(daddr);
        addr_of_mut!((*ip).check).write_unaligned(ip_sum.finish());
    }
    let flow = &pkt.flow;
    let ports_old = [flow.sport, flow.dport];
    let ports_new = [sport, dport];
    if flow.proto == IPPROTO_TCP {
        let tcp = ptr_at::<[u8; TCP_HLEN], _>(ctx, pkt.l4_off).ok_or(Counter::DropRewrite)?;
        // SAFETY: ptr_at checked the bounds; a byte array has no alignment.
        let tcp = unsafe { &mut *tcp };
        let old = u16::from_ne_bytes([tcp[TCP_CSUM_OFF], tcp[TCP_CSUM_OFF + 1]]);
        let mut sum = Sum::start(old);
        sum.replace32(&addr_old, &addr_new);
        sum.replace16(&ports_old, &ports_new);
        write_ports(tcp, sport, dport);
        tcp[TCP_CSUM_OFF..TCP_CSUM_OFF + 2].copy_from_slice(&sum.finish().to_ne_bytes());
    } else {
        let udp = ptr_at::<[u8; UDP_HLEN], _>(ctx, pkt.l4_off).ok_or(Counter::DropRewrite)?;
        // SAFETY: as above.
        let udp = unsafe { &mut *udp };
        let old = u16::from_ne_bytes([udp[UDP_CSUM_OFF], udp[UDP_CSUM_OFF + 1]]);
        write_ports(udp, sport, dport);
        // A zero UDP checksum means "none": it stays zero; a computed zero is sent as ones.
        if old != 0 {
            let mut sum = Sum::start(old);
            sum.replace32(&addr_old, &addr_new);
            sum.replace16(&ports_old, &ports_new);
            let new = match sum.finish() {
                0 => 0xffff,
                new => new,
            };
            udp[UDP_CSUM_OFF..UDP_CSUM_OFF + 2].copy_from_slice(&new.to_ne_bytes());
        }
    }
    let eth = ptr_at::<[u8; 12], _>(ctx, 0).ok_or(Counter::DropRewrite)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe { eth.write(macs) };
    count(Counter::XdpForwarded);
    if ifindex == ingress {
        return Ok(xdp_action::XDP_TX);
    }
    // SAFETY: no pointers.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
}

/// Writes the source and destination ports (network order) at the start of an L4 header.
#[inline(always)]
fn write_ports(l4: &mut [u8], sport: u16, dport: u16) {
    l4[0..2].copy_from_slice(&sport.to_ne_bytes());
    l4[2..4].copy_from_slice(&dport.to_ne_bytes());
}

/// Whether the L4 checksum is only the pseudo-header sum (see the module's documentation).
#[inline(always)]
fn partial_checksum(ctx: &XdpContext, pkt: &Packet) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_HLEN) else {
        return false;
    };
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { ip.read_unaligned() };
    let csum_off = if pkt.flow.proto == IPPROTO_TCP {
        TCP_CSUM_OFF
    } else {
        UDP_CSUM_OFF
    };
    let Some(check) = ptr_at::<[u8; 2], _>(ctx, pkt.l4_off + csum_off) else {
        return false;
    };
    // SAFETY: as above.
    let check = u16::from_ne_bytes(unsafe { check.read() });
    if check == 0 {
        return false;
    }
    let l4_len = u16::from_be(ip.tot_len).saturating_sub(IP_HLEN as u16);
    let mut sum = Sum(0);
    sum.add32(ip.saddr);
    sum.add32(ip.daddr);
    sum.add16(u16::from_be_bytes([0, ip.proto]).to_be());
    sum.add16(l4_len.to_be());
    sum.fold() == check
}

/// A one's-complement sum of 16-bit words as they sit in memory (the sum is byte-order
/// independent, RFC 1071), for incremental checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
struct Sum(u32);

impl Sum {
    #[inline(always)]
    fn start(check: u16) -> Self {
        Sum(u32::from(!check))
    }
    #[inline(always)]
    fn add16(&mut self, word: u16) {
        self.0 += u32::from(word);
    }
    #[inline(always)]
    fn add32(&mut self, word: u32) {
        self.add16(word as u16);
        self.add16((word >> 16) as u16);
    }
    /// The words `old` became `new`.
    #[inline(always)]
    fn replace16(&mut self, old: &[u16], new: &[u16]) {
        for word in old {
            self.add16(!word);
        }
        for word in new {
            self.add16(*word);
        }
    }
    #[inline(always)]
    fn replace32(&mut self, old: &[u32], new: &[u32]) {
        for word in old {
            self.add32(!word);
        }
        for word in new {
            self.add32(*word);
        }
    }
    /// The sum folded to 16 bits.
    #[inline(always)]
    fn fold(&self) -> u16 {
        let sum = (self.0 & 0xffff) + (self.0 >> 16);
        ((sum & 0xffff) + (sum >> 16)) as u16
    }
    /// The updated checksum.
    #[inline(always)]
    fn finish(&self) -> u16 {
        !self.fold()
    }
}
