//! The control loops end to end, against the real API server and store, with node agents played
//! by feed clients (`common::agent`): scheduling, readiness through the feed, EndpointSlices,
//! rolling updates within their bounds, Recreate and paused rollouts, ReplicaSets adopting
//! and releasing pods, node failure, cascading deletion; and the feed itself:
//! snapshot, deltas, resume after a dropped connection (and after a control-plane restart)
//! without a resync, a clean snapshot once the history is gone, and authentication.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::atomic::Ordering,
    time::Duration,
};

use common::{Api, ControlPlane, agent::Agent, runtime};
use control_plane_api::feed::{
    HeartbeatRequest, PodStatusReport, RegisterRequest, WatchRequest, feed_message,
};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

const NS: &str = "default";
const DEPLOYS: &str = "/apis/apps/v1/namespaces/default/deployments";
const PODS: &str = "/api/v1/namespaces/default/pods";

/// Polls `check` until it returns `Some` (or panics with `what` after `secs`).
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn deployment(name: &str, replicas: u32, image: &str, surge: u32, unavailable: u32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "web", "image": image, "ports": [{"name": "http", "containerPort": 8080}],
                                          "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
            }
        }
    })
}

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    })
}

async fn items(api: &Api, path: &str) -> Vec<Value> {
    let (code, list) = api.call(Method::GET, path, None).await;
    assert_eq!(code, 200, "{list}");
    list["items"].as_array().cloned().unwrap_or_default()
}

/// The service's endpoints as the API has them: address to ready.
async fn slice_endpoints(api: &Api, svc: &str) -> BTreeMap<String, bool> {
    let path = format!(
        "/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{svc}"
    );
    let mut out = BTreeMap::new();
    for slice in items(api, &path).await {
        for e in slice["endpoints"].as_array().into_iter().flatten() {
            out.insert(
                e["addresses"][0].as_str().unwrap().to_owned(),
                e["conditions"]["ready"] == json!(true),
            );
        }
    }
    out
}

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

async fn agents(cp: &ControlPlane, n: usize, ready_after: Duration) -> Vec<Agent> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            Agent::start(
                cp.process(),
                &format!("node-{i}"),
                Duration::from_millis(200),
                ready_after,
            )
            .await,
        );
    }
    out
}

fn a_deployment_gets_scheduled_made_ready_and_its_service_filled_and_failures_are_reported(
    store: &str,
) {
    let cp = ControlPlane::start(store, &[]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let agents = agents(&cp, 3, Duration::from_millis(20)).await;
        let (code, body) = api.call(Method::POST, DEPLOYS, Some(deployment("web", 5, "nginx:1.27", 1, 0))).await;
        assert_eq!(code, 201, "{body}");
        let (code, body) = api.call(Method::POST, "/api/v1/namespaces/default/services", Some(service("web"))).await;
        assert_eq!(code, 201, "{body}");

        let endpoints = eventually(30, "5 ready endpoints", || async {
            let e = slice_endpoints(&api, "web").await;
            (e.len() == 5 && e.values().all(|r| *r)).then_some(e)
        })
        .await;
        let pods = items(&api, &format!("{PODS}?labelSelector=app%3Dweb")).await;
        assert_eq!(pods.len(), 5);
        let mut per_node: HashMap<String, usize> = HashMap::new();
        for p in &pods {
            let node = p["spec"]["nodeName"].as_str().expect("scheduled").to_owned();
            *per_node.entry(node).or_default() += 1;
            assert!(ready(p), "ready through the feed's status call");
            assert!(endpoints.contains_key(p["status"]["podIP"].as_str().unwrap()));
        }
        assert_eq!(per_node.len(), 3, "least allocated spreads 5 pods over 3 nodes: {per_node:?}");
        // Endpoints carry their node and its zone.
        let path = format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dweb");
        for e in items(&api, &path).await.iter().flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default()) {
            let node = e["nodeName"].as_str().expect("a node name");
            assert_eq!(e["zone"].as_str(), Some(format!("zone-{node}").as_str()));
            assert_eq!(e["conditions"]["serving"], true);
            assert_eq!(e["conditions"]["terminating"], false);
        }
        // Each node has its own pod CIDR.
        let nodes = items(&api, "/api/v1/nodes").await;
        let mut cidrs: Vec<&str> = nodes.iter().map(|n| n["spec"]["podCIDR"].as_str().expect("a pod CIDR")).collect();
        cidrs.sort();
        cidrs.dedup();
        assert_eq!(cidrs.len(), 3);
        // Every agent received the same endpoints through its stream.
        for agent in &agents {
            let want: Vec<(String, bool)> = endpoints.iter().map(|(a, r)| (a.clone(), *r)).collect();
            eventually(10, "the feed to carry the endpoints", || async { (agent.view.lock().unwrap().endpoints("default/web") == want).then_some(()) }).await;
            let view = agent.view.lock().unwrap();
            assert_eq!((view.snapshots, view.refused), (1, 0), "one snapshot, every message fits");
            assert!(view.services.contains_key("default/web"));
            let own = per_node.get(&agent.name).copied().unwrap_or(0);
            assert_eq!(view.pods.len(), own, "an agent gets the pods bound to its node only");
        }
        // The deployment reports what kubectl rollout status reads.
        let (_, d) = api.call(Method::GET, &format!("{DEPLOYS}/web"), None).await;
        assert_eq!((d["status"]["updatedReplicas"].as_i64(), d["status"]["availableReplicas"].as_i64()), (Some(5), Some(5)), "{}", d["status"]);
        assert_eq!(d["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "1");

        // A pod that fits nowhere: a condition and an event say why.
        let huge = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "huge"},
            "spec": {"containers": [{"name": "c", "image": "x", "resources": {"requests": {"cpu": "1000"}}}]}});
        api.call(Method::POST, PODS, Some(huge)).await;
        let message = eventually(10, "an Unschedulable condition", || async {
            let (_, p) = api.call(Method::GET, &format!("{PODS}/huge"), None).await;
            p["status"]["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "PodScheduled" && c["reason"] == "Unschedulable").map(|c| c["message"].as_str().unwrap().to_owned())
        })
        .await;
        assert_eq!(message, "0/3 nodes are available: 3 Insufficient cpu.");
        eventually(10, "a FailedScheduling event", || async {
            let events = items(&api, "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dhuge").await;
            events.iter().any(|e| e["reason"] == "FailedScheduling").then_some(())
        })
        .await;
    });
}

