//! The scheduler: takes pods that have no node, one at a time, filters the nodes (readiness and
//! cordons, taints and tolerations, nodeSelector and required node affinity, requested
//! resources against allocatable), scores the rest (least allocated plus balanced allocation,
//! as kube-scheduler's defaults), and binds the pod to the best through the binding
//! subresource. The decision is assumed in the scheduler's cache at once, so the next pod sees
//! it while the binding is still being written; bindings run concurrently.
//!
//! A pod that fits nowhere gets `PodScheduled=False` (reason `Unschedulable`, with kube's
//! "0/N nodes are available: ..." message) and a `FailedScheduling` event, and is tried again
//! when nodes change or pods leave.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodCondition, Taint, Toleration,
};
use tokio::sync::Semaphore;

use crate::{
    client::Client,
    events::{Kind, Recorder},
    informer::{Informer, key_of},
    quantity::{Resources, pod_requests},
    queue::Queue,
    util::set_condition,
};

pub const SCHEDULER_NAME: &str = "default-scheduler";
/// Bindings written at once.
const BIND_CONCURRENCY: usize = 32;
/// Unschedulable pods are tried again at least this often.
const RETRY_UNSCHEDULABLE: Duration = Duration::from_secs(30);

struct NodeInfo {
    node: Arc<Node>,
    allocatable: Resources,
    requested: Resources,
    /// Requests with the scoring defaults for containers that request nothing.
    nonzero: Resources,
    /// Host ports the pods on the node hold (one entry per pod port).
    host_ports: Vec<HostPort>,
}

/// A `hostPort` a pod asks for: protocol, host address (empty: every address) and port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostPort {
    protocol: String,
    ip: String,
    port: i32,
}

impl HostPort {
    /// Whether two pods asking for these cannot share a node (kube-scheduler's NodePorts
    /// filter): the same protocol and port on the same address, or on every address.
    fn conflicts(&self, other: &HostPort) -> bool {
        let wildcard = |ip: &str| ip.is_empty() || ip == "0.0.0.0";
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip == other.ip || wildcard(&self.ip) || wildcard(&other.ip))
    }
}

/// The host ports `pod` asks for.
fn host_ports(pod: &Pod) -> Vec<HostPort> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(HostPort {
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ip: p.host_ip.clone().unwrap_or_default(),
                port: p.host_port.filter(|port| *port > 0)?,
            })
        })
        .collect()
}

/// What a pod counted on a node holds there.
struct Placed {
    node: String,
    req: Resources,
    nonzero: Resources,
    host_ports: Vec<HostPort>,
}

#[derive(Default)]
struct Cache {
    nodes: HashMap<String, NodeInfo>,
    /// Pods counted on a node (bound, or assumed while their binding is written).
    placed: HashMap<String, Placed>,
}

impl Cache {
    fn place(&mut self, pod: String, placed: Placed) {
        if self.placed.get(&pod).is_some_and(|p| p.node == placed.node) {
            return;
        }
        self.remove(&pod);
        if let Some(info) = self.nodes.get_mut(&placed.node) {
            info.add(&placed);
        }
        self.placed.insert(pod, placed);
    }

    fn remove(&mut self, pod: &str) -> bool {
        let Some(placed) = self.placed.remove(pod) else {
            return false;
        };
        if let Some(info) = self.nodes.get_mut(&placed.node) {
            info.requested.sub(&placed.req);
            info.nonzero.sub(&placed.nonzero);
            for port in &placed.host_ports {
                if let Some(i) = info.host_ports.iter().position(|p| p == port) {
                    info.host_ports.swap_remove(i);
                }
            }
        }
        true
    }

