//! The control-plane benchmark: the `control-plane` binary on each store (embedded SQLite, and a
//! real etcd started for the run), driven over HTTPS as clients drive it.
//!
//! Per store and round: 32 clients, each with a connection of its own (HTTP/2 over TLS, bearer
//! token, as client-go connects), create pods back to back for the round's duration, while one
//! more client watches the namespace. Reported: creates per second, create latency p50/p99 (from
//! sending the request to its `201`), and watch latency p99: from sending a create to the
//! watching client reading its `ADDED` event, an upper bound on commit-to-watcher delay, since
//! the write commits somewhere inside its request. Stores are interleaved round by round so the
//! machine's noise hits both alike; each figure is the median over rounds.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use control_plane::launch::Process;
use control_plane_store::etcd_process::EtcdProcess;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::loadgen::{Latencies, median};

pub struct Options {
    pub clients: usize,
    pub round: Duration,
    pub rounds: usize,
}

impl Options {
    pub fn full() -> Self {
        Self {
            clients: 32,
            round: Duration::from_secs(10),
            rounds: 3,
        }
    }

    pub fn quick() -> Self {
        Self {
            clients: 32,
            round: Duration::from_secs(3),
            rounds: 1,
        }
    }
}

/// One store's figures (medians over rounds).
#[derive(Debug, Clone, Serialize)]
pub struct StoreResult {
    pub store: &'static str,
    pub writes_per_s: f64,
    pub create_p50_ms: f64,
    pub create_p99_ms: f64,
    pub watch_p50_ms: f64,
    pub watch_p99_ms: f64,
    /// Creates over all rounds, and those that failed (any answer but 201).
    pub creates: u64,
    pub errors: u64,
}

/// An HTTPS client of one control plane, with a connection of its own.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl Client {
    fn new(process: &Process) -> Result<Self> {
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

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.server))
            .bearer_auth(&self.token)
    }

    async fn create(&self, path: &str, body: &Value) -> Result<reqwest::StatusCode> {
        Ok(self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await?
            .status())
    }
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "spec": {"containers": [{
            "name": "c", "image": "registry.k8s.io/pause:3.10",
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}
        }]}
    })
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: EventObject,
}

#[derive(Deserialize)]
struct EventObject {
    metadata: Option<EventMeta>,
}

#[derive(Deserialize)]
struct EventMeta {
    name: Option<String>,
}

/// Watches `path` from `rv` and sends the name of every ADDED object with when it was read.
async fn watch(
    client: Client,
    path: String,
    rv: String,
    seen: mpsc::UnboundedSender<(String, Instant)>,
) -> Result<()> {
    let resp = client
        .request(
            reqwest::Method::GET,
            &format!("{path}?watch=1&resourceVersion={rv}"),
        )
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("watch {path}: {}", resp.status());
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        let now = Instant::now();
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let event: WatchEvent = serde_json::from_slice(&line).context("a watch event")?;
            if event.kind == "ADDED"
                && let Some(name) = event.object.metadata.and_then(|m| m.name)
                && seen.send((name, now)).is_err()
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// What one round on one store measured.
struct Round {
    creates: u64,
    errors: u64,
    rate: f64,
    create: Latencies,
    watch: Latencies,
}

/// One round: `clients` creating pods in a fresh namespace for `duration`, one watching it.
async fn round(
    process: &Process,
    namespace: &str,
    clients: usize,
    duration: Duration,
) -> Result<Round> {
    let admin = Client::new(process)?;
    let status = admin
        .create(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        )
        .await?;
    if status != reqwest::StatusCode::CREATED {
        bail!("create namespace {namespace}: {status}");
    }
    let pods = format!("/api/v1/namespaces/{namespace}/pods");
    let list: Value = admin
        .request(reqwest::Method::GET, &format!("{pods}?limit=1"))
        .send()
        .await?
        .json()
        .await?;
    let rv = list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .context("a list's resourceVersion")?
        .to_owned();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    // The watcher is a client of its own, on a thread of its own, as a controller would be: its
    // events never wait behind the 32 writers' tasks.
    let watcher_client = Client::new(process)?;
    let watch_path = pods.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = std::thread::spawn(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            tokio::select! {
                result = watch(watcher_client, watch_path, rv, seen_tx) => result,
                _ = stop_rx => Ok(()),
            }
        })
    });

    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = Client::new(process)?;
        let pods = pods.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut create = Latencies::default();
            let mut errors = 0u64;
            let mut i = 0;
            while Instant::now() < end {
                let name = format!("p{c}-{i}");
                i += 1;
                let body = pod(&name);
                let t = Instant::now();
                match client.create(&pods, &body).await {
                    Ok(reqwest::StatusCode::CREATED) => {
                        create.push(t.elapsed());
                        sent.push((name, t));
                    }
                    _ => errors += 1,
                }
            }
            (sent, create, errors, Instant::now())
        }));
    }
    let mut sent = HashMap::new();
    let mut create = Latencies::default();
    let mut errors = 0;
    let mut finished = start;
    for task in tasks {
        let (s, c, e, f) = task.await?;
        sent.extend(s);
        create.merge(c);
        errors += e;
        finished = finished.max(f);
    }
    let creates = sent.len() as u64;
    let rate = creates as f64 / (finished - start).as_secs_f64();

    let mut watch = Latencies::default();
    let mut missing = sent.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while missing > 0 {
        match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
            Ok(Some((name, at))) => {
                if let Some(t) = sent.get(&name) {
                    watch.push(at.saturating_duration_since(*t));
                    missing -= 1;
                }
            }
            _ => break,
        }
    }
    let _ = stop_tx.send(());
    if let Err(e) = watcher.join().expect("the watcher does not panic") {
        bail!("the watch failed: {e:#}");
    }
    if missing > 0 {
        bail!("the watcher never saw {missing} of {creates} created pods");
    }
    Ok(Round {
        creates,
        errors,
        rate,
        create,
        watch,
    })
}

