//! A throw-away etcd (Debian's `etcd-server`) for tests and benchmarks: free loopback ports, a
//! data directory of its own, stopped and removed on drop.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{EtcdOptions, EtcdStore, Store};

/// TLS on etcd's client port: its serving certificate and key, and the CA whose client
/// certificates it requires.
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

pub struct EtcdProcess {
    child: Child,
    pub endpoint: String,
    dir: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdProcess {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Result<Self> {
        Self::start_with(None, &EtcdOptions::default()).await
    }

    /// Starts etcd serving its clients over TLS with client certificates required, and waits
    /// until it answers a client configured as `client` says.
    pub async fn start_tls(server: &ServerTls, client: &EtcdOptions) -> Result<Self> {
        Self::start_with(Some(server), client).await
    }

    async fn start_with(tls: Option<&ServerTls>, options: &EtcdOptions) -> Result<Self> {
        let (client, peer) = (free_port()?, free_port()?);
        let dir = std::env::temp_dir().join(format!("keel-etcd-{}-{client}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new("etcd");
        if let Some(tls) = tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "keel", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("keel={peer_url}")])
            // Small history snapshots and no fsync batching games: this etcd lives for a test.
            .args(["--snapshot-count", "10000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start etcd (Debian's etcd-server; `cargo xtask setup` installs it)")?;
        let etcd = Self {
            child,
            endpoint,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(store) =
                EtcdStore::connect_with(std::slice::from_ref(&etcd.endpoint), options).await
                && store.revision().await.is_ok()
            {
                return Ok(etcd);
            }
            if Instant::now() > deadline {
                bail!("etcd did not answer on {} within 20 s", etcd.endpoint);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