#[test]
fn a_rolling_update_stays_within_max_surge_and_max_unavailable_at_every_step() {
    let cp = ControlPlane::start("embedded:{dir}", &[]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let _agents = agents(&cp, 3, Duration::from_millis(80)).await;
        let (replicas, surge, unavailable) = (5usize, 2usize, 1usize);
        api.call(Method::POST, DEPLOYS, Some(deployment("roll", replicas as u32, "app:v1", surge as u32, unavailable as u32))).await;
        eventually(30, "5 ready pods of v1", || async {
            let pods = items(&api, &format!("{PODS}?labelSelector=app%3Droll")).await;
            (pods.len() == replicas && pods.iter().all(ready)).then_some(())
        })
        .await;

        // Follow every pod change from here, checking the bounds after each.
        let (_, list) = api.call(Method::GET, &format!("{PODS}?labelSelector=app%3Droll"), None).await;
        let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
        let mut state: HashMap<String, (bool, bool, String)> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["metadata"]["name"].as_str().unwrap().to_owned(), (false, ready(p), p["spec"]["containers"][0]["image"].as_str().unwrap().to_owned())))
            .collect();
        let resp = api
            .request(Method::GET, &format!("{PODS}?watch=1&labelSelector=app%3Droll&resourceVersion={rv}"))
            .send()
            .await
            .unwrap();
        let patch = api
            .request(Method::PATCH, &format!("{DEPLOYS}/roll"))
            .header("content-type", "application/strategic-merge-patch+json")
            .body(r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"app:v2"}]}}}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(patch.status().as_u16(), 200);
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        let (mut max_active, mut events) = (0, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        'watch: loop {
            let chunk = tokio::time::timeout_at(deadline, stream.next()).await.expect("the rollout finishes").unwrap().unwrap();
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let e: Value = serde_json::from_slice(&line).unwrap();
                let p = &e["object"];
                let name = p["metadata"]["name"].as_str().unwrap().to_owned();
                if e["type"] == "DELETED" {
                    state.remove(&name);
                } else {
                    let terminating = p["metadata"]["deletionTimestamp"].is_string();
                    state.insert(name, (terminating, ready(p), p["spec"]["containers"][0]["image"].as_str().unwrap().to_owned()));
                }
                events += 1;
                let active = state.values().filter(|(t, _, _)| !t).count();
                let available = state.values().filter(|(t, r, _)| !t && *r).count();
                max_active = max_active.max(active);
                assert!(active <= replicas + surge, "{active} pods at once exceed replicas + maxSurge: {state:?}");
                assert!(available >= replicas - unavailable, "only {available} ready pods, below replicas - maxUnavailable: {state:?}");
                let done = state.len() == replicas && state.values().all(|(t, r, image)| !t && *r && image == "app:v2");
                if done {
                    break 'watch;
                }
            }
        }
        assert!(events > 10, "the rollout went through steps: {events} events");
        assert_eq!(max_active, replicas + surge, "the surge was used");
        let (_, d) = api.call(Method::GET, &format!("{DEPLOYS}/roll"), None).await;
        assert_eq!(d["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "2");
        let sets = items(&api, "/apis/apps/v1/namespaces/default/replicasets?labelSelector=app%3Droll").await;
        let mut replicas_by_image: Vec<(String, i64)> = sets
            .iter()
            .map(|rs| (rs["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap().to_owned(), rs["spec"]["replicas"].as_i64().unwrap()))
            .collect();
        replicas_by_image.sort();
        assert_eq!(replicas_by_image, vec![("app:v1".to_owned(), 0), ("app:v2".to_owned(), 5)], "the old set is kept, scaled to 0, as history");
    });
}

#[test]
fn a_node_that_stops_heartbeating_turns_not_ready_and_its_endpoints_stop_being_ready() {
    let cp = ControlPlane::start("embedded:{dir}", &["--node-monitor-grace-period", "1.5"]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let mut agents = agents(&cp, 3, Duration::from_millis(10)).await;
        api.call(
            Method::POST,
            DEPLOYS,
            Some(deployment("svc", 6, "nginx", 1, 0)),
        )
        .await;
        api.call(
            Method::POST,
            "/api/v1/namespaces/default/services",
            Some(service("svc")),
        )
        .await;
        eventually(30, "6 ready endpoints", || async {
            let e = slice_endpoints(&api, "svc").await;
            (e.len() == 6 && e.values().all(|r| *r)).then_some(())
        })
        .await;
        let pods = items(&api, &format!("{PODS}?labelSelector=app%3Dsvc")).await;
        let on = |node: &str| -> Vec<String> {
            pods.iter()
                .filter(|p| p["spec"]["nodeName"] == node)
                .map(|p| p["status"]["podIP"].as_str().unwrap().to_owned())
                .collect()
        };
        let dead = on("node-0");
        assert!(!dead.is_empty(), "node-0 runs some of the pods");

        agents[0].alive.store(false, Ordering::SeqCst);
        eventually(15, "node-0 NotReady, tainted", || async {
            let (_, n) = api.call(Method::GET, "/api/v1/nodes/node-0", None).await;
            let unknown = n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "Unknown");
            let tainted = n["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| {
                    t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute"
                });
            (unknown && tainted).then_some(())
        })
        .await;
        eventually(
            15,
            "node-0's endpoints not ready, the others still ready",
            || async {
                let e = slice_endpoints(&api, "svc").await;
                (e.len() == 6 && e.iter().all(|(ip, r)| *r != dead.contains(ip))).then_some(())
            },
        )
        .await;
        // The other agents see it through the feed.
        eventually(10, "the feed to carry the change", || async {
            let seen = agents[1].view.lock().unwrap().endpoints("default/svc");
            (seen.len() == 6 && seen.iter().all(|(ip, r)| *r != dead.contains(ip))).then_some(())
        })
        .await;
        // A pod created now does not go to the tainted node.
        let resp = api
            .request(Method::PATCH, &format!("{DEPLOYS}/svc/scale"))
            .header("content-type", "application/merge-patch+json")
            .body(r#"{"spec":{"replicas":7}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let nodes = eventually(15, "a 7th pod scheduled", || async {
            let pods = items(&api, &format!("{PODS}?labelSelector=app%3Dsvc")).await;
            let nodes: Vec<String> = pods
                .iter()
                .filter_map(|p| p["spec"]["nodeName"].as_str().map(str::to_owned))
                .collect();
            (nodes.len() == 7).then_some(nodes)
        })
        .await;
        assert_eq!(
            nodes.iter().filter(|n| *n == "node-0").count(),
            dead.len(),
            "nothing new on the unreachable node"
        );

        // It comes back: Ready again, untainted, its pods reported ready again.
        agents[0].alive.store(true, Ordering::SeqCst);
        agents[0].report_all().await;
        eventually(
            15,
            "node-0 Ready and untainted, all endpoints ready",
            || async {
                let (_, n) = api.call(Method::GET, "/api/v1/nodes/node-0", None).await;
                let ready_node = n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                let tainted = n["spec"]["taints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t["key"] == "node.kubernetes.io/unreachable");
                let e = slice_endpoints(&api, "svc").await;
                (ready_node && !tainted && e.values().all(|r| *r)).then_some(())
            },
        )
        .await;

        // It fails again: the same event again, counted on the first one.
        agents[0].alive.store(false, Ordering::SeqCst);
        let not_ready = "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dnode-0,reason%3DNodeNotReady";
        let events = eventually(15, "NodeNotReady counted twice", || async {
            let events = items(&api, not_ready).await;
            events.iter().any(|e| e["count"] == 2).then_some(events)
        })
        .await;
        assert_eq!(events.len(), 1, "one event, counted: {events:?}");
    });
}

