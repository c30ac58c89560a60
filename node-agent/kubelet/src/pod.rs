//! One pod's life on this node, as a state machine driven by its own task:
//!
//! - **Sandbox**: the pod's network namespace, wired by the CNI plugin (ADD, as the spec has a
//!   runtime call it), and the files its containers see (`/etc/hosts`, `/etc/resolv.conf`);
//! - **Containers**: each one waits (for its image, or in back-off), runs (under runc, probed),
//!   and terminates; the restart policy and kubelet's back-off (10 s doubling to 5 min, reset
//!   after 10 min of running) decide what comes next;
//! - **Terminating**: preStop hooks, SIGTERM, the grace period, SIGKILL, the containers
//!   removed, CNI DEL, the namespace removed; then the pod is reported gone.
//!
//! The status it reports (phase, conditions, container states with their reasons: `ErrImagePull`,
//! `ImagePullBackOff`, `CrashLoopBackOff`, `OOMKilled`, ...) is Kubernetes' own `PodStatus`.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
        ContainerStateWaiting, ContainerStatus, LifecycleHandler, PodCondition, PodIP, PodSpec,
        PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    Kubelet,
    image::ImageError,
    probe::{Kind, Probe, Target},
};

/// A pod bound to this node, as the source describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodDesired {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub spec: PodSpec,
    /// The pod is being deleted: stop it within the grace period, then report it gone.
    pub deleting: bool,
    pub grace_period_seconds: i64,
}

