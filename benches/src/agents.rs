//! Real node agents end to end, as part of `bench control-plane`: a control plane (embedded
//! store, control loops on) holding 10,000 services, and 10 `node-agent` processes, each in a
//! network namespace of its own on a node network (a bridge) and each with its own eBPF data
//! plane, fed over the feed.
//!
//! - **Programming latency**: a pod's readiness is written through the API (as its kubelet
//!   would); the EndpointSlice controller, the feed and each agent carry it to the data plane.
//!   The figure runs from the write to each agent's pinned service map holding the endpoint
//!   (read back from the map, polled every half millisecond), over every agent and sample.
//! - **Agent cost**: one agent's resident memory with 10,000 services, and its CPU time (user +
//!   system, from /proc) over a stream of endpoint changes at a steady rate, per thousand.
//! - **kube-proxy's nftables mode doing the same work**: the same 10,000 services loaded into
//!   the nftables layout in a namespace of its own, then the same changes at the same rate,
//!   synced as kube-proxy does (at most once per second, its minSyncPeriod); the figures are the
//!   CPU time of the `nft` processes (children of this process), per thousand changes, and the
//!   peak resident memory of the largest one (the kernel keeps the ruleset; kube-proxy's own
//!   process is not part of this replay).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use control_plane::launch::{Api, Process};
use ebpf_dataplane::{Frontend, Pinned};
use futures::StreamExt;
use node_agent::launch::AgentProcess;
use node_agent_netns::{lab::NodeNetwork, netns::Netns};
use node_agent_proxy::{Mode, Protocol, ProxyConfig, ProxyState, Service, ServicePort};
use reqwest::Method;
use serde::Serialize;
use serde_json::{Value, json};

use crate::loadgen::Latencies;

pub struct Options {
    pub agents: usize,
    pub services: usize,
    /// Readiness changes timed end to end.
    pub samples: usize,
    /// Endpoint changes the agents' CPU is measured over, and their rate.
    pub changes: usize,
    pub change_rate: f64,
}

/// Pods of the measured service (their readiness is what changes).
const PODS: usize = 20;
const FILLER_ENDPOINTS: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub e2e_agents: usize,
    pub e2e_services: usize,
    pub e2e_samples: usize,
    pub e2e_program_p50_ms: f64,
    pub e2e_program_p99_ms: f64,
    pub agent_rss_mib: f64,
    pub agent_cpu_ms_per_1k_changes: f64,
    pub nft_cpu_ms_per_1k_changes: f64,
    /// The largest `nft` process of the replay (its resident memory at its peak).
    pub nft_max_rss_mib: f64,
    pub changes: usize,
    pub change_rate_per_s: f64,
}

