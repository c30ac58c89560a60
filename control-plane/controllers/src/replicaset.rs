//! The ReplicaSet controller: keeps `spec.replicas` active pods from the template, owned by the
//! ReplicaSet, creating the missing ones and deleting extras (the least useful first: not
//! scheduled, then not running, then not ready, then the youngest), and reports replicas,
//! ready and available counts in the status.

use std::{cmp::Reverse, sync::Arc, time::Duration};

use control_plane_apiserver::{error::ApiError, registry::DeleteParams};
use k8s_openapi::{
    api::{
        apps::v1::{ReplicaSet, ReplicaSetStatus},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    client::Client,
    informer::{Informer, key_of},
    queue::{Next, Queue, run_workers},
    util::{available, controlled_by, controller_of, pod_active, pod_ready},
};

/// Pods created per reconcile at most (the rest on the next round), as kube's burst.
const CREATE_BURST: usize = 500;

pub struct ReplicaSetController {
    client: Client,
    sets: Arc<Informer<ReplicaSet>>,
    pods: Arc<Informer<Pod>>,
}

impl ReplicaSetController {
    pub fn start(client: Client, workers: usize) {
        let sets = client.informers.get::<ReplicaSet>();
        let pods = client.informers.get::<Pod>();
        let queue: Arc<Queue<String>> = Queue::new();
        let q = queue.clone();
        sets.on_change(move |c| q.add(key_of(&c.object().metadata)));
        let q = queue.clone();
        pods.on_change(move |c| {
            for pod in [&c.old, &c.new].into_iter().flatten() {
                if let Some(owner) = controller_of(&pod.metadata)
                    && owner.kind == "ReplicaSet"
                {
                    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
                    q.add(format!("{ns}/{}", owner.name));
                }
            }
        });
        let controller = Arc::new(Self { client, sets, pods });
        run_workers("replicaset", queue, workers, move |key| {
            let c = controller.clone();
            async move { c.reconcile(&key).await }
        });
    }

    async fn reconcile(&self, key: &str) -> Result<Next, ApiError> {
        let Some(rs) = self.sets.get(key) else {
            return Ok(Next::Done);
        };
        let ns = rs.metadata.namespace.clone().unwrap_or_default();
        let spec = rs.spec.clone();
        let owned: Vec<Arc<Pod>> = self
            .pods
            .list_namespace(&ns)
            .into_iter()
            .filter(|p| controlled_by(&p.metadata, &*rs))
            .collect();
        let mut active: Vec<Arc<Pod>> = owned.iter().filter(|p| pod_active(p)).cloned().collect();
        let wanted = spec.replicas.unwrap_or(1).max(0) as usize;
        if rs.metadata.deletion_timestamp.is_none() {
            if active.len() < wanted {
                let missing = (wanted - active.len()).min(CREATE_BURST);
                let template = spec.template.clone().unwrap_or_default();
                let template_meta = template.metadata.unwrap_or_default();
                let pod = Pod {
                    metadata: ObjectMeta {
                        generate_name: Some(format!(
                            "{}-",
                            rs.metadata.name.as_deref().unwrap_or_default()
                        )),
                        namespace: Some(ns.clone()),
                        labels: template_meta.labels,
                        annotations: template_meta.annotations,
                        owner_references: Some(vec![crate::util::controller_ref(&*rs)]),
                        ..Default::default()
                    },
                    spec: template.spec,
                    status: None,
                };
                let creates = (0..missing).map(|_| self.client.create(&pod));
                let results = futures::future::join_all(creates).await;
                if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                    return Err(e);
                }
            } else if active.len() > wanted {
                // The least useful go first.
                active.sort_by_key(|p| {
                    let status = p.status.as_ref();
                    let phase = match status.and_then(|s| s.phase.as_deref()) {
                        Some("Pending") | None => 0,
                        Some("Unknown") => 1,
                        _ => 2,
                    };
                    (
                        p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(),
                        phase,
                        pod_ready(p),
                        Reverse(p.metadata.creation_timestamp.as_ref().map(|t| t.0)),
                    )
                });
                let extra = active.len() - wanted;
                let params = DeleteParams::default();
                let deletes = active[..extra].iter().map(|p| {
                    self.client.delete::<Pod>(
                        Some(&ns),
                        p.metadata.name.as_deref().unwrap_or_default(),
                        &params,
                    )
                });
                for result in futures::future::join_all(deletes).await {
                    result?;
                }
            }
        }
        self.update_status(&rs, &spec, &owned).await
    }

    async fn update_status(
        &self,
        rs: &ReplicaSet,
        spec: &k8s_openapi::api::apps::v1::ReplicaSetSpec,
        owned: &[Arc<Pod>],
    ) -> Result<Next, ApiError> {
        let now = jiff::Timestamp::now();
        let min_ready = spec.min_ready_seconds.unwrap_or(0);
        let active: Vec<&Arc<Pod>> = owned.iter().filter(|p| pod_active(p)).collect();
        let template_labels = spec
            .template
            .as_ref()
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let mut next = Next::Done;
        let mut available_count = 0;
        for p in &active {
            match available(p, min_ready, now) {
                Ok(()) => available_count += 1,
                Err(Some(left)) => {
                    let left =
                        Duration::try_from(left).unwrap_or_default() + Duration::from_millis(10);
                    next = match next {
                        Next::After(d) if d < left => Next::After(d),
                        _ => Next::After(left),
                    };
                }
                Err(None) => {}
            }
        }
        let status = ReplicaSetStatus {
            replicas: active.len() as i32,
            fully_labeled_replicas: Some(
                active
                    .iter()
                    .filter(|p| {
                        template_labels.iter().all(|(k, v)| {
                            p.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v)
                        })
                    })
                    .count() as i32,
            ),
            ready_replicas: Some(active.iter().filter(|p| pod_ready(p)).count() as i32),
            available_replicas: Some(available_count),
            observed_generation: rs.metadata.generation,
            conditions: rs.status.as_ref().and_then(|s| s.conditions.clone()),
            terminating_replicas: Some(
                owned
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_some())
                    .count() as i32,
            ),
        };
        if rs.status.as_ref() != Some(&status) {
            let name = rs.metadata.name.as_deref().unwrap_or_default();
            self.client
                .update::<ReplicaSet>(rs.metadata.namespace.as_deref(), name, true, |r| {
                    if r.status.as_ref() == Some(&status) {
                        return false;
                    }
                    r.status = Some(status.clone());
                    true
                })
                .await?;
        }
        Ok(next)
    }
}