    fn set_node(&mut self, node: Arc<Node>) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let status = node.status.as_ref();
        let allocatable = Resources::from_list(
            status
                .and_then(|s| s.allocatable.as_ref())
                .or(status.and_then(|s| s.capacity.as_ref())),
        );
        match self.nodes.get_mut(&name) {
            Some(info) => {
                info.node = node;
                info.allocatable = allocatable;
            }
            None => {
                let mut info = NodeInfo {
                    node,
                    allocatable,
                    requested: Resources::default(),
                    nonzero: Resources::default(),
                    host_ports: Vec::new(),
                };
                for placed in self.placed.values().filter(|p| p.node == name) {
                    info.add(placed);
                }
                self.nodes.insert(name, info);
            }
        }
    }
}

pub struct Scheduler {
    client: Client,
    pods: Arc<Informer<Pod>>,
    cache: Mutex<Cache>,
    active: Arc<Queue<String>>,
    /// Pods that fit nowhere, with the message they were given.
    unschedulable: Mutex<HashMap<String, String>>,
    binds: Arc<Semaphore>,
    recorder: Recorder,
}

fn bound(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn ours(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|n| n.is_empty() || n == SCHEDULER_NAME)
}

impl NodeInfo {
    fn add(&mut self, placed: &Placed) {
        self.requested.add(&placed.req);
        self.nonzero.add(&placed.nonzero);
        self.host_ports.extend(placed.host_ports.iter().cloned());
    }
}

fn wants_scheduling(pod: &Pod) -> bool {
    bound(pod).is_none() && pod.metadata.deletion_timestamp.is_none() && !finished(pod) && ours(pod)
}

/// Why a node does not fit, in kube-scheduler's words.
fn filter(pod: &Pod, req: &Resources, info: &NodeInfo) -> Result<(), Vec<String>> {
    let node = &info.node;
    let spec = pod.spec.as_ref();
    let mut reasons = Vec::new();
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        reasons.push("node(s) were unschedulable".to_owned());
    }
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        reasons.push("node(s) were not ready".to_owned());
    }
    let tolerations: &[Toleration] = spec
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    for taint in node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
    {
        if matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
            && !tolerations.iter().any(|t| tolerates(t, taint))
        {
            reasons.push(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key,
                taint.value.as_deref().unwrap_or("")
            ));
            break;
        }
    }
    if !affinity_matches(pod, node) {
        reasons.push("node(s) didn't match Pod's node affinity/selector".to_owned());
    }
    let free = |alloc: i64, used: i64| alloc - used;
    if req.cpu_millis > 0
        && req.cpu_millis > free(info.allocatable.cpu_millis, info.requested.cpu_millis)
    {
        reasons.push("Insufficient cpu".to_owned());
    }
    if req.memory > 0 && req.memory > free(info.allocatable.memory, info.requested.memory) {
        reasons.push("Insufficient memory".to_owned());
    }
    if info.requested.pods + 1 > info.allocatable.pods {
        reasons.push("Too many pods".to_owned());
    }
    if host_ports(pod)
        .iter()
        .any(|wanted| info.host_ports.iter().any(|held| wanted.conflicts(held)))
    {
        reasons.push("node(s) didn't have free ports for the requested pod ports".to_owned());
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons)
    }
}

/// Whether `t` tolerates `taint` (the rules of k8s.io/api/core/v1 Toleration.ToleratesTaint).
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if t.effect
        .as_deref()
        .is_some_and(|e| !e.is_empty() && e != taint.effect)
    {
        return false;
    }
    let key = t.key.as_deref().unwrap_or("");
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" | "" => {
            !key.is_empty()
                && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        _ => false,
    }
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>, name: &str) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false; // an empty term matches nothing
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(name)))
}

fn affinity_matches(pod: &Pod, node: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.metadata.name.as_deref().unwrap_or("");
    let Some(spec) = &pod.spec else { return true };
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    required.is_none_or(|r| {
        r.node_selector_terms
            .iter()
            .any(|t| term_matches(t, labels, name))
    })
}