pub fn run(
    cp_binary: &Path,
    agent_binary: &Path,
    dir: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<Figures> {
    let prefix = format!("kb-{}", std::process::id());
    let mut network = NodeNetwork::new(&prefix).context("build the node network")?;
    let mut nodes = Vec::new();
    for i in 0..opts.agents {
        let ns = Netns::new(&format!("{prefix}-n{i}"))?;
        let addr = network.add(&ns, "eth0")?;
        nodes.push((ns, addr));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    progress("agents: starting a control plane");
    let state_dir = dir.join("agents");
    std::fs::create_dir_all(&state_dir)?;
    let cp = Process::start_on(
        cp_binary,
        &format!("embedded:{}", state_dir.join("store").display()),
        &state_dir,
        network.host.into(),
        &[],
    )?;
    let api = Api::new(&cp)?;
    progress(&format!(
        "agents: creating {} services and their endpoint slices",
        opts.services
    ));
    runtime.block_on(create_fillers(&api, opts.services - 1))?;
    let vip = runtime.block_on(measured_service(&api))?;
    let frontend = Frontend::tcp(SocketAddrV4::new(vip, 80));

    progress(&format!("agents: starting {} node agents", opts.agents));
    let pin_dirs: Vec<PathBuf> = (0..opts.agents)
        .map(|i| PathBuf::from(format!("/sys/fs/bpf/keel-{prefix}-{i}")))
        .collect();
    let mut agents = Vec::new();
    for (i, (ns, addr)) in nodes.iter().enumerate() {
        let args: Vec<String> = vec![
            "run".into(),
            "--node-name".into(),
            node_name(i),
            "--node-ip".into(),
            addr.to_string(),
            "--feed".into(),
            cp.feed_url.clone(),
            "--feed-ca".into(),
            cp.ca_file().display().to_string(),
            "--feed-token-file".into(),
            cp.node_token.display().to_string(),
            "--feed-credentials-dir".into(),
            cp.node_credentials_dir().display().to_string(),
            "--pin-dir".into(),
            pin_dirs[i].display().to_string(),
            "--socket-lb".into(),
            "off".into(),
            "--metrics-addr".into(),
            SocketAddr::from((*addr, 10249)).to_string(),
        ];
        let (ns_path, binary) = (ns.path(), agent_binary.to_owned());
        agents.push(AgentProcess::start(
            &format!("agent-{i}"),
            SocketAddr::from((*addr, 10249)),
            move || {
                let mut cmd = in_netns(&ns_path, &binary)?;
                cmd.args(&args).env("RUST_LOG", "warn");
                Ok(cmd)
            },
        )?);
    }
    let result = (|| -> Result<Figures> {
        for agent in &mut agents {
            agent.wait_healthy(Duration::from_secs(180))?;
        }
        let pinned: Vec<Pinned> = pin_dirs
            .iter()
            .map(|d| Pinned::open(d))
            .collect::<Result<_, _>>()?;
        // Every agent holds the measured service before anything is timed.
        wait_all(&pinned, &frontend, |_| true, Duration::from_secs(120))?;

        let mut latency = Latencies::default();
        for s in 0..opts.samples {
            progress(&format!(
                "agents: readiness to {} data planes, sample {}/{}",
                opts.agents,
                s + 1,
                opts.samples
            ));
            let k = s % PODS;
            let backend = pod_backend(k);
            let t0 = Instant::now();
            runtime.block_on(set_ready(&api, k, true))?;
            for t in wait_all(
                &pinned,
                &frontend,
                |b| b.contains(&backend),
                Duration::from_secs(10),
            )? {
                latency.push(t.saturating_duration_since(t0));
            }
            runtime.block_on(set_ready(&api, k, false))?;
            wait_all(
                &pinned,
                &frontend,
                |b| !b.contains(&backend),
                Duration::from_secs(10),
            )?;
        }

        progress(&format!(
            "agents: {} endpoint changes at {}/s",
            opts.changes, opts.change_rate
        ));
        let pid = agents[0].pid();
        let cpu_before = process_cpu(pid)?;
        let sequence = changes(opts.changes);
        runtime.block_on(async {
            let every = Duration::from_secs_f64(1.0 / opts.change_rate);
            let start = tokio::time::Instant::now();
            for (i, (k, ready)) in sequence.iter().enumerate() {
                tokio::time::sleep_until(start + every * i as u32).await;
                set_ready(&api, *k, *ready).await?;
            }
            anyhow::Ok(())
        })?;
        // The last change is in agent 0's data plane before its CPU is read.
        let want = final_backends(&sequence);
        wait_all(
            &pinned[..1],
            &frontend,
            |b| b.iter().copied().collect::<BTreeSet<_>>() == want,
            Duration::from_secs(30),
        )?;
        let agent_cpu = process_cpu(pid)?.saturating_sub(cpu_before);
        let rss = process_rss(pid)?;
        // Back to no ready pod, as the nftables replay starts.
        for k in 0..PODS {
            runtime.block_on(set_ready(&api, k, false))?;
        }

        progress("agents: the same changes through kube-proxy's nftables layout");
        let nft_cpu = nft_replay(&prefix, opts, &sequence, progress)?;
        let nft_rss = children_max_rss();
        let (p50, p99) = (latency.quantile(0.5), latency.quantile(0.99));
        let per_1k = |d: Duration| d.as_secs_f64() * 1e3 / opts.changes as f64 * 1000.0;
        Ok(Figures {
            e2e_agents: opts.agents,
            e2e_services: opts.services,
            e2e_samples: opts.samples * opts.agents,
            e2e_program_p50_ms: micros_to_ms(p50),
            e2e_program_p99_ms: micros_to_ms(p99),
            agent_rss_mib: rss as f64 / (1 << 20) as f64,
            agent_cpu_ms_per_1k_changes: per_1k(agent_cpu),
            nft_cpu_ms_per_1k_changes: per_1k(nft_cpu),
            nft_max_rss_mib: nft_rss as f64 / (1 << 20) as f64,
            changes: opts.changes,
            change_rate_per_s: opts.change_rate,
        })
    })();
    drop(agents);
    for dir in &pin_dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    drop(cp);
    drop(nodes);
    drop(network);
    result
}

fn micros_to_ms(micros: f64) -> f64 {
    (micros / 1e3 * 100.0).round() / 100.0
}

fn node_name(i: usize) -> String {
    format!("bench-node-{i}")
}

fn pod_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, 2 + k as u8)
}