fn ms(micros: f64) -> f64 {
    (micros / 10.0).round() / 100.0
}

/// The stores under test, each with a control plane on it.
struct Subject {
    name: &'static str,
    process: Process,
    rounds: Vec<Round>,
    _etcd: Option<EtcdProcess>,
}

/// The `control-plane` binary next to this one (`cargo xtask bench control-plane` builds both).
fn binary() -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("control-plane");
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p control-plane`",
            path.display()
        );
    }
    Ok(path)
}

/// Runs the benchmark on both stores; `progress` hears what it is doing.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Vec<StoreResult>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::Builder::new()
        .prefix("keel-bench-cp-")
        .tempdir()?;
    runtime.block_on(async {
        let binary = binary()?;
        progress("starting the control plane on the embedded store");
        let embedded = Process::start(
            &binary,
            &format!("embedded:{}", dir.path().join("sqlite").display()),
            &state(dir.path(), "embedded")?,
            &[],
        )?;
        progress("starting etcd and the control plane on it");
        let etcd = EtcdProcess::start().await?;
        let on_etcd = Process::start(
            &binary,
            &format!("etcd:{}", etcd.endpoint),
            &state(dir.path(), "etcd")?,
            &[],
        )?;
        let mut subjects = [
            Subject {
                name: "embedded",
                process: embedded,
                rounds: Vec::new(),
                _etcd: None,
            },
            Subject {
                name: "etcd",
                process: on_etcd,
                rounds: Vec::new(),
                _etcd: Some(etcd),
            },
        ];
        for s in &subjects {
            progress(&format!("{}: warming up", s.name));
            round(
                &s.process,
                "warm-up",
                opts.clients,
                Duration::from_millis(500),
            )
            .await?;
        }
        for r in 0..opts.rounds {
            for s in &mut subjects {
                progress(&format!(
                    "round {}/{}: {} store, {} clients creating pods",
                    r + 1,
                    opts.rounds,
                    s.name,
                    opts.clients
                ));
                let measured =
                    round(&s.process, &format!("round-{r}"), opts.clients, opts.round).await?;
                s.rounds.push(measured);
            }
        }
        Ok(subjects.into_iter().map(summarize).collect())
    })
}

fn state(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

fn summarize(mut s: Subject) -> StoreResult {
    let mut per_round = |f: &mut dyn FnMut(&mut Round) -> f64| -> f64 {
        let mut values: Vec<f64> = s.rounds.iter_mut().map(&mut *f).collect();
        median(&mut values)
    };
    StoreResult {
        store: s.name,
        writes_per_s: per_round(&mut |r| r.rate.round()),
        create_p50_ms: per_round(&mut |r| ms(r.create.quantile(0.5))),
        create_p99_ms: per_round(&mut |r| ms(r.create.quantile(0.99))),
        watch_p50_ms: per_round(&mut |r| ms(r.watch.quantile(0.5))),
        watch_p99_ms: per_round(&mut |r| ms(r.watch.quantile(0.99))),
        creates: s.rounds.iter().map(|r| r.creates).sum(),
        errors: s.rounds.iter().map(|r| r.errors).sum(),
    }
}

/// A Markdown table of the results.
pub fn markdown(results: &[StoreResult], clients: usize, machine: &str) -> String {
    let mut out = format!(
        "Control plane, {clients} concurrent clients creating pods over HTTPS; {machine}\n\n\
         | store | creates/s | create p50 ms | create p99 ms | watch p50 ms | watch p99 ms | creates | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            r.store,
            r.writes_per_s,
            r.create_p50_ms,
            r.create_p99_ms,
            r.watch_p50_ms,
            r.watch_p99_ms,
            r.creates,
            r.errors
        ));
    }
    out
}
