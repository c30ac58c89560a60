//! Node IPAM (a pod CIDR for every node, from the cluster CIDR) and node lifecycle (a node whose
//! Lease stops being renewed turns `Ready=Unknown`, is tainted unreachable, and its pods stop
//! being ready, so their endpoints stop being ready, and are evicted once they have tolerated
//! the taint long enough (`podgc`); when it heartbeats again the taints go).

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc, time::Duration};

use control_plane_apiserver::error::ApiError;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, NodeCondition, Pod, PodCondition, Taint},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};

use crate::{
    client::Client,
    events::{Kind, Recorder},
    informer::{Informer, key_of},
    queue::{Next, Queue, run_workers},
    util::{pod_ready, set_condition},
};

pub use control_plane_client::NODE_LEASE_NAMESPACE;
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// The cluster CIDR cut into per-node blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodCidrs {
    base: u32,
    prefix: u8,
    node_prefix: u8,
}

impl PodCidrs {
    pub fn new(cidr: &str, node_prefix: u8) -> Result<Self, String> {
        let (addr, bits) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?} is not a CIDR"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{cidr:?}: {e}"))?;
        let prefix: u8 = bits.parse().map_err(|e| format!("{cidr:?}: {e}"))?;
        if prefix > node_prefix || node_prefix > 30 {
            return Err(format!(
                "node blocks of /{node_prefix} do not fit in {cidr}"
            ));
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(Self {
            base: u32::from(addr) & mask,
            prefix,
            node_prefix,
        })
    }

    pub fn count(&self) -> u32 {
        1 << (self.node_prefix - self.prefix)
    }

    pub fn block(&self, i: u32) -> String {
        let addr = self.base + (i << (32 - self.node_prefix));
        format!("{}/{}", Ipv4Addr::from(addr), self.node_prefix)
    }

    /// The index of a block of this range, if `cidr` is one.
    pub fn index(&self, cidr: &str) -> Option<u32> {
        let (addr, bits) = cidr.split_once('/')?;
        if bits.parse::<u8>().ok()? != self.node_prefix {
            return None;
        }
        let addr = u32::from(addr.parse::<Ipv4Addr>().ok()?);
        let offset = addr.checked_sub(self.base)?;
        let i = offset >> (32 - self.node_prefix);
        (i < self.count()).then_some(i)
    }

    /// The first block not in `used`.
    pub fn first_free(&self, used: &BTreeSet<u32>) -> Option<String> {
        (0..self.count())
            .find(|i| !used.contains(i))
            .map(|i| self.block(i))
    }
}

fn pod_cidr(node: &Node) -> Option<&str> {
    node.spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_deref())
        .filter(|c| !c.is_empty())
}

/// Gives each node without one the first free pod CIDR (one worker: no two nodes get the same).
pub fn start_ipam(client: Client, cidrs: PodCidrs) {
    let nodes = client.informers.get::<Node>();
    let queue: Arc<Queue<String>> = Queue::new();
    let q = queue.clone();
    nodes.on_change(move |c| {
        if let Some(n) = &c.new
            && pod_cidr(n).is_none()
        {
            q.add(key_of(&n.metadata));
        }
    });
    let recorder = Recorder::new(client.clone(), "node-ipam-controller");
    run_workers(
        "node-ipam",
        queue,
        1,
        client.informers.clone(),
        move |name| {
            let (client, nodes, recorder) = (client.clone(), nodes.clone(), recorder.clone());
            async move {
                let Some(node) = nodes.get(&name) else {
                    return Ok::<_, ApiError>(Next::Done);
                };
                if pod_cidr(&node).is_some() {
                    return Ok(Next::Done);
                }
                let used: BTreeSet<u32> = nodes
                    .list()
                    .iter()
                    .filter_map(|n| pod_cidr(n).and_then(|c| cidrs.index(c)))
                    .collect();
                let Some(cidr) = cidrs.first_free(&used) else {
                    recorder.record(
                        &*node,
                        Kind::Warning,
                        "CIDRNotAvailable",
                        "no pod CIDR is left for this node".into(),
                    );
                    return Ok(Next::After(Duration::from_secs(30)));
                };
                client
                    .update::<Node>(None, &name, false, |n| {
                        let spec = n.spec.get_or_insert_with(Default::default);
                        if spec.pod_cidr.as_deref().is_some_and(|c| !c.is_empty()) {
                            return false;
                        }
                        spec.pod_cidr = Some(cidr.clone());
                        spec.pod_cidrs = Some(vec![cidr.clone()]);
                        true
                    })
                    .await?;
                Ok(Next::Done)
            }
        },
    );
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

fn unreachable_taints(now: &Time) -> [Taint; 2] {
    ["NoSchedule", "NoExecute"].map(|effect| Taint {
        key: UNREACHABLE_TAINT.into(),
        value: None,
        effect: effect.into(),
        time_added: Some(now.clone()),
    })
}

fn has_unreachable_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == UNREACHABLE_TAINT))
}