#[test]
fn events_expire_after_their_ttl_unless_written_again() {
    let cp = ControlPlane::start(
        "embedded:{dir}",
        &["--disable-controllers", "--event-ttl", "3"],
    );
    let api = Api::new(&cp);
    runtime().block_on(async {
        let path = "/api/v1/namespaces/default/events";
        let created = tokio::time::Instant::now();
        for name in ["once", "repeated"] {
            let now = jiff::Timestamp::now().to_string();
            let event = json!({
                "apiVersion": "v1", "kind": "Event", "metadata": {"name": name},
                "involvedObject": {"kind": "Pod", "name": "p", "namespace": NS},
                "reason": "Test", "message": name, "type": "Normal", "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
            });
            let (code, body) = api.call(Method::POST, path, Some(event)).await;
            assert_eq!(code, 201, "{body}");
        }
        // One is seen again every half second (its last timestamp moves on); the other not.
        let mut count = 1;
        let started = tokio::time::Instant::now();
        loop {
            let (code, _) = api.call(Method::GET, &format!("{path}/once"), None).await;
            if code == 404 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the event never expired"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            count += 1;
            let now = jiff::Timestamp::now().to_string();
            let (code, body) = api
                .patch(
                    &format!("{path}/repeated"),
                    "application/merge-patch+json",
                    json!({"count": count, "lastTimestamp": now}),
                )
                .await;
            assert_eq!(code, 200, "the repeated event is still there: {body}");
        }
        // Never before its TTL: 3 s from its last timestamp, which the server reads to the
        // second (so up to 1 s earlier than the client's clock). A slow machine only makes
        // the wait longer, never shorter.
        let lived = created.elapsed();
        assert!(
            lived >= Duration::from_secs(2),
            "it expired after {lived:?}, before its 3 s TTL"
        );
        assert!(count >= 2, "the other event was written again meanwhile");
        let (code, _) = api
            .call(Method::GET, &format!("{path}/repeated"), None)
            .await;
        assert_eq!(code, 200, "the event written again lives on");
    });
}

