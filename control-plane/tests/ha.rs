//! Two control planes on one etcd: both serve the API and the feed, one leads the control loops
//! (a coordination.k8s.io Lease); killing the leader under load hands the loops to the other
//! within the lease duration, and nothing is done twice: no ReplicaSet makes more pods than
//! it wants, no address is handed out twice.

mod common;

use std::{collections::HashSet, time::Duration};

use common::{Api, ControlPlane, agent::Agent, runtime, with_etcd};
use reqwest::Method;
use serde_json::{Value, json};

const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/keel-controller-manager";
const ELECTION: &[&str] = &[
    "--leader-elect-lease-duration",
    "2",
    "--leader-elect-renew-deadline",
    "1.5",
    "--leader-elect-retry-period",
    "0.2",
];

async fn holder(api: &Api) -> Option<String> {
    let (code, lease) = api.call(Method::GET, LEASE, None).await;
    (code == 200)
        .then(|| lease["spec"]["holderIdentity"].as_str().map(str::to_owned))
        .flatten()
}

async fn items(api: &Api, path: &str) -> Vec<Value> {
    let (code, list) = api.call(Method::GET, path, None).await;
    assert_eq!(code, 200, "{list}");
    list["items"].as_array().cloned().unwrap_or_default()
}

fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"type": "NodePort", "ports": [{"port": 80}]}})
}

#[test]
fn the_loops_fail_over_to_another_control_plane_and_nothing_is_done_twice() {
    with_etcd(|endpoint| {
        let store = format!("etcd:{endpoint}");
        let mut first = ControlPlane::start(&store, ELECTION);
        let second = ControlPlane::start_beside(&first, &store, ELECTION);
        let (api1, api2) = (Api::new(&first), Api::new(&second));
        let rt = runtime();
        rt.block_on(async {
            // The first one started first: it leads.
            let port = |cp: &ControlPlane| {
                cp.process()
                    .config()
                    .unwrap()
                    .server
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .to_owned()
            };
            let leader = holder(&api2).await.expect("a leader");
            assert!(leader.ends_with(&port(&first)), "{leader}");

            // Both serve writes, allocating from one store.
            let creates = (0..20).map(|i| {
                let api = if i % 2 == 0 { &api1 } else { &api2 };
                api.call(
                    Method::POST,
                    "/api/v1/namespaces/default/services",
                    Some(service(&format!("svc-{i}"))),
                )
            });
            for (code, body) in futures::future::join_all(creates).await {
                assert_eq!(code, 201, "{body}");
            }

            // Nodes on the second one's feed; a deployment scaling up when the leader dies.
            let mut agents = Vec::new();
            for i in 0..2 {
                agents.push(
                    Agent::start(
                        second.process(),
                        &format!("node-{i}"),
                        Duration::from_millis(200),
                        Duration::from_millis(20),
                    )
                    .await,
                );
            }
            let deployment = json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"replicas": 40, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}
            });
            // Every pod ever made, as a watch from now sees them.
            let made_ever = api2
                .request(
                    Method::GET,
                    "/api/v1/namespaces/default/pods?watch=1&labelSelector=app%3Dweb",
                )
                .send()
                .await
                .unwrap();
            let (code, body) = api2
                .call(
                    Method::POST,
                    "/apis/apps/v1/namespaces/default/deployments",
                    Some(deployment),
                )
                .await;
            assert_eq!(code, 201, "{body}");
            let pods = "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb";
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while items(&api2, pods).await.is_empty() {
                assert!(tokio::time::Instant::now() < deadline, "no pod made");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            first.process_mut().kill();
            let killed = tokio::time::Instant::now();

            // The second takes the lease once it has not moved for its duration (2 s).
            loop {
                if holder(&api2)
                    .await
                    .is_some_and(|h| h.ends_with(&port(&second)))
                {
                    break;
                }
                assert!(
                    killed.elapsed() < Duration::from_secs(15),
                    "the second control plane never took over"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The rollout completes under the new leader, with exactly the pods it wants.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let (_, d) = api2
                    .call(
                        Method::GET,
                        "/apis/apps/v1/namespaces/default/deployments/web",
                        None,
                    )
                    .await;
                if d["status"]["availableReplicas"] == 40 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the deployment never completed: {}",
                    d["status"]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Let any duplicate worker show itself, then count.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let sets = items(&api2, "/apis/apps/v1/namespaces/default/replicasets").await;
            assert_eq!(sets.len(), 1, "one ReplicaSet");
            let made = items(&api2, pods).await;
            assert_eq!(made.len(), 40, "40 pods");
            let events = common::events(made_ever, 10_000, 2).await;
            let added: HashSet<&str> = events
                .iter()
                .filter(|e| e["type"] == "ADDED")
                .map(|e| e["object"]["metadata"]["name"].as_str().unwrap())
                .collect();
            assert_eq!(added.len(), 40, "no pod made twice, even for a moment");

            // Addresses: none held twice, whichever server allocated them.
            let services = items(&api2, "/api/v1/namespaces/default/services").await;
            let ips: HashSet<&str> = services
                .iter()
                .map(|s| s["spec"]["clusterIP"].as_str().unwrap())
                .collect();
            assert_eq!(ips.len(), services.len(), "no ClusterIP twice");
            let ports: Vec<u64> = services
                .iter()
                .filter_map(|s| s["spec"]["ports"][0]["nodePort"].as_u64())
                .collect();
            let unique: HashSet<&u64> = ports.iter().collect();
            assert_eq!(unique.len(), 20, "no NodePort twice: {ports:?}");

            // The first comes back: it does not take the lease from a live leader.
            first.process_mut().resume().unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            let leader = holder(&api2).await.unwrap();
            assert!(leader.ends_with(&port(&second)), "{leader}");
            drop(agents);
        });
    });
}
