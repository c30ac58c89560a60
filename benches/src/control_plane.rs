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
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use control_plane::launch::{Api, Process};
use control_plane_api::{
    FeedClient,
    feed::{HeartbeatRequest, PodPhase, PodStatusReport, RegisterRequest, Resources},
    session,
    view::{Changes, View},
};
use control_plane_store::etcd_process::EtcdProcess;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{
    agents,
    loadgen::{Latencies, median},
    pods,
};

pub struct Options {
    pub clients: usize,
    pub round: Duration,
    pub rounds: usize,
    /// Pending pods the scheduler places, and the nodes it has.
    pub sched_pods: usize,
    pub nodes: usize,
    /// Pods turning ready per feed measurement.
    pub feed_samples: usize,
    /// Real node agents end to end.
    pub agents: agents::Options,
    /// Pods started on a cluster lab of real nodes.
    pub pods: usize,
}

impl Options {
    pub fn full() -> Self {
        Self {
            clients: 32,
            round: Duration::from_secs(10),
            rounds: 3,
            sched_pods: 5000,
            nodes: 100,
            feed_samples: 300,
            agents: agents::Options {
                agents: 10,
                services: 10_000,
                samples: 100,
                changes: 1000,
                change_rate: 100.0,
            },
            pods: 100,
        }
    }

    pub fn quick() -> Self {
        Self {
            clients: 32,
            round: Duration::from_secs(3),
            rounds: 1,
            sched_pods: 5000,
            nodes: 100,
            feed_samples: 100,
            agents: agents::Options {
                agents: 10,
                services: 10_000,
                samples: 30,
                changes: 300,
                change_rate: 100.0,
            },
            pods: 30,
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
struct Client(Api);

impl Client {
    fn new(process: &Process) -> Result<Self> {
        Ok(Self(Api::new(process)?))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.0.request(method, path)
    }

    /// Creates and returns the object as stored.
    async fn create_object(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if status != reqwest::StatusCode::CREATED {
            bail!("create at {path}: {status}: {body}");
        }
        Ok(body)
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
    spec: Option<EventSpec>,
}

#[derive(Deserialize)]
struct EventSpec {
    #[serde(rename = "nodeName")]
    node_name: Option<String>,
}

#[derive(Deserialize)]
struct EventMeta {
    name: Option<String>,
}

/// An ADDED event.
fn added(e: &WatchEvent) -> bool {
    e.kind == "ADDED"
}

/// A pod with a node.
fn bound(e: &WatchEvent) -> bool {
    e.object
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some()
}

/// Watches `path` from `rv` and sends the name of every object of a `selected` event, with when
/// it was read.
async fn watch(
    client: Client,
    path: String,
    rv: String,
    selected: fn(&WatchEvent) -> bool,
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
            if selected(&event)
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

/// A watching client on a thread of its own, as a controller would be: its events never wait
/// behind the writers' tasks.
struct Watcher {
    seen: mpsc::UnboundedReceiver<(String, Instant)>,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Watcher {
    fn start(
        process: &Process,
        path: &str,
        rv: String,
        selected: fn(&WatchEvent) -> bool,
    ) -> Result<Self> {
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let client = Client::new(process)?;
        let path = path.to_owned();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                tokio::select! {
                    result = watch(client, path, rv, selected, seen_tx) => result,
                    _ = stop_rx => Ok(()),
                }
            })
        });
        Ok(Self { seen, stop, thread })
    }

    /// When each of `names` was seen (waiting up to `secs`); fails if some never were.
    async fn wait_for(
        &mut self,
        names: &HashMap<String, Instant>,
        secs: u64,
    ) -> Result<HashMap<String, Instant>> {
        let mut at = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while at.len() < names.len() {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some((name, t))) => {
                    if names.contains_key(&name) {
                        at.entry(name).or_insert(t);
                    }
                }
                _ => bail!("the watcher saw {} of {} pods", at.len(), names.len()),
            }
        }
        Ok(at)
    }

    fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        match self.thread.join() {
            Ok(result) => result.context("the watch failed"),
            Err(_) => bail!("the watcher panicked"),
        }
    }
}

