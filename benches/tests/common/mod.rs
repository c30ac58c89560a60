//! What the cluster tests share: the lab, running code inside a pod's network namespace,
//! polling, and the echo workload.

#![allow(dead_code)] // each test binary uses its own part

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use benches::lab::{Binaries, ClusterLab, Options};
use serde_json::Value;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the cluster tests run containers and build network namespaces: run them as root"
    );
}

pub fn lab(test: &str) -> ClusterLab {
    lab_in(test, "ebpf")
}

/// A two-node lab whose agents run in `proxy_mode`.
pub fn lab_in(test: &str, proxy_mode: &'static str) -> ClusterLab {
    require_root();
    ClusterLab::start(
        &Options {
            prefix: format!("kp-{}-{test}", std::process::id()),
            nodes: 2,
            node_grace: 30.0,
            restart_backoff: 1.0,
            dir: None,
            agent_log: "info",
            proxy_mode,
        },
        Binaries::siblings().expect("the workspace's binaries"),
        &mut |_| {},
    )
    .expect("start the cluster lab")
}

/// Runs `f` on a thread inside the network namespace at `netns` (a pod's).
pub fn in_pod<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(netns).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a descriptor we own, on a thread of our own.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap()
    })
}

pub fn ask(to: SocketAddrV4) -> String {
    node_agent_netns::traffic::tcp_request(to).unwrap_or_else(|e| format!("error: {e:#}"))
}

pub fn ip_of(pod: &Value) -> Ipv4Addr {
    pod["status"]["podIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("a pod IP: {}", pod["status"]))
}

/// Polls `f` until it gives a value; `f` says what it saw otherwise (for the failure).
pub fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(v) => return v,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last seen: {seen}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn seen<T>(ok: bool, value: T, state: &Value) -> Result<T, String> {
    if ok {
        Ok(value)
    } else {
        Err(state.to_string())
    }
}

pub const ECHO_DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 4
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
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
"#;
