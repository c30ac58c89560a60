//! The load generator: many connections in flight from one client thread (tokio, current
//! thread), as a network engineer's tool would keep them.
//!
//! Short connections close with RST (SO_LINGER 0), so neither end keeps TIME_WAIT and no tuple
//! is refused by PAWS when the port range comes round again; sources are spread over several
//! client addresses and ports are allocated at connect time (IP_BIND_ADDRESS_NO_PORT), so
//! conntrack's closed entries do not cap the rate. Every run counts its errors and timeouts.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::timeout,
};

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Latencies of one run, microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies(Vec<u32>);

impl Latencies {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_micros().min(u128::from(u32::MAX)) as u32);
    }

    pub fn merge(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// The `q` quantile (0..=1) in microseconds; 0 without samples.
    pub fn quantile(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() - 1) as f64 * q).round() as usize;
        f64::from(self.0[i])
    }
}

/// The median of `values` (0 for none); sorts them.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// What a timed run did.
#[derive(Debug, Default, Clone)]
pub struct Run {
    /// Completed operations (connections or requests).
    pub done: u64,
    /// Failed operations (refused, reset, timed out).
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies: Latencies,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Short connections for `duration` with `concurrency` in flight, spread over `targets` and
/// `sources`: connect, send a line, read the answer line, close with RST. Latency is from
/// connect to answer.
pub fn connections(
    targets: &[SocketAddrV4],
    sources: &[Ipv4Addr],
    concurrency: usize,
    duration: Duration,
) -> Run {
    runtime().block_on(async {
        let start = Instant::now();
        let deadline = start + duration;
        let tasks: Vec<_> = (0..concurrency)
            .map(|i| {
                let source = sources[i % sources.len()];
                let target = targets[i % targets.len()];
                tokio::spawn(async move {
                    let mut run = Run::default();
                    while Instant::now() < deadline {
                        let began = Instant::now();
                        match timeout(IO_TIMEOUT, one_connection(target, source)).await {
                            Ok(Ok(())) => {
                                run.done += 1;
                                run.latencies.push(began.elapsed());
                            }
                            _ => run.errors += 1,
                        }
                    }
                    run
                })
            })
            .collect();
        let mut total = Run::default();
        for task in tasks {
            let run = task.await.expect("load task");
            total.done += run.done;
            total.errors += run.errors;
            total.latencies.merge(run.latencies);
        }
        total.elapsed = start.elapsed();
        total
    })
}

/// Short connections started at `rate` per second for `duration` (an open loop: each starts
/// on schedule, whatever the ones before it do), spread over `targets` and `sources`; the run
/// ends when the last one has. For measuring what a connection costs at a load every mode
/// carries.
pub fn paced_connections(
    targets: &[SocketAddrV4],
    sources: &[Ipv4Addr],
    rate: f64,
    duration: Duration,
) -> Run {
    runtime().block_on(async {
        let start = Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        // The timer wakes at most every millisecond: late ticks fire at once, so the rate
        // holds on average.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = tokio::task::JoinSet::new();
        let mut i = 0usize;
        while start.elapsed() < duration {
            ticks.tick().await;
            let (target, source) = (targets[i % targets.len()], sources[i % sources.len()]);
            i += 1;
            tasks.spawn(async move {
                let began = Instant::now();
                let ok = matches!(
                    timeout(IO_TIMEOUT, one_connection(target, source)).await,
                    Ok(Ok(()))
                );
                (ok, began.elapsed())
            });
        }
        let mut run = Run::default();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((true, latency)) => {
                    run.done += 1;
                    run.latencies.push(latency);
                }
                _ => run.errors += 1,
            }
        }
        run.elapsed = start.elapsed();
        run
    })
}

async fn one_connection(target: SocketAddrV4, source: Ipv4Addr) -> Result<()> {
    let socket = TcpSocket::new_v4()?;
    set_bind_address_no_port(&socket)?;
    #[expect(
        deprecated,
        reason = "a zero linger never blocks: close sends RST at once"
    )]
    socket.set_linger(Some(Duration::ZERO))?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    let mut stream = socket.connect(target.into()).await?;
    stream.set_nodelay(true)?;
    ask(&mut stream).await
}

async fn ask(stream: &mut TcpStream) -> Result<()> {
    stream.write_all(b"hello\n").await?;
    let mut buf = [0u8; 128];
    let mut got = 0;
    loop {
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            bail!("closed before answering");
        }
        got += n;
        if buf[..got].contains(&b'\n') {
            return Ok(());
        }
        if got == buf.len() {
            bail!("answer too long");
        }
    }
}

/// Requests on `concurrency` persistent connections for `duration`: send a line, read the
/// answer, again. Latency is per request.
pub fn requests(target: SocketAddrV4, concurrency: usize, duration: Duration) -> Run {
    runtime().block_on(async {
        let start = Instant::now();
        let deadline = start + duration;
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                tokio::spawn(async move {
                    let mut run = Run::default();
                    let Ok(Ok(mut stream)) = timeout(IO_TIMEOUT, TcpStream::connect(target)).await
                    else {
                        run.errors += 1;
                        return run;
                    };
                    let _ = stream.set_nodelay(true);
                    while Instant::now() < deadline {
                        let began = Instant::now();
                        match timeout(IO_TIMEOUT, ask(&mut stream)).await {
                            Ok(Ok(())) => {
                                run.done += 1;
                                run.latencies.push(began.elapsed());
                            }
                            _ => {
                                run.errors += 1;
                                break;
                            }
                        }
                    }
                    run
                })
            })
            .collect();
        let mut total = Run::default();
        for task in tasks {
            let run = task.await.expect("load task");
            total.done += run.done;
            total.errors += run.errors;
            total.latencies.merge(run.latencies);
        }
        total.elapsed = start.elapsed();
        total
    })
}

/// Sends `payload`-byte datagrams to `target` from `sockets` sockets as fast as the stack takes
/// them for `duration`; returns how many were sent.
pub fn udp_flood(
    target: SocketAddrV4,
    sockets: usize,
    payload: usize,
    duration: Duration,
) -> Result<u64> {
    let sockets: Vec<UdpSocket> = (0..sockets)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(target)?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()
        .context("udp sockets")?;
    let data = vec![0x5a; payload];
    let deadline = Instant::now() + duration;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        for s in &sockets {
            for _ in 0..64 {
                if s.send(&data).is_ok() {
                    sent += 1;
                }
            }
        }
    }
    Ok(sent)
}

/// Connects with the source port left to connect(), so many destinations can share ports.
fn set_bind_address_no_port(socket: &TcpSocket) -> Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and an int option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
    }
    Ok(())
}

/// One iperf3 TCP stream from inside `ns` (the client pod) to `target` for `secs`; Gbit/s
/// received.
pub fn iperf(ns: &node_agent_netns::netns::Netns, target: SocketAddrV4, secs: u32) -> Result<f64> {
    let output = ns
        .command("iperf3")?
        .args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
        ])
        .args(["-t", &secs.to_string(), "-J"])
        .output()
        .context("run iperf3 -c")?;
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("iperf3 -J output")?;
    if let Some(error) = json.get("error") {
        bail!("iperf3: {error}");
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's output")?;
    Ok(bps / 1e9)
}
