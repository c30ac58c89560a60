//! Backends for the cluster benchmark: a TCP server answering every line with its name (async,
//! so thousands of connections a second cost no thread each), a UDP sink that counts
//! datagrams, and iperf3 for throughput. Each runs inside a backend pod's network namespace.

use std::{
    net::{SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    process::Child,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use anyhow::{Context, Result};
use node_agent_netns::netns::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Port iperf3 listens on in the backend pods.
pub const IPERF_PORT: u16 = 5201;

/// A backend's servers; they run until the process exits.
pub struct BenchBackend {
    udp_received: Arc<AtomicU64>,
    iperf: Option<Child>,
}

impl BenchBackend {
    /// Starts the TCP server and UDP sink on `addr` in `ns`, and iperf3 if `iperf`.
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str, iperf: bool) -> Result<Self> {
        let reply: Arc<[u8]> = format!("{name}\n").into_bytes().into();
        let listener = ns
            .run(move || -> Result<std::net::TcpListener> {
                let listener = std::net::TcpListener::bind(addr)?;
                // A deep accept queue: the load generator opens thousands of connections a
                // second. listen(2) again only raises the backlog.
                // SAFETY: listen on a socket we own.
                if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                Ok(listener)
            })?
            .with_context(|| format!("listen on {addr}"))?;
        thread::spawn(move || serve_tcp(listener, reply));

        let udp = ns
            .run(move || UdpSocket::bind(addr))?
            .with_context(|| format!("bind udp {addr}"))?;
        let udp_received = Arc::new(AtomicU64::new(0));
        let counter = udp_received.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while udp.recv(&mut buf).is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });

        let iperf = if iperf {
            let child = ns
                .command("iperf3")?
                .args(["-s", "-p", &IPERF_PORT.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("start iperf3 -s (`cargo xtask setup` installs it)")?;
            Some(child)
        } else {
            None
        };
        Ok(Self {
            udp_received,
            iperf,
        })
    }

    /// Datagrams the UDP sink received so far.
    pub fn udp_received(&self) -> u64 {
        self.udp_received.load(Ordering::Relaxed)
    }
}

impl Drop for BenchBackend {
    fn drop(&mut self) {
        if let Some(mut child) = self.iperf.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn serve_tcp(listener: std::net::TcpListener, reply: Arc<[u8]>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let reply = reply.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut buf = [0u8; 512];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            // One answer per request line.
                            let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
                            for _ in 0..lines {
                                if stream.write_all(&reply).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            });
        }
    });
}