/// Creates a namespace; returns a resourceVersion to watch its pods from.
async fn namespace(process: &Process, namespace: &str) -> Result<String> {
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
    let list: Value = admin
        .request(
            reqwest::Method::GET,
            &format!("/api/v1/namespaces/{namespace}/pods?limit=1"),
        )
        .send()
        .await?
        .json()
        .await?;
    Ok(list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .context("a list's resourceVersion")?
        .to_owned())
}

/// When the creators stop.
#[derive(Clone)]
enum Until {
    Deadline(Instant),
    /// This many pods in all.
    Count(Arc<AtomicUsize>, usize),
}

/// What the creators did.
struct Created {
    /// Each created pod, with when its create was sent.
    sent: HashMap<String, Instant>,
    latency: Latencies,
    errors: u64,
    started: Instant,
    finished: Instant,
}

/// `clients` clients, each with a connection of its own, creating pods back to back.
async fn create_pods(
    process: &Process,
    namespace: &str,
    clients: usize,
    until: Until,
) -> Result<Created> {
    let pods = format!("/api/v1/namespaces/{namespace}/pods");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = Client::new(process)?;
        let (pods, until) = (pods.clone(), until.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut latency = Latencies::default();
            let mut errors = 0u64;
            let mut i = 0;
            loop {
                match &until {
                    Until::Deadline(end) if Instant::now() >= *end => break,
                    Until::Count(next, total) if next.fetch_add(1, Ordering::Relaxed) >= *total => {
                        break;
                    }
                    _ => {}
                }
                let name = format!("p{c}-{i}");
                i += 1;
                let body = pod(&name);
                let t = Instant::now();
                match client.create(&pods, &body).await {
                    Ok(reqwest::StatusCode::CREATED) => {
                        latency.push(t.elapsed());
                        sent.push((name, t));
                    }
                    _ => errors += 1,
                }
            }
            (sent, latency, errors, Instant::now())
        }));
    }
    let mut created = Created {
        sent: HashMap::new(),
        latency: Latencies::default(),
        errors: 0,
        started,
        finished: started,
    };
    for task in tasks {
        let (s, l, e, f) = task.await?;
        created.sent.extend(s);
        created.latency.merge(l);
        created.errors += e;
        created.finished = created.finished.max(f);
    }
    Ok(created)
}

/// One round: `clients` creating pods in a fresh namespace for `duration`, one watching it.
async fn round(process: &Process, ns: &str, clients: usize, duration: Duration) -> Result<Round> {
    let rv = namespace(process, ns).await?;
    let mut watcher = Watcher::start(process, &format!("/api/v1/namespaces/{ns}/pods"), rv, added)?;
    let created = create_pods(
        process,
        ns,
        clients,
        Until::Deadline(Instant::now() + duration),
    )
    .await?;
    let seen = watcher.wait_for(&created.sent, 10).await;
    watcher.stop()?;
    let mut watch = Latencies::default();
    for (name, at) in seen? {
        watch.push(at.saturating_duration_since(created.sent[&name]));
    }
    Ok(Round {
        creates: created.sent.len() as u64,
        errors: created.errors,
        rate: created.sent.len() as f64 / (created.finished - created.started).as_secs_f64(),
        create: created.latency,
        watch,
    })
}

/// The control loops under load, on the embedded store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Loops {
    /// Pending pods bound per second: from the first create sent to the last pod seen bound.
    pub sched_pods_per_s: f64,
    pub sched_pods: usize,
    pub sched_nodes: usize,
    /// How long creating the pods took (the scheduler cannot finish sooner).
    pub sched_create_s: f64,
    /// From a pod's readiness report to one connected agent holding the ready endpoint.
    pub feed_p50_ms: f64,
    pub feed_p99_ms: f64,
    /// The same, over every agent, with `sched_nodes` agents connected.
    pub feed_p50_ms_100_nodes: f64,
    pub feed_p99_ms_100_nodes: f64,
    pub feed_samples: usize,
}

const FEED_NAMESPACE: &str = "feedbench";
const FEED_SERVICE: &str = "feedbench/feed";
const FEED_PODS: usize = 20;

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

/// An agent's endpoint changes: (agent, address, ready, when it held it).
type EndpointChange = (usize, String, bool, Instant);