#[test]
fn pods_on_a_dead_node_are_evicted_replaced_and_collected_when_it_is_deleted() {
    let cp = ControlPlane::start(
        "embedded:{dir}",
        &[
            "--node-monitor-grace-period",
            "1",
            "--default-unreachable-toleration-seconds",
            "2",
        ],
    );
    let api = Api::new(&cp);
    runtime().block_on(async {
        let agents = agents(&cp, 2, Duration::from_millis(10)).await;
        api.call(
            Method::POST,
            DEPLOYS,
            Some(deployment("web", 4, "nginx", 1, 0)),
        )
        .await;
        eventually(30, "4 web pods running", || async {
            let pods = items(&api, &format!("{PODS}?labelSelector=app%3Dweb")).await;
            (pods.len() == 4 && pods.iter().all(ready)).then_some(())
        })
        .await;
        let pods = items(&api, &format!("{PODS}?labelSelector=app%3Dweb")).await;
        let on_dead: Vec<String> = pods
            .iter()
            .filter(|p| p["spec"]["nodeName"] == "node-0")
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        assert!(!on_dead.is_empty(), "node-0 runs some web pods");
        // A pod in a namespace of its own, on node-0, tolerating its unreachability forever.
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "doomed"}});
        api.call(Method::POST, "/api/v1/namespaces", Some(ns)).await;
        let stay = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stay"},
            "spec": {"nodeName": "node-0", "containers": [{"name": "c", "image": "nginx"}],
                "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                    "effect": "NoExecute"}]}});
        let (code, body) = api
            .call(Method::POST, "/api/v1/namespaces/doomed/pods", Some(stay))
            .await;
        assert_eq!(code, 201, "{body}");

        agents[0].alive.store(false, Ordering::SeqCst);
        // Evicted once the default toleration (2 s) has passed: Terminating, since no kubelet
        // confirms, and replaced on the live node.
        eventually(
            30,
            "node-0's web pods evicted and replaced on node-1",
            || async {
                let pods = items(&api, &format!("{PODS}?labelSelector=app%3Dweb")).await;
                let evicted = on_dead.iter().all(|name| {
                    pods.iter().any(|p| {
                        p["metadata"]["name"] == *name
                            && p["metadata"]["deletionTimestamp"].is_string()
                    })
                });
                let live: Vec<&Value> = pods
                    .iter()
                    .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                    .collect();
                let replaced =
                    live.len() == 4 && live.iter().all(|p| p["spec"]["nodeName"] == "node-1");
                (evicted && replaced).then_some(())
            },
        )
        .await;
        let (_, stay) = api
            .call(Method::GET, "/api/v1/namespaces/doomed/pods/stay", None)
            .await;
        assert!(
            stay["metadata"]["deletionTimestamp"].is_null(),
            "a pod tolerating the taint forever stays: {stay}"
        );
        let (_, events) = api
            .call(Method::GET, "/api/v1/namespaces/default/events", None)
            .await;
        assert!(
            events["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["reason"] == "TaintManagerEviction"),
            "evictions are reported"
        );

        // Deleting its namespace waits for the pod, which waits for a kubelet that is gone...
        let (code, _) = api
            .call(Method::DELETE, "/api/v1/namespaces/doomed", None)
            .await;
        assert_eq!(code, 200);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (code, _) = api
            .call(Method::GET, "/api/v1/namespaces/doomed", None)
            .await;
        assert_eq!(code, 200, "still terminating while its pod's node exists");
        // ...until the node is deleted: pod GC removes its pods, the namespace goes.
        let (code, body) = api.call(Method::DELETE, "/api/v1/nodes/node-0", None).await;
        assert_eq!(code, 200, "{body}");
        eventually(
            30,
            "node-0's pods collected and the namespace gone",
            || async {
                let pods = items(&api, "/api/v1/pods").await;
                let left = pods.iter().any(|p| p["spec"]["nodeName"] == "node-0");
                let (code, _) = api
                    .call(Method::GET, "/api/v1/namespaces/doomed", None)
                    .await;
                (!left && code == 404).then_some(())
            },
        )
        .await;
    });
}

#[test]
fn a_rollout_that_stops_progressing_fails_at_its_deadline_and_recovers() {
    let cp = ControlPlane::start("embedded:{dir}", &[]);
    let api = Api::new(&cp);
    let mut stuck = deployment("stuck", 2, "nginx", 1, 0);
    stuck["spec"]["progressDeadlineSeconds"] = json!(2);
    let file = cp.file("stuck.json", &stuck.to_string());
    cp.ok(&["apply", "-f", &file]);
    // No node: its pods stay pending, nothing progresses.
    let out = cp.kubectl(&["rollout", "status", "deployment/stuck", "--timeout=60s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("exceeded its progress deadline"),
        "kubectl rollout status fails at the deadline instead of waiting: {stderr}"
    );
    runtime().block_on(async {
        let (_, d) = api
            .call(Method::GET, &format!("{DEPLOYS}/stuck"), None)
            .await;
        let progressing = d["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Progressing")
            .cloned()
            .unwrap();
        assert_eq!(
            (
                progressing["status"].as_str(),
                progressing["reason"].as_str()
            ),
            (Some("False"), Some("ProgressDeadlineExceeded")),
            "{progressing}"
        );
        // A node arrives: the pods run, the rollout completes after all.
        let _agents = agents(&cp, 1, Duration::from_millis(10)).await;
        eventually(30, "the rollout complete", || async {
            let (_, d) = api
                .call(Method::GET, &format!("{DEPLOYS}/stuck"), None)
                .await;
            d["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Progressing" && c["reason"] == "NewReplicaSetAvailable")
                .then_some(())
        })
        .await;
    });
    cp.ok(&["rollout", "status", "deployment/stuck", "--timeout=30s"]);
}

fn owner_uid(obj: &Value) -> Option<String> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["controller"] == json!(true))
        .and_then(|r| r["uid"].as_str())
        .map(str::to_owned)
}

