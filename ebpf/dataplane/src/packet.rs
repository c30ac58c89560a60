//! Ethernet/IPv4 frames for BPF_PROG_TEST_RUN fixtures and benchmarks, and a reader that checks
//! every checksum of what the programs hand back.

use std::net::{Ipv4Addr, SocketAddrV4};

pub use ebpf_common::{IPPROTO_ICMP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};
use ebpf_common::{IPPROTO_TCP, IPPROTO_UDP};

const ETH_HLEN: usize = 14;
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// A frame to build. `Default` is a TCP SYN from a client MAC to the node MAC, no payload.
#[derive(Clone, Debug)]
pub struct Builder {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 option bytes (a multiple of 4, at most 40).
    pub ip_options: Vec<u8>,
    /// IPv4 flags and fragment offset, host order (e.g. 0x2000 for "more fragments").
    pub frag_off: u16,
    /// Send UDP without a checksum (zero), as RFC 768 allows.
    pub udp_no_checksum: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            dst: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            proto: IPPROTO_TCP,
            tcp_flags: TCP_SYN,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag_off: 0,
            udp_no_checksum: false,
        }
    }
}

/// A TCP segment from `src` to `dst` with `flags`.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Builder {
    Builder {
        src,
        dst,
        tcp_flags: flags,
        ..Builder::default()
    }
}

/// A UDP datagram from `src` to `dst` carrying `payload`.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Builder {
    Builder {
        src,
        dst,
        proto: IPPROTO_UDP,
        tcp_flags: 0,
        payload: payload.to_vec(),
        ..Builder::default()
    }
}

impl Builder {
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Pads the payload so the whole frame is `len` bytes (the benchmark's 64-byte packet).
    pub fn frame_len(mut self, len: usize) -> Self {
        let headers = self.build().len() - self.payload.len();
        self.payload.resize(len.saturating_sub(headers), 0);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        assert!(self.ip_options.len().is_multiple_of(4) && self.ip_options.len() <= 40);
        let ihl = 20 + self.ip_options.len();
        let l4_len = match self.proto {
            IPPROTO_TCP => 20,
            IPPROTO_UDP => 8,
            _ => 0,
        };
        let total = ihl + l4_len + self.payload.len();
        let mut f = Vec::with_capacity(ETH_HLEN + total);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let ip_start = f.len();
        f.push(0x40 | (ihl / 4) as u8);
        f.push(0);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&0x1234u16.to_be_bytes());
        f.extend_from_slice(&self.frag_off.to_be_bytes());
        f.push(64);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.ip().octets());
        f.extend_from_slice(&self.dst.ip().octets());
        f.extend_from_slice(&self.ip_options);
        let ip_csum = checksum(&f[ip_start..ip_start + ihl], 0);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_csum.to_be_bytes());
        let l4_start = f.len();
        f.extend_from_slice(&self.src.port().to_be_bytes());
        f.extend_from_slice(&self.dst.port().to_be_bytes());
        match self.proto {
            IPPROTO_TCP => {
                f.extend_from_slice(&1000u32.to_be_bytes()); // seq
                let ack = if self.tcp_flags & TCP_ACK != 0 {
                    2000u32
                } else {
                    0
                };
                f.extend_from_slice(&ack.to_be_bytes());
                f.push(5 << 4);
                f.push(self.tcp_flags);
                f.extend_from_slice(&64240u16.to_be_bytes()); // window
                f.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            }
            IPPROTO_UDP => {
                f.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                f.extend_from_slice(&[0, 0]);
            }
            _ => {}
        }
        f.extend_from_slice(&self.payload);
        let csum_at = match self.proto {
            IPPROTO_TCP => Some(l4_start + 16),
            IPPROTO_UDP if !self.udp_no_checksum => Some(l4_start + 6),
            _ => None,
        };
        if let Some(at) = csum_at {
            let pseudo = pseudo_header_sum(
                *self.src.ip(),
                *self.dst.ip(),
                self.proto,
                f.len() - l4_start,
            );
            let mut csum = checksum(&f[l4_start..], pseudo);
            if csum == 0 && self.proto == IPPROTO_UDP {
                csum = 0xffff;
            }
            f[at..at + 2].copy_from_slice(&csum.to_be_bytes());
        }
        f
    }
}

/// What a frame says, after its checksums were verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub l4: L4,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: Vec<u8>,
    },
    /// `checksum` is false when the datagram carries none (zero).
    Udp {
        sport: u16,
        dport: u16,
        checksum: bool,
        payload: Vec<u8>,
    },
    /// ICMP destination unreachable quoting the offending datagram.
    Unreachable {
        code: u8,
        quoted_src: SocketAddrV4,
        quoted_dst: SocketAddrV4,
        quoted_proto: u8,
    },
    Other(u8),
}

