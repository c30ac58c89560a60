//! A throw-away etcd (Debian's `etcd-server`) for tests and benchmarks: free loopback ports, a
//! data directory of its own, stopped and removed on drop.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{EtcdStore, Store};

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
        let (client, peer) = (free_port()?, free_port()?);
        let dir = std::env::temp_dir().join(format!("keel-etcd-{}-{client}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
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
            if let Ok(store) = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)).await
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