#[test]
fn replicasets_adopt_orphans_and_release_pods_they_no_longer_select() {
    let cp = ControlPlane::start("embedded:{dir}", &[]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let _agents = agents(&cp, 1, Duration::from_millis(10)).await;
        let stray = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "stray", "labels": {"app": "adopt"}},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]}
        });
        let (code, body) = api.call(Method::POST, PODS, Some(stray)).await;
        assert_eq!(code, 201, "{body}");
        let rs = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "adopt"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "adopt"}},
                "template": {
                    "metadata": {"labels": {"app": "adopt"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx"}]}
                }
            }
        });
        let rs_path = "/apis/apps/v1/namespaces/default/replicasets";
        let (code, rs) = api.call(Method::POST, rs_path, Some(rs)).await;
        assert_eq!(code, 201, "{rs}");
        let uid = rs["metadata"]["uid"].as_str().unwrap().to_owned();
        let selected = format!("{PODS}?labelSelector=app%3Dadopt");
        let pods = eventually(30, "the orphan adopted and one pod made", || async {
            let pods = items(&api, &selected).await;
            let owned = pods
                .iter()
                .filter(|p| owner_uid(p).as_deref() == Some(&uid));
            (owned.count() == 2).then_some(pods)
        })
        .await;
        assert_eq!(
            pods.len(),
            2,
            "the orphan counts: only one pod made: {:?}",
            pods.iter()
                .map(|p| &p["metadata"]["name"])
                .collect::<Vec<_>>()
        );
        assert!(
            pods.iter().any(|p| p["metadata"]["name"] == "stray"),
            "the orphan is one of the set's pods"
        );

        // Relabelled out of the selector: released, kept, and replaced.
        let patch = json!({"metadata": {"labels": {"app": "debug"}}});
        let (code, body) = api
            .patch(
                &format!("{PODS}/stray"),
                "application/merge-patch+json",
                patch,
            )
            .await;
        assert_eq!(code, 200, "{body}");
        eventually(30, "the relabelled pod released and replaced", || async {
            let pods = items(&api, &selected).await;
            let owned = pods
                .iter()
                .filter(|p| owner_uid(p).as_deref() == Some(&uid))
                .count();
            let (_, stray) = api.call(Method::GET, &format!("{PODS}/stray"), None).await;
            (owned == 2
                && stray["metadata"]["ownerReferences"]
                    .as_array()
                    .is_none_or(|r| r.is_empty()))
            .then_some(())
        })
        .await;
        // It no longer belongs to the set: deleting the set leaves it.
        let (code, _) = api
            .call(Method::DELETE, &format!("{rs_path}/adopt"), None)
            .await;
        assert_eq!(code, 200);
        eventually(30, "the set's pods collected", || async {
            items(&api, &selected).await.is_empty().then_some(())
        })
        .await;
        let (code, stray) = api.call(Method::GET, &format!("{PODS}/stray"), None).await;
        assert_eq!(
            code, 200,
            "the released pod outlives its former set: {stray}"
        );
        assert!(stray["metadata"]["deletionTimestamp"].is_null(), "{stray}");
    });
}

