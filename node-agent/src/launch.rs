//! Starting `node-agent run` processes for tests and benchmarks, and reading their HTTP
//! endpoints. The caller builds the command (so it can run inside a network namespace); the
//! process is killed on drop, and can be killed (as a crash would) and started again.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::http::Status;

type MakeCommand = Box<dyn Fn() -> Result<Command> + Send + Sync>;

pub struct AgentProcess {
    name: String,
    child: Child,
    make: MakeCommand,
    pub metrics_addr: SocketAddr,
    logs: Arc<Mutex<VecDeque<String>>>,
}

impl AgentProcess {
    /// Starts the command `make` builds (`node-agent run ... --metrics-addr <metrics_addr>`);
    /// its log lines are printed with `name` in front and the last ones kept for errors.
    pub fn start(
        name: &str,
        metrics_addr: SocketAddr,
        make: impl Fn() -> Result<Command> + Send + Sync + 'static,
    ) -> Result<Self> {
        let logs = Arc::new(Mutex::new(VecDeque::new()));
        let make: MakeCommand = Box::new(make);
        let child = spawn(name, &make, &logs)?;
        Ok(Self {
            name: name.to_owned(),
            child,
            make,
            metrics_addr,
            logs,
        })
    }

    /// Waits until `/healthz` answers 200 (the agent synced a complete view).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}):\n{}", self.name, self.recent_logs());
            }
            match get(self.metrics_addr, "/healthz") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("{code}: {}", body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} not healthy after {timeout:?} ({last}):\n{}",
            self.name,
            self.recent_logs()
        )
    }

    pub fn status(&self) -> Result<Status> {
        let (code, body) = get(self.metrics_addr, "/status")?;
        if code != 200 {
            bail!("/status answered {code}");
        }
        serde_json::from_str(&body).context("parse /status")
    }

    /// The `/metrics` page.
    pub fn metrics(&self) -> Result<String> {
        let (code, body) = get(self.metrics_addr, "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}: {body}");
        }
        Ok(body)
    }

    /// Kills the agent with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the agent again with the same command.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = spawn(&self.name, &self.make, &self.logs)?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn recent_logs(&self) -> String {
        Vec::from(self.logs.lock().expect("not poisoned").clone()).join("\n")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(name: &str, make: &MakeCommand, logs: &Arc<Mutex<VecDeque<String>>>) -> Result<Child> {
    let mut child = make()?
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {name}"))?;
    let stderr = child.stderr.take().expect("piped");
    let (logs, name) = (logs.clone(), name.to_owned());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{name}: {line}");
            let mut logs = logs.lock().expect("not poisoned");
            if logs.len() == 100 {
                logs.pop_front();
            }
            logs.push_back(line);
        }
    });
    Ok(child)
}

/// A plain HTTP GET; (status, body).
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("an HTTP response")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("an HTTP status line")?;
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Ok((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
