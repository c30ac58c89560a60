//! The running agent: one source of desired state (the feed or a Kubernetes API server) fills
//! the [`View`]; the proxy thread turns what changed into proxy updates; discovery attaches the
//! data plane to pods' interfaces and namespaces as they appear; the HTTP endpoints report.
//!
//! The proxy runs on a thread of its own (its modes make blocking system calls and run
//! `iptables-restore` or `nft`). Changes pile up in [`Shared::changed`] while a sync runs, so a
//! burst is applied in one sync; the first sync waits for a complete view, so a restarted agent
//! never replaces the pinned data plane with a partial state, and established flows never
//! notice the restart.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use control_plane_api::{
    session::{Backoff, StreamStatus},
    view::{Changes, View},
};
use node_agent_kubelet::Kubelet;
use node_agent_proxy::{Mode, NodeSettings, Proxier, ProxyConfig, ProxyState, local_addrs};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::{
    config::{RunArgs, SocketLb},
    discover,
    healthcheck::HealthChecks,
    metrics::{DataplaneCollector, Metrics, ReasonLabels, ResultLabels, SyncLabels},
    pods::PodSettings,
    services::{Ignored, translate},
    source,
};

/// What the proxy thread is told.
#[derive(Debug)]
pub enum Event {
    /// Desired state changed (see [`Shared::changed`]).
    Changed,
    /// A pod interface appeared, with the pod's addresses (none when it was discovered by
    /// name: its sources are then not checked).
    Interface(String, Vec<std::net::Ipv4Addr>),
    /// A pod network namespace appeared, or went.
    Netns(PathBuf),
    NetnsGone(PathBuf),
    Stop,
}

/// The outcome of the last sync, for `/status` and `/healthz`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncStatus {
    pub synced: bool,
    pub last_sync_unix: f64,
    pub last_sync_ms: f64,
    pub version: u64,
    /// `full` (everything rewritten) or `incremental` (only the services that changed).
    pub kind: &'static str,
    /// Services (eBPF) or chains (iptables) the last sync wrote.
    pub written: usize,
    pub services: usize,
    pub endpoints: usize,
    pub kernel_objects: u64,
    pub failed: Vec<String>,
    pub last_error: Option<String>,
}

/// What the source, the proxy thread and the HTTP endpoints share.
pub struct Shared {
    pub node: String,
    /// Where desired state comes from, for humans (`feed https://...`, `kubeconfig ...`).
    pub source: String,
    pub mode: Mode,
    pub pin_dir: PathBuf,
    pub view: Arc<Mutex<View>>,
    pub stream: Arc<Mutex<StreamStatus>>,
    pub metrics: Metrics,
    pub status: Mutex<SyncStatus>,
    pending: Mutex<(Changes, Option<Instant>)>,
    tx: Mutex<Sender<Event>>,
    /// `--run-pods`: the kubelet's settings, and the kubelet once the source started it.
    pub pods: Option<PodSettings>,
    pub kubelet: Mutex<Option<Arc<Kubelet>>>,
    /// `--nodeport-addresses`.
    pub nodeport_cidrs: Vec<ipnet::Ipv4Net>,
}

impl Shared {
    /// Records changes of `view` to apply and wakes the proxy thread; hands the node's pods
    /// to the kubelet when they (or the nodes) changed.
    pub fn changed(&self, view: &View, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        let pods_changed = changes.replaced
            || changes.nodes
            || !changes.pods.is_empty()
            || !changes.pods_deleted.is_empty();
        if pods_changed && let Some(kubelet) = self.kubelet.lock().expect("not poisoned").clone() {
            crate::pods::on_change(self, &kubelet, view, changes.replaced || changes.nodes);
        }
        {
            let mut pending = self.pending.lock().expect("not poisoned");
            pending.0.merge(changes);
            pending.1.get_or_insert_with(Instant::now);
        }
        self.send(Event::Changed);
    }

    pub fn send(&self, event: Event) {
        let _ = self.tx.lock().expect("not poisoned").send(event);
    }

    fn take_pending(&self) -> (Changes, Option<Instant>) {
        std::mem::take(&mut *self.pending.lock().expect("not poisoned"))
    }

