//! Backends that say who they are: a TCP server answering every line it reads with its name,
//! and a UDP server answering every datagram with its name. Tests and the demo read the name to
//! learn which backend the data plane chose.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::Arc,
    thread,
};

use anyhow::{Context, Result};

/// TCP and UDP servers on one address and port. Dropping it stops them.
pub struct EchoServer {
    tcp: TcpListener,
    udp: Arc<UdpSocket>,
}

impl EchoServer {
    /// Binds both servers on `addr` (in the calling thread's network namespace) and serves
    /// from background threads.
    pub fn start(addr: SocketAddrV4, name: &str) -> Result<Self> {
        let tcp = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
        let udp = Arc::new(UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?);
        let reply = Arc::<str>::from(format!("{name}\n"));
        let listener = tcp.try_clone()?;
        let tcp_reply = reply.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let reply = tcp_reply.clone();
                thread::spawn(move || serve_tcp(stream, &reply));
            }
        });
        let socket = udp.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                if n == 0 && from.port() == 0 {
                    break;
                }
                let _ = socket.send_to(reply.as_bytes(), from);
            }
        });
        Ok(Self { tcp, udp })
    }
}

fn serve_tcp(stream: TcpStream, reply: &str) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // Wakes the threads blocked in accept() and recv_from() so they end.
        // SAFETY: shutdown(2) on sockets we own.
        unsafe {
            libc::shutdown(self.tcp.as_raw_fd(), libc::SHUT_RDWR);
            libc::shutdown(self.udp.as_raw_fd(), libc::SHUT_RDWR);
        }
    }
}