impl PodDesired {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What survives an agent restart about a pod (its sandbox), in `pods/<uid>/state.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Saved {
    ip: Option<Ipv4Addr>,
    started: Option<i64>,
    restarts: BTreeMap<String, i32>,
    /// Every init container completed (they never run again, even after an agent restart).
    #[serde(default)]
    initialized: bool,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Waiting { reason: String, message: String },
    Running { since: SystemTime },
    Terminated(Ended),
}

#[derive(Clone, Debug, PartialEq)]
struct Ended {
    exit_code: i32,
    reason: String,
    started: SystemTime,
    finished: SystemTime,
}

/// One container of the pod.
struct Run {
    spec: Container,
    /// An init container: runs to completion, in order, before the others start.
    init: bool,
    id: String,
    cgroup: String,
    state: State,
    restarts: i32,
    last: Option<Ended>,
    /// When the next start may happen (kubelet's back-off), and the current step.
    retry_at: Instant,
    backoff: Duration,
    started_at: Option<Instant>,
    startup: Option<Probe>,
    liveness: Option<Probe>,
    readiness: Option<Probe>,
    ready: bool,
}

const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

impl Run {
    fn ports(&self) -> Vec<(String, u16)> {
        self.spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
            .collect()
    }

    fn started(&self) -> bool {
        self.startup
            .as_ref()
            .is_none_or(|p| p.passing == Some(true))
    }
}

fn to_time(t: SystemTime) -> Time {
    let ts = jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    Time(ts)
}

/// Runs the pod until it is gone: `updates` brings new versions of its spec (deletion).
pub async fn run(kubelet: Arc<Kubelet>, mut updates: watch::Receiver<PodDesired>) {
    let mut pod = updates.borrow_and_update().clone();
    let dir = kubelet.root.join("pods").join(&pod.uid);
    let netns = PathBuf::from(format!("/run/netns/keel-{}", pod.uid));
    let mut saved: Saved = std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let has_init = pod
        .spec
        .init_containers
        .as_ref()
        .is_some_and(|c| !c.is_empty());
    let mut runs: Vec<Run> = pod
        .spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| (c, true))
        .chain(pod.spec.containers.iter().map(|c| (c, false)))
        .map(|(c, init)| {
            let id = container_id(&pod.uid, &c.name);
            Run {
                spec: c.clone(),
                init,
                cgroup: format!("{}/{}", pod_cgroup(&pod.uid), c.name),
                state: State::Waiting {
                    reason: if has_init {
                        "PodInitializing"
                    } else {
                        "ContainerCreating"
                    }
                    .into(),
                    message: String::new(),
                },
                restarts: saved.restarts.get(&c.name).copied().unwrap_or(0),
                last: None,
                retry_at: Instant::now(),
                backoff: kubelet.config.backoff_base,
                started_at: None,
                startup: None,
                liveness: None,
                readiness: None,
                ready: false,
                id,
            }
        })
        .collect();
    let mut reported: Option<PodStatus> = None;
    let mut on_disk: Option<Saved> = None;

    // The sandbox (or the one a previous agent left).
    let ip = loop {
        if pod.deleting {
            break None;
        }
        match block(|| sandbox(&kubelet, &pod, &dir, &netns, saved.ip)) {
            Ok(ip) => break Some(ip),
            Err(e) => {
                tracing::warn!(pod = %pod.key(), error = %e, "the pod's sandbox failed; retrying");
                let status = pending_status(&format!("sandbox: {e}"));
                report(&kubelet, &pod, &status, &mut reported).await;
                if wait_for_update(&mut updates, Duration::from_secs(2))
                    .await
                    .is_none()
                {
                    return;
                }
                pod = updates.borrow_and_update().clone();
            }
        }
    };
    if let Some(ip) = ip {
        saved.ip = Some(ip);
        saved
            .started
            .get_or_insert_with(|| jiff::Timestamp::now().as_second());
        save(&dir, &saved);
        on_disk = Some(saved.clone());
        kubelet.sandbox_ready(&netns, ip);
        // Containers a previous agent started and that still run are adopted as they are; init
        // containers it saw complete stay complete.
        for run in &mut runs {
            if run.init && saved.initialized {
                let now = SystemTime::now();
                run.state = State::Terminated(Ended {
                    exit_code: 0,
                    reason: "Completed".into(),
                    started: now,
                    finished: now,
                });
                continue;
            }
            if block(|| kubelet.runtime.state(&run.id)).is_some_and(|s| s.status == "running") {
                run.state = State::Running {
                    since: SystemTime::now(),
                };
                run.started_at = Some(Instant::now());
                arm_probes(run);
                tracing::info!(pod = %pod.key(), container = %run.spec.name, "adopted a running container");
            }
        }
    }

    let mut tick = tokio::time::interval(kubelet.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if pod.deleting {
            terminate(&kubelet, &pod, &mut runs, &netns, &dir).await;
            return;
        }
        let ip = ip.expect("a sandbox unless deleting");
        let policy = pod.spec.restart_policy.as_deref().unwrap_or("Always");
        // Init containers one at a time, in order, each to success (kubelet restarts a failed
        // one unless the pod's policy is Never); then the others, all together.
        let next_init = runs
            .iter()
            .position(|r| r.init && !saved.initialized && !completed(r));
        match next_init {
            Some(i) => {
                let init_policy = if policy == "Never" {
                    "Never"
                } else {
                    "OnFailure"
                };
                step(&kubelet, &pod, &mut runs[i], init_policy, ip, &netns).await;
            }
            None => {
                saved.initialized = true;
                for run in runs.iter_mut().filter(|r| !r.init) {
                    step(&kubelet, &pod, run, policy, ip, &netns).await;
                }
            }
        }
        for run in &runs {
            saved.restarts.insert(run.spec.name.clone(), run.restarts);
        }
        // Written when it changed only: a file per pod per tick costs the filesystem dearly
        // (ext4 searches past recently deleted inodes for each new one).
        if on_disk.as_ref() != Some(&saved) {
            save(&dir, &saved);
            on_disk = Some(saved.clone());
        }
        let status = pod_status(&runs, saved.initialized, Some(ip), saved.started);
        report(&kubelet, &pod, &status, &mut reported).await;
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    // The kubelet dropped the pod without a deletion (force-deleted): stop it now.
                    pod.deleting = true;
                    pod.grace_period_seconds = 0;
                    continue;
                }
                pod = updates.borrow_and_update().clone();
            }
            _ = tick.tick() => {}
        }
    }
}

async fn wait_for_update(updates: &mut watch::Receiver<PodDesired>, wait: Duration) -> Option<()> {
    match tokio::time::timeout(wait, updates.changed()).await {
        Ok(Err(_)) => None,
        _ => Some(()),
    }
}

/// The pod's cgroup (its containers' are below it).
fn pod_cgroup(uid: &str) -> String {
    format!("/keel/{uid}")
}

pub fn container_id(uid: &str, name: &str) -> String {
    format!("{uid}-{name}")
}

fn save(dir: &Path, saved: &Saved) {
    let tmp = dir.join("state.json.tmp");
    if std::fs::write(&tmp, serde_json::to_vec(saved).expect("serializes")).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join("state.json"));
    }
}

/// The pod's network namespace, wired by CNI, and its files; idempotent (CNI ADD returns the
/// same address to a retried or adopted sandbox).
fn sandbox(
    kubelet: &Kubelet,
    pod: &PodDesired,
    dir: &Path,
    netns: &Path,
    _previous: Option<Ipv4Addr>,
) -> anyhow::Result<Ipv4Addr> {
    std::fs::create_dir_all(dir)?;
    if !netns.exists() {
        node_agent_netns::netns::create_at(netns)?;
    }
    let network = kubelet.network()?;
    let result = network.add(&pod.uid, netns, "eth0")?;
    let ip = result
        .ipv4()
        .ok_or_else(|| anyhow::anyhow!("the CNI result has no IPv4 address"))?;
    std::fs::write(
        dir.join("hosts"),
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{}\n",
            pod.spec.hostname.as_deref().unwrap_or(&pod.name)
        ),
    )?;
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let nameservers: String = host_resolv
        .lines()
        .filter(|l| l.starts_with("nameserver"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        dir.join("resolv.conf"),
        format!(
            "search {ns}.svc.cluster.local svc.cluster.local cluster.local\n{nameservers}options ndots:5\n",
            ns = pod.namespace
        ),
    )?;
    Ok(ip)
}

fn arm_probes(run: &mut Run) {
    let now = Instant::now();
    run.startup = run
        .spec
        .startup_probe
        .clone()
        .map(|p| Probe::new(Kind::Startup, p, now));
    run.liveness = run
        .spec
        .liveness_probe
        .clone()
        .map(|p| Probe::new(Kind::Liveness, p, now));
    run.readiness = run
        .spec
        .readiness_probe
        .clone()
        .map(|p| Probe::new(Kind::Readiness, p, now));
    run.ready = false;
}

/// An init container that ran to success.
fn completed(run: &Run) -> bool {
    matches!(&run.state, State::Terminated(e) if e.exit_code == 0)
}

/// One step of one container's life; `policy` is the restart policy that applies to it.
async fn step(
    kubelet: &Arc<Kubelet>,
    pod: &PodDesired,
    run: &mut Run,
    policy: &str,
    ip: Ipv4Addr,
    netns: &Path,
) {
    let now = Instant::now();
    match run.state.clone() {
        State::Waiting { reason, .. } => {
            if now < run.retry_at {
                return;
            }
            let image = match kubelet
                .images
                .resolve(run.spec.image.as_deref().unwrap_or(""))
            {
                Ok(image) => image,
                Err(e @ ImageError::NotFound(_)) => {
                    // kubelet's reasons: the first failure, then the back-off between tries.
                    let reason = if reason == "ErrImagePull" || reason == "ImagePullBackOff" {
                        "ImagePullBackOff"
                    } else {
                        "ErrImagePull"
                    };
                    run.state = State::Waiting {
                        reason: reason.into(),
                        message: format!("Back-off pulling image: {e}"),
                    };
                    run.retry_at = now + run.backoff;
                    run.backoff = (run.backoff * 2).min(kubelet.config.backoff_max);
                    return;
                }
                Err(e) => {
                    run.state = State::Waiting {
                        reason: "ErrImagePull".into(),
                        message: e.to_string(),
                    };
                    run.retry_at = now + run.backoff;
                    return;
                }
            };
            let spec = match kubelet.container_spec(
                pod,
                &run.spec,
                &run.id,
                &run.cgroup,
                run.restarts,
                &image,
                netns,
            ) {
                Ok(spec) => spec,
                Err(message) => {
                    run.state = State::Waiting {
                        reason: "CreateContainerConfigError".into(),
                        message,
                    };
                    run.retry_at = now + run.backoff;
                    run.backoff = (run.backoff * 2).min(kubelet.config.backoff_max);
                    return;
                }
            };
            let runtime = kubelet.clone();
            let result = tokio::task::spawn_blocking(move || runtime.runtime.start(&image, &spec))
                .await
                .expect("the start task");
            match result {
                Ok(()) => {
                    run.state = State::Running {
                        since: SystemTime::now(),
                    };
                    run.started_at = Some(Instant::now());
                    arm_probes(run);
                }
                Err(e) => {
                    tracing::warn!(pod = %pod.key(), container = %run.spec.name, error = %e, "container start failed");
                    run.state = State::Waiting {
                        reason: "CreateContainerError".into(),
                        message: e.to_string(),
                    };
                    run.retry_at = now + run.backoff;
                    run.backoff = (run.backoff * 2).min(kubelet.config.backoff_max);
                }
            }
        }
        State::Running { since } => {
            if let Some(code) = kubelet.runtime.exit_code(&run.id) {
                let reason = if kubelet.runtime.oom_killed(&run.id) {
                    "OOMKilled"
                } else if code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                let ended = Ended {
                    exit_code: code,
                    reason: reason.into(),
                    started: since,
                    finished: SystemTime::now(),
                };
                let ran = run.started_at.map(|t| t.elapsed()).unwrap_or_default();
                let id = run.id.clone();
                let rt = kubelet.clone();
                let _ = tokio::task::spawn_blocking(move || rt.runtime.remove(&id)).await;
                run.ready = false;
                let restart = match policy {
                    "Never" => false,
                    "OnFailure" => code != 0,
                    _ => true,
                };
                if !restart {
                    run.state = State::Terminated(ended);
                    return;
                }
                if ran >= BACKOFF_RESET_AFTER {
                    run.backoff = kubelet.config.backoff_base;
                }
                run.restarts += 1;
                run.retry_at = Instant::now() + run.backoff;
                run.state = State::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: format!(
                        "back-off {:?} restarting failed container={} pod={}",
                        run.backoff, run.spec.name, pod.name
                    ),
                };
                run.backoff = (run.backoff * 2).min(kubelet.config.backoff_max);
                run.last = Some(ended);
                return;
            }
            let log = crate::logs::log_path(&kubelet.root, pod, &run.spec.name, run.restarts);
            if let Err(e) = crate::logs::rotate(&log, kubelet.config.log_max_bytes) {
                tracing::debug!(log = %log.display(), error = %e, "log rotation");
            }
            // Probes: startup first; liveness and readiness once started.
            let ports = run.ports();
            let target = Target {
                runtime: &kubelet.runtime,
                container_id: &run.id,
                netns,
                pod_ip: ip,
                ports: &ports,
            };
            let mut kill = None;
            if let Some(p) = run.startup.as_mut().filter(|p| p.passing != Some(true)) {
                if p.due(now) && block(|| p.run(&target)) == Some(false) {
                    kill = Some(format!("startup probe failed: {}", p.last_message));
                }
            } else {
                if let Some(p) = run.liveness.as_mut()
                    && p.due(now)
                    && block(|| p.run(&target)) == Some(false)
                {
                    kill = Some(format!("liveness probe failed: {}", p.last_message));
                }
                match run.readiness.as_mut() {
                    Some(p) => {
                        if p.due(now) {
                            block(|| p.run(&target));
                        }
                        run.ready = p.passing == Some(true);
                    }
                    None => run.ready = true,
                }
            }
            if let Some(why) = kill {
                tracing::info!(pod = %pod.key(), container = %run.spec.name, %why, "restarting the container");
                run.ready = false;
                let _ = block(|| kubelet.runtime.kill(&run.id, "KILL"));
            }
        }
        State::Terminated(_) => {}
    }
}

/// Runs blocking work (a probe, runc, CNI) in place, letting the worker's other tasks move to
/// another thread meanwhile (each is short and bounded by its own timeout).
fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Stops the pod as Kubernetes does, then reports it gone.
async fn terminate(
    kubelet: &Arc<Kubelet>,
    pod: &PodDesired,
    runs: &mut [Run],
    netns: &Path,
    dir: &Path,
) {
    let grace = Duration::from_secs(pod.grace_period_seconds.max(0) as u64);
    let deadline = Instant::now() + grace;
    let running: Vec<usize> = (0..runs.len())
        .filter(|&i| matches!(runs[i].state, State::Running { .. }))
        .collect();
    // preStop hooks, bounded by the grace period.
    for &i in &running {
        if let Some(hook) = runs[i]
            .spec
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            pre_stop(kubelet, &runs[i], hook, netns, left).await;
        }
    }
    for &i in &running {
        let _ = block(|| kubelet.runtime.kill(&runs[i].id, "TERM"));
    }
    loop {
        let alive: Vec<usize> = running
            .iter()
            .copied()
            .filter(|&i| kubelet.runtime.exit_code(&runs[i].id).is_none())
            .collect();
        if alive.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for i in alive {
                let _ = block(|| kubelet.runtime.kill(&runs[i].id, "KILL"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rt = kubelet.clone();
    let ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
    let uid = pod.uid.clone();
    let netns_owned = netns.to_path_buf();
    let dir_owned = dir.to_path_buf();
    let cleanup = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for id in &ids {
            rt.runtime.remove(id)?;
        }
        rt.runtime.remove_cgroup(&pod_cgroup(&uid));
        rt.network()?.del(
            &uid,
            Some(&netns_owned)
                .filter(|p| p.exists())
                .map(|p| p.as_path()),
            "eth0",
            None,
        )?;
        rt.sandbox_gone(&netns_owned);
        if netns_owned.exists() {
            node_agent_netns::netns::remove_at(&netns_owned)?;
        }
        let _ = std::fs::remove_dir_all(&dir_owned);
        Ok(())
    })
    .await
    .expect("the cleanup task");
    if let Err(e) = cleanup {
        tracing::warn!(pod = %pod.key(), error = format!("{e:#}"), "cleaning up the pod");
    }
    kubelet.logs_gone(pod);
    if let Err(e) = kubelet.reporter.deleted(pod).await {
        tracing::warn!(pod = %pod.key(), error = format!("{e:#}"), "reporting the pod gone failed");
    }
}

async fn pre_stop(
    kubelet: &Arc<Kubelet>,
    run: &Run,
    hook: &LifecycleHandler,
    netns: &Path,
    left: Duration,
) {
    if let Some(exec) = &hook.exec {
        let command = exec.command.clone().unwrap_or_default();
        let (rt, id) = (kubelet.clone(), run.id.clone());
        let _ = tokio::task::spawn_blocking(move || rt.runtime.exec(&id, &command, left)).await;
    } else if let Some(http) = &hook.http_get {
        let port = match &http.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p as u16,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => run
                .ports()
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| p)
                .unwrap_or(0),
        };
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let netns = netns.to_path_buf();
        let ip = kubelet.pod_ip_of(&netns);
        let _ = tokio::task::spawn_blocking(move || {
            crate::probe::in_netns(&netns, || {
                let addr = std::net::SocketAddr::from((ip.unwrap_or(Ipv4Addr::LOCALHOST), port));
                let mut s = std::net::TcpStream::connect_timeout(
                    &addr,
                    left.max(Duration::from_millis(100)),
                )
                .map_err(|e| e.to_string())?;
                use std::io::Write;
                let _ = write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
                );
                Ok(())
            })
        })
        .await;
    }
}

async fn report(
    kubelet: &Kubelet,
    pod: &PodDesired,
    status: &PodStatus,
    reported: &mut Option<PodStatus>,
) {
    if reported.as_ref().is_some_and(|r| same(r, status)) {
        return;
    }
    match kubelet.reporter.status(pod, status).await {
        Ok(()) => *reported = Some(status.clone()),
        Err(e) => {
            tracing::warn!(pod = %pod.key(), error = format!("{e:#}"), "reporting the pod's status failed")
        }
    }
}

/// Equal but for timestamps (a report is only sent when something a user sees changed).
fn same(a: &PodStatus, b: &PodStatus) -> bool {
    let strip = |s: &PodStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_transition_time = None;
            c.last_probe_time = None;
        }
        s
    };
    strip(a) == strip(b)
}

fn condition(type_: &str, ok: bool) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        last_transition_time: Some(Time(jiff::Timestamp::now())),
        ..Default::default()
    }
}

fn pending_status(message: &str) -> PodStatus {
    PodStatus {
        phase: Some("Pending".into()),
        message: Some(message.to_owned()),
        conditions: Some(vec![
            condition("PodScheduled", true),
            condition("Initialized", true),
            condition("ContainersReady", false),
            condition("Ready", false),
        ]),
        ..Default::default()
    }
}

/// The pod's status as Kubernetes shows it.
fn pod_status(
    runs: &[Run],
    initialized: bool,
    ip: Option<Ipv4Addr>,
    started: Option<i64>,
) -> PodStatus {
    let status_of = |r: &Run| ContainerStatus {
        name: r.spec.name.clone(),
        image: r.spec.image.clone().unwrap_or_default(),
        image_id: String::new(),
        container_id: Some(format!("keel://{}", r.id)),
        ready: if r.init { completed(r) } else { r.ready },
        restart_count: r.restarts,
        started: Some(matches!(r.state, State::Running { .. }) && r.started()),
        state: Some(state_of(&r.state)),
        last_state: r
            .last
            .as_ref()
            .map(|e| state_of(&State::Terminated(e.clone()))),
        ..Default::default()
    };
    let (init, main): (Vec<&Run>, Vec<&Run>) = runs.iter().partition(|r| r.init);
    let all_ready = !main.is_empty() && main.iter().all(|r| r.ready);
    let any_running = main
        .iter()
        .any(|r| matches!(r.state, State::Running { .. }));
    let all_ended = main.iter().all(|r| matches!(r.state, State::Terminated(_)));
    let failed = |r: &&Run| matches!(&r.state, State::Terminated(e) if e.exit_code != 0);
    let phase = if !initialized {
        // An init container that failed and will not be restarted (policy Never) fails the pod.
        if init.iter().any(failed) {
            "Failed"
        } else {
            "Pending"
        }
    } else if all_ended && !main.is_empty() {
        if main.iter().any(failed) {
            "Failed"
        } else {
            "Succeeded"
        }
    } else if any_running || main.iter().any(|r| r.restarts > 0) {
        "Running"
    } else {
        "Pending"
    };
    PodStatus {
        phase: Some(phase.into()),
        pod_ip: ip.map(|i| i.to_string()),
        pod_ips: ip.map(|i| vec![PodIP { ip: i.to_string() }]),
        start_time: started
            .and_then(|s| jiff::Timestamp::from_second(s).ok())
            .map(Time),
        conditions: Some(vec![
            condition("PodScheduled", true),
            condition("Initialized", initialized),
            condition("ContainersReady", all_ready),
            condition("Ready", all_ready),
        ]),
        init_container_statuses: (!init.is_empty())
            .then(|| init.iter().map(|r| status_of(r)).collect()),
        container_statuses: Some(main.iter().map(|r| status_of(r)).collect()),
        ..Default::default()
    }
}

fn state_of(state: &State) -> ContainerState {
    match state {
        State::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: (!message.is_empty()).then(|| message.clone()),
            }),
            ..Default::default()
        },
        State::Running { since } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(to_time(*since)),
            }),
            ..Default::default()
        },
        State::Terminated(e) => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: e.exit_code,
                reason: Some(e.reason.clone()),
                started_at: Some(to_time(e.started)),
                finished_at: Some(to_time(e.finished)),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}
