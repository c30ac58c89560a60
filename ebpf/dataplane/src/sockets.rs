//! Sockets that socket-level load balancing connected to a backend that has left: a connected
//! UDP socket keeps its backend for its whole life (no packet is translated, so no conntrack
//! entry can be cleared as kube-proxy does), and would talk to the removed backend forever.
//! They are found with sock_diag and ended with SOCK_DESTROY (the kernel's `udp_abort`): the
//! application's next call fails with ECONNABORTED, and the socket it opens instead is load
//! balanced afresh. Cilium ends them the same way.
//!
//! Raw NETLINK_SOCK_DIAG messages (`inet_diag_req_v2`). sock_diag answers for the network
//! namespace its netlink socket was opened in: [`Diag::open`] from a thread inside the pod's,
//! then use it from anywhere.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// Connected UDP sockets are in TCP_ESTABLISHED (1).
const ESTABLISHED: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

impl SockId {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub fn cookie(&self) -> u64 {
        u64::from(self.cookie[0]) | (u64::from(self.cookie[1]) << 32)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// A connected UDP socket of this network namespace: its family, identity and IPv4 peer
/// (IPv6 sockets count when their peer is a v4-mapped address).
pub struct Connected {
    family: u8,
    pub id: SockId,
    pub peer: SocketAddrV4,
}

/// Every connected UDP socket (IPv4 and IPv6) of the calling thread's network namespace.
/// A sock_diag handle on one network namespace.
pub struct Diag(OwnedFd);

impl Diag {
    /// For the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        open().map(Self)
    }

    /// Every connected UDP socket (IPv4 and IPv6) of the namespace.
    pub fn connected_udp(&self) -> io::Result<Vec<Connected>> {
        connected_udp(&self.0)
    }

    /// Ends a socket (SOCK_DESTROY): its owner's next call fails with ECONNABORTED.
    pub fn destroy(&self, socket: &Connected) -> io::Result<()> {
        destroy(&self.0, socket)
    }
}

fn connected_udp(socket: &OwnedFd) -> io::Result<Vec<Connected>> {
    let mut found = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let request = InetDiagReqV2 {
            family,
            protocol: libc::IPPROTO_UDP as u8,
            states: ESTABLISHED,
            ..InetDiagReqV2::default()
        };
        send(
            socket,
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            &request,
        )?;
        let mut buf = vec![0u8; 32 * 1024];
        'dump: loop {
            let n = recv(socket, &mut buf)?;
            let mut at = 0;
            while at + size_of::<NlMsgHdr>() <= n {
                // SAFETY: bounds checked above; read_unaligned makes no alignment assumption.
                let header: NlMsgHdr =
                    unsafe { buf.as_ptr().add(at).cast::<NlMsgHdr>().read_unaligned() };
                let len = header.len as usize;
                if len < size_of::<NlMsgHdr>() || at + len > n {
                    break;
                }
                match header.kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => return Err(netlink_error(&buf[at..at + len])),
                    SOCK_DIAG_BY_FAMILY
                        if len >= size_of::<NlMsgHdr>() + size_of::<InetDiagMsg>() =>
                    {
                        // SAFETY: the message holds an inet_diag_msg (length checked).
                        let msg: InetDiagMsg = unsafe {
                            buf.as_ptr()
                                .add(at + size_of::<NlMsgHdr>())
                                .cast::<InetDiagMsg>()
                                .read_unaligned()
                        };
                        if let Some(peer) = ipv4_peer(&msg) {
                            found.push(Connected {
                                family: msg.family,
                                id: msg.id,
                                peer,
                            });
                        }
                    }
                    _ => {}
                }
                at += (len + 3) & !3;
            }
        }
    }
    Ok(found)
}

/// Ends a socket (SOCK_DESTROY): its owner's next call fails with ECONNABORTED.
fn destroy(netlink: &OwnedFd, socket: &Connected) -> io::Result<()> {
    let request = InetDiagReqV2 {
        family: socket.family,
        protocol: libc::IPPROTO_UDP as u8,
        states: ESTABLISHED,
        id: socket.id,
        ..InetDiagReqV2::default()
    };
    send(netlink, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &request)?;
    let mut buf = vec![0u8; 4096];
    let n = recv(netlink, &mut buf)?;
    if n >= size_of::<NlMsgHdr>() {
        // SAFETY: bounds checked; an unaligned read.
        let header: NlMsgHdr = unsafe { buf.as_ptr().cast::<NlMsgHdr>().read_unaligned() };
        if header.kind == NLMSG_ERROR {
            let error = netlink_error(&buf[..n.min(header.len as usize)]);
            // An acknowledgement is an "error" of 0; a socket closed meanwhile is no error.
            return match error.raw_os_error() {
                Some(0) | Some(libc::ENOENT) => Ok(()),
                _ => Err(error),
            };
        }
    }
    Ok(())
}

fn ipv4_peer(msg: &InetDiagMsg) -> Option<SocketAddrV4> {
    let ip = if msg.family == libc::AF_INET as u8 {
        msg.id.dst[0]
    } else {
        let mapped = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];
        if msg.id.dst[..3] != mapped {
            return None;
        }
        msg.id.dst[3]
    };
    Some(SocketAddrV4::new(
        Ipv4Addr::from(ip.to_ne_bytes()),
        u16::from_be(msg.id.dport),
    ))
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: socket() with constant arguments; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(socket: &OwnedFd, kind: u16, flags: u16, request: &InetDiagReqV2) -> io::Result<()> {
    #[repr(C)]
    struct Message {
        header: NlMsgHdr,
        request: InetDiagReqV2,
    }
    let message = Message {
        header: NlMsgHdr {
            len: size_of::<Message>() as u32,
            kind,
            flags,
            seq: 1,
            pid: 0,
        },
        request: *request,
    };
    // SAFETY: sending a plain struct of its own size to the kernel (nl_pid 0).
    let rc = unsafe {
        let mut to: libc::sockaddr_nl = std::mem::zeroed();
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        libc::sendto(
            socket.as_raw_fd(),
            (&message as *const Message).cast(),
            size_of::<Message>(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(socket: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receiving into a buffer of its own length.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The errno of an NLMSG_ERROR message (negated in it), as an error (0: an acknowledgement).
fn netlink_error(message: &[u8]) -> io::Error {
    let at = size_of::<NlMsgHdr>();
    let code = message
        .get(at..at + 4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(-libc::EIO);
    io::Error::from_raw_os_error(-code)
}