/// The deployment's sets: name to (spec replicas, status replicas).
async fn sets_of(api: &Api, app: &str) -> BTreeMap<String, (i64, i64)> {
    let path = format!("/apis/apps/v1/namespaces/default/replicasets?labelSelector=app%3D{app}");
    items(api, &path)
        .await
        .iter()
        .map(|rs| {
            (
                rs["metadata"]["name"].as_str().unwrap().to_owned(),
                (
                    rs["spec"]["replicas"].as_i64().unwrap_or(0),
                    rs["status"]["replicas"].as_i64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

fn progressing(d: &Value) -> (String, String) {
    d["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Progressing")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .unwrap_or_default()
}

#[test]
fn recreate_waits_for_old_pods_to_stop_and_paused_deployments_only_scale() {
    let cp = ControlPlane::start("embedded:{dir}", &[]);
    let api = Api::new(&cp);
    let mut re = deployment("re", 2, "nginx:1", 1, 0);
    re["spec"]["strategy"] = json!({"type": "Recreate"});
    let file = cp.file("re.json", &re.to_string());
    runtime().block_on(async {
        let mut agents = agents(&cp, 1, Duration::from_millis(10)).await;
        cp.ok(&["apply", "-f", &file]);
        cp.ok(&["rollout", "status", "deployment/re", "--timeout=60s"]);
        // The node stops confirming deletions: the old pods stay terminating.
        agents[0].alive.store(false, Ordering::SeqCst);
        cp.ok(&["set", "image", "deployment/re", "web=nginx:2"]);
        let pods = format!("{PODS}?labelSelector=app%3Dre");
        eventually(30, "the old pods terminating", || async {
            let pods = items(&api, &pods).await;
            (pods.len() == 2
                && pods
                    .iter()
                    .all(|p| !p["metadata"]["deletionTimestamp"].is_null()))
            .then_some(())
        })
        .await;
        // Let the controllers see that (several rounds of them); nothing new may start.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pods_now = items(&api, &pods).await;
        assert!(
            pods_now
                .iter()
                .all(|p| p["spec"]["containers"][0]["image"] == "nginx:1"),
            "no new pod while the old ones still run: {:?}",
            pods_now
                .iter()
                .map(|p| &p["spec"]["containers"][0]["image"])
                .collect::<Vec<_>>()
        );
        let sets = sets_of(&api, "re").await;
        assert_eq!(sets.len(), 2, "{sets:?}");
        assert!(
            sets.values().all(|(spec, _)| *spec == 0),
            "both sets at 0 meanwhile: {sets:?}"
        );
        // The node confirms them: the new version comes up.
        agents[0].alive.store(true, Ordering::SeqCst);
        agents[0].report_all().await;
        eventually(30, "two new pods", || async {
            let pods = items(&api, &pods).await;
            (pods.len() == 2
                && pods
                    .iter()
                    .all(|p| p["spec"]["containers"][0]["image"] == "nginx:2"))
            .then_some(())
        })
        .await;
        cp.ok(&["rollout", "status", "deployment/re", "--timeout=60s"]);

        // Paused: a template change starts nothing; a resize still applies.
        cp.ok(&["rollout", "pause", "deployment/re"]);
        cp.ok(&["set", "image", "deployment/re", "web=nginx:3"]);
        cp.ok(&["scale", "deployment/re", "--replicas=3"]);
        let path = format!("{DEPLOYS}/re");
        eventually(30, "the paused deployment resized", || async {
            let sets = sets_of(&api, "re").await;
            let (_, d) = api.call(Method::GET, &path, None).await;
            let paused = progressing(&d) == ("Unknown".into(), "DeploymentPaused".into());
            let sizes: Vec<i64> = sets.values().map(|(spec, _)| *spec).collect();
            (paused && sets.len() == 2 && sizes.contains(&3) && d["status"]["replicas"] == 3)
                .then_some(())
        })
        .await;
        let pods = items(&api, &format!("{PODS}?labelSelector=app%3Dre")).await;
        assert!(
            pods.iter()
                .all(|p| p["spec"]["containers"][0]["image"] == "nginx:2"),
            "no rollout while paused: {:?}",
            pods.iter()
                .map(|p| &p["spec"]["containers"][0]["image"])
                .collect::<Vec<_>>()
        );
        cp.ok(&["rollout", "resume", "deployment/re"]);
        cp.ok(&["rollout", "status", "deployment/re", "--timeout=60s"]);
        let pods = items(&api, &format!("{PODS}?labelSelector=app%3Dre")).await;
        let images: Vec<&Value> = pods
            .iter()
            .map(|p| &p["spec"]["containers"][0]["image"])
            .collect();
        assert_eq!(
            images,
            vec!["nginx:3"; 3],
            "resumed: the new version at the new size"
        );
    });
}

#[test]
fn deleting_a_deployment_removes_its_replicasets_and_pods() {
    let cp = ControlPlane::start("embedded:{dir}", &[]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let _agents = agents(&cp, 2, Duration::from_millis(10)).await;
        for name in ["bg", "fg"] {
            api.call(
                Method::POST,
                DEPLOYS,
                Some(deployment(name, 3, "nginx", 1, 0)),
            )
            .await;
        }
        for name in ["bg", "fg"] {
            eventually(30, "3 ready pods each", || async {
                let pods = items(&api, &format!("{PODS}?labelSelector=app%3D{name}")).await;
                (pods.len() == 3 && pods.iter().all(ready)).then_some(())
            })
            .await;
        }
        // Background (kubectl's default): the deployment goes at once, then its dependents.
        let (code, _) = api
            .call(Method::DELETE, &format!("{DEPLOYS}/bg"), None)
            .await;
        assert_eq!(code, 200);
        // Foreground: the deployment stays, marked, until its dependents are gone.
        let (code, marked) = api
            .call(
                Method::DELETE,
                &format!("{DEPLOYS}/fg?propagationPolicy=Foreground"),
                None,
            )
            .await;
        assert_eq!(code, 200, "{marked}");
        assert!(
            marked["metadata"]["deletionTimestamp"].is_string(),
            "marked, not gone: {marked}"
        );
        for name in ["bg", "fg"] {
            eventually(30, "the ReplicaSets and pods to go", || async {
                let sets = items(
                    &api,
                    &format!(
                        "/apis/apps/v1/namespaces/default/replicasets?labelSelector=app%3D{name}"
                    ),
                )
                .await;
                let pods = items(&api, &format!("{PODS}?labelSelector=app%3D{name}")).await;
                (sets.is_empty() && pods.is_empty()).then_some(())
            })
            .await;
        }
        eventually(
            10,
            "the foreground-deleted deployment to go last",
            || async {
                let (code, _) = api.call(Method::GET, &format!("{DEPLOYS}/fg"), None).await;
                (code == 404).then_some(())
            },
        )
        .await;

        // Deleting a namespace deletes what is in it, then the namespace.
        api.call(
            Method::POST,
            "/api/v1/namespaces",
            Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "doomed"}})),
        )
        .await;
        let (code, body) = api
            .call(
                Method::POST,
                "/apis/apps/v1/namespaces/doomed/deployments",
                Some(deployment("x", 2, "nginx", 1, 0)),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        eventually(30, "pods in doomed", || async {
            (items(&api, "/api/v1/namespaces/doomed/pods").await.len() == 2).then_some(())
        })
        .await;
        let (code, _) = api
            .call(Method::DELETE, "/api/v1/namespaces/doomed", None)
            .await;
        assert_eq!(code, 200);
        eventually(30, "the namespace to go", || async {
            let (code, _) = api
                .call(Method::GET, "/api/v1/namespaces/doomed", None)
                .await;
            (code == 404).then_some(())
        })
        .await;
    });
}

/// Opens a Watch and reads until a whole snapshot or a delta message arrived; returns whether
/// it was a snapshot, the version (and epoch) it brought, the services it named, and the
/// stream. `from`: the version and epoch to resume from.
async fn first_message(
    client: &mut control_plane_api::FeedClient,
    node: &str,
    from: &(u64, String),
) -> (
    bool,
    (u64, String),
    Vec<String>,
    tonic::Streaming<control_plane_api::feed::FeedMessage>,
) {
    let mut stream = client
        .watch(WatchRequest {
            node_name: node.into(),
            resume_from: from.0,
            epoch: from.1.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a message")
            .unwrap()
            .unwrap();
        match m.kind.unwrap() {
            feed_message::Kind::Snapshot(c) => {
                names.extend(c.services.into_iter().map(|s| s.name));
                if c.last {
                    return (true, (c.version, c.epoch), names, stream);
                }
            }
            feed_message::Kind::Deltas(d) => {
                names.extend(service_names(&d));
                return (false, (d.version, from.1.clone()), names, stream);
            }
        }
    }
}

fn service_names(d: &control_plane_api::feed::Deltas) -> Vec<String> {
    d.deltas
        .iter()
        .filter_map(|d| match &d.change {
            Some(control_plane_api::feed::delta::Change::Service(s)) => Some(s.name.clone()),
            _ => None,
        })
        .collect()
}

fn plain_service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}})
}