/// Least allocated plus balanced allocation, each 0..=100, after placing the pod.
fn score(nonzero: &Resources, info: &NodeInfo) -> i64 {
    let fraction = |used: i64, alloc: i64| {
        if alloc <= 0 {
            1.0
        } else {
            (used as f64 / alloc as f64).min(1.0)
        }
    };
    let cpu = fraction(
        info.nonzero.cpu_millis + nonzero.cpu_millis,
        info.allocatable.cpu_millis,
    );
    let mem = fraction(
        info.nonzero.memory + nonzero.memory,
        info.allocatable.memory,
    );
    let least = ((1.0 - cpu) + (1.0 - mem)) * 50.0;
    let balanced = (1.0 - (cpu - mem).abs()) * 100.0;
    (least + balanced) as i64
}

/// "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) were unschedulable."
fn failure_message(total: usize, reasons: &BTreeMap<String, usize>) -> String {
    if total == 0 {
        return "0/0 nodes are available: no nodes available to schedule pods.".to_owned();
    }
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!("0/{total} nodes are available: {}.", parts.join(", "))
}

impl Scheduler {
    /// Starts the scheduler on the informers of `client`.
    pub fn start(client: Client) -> Arc<Self> {
        let pods = client.informers.get::<Pod>();
        let nodes = client.informers.get::<Node>();
        let scheduler = Arc::new(Self {
            recorder: Recorder::new(client.clone(), SCHEDULER_NAME),
            client,
            pods: pods.clone(),
            cache: Mutex::new(Cache::default()),
            active: Queue::new(),
            unschedulable: Mutex::new(HashMap::new()),
            binds: Arc::new(Semaphore::new(BIND_CONCURRENCY)),
        });
        let s = scheduler.clone();
        nodes.on_change(move |change| {
            let mut cache = s.cache.lock().expect("not poisoned");
            match &change.new {
                Some(node) => cache.set_node(node.clone()),
                None => {
                    cache
                        .nodes
                        .remove(change.object().metadata.name.as_deref().unwrap_or(""));
                }
            }
            drop(cache);
            s.retry_unschedulable();
        });
        let s = scheduler.clone();
        pods.on_change(move |change| s.pod_changed(change));
        let s = scheduler.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETRY_UNSCHEDULABLE);
            loop {
                tick.tick().await;
                s.retry_unschedulable();
            }
        });
        let s = scheduler.clone();
        tokio::spawn(async move {
            s.client.informers.synced().await;
            loop {
                let key = s.active.next().await;
                s.schedule_one(&key).await;
                s.active.done(&key, true);
            }
        });
        scheduler
    }

    fn pod_changed(&self, change: &crate::informer::Change<Pod>) {
        let pod = change.object();
        let key = key_of(&pod.metadata);
        match &change.new {
            Some(pod) if wants_scheduling(pod) => self.active.add(key),
            Some(pod) if bound(pod).is_some() && !finished(pod) => {
                let (req, nonzero) = pod_requests(pod);
                self.cache.lock().expect("not poisoned").place(
                    key.clone(),
                    Placed {
                        node: bound(pod).expect("bound").to_owned(),
                        req,
                        nonzero,
                        host_ports: host_ports(pod),
                    },
                );
                self.unschedulable
                    .lock()
                    .expect("not poisoned")
                    .remove(&key);
            }
            _ => {
                // Deleted or finished: what it held is free again.
                self.unschedulable
                    .lock()
                    .expect("not poisoned")
                    .remove(&key);
                if self.cache.lock().expect("not poisoned").remove(&key) {
                    self.retry_unschedulable();
                }
            }
        }
    }

    fn retry_unschedulable(&self) {
        let keys: Vec<String> = self
            .unschedulable
            .lock()
            .expect("not poisoned")
            .keys()
            .cloned()
            .collect();
        for key in keys {
            self.active.add(key);
        }
    }

    /// Pods waiting for a node.
    pub fn pending(&self) -> usize {
        self.active.len()
    }

    async fn schedule_one(self: &Arc<Self>, key: &str) {
        let Some(pod) = self.pods.get(key) else {
            return;
        };
        if !wants_scheduling(&pod) {
            return;
        }
        {
            let cache = self.cache.lock().expect("not poisoned");
            if cache.placed.contains_key(key) {
                return; // assumed, its binding is being written
            }
        }
        let (req, nonzero) = pod_requests(&pod);
        let decision = {
            let mut cache = self.cache.lock().expect("not poisoned");
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            let mut best: Option<(&str, i64)> = None;
            let mut ties = 0u32;
            for (name, info) in &cache.nodes {
                match filter(&pod, &req, info) {
                    Err(why) => {
                        for r in why {
                            *reasons.entry(r).or_default() += 1;
                        }
                    }
                    Ok(()) => {
                        let s = score(&nonzero, info);
                        match best {
                            Some((_, b)) if s < b => {}
                            Some((_, b)) if s == b => {
                                // Equal scores: pick one of them uniformly (reservoir sampling).
                                ties += 1;
                                if rand::random_range(0..=ties) == 0 {
                                    best = Some((name, s));
                                }
                            }
                            _ => {
                                best = Some((name, s));
                                ties = 0;
                            }
                        }
                    }
                }
            }
            match best.map(|(n, _)| n.to_owned()) {
                Some(node) => {
                    cache.place(
                        key.to_owned(),
                        Placed {
                            node: node.clone(),
                            req,
                            nonzero,
                            host_ports: host_ports(&pod),
                        },
                    );
                    Ok(node)
                }
                None => Err(failure_message(cache.nodes.len(), &reasons)),
            }
        };
        match decision {
            Ok(node) => self.bind(pod, key.to_owned(), node).await,
            Err(message) => self.unschedulable(&pod, key, message).await,
        }
    }

    async fn bind(self: &Arc<Self>, pod: Arc<Pod>, key: String, node: String) {
        let permit = self
            .binds
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let s = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            let name = pod.metadata.name.as_deref().unwrap_or("");
            match s.client.bind(ns, name, &node).await {
                Ok(_) => {
                    s.unschedulable.lock().expect("not poisoned").remove(&key);
                    s.recorder.record(
                        &*pod,
                        Kind::Normal,
                        "Scheduled",
                        format!("Successfully assigned {ns}/{name} to {node}"),
                    );
                }
                Err(e) => {
                    s.cache.lock().expect("not poisoned").remove(&key);
                    if e.reason != "NotFound" && e.reason != "Conflict" {
                        tracing::info!(pod = %key, %node, error = %e, "binding failed");
                        s.active.retry(key);
                    }
                }
            }
        });
    }

    async fn unschedulable(&self, pod: &Pod, key: &str, message: String) {
        let previous = self
            .unschedulable
            .lock()
            .expect("not poisoned")
            .insert(key.to_owned(), message.clone());
        if previous.as_deref() == Some(message.as_str()) {
            return;
        }
        self.recorder
            .record(pod, Kind::Warning, "FailedScheduling", message.clone());
        let ns = pod.metadata.namespace.as_deref();
        let name = pod.metadata.name.as_deref().unwrap_or("");
        let result = self
            .client
            .update::<Pod>(ns, name, true, |p| {
                set_condition(
                    p,
                    PodCondition {
                        type_: "PodScheduled".into(),
                        status: "False".into(),
                        reason: Some("Unschedulable".into()),
                        message: Some(message.clone()),
                        ..Default::default()
                    },
                )
            })
            .await;
        if let Err(e) = result
            && e.reason != "NotFound"
        {
            tracing::info!(pod = %key, error = %e, "reporting the pod unschedulable failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{
            Container, NodeAffinity, NodeCondition, NodeSelector, NodeSpec, NodeStatus, PodSpec,
            ResourceRequirements,
        },
        apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
    };

    use super::*;

    fn node(name: &str, cpu: &str, labels: &[(&str, &str)], taints: Vec<Taint>) -> NodeInfo {
        let list: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", "8Gi"), ("pods", "110")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
            .collect();
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).into(), (*v).into()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                allocatable: Some(list.clone()),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        NodeInfo {
            allocatable: Resources::from_list(Some(&list)),
            node: Arc::new(node),
            requested: Resources::default(),
            nonzero: Resources::default(),
            host_ports: Vec::new(),
        }
    }

    fn pod(cpu: &str) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    resources: Some(ResourceRequirements {
                        requests: Some(
                            [("cpu".to_owned(), Quantity(cpu.into()))]
                                .into_iter()
                                .collect(),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn host_ports_keep_pods_apart() {
        let with_port = |protocol: &str, ip: Option<&str>, port: i32| {
            let mut p = pod("100m");
            p.spec.as_mut().unwrap().containers[0].ports =
                Some(vec![k8s_openapi::api::core::v1::ContainerPort {
                    container_port: 8080,
                    host_port: Some(port),
                    host_ip: ip.map(Into::into),
                    protocol: Some(protocol.into()),
                    ..Default::default()
                }]);
            p
        };
        let mut cache = Cache::default();
        cache.set_node(node("n", "4", &[], vec![]).node);
        let held = with_port("TCP", None, 80);
        let (req, nonzero) = pod_requests(&held);
        cache.place(
            "default/held".into(),
            Placed {
                node: "n".into(),
                req,
                nonzero,
                host_ports: host_ports(&held),
            },
        );
        let fits = |cache: &Cache, p: &Pod| filter(p, &pod_requests(p).0, &cache.nodes["n"]);
        assert_eq!(
            fits(&cache, &with_port("TCP", Some("10.0.0.1"), 80)),
            Err(vec![
                "node(s) didn't have free ports for the requested pod ports".to_owned()
            ])
        );
        assert_eq!(fits(&cache, &with_port("UDP", None, 80)), Ok(()));
        assert_eq!(fits(&cache, &with_port("TCP", None, 81)), Ok(()));
        // Gone with the pod that held it.
        cache.remove("default/held");
        assert_eq!(fits(&cache, &with_port("TCP", None, 80)), Ok(()));
    }

    #[test]
    fn filters_resources_taints_and_affinity() {
        let small = node("small", "1", &[("zone", "a")], vec![]);
        let p = pod("2");
        let (req, _) = pod_requests(&p);
        assert_eq!(
            filter(&p, &req, &small),
            Err(vec!["Insufficient cpu".to_owned()])
        );

        let tainted = node(
            "t",
            "4",
            &[],
            vec![Taint {
                key: "dedicated".into(),
                value: Some("db".into()),
                effect: "NoSchedule".into(),
                time_added: None,
            }],
        );
        let mut p = pod("1");
        let (req, _) = pod_requests(&p);
        assert_eq!(
            filter(&p, &req, &tainted),
            Err(vec![
                "node(s) had untolerated taint {dedicated: db}".to_owned()
            ])
        );
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("db".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]);
        assert_eq!(filter(&p, &req, &tainted), Ok(()));

        let zoned = node("z", "4", &[("zone", "a")], vec![]);
        p.spec.as_mut().unwrap().affinity = Some(k8s_openapi::api::core::v1::Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "zone".into(),
                            operator: "In".into(),
                            values: Some(vec!["b".into()]),
                        }]),
                        match_fields: None,
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(filter(&p, &req, &zoned).is_err());
        p.spec.as_mut().unwrap().node_selector = None;
    }

    #[test]
    fn scores_prefer_the_emptier_node_and_messages_read_as_kubes() {
        let empty = node("a", "4", &[], vec![]);
        let mut busy = node("b", "4", &[], vec![]);
        busy.nonzero.cpu_millis = 3000;
        busy.nonzero.memory = 6 << 30;
        let (_, nonzero) = pod_requests(&pod("100m"));
        assert!(score(&nonzero, &empty) > score(&nonzero, &busy));
        let reasons: BTreeMap<String, usize> = [
            ("Insufficient cpu".to_owned(), 2),
            ("node(s) were unschedulable".to_owned(), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            failure_message(3, &reasons),
            "0/3 nodes are available: 2 Insufficient cpu, 1 node(s) were unschedulable."
        );
    }
}