impl Frame {
    /// Source address and port (TCP/UDP).
    pub fn src(&self) -> Option<SocketAddrV4> {
        match self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => {
                Some(SocketAddrV4::new(self.src_ip, sport))
            }
            _ => None,
        }
    }

    /// Destination address and port (TCP/UDP).
    pub fn dst(&self) -> Option<SocketAddrV4> {
        match self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => {
                Some(SocketAddrV4::new(self.dst_ip, dport))
            }
            _ => None,
        }
    }
}

/// Reads an Ethernet/IPv4 frame, verifying the IP checksum, total length and the TCP, UDP or
/// ICMP checksum. `Err` says what is wrong.
pub fn read(frame: &[u8]) -> Result<Frame, String> {
    if frame.len() < ETH_HLEN + 20 {
        return Err(format!(
            "{} bytes: too short for Ethernet and IPv4",
            frame.len()
        ));
    }
    if frame[12..14] != [0x08, 0x00] {
        return Err("not IPv4".into());
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return Err(format!(
            "bad IPv4 header: version/ihl {:#x}, total length {total}",
            ip[0]
        ));
    }
    if checksum(&ip[..ihl], 0) != 0 {
        return Err("IPv4 header checksum is wrong".into());
    }
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let l4 = &ip[ihl..total];
    let l4_csum_ok = || checksum(l4, pseudo_header_sum(src_ip, dst_ip, proto, l4.len())) == 0;
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    let l4 = match proto {
        IPPROTO_TCP => {
            if l4.len() < 20 {
                return Err("TCP header truncated".into());
            }
            if !l4_csum_ok() {
                return Err("TCP checksum is wrong".into());
            }
            let data_off = usize::from(l4[12] >> 4) * 4;
            L4::Tcp {
                sport: port(0),
                dport: port(2),
                flags: l4[13],
                payload: l4[data_off..].to_vec(),
            }
        }
        IPPROTO_UDP => {
            if l4.len() < 8 {
                return Err("UDP header truncated".into());
            }
            let has_checksum = port(6) != 0;
            if has_checksum && !l4_csum_ok() {
                return Err("UDP checksum is wrong".into());
            }
            L4::Udp {
                sport: port(0),
                dport: port(2),
                checksum: has_checksum,
                payload: l4[8..].to_vec(),
            }
        }
        IPPROTO_ICMP => {
            if l4.len() < 8 + 20 + 8 {
                return Err("ICMP message too short to quote a datagram".into());
            }
            if checksum(l4, 0) != 0 {
                return Err("ICMP checksum is wrong".into());
            }
            if l4[0] != 3 {
                L4::Other(proto)
            } else {
                let quoted = &l4[8..];
                let qihl = usize::from(quoted[0] & 0x0f) * 4;
                let qport =
                    |at: usize| u16::from_be_bytes([quoted[qihl + at], quoted[qihl + at + 1]]);
                L4::Unreachable {
                    code: l4[1],
                    quoted_src: SocketAddrV4::new(
                        Ipv4Addr::new(quoted[12], quoted[13], quoted[14], quoted[15]),
                        qport(0),
                    ),
                    quoted_dst: SocketAddrV4::new(
                        Ipv4Addr::new(quoted[16], quoted[17], quoted[18], quoted[19]),
                        qport(2),
                    ),
                    quoted_proto: quoted[9],
                }
            }
        }
        other => L4::Other(other),
    };
    let mac = |at: usize| <[u8; 6]>::try_from(&frame[at..at + 6]).expect("6 bytes");
    Ok(Frame {
        dst_mac: mac(0),
        src_mac: mac(6),
        src_ip,
        dst_ip,
        l4,
    })
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    sum_words(&pseudo)
}

fn sum_words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// The Internet checksum of `bytes` on top of a partial sum; 0 when `bytes` already holds a
/// correct checksum field.
pub fn checksum(bytes: &[u8], partial: u32) -> u16 {
    let mut sum = u64::from(partial) + u64::from(sum_words(bytes));
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_read_back_with_valid_checksums() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 40000);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80);
        let frame = tcp(a, b, TCP_SYN).frame_len(64).build();
        assert_eq!(frame.len(), 64);
        let read = read(&frame).expect("valid frame");
        assert_eq!((read.src(), read.dst()), (Some(a), Some(b)));
        let frame = udp(a, b, b"hello").build();
        assert!(
            matches!(read_l4(&frame), L4::Udp { checksum: true, ref payload, .. } if payload == b"hello")
        );
        let mut corrupted = frame.clone();
        *corrupted.last_mut().unwrap() ^= 0xff;
        assert_eq!(
            super::read(&corrupted),
            Err("UDP checksum is wrong".to_string())
        );
    }

    fn read_l4(frame: &[u8]) -> L4 {
        read(frame).expect("valid frame").l4
    }
}
