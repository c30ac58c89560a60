//! Pods on real nodes, as part of `bench control-plane`: a cluster lab of 3 nodes running
//! `node-agent --run-pods` (the control plane's node grace period set to 2 s for the run).
//!
//! - **Pod startup**: 100 pods (busybox, `sleep`) created through the API by 10 concurrent
//!   clients; each figure runs from its create request to a watch seeing it Running with its
//!   IP and its container running: scheduling, the feed, CNI, runc, the status report.
//! - **Node failure**: a Service selecting those pods; one node's agent killed (SIGKILL); the
//!   figure runs to the moment no other node's data plane holds any of that node's pods as a
//!   backend any more (read from their pinned maps): the lease expiring, the node turning
//!   NotReady, its pods' readiness, the slices, the feed, every agent.

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use control_plane::launch::Api;
use ebpf_dataplane::{Frontend, Pinned};
use futures::StreamExt;
use reqwest::Method;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    lab::{Binaries, ClusterLab, Options},
    loadgen::Latencies,
};

#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub pod_startup_pods: usize,
    pub pod_startup_p50_ms: f64,
    pub pod_startup_p99_ms: f64,
    pub node_failure_grace_s: f64,
    pub node_failure_withdraw_ms: f64,
}

pub fn run(pods: usize, progress: &mut dyn FnMut(&str)) -> Result<Figures> {
    let grace = 2.0;
    let lab = ClusterLab::start(
        &Options {
            prefix: format!("kb-{}-pods", std::process::id()),
            nodes: 3,
            node_grace: grace,
            restart_backoff: 10.0,
            dir: None,
            agent_log: "warn",
            proxy_mode: "ebpf",
        },
        Binaries::siblings()?,
        &mut |step| progress(&format!("pods: {step}")),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    progress(&format!("pods: starting {pods} pods on 3 nodes"));
    let startup = runtime.block_on(startup(&lab.api, pods))?;

    progress("pods: a service over them; a node's agent killed");
    let (code, svc) = runtime.block_on(lab.api.call(
        Method::POST,
        "/api/v1/namespaces/default/services",
        Some(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "startup"},
            "spec": {"selector": {"app": "startup"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
        ),
    ))?;
    if code != 201 {
        bail!("create the service: {code}: {svc}");
    }
    let vip: Ipv4Addr = svc["spec"]["clusterIP"]
        .as_str()
        .context("a cluster IP")?
        .parse()?;
    let frontend = Frontend::tcp(SocketAddrV4::new(vip, 80));
    let list = lab.pods("app=startup")?;
    let victim = lab.nodes[2].name.clone();
    let victim_ips: BTreeSet<Ipv4Addr> = list
        .iter()
        .filter(|p| p["spec"]["nodeName"] == victim.as_str())
        .filter_map(|p| p["status"]["podIP"].as_str()?.parse().ok())
        .collect();
    if victim_ips.is_empty() {
        bail!("no pod landed on {victim}");
    }
    let survivors: Vec<Pinned> = lab.nodes[..2]
        .iter()
        .map(|n| Pinned::open(&n.pin_dir))
        .collect::<Result<_, _>>()?;
    let holds_victim = |p: &Pinned| -> Result<bool> {
        Ok(p.service(&frontend)?
            .is_some_and(|(_, backends)| backends.iter().any(|b| victim_ips.contains(b.ip()))))
    };
    // Every survivor serves the victim's pods before it dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !survivors.iter().all(|p| holds_victim(p).unwrap_or(false)) {
        if Instant::now() > deadline {
            bail!("the survivors never held {victim}'s pods");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on a process the lab started.
    unsafe { libc::kill(lab.nodes[2].agent.pid() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(60);
    loop {
        if survivors.iter().all(|p| !holds_victim(p).unwrap_or(true)) {
            break;
        }
        if Instant::now() > deadline {
            bail!("{victim}'s pods still served 60 s after its agent died");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let withdraw = killed.elapsed();
    drop(lab);
    let ms = |micros: f64| (micros / 1e3 * 100.0).round() / 100.0;
    let mut startup = startup;
    Ok(Figures {
        pod_startup_pods: pods,
        pod_startup_p50_ms: ms(startup.quantile(0.5)),
        pod_startup_p99_ms: ms(startup.quantile(0.99)),
        node_failure_grace_s: grace,
        node_failure_withdraw_ms: (withdraw.as_secs_f64() * 1e5).round() / 100.0,
    })
}

/// Creates `count` pods and measures each one's create → Running (IP and container running).
async fn startup(api: &Api, count: usize) -> Result<Latencies> {
    // The watch first: nothing is missed.
    let watch = api
        .request(
            Method::GET,
            "/api/v1/namespaces/default/pods?watch=true&labelSelector=app%3Dstartup",
        )
        .send()
        .await?;
    let created: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let running: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let seen = running.clone();
    let watcher = tokio::spawn(async move {
        let mut body = watch.bytes_stream();
        let mut buf = Vec::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let pod = &event["object"];
                let up = pod["status"]["phase"] == "Running"
                    && pod["status"]["podIP"].is_string()
                    && pod["status"]["containerStatuses"][0]["state"]["running"].is_object();
                if up && let Some(name) = pod["metadata"]["name"].as_str() {
                    seen.lock()
                        .expect("not poisoned")
                        .entry(name.to_owned())
                        .or_insert_with(Instant::now);
                }
            }
        }
    });
    let mut creates = futures::stream::iter(0..count)
        .map(|i| {
            let created = created.clone();
            async move {
                let name = format!("startup-{i}");
                let body = json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "labels": {"app": "startup"}},
                    "spec": {"containers": [{"name": "main", "image": "busybox",
                        "command": ["sleep", "3600"],
                        "resources": {"requests": {"cpu": "10m", "memory": "8Mi"}}}]}});
                created
                    .lock()
                    .expect("not poisoned")
                    .insert(name.clone(), Instant::now());
                api.call(Method::POST, "/api/v1/namespaces/default/pods", Some(body))
                    .await
            }
        })
        .buffer_unordered(10);
    while let Some(result) = creates.next().await {
        let (code, body) = result?;
        if code != 201 {
            bail!("create a pod: {code}: {body}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while running.lock().expect("not poisoned").len() < count {
        if Instant::now() > deadline {
            bail!(
                "{} of {count} pods running after 120 s",
                running.lock().expect("not poisoned").len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.abort();
    let mut latency = Latencies::default();
    let created = created.lock().expect("not poisoned");
    for (name, at) in running.lock().expect("not poisoned").iter() {
        if let Some(t0) = created.get(name) {
            latency.push(at.saturating_duration_since(*t0));
        }
    }
    Ok(latency)
}