pub struct Lifecycle {
    client: Client,
    nodes: Arc<Informer<Node>>,
    leases: Arc<Informer<Lease>>,
    pods: Arc<Informer<Pod>>,
    grace: Duration,
    /// How long pods without a toleration of the unreachable taint stay (`podgc::evict`).
    default_toleration: Duration,
    recorder: Recorder,
    /// Per node: the last heartbeat seen, and when this controller saw it change (on its own
    /// clock, as kube-controller-manager's probe timestamps). A node is silent for as long as
    /// its heartbeat has not changed here, so a control plane that was down for longer than
    /// the grace period gives every node a full grace period after it starts, instead of
    /// declaring them all dead and withdrawing every endpoint of the cluster.
    seen:
        std::sync::Mutex<std::collections::HashMap<String, (jiff::Timestamp, std::time::Instant)>>,
    /// Nodes silent now whose pods this controller has already marked not ready. Pods are
    /// marked once per silence, as kube-controller-manager does on the transition: a kubelet
    /// that comes back may report its pods ready before its heartbeat reaches this
    /// controller, and marking again on every tick would undo those reports for good.
    marked: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Lifecycle {
    /// Watches heartbeats; a node silent for `grace` turns NotReady.
    pub fn start(client: Client, grace: Duration, default_toleration: Duration) {
        let lifecycle = Arc::new(Self {
            nodes: client.informers.get::<Node>(),
            leases: client.informers.get::<Lease>(),
            pods: client.informers.get::<Pod>(),
            recorder: Recorder::new(client.clone(), "node-controller"),
            client,
            grace,
            default_toleration,
            seen: Default::default(),
            marked: Default::default(),
        });
        let period = (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::spawn(async move {
            lifecycle.client.informers.synced().await;
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let nodes = lifecycle.nodes.list();
                lifecycle.forget_gone(&nodes);
                for node in nodes {
                    if let Err(e) = lifecycle.check(&node).await {
                        tracing::info!(
                            node = %node.metadata.name.as_deref().unwrap_or_default(),
                            error = %e,
                            "node lifecycle check failed"
                        );
                    }
                }
            }
        });
    }

    /// When the node last showed signs of life: its lease's renewal, or its registration.
    fn last_heartbeat(&self, node: &Node) -> jiff::Timestamp {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let renewed = self
            .leases
            .get(&format!("{NODE_LEASE_NAMESPACE}/{name}"))
            .and_then(|l| l.spec.as_ref()?.renew_time.as_ref().map(|t| t.0));
        let registered = ready_condition(node)
            .and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0))
            .or(node.metadata.creation_timestamp.as_ref().map(|t| t.0));
        renewed
            .into_iter()
            .chain(registered)
            .max()
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    /// How long the node's heartbeat has not changed, as this controller observed it.
    fn silent_for(&self, name: &str, heartbeat: jiff::Timestamp) -> Duration {
        let mut seen = self.seen.lock().expect("not poisoned");
        let now = std::time::Instant::now();
        let entry = seen.entry(name.to_owned()).or_insert((heartbeat, now));
        if entry.0 != heartbeat {
            *entry = (heartbeat, now);
        }
        entry.1.elapsed()
    }

    fn forget_gone(&self, nodes: &[Arc<Node>]) {
        let names: std::collections::HashSet<&str> = nodes
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        self.seen
            .lock()
            .expect("not poisoned")
            .retain(|name, _| names.contains(name.as_str()));
        self.marked
            .lock()
            .expect("not poisoned")
            .retain(|name| names.contains(name.as_str()));
    }

