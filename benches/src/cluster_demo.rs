//! `cargo xtask demo`: the project's main job. A control plane and three nodes on one machine
//! (network namespaces on a bridged node network), a node agent in each (proxy, kubelet, CNI);
//! a Deployment of the echo server and a Service applied with kubectl; a client pod's
//! connections to the ClusterIP, counted by which pod on which node answered; a scale-up; a
//! node's agent killed, and the traffic moving to the survivors once the control plane marks
//! the node NotReady. `--keep` leaves the cluster up (`cargo xtask down` removes it).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::lab::{Binaries, ClusterLab, LabNode, Options};

const CONNECTIONS: usize = 300;

const MANIFEST: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 3
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        image: keel/echo:latest
        ports: [{name: http, containerPort: 8080}]
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
        readinessProbe:
          httpGet: {path: /, port: http}
          periodSeconds: 1
        resources: {requests: {cpu: 50m, memory: 16Mi}, limits: {memory: 64Mi}}
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  containers:
  - name: client
    image: busybox
    command: [sleep, "3600"]
"#;

/// What `--keep` leaves for `down` to find.
#[derive(Serialize, Deserialize)]
struct Kept {
    prefix: String,
    pids: Vec<u32>,
    nodes: Vec<(PathBuf, PathBuf)>,
}

pub fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo")
}

