//! The node agent against a real control plane, with real traffic. Each test builds a lab (a
//! node with a client pod and backend pods, as network namespaces) linked to the host, starts
//! a control plane serving on the host's end of the link, and runs `node-agent` in the node:
//! fed by the control plane's feed, or by its Kubernetes API through a kubeconfig (kube-rs's
//! watcher, as in a standard cluster). Pods are created through the API bound to the node and
//! their status is written as a kubelet would (IP, Ready); the EndpointSlice controller does
//! the rest. Connections go from the client pod to the services' cluster IPs: only the data
//! plane the agent programs makes them work.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use control_plane::launch::{Api, Process};
use control_plane_api::{
    feed::{RegisterRequest, Resources},
    session,
};
use control_plane_store::etcd_process::EtcdProcess;
use node_agent::launch::AgentProcess;
use node_agent_netns::{
    echo::EchoServer,
    lab::{HostLink, Lab},
    netns::{Netns, veth},
    traffic::{Connection, tcp_request},
};
use reqwest::Method;
use serde_json::{Value, json};

const NODE: &str = "node-1";
const OTHER_NODE: &str = "node-2";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Feed,
    Kubeconfig,
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the agent tests load eBPF programs and build network namespaces: run them as root"
    );
}

/// A lab, a control plane on the host end of its link, and an agent in its node; all removed
/// when the test ends, also when it fails.
struct Cluster {
    // Dropped in this order: the agent, the control plane, the lab.
    agent: AgentProcess,
    cp: Process,
    api: Api,
    rt: tokio::runtime::Runtime,
    pin_dir: PathBuf,
    _etcd: Option<EtcdProcess>,
    _nodes: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
    _link: HostLink,
    lab: Lab,
}

impl Cluster {
    fn start(test: &str, source: Source, etcd: bool) -> Self {
        Self::start_with(test, source, etcd, "pods")
    }

    /// With `--socket-lb <socket_lb>`; pod interfaces `cli*` and namespaces `<lab>-client*`.
    fn start_with(test: &str, source: Source, etcd: bool, socket_lb: &str) -> Self {
        require_root();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let prefix = format!("ka-{}-{test}", std::process::id());
        let lab = Lab::new(&prefix, 3).expect("build the lab");
        let link = lab.link_host().expect("link the lab's node to the host");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let etcd_process = etcd.then(|| rt.block_on(EtcdProcess::start()).expect("start etcd"));
        let dir = tempfile::tempdir().unwrap();
        let store = match &etcd_process {
            Some(e) => format!("etcd:{}", e.endpoint),
            None => format!("embedded:{}", dir.path().join("store").display()),
        };
        let cp = Process::start_on(
            &sibling_binary("control-plane"),
            &store,
            dir.path(),
            link.host.into(),
            &["--node-monitor-grace-period", "30"],
        )
        .expect("start the control plane");
        let api = Api::new(&cp).expect("an API client");

        // The other node is registered (and kept alive) as its kubelet would; so is this one
        // when the agent does not register it itself (a standard cluster's kube-proxy).
        let mut nodes = vec![rt.block_on(play_node(&cp, OTHER_NODE))];
        if source == Source::Kubeconfig {
            nodes.push(rt.block_on(play_node(&cp, NODE)));
        }

        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/keel-ka-{test}-{}", std::process::id()));
        let metrics_addr = SocketAddr::from((link.node, 10249));
        let mut args: Vec<String> = vec![
            "run".into(),
            "--node-name".into(),
            NODE.into(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            "--pod-interfaces".into(),
            "cli*".into(),
            "--pod-netns".into(),
            format!("{}*", lab.client.path().display()),
            "--socket-lb".into(),
            socket_lb.into(),
            "--metrics-addr".into(),
            metrics_addr.to_string(),
        ];
        match source {
            Source::Feed => args.extend([
                "--feed".into(),
                cp.feed_url.clone(),
                "--feed-ca".into(),
                cp.ca_file().display().to_string(),
                "--feed-token-file".into(),
                cp.node_token.display().to_string(),
                "--feed-credentials-dir".into(),
                cp.node_credentials_dir().display().to_string(),
                "--node-ip".into(),
                link.node.to_string(),
                "--zone".into(),
                "zone-a".into(),
                "--heartbeat".into(),
                "2".into(),
            ]),
            Source::Kubeconfig => {
                args.extend(["--kubeconfig".into(), cp.kubeconfig.display().to_string()])
            }
        }
        let node = lab.node.path();
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_node-agent"));
        let mut agent = AgentProcess::start(&format!("agent[{test}]"), metrics_addr, move || {
            let mut cmd = in_netns(&node, &binary)?;
            cmd.args(&args).env("RUST_LOG", "info");
            Ok(cmd)
        })
        .expect("start the agent");
        agent
            .wait_healthy(Duration::from_secs(60))
            .expect("the agent syncs a complete view");
        Self {
            agent,
            cp,
            api,
            rt,
            pin_dir,
            _etcd: etcd_process,
            _nodes: nodes,
            _dir: dir,
            _link: link,
            lab,
        }
    }

    fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.rt
            .block_on(self.api.call(method, path, body))
            .expect("request")
    }

