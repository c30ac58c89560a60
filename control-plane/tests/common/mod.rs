//! A control-plane process for tests: free port, its own state directory, killed on drop; and
//! an HTTPS client that trusts its CA and presents its token.

#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod agent;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use control_plane::launch::Process;

pub fn venv_bin(tool: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/venv/bin")
        .join(tool);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (it installs kubectl and the Python client)",
        path.display()
    );
    path
}

/// A control plane on a free port with its own state directory; killed on drop.
pub struct ControlPlane {
    process: Process,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts a control plane; `{dir}` in `store` becomes a directory of the test's own.
    pub fn start(store: &str, extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), store, extra)
    }

    /// Starts another control plane of the same cluster as `other` (its CA and tokens copied,
    /// as to a second host), on `store`.
    pub fn start_beside(other: &ControlPlane, store: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        for file in [
            "ca.crt",
            "ca.key",
            "token",
            "node-token",
            "service-account.key",
        ] {
            std::fs::copy(other.dir.path().join("state").join(file), state.join(file)).unwrap();
        }
        Self::start_in(dir, store, extra)
    }

    fn start_in(dir: tempfile::TempDir, store: &str, extra: &[&str]) -> Self {
        let store = store.replace("{dir}", &dir.path().join("store").display().to_string());
        let process = Process::start(
            Path::new(env!("CARGO_BIN_EXE_control-plane")),
            &store,
            dir.path(),
            extra,
        )
        .unwrap();
        let kubeconfig = process.kubeconfig.clone();
        Self {
            process,
            dir,
            kubeconfig,
        }
    }

    pub fn process(&self) -> &Process {
        &self.process
    }

    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Stops the process (as a crash would) and starts it again on the same state and port.
    pub fn restart(&mut self) {
        self.process.restart().unwrap();
    }

    /// Stops the process (as a crash would), replaces its store by an empty one, and starts
    /// it again on the same credentials and port.
    pub fn replace_store(&mut self) {
        self.process.kill();
        std::fs::remove_dir_all(self.dir.path().join("store")).unwrap();
        self.process.resume().unwrap();
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(venv_bin("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "kubectl {} failed:\n{stdout}\n{stderr}",
            args.join(" ")
        );
        stdout.into_owned()
    }

    /// Runs kubectl, which must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            !out.status.success(),
            "kubectl {} should have failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn file(&self, name: &str, content: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }
}

/// Runs `f` with the endpoint of an etcd started for it (Debian's etcd-server, installed by
/// `cargo xtask setup`) and stops etcd afterwards.
pub fn with_etcd<T>(f: impl FnOnce(&str) -> T) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = runtime
        .block_on(control_plane_store::etcd_process::EtcdProcess::start())
        .expect("start etcd");
    let result = f(&etcd.endpoint);
    drop(etcd);
    result
}

/// Runs a scenario `fn(store: &str)` once on the embedded store and once on etcd, as two tests.
#[macro_export]
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(#[test]
            fn $scenario() {
                super::$scenario("embedded:{dir}");
            })*
        }
        mod etcd {
            $(#[test]
            fn $scenario() {
                $crate::common::with_etcd(|endpoint| super::$scenario(&format!("etcd:{endpoint}")));
            })*
        }
    };
}

/// An HTTPS client of a control plane (`control_plane::launch::Api`) that fails the test when a
/// request cannot be sent.
pub struct Api(pub control_plane::launch::Api);

impl Api {
    pub fn new(cp: &ControlPlane) -> Self {
        Self(control_plane::launch::Api::new(&cp.process).expect("an API client"))
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.0.request(method, path)
    }

    /// A PATCH of `content_type`: (status, JSON body).
    pub async fn patch(
        &self,
        path: &str,
        content_type: &str,
        patch: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = self
            .request(reqwest::Method::PATCH, path)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(patch.to_string())
            .send()
            .await
            .expect("PATCH");
        let code = resp.status().as_u16();
        (code, resp.json().await.expect("a JSON answer"))
    }

    /// Sends and returns (status, JSON body).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.0.call(method, path, body).await.expect("request")
    }
}

/// The runtime the tests drive the control plane from.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Reads watch events until `n` arrived (or `secs` passed).
pub async fn events(resp: reqwest::Response, n: usize, secs: u64) -> Vec<serde_json::Value> {
    use futures::StreamExt;
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while out.len() < n {
        let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, stream.next()).await else {
            break;
        };
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            out.push(serde_json::from_slice(&line).unwrap());
        }
    }
    out
}
