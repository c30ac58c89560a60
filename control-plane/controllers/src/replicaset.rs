//! The ReplicaSet controller: keeps `spec.replicas` active pods from the template, owned by the
//! ReplicaSet, creating the missing ones and deleting extras (the least useful first: not
//! scheduled, then not running, then not ready, then the youngest), and reports replicas,
//! ready and available counts in the status.
//!
//! Its pods are those it controls whose labels its selector still matches, as kube's
//! ControllerRefManager claims them: a pod without a controller that the selector matches is
//! adopted (the ReplicaSet becomes its controller, unless either is being deleted), and a pod
//! whose labels stop matching is released (its owner reference removed): it lives on, no
//! longer counted, and a replacement is made.

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
    util::{available, controller_of, pod_active, pod_ready, selects},
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
        let (q, s) = (queue.clone(), sets.clone());
        pods.on_change(move |c| {
            for pod in [&c.old, &c.new].into_iter().flatten() {
                let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
                match controller_of(&pod.metadata) {
                    Some(owner) if owner.kind == "ReplicaSet" => {
                        q.add(format!("{ns}/{}", owner.name));
                    }
                    Some(_) => {}
                    // An orphan: the sets that may adopt it.
                    None if c.new.is_some() && !pod_gone(pod) => {
                        for rs in s.list_namespace(ns) {
                            if may_own(&rs, pod) {
                                q.add(key_of(&rs.metadata));
                            }
                        }
                    }
                    None => {}
                }
            }
        });
        let controller = Arc::new(Self { client, sets, pods });
        let informers = controller.client.informers.clone();
        run_workers("replicaset", queue, workers, informers, move |key| {
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
        let owned = self.claim(&rs).await?;
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

    /// The pods the set controls and still selects, after adopting matching orphans and
    /// releasing controlled pods it no longer selects.
    async fn claim(&self, rs: &ReplicaSet) -> Result<Vec<Arc<Pod>>, ApiError> {
        let ns = rs.metadata.namespace.clone().unwrap_or_default();
        let uid = rs.metadata.uid.as_ref();
        let mut owned = Vec::new();
        let mut checked = false;
        for pod in self.pods.list_namespace(&ns) {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let matches = selects(&rs.spec.selector, pod.metadata.labels.as_ref());
            match controller_of(&pod.metadata) {
                Some(owner) if Some(&owner.uid) == uid => {
                    if matches || rs.metadata.deletion_timestamp.is_some() {
                        owned.push(pod);
                        continue;
                    }
                    let released = self
                        .client
                        .update::<Pod>(Some(&ns), &name, false, |p| {
                            if selects(&rs.spec.selector, p.metadata.labels.as_ref()) {
                                return false;
                            }
                            let refs = p.metadata.owner_references.get_or_insert_default();
                            let before = refs.len();
                            refs.retain(|r| Some(&r.uid) != uid);
                            refs.len() != before
                        })
                        .await;
                    match released {
                        Ok(p) if controller_of(&p.metadata).is_some() => owned.push(pod),
                        Ok(_) => {}
                        Err(e) if e.reason == "NotFound" => {}
                        Err(e) => return Err(e),
                    }
                }
                None if may_own(rs, &pod) && !pod_gone(&pod) => {
                    // As kube, adopt only after a fresh read says the set is still there and
                    // not being deleted: the cache may be behind its deletion.
                    if !checked {
                        let fresh: ReplicaSet = self
                            .client
                            .get(Some(&ns), rs.metadata.name.as_deref().unwrap_or_default())
                            .await?;
                        if fresh.metadata.uid.as_ref() != uid
                            || fresh.metadata.deletion_timestamp.is_some()
                        {
                            return Ok(owned);
                        }
                        checked = true;
                    }
                    let controller = crate::util::controller_ref(rs);
                    let adopted = self
                        .client
                        .update::<Pod>(Some(&ns), &name, false, |p| {
                            if controller_of(&p.metadata).is_some()
                                || !may_own(rs, p)
                                || pod_gone(p)
                            {
                                return false;
                            }
                            p.metadata
                                .owner_references
                                .get_or_insert_default()
                                .push(controller.clone());
                            true
                        })
                        .await;
                    match adopted {
                        Ok(p) if controller_of(&p.metadata).map(|o| &o.uid) == uid => {
                            owned.push(Arc::new(p))
                        }
                        Ok(_) => {}
                        Err(e) if e.reason == "NotFound" => {}
                        Err(e) => return Err(e),
                    }
                }
                _ => {}
            }
        }
        Ok(owned)
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

/// Whether `rs` may adopt `pod`: a live set whose (non-empty) selector matches it.
fn may_own(rs: &ReplicaSet, pod: &Pod) -> bool {
    let selector = &rs.spec.selector;
    let empty = selector.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(|e| e.is_empty());
    rs.metadata.deletion_timestamp.is_none()
        && !empty
        && selects(selector, pod.metadata.labels.as_ref())
}

/// Being deleted or finished: nothing adopts it.
fn pod_gone(pod: &Pod) -> bool {
    !pod_active(pod)
}