    fn create(&self, path: &str, body: Value) -> Value {
        let (code, obj) = self.call(Method::POST, path, Some(body));
        assert_eq!(code, 201, "create at {path}: {obj}");
        obj
    }

    /// A pod bound to `node` whose container serves "http" on `port`.
    fn pod(&self, name: &str, app: &str, node: &str, port: u16) {
        self.create(
            "/api/v1/namespaces/default/pods",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": {"app": app}},
                "spec": {"nodeName": node, "containers": [{"name": "web", "image": "keel/echo",
                    "ports": [{"name": "http", "containerPort": port}]}]}
            }),
        );
    }

    /// Writes a pod's status as its kubelet would: running at `ip`, ready or not.
    fn pod_status(&self, name: &str, ip: Ipv4Addr, ready: bool) {
        let ready = if ready { "True" } else { "False" };
        let resp = self.rt.block_on(async {
            self.api
                .request(
                    Method::PATCH,
                    &format!("/api/v1/namespaces/default/pods/{name}/status"),
                )
                .header("content-type", "application/merge-patch+json")
                .body(
                    json!({"status": {"phase": "Running", "podIP": ip.to_string(),
                        "podIPs": [{"ip": ip.to_string()}],
                        "conditions": [{"type": "Ready", "status": ready}]}})
                    .to_string(),
                )
                .send()
                .await
                .expect("patch the pod's status")
        });
        assert!(
            resp.status().is_success(),
            "status of {name}: {}",
            resp.status()
        );
    }

    /// A service of one port "http" (80 → target port "http") selecting `app`; its cluster IP.
    fn service(&self, name: &str, app: &str, local: bool) -> Ipv4Addr {
        let mut spec = json!({"selector": {"app": app},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]});
        if local {
            spec["internalTrafficPolicy"] = json!("Local");
        }
        let svc = self.create(
            "/api/v1/namespaces/default/services",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}),
        );
        svc["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .expect("a cluster IP")
    }

    fn backend_ip(&self, i: usize) -> Ipv4Addr {
        *self.lab.backends[i].addr.ip()
    }

    /// Who answers `n` connections to `vip:80` from the client pod (errors counted as such).
    fn answers(&self, vip: Ipv4Addr, n: usize) -> BTreeMap<String, usize> {
        let to = SocketAddrV4::new(vip, 80);
        self.lab
            .client
            .run(move || {
                let mut seen = BTreeMap::new();
                for _ in 0..n {
                    let who =
                        tcp_request(to).unwrap_or_else(|e| format!("error: {}", e.root_cause()));
                    *seen.entry(who).or_insert(0) += 1;
                }
                seen
            })
            .unwrap()
    }

    /// Polls until connections to `vip` are answered by exactly `expected`.
    fn serves(&self, vip: Ipv4Addr, expected: &[&str], why: &str) {
        let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.answers(vip, 24);
            let got: BTreeSet<String> = seen.keys().cloned().collect();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{why}: connections to {vip}:80 should reach {want:?}, got {seen:?}\nagent:\n{}",
                self.agent.recent_logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The frontends the data plane holds, read back from its pinned maps.
    fn frontends(&self) -> Vec<String> {
        ebpf_dataplane::Pinned::open(&self.pin_dir)
            .expect("the agent's pinned maps")
            .services()
            .expect("read services")
            .into_iter()
            .map(|(f, ..)| f.to_string())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agent.kill();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A command that runs in the network namespace at `netns`.
fn in_netns(netns: &Path, binary: &Path) -> anyhow::Result<Command> {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let fd = std::fs::File::open(netns)?;
    let mut cmd = Command::new(binary);
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

/// A binary of the workspace next to this test's (`cargo xtask test` builds them all).
fn sibling_binary(name: &str) -> PathBuf {
    let path = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build it (`cargo build -p {name}`; `cargo xtask test` builds every binary)",
        path.display()
    );
    path
}

/// Registers `name` over the feed and keeps its lease fresh, as its kubelet would.
async fn play_node(cp: &Process, name: &str) -> tokio::task::JoinHandle<()> {
    let (client, _, _) = cp
        .join(RegisterRequest {
            node_name: name.into(),
            internal_ip: "192.0.2.20".into(),
            capacity: Some(Resources {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                pods: 110,
            }),
            ..Default::default()
        })
        .await
        .expect("join the feed");
    tokio::spawn(session::heartbeat(
        client,
        name.into(),
        Duration::from_secs(2),
        || true,
    ))
}

/// The scenario both sources must pass.
fn kube_proxy_semantics(test: &str, source: Source, etcd: bool) {
    let c = Cluster::start(test, source, etcd);
    // backend-3 serves the service's "http" port on 9091 (named ports differ per pod).
    let alt = SocketAddrV4::new(c.backend_ip(2), 9091);
    let _alt_server = c.lab.backends[2]
        .ns
        .run(move || EchoServer::start(alt, "backend-3-alt"))
        .unwrap()
        .expect("start the second server of backend-3");
    c.pod("web-1", "web", NODE, 8080);
    c.pod("web-2", "web", NODE, 8080);
    c.pod("web-3", "web", NODE, 9091);
    let web = c.service("web", "web", false);
    c.pod_status("web-1", c.backend_ip(0), true);
    c.pod_status("web-2", c.backend_ip(1), true);
    c.pod_status("web-3", c.backend_ip(2), false);
    c.serves(web, &["backend-1", "backend-2"], "only ready endpoints");

    c.pod_status("web-1", c.backend_ip(0), false);
    c.serves(web, &["backend-2"], "an endpoint turned not ready");

    c.pod_status("web-3", c.backend_ip(2), true);
    c.serves(
        web,
        &["backend-2", "backend-3-alt"],
        "the named port of each pod",
    );

    // Terminating but still serving, and nothing else: kept (KEP-1669).
    c.pod("drain-1", "drain", NODE, 8080);
    let drain = c.service("drain", "drain", false);
    c.pod_status("drain-1", c.backend_ip(0), true);
    c.serves(drain, &["backend-1"], "the drain service");
    let (code, _) = c.call(
        Method::DELETE,
        "/api/v1/namespaces/default/pods/drain-1?gracePeriodSeconds=300",
        None,
    );
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, slices) = c.call(
            Method::GET,
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Ddrain",
            None,
        );
        let terminating = slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .any(|e| e["conditions"]["terminating"] == json!(true));
        if terminating {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the endpoint never turned terminating"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    c.serves(
        drain,
        &["backend-1"],
        "a serving, terminating endpoint when none is ready",
    );

    // internalTrafficPolicy: Local keeps this node's endpoints only.
    c.pod("local-1", "local", NODE, 8080);
    c.pod("local-2", "local", OTHER_NODE, 8080);
    let local = c.service("local", "local", true);
    c.pod_status("local-1", c.backend_ip(0), true);
    c.pod_status("local-2", c.backend_ip(1), true);
    c.serves(local, &["backend-1"], "internalTrafficPolicy Local");

    // A service without endpoints refuses at once; deleted, it leaves the data plane.
    let gone = c.service("gone", "nothing", false);
    let refused = c.answers(gone, 3);
    assert!(
        refused.keys().all(|k| k.contains("refused")),
        "a service without endpoints refuses: {refused:?}"
    );
    let frontend = format!("tcp/{gone}:80");
    assert!(c.frontends().contains(&frontend));
    let (code, _) = c.call(
        Method::DELETE,
        "/api/v1/namespaces/default/services/gone",
        None,
    );
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.frontends().contains(&frontend) {
        assert!(
            Instant::now() < deadline,
            "the deleted service stays in the data plane"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let status = c.agent.status().expect("/status");
    assert!(status.sync.synced && status.view_complete, "{status:?}");
    assert_eq!(
        status.sync.services, 4,
        "web, drain, local and default/kubernetes: {status:?}"
    );
}

#[test]
fn fed_by_the_feed_it_serves_what_kube_proxy_would() {
    kube_proxy_semantics("feed", Source::Feed, false);
}

#[test]
fn fed_by_a_kubeconfig_it_serves_what_kube_proxy_would() {
    kube_proxy_semantics("kcfg", Source::Kubeconfig, false);
}

#[test]
fn fed_by_a_kubeconfig_on_etcd_it_serves_what_kube_proxy_would() {
    kube_proxy_semantics("kcetcd", Source::Kubeconfig, true);
}

/// Connections opened every few milliseconds from the client pod, counting failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Traffic {
    fn start(lab: &Lab, vip: Ipv4Addr) -> Self {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let fd = std::fs::File::open(lab.client.path()).unwrap();
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on an fd we own, on a thread of our own.
            assert_eq!(
                unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let mut errors = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match tcp_request(SocketAddrV4::new(vip, 80)) {
                    Ok(_) => o.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        errors.push(format!("{:#}", e));
                        f.fetch_add(1, Ordering::SeqCst)
                    }
                };
                std::thread::sleep(Duration::from_millis(5));
            }
            errors
        });
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops; (succeeded, failed, the first errors).
    fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.thread.take().unwrap().join().unwrap();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            errors.into_iter().take(5).collect(),
        )
    }
}

