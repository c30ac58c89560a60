//! Client side of the lab's traffic: short TCP connections, persistent ones, UDP requests. Each
//! answer is the name of the backend that served it.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Connects, asks once, closes; returns the backend's name.
pub fn tcp_request(to: SocketAddrV4) -> Result<String> {
    Connection::open(to)?.ask()
}

/// Connects from `local` (a fixed address and port), asks once, closes with RST so the port
/// is free again at once; returns the backend's name. For tests that reuse a tuple on purpose.
pub fn tcp_request_from(local: SocketAddrV4, to: SocketAddrV4) -> Result<String> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("socket")?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&local.into())
        .with_context(|| format!("bind {local}"))?;
    socket
        .connect_timeout(&to.into(), TIMEOUT)
        .with_context(|| format!("connect tcp {to} from {local}"))?;
    socket.set_linger(Some(std::time::Duration::ZERO))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut conn = Connection {
        reader: BufReader::new(stream.try_clone()?),
        local: stream.local_addr()?,
        stream,
    };
    conn.ask()
}

/// An HTTP GET (keel-echo answers it): the backend's name and the client address it saw
/// (its `X-Client` header).
pub fn http_get(to: SocketAddrV4) -> Result<(String, String)> {
    let mut stream = TcpStream::connect_timeout(&to.into(), TIMEOUT)
        .with_context(|| format!("connect tcp {to}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer)
        .with_context(|| format!("read the answer of {to}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer from {to}: {answer:?}"))?;
    let client = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Client: "))
        .with_context(|| format!("no X-Client header from {to}: {head:?}"))?;
    Ok((body.trim().to_owned(), client.to_owned()))
}

/// Sends one datagram and returns the backend's name from the answer.
pub fn udp_request(to: SocketAddrV4) -> Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("bind udp")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket
        .connect(to)
        .with_context(|| format!("connect udp {to}"))?;
    socket.send(b"hello\n").context("send")?;
    let mut buf = [0u8; 256];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no answer from udp {to}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// Sends one datagram from an unconnected socket and returns the backend's name and the
/// address the answer came from (what a resolver checks against where it sent the query).
pub fn udp_request_unconnected(to: SocketAddrV4) -> Result<(String, SocketAddr)> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("bind udp")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(b"hello\n", to).context("send")?;
    let mut buf = [0u8; 256];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no answer from udp {to}"))?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
}

/// A persistent TCP connection that can ask many times.
pub struct Connection {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    pub local: SocketAddr,
}

impl Connection {
    pub fn open(to: SocketAddrV4) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&to.into(), TIMEOUT)
            .with_context(|| format!("connect tcp {to}"))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            stream,
            local,
        })
    }

    /// The peer as the socket reports it (getpeername).
    pub fn peer(&self) -> Result<SocketAddr> {
        Ok(self.stream.peer_addr()?)
    }

    /// Sends a line and returns the answer line (the backend's name).
    pub fn ask(&mut self) -> Result<String> {
        self.stream.write_all(b"hello\n").context("send")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("receive")? == 0 {
            bail!("connection closed by the peer");
        }
        Ok(line.trim().to_owned())
    }
}