pub fn run(keep: bool) -> Result<()> {
    down()?;
    let started = Instant::now();
    let dir = demo_dir();
    let prefix = format!("kd-{}", std::process::id());
    println!("Starting a cluster: a control plane and 3 nodes (network namespaces {prefix}-node*)");
    let lab = ClusterLab::start(
        &Options {
            prefix: prefix.clone(),
            nodes: 3,
            node_grace: 4.0,
            restart_backoff: 10.0,
            dir: Some(dir.clone()),
            agent_log: "warn",
            proxy_mode: "ebpf",
        },
        Binaries::siblings()?,
        &mut |step| println!("  {step}"),
    )?;
    let outcome = show(&lab, started);
    if keep {
        let kept = Kept {
            prefix,
            pids: std::iter::once(lab.cp.pid())
                .chain(lab.nodes.iter().map(|n| n.agent.pid()))
                .collect(),
            nodes: lab
                .nodes
                .iter()
                .map(|n| (n.root.clone(), n.pin_dir.clone()))
                .collect(),
        };
        std::fs::write(dir.join("demo.json"), serde_json::to_vec_pretty(&kept)?)?;
        println!(
            "\nThe cluster stays up (--keep). Play with it:\n  export KUBECONFIG={}\n  target/tools/venv/bin/kubectl get pods -o wide\nRemove every trace with: cargo xtask down",
            lab.cp.kubeconfig.display()
        );
        // Its processes outlive this one; `down` ends them.
        std::mem::forget(lab);
    } else {
        drop(lab);
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

fn show(lab: &ClusterLab, started: Instant) -> Result<()> {
    println!(
        "\n$ kubectl apply -f echo.yaml   (Deployment echo: 3 replicas, Service echo, Pod client)"
    );
    print!("{}", lab.apply(MANIFEST)?);
    lab.wait_ready("app=echo", 3, Duration::from_secs(90))?;
    let client = lab
        .wait_ready("app=client", 1, Duration::from_secs(60))?
        .remove(0);
    println!("\n$ kubectl get pods -o wide");
    print!("{}", lab.kubectl_ok(&["get", "pods", "-o", "wide"])?);
    let svc: Value = serde_json::from_str(&lab.kubectl_ok(&["get", "svc", "echo", "-o", "json"])?)?;
    let vip: Ipv4Addr = svc["spec"]["clusterIP"]
        .as_str()
        .context("the service's cluster IP")?
        .parse()?;
    let netns = ClusterLab::pod_netns(&client);
    let client_node = client["spec"]["nodeName"]
        .as_str()
        .unwrap_or("?")
        .to_owned();

    println!(
        "\n{CONNECTIONS} connections from the client pod (on {client_node}) to the ClusterIP {vip}:80:"
    );
    let counts = traffic(&netns, vip)?;
    print!("{}", table(&counts));

    println!("\n$ kubectl scale deployment echo --replicas=5");
    print!(
        "{}",
        lab.kubectl_ok(&["scale", "deployment", "echo", "--replicas=5"])?
    );
    lab.wait_ready("app=echo", 5, Duration::from_secs(90))?;
    println!("{CONNECTIONS} connections with 5 replicas:");
    let counts = traffic(&netns, vip)?;
    print!("{}", table(&counts));

    // A node whose agent dies: its pods keep running, but nobody vouches for them any more.
    let victim: &LabNode = lab
        .nodes
        .iter()
        .rev()
        .find(|n| n.name != client_node)
        .context("a node without the client")?;
    println!(
        "\nKilling {}'s agent (SIGKILL); the control plane marks the node NotReady after 4 s without heartbeats,",
        victim.name
    );
    println!(
        "its pods' endpoints are withdrawn, and every node's data plane stops sending them connections."
    );
    // SAFETY: kill(2) on a child process we started.
    unsafe { libc::kill(victim.agent.pid() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let on_victim = format!("@{}", victim.name);
    let deadline = killed + Duration::from_secs(30);
    loop {
        let sample = in_netns(&netns, move || {
            (0..20)
                .map(|_| ask(SocketAddrV4::new(vip, 80)))
                .collect::<Vec<_>>()
        })?;
        if sample
            .iter()
            .all(|a| !a.ends_with(&on_victim) && !a.starts_with("error"))
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{} still gets connections 30 s after its agent died",
                victim.name
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "Traffic left {} {:.1} s after its agent died. {CONNECTIONS} connections now:",
        victim.name,
        killed.elapsed().as_secs_f64()
    );
    let counts = traffic(&netns, vip)?;
    print!("{}", table(&counts));
    if counts.keys().any(|k| k.ends_with(&on_victim)) {
        bail!("{} still answered", victim.name);
    }
    println!("\n$ kubectl get nodes");
    print!("{}", lab.kubectl_ok(&["get", "nodes"])?);
    println!(
        "\nDemo done in {:.0} s. `cargo xtask demo --keep` leaves the cluster up to play with.",
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

fn ask(to: SocketAddrV4) -> String {
    node_agent_netns::traffic::tcp_request(to)
        .unwrap_or_else(|e| format!("error: {}", e.root_cause()))
}

/// Connections from the client pod's network namespace; answers by name.
fn traffic(netns: &Path, vip: Ipv4Addr) -> Result<BTreeMap<String, usize>> {
    let counts = in_netns(netns, move || {
        let mut counts = BTreeMap::new();
        for _ in 0..CONNECTIONS {
            *counts.entry(ask(SocketAddrV4::new(vip, 80))).or_insert(0) += 1;
        }
        counts
    })?;
    let failed: usize = counts
        .iter()
        .filter(|(k, _)| k.starts_with("error"))
        .map(|(_, n)| n)
        .sum();
    if failed > 0 {
        bail!("{failed} of {CONNECTIONS} connections failed: {counts:?}");
    }
    Ok(counts)
}

fn table(counts: &BTreeMap<String, usize>) -> String {
    let mut out = format!("  {:<34} {:<8} {:>11}\n", "pod", "node", "connections");
    for (who, n) in counts {
        let (pod, node) = who.split_once('@').unwrap_or((who, "?"));
        let _ = writeln!(out, "  {pod:<34} {node:<8} {n:>11}");
    }
    out
}

fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a descriptor we own, on a thread of our own.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))?
    })
}

/// Removes a cluster `--keep` left: its processes, containers, namespaces, cgroups, pins,
/// files. Nothing to remove is not an error.
pub fn down() -> Result<()> {
    let dir = demo_dir();
    let Ok(bytes) = std::fs::read(dir.join("demo.json")) else {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    };
    let kept: Kept = serde_json::from_slice(&bytes)?;
    for pid in &kept.pids {
        // SAFETY: kill(2) on processes the demo started (their ids were recorded).
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(200));
    for (root, pin_dir) in &kept.nodes {
        crate::lab::clean_node_at(root, pin_dir);
    }
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{}-", kept.prefix)) {
            let _ = node_agent_netns::netns::remove_at(&entry.path());
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    println!("removed the demo cluster ({})", kept.prefix);
    Ok(())
}