#[test]
fn nodes_act_for_themselves_only_and_the_bootstrap_token_only_registers() {
    let cp = ControlPlane::start("embedded:{dir}", &["--disable-controllers"]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let register = |name: &str| RegisterRequest {
            node_name: name.into(),
            ..Default::default()
        };
        let (mut n1, _, identity) = cp.process().join(register("n1")).await.unwrap();
        let (_n2, _, _) = cp.process().join(register("n2")).await.unwrap();
        fn denied<T>(r: Result<T, tonic::Status>, what: &str) {
            let code = r.err().map(|e| e.code());
            assert_eq!(code, Some(tonic::Code::PermissionDenied), "{what}");
        }
        // A node acts for itself only.
        let beat = |name: &str| HeartbeatRequest {
            node_name: name.into(),
        };
        n1.heartbeat(beat("n1")).await.expect("its own lease");
        denied(n1.heartbeat(beat("n2")).await, "n1 renewing n2's lease");
        let watch = |name: &str| WatchRequest {
            node_name: name.into(),
            ..Default::default()
        };
        denied(
            n1.watch(watch("n2"))
                .await
                .map(|_| tonic::Response::new(())),
            "n1 reading n2's pods",
        );
        // Its pods only: a pod bound to n2 cannot be reported by n1, under either name.
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p2"},
            "spec": {"nodeName": "n2", "containers": [{"name": "c", "image": "x"}]}});
        let (code, pod) = api.call(Method::POST, PODS, Some(pod)).await;
        assert_eq!(code, 201, "{pod}");
        let report = |node: &str| PodStatusReport {
            node_name: node.into(),
            namespace: NS.into(),
            name: "p2".into(),
            uid: pod["metadata"]["uid"].as_str().unwrap().into(),
            pod_ip: "10.244.9.9".into(),
            ready: true,
            ..Default::default()
        };
        denied(
            n1.report_pod_status(report("n2")).await,
            "n1 reporting as n2",
        );
        denied(
            n1.report_pod_status(report("n1")).await,
            "n1 reporting n2's pod",
        );
        let (_, p2) = api.call(Method::GET, &format!("{PODS}/p2"), None).await;
        assert!(
            p2["status"]["podIP"].is_null(),
            "nothing reached the pod: {}",
            p2["status"]
        );
        // It registers itself again (and renews its certificate) with its certificate.
        let again = n1.register(register("n1")).await;
        assert!(again.is_ok(), "{again:?}");

        // The bootstrap token registers new nodes, and does nothing else.
        let mut bootstrap = cp.process().node_feed().await.unwrap();
        denied(
            bootstrap.heartbeat(beat("n1")).await,
            "bootstrap renewing a lease",
        );
        denied(
            bootstrap
                .watch(watch("n1"))
                .await
                .map(|_| tonic::Response::new(())),
            "bootstrap watching",
        );
        let (_, csr) = control_plane_api::node_csr("n1").unwrap();
        let taken = bootstrap
            .register(RegisterRequest {
                client_csr_pem: csr,
                ..register("n1")
            })
            .await;
        denied(taken, "bootstrap taking over the live n1");
        let (_, _, fresh) = cp.process().join(register("n3")).await.unwrap();
        assert_eq!(fresh.node(), Some(("n3".to_owned(), true)));

        // A certificate the cluster's CA did not sign is no identity.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:n1");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        let forged = control_plane_api::NodeIdentity {
            cert_pem: params.self_signed(&key).unwrap().pem(),
            key_pem: key.serialize_pem(),
        };
        let refused = match cp.process().as_node(&forged).await {
            Err(_) => true,
            Ok(mut c) => c.heartbeat(beat("n1")).await.is_err(),
        };
        assert!(refused, "a forged node certificate is refused");
        assert_eq!(identity.node(), Some(("n1".to_owned(), true)));
    });
}