    fn put_back(&self, changes: Changes, since: Option<Instant>) {
        let mut pending = self.pending.lock().expect("not poisoned");
        pending.0.merge(changes);
        if let Some(since) = since {
            pending.1 = Some(pending.1.map_or(since, |p| p.min(since)));
        }
    }
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> Result<()> {
    let node = match &args.node_name {
        Some(n) => n.clone(),
        None => hostname()?,
    };
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    if args.proxy_mode == Mode::Ebpf {
        registry.register_collector(Box::new(DataplaneCollector {
            pin_dir: args.pin_dir.clone(),
        }));
    }
    let (tx, rx) = mpsc::channel();
    let source = match (&args.source.feed, &args.source.kubeconfig) {
        (Some(url), _) => format!("feed {url}"),
        (None, Some(path)) => format!("kubeconfig {}", path.display()),
        (None, None) => unreachable!("clap requires one source"),
    };
    let shared = Arc::new(Shared {
        node: node.clone(),
        source,
        mode: args.proxy_mode,
        pin_dir: args.pin_dir.clone(),
        view: Arc::default(),
        stream: Arc::default(),
        metrics,
        status: Mutex::default(),
        pending: Mutex::default(),
        tx: Mutex::new(tx),
        pods: PodSettings::from_args(&args)?,
        kubelet: Mutex::default(),
        nodeport_cidrs: args.nodeport_addresses.clone(),
    });

    // The proxy first: the data plane (re)attached and adopted before anything else.
    let config = ProxyConfig {
        cluster_cidr: args.cluster_cidr.clone(),
        interfaces: Vec::new(),
        pin_dir: args.pin_dir.clone(),
        pod_netns: Vec::new(),
        socket_lb: args.socket_lb != SocketLb::Off,
        host_socket_lb: args.socket_lb == SocketLb::All,
        socket_cgroup: None,
        external_maglev: (args.external_maglev_table_size > 0)
            .then_some(args.external_maglev_table_size),
        xdp: args.xdp,
        lb_mode: args.lb_mode,
        sync_timeout: None,
        allow_flow_loss: args.allow_flow_loss,
    };
    let proxier = node_agent_proxy::start(args.proxy_mode, &config)
        .with_context(|| format!("start the {} proxy", args.proxy_mode))?;
    tracing::info!(node = %node, mode = %args.proxy_mode, source = %shared.source, "node agent starting");
    let min_period = args.min_sync_period();
    let thread_shared = shared.clone();
    let runtime = tokio::runtime::Handle::current();
    let proxy_thread = std::thread::Builder::new()
        .name("proxy".into())
        .spawn(move || proxy_loop(&thread_shared, rx, proxier, min_period, runtime))?;

    let http = crate::http::serve(args.metrics_addr, shared.clone(), registry).await?;
    tracing::info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /status");
    let mut discovery = discover::start(&args, shared.clone())?;
    let metrics_shared = shared.clone();
    discovery.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            crate::http::update_source_metrics(&metrics_shared);
        }
    }));
    let source_task = tokio::spawn(source::run(args.source.clone(), shared.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        result = source_task => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.into()),
        },
        result = http => Err(match result {
            Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped"),
            Ok(Err(e)) => anyhow::Error::new(e).context("the HTTP server failed"),
            Err(e) => anyhow::Error::new(e).context("the HTTP server task failed"),
        }),
    };
    tracing::info!("node agent stopping; the data plane keeps serving");
    for task in discovery {
        task.abort();
    }
    shared.send(Event::Stop);
    let _ = tokio::task::spawn_blocking(move || proxy_thread.join()).await;
    outcome
}

/// What the proxy must know of this node for traffic from outside the cluster, once the view
/// has the node: its pod network, its InternalIP (where masqueraded flows leave from), the
/// addresses NodePorts answer on (the local ones in `cidrs`, or the InternalIP) and the other
/// nodes' InternalIPs.
fn node_settings(view: &View, node: &str, cidrs: &[ipnet::Ipv4Net]) -> Option<NodeSettings> {
    let n = view.nodes.get(node)?;
    let internal: Option<std::net::Ipv4Addr> = n.internal_ip.parse().ok();
    let pod_cidr = n
        .pod_cidrs
        .iter()
        .find_map(|c| c.parse::<ipnet::Ipv4Net>().ok())
        .map(|c| (c.network(), c.prefix_len()));
    // The node's own addresses are only read when they are asked for.
    let local = if cidrs.is_empty() {
        Vec::new()
    } else {
        local_addrs().unwrap_or_default()
    };
    let nodeport_addrs = nodeport_addrs(internal, cidrs, local);
    let mut peer_addrs: Vec<std::net::Ipv4Addr> = view
        .nodes
        .iter()
        .filter(|(name, _)| *name != node)
        .filter_map(|(_, n)| n.internal_ip.parse().ok())
        .collect();
    peer_addrs.sort();
    Some(NodeSettings {
        pod_cidr,
        masquerade_addr: internal,
        nodeport_addrs,
        peer_addrs,
    })
}