#[test]
fn it_never_drops_a_flow_of_its_own_accord() {
    let mut c = Cluster::start("resil", Source::Feed, false);
    c.pod("web-1", "web", NODE, 8080);
    c.pod("web-2", "web", NODE, 8080);
    let web = c.service("web", "web", false);
    c.pod_status("web-1", c.backend_ip(0), true);
    c.pod_status("web-2", c.backend_ip(1), true);
    c.serves(web, &["backend-1", "backend-2"], "both endpoints");

    let to = SocketAddrV4::new(web, 80);
    let mut persistent = c
        .lab
        .client
        .run(move || Connection::open(to))
        .unwrap()
        .expect("a persistent connection");
    let traffic = Traffic::start(&c.lab, web);

    // kill -9 under traffic, then start again: it adopts the pinned data plane.
    std::thread::sleep(Duration::from_millis(500));
    c.agent.kill();
    std::thread::sleep(Duration::from_secs(2));
    c.agent.restart().expect("restart the agent");
    c.agent
        .wait_healthy(Duration::from_secs(30))
        .expect("healthy again");
    persistent
        .ask()
        .expect("the persistent connection survives the restart");

    // The control plane gone for 60 s: the data plane serves the last state.
    c.cp.kill();
    std::thread::sleep(Duration::from_secs(60));
    let status = c.agent.status().expect("/status");
    assert!(!status.source_connected, "the agent noticed: {status:?}");
    persistent
        .ask()
        .expect("the persistent connection survives the outage");
    c.cp.resume().expect("start the control plane again");
    // It reconnects (capped back-off) and converges on what changed since.
    c.pod_status("web-1", c.backend_ip(0), false);
    c.serves(
        web,
        &["backend-2"],
        "a change after the control plane came back",
    );
    let (ok, failed, errors) = traffic.finish();
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed: {errors:?}",
        ok + failed
    );
    assert!(ok > 1000, "traffic kept flowing: {ok} connections");
    let status = c.agent.status().expect("/status");
    assert!(
        status.source_connected && status.source_reconnects >= 1,
        "reconnected: {status:?}"
    );
}

