//! A node agent played by the tests, over the real feed and the agents' own session code
//! (`control_plane_api::session`): it registers its node, heartbeats, follows the Watch stream
//! into a view, and acts as a kubelet would for the pods bound to it:
//! gives each an IP from the node's pod CIDR, reports it running and ready (after a delay), and
//! confirms deletions.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use control_plane::launch::Process;
use control_plane_api::{
    FeedClient,
    feed::{self, PodPhase, PodStatusReport, RegisterRequest, Resources},
    session,
    view::{Changes, View},
};
use tokio::task::JoinHandle;

pub struct Agent {
    pub name: String,
    pub client: FeedClient,
    pub view: Arc<Mutex<View>>,
    /// Heartbeats stop while false (the node looks dead).
    pub alive: Arc<AtomicBool>,
    /// The IP given to each pod (by uid).
    ips: Arc<Mutex<HashMap<String, String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Registers `name`, heartbeats every `heartbeat`, and runs pods, reporting them ready
    /// `ready_after` after they arrive.
    pub async fn start(
        cp: &Process,
        name: &str,
        heartbeat: Duration,
        ready_after: Duration,
    ) -> Self {
        let (client, _, _) = cp
            .join(RegisterRequest {
                node_name: name.into(),
                internal_ip: "192.0.2.10".into(),
                capacity: Some(Resources {
                    cpu_millis: 8000,
                    memory_bytes: 16 << 30,
                    pods: 110,
                }),
                labels: [(
                    "topology.kubernetes.io/zone".to_owned(),
                    format!("zone-{name}"),
                )]
                .into_iter()
                .collect(),
                kubelet_port: 0,
                ..Default::default()
            })
            .await
            .expect("register");
        let view = Arc::new(Mutex::new(View::default()));
        let alive = Arc::new(AtomicBool::new(true));
        let mut tasks = Vec::new();
        let ips: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        {
            let alive = alive.clone();
            tasks.push(tokio::spawn(session::heartbeat(
                client.clone(),
                name.to_owned(),
                heartbeat,
                move || alive.load(Ordering::SeqCst),
            )));
        }
        {
            let (report_client, node, alive, ips) =
                (client.clone(), name.to_owned(), alive.clone(), ips.clone());
            let next_ip = Arc::new(AtomicU32::new(2));
            let on_change = move |view: &View, changes: Changes| {
                let cidr = view
                    .nodes
                    .get(&node)
                    .and_then(|n| n.pod_cidrs.first().cloned());
                for pod in changes.pods {
                    let mut client = report_client.clone();
                    let name = node.clone();
                    let alive = alive.clone();
                    let ip = ips
                        .lock()
                        .unwrap()
                        .entry(pod.uid.clone())
                        .or_insert_with(|| {
                            pod_ip(cidr.as_deref(), next_ip.fetch_add(1, Ordering::SeqCst))
                        })
                        .clone();
                    tokio::spawn(async move {
                        if !pod.deleting {
                            tokio::time::sleep(ready_after).await;
                        }
                        if !alive.load(Ordering::SeqCst) {
                            return; // a dead node reports nothing
                        }
                        let _ = client.report_pod_status(report(&name, &pod, &ip)).await;
                    });
                }
            };
            tasks.push(tokio::spawn(session::follow(
                client.clone(),
                name.to_owned(),
                view.clone(),
                Arc::default(),
                on_change,
            )));
        }
        Self {
            name: name.into(),
            client,
            view,
            alive,
            ips,
            tasks,
        }
    }

    /// Reports every pod it runs again (what a kubelet does after it comes back).
    pub async fn report_all(&mut self) {
        let pods: Vec<feed::Pod> = self.view.lock().unwrap().pods.values().cloned().collect();
        for pod in &pods {
            let ip = self.ips.lock().unwrap().get(&pod.uid).cloned();
            if let Some(ip) = ip {
                let _ = self
                    .client
                    .report_pod_status(report(&self.name, pod, &ip))
                    .await;
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn pod_ip(cidr: Option<&str>, n: u32) -> String {
    let base = cidr
        .and_then(|c| c.split('/').next())
        .unwrap_or("10.255.0.0");
    let mut octets: Vec<u32> = base.split('.').map(|o| o.parse().unwrap()).collect();
    octets[3] += n;
    octets
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn report(node: &str, pod: &feed::Pod, ip: &str) -> PodStatusReport {
    PodStatusReport {
        node_name: node.into(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        phase: PodPhase::Running as i32,
        pod_ip: ip.into(),
        ready: true,
        containers: Vec::new(),
        deleted: pod.deleting,
        status_json: Vec::new(),
    }
}