/// The addresses NodePorts answer on: with no `cidrs`, the node's InternalIP (as kube-proxy's
/// nftables mode, and its `--nodeport-addresses primary`); else every `local` address (by
/// interface) inside one of them, loopback excepted (`0.0.0.0/0`: every node address).
fn nodeport_addrs(
    internal: Option<std::net::Ipv4Addr>,
    cidrs: &[ipnet::Ipv4Net],
    local: Vec<(String, std::net::Ipv4Addr)>,
) -> Vec<std::net::Ipv4Addr> {
    let mut addrs: Vec<std::net::Ipv4Addr> = if cidrs.is_empty() {
        internal.into_iter().collect()
    } else {
        local
            .into_iter()
            .map(|(_, addr)| addr)
            .filter(|addr| !addr.is_loopback() && cidrs.iter().any(|c| c.contains(addr)))
            .collect()
    };
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Collects the data plane's expired flows and publishes what it found.
fn collect(shared: &Shared, proxier: &mut dyn Proxier) {
    match proxier.collect() {
        Ok(Some(report)) => {
            let m = &shared.metrics;
            m.conntrack_entries.set(report.entries as i64);
            m.conntrack_expired.inc_by(report.expired);
            m.conntrack_orphans.inc_by(report.orphans);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = format!("{e:#}"), "conntrack collection failed"),
    }
}

fn hostname() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("read the host name")?
        .trim()
        .to_owned())
}

