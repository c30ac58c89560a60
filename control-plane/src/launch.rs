//! Starting a `control-plane` process and waiting until it serves, with its own state
//! directory and free ports; stopped on drop. And [`Api`], the HTTPS client tests and
//! benchmarks talk to it with.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use control_plane_apiserver::kubeconfig::Kubeconfig;

pub struct Process {
    child: Child,
    binary: PathBuf,
    args: Vec<String>,
    /// Where it writes its kubeconfig.
    pub kubeconfig: PathBuf,
    /// `host:port` of the API.
    pub listen: String,
    /// `https://host:port` of the node feed.
    pub feed_url: String,
    /// The node token's file.
    pub node_token: PathBuf,
}

impl Process {
    /// Starts `binary` on `store` (`embedded:<dir>` or `etcd:<endpoints>`), keeping its state
    /// under `state_dir`, with `extra` arguments, serving on loopback.
    pub fn start(binary: &Path, store: &str, state_dir: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_on(binary, store, state_dir, Ipv4Addr::LOCALHOST.into(), extra)
    }

    /// As [`Process::start`], serving the API and the feed on free ports of `host` (an
    /// address node agents in other network namespaces can reach).
    pub fn start_on(
        binary: &Path,
        store: &str,
        state_dir: &Path,
        host: IpAddr,
        extra: &[&str],
    ) -> Result<Self> {
        let start = || -> Result<Self> {
            let listen = SocketAddr::new(host, free_port(host)?).to_string();
            let feed = SocketAddr::new(host, free_port(host)?).to_string();
            let kubeconfig = state_dir.join("kubeconfig");
            let mut args: Vec<String> = vec![
                "--store".into(),
                store.into(),
                "--listen".into(),
                listen.clone(),
            ];
            args.extend(["--kubeconfig".into(), kubeconfig.display().to_string()]);
            args.extend([
                "--state-dir".into(),
                state_dir.join("state").display().to_string(),
            ]);
            args.extend(["--feed-listen".into(), feed.clone()]);
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            let child = spawn(binary, &args)?;
            Ok(Self {
                child,
                binary: binary.to_owned(),
                args,
                kubeconfig,
                listen,
                feed_url: format!("https://{feed}"),
                node_token: state_dir.join("state").join("node-token"),
            })
        };
        // A port that is free now may be taken before the child binds it: another start
        // retries with other ports.
        for _ in 1..5 {
            match start() {
                Err(e) if format!("{e:#}").contains("Address already in use") => continue,
                outcome => return outcome,
            }
        }
        start()
    }

    /// Kills the process (as a crash would) and starts it again on the same state and port.
    pub fn restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.binary, &self.args)?;
        Ok(())
    }

    pub fn config(&self) -> Result<Kubeconfig> {
        Kubeconfig::read(&self.kubeconfig)
    }

    /// A client of the node feed with the bootstrap token (the CA, the node token): it can
    /// register nodes, nothing else.
    pub async fn node_feed(&self) -> Result<control_plane_api::FeedClient> {
        control_plane_api::connect(&self.feed_url, &self.config()?.ca_pem, &self.token()?).await
    }

    fn token(&self) -> Result<String> {
        let token = std::fs::read_to_string(&self.node_token)
            .with_context(|| format!("read {}", self.node_token.display()))?;
        Ok(token.trim().to_owned())
    }

    /// Registers a node as a node agent does ([`control_plane_api::join`]): its client, the
    /// registration's answer, and its identity (to connect again with).
    pub async fn join(
        &self,
        request: control_plane_api::feed::RegisterRequest,
    ) -> Result<(
        control_plane_api::FeedClient,
        control_plane_api::feed::RegisterResponse,
        control_plane_api::NodeIdentity,
    )> {
        let ca = self.config()?.ca_pem;
        control_plane_api::join(&self.feed_url, &ca, &self.token()?, request).await
    }

    /// A client of the feed as the node `identity` is (after [`Process::join`]).
    pub async fn as_node(
        &self,
        identity: &control_plane_api::NodeIdentity,
    ) -> Result<control_plane_api::FeedClient> {
        control_plane_api::connect_as_node(&self.feed_url, &self.config()?.ca_pem, identity).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where node agents of a lab keep their feed identities (`--feed-credentials-dir`):
    /// beside this control plane's state, removed with it.
    pub fn node_credentials_dir(&self) -> PathBuf {
        self.node_token.with_file_name("node-credentials")
    }

    /// The control plane's CA, as node agents are given it (`--feed-ca`).
    pub fn ca_file(&self) -> PathBuf {
        self.node_token.with_file_name("ca.crt")
    }

    /// Kills the process, as a crash would; [`Process::resume`] starts it again.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed process again on the same state and ports.
    pub fn resume(&mut self) -> Result<()> {
        self.child = spawn(&self.binary, &self.args)?;
        Ok(())
    }
}

/// An HTTPS client of a control plane, from the kubeconfig it wrote: it trusts the control
/// plane's CA and presents the admin token.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub server: String,
    pub token: String,
}

impl Api {
    pub fn new(process: &Process) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = process.config()?;
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(config.ca_pem.as_bytes())?])
            .build()?;
        Ok(Self {
            http,
            server: config.server,
            token: config.token,
        })
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.server))
            .bearer_auth(&self.token)
    }

    /// Sends `body` (JSON) and returns the status and the JSON answer (`null` if not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let mut req = self.request(method.clone(), path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }
}

/// A port of `host` that is free now, below Linux's ephemeral range (32768-60999), where the
/// source ports of other processes' connections cannot take it before the control plane binds.
fn free_port(host: IpAddr) -> Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..100 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let port = 10_000 + (hasher.finish() % 20_000) as u16;
        if TcpListener::bind((host, port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind((host, 0))?.local_addr()?.port())
}

/// Spawns and waits for the "serving" line (printed once the port is bound). Both outputs are
/// drained for the life of the process, so its logs can never block it.
fn spawn(binary: &Path, args: &[String]) -> Result<Child> {
    let mut child = Command::new(binary)
        .args(args)
        // Errors say why in their first lines; a backtrace (anyhow's, under a test's
        // RUST_BACKTRACE) would push those out of what is kept below. Panics keep theirs.
        .env("RUST_LIB_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", binary.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let recent = Arc::new(Mutex::new(VecDeque::new()));
    let lines = recent.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("control-plane: {line}");
            let mut lines = lines.lock().expect("not poisoned");
            if lines.len() == 50 {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    });
    // The API's line comes last: the feed is up by then too.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(line) if line.contains("serving the Kubernetes API") => break Ok(()),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = outcome {
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(100));
        let err = Vec::from(recent.lock().expect("not poisoned").clone()).join("\n");
        bail!("the control plane did not start ({e}):\n{err}");
    }
    Ok(child)
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
