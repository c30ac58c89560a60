//! Container probes as kubelet runs them: exec (in the container, through runc), tcpSocket
//! and httpGet (from inside the pod's network namespace, to the pod's address). A probe keeps
//! its counters and turns success or failure only after `successThreshold` or
//! `failureThreshold` results in a row.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::Probe as ProbeSpec, apimachinery::pkg::util::intstr::IntOrString,
};

use crate::runtime::Runtime;

/// Which probe, for the messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

/// One probe of one container, with its state.
#[derive(Clone, Debug)]
pub struct Probe {
    pub kind: Kind,
    spec: ProbeSpec,
    successes: i32,
    failures: i32,
    /// The probe's verdict so far (`None` before the first one).
    pub passing: Option<bool>,
    next: Instant,
    pub last_message: String,
}

impl Probe {
    pub fn new(kind: Kind, spec: ProbeSpec, started: Instant) -> Self {
        let delay = Duration::from_secs(spec.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        Self {
            kind,
            spec,
            successes: 0,
            failures: 0,
            passing: None,
            next: started + delay,
            last_message: String::new(),
        }
    }

    fn period(&self) -> Duration {
        Duration::from_secs(self.spec.period_seconds.unwrap_or(10).max(1) as u64)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.spec.timeout_seconds.unwrap_or(1).max(1) as u64)
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// Runs the probe once (blocking) and updates the verdict; returns it.
    pub fn run(&mut self, target: &Target) -> Option<bool> {
        self.next = Instant::now() + self.period();
        let before = self.passing;
        let result = self.attempt(target);
        match result {
            Ok(()) => {
                self.successes += 1;
                self.failures = 0;
                self.last_message.clear();
                if self.successes >= self.spec.success_threshold.unwrap_or(1).max(1) {
                    self.passing = Some(true);
                }
            }
            Err(message) => {
                self.failures += 1;
                self.successes = 0;
                if self.passing == Some(false) && message != self.last_message {
                    // Still failing, for another reason now (a timeout after a refusal, ...).
                    tracing::info!(
                        container = target.container_id,
                        probe = ?self.kind,
                        output = %message,
                        "probe still failing"
                    );
                }
                self.last_message = message;
                if self.failures >= self.spec.failure_threshold.unwrap_or(3).max(1) {
                    self.passing = Some(false);
                }
            }
        }
        if self.passing != before {
            // What kubelet reports as a probe event: the verdict and why.
            tracing::info!(
                container = target.container_id,
                probe = ?self.kind,
                passing = ?self.passing,
                output = %self.last_message,
                "probe verdict changed"
            );
        }
        self.passing
    }

    fn attempt(&self, target: &Target) -> Result<(), String> {
        let timeout = self.timeout();
        if let Some(exec) = &self.spec.exec {
            let command = exec.command.clone().unwrap_or_default();
            let (code, output) = target
                .runtime
                .exec(target.container_id, &command, timeout)
                .map_err(|e| e.to_string())?;
            return if code == 0 {
                Ok(())
            } else {
                Err(format!("exec {command:?} exited {code}: {}", output.trim()))
            };
        }
        if let Some(tcp) = &self.spec.tcp_socket {
            let port = port(&tcp.port, target)?;
            let addr = SocketAddr::from((target.pod_ip, port));
            return in_netns(target.netns, || {
                TcpStream::connect_timeout(&addr, timeout)
                    .map(drop)
                    .map_err(|e| format!("tcp {addr}: {e}"))
            });
        }
        if let Some(http) = &self.spec.http_get {
            let port = port(&http.port, target)?;
            let addr = SocketAddr::from((target.pod_ip, port));
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            return in_netns(target.netns, || http_get(addr, &path, timeout));
        }
        Err("the probe has no handler (exec, tcpSocket or httpGet)".into())
    }
}

/// What a probe runs against.
pub struct Target<'a> {
    pub runtime: &'a Runtime,
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub pod_ip: Ipv4Addr,
    /// The container's named ports.
    pub ports: &'a [(String, u16)],
}

fn port(port: &IntOrString, target: &Target) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("port {p} is out of range")),
        IntOrString::String(name) => target
            .ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .ok_or_else(|| format!("the container has no port named {name:?}")),
    }
}

/// Runs `f` on a thread inside the network namespace at `netns`.
pub fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, String> {
    let file = std::fs::File::open(netns).map_err(|e| format!("open {}: {e}", netns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a descriptor we own, on a thread of our own.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!(
                        "enter the pod's network namespace: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err("the probe thread panicked".into()))
    })
}

/// An HTTP/1.1 GET; success is a status in 200..400, as kubelet counts it.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("http {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/keel\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("http {addr}: {e}"))?;
    let mut head = [0u8; 64];
    let n = stream
        .read(&mut head)
        .map_err(|e| format!("http {addr}: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("http {addr}{path}: not an HTTP answer"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("http {addr}{path}: status {code}"))
    }
}