#[test]
fn the_feed_resumes_without_a_resync_and_snapshots_when_the_history_is_gone() {
    let mut cp = ControlPlane::start("embedded:{dir}", &["--feed-history", "50"]);
    let api = Api::new(&cp);
    let rt = runtime();
    let (version, n1) = rt.block_on(async {
        let (mut client, _, n1) = cp.process().join(RegisterRequest { node_name: "n1".into(), ..Default::default() }).await.unwrap();
        let (snapshot, v0, _, mut stream) = first_message(&mut client, "n1", &(0, String::new())).await;
        assert!(snapshot, "a first watch starts with a snapshot");
        api.call(Method::POST, "/api/v1/namespaces/default/services", Some(plain_service("one"))).await;
        let mut version = v0;
        let mut seen_one = false;
        while !seen_one {
            let m = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
            if let Some(feed_message::Kind::Deltas(d)) = m.kind {
                version.0 = d.version;
                seen_one = d.deltas.iter().any(|d| matches!(&d.change, Some(control_plane_api::feed::delta::Change::Service(s)) if s.name == "one"));
            }
        }
        drop(stream); // the connection drops

        for name in ["two", "three"] {
            api.call(Method::POST, "/api/v1/namespaces/default/services", Some(plain_service(name))).await;
        }
        let (snapshot, mut last, mut names, mut stream) = first_message(&mut client, "n1", &version).await;
        assert!(!snapshot, "resuming within the history needs no snapshot");
        // What was missed arrives as deltas (possibly over more than one message).
        while names.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("the missed changes").unwrap().unwrap();
            if let Some(feed_message::Kind::Deltas(d)) = m.kind {
                last.0 = d.version;
                names.extend(service_names(&d));
            }
        }
        assert_eq!(names, ["two", "three"]);

        // A token that is not the node token is refused.
        let ca = cp.process().config().unwrap().ca_pem;
        let mut intruder = control_plane_api::connect(&cp.process().feed_url, &ca, "not-the-token").await.unwrap();
        let err = intruder.watch(WatchRequest { node_name: "n1".into(), resume_from: 0, epoch: String::new() }).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        (last, n1)
    });

    // The control plane restarts: its history is in the store, agents resume without a resync.
    cp.restart();
    rt.block_on(async {
        let mut client = cp.process().as_node(&n1).await.unwrap();
        api.call(
            Method::POST,
            "/api/v1/namespaces/default/services",
            Some(plain_service("four")),
        )
        .await;
        let (snapshot, _, names, _) = first_message(&mut client, "n1", &version).await;
        assert!(
            !snapshot,
            "after a control-plane restart, resuming needs no snapshot"
        );
        assert_eq!(names, ["four"]);

        // More changes than the history holds: a reconnect from the old version gets a snapshot
        // with everything.
        for i in 0..60 {
            api.call(
                Method::POST,
                "/api/v1/namespaces/default/services",
                Some(plain_service(&format!("bulk{i}"))),
            )
            .await;
        }
        let mut stream = client
            .watch(WatchRequest {
                node_name: "n1".into(),
                resume_from: version.0,
                epoch: version.1.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut services = 0;
        loop {
            let m = stream.message().await.unwrap().unwrap();
            match m.kind.unwrap() {
                feed_message::Kind::Snapshot(c) => {
                    services += c.services.len();
                    if c.last {
                        break;
                    }
                }
                feed_message::Kind::Deltas(_) => {
                    panic!("the history is gone: a snapshot must come first")
                }
            }
        }
        assert_eq!(
            services, 65,
            "the snapshot holds every service (the 64 and default/kubernetes)"
        );
    });

    // The store is replaced by an empty one that gets as far in its own history: the old
    // version means nothing there, and the agent gets a snapshot, not the new store's deltas.
    let (at, epoch) = rt.block_on(async {
        let mut client = cp.process().as_node(&n1).await.unwrap();
        let (snapshot, at, _, _) = first_message(&mut client, "n1", &(0, String::new())).await;
        assert!(snapshot);
        at
    });
    cp.replace_store();
    rt.block_on(async {
        let mut client = cp.process().as_node(&n1).await.unwrap();
        let mut i = 0;
        loop {
            let (_, now, _, _) = first_message(&mut client, "n1", &(0, String::new())).await;
            assert_ne!(now.1, epoch, "a new store, a new epoch");
            if now.0 > at + 2 {
                break;
            }
            api.call(
                Method::POST,
                "/api/v1/namespaces/default/services",
                Some(plain_service(&format!("new{i}"))),
            )
            .await;
            i += 1;
        }
        let (snapshot, _, names, _) = first_message(&mut client, "n1", &(at, epoch)).await;
        assert!(
            snapshot,
            "another store's history is never resumed: {names:?}"
        );
        assert_eq!(
            names.len(),
            i + 1,
            "everything the new store holds: {names:?}"
        );
    });
}

on_both_stores!(
    a_deployment_gets_scheduled_made_ready_and_its_service_filled_and_failures_are_reported
);
