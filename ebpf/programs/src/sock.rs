//! Socket-level load balancing: cgroup hooks that translate a service address to a backend when
//! a pod's socket connects (or, for unconnected UDP, sends), so the flow's packets go to the
//! backend directly: no per-packet translation, no conntrack, nothing to undo on replies. The
//! reverse hooks make recvmsg() and getpeername() show the service address, as the application
//! expects.
//!
//! A node address with a NodePort's port is that NodePort (pods and the node's own processes
//! reach NodePorts as they reach cluster IPs).
//!
//! Only the network namespaces userspace enables are translated (the node's own processes and
//! other data planes' pods are not). Services with Maglev or session affinity are left to the
//! per-packet path, which keys them by the client address and port that a socket does not have
//! yet at connect time (except external frontends' Maglev, which is for flows reaching several
//! nodes from outside: a pod's socket gets any backend); so are services without backends,
//! which the per-packet path rejects.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use ebpf_common::{
    Backend, Counter, NODEPORT_VIP, RevNat, SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL, SVC_FLAG_MAGLEV,
    ServiceKey, SockFwdKey, SockRevKey,
};

use crate::{
    lb::{self, still_member},
    maps::{NODE_ADDRS, SERVICES, SOCK_FWD, SOCK_NETNS, SOCK_REVNAT},
    stats::count,
};

/// cgroup sock_addr verdict: let the call proceed.
pub const ALLOW: i32 = 1;

/// Which hooks called: IPv4 sockets, or IPv6 sockets (whose IPv4 peers are v4-mapped
/// addresses, ::ffff:a.b.c.d: Java's and many runtimes' default for every socket).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// `::ffff:0:0/96`, the v4-mapped prefix, as the three leading words of an IPv6 address.
const V4_MAPPED: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// The IPv4 address a socket address names: its own, or the one mapped into an IPv6 one.
#[inline(always)]
fn ipv4_of(ctx: &SockAddrContext, family: Family) -> Option<u32> {
    // SAFETY: reading fields the kernel lets these sock_addr programs read (user_ip4 in the
    // IPv4 hooks, user_ip6 in the IPv6 ones), 4 bytes at a time.
    unsafe {
        let sa = &*ctx.sock_addr;
        match family {
            Family::V4 => Some(sa.user_ip4),
            Family::V6 => {
                let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2]];
                (words == V4_MAPPED).then_some(sa.user_ip6[3])
            }
        }
    }
}

/// The service a socket address names, if the socket's namespace is load balanced here and
/// the service is one this path handles.
#[inline(always)]
fn service_of(
    ctx: &SockAddrContext,
    family: Family,
) -> Option<(ServiceKey, ebpf_common::ServiceValue)> {
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this call.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    SOCK_NETNS.get_ptr(netns)?;
    let vip = ipv4_of(ctx, family)?;
    // SAFETY: as above; reading fields the kernel lets sock_addr programs read.
    let key = unsafe {
        let sa = &*ctx.sock_addr;
        ServiceKey {
            vip,
            port: sa.user_port as u16,
            proto: sa.protocol as u8,
            _pad: 0,
        }
    };
    // A node address, this node's or another's, may be a NodePort's (as Cilium, a pod's
    // socket is balanced here, not on the node it named).
    let found = SERVICES.get_ptr(key).or_else(|| {
        NODE_ADDRS.get_ptr(vip)?;
        SERVICES.get_ptr(ServiceKey {
            vip: NODEPORT_VIP,
            ..key
        })
    });
    // SAFETY: SERVICES is not preallocated: a value stays valid for this RCU section.
    let svc = unsafe { *found? };
    // Maglev's external frontends are fine: consistent hashing is for the flows that reach
    // several nodes from outside; a pod's socket gets any backend.
    let maglev = svc.flags & SVC_FLAG_MAGLEV != 0 && svc.flags & SVC_FLAG_EXTERNAL == 0;
    if svc.backend_count == 0 || maglev || svc.flags & SVC_FLAG_AFFINITY != 0 {
        return None;
    }
    Some((key, svc))
}

#[inline(always)]
fn set_destination(ctx: &SockAddrContext, family: Family, ip: u32, port: u16) {
    // SAFETY: user_ip4 (IPv4 hooks), user_ip6 (IPv6 hooks, whose address is v4-mapped here:
    // only its last word changes) and user_port are writable in these hooks.
    unsafe {
        match family {
            Family::V4 => (*ctx.sock_addr).user_ip4 = ip,
            Family::V6 => (*ctx.sock_addr).user_ip6[3] = ip,
        }
        (*ctx.sock_addr).user_port = port as u32;
    }
}

#[inline(always)]
fn remember_service(cookie: u64, key: &ServiceKey, backend: Backend) {
    let rev = SockRevKey { cookie, backend };
    let value = RevNat {
        vip: key.vip,
        port: key.port,
        ..RevNat::default()
    };
    // Best effort: without it getpeername/recvmsg show the backend, the flow still works.
    let _ = SOCK_REVNAT.insert(rev, value, 0);
}

/// connect(): TCP sockets and connected UDP sockets go to a backend from the start.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some((key, svc)) = service_of(ctx, family) else {
        return ALLOW;
    };
    let Some(backend) = lb::choose_random(&svc) else {
        return ALLOW;
    };
    // SAFETY: a socket cookie of the call's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    remember_service(cookie, &key, backend);
    set_destination(ctx, family, backend.ip, backend.port);
    count(Counter::SockLbForward);
    ALLOW
}

/// sendmsg() on an unconnected UDP socket: each datagram to a service goes to the socket's
/// backend for that service, chosen once and kept while the backend stays in the service.
#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some((key, svc)) = service_of(ctx, family) else {
        return ALLOW;
    };
    // SAFETY: a socket cookie of the call's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let fwd = SockFwdKey {
        cookie,
        service: key,
    };
    let kept = SOCK_FWD
        .get_ptr(fwd)
        // SAFETY: copied out at once from a successful lookup.
        .map(|b| unsafe { b.read() })
        .filter(|&b| still_member(svc.id, b));
    let backend = match kept {
        Some(backend) => backend,
        None => {
            let Some(backend) = lb::choose_random(&svc) else {
                return ALLOW;
            };
            let _ = SOCK_FWD.insert(fwd, backend, 0);
            backend
        }
    };
    // Refreshed on every send: an LRU entry that only the first datagram wrote would be
    // evicted under churn while the socket still waits for replies.
    remember_service(cookie, &key, backend);
    set_destination(ctx, family, backend.ip, backend.port);
    count(Counter::SockLbForward);
    ALLOW
}

/// recvmsg() and getpeername(): a backend this socket was sent to shows as its service.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some(ip) = ipv4_of(ctx, family) else {
        return ALLOW;
    };
    // SAFETY: a socket cookie of the call's socket; a field readable in these hooks.
    let (cookie, port) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            (*ctx.sock_addr).user_port as u16,
        )
    };
    let key = SockRevKey {
        cookie,
        backend: ebpf_common::Backend { ip, port, _pad: 0 },
    };
    if let Some(rev) = SOCK_REVNAT.get_ptr(key) {
        // SAFETY: copied out at once from a successful lookup.
        let rev = unsafe { *rev };
        set_destination(ctx, family, rev.vip, rev.port);
        count(Counter::SockLbReverse);
    }
    ALLOW
}