fn pod_backend(k: usize) -> SocketAddrV4 {
    SocketAddrV4::new(pod_ip(k), 8080)
}

fn filler_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * FILLER_ENDPOINTS + j) as u32)
}

/// `count` services without selectors, each with an endpoint slice of 10 ready endpoints,
/// created by 32 concurrent clients.
async fn create_fillers(api: &Api, count: usize) -> Result<()> {
    let requests = (0..count).flat_map(|i| {
        let service = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("filler-{i}")},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
        let endpoints: Vec<Value> = (0..FILLER_ENDPOINTS)
            .map(|j| json!({"addresses": [filler_ip(i, j).to_string()], "conditions": {"ready": true}}))
            .collect();
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("filler-{i}-1"), "labels": {"kubernetes.io/service-name": format!("filler-{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints});
        [
            ("/api/v1/namespaces/default/services", service),
            (
                "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
                slice,
            ),
        ]
    });
    let mut results = futures::stream::iter(requests)
        .map(|(path, body)| async move { (path, api.call(Method::POST, path, Some(body)).await) })
        .buffer_unordered(32);
    while let Some((path, result)) = results.next().await {
        let (code, body) = result?;
        if code != 201 {
            bail!("create at {path}: {code}: {body}");
        }
    }
    Ok(())
}

/// The measured service (selector app=e2e) and its pods, bound to the first node, running and
/// not ready; its cluster IP.
async fn measured_service(api: &Api) -> Result<Ipv4Addr> {
    let (code, svc) = api
        .call(
            Method::POST,
            "/api/v1/namespaces/default/services",
            Some(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "e2e"},
                "spec": {"selector": {"app": "e2e"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})),
        )
        .await?;
    if code != 201 {
        bail!("create the measured service: {code}: {svc}");
    }
    for k in 0..PODS {
        let (code, body) = api
            .call(
                Method::POST,
                "/api/v1/namespaces/default/pods",
                Some(json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("e2e-{k}"), "labels": {"app": "e2e"}},
                    "spec": {"nodeName": node_name(0), "containers": [{"name": "web", "image": "keel/echo",
                        "ports": [{"name": "http", "containerPort": 8080}]}]}})),
            )
            .await?;
        if code != 201 {
            bail!("create pod e2e-{k}: {code}: {body}");
        }
        set_ready(api, k, false).await?;
    }
    svc["spec"]["clusterIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .context("the measured service has no cluster IP")
}

/// Writes pod `k`'s status as its kubelet would: running, ready or not.
async fn set_ready(api: &Api, k: usize, ready: bool) -> Result<()> {
    let ip = pod_ip(k).to_string();
    let resp = api
        .request(
            Method::PATCH,
            &format!("/api/v1/namespaces/default/pods/e2e-{k}/status"),
        )
        .header("content-type", "application/merge-patch+json")
        .body(
            json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
            .to_string(),
        )
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("set e2e-{k} ready={ready}: {}", resp.status());
    }
    Ok(())
}