/// Follows the feed as agent `i` (the agents' own session code, with node `i`'s client) and
/// forwards the changes of the feed service's endpoints it receives.
async fn connect_agent(
    client: FeedClient,
    i: usize,
    changes: mpsc::UnboundedSender<EndpointChange>,
) -> Result<()> {
    let mut held: HashMap<String, bool> = HashMap::new();
    let on_change = move |view: &View, _: Changes| {
        let now = Instant::now();
        for (address, ready) in view.endpoints(FEED_SERVICE) {
            if held.insert(address.clone(), ready) != Some(ready) {
                let _ = changes.send((i, address, ready, now));
            }
        }
    };
    tokio::spawn(session::follow(
        client,
        node_name(i),
        Arc::default(),
        Arc::default(),
        on_change,
    ));
    Ok(())
}

/// Reports feed pod `k` ready or not, as its node's agent would.
async fn report(
    feed: &mut FeedClient,
    pods: &[(String, String)],
    k: usize,
    ready: bool,
) -> Result<()> {
    let (name, uid) = &pods[k];
    feed.report_pod_status(PodStatusReport {
        node_name: node_name(0),
        namespace: FEED_NAMESPACE.into(),
        name: name.clone(),
        uid: uid.clone(),
        phase: PodPhase::Running as i32,
        pod_ip: feed_ip(k),
        ready,
        containers: Vec::new(),
        deleted: false,
        status_json: Vec::new(),
    })
    .await?;
    Ok(())
}

fn feed_ip(k: usize) -> String {
    format!("10.250.0.{}", k + 2)
}

/// Waits until `agents` agents hold `address` at `ready`; returns when each did.
async fn held(
    changes: &mut mpsc::UnboundedReceiver<EndpointChange>,
    agents: usize,
    address: &str,
    ready: bool,
) -> Result<Vec<Instant>> {
    let mut at: HashMap<usize, Instant> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while at.len() < agents {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Some((agent, a, r, t))) if a == address && r == ready => {
                at.insert(agent, t);
            }
            Ok(Some(_)) => {}
            _ => bail!(
                "{} of {agents} agents saw {address} ready={ready}",
                at.len()
            ),
        }
    }
    Ok(at.into_values().collect())
}

/// `samples` pods turning ready (each not ready again after, unmeasured); latency to every
/// connected agent.
async fn feed_latency(
    feed: &mut FeedClient,
    pods: &[(String, String)],
    changes: &mut mpsc::UnboundedReceiver<EndpointChange>,
    agents: usize,
    samples: usize,
) -> Result<Latencies> {
    let mut latency = Latencies::default();
    for s in 0..samples {
        let k = s % pods.len();
        let t0 = Instant::now();
        report(feed, pods, k, true).await?;
        for t in held(changes, agents, &feed_ip(k), true).await? {
            latency.push(t.saturating_duration_since(t0));
        }
        report(feed, pods, k, false).await?;
        held(changes, agents, &feed_ip(k), false).await?;
    }
    Ok(latency)
}

