//! What kube-controller-manager does about pods whose node cannot run them any more:
//!
//! - **taint-based eviction** (its NoExecute taint manager): a pod on a node tainted
//!   `node.kubernetes.io/unreachable:NoExecute` (the node lifecycle does that to a silent
//!   node) is deleted once it has tolerated the taint for its `tolerationSeconds`: those of its
//!   matching NoExecute tolerations (none: forever), or, without any, the default that
//!   kube-apiserver's DefaultTolerationSeconds admission would have given it (300 s,
//!   `--default-unreachable-toleration-seconds`). Its kubelet is gone, so it stays
//!   Terminating, but its ReplicaSet no longer counts it and replaces it.
//! - **pod GC**: a pod bound to a node that no longer exists (for a quarantine of one node
//!   grace period, so a node being re-registered is not a reason) is deleted at once, grace
//!   period 0: nothing will ever stop its containers or confirm it, and a deletion waiting
//!   for that would hold its namespace's deletion forever.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use control_plane_apiserver::{error::ApiError, registry::DeleteParams};
use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};

use crate::{
    client::Client,
    events::{Kind, Recorder},
    informer::Informer,
};

/// How long a pod may stay on a node with `taint` (NoExecute): `None` is forever.
/// `default` applies when no toleration matches (the admission default).
pub fn toleration_seconds(pod: &Pod, taint: &Taint, default: Duration) -> Option<Duration> {
    let matching: Vec<&Toleration> = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| tolerates(t, taint))
        .collect();
    if matching.is_empty() {
        return Some(default);
    }
    matching
        .iter()
        .map(|t| t.toleration_seconds)
        .try_fold(u64::MAX, |min, s| Some(min.min(s?.max(0) as u64)))
        .map(Duration::from_secs)
}

/// Whether toleration `t` tolerates `taint` (kube's ToleratesTaint).
fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    let effect = t.effect.as_deref().unwrap_or("");
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = t.key.as_deref().unwrap_or("");
    let operator = t.operator.as_deref().unwrap_or("Equal");
    if key.is_empty() {
        return operator == "Exists";
    }
    if key != taint.key {
        return false;
    }
    match operator {
        "Exists" => true,
        _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
    }
}

/// Deletes, gracefully, the pods of `node` whose tolerance of its NoExecute taints has run
/// out; returns how many.
pub async fn evict(
    client: &Client,
    pods: &Informer<Pod>,
    node: &Node,
    default: Duration,
    recorder: &Recorder,
) -> Result<usize, ApiError> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let taints: Vec<&Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoExecute")
        .collect();
    if taints.is_empty() {
        return Ok(0);
    }
    let now = jiff::Timestamp::now();
    let mut evicted = 0;
    for pod in pods.list() {
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(name)
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let due = taints.iter().any(|taint| {
            let since = taint.time_added.as_ref().map_or(now, |t| t.0);
            let tainted_for = Duration::try_from(now - since).unwrap_or_default();
            toleration_seconds(&pod, taint, default).is_some_and(|s| tainted_for >= s)
        });
        if !due {
            continue;
        }
        client
            .delete::<Pod>(
                pod.metadata.namespace.as_deref(),
                pod.metadata.name.as_deref().unwrap_or_default(),
                &DeleteParams::default(),
            )
            .await?;
        recorder.record(
            &*pod,
            Kind::Normal,
            "TaintManagerEviction",
            format!(
                "Marking for deletion Pod {}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            ),
        );
        evicted += 1;
    }
    Ok(evicted)
}

/// Deletes pods bound to nodes that are gone (after `quarantine`), with grace period 0.
pub fn start_pod_gc(client: Client, quarantine: Duration) {
    let pods = client.informers.get::<Pod>();
    let nodes = client.informers.get::<Node>();
    let period = (quarantine / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
    let missing: Mutex<HashMap<String, Instant>> = Mutex::default();
    tokio::spawn(async move {
        client.informers.synced().await;
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if let Err(e) = collect(&client, &pods, &nodes, quarantine, &missing).await {
                tracing::info!(error = %e, "pod GC failed");
            }
        }
    });
}

async fn collect(
    client: &Client,
    pods: &Arc<Informer<Pod>>,
    nodes: &Arc<Informer<Node>>,
    quarantine: Duration,
    missing: &Mutex<HashMap<String, Instant>>,
) -> Result<(), ApiError> {
    let mut orphans = Vec::new();
    {
        let mut missing = missing.lock().expect("not poisoned");
        let mut still = HashMap::new();
        for pod in pods.list() {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
                continue;
            };
            if node.is_empty() || nodes.get(node).is_some() {
                continue;
            }
            let key = format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            );
            let since = missing.get(&key).copied().unwrap_or_else(Instant::now);
            if since.elapsed() >= quarantine {
                orphans.push(pod);
            }
            still.insert(key, since);
        }
        *missing = still;
    }
    for pod in orphans {
        let force = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        client
            .delete::<Pod>(
                pod.metadata.namespace.as_deref(),
                pod.metadata.name.as_deref().unwrap_or_default(),
                &force,
            )
            .await?;
        tracing::info!(
            pod = pod.metadata.name.as_deref().unwrap_or_default(),
            node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            "deleted a pod bound to a node that no longer exists"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(tolerations: Vec<Toleration>) -> Pod {
        Pod {
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                tolerations: Some(tolerations),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn tolerations_decide_how_long_a_pod_stays() {
        let taint = Taint {
            key: "node.kubernetes.io/unreachable".into(),
            effect: "NoExecute".into(),
            ..Default::default()
        };
        let default = Duration::from_secs(300);
        let exists = |seconds: Option<i64>| Toleration {
            key: Some("node.kubernetes.io/unreachable".into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: seconds,
            ..Default::default()
        };
        assert_eq!(
            toleration_seconds(&pod(vec![]), &taint, default),
            Some(default)
        );
        assert_eq!(
            toleration_seconds(&pod(vec![exists(Some(5))]), &taint, default),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            toleration_seconds(&pod(vec![exists(None)]), &taint, default),
            None,
            "tolerated forever"
        );
        let everything = Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        };
        assert_eq!(
            toleration_seconds(&pod(vec![everything]), &taint, default),
            None
        );
        let other = Toleration {
            key: Some("node.kubernetes.io/not-ready".into()),
            operator: Some("Exists".into()),
            toleration_seconds: Some(1),
            ..Default::default()
        };
        assert_eq!(
            toleration_seconds(&pod(vec![other]), &taint, default),
            Some(default)
        );
    }
}