/// Polls every data plane until `holds` is true of the frontend's backends; when each got
/// there.
fn wait_all(
    pinned: &[Pinned],
    frontend: &Frontend,
    holds: impl Fn(&[SocketAddrV4]) -> bool,
    timeout: Duration,
) -> Result<Vec<Instant>> {
    let deadline = Instant::now() + timeout;
    let mut at: Vec<Option<Instant>> = vec![None; pinned.len()];
    while at.iter().any(Option::is_none) {
        for (i, p) in pinned.iter().enumerate() {
            if at[i].is_none()
                && let Some((_, backends)) = p.service(frontend)?
                && holds(&backends)
            {
                at[i] = Some(Instant::now());
            }
        }
        if Instant::now() > deadline {
            let done = at.iter().filter(|t| t.is_some()).count();
            bail!(
                "{done} of {} data planes got there in {timeout:?}",
                pinned.len()
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(at.into_iter().flatten().collect())
}

/// The change stream: pods turn ready and not ready in turn, one change at a time.
fn changes(count: usize) -> Vec<(usize, bool)> {
    let mut ready = [false; PODS];
    (0..count)
        .map(|i| {
            let k = i % PODS;
            ready[k] = !ready[k];
            (k, ready[k])
        })
        .collect()
}

/// The measured service's backends once every change is applied.
fn final_backends(sequence: &[(usize, bool)]) -> BTreeSet<SocketAddrV4> {
    let mut ready = [false; PODS];
    for (k, r) in sequence {
        ready[*k] = *r;
    }
    (0..PODS).filter(|k| ready[*k]).map(pod_backend).collect()
}

/// The same services and changes through kube-proxy's nftables layout in a namespace of its
/// own, synced at most once per second; the CPU time of the `nft` processes it ran.
fn nft_replay(
    prefix: &str,
    opts: &Options,
    sequence: &[(usize, bool)],
    progress: &mut dyn FnMut(&str),
) -> Result<Duration> {
    let ns = Netns::new(&format!("{prefix}-nft"))?;
    let mut ready = [false; PODS];
    let build = |ready: &[bool; PODS]| -> ProxyState {
        let mut state: ProxyState = (0..opts.services - 1)
            .map(|i| Service {
                namespace: "default".into(),
                name: format!("filler-{i}"),
                cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i as u32),
                ports: vec![ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    endpoints: (0..FILLER_ENDPOINTS)
                        .map(|j| SocketAddrV4::new(filler_ip(i, j), 8080))
                        .collect(),
                    ..Default::default()
                }],
                session_affinity: None,
                ..Default::default()
            })
            .collect();
        state.insert(Service {
            namespace: "default".into(),
            name: "e2e".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 255, 254),
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                endpoints: (0..PODS).filter(|k| ready[*k]).map(pod_backend).collect(),
                ..Default::default()
            }],
            session_affinity: None,
            ..Default::default()
        });
        state
    };
    let config = ProxyConfig::default();
    progress(&format!(
        "agents: loading {} services into nftables (in steps of 1,000), replaying the changes",
        opts.services
    ));
    ns.run(|| -> Result<Duration> {
        let mut proxier = node_agent_proxy::start(Mode::Nftables, &config)?;
        proxier.load_in_steps(&build(&ready), 1000)?;
        let per_sync = (opts.change_rate.round() as usize).max(1);
        let before = children_cpu();
        let started = Instant::now();
        for (window, batch) in sequence.chunks(per_sync).enumerate() {
            // kube-proxy's minSyncPeriod: one sync per second of changes.
            let due = Duration::from_secs(window as u64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            for (k, r) in batch {
                ready[*k] = *r;
            }
            proxier.sync(&build(&ready))?;
        }
        let nft = children_cpu().saturating_sub(before);
        proxier.cleanup()?;
        Ok(nft)
    })?
}

/// A command that runs in the network namespace at `netns`.
fn in_netns(netns: &Path, binary: &Path) -> Result<std::process::Command> {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let fd = std::fs::File::open(netns)?;
    let mut cmd = std::process::Command::new(binary);
    // SAFETY: the hook only calls setns(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// CPU time of a process: the sum over its threads of the scheduler's nanosecond count
/// (/proc/<pid>/task/*/schedstat; /proc/<pid>/stat counts in 10 ms ticks, too coarse here).
fn process_cpu(pid: u32) -> Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
            total += stat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(Duration::from_nanos(total))
}

fn process_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

fn children_usage() -> libc::rusage {
    // SAFETY: getrusage fills the struct.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    }
}

/// CPU time of this process's waited-for children (the `nft` runs).
fn children_cpu() -> Duration {
    let usage = children_usage();
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The largest resident size any waited-for child reached (the biggest `nft` run), bytes.
fn children_max_rss() -> u64 {
    children_usage().ru_maxrss as u64 * 1024
}
