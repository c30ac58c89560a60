//! Backends that say who they are: a TCP server answering every line it reads with its name,
//! and a UDP server answering every datagram with its name. Tests and the demo read the name to
//! learn which backend the data plane chose.

use std::{
    io::{BufRead, BufReader, Write},
    mem::MaybeUninit,
    net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::Arc,
    thread::{self, JoinHandle},
};

use anyhow::{Context, Result, bail};

/// TCP and UDP servers on one address and port. Dropping it stops them; [`EchoServer::stop`]
/// also says whether they ended cleanly.
pub struct EchoServer {
    tcp: TcpListener,
    udp: Arc<UdpSocket>,
    threads: Vec<JoinHandle<()>>,
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
        let accept = thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let reply = tcp_reply.clone();
                thread::spawn(move || serve_tcp(stream, &reply));
            }
        });
        let socket = udp.clone();
        let datagrams = thread::spawn(move || serve_udp(&socket, &reply));
        Ok(Self {
            tcp,
            udp,
            threads: vec![accept, datagrams],
        })
    }

    /// Stops both servers and waits for their threads; fails if one of them panicked.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        // Wakes the threads blocked in accept() and recv_from() so they end.
        // SAFETY: shutdown(2) on sockets we own.
        unsafe {
            libc::shutdown(self.tcp.as_raw_fd(), libc::SHUT_RDWR);
            libc::shutdown(self.udp.as_raw_fd(), libc::SHUT_RDWR);
        }
        let panicked = self
            .threads
            .drain(..)
            .map(JoinHandle::join)
            .filter(Result::is_err)
            .count();
        if panicked > 0 {
            bail!("{panicked} echo server thread(s) panicked");
        }
        Ok(())
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Datagrams longer than this are answered with the name followed by the datagram itself (an
/// answer as big as the question, for tests of fragmented datagrams).
pub const ECHO_ABOVE: usize = 512;

/// Answers datagrams until the socket is shut down. After shutdown(2) the kernel returns an
/// empty read with no source address, which std's `recv_from` treats as a broken invariant
/// (it panics); socket2 hands it back as an address that is not an IP one, and the loop ends.
fn serve_udp(socket: &UdpSocket, reply: &str) {
    let receiver = socket2::SockRef::from(socket);
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 65536];
    while let Ok((n, from)) = receiver.recv_from(&mut buf) {
        let Some(from) = from.as_socket() else { break };
        if n > ECHO_ABOVE {
            let mut answer = reply.as_bytes().to_vec();
            // SAFETY: recv_from initialised the first n bytes.
            answer.extend(buf[..n].iter().map(|b| unsafe { b.assume_init() }));
            let _ = socket.send_to(&answer, from);
        } else {
            let _ = socket.send_to(reply.as_bytes(), from);
        }
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

#[cfg(test)]
mod tests {
    use std::{io::Read, net::Ipv4Addr, time::Duration};

    use super::*;

    #[test]
    fn answers_then_stops_without_a_panic() {
        // A free port for both protocols on loopback.
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let server = EchoServer::start(addr, "echo-1").expect("start the echo server");

        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.send_to(b"who?", addr).unwrap();
        let mut buf = [0u8; 64];
        let n = client.recv(&mut buf).expect("a UDP answer");
        assert_eq!(&buf[..n], b"echo-1\n");

        let mut stream = TcpStream::connect(addr).expect("connect to the echo server");
        stream.write_all(b"who?\n").unwrap();
        let mut line = [0u8; 7];
        stream.read_exact(&mut line).expect("a TCP answer");
        assert_eq!(&line, b"echo-1\n");

        server
            .stop()
            .expect("the server's threads end cleanly when it stops");
    }
}