    async fn check(&self, node: &Node) -> Result<(), ApiError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let healthy = self.silent_for(&name, self.last_heartbeat(node)) <= self.grace;
        if healthy {
            self.marked.lock().expect("not poisoned").remove(&name);
        }
        let ready = ready_condition(node).map(|c| c.status.as_str());
        if !healthy {
            if ready != Some("Unknown") {
                let now = Time(jiff::Timestamp::now());
                self.client
                    .update::<Node>(None, &name, true, |n| {
                        let conditions = n
                            .status
                            .get_or_insert_with(Default::default)
                            .conditions
                            .get_or_insert_with(Vec::new);
                        conditions.retain(|c| c.type_ != "Ready");
                        conditions.push(NodeCondition {
                            type_: "Ready".into(),
                            status: "Unknown".into(),
                            reason: Some("NodeStatusUnknown".into()),
                            message: Some("Kubelet stopped posting node status.".into()),
                            last_transition_time: Some(now.clone()),
                            last_heartbeat_time: ready_condition(node)
                                .and_then(|c| c.last_heartbeat_time.clone()),
                        });
                        true
                    })
                    .await?;
                self.recorder.record(
                    node,
                    Kind::Normal,
                    "NodeNotReady",
                    format!("Node {name} status is now: NodeNotReady"),
                );
            }
            if !has_unreachable_taint(node) {
                let now = Time(jiff::Timestamp::now());
                self.client
                    .update::<Node>(None, &name, false, |n| {
                        if has_unreachable_taint(n) {
                            return false;
                        }
                        n.spec
                            .get_or_insert_with(Default::default)
                            .taints
                            .get_or_insert_with(Vec::new)
                            .extend(unreachable_taints(&now));
                        true
                    })
                    .await?;
            }
            crate::podgc::evict(
                &self.client,
                &self.pods,
                node,
                self.default_toleration,
                &self.recorder,
            )
            .await?;
            // Its pods are no longer known to be ready: their endpoints must not be.
            if self.marked.lock().expect("not poisoned").contains(&name) {
                return Ok(());
            }
            for pod in self.pods.list() {
                if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                    && pod_ready(&pod)
                {
                    let result = self
                        .client
                        .update::<Pod>(
                            pod.metadata.namespace.as_deref(),
                            pod.metadata.name.as_deref().unwrap_or_default(),
                            true,
                            |p| {
                                set_condition(
                                    p,
                                    PodCondition {
                                        type_: "Ready".into(),
                                        status: "False".into(),
                                        reason: Some("NodeNotReady".into()),
                                        message: Some(format!("node {name} stopped heartbeating")),
                                        ..Default::default()
                                    },
                                )
                            },
                        )
                        .await;
                    if let Err(e) = result
                        && e.reason != "NotFound"
                    {
                        return Err(e);
                    }
                }
            }
            self.marked.lock().expect("not poisoned").insert(name);
        } else if ready == Some("True") && has_unreachable_taint(node) {
            self.client
                .update::<Node>(None, &name, false, |n| {
                    let Some(taints) = n.spec.as_mut().and_then(|s| s.taints.as_mut()) else {
                        return false;
                    };
                    let before = taints.len();
                    taints.retain(|t| t.key != UNREACHABLE_TAINT);
                    taints.len() != before
                })
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidrs_are_blocks_of_the_cluster_cidr() {
        let c = PodCidrs::new("10.244.0.0/16", 24).unwrap();
        assert_eq!(c.count(), 256);
        assert_eq!(c.block(0), "10.244.0.0/24");
        assert_eq!(c.block(3), "10.244.3.0/24");
        assert_eq!(c.index("10.244.3.0/24"), Some(3));
        assert_eq!(c.index("10.245.0.0/24"), None);
        assert_eq!(c.index("10.244.3.0/25"), None);
        let used: BTreeSet<u32> = [0, 1, 3].into_iter().collect();
        assert_eq!(c.first_free(&used).as_deref(), Some("10.244.2.0/24"));
        let tiny = PodCidrs::new("10.0.0.0/30", 30).unwrap();
        assert_eq!(tiny.first_free(&[0].into_iter().collect()), None);
        assert!(PodCidrs::new("10.0.0.0/24", 16).is_err());
    }
}