#[test]
fn pods_and_host_processes_that_appear_later_are_covered_and_metrics_move() {
    let c = Cluster::start_with("metrics", Source::Feed, false, "all");
    c.pod("web-1", "web", NODE, 8080);
    let web = c.service("web", "web", false);
    c.pod_status("web-1", c.backend_ip(0), true);
    c.serves(web, &["backend-1"], "the service");

    let value = |text: &str, metric: &str, labels: &[(&str, &str)]| -> f64 {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("the metrics parse as Prometheus text");
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                // A histogram: how many observations (its +Inf bucket).
                prometheus_parse::Value::Histogram(ref buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                ref other => panic!("a number, not {other:?}"),
            })
            .unwrap_or_else(|| panic!("{metric}{labels:?} is missing:\n{text}"))
    };
    let forwarded = |text: &str| {
        value(
            text,
            "keel_dataplane_packets_total",
            &[("counter", "sock_lb_forward")],
        )
    };
    let text = c.agent.metrics().expect("/metrics");
    // The test's service, and default/kubernetes, whose endpoint is the control plane.
    assert_eq!(value(&text, "keel_agent_services", &[]), 2.0);
    assert_eq!(value(&text, "keel_agent_endpoints", &[]), 2.0);
    assert_eq!(value(&text, "keel_agent_source_connected", &[]), 1.0);
    assert!(value(&text, "keel_agent_last_applied_version", &[]) > 0.0);
    assert_eq!(
        value(&text, "keel_dataplane_map_entries", &[("map", "services")]),
        2.0
    );
    // Changes are applied incrementally: a new service and its endpoints are written
    // without a full sync.
    let syncs =
        |text: &str, kind: &str| value(text, "keel_agent_sync_duration_seconds", &[("kind", kind)]);
    let writes = |text: &str| {
        value(
            text,
            "keel_agent_sync_writes_total",
            &[("kind", "incremental")],
        )
    };
    let (full_before, writes_before) = (syncs(&text, "full"), writes(&text));
    let web2 = c.service("web2", "web", false);
    c.serves(web2, &["backend-1"], "a second service");
    let text = c.agent.metrics().expect("/metrics");
    assert_eq!(
        syncs(&text, "full"),
        full_before,
        "a new service made a full sync"
    );
    assert!(
        writes(&text) > writes_before,
        "the new service was written by incremental syncs"
    );

    // What `node-agent status` and `node-agent services` print of it.
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_node-agent"));
    let run = |args: &[&str]| {
        let out = Command::new(&agent)
            .args(args)
            .output()
            .expect("run node-agent");
        assert!(out.status.success(), "node-agent {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let status = run(&[
        "status",
        "--metrics-addr",
        &c.agent.metrics_addr.to_string(),
    ]);
    for line in [
        format!("node:        {NODE}"),
        "mode:        ebpf".to_owned(),
        "(connected,".to_owned(),
        "3 services".to_owned(),
        "(incremental,".to_owned(),
    ] {
        assert!(status.contains(&line), "`{line}` in:\n{status}");
    }
    let services = run(&["services", "--pin-dir", &c.pin_dir.display().to_string()]);
    for vip in [web, web2] {
        let row = services
            .lines()
            .find(|l| l.starts_with(&format!("tcp/{vip}:80 ")))
            .unwrap_or_else(|| panic!("{vip} in:\n{services}"));
        assert!(
            row.contains(&format!("{}:8080", c.backend_ip(0))),
            "{vip}'s backend in: {row}"
        );
    }

    let before = forwarded(&text);
    let answers = c.answers(web, 50);
    assert_eq!(answers.get("backend-1"), Some(&50), "{answers:?}");
    let after = forwarded(&c.agent.metrics().expect("/metrics"));
    assert!(
        after - before >= 50.0,
        "50 connections load balanced at connect: {before} -> {after}"
    );

    // A pod created after the agent started: its veth gets the tc programs, its namespace
    // socket-level load balancing, as they appear.
    let late = Netns::new(&format!("{}2", c.lab.client.name())).expect("a second client pod");
    veth(&c.lab.node, "cli2", &late, "eth0").unwrap();
    c.lab
        .node
        .ip(&["addr", "add", "10.244.100.1/24", "dev", "cli2"])
        .unwrap();
    late.ip(&["addr", "add", "10.244.100.2/24", "dev", "eth0"])
        .unwrap();
    late.ip(&["route", "add", "default", "via", "10.244.100.1"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = c.agent.metrics().expect("/metrics");
        if value(&text, "keel_agent_pod_interfaces", &[]) == 2.0
            && value(&text, "keel_agent_pod_netns", &[]) == 2.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new pod's interface and namespace were not picked up:\n{}",
            c.agent.recent_logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = forwarded(&c.agent.metrics().unwrap());
    let to = SocketAddrV4::new(web, 80);
    let who = late
        .run(move || tcp_request(to))
        .unwrap()
        .expect("the late pod reaches the service");
    assert_eq!(who, "backend-1");
    assert!(
        forwarded(&c.agent.metrics().unwrap()) > before,
        "at connect, not per packet"
    );

    // Its host route (as per-veth CNIs install) names its address: from then on its veth
    // accepts only that source, so it cannot forge another pod's flows.
    c.lab
        .node
        .ip(&["route", "add", "10.244.100.2/32", "dev", "cli2"])
        .unwrap();
    late.ip(&["addr", "add", "10.244.100.3/24", "dev", "eth0"])
        .unwrap();
    let spoofed = |text: &str| {
        value(
            text,
            "keel_dataplane_packets_total",
            &[("counter", "drop_spoofed")],
        )
    };
    let before = spoofed(&c.agent.metrics().unwrap());
    let backend = SocketAddrV4::new(c.backend_ip(0), 8080);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        late.run(move || {
            let socket = std::net::UdpSocket::bind("10.244.100.3:0").unwrap();
            socket.send_to(b"forged", backend).unwrap();
        })
        .unwrap();
        if spoofed(&c.agent.metrics().unwrap()) > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "packets from an address not the pod's are not dropped:\n{}",
            c.agent.recent_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let who = late
        .run(move || tcp_request(to))
        .unwrap()
        .expect("the pod's own address still reaches the service");
    assert_eq!(who, "backend-1");

    // A process on the node's own network (--socket-lb all): load balanced at connect too.
    let who = c
        .lab
        .node
        .run(move || tcp_request(to))
        .unwrap()
        .expect("a host process reaches the service");
    assert_eq!(who, "backend-1");
}