/// Scheduler throughput and feed latency on a control plane of its own (embedded store).
async fn loops(
    binary: &Path,
    dir: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<Loops> {
    let process = Process::start(
        binary,
        &format!("embedded:{}", dir.join("loops-sqlite").display()),
        &state(dir, "loops")?,
        &[],
    )?;
    progress(&format!("registering {} nodes", opts.nodes));
    // Each node joins as an agent does: the bootstrap token, then its own certificate.
    let mut nodes = Vec::new();
    for i in 0..opts.nodes {
        let (client, _, _) = process
            .join(RegisterRequest {
                node_name: node_name(i),
                internal_ip: format!("192.0.{}.{}", 2 + i / 250, 1 + i % 250),
                capacity: Some(Resources {
                    cpu_millis: 64_000,
                    memory_bytes: 256 << 30,
                    pods: 110,
                }),
                ..Default::default()
            })
            .await?;
        nodes.push(client);
    }
    let mut feed = nodes[0].clone();
    let heartbeats = {
        let nodes = nodes.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                for (i, feed) in nodes.iter().enumerate() {
                    let _ = feed
                        .clone()
                        .heartbeat(HeartbeatRequest {
                            node_name: node_name(i),
                        })
                        .await;
                }
            }
        })
    };

    progress(&format!(
        "scheduling {} pending pods on {} nodes",
        opts.sched_pods, opts.nodes
    ));
    let rv = namespace(&process, "sched").await?;
    let mut watcher = Watcher::start(&process, "/api/v1/namespaces/sched/pods", rv, bound)?;
    let created = create_pods(
        &process,
        "sched",
        opts.clients,
        Until::Count(Arc::new(AtomicUsize::new(0)), opts.sched_pods),
    )
    .await?;
    let seen = watcher.wait_for(&created.sent, 300).await;
    watcher.stop()?;
    let seen = seen?;
    let last = seen.values().max().copied().unwrap_or(created.started);
    let sched_pods_per_s = seen.len() as f64 / (last - created.started).as_secs_f64();

    progress("feed: one agent");
    namespace(&process, FEED_NAMESPACE).await?;
    let admin = Client::new(&process)?;
    admin
        .create_object(
            &format!("/api/v1/namespaces/{FEED_NAMESPACE}/services"),
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "feed"},
                    "spec": {"selector": {"app": "feed"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
        )
        .await?;
    let mut pods = Vec::new();
    for k in 0..FEED_PODS {
        let body = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("feed-{k}"), "labels": {"app": "feed"}},
            "spec": {"nodeName": node_name(0), "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}});
        let pod = admin
            .create_object(&format!("/api/v1/namespaces/{FEED_NAMESPACE}/pods"), &body)
            .await?;
        let uid = pod
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .context("a uid")?
            .to_owned();
        pods.push((format!("feed-{k}"), uid));
    }
    let (tx, mut changes) = mpsc::unbounded_channel();
    connect_agent(nodes[0].clone(), 0, tx.clone()).await?;
    for k in 0..FEED_PODS {
        report(&mut feed, &pods, k, false).await?;
        held(&mut changes, 1, &feed_ip(k), false).await?;
    }
    let mut one = feed_latency(&mut feed, &pods, &mut changes, 1, opts.feed_samples).await?;

    progress(&format!("feed: {} agents", opts.nodes));
    for (i, node) in nodes.iter().enumerate().skip(1) {
        connect_agent(node.clone(), i, tx.clone()).await?;
    }
    // Every agent holds every endpoint, not ready, before measuring.
    let mut holding = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while holding.len() < (opts.nodes - 1) * FEED_PODS {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Some((agent, address, false, _))) if agent > 0 => {
                holding.insert((agent, address));
            }
            Ok(Some(_)) => {}
            _ => bail!("the agents did not all get their snapshot"),
        }
    }
    let mut many = feed_latency(
        &mut feed,
        &pods,
        &mut changes,
        opts.nodes,
        opts.feed_samples,
    )
    .await?;
    heartbeats.abort();
    Ok(Loops {
        sched_pods_per_s: sched_pods_per_s.round(),
        sched_pods: seen.len(),
        sched_nodes: opts.nodes,
        sched_create_s: ((created.finished - created.started).as_secs_f64() * 100.0).round()
            / 100.0,
        feed_p50_ms: ms(one.quantile(0.5)),
        feed_p99_ms: ms(one.quantile(0.99)),
        feed_p50_ms_100_nodes: ms(many.quantile(0.5)),
        feed_p99_ms_100_nodes: ms(many.quantile(0.99)),
        feed_samples: opts.feed_samples,
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

/// The `control-plane` binary next to this one.
fn binary() -> Result<PathBuf> {
    sibling("control-plane")
}

/// A binary next to this one (`cargo xtask bench control-plane` builds them together).
fn sibling(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p {name}`",
            path.display()
        );
    }
    Ok(path)
}

/// Runs the benchmark on both stores; `progress` hears what it is doing.
/// Everything the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub results: Vec<StoreResult>,
    #[serde(flatten)]
    pub loops: Loops,
    #[serde(flatten)]
    pub agents: agents::Figures,
    #[serde(flatten)]
    pub pods: pods::Figures,
}

/// Runs the benchmark: the API on both stores, then the control loops; `progress` hears what
/// it is doing.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::Builder::new()
        .prefix("keel-bench-cp-")
        .tempdir()?;
    runtime
        .block_on(async {
            let binary = binary()?;
            progress("starting the control plane on the embedded store");
            let embedded = Process::start(
                &binary,
                &format!("embedded:{}", dir.path().join("sqlite").display()),
                &state(dir.path(), "embedded")?,
                &["--disable-controllers"],
            )?;
            progress("starting etcd and the control plane on it");
            let etcd = EtcdProcess::start().await?;
            let on_etcd = Process::start(
                &binary,
                &format!("etcd:{}", etcd.endpoint),
                &state(dir.path(), "etcd")?,
                &["--disable-controllers"],
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
            let results = subjects.into_iter().map(summarize).collect();
            let loops = loops(&binary, dir.path(), opts, progress).await?;
            Ok::<_, anyhow::Error>((results, loops))
        })
        .and_then(|(results, loops)| {
            // Blocking (processes, namespaces, map reads): outside the runtime above.
            let agents = agents::run(
                &binary()?,
                &sibling("node-agent")?,
                dir.path(),
                &opts.agents,
                progress,
            )?;
            let pods = pods::run(opts.pods, progress)?;
            Ok(Report {
                results,
                loops,
                agents,
                pods,
            })
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

/// Markdown tables of the results.
pub fn markdown(report: &Report, clients: usize, machine: &str) -> String {
    let mut out = format!(
        "API server ({clients} concurrent clients creating pods over HTTPS, control loops off); {machine}\n\n\
         | store | creates/s | create p50 ms | create p99 ms | watch p50 ms | watch p99 ms | creates | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in &report.results {
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
    let l = &report.loops;
    out.push_str(&format!(
        "\nControl loops (embedded store)\n\n\
         | measure | value |\n|---|---:|\n\
         | scheduler: {} pending pods on {} nodes, pods/s | {:.0} |\n\
         | (creating them took, s) | {:.2} |\n\
         | feed, pod ready to 1 agent, p50 / p99 ms | {:.2} / {:.2} |\n\
         | feed, pod ready to each of {} agents, p50 / p99 ms | {:.2} / {:.2} |\n",
        l.sched_pods,
        l.sched_nodes,
        l.sched_pods_per_s,
        l.sched_create_s,
        l.feed_p50_ms,
        l.feed_p99_ms,
        l.sched_nodes,
        l.feed_p50_ms_100_nodes,
        l.feed_p99_ms_100_nodes
    ));
    let a = &report.agents;
    out.push_str(&format!(
        "\nNode agents end to end ({} real agents, each in its own network namespace with its own \
         eBPF data plane; {} services)\n\n\
         | measure | value |\n|---|---:|\n\
         | pod readiness written through the API to every agent's data plane, p50 / p99 ms ({} samples) | {:.2} / {:.2} |\n\
         | one agent's resident memory, MiB (the largest `nft` run of the replay below, MiB) | {:.1} ({:.1}) |\n\
         | one agent's CPU per 1,000 endpoint changes ({} changes at {}/s), ms | {:.0} |\n\
         | kube-proxy's nftables layout, `nft` CPU for the same changes (synced once a second), ms per 1,000 | {:.0} |\n",
        a.e2e_agents,
        a.e2e_services,
        a.e2e_samples,
        a.e2e_program_p50_ms,
        a.e2e_program_p99_ms,
        a.agent_rss_mib,
        a.nft_max_rss_mib,
        a.changes,
        a.change_rate_per_s,
        a.agent_cpu_ms_per_1k_changes,
        a.nft_cpu_ms_per_1k_changes,
    ));
    let p = &report.pods;
    out.push_str(&format!(
        "\nPods on real nodes (3 nodes running `node-agent --run-pods`: CNI, runc, status)\n\n\
         | measure | value |\n|---|---:|\n\
         | pod startup, create → Running with its IP (watched), {} pods by 10 clients, p50 / p99 ms | {:.0} / {:.0} |\n\
         | node failure: agent killed → its pods out of every other node's data plane (grace {} s), ms | {:.0} |\n",
        p.pod_startup_pods,
        p.pod_startup_p50_ms,
        p.pod_startup_p99_ms,
        p.node_failure_grace_s,
        p.node_failure_withdraw_ms,
    ));
    out
}