/// The proxy thread: applies what changed, coalescing bursts; retries failed syncs with
/// back-off.
fn proxy_loop(
    shared: &Shared,
    rx: Receiver<Event>,
    mut proxier: Box<dyn Proxier>,
    min_period: Duration,
    runtime: tokio::runtime::Handle,
) {
    let mut sync = SyncState::default();
    let mut health = HealthChecks::new(runtime);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut retry_at: Option<Instant> = None;
    let mut last_sync: Option<Instant> = None;
    let mut netns = BTreeSet::new();
    let mut interfaces = BTreeSet::new();
    let mut next_collect = Instant::now() + ebpf_dataplane::GC_PERIOD;
    loop {
        let deadline = retry_at.map_or(next_collect, |at| at.min(next_collect));
        let first = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(event) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if Instant::now() >= next_collect {
            collect(shared, proxier.as_mut());
            next_collect = Instant::now() + ebpf_dataplane::GC_PERIOD;
        }
        // A retry is due.
        let mut wake = first.is_none() && retry_at.is_some_and(|at| Instant::now() >= at);
        for event in first.into_iter().chain(rx.try_iter()) {
            match event {
                Event::Changed => wake = true,
                Event::Interface(name, sources) => {
                    match proxier.attach_interface(&name, &sources) {
                        Ok(()) => {
                            interfaces.insert(name.clone());
                            tracing::info!(interface = %name, "attached to a pod interface");
                        }
                        Err(e) => {
                            tracing::warn!(interface = %name, error = format!("{e:#}"), "attach failed")
                        }
                    }
                }
                Event::Netns(path) => match proxier.enable_netns(&path) {
                    Ok(()) => {
                        netns.insert(path.clone());
                        tracing::info!(netns = %path.display(), "socket-level load balancing enabled");
                    }
                    Err(e) => {
                        tracing::warn!(netns = %path.display(), error = format!("{e:#}"), "enabling socket-level load balancing failed")
                    }
                },
                Event::NetnsGone(path) => {
                    if netns.remove(&path) {
                        let _ = proxier.disable_netns(&path);
                    }
                }
                Event::Stop => return,
            }
        }
        shared.metrics.pod_interfaces.set(interfaces.len() as i64);
        shared.metrics.pod_netns.set(netns.len() as i64);
        if !wake {
            continue;
        }
        if let Some(last) = last_sync {
            let wait = min_period.saturating_sub(last.elapsed());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        let applied = sync.apply(shared, proxier.as_mut());
        if !matches!(applied, Applied::Waiting) {
            health.update(&sync.state);
        }
        match applied {
            Applied::Waiting => {}
            Applied::Ok => {
                backoff.reset();
                retry_at = None;
                last_sync = Some(Instant::now());
            }
            Applied::Failed => {
                let delay = backoff.next_delay();
                retry_at = Some(Instant::now() + delay);
                last_sync = Some(Instant::now());
            }
        }
    }
}

enum Applied {
    /// The view is not complete yet: nothing applied.
    Waiting,
    Ok,
    Failed,
}

/// What the proxy thread keeps between syncs.
#[derive(Default)]
struct SyncState {
    state: ProxyState,
    synced: bool,
    /// Endpoints over every service port of `state`, kept as services change.
    endpoints: usize,
    /// The proxy mode's kernel objects, and when they were last counted (counting reads
    /// every map's or table's size: once a second at most).
    kernel_objects: u64,
    counted: Option<Instant>,
    /// Services not programmed, and why.
    ignored: HashMap<String, Ignored>,
    ipv6_skipped: HashMap<String, usize>,
    /// What the proxy was last told of the node.
    node: Option<NodeSettings>,
}

impl SyncState {
    fn apply(&mut self, shared: &Shared, proxier: &mut dyn Proxier) -> Applied {
        let (changes, since) = shared.take_pending();
        let view = shared.view.lock().expect("not poisoned");
        if !view.complete {
            drop(view);
            shared.put_back(changes, since);
            return Applied::Waiting;
        }
        let full = changes.replaced || !self.synced;
        let mut keys: BTreeSet<String> = if full {
            view.services
                .keys()
                .chain(self.state.services.keys())
                .cloned()
                .collect()
        } else {
            changes.services.clone()
        };
        let endpoints_of = |s: &node_agent_proxy::Service| -> usize {
            s.ports.iter().map(|p| p.endpoints.len()).sum()
        };
        for key in &keys {
            if crate::services::is_host_port_key(key) {
                continue;
            }
            let t = translate(&view, key, &shared.node);
            let old = match t.service {
                Some(service) => {
                    self.endpoints += endpoints_of(&service);
                    self.state.insert(service)
                }
                None => self.state.remove(key),
            };
            if let Some(old) = old {
                self.endpoints -= endpoints_of(&old);
            }
            match t.ignored {
                Some(why) => self.ignored.insert(key.clone(), why),
                None => self.ignored.remove(key),
            };
            if t.ipv6_skipped > 0 {
                self.ipv6_skipped.insert(key.clone(), t.ipv6_skipped);
            } else {
                self.ipv6_skipped.remove(key);
            }
        }
        // The host ports of this node's running pods (their addresses are the kubelet's).
        let host_ports = crate::services::host_port_services(&view, &crate::pods::pod_ips(shared));
        let stale: Vec<String> = self
            .state
            .services
            .keys()
            .filter(|k| crate::services::is_host_port_key(k))
            .filter(|k| !host_ports.iter().any(|s| s.key() == **k))
            .cloned()
            .collect();
        for key in stale {
            if let Some(old) = self.state.remove(&key) {
                self.endpoints -= endpoints_of(&old);
            }
            keys.insert(key);
        }
        for service in host_ports {
            if self.state.services.get(&service.key()) != Some(&service) {
                keys.insert(service.key());
                self.endpoints += endpoints_of(&service);
                if let Some(old) = self.state.insert(service) {
                    self.endpoints -= endpoints_of(&old);
                }
            }
        }
        let version = view.version;
        let node = node_settings(&view, &shared.node, &shared.nodeport_cidrs);
        drop(view);
        if let Some(node) = node
            && self.node.as_ref() != Some(&node)
        {
            match proxier.set_node(&node) {
                Ok(()) => {
                    tracing::info!(
                        nodeport_addresses = ?node.nodeport_addrs,
                        pod_cidr = ?node.pod_cidr,
                        other_nodes = node.peer_addrs.len(),
                        "node settings for traffic from outside the cluster"
                    );
                    self.node = Some(node);
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "NodePorts and external addresses are not served"
                ),
            }
        }

        let started = Instant::now();
        let result = if full {
            proxier.sync(&self.state)
        } else {
            proxier.update(&self.state, &keys)
        };
        let metrics = &shared.metrics;
        let kind = if full { "full" } else { "incremental" };
        metrics
            .sync_duration
            .get_or_create(&SyncLabels { kind })
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(report) => {
                self.synced = true;
                metrics
                    .syncs
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                if let Some(since) = since {
                    metrics.apply_lag.observe(since.elapsed().as_secs_f64());
                }
                let endpoints = self.endpoints;
                if full
                    || self
                        .counted
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    self.kernel_objects = proxier.kernel_usage().map(|u| u.objects).unwrap_or(0);
                    self.counted = Some(Instant::now());
                }
                let kernel_objects = self.kernel_objects;
                metrics
                    .sync_writes
                    .get_or_create(&SyncLabels { kind })
                    .inc_by(report.written as u64);
                metrics.last_applied_version.set(version as i64);
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                metrics.last_sync_timestamp.set(now);
                metrics.services.set(self.state.services.len() as i64);
                metrics.endpoints.set(endpoints as i64);
                metrics.services_failed.set(report.failed.len() as i64);
                metrics.kernel_objects.set(kernel_objects as i64);
                metrics
                    .ipv6_skipped
                    .set(self.ipv6_skipped.values().sum::<usize>() as i64);
                for (reason, why) in [
                    ("external_name", Ignored::ExternalName),
                    ("headless", Ignored::Headless),
                    ("other_proxy", Ignored::OtherProxy),
                    ("ipv6_only", Ignored::Ipv6Only),
                ] {
                    let n = self.ignored.values().filter(|w| **w == why).count();
                    metrics
                        .ignored_services
                        .get_or_create(&ReasonLabels { reason })
                        .set(n as i64);
                }
                for failure in &report.failed {
                    tracing::warn!(service = %failure, "a service could not be written; the others were");
                }
                tracing::debug!(
                    kind,
                    version,
                    written = report.written,
                    ms = report.duration.as_secs_f64() * 1e3,
                    "synced"
                );
                *shared.status.lock().expect("not poisoned") = SyncStatus {
                    synced: true,
                    last_sync_unix: now,
                    last_sync_ms: report.duration.as_secs_f64() * 1e3,
                    version,
                    kind,
                    written: report.written,
                    services: self.state.services.len(),
                    endpoints,
                    kernel_objects,
                    failed: report.failed,
                    last_error: None,
                };
                Applied::Ok
            }
            Err(e) => {
                metrics
                    .syncs
                    .get_or_create(&ResultLabels { result: "error" })
                    .inc();
                tracing::error!(
                    error = format!("{e:#}"),
                    kind,
                    "sync failed; retrying everything"
                );
                shared.status.lock().expect("not poisoned").last_error = Some(format!("{e:#}"));
                // What failed is unknown: the retry rewrites everything.
                self.synced = false;
                shared.put_back(changes, since);
                Applied::Failed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeports_answer_on_the_internal_ip_or_the_local_addresses_asked_for() {
        let internal = Some("192.168.1.10".parse().unwrap());
        let local: Vec<(String, std::net::Ipv4Addr)> = [
            ("lo", "127.0.0.1"),
            ("eth0", "192.168.1.10"),
            ("eth0", "192.168.1.11"),
            ("eth1", "10.20.0.5"),
            ("cni0", "10.244.0.1"),
        ]
        .iter()
        .map(|(i, a)| (i.to_string(), a.parse().unwrap()))
        .collect();
        let cidrs = |list: &[&str]| -> Vec<ipnet::Ipv4Net> {
            list.iter().map(|c| c.parse().unwrap()).collect()
        };
        let addrs = |v: Vec<std::net::Ipv4Addr>| -> Vec<String> {
            v.iter().map(ToString::to_string).collect()
        };
        assert_eq!(
            addrs(nodeport_addrs(internal, &[], local.clone())),
            ["192.168.1.10"]
        );
        assert_eq!(
            addrs(nodeport_addrs(
                internal,
                &cidrs(&["192.168.1.0/24", "10.20.0.0/16"]),
                local.clone()
            )),
            ["10.20.0.5", "192.168.1.10", "192.168.1.11"]
        );
        assert_eq!(
            addrs(nodeport_addrs(
                internal,
                &cidrs(&["0.0.0.0/0"]),
                local.clone()
            )),
            ["10.20.0.5", "10.244.0.1", "192.168.1.10", "192.168.1.11"],
            "every address but loopback"
        );
        assert!(nodeport_addrs(internal, &cidrs(&["172.16.0.0/12"]), local).is_empty());
    }
}
