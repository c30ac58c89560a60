//! Pods that really run: a control plane and two nodes (network namespaces on a node network),
//! each running `node-agent run --run-pods`; workloads applied with kubectl; traffic between
//! real containers (runc) in pod namespaces wired by keel-cni, through the eBPF data plane.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use benches::lab::ClusterLab;
use serde_json::Value;

mod common;

use common::*;

#[test]
fn pods_run_on_every_node_and_reach_each_other_directly_and_through_services() {
    let lab = lab("net");
    lab.apply(ECHO_DEPLOYMENT).unwrap();
    let pods = lab
        .wait_ready("app=echo", 4, Duration::from_secs(90))
        .expect("4 echo pods running and ready");

    // Each pod's address is in its node's pod CIDR.
    let cidrs: BTreeMap<String, String> = lab
        .nodes
        .iter()
        .map(|n| {
            let node: Value = serde_json::from_str(
                &lab.kubectl_ok(&["get", "node", &n.name, "-o", "json"])
                    .unwrap(),
            )
            .unwrap();
            (
                n.name.clone(),
                node["spec"]["podCIDR"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for pod in &pods {
        let node = pod["spec"]["nodeName"].as_str().unwrap();
        let prefix = cidrs[node]
            .rsplit_once(".0/")
            .map(|(p, _)| p.to_owned())
            .unwrap();
        assert!(
            ip_of(pod).to_string().starts_with(&format!("{prefix}.")),
            "{} on {node} has {} outside {}",
            pod["metadata"]["name"],
            ip_of(pod),
            cidrs[node]
        );
    }
    let nodes_used: std::collections::BTreeSet<&str> = pods
        .iter()
        .map(|p| p["spec"]["nodeName"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes_used.len(),
        2,
        "the scheduler spread the pods over both nodes"
    );

    // Pod to pod, across nodes: every pod reaches every other at its address.
    let from = &pods[0];
    let from_netns = ClusterLab::pod_netns(from);
    for to in &pods[1..] {
        let addr = SocketAddrV4::new(ip_of(to), 8080);
        let answer = in_pod(&from_netns, || ask(addr));
        assert_eq!(
            answer,
            format!(
                "{}@{}",
                to["metadata"]["name"].as_str().unwrap(),
                to["spec"]["nodeName"].as_str().unwrap()
            ),
            "from {} to {}",
            from["metadata"]["name"],
            to["metadata"]["name"]
        );
    }

    // Through the ClusterIP: pods on both nodes answer, from a pod of either node.
    let svc: Value = serde_json::from_str(
        &lab.kubectl_ok(&["get", "svc", "echo", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let vip: Ipv4Addr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let to = SocketAddrV4::new(vip, 80);
    let answers: BTreeMap<String, usize> = in_pod(&from_netns, || {
        let mut seen = BTreeMap::new();
        for _ in 0..80 {
            *seen.entry(ask(to)).or_insert(0) += 1;
        }
        seen
    });
    assert!(
        answers.keys().all(|a| !a.starts_with("error")),
        "every connection answered: {answers:?}"
    );
    let answering_nodes: std::collections::BTreeSet<&str> =
        answers.keys().filter_map(|a| a.split('@').nth(1)).collect();
    assert_eq!(
        answering_nodes.len(),
        2,
        "pods on both nodes answer through the service: {answers:?}"
    );

    // The environment kubelet gives the container: the service links and the downward API,
    // read from the container's process (runc knows its pid).
    let name = from["metadata"]["name"].as_str().unwrap();
    let node_of_from = from["spec"]["nodeName"].as_str().unwrap();
    let root = &lab
        .nodes
        .iter()
        .find(|n| n.name == node_of_from)
        .unwrap()
        .root;
    let state = std::process::Command::new("runc")
        .arg("--root")
        .arg(root.join("runc"))
        .args([
            "state",
            &format!("{}-echo", from["metadata"]["uid"].as_str().unwrap()),
        ])
        .output()
        .unwrap();
    let state: Value = serde_json::from_slice(&state.stdout).expect("runc state");
    let environ = std::fs::read(format!("/proc/{}/environ", state["pid"])).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    for want in [
        format!("ECHO_SERVICE_HOST={vip}"),
        "ECHO_SERVICE_PORT=80".to_owned(),
        format!("ECHO_PORT_80_TCP=tcp://{vip}:80"),
        format!("POD_NAME={name}"),
        format!("NODE_NAME={node_of_from}"),
    ] {
        assert!(
            environ.split('\0').any(|e| e == want),
            "{want} in {environ:?}"
        );
    }

    // Leaving the pod network, a pod's traffic is masqueraded to its node's address.
    let outside = std::net::TcpListener::bind((lab.network.host, 0)).unwrap();
    let outside_addr = match outside.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let masq_netns = from_netns.clone();
    let connect = std::thread::spawn(move || {
        in_pod(&masq_netns, move || {
            std::net::TcpStream::connect(outside_addr).map(drop)
        })
    });
    let (_, peer) = outside
        .accept()
        .expect("the pod reaches an address outside the cluster");
    connect.join().unwrap().unwrap();
    let node_addr = lab
        .nodes
        .iter()
        .find(|n| n.name == node_of_from)
        .unwrap()
        .addr;
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(node_addr),
        "masqueraded to the node's address"
    );

    // kubectl logs: through the API server, from the node's kubelet, over TLS.
    let logs = lab.kubectl_ok(&["logs", name]).unwrap();
    assert!(
        logs.contains(&format!("keel-echo: {name}@{node_of_from} serving")),
        "the container's first line: {logs:?}"
    );

    // The agent of the node the other pods are on is killed and started again: it adopts its
    // running containers (none restarts) and their network, and flows carry on.
    let victim = pods
        .iter()
        .map(|p| p["spec"]["nodeName"].as_str().unwrap())
        .find(|n| *n != node_of_from)
        .unwrap()
        .to_owned();
    let on_victim: Vec<&Value> = pods
        .iter()
        .filter(|p| p["spec"]["nodeName"] == victim.as_str())
        .collect();
    let target = SocketAddrV4::new(ip_of(on_victim[0]), 8080);
    let mut persistent = in_pod(&from_netns, || {
        node_agent_netns::traffic::Connection::open(target)
    })
    .expect("a connection to a pod on the other node");
    let restarts = |lab: &ClusterLab| -> Vec<(String, i64, String)> {
        lab.pods("app=echo")
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    p["status"]["containerStatuses"][0]["restartCount"]
                        .as_i64()
                        .unwrap_or(-1),
                    p["status"]["podIP"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let before = restarts(&lab);
    let mut lab = lab;
    let node = lab.nodes.iter_mut().find(|n| n.name == victim).unwrap();
    node.agent.kill();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        persistent.ask().is_ok(),
        "containers keep serving while their agent is down"
    );
    node.agent.restart().unwrap();
    node.agent.wait_healthy(Duration::from_secs(60)).unwrap();
    // Healthy comes first; the kubelet then reconciles its pods and adopts their containers.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !node
        .agent
        .recent_logs()
        .contains("adopted a running container")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        node.agent
            .recent_logs()
            .contains("adopted a running container"),
        "the restarted agent adopted its containers:\n{}",
        node.agent.recent_logs()
    );
    lab.wait_ready("app=echo", 4, Duration::from_secs(30))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        restarts(&lab),
        before,
        "no container restarted, no address changed"
    );
    persistent
        .ask()
        .expect("the connection opened before the restart still works");
    let again = in_pod(&from_netns, || {
        (0..20).filter(|_| !ask(to).starts_with("error")).count()
    });
    assert_eq!(
        again, 20,
        "new connections through the service after the restart"
    );
}

#[test]
fn probes_restarts_graceful_deletion_limits_volumes_and_missing_images() {
    let lab = lab("life");
    // A directory of the node the test's pods see as a hostPath volume: the test controls a
    // readiness probe through it, and a TERM handler leaves its mark in it.
    let shared = lab.dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: slow-ready, labels: {app: slow}}
spec:
  containers:
  - name: main
    image: busybox
    command: [sleep, "3600"]
    readinessProbe:
      exec: {command: [test, -f, /shared/ready]}
      periodSeconds: 1
    volumeMounts: [{name: shared, mountPath: /shared}]
  volumes: [{name: shared, hostPath: {path: SHARED}}]
---
apiVersion: v1
kind: Pod
metadata: {name: initialized}
spec:
  initContainers:
  - name: first
    image: busybox
    command: [sh, -c, "echo from-init > /work/message"]
    volumeMounts: [{name: work, mountPath: /work}]
  - name: second
    image: busybox
    command: [sh, -c, "echo and-again >> /work/message"]
    volumeMounts: [{name: work, mountPath: /work}]
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "cat /work/message; exec sleep 3600"]
    volumeMounts: [{name: work, mountPath: /work, readOnly: true}]
  volumes: [{name: work, emptyDir: {}}]
---
apiVersion: v1
kind: Pod
metadata: {name: init-fails}
spec:
  restartPolicy: Never
  initContainers:
  - name: check
    image: busybox
    command: [sh, -c, "exit 7"]
  containers:
  - name: main
    image: busybox
    command: [sleep, "3600"]
---
apiVersion: v1
kind: Pod
metadata: {name: config-volume}
spec:
  containers:
  - name: main
    image: busybox
    command: [sleep, "3600"]
    volumeMounts: [{name: settings, mountPath: /etc/settings}]
  volumes: [{name: settings, configMap: {name: settings}}]
---
apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "echo crashing; exit 3"]
---
apiVersion: v1
kind: Pod
metadata: {name: no-image}
spec:
  containers:
  - name: main
    image: keel/does-not-exist:1.0
---
apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "head -c 200000000 /dev/zero | tail"]
    resources: {limits: {memory: 32Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: ticker}
spec:
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"]
---
apiVersion: v1
kind: Pod
metadata: {name: graceful}
spec:
  terminationGracePeriodSeconds: 3600
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "trap 'sleep 2; echo done > /shared/terminated; exit 0' TERM; while true; do sleep 0.2; done"]
    volumeMounts: [{name: shared, mountPath: /shared}]
  volumes: [{name: shared, hostPath: {path: SHARED}}]
"#
    .replace("SHARED", shared.to_str().unwrap());
    lab.apply(&manifest).unwrap();

    let status = |name: &str| -> Value {
        serde_json::from_str(&lab.kubectl_ok(&["get", "pod", name, "-o", "json"]).unwrap()).unwrap()
    };
    // Readiness gates the endpoint: the container runs, the probe fails, the pod is not ready
    // and its endpoint is not ready; the probe's file appears, and both turn ready.
    let running_unready = |s: &Value| {
        s["status"]["phase"] == "Running"
            && s["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "False")
    };
    eventually(60, "slow-ready running, not ready", || {
        let s = status("slow-ready");
        seen(running_unready(&s), (), &s["status"])
    });
    let slice_ready = || -> Vec<Value> {
        let out = lab
            .kubectl_ok(&["get", "endpointslices", "-o", "json"])
            .unwrap();
        let list: Value = serde_json::from_str(&out).unwrap();
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["targetRef"]["name"] == "slow-ready")
            .map(|e| e["conditions"]["ready"].clone())
            .collect()
    };
    lab.kubectl_ok(&["expose", "pod", "slow-ready", "--port=80", "--name=slow"])
        .unwrap();
    eventually(30, "slow-ready's endpoint, not ready", || {
        let ready = slice_ready();
        seen(ready == [Value::Bool(false)], (), &Value::from(ready))
    });
    // Several probe periods later it still is not.
    std::thread::sleep(Duration::from_secs(3));
    let s = status("slow-ready");
    assert!(running_unready(&s), "{}", s["status"]);
    std::fs::write(shared.join("ready"), "").unwrap();
    lab.wait_ready("app=slow", 1, Duration::from_secs(60))
        .unwrap();
    eventually(30, "slow-ready's endpoint ready", || {
        let ready = slice_ready();
        seen(ready == [Value::Bool(true)], (), &Value::from(ready))
    });

    // Init containers run in order, to completion, before the others; an emptyDir carries
    // what they wrote.
    eventually(60, "the initialized pod running", || {
        let s = status("initialized");
        let init = &s["status"]["initContainerStatuses"];
        let ok = s["status"]["phase"] == "Running"
            && init[0]["state"]["terminated"]["reason"] == "Completed"
            && init[1]["state"]["terminated"]["reason"] == "Completed";
        seen(ok, (), &s["status"])
    });
    eventually(30, "the main container's log", || {
        let log = lab
            .kubectl_ok(&["logs", "initialized", "-c", "main"])
            .unwrap();
        seen(log == "from-init\nand-again\n", (), &Value::from(log))
    });
    // A failed init container with restartPolicy Never fails the pod; its main never runs.
    eventually(60, "init-fails Failed", || {
        let s = status("init-fails");
        let ok = s["status"]["phase"] == "Failed"
            && s["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
            && s["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                == "PodInitializing";
        seen(ok, (), &s["status"])
    });
    // A volume type this kubelet cannot provide is named, not silently left out.
    eventually(30, "config-volume refused", || {
        let s = status("config-volume");
        let w = &s["status"]["containerStatuses"][0]["state"]["waiting"];
        let ok = w["reason"] == "CreateContainerConfigError"
            && w["message"].as_str().unwrap_or("").contains("configMap");
        seen(ok, (), w)
    });
    // Crash loop: restarts count up, with the reason kubelet gives.
    eventually(
        60,
        "the crasher to restart twice, in CrashLoopBackOff",
        || {
            let s = status("crasher");
            let c = &s["status"]["containerStatuses"][0];
            let ok = c["restartCount"].as_i64().unwrap_or(0) >= 2
                && c["state"]["waiting"]["reason"] == "CrashLoopBackOff"
                && c["lastState"]["terminated"]["exitCode"] == 3;
            seen(ok, (), c)
        },
    );
    // The previous run's log, through the API server.
    let previous = lab.kubectl_ok(&["logs", "crasher", "--previous"]).unwrap();
    assert_eq!(previous.trim(), "crashing");
    // Following a log: lines keep coming.
    eventually(30, "the ticker running", || {
        let s = status("ticker");
        seen(s["status"]["phase"] == "Running", (), &s["status"])
    });
    let mut follow = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/kubectl"),
    )
    .args(["logs", "-f", "ticker"])
    .env("KUBECONFIG", &lab.cp.kubeconfig)
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(follow.stdout.take().unwrap()));
    let first: Vec<String> = (0..3).map(|_| lines.next().unwrap().unwrap()).collect();
    let t0 = Instant::now();
    let later = loop {
        let line = lines.next().expect("more lines while following").unwrap();
        if t0.elapsed() > Duration::from_secs(1) {
            break line;
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    let n = |l: &str| l.trim_start_matches("tick ").trim().parse::<u64>().unwrap();
    assert!(first.iter().all(|l| l.starts_with("tick ")), "{first:?}");
    assert!(
        n(&later) > n(&first[2]),
        "new lines arrive: {first:?} then {later}"
    );

    // A missing image says so.
    eventually(30, "ErrImagePull or ImagePullBackOff", || {
        let s = status("no-image");
        let w = &s["status"]["containerStatuses"][0]["state"]["waiting"];
        let ok = matches!(
            w["reason"].as_str(),
            Some("ErrImagePull" | "ImagePullBackOff")
        ) && w["message"]
            .as_str()
            .unwrap_or("")
            .contains("keel/does-not-exist");
        seen(ok, (), w)
    });
    // The memory limit bites.
    eventually(60, "the hog to be OOM-killed", || {
        let s = status("hog");
        let t = &s["status"]["containerStatuses"][0]["state"]["terminated"];
        seen(
            t["reason"] == "OOMKilled" && s["status"]["phase"] == "Failed",
            (),
            &s["status"],
        )
    });

    // Graceful deletion: SIGTERM, the trap's 2 s, then gone (not the 30 s grace period).
    eventually(60, "the graceful pod running", || {
        let s = status("graceful");
        seen(s["status"]["phase"] == "Running", (), &s["status"])
    });
    // The grace period is an hour: the delete returning at all means the pod was gone once its
    // TERM handler finished, and the handler's mark says it ran to its end (not SIGKILLed).
    lab.kubectl_ok(&["delete", "pod", "graceful", "--wait=true", "--timeout=120s"])
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(shared.join("terminated")).unwrap(),
        "done\n"
    );
}
