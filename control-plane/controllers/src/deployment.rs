//! The Deployment controller: one ReplicaSet per pod template (named by the template's hash,
//! labelled `pod-template-hash`), revisions in the `deployment.kubernetes.io/revision`
//! annotation, and the rollout from the old sets to the new one:
//!
//! - RollingUpdate, with kube's arithmetic: `maxSurge` rounds up and `maxUnavailable` rounds
//!   down (both 0 means 1 unavailable); the new set grows while the total of all sets' replicas
//!   stays within `replicas + maxSurge`; old sets shrink, unhealthy replicas first, while the
//!   available pods stay at least `replicas - maxUnavailable`;
//! - Recreate: old sets to zero, wait until none of their pods runs (terminating ones
//!   included: they may still serve the old version), then the new set up.
//!
//! A change of `replicas` in the middle of a rollout, or while the deployment is paused, scales
//! the active sets proportionally (kube's `sync`: the sets keep their shares of
//! `replicas + maxSurge`, leftovers to the largest); a paused deployment never starts a
//! rollout and its `Progressing` condition says `DeploymentPaused` (no progress deadline runs).
//!
//! Old sets beyond `revisionHistoryLimit` (10) are deleted once empty. The status (replicas,
//! updated, ready, available, unavailable, Available and Progressing conditions) is what
//! `kubectl rollout status` reads.

use std::{cmp::Reverse, collections::BTreeMap, sync::Arc, time::Duration};

use control_plane_apiserver::{error::ApiError, registry::DeleteParams};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec},
        core::v1::Pod,
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
};

use crate::{
    client::Client,
    informer::{Informer, key_of},
    queue::{Next, Queue, run_workers},
    util::{controlled_by, controller_of, controller_ref, pod_finished},
};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const TEMPLATE_HASH: &str = "pod-template-hash";

/// Resolves an int-or-percent against `total`, rounding up or down.
pub fn scaled_value(
    v: Option<&IntOrString>,
    default_percent: i32,
    total: i32,
    round_up: bool,
) -> i32 {
    let percent = match v {
        Some(IntOrString::Int(n)) => return *n,
        Some(IntOrString::String(s)) => s
            .trim_end_matches('%')
            .parse::<i32>()
            .unwrap_or(default_percent),
        None => default_percent,
    };
    let product = i64::from(percent) * i64::from(total);
    let value = if round_up {
        (product + 99).div_euclid(100)
    } else {
        product.div_euclid(100)
    };
    value as i32
}

/// (maxSurge, maxUnavailable) for `replicas`, as kube's ResolveFenceposts.
pub fn fenceposts(d: &Deployment) -> (i32, i32) {
    let replicas = d.spec.replicas.unwrap_or(1);
    let rolling = d
        .spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let surge = scaled_value(
        rolling.and_then(|r| r.max_surge.as_ref()),
        25,
        replicas,
        true,
    );
    let unavailable = scaled_value(
        rolling.and_then(|r| r.max_unavailable.as_ref()),
        25,
        replicas,
        false,
    );
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable.min(replicas))
    }
}

/// What a set holds, as the rollout arithmetic counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetCounts {
    pub spec: i32,
    /// Available replicas, never more than `spec` (a set just scaled down may report old ones).
    pub available: i32,
}

/// The new set's replicas for a rolling update (kube's NewRSNewReplicas).
pub fn new_set_replicas(replicas: i32, surge: i32, all_pods: i32, new_spec: i32) -> i32 {
    let max_total = replicas + surge;
    if all_pods >= max_total {
        return new_spec;
    }
    let up = (max_total - all_pods).min(replicas - new_spec);
    (new_spec + up.max(0)).max(0)
}

/// How far to scale each old set down (oldest first) for a rolling update: first replicas
/// that are not available (they cost no availability), then available ones while at least
/// `replicas - maxUnavailable` stay available. Returns the new spec of each old set.
pub fn scale_down_old(
    replicas: i32,
    unavailable: i32,
    new: SetCounts,
    old: &[SetCounts],
) -> Vec<i32> {
    let mut specs: Vec<i32> = old.iter().map(|o| o.spec).collect();
    if specs.iter().sum::<i32>() == 0 {
        return specs;
    }
    let all_spec: i32 = new.spec + specs.iter().sum::<i32>();
    let min_available = replicas - unavailable;
    let new_unavailable = new.spec - new.available;
    let max_scaled_down = all_spec - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return specs;
    }
    let mut done = 0;
    for (i, o) in old.iter().enumerate() {
        if done >= max_scaled_down {
            break;
        }
        let unhealthy = specs[i] - o.available;
        if unhealthy <= 0 {
            continue;
        }
        let down = unhealthy.min(max_scaled_down - done);
        specs[i] -= down;
        done += down;
    }
    let available: i32 = new.available
        + old
            .iter()
            .zip(&specs)
            .map(|(o, s)| o.available.min(*s))
            .sum::<i32>();
    if available <= min_available {
        return specs;
    }
    let mut total = (available - min_available).min(max_scaled_down - done);
    for s in specs.iter_mut() {
        if total <= 0 {
            break;
        }
        let down = (*s).min(total);
        *s -= down;
        total -= down;
    }
    specs
}

/// The pod template's hash (FNV-1a over its JSON and the collision count), in kube's alphabet
/// of characters that never spell words.
pub fn template_hash(
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    collisions: i32,
) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    let bytes = serde_json::to_vec(template).expect("serializes");
    for b in bytes.iter().chain(&collisions.to_le_bytes()) {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    hash.to_string()
        .bytes()
        .map(|d| ALPHABET[usize::from(d - b'0') % ALPHABET.len()] as char)
        .collect()
}

fn recreates(d: &Deployment) -> bool {
    d.spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate")
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(0)
}

/// The pods a set may have right now: its spec, or more while its controller has not yet
/// deleted the pods of a scale-down (`status.replicas` counts its active pods). The surge is
/// bounded by these, not by specs alone as kube's NewRSNewReplicas does: otherwise the new set
/// grows in the window between an old set's scale-down and its pods' deletion, and the
/// deployment briefly runs more than `replicas + maxSurge` pods.
fn pods_of(rs: &ReplicaSet) -> i32 {
    let active = rs.status.as_ref().map_or(0, |s| s.replicas);
    spec_replicas(rs).max(active)
}

fn counts(rs: &ReplicaSet) -> SetCounts {
    let spec = spec_replicas(rs);
    SetCounts {
        spec,
        available: rs
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0)
            .min(spec),
    }
}

fn template_hash_label(rs: &ReplicaSet) -> Option<&String> {
    rs.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(TEMPLATE_HASH))
}

/// The active set when only one is (or, none being active, the new set or else the newest
/// old one): kube's FindActiveOrLatest. `None` when several are active.
fn active_or_latest<'a>(
    new: Option<&'a Arc<ReplicaSet>>,
    old: &'a [Arc<ReplicaSet>],
) -> Option<&'a Arc<ReplicaSet>> {
    let mut active = old
        .iter()
        .chain(new)
        .filter(|rs| spec_replicas(rs) > 0)
        .collect::<Vec<_>>();
    match active.len() {
        0 => new.or(old.last()),
        1 => active.pop(),
        _ => None,
    }
}

/// The `max-replicas` annotation a set was last scaled with.
fn annotated_max_replicas(rs: &ReplicaSet) -> Option<i32> {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MAX_REPLICAS))
        .and_then(|v| v.parse().ok())
}

/// The new spec of each active set when the deployment's size changes in the middle of a
/// rollout (kube's proportional scaling): each set's share of `allowed` is its share of the
/// size it was last scaled for; what rounding leaves over goes to (or comes from) the first
/// set, the largest. `sets` are (spec, max-replicas annotation), ordered largest first
/// (newest first among equals) when growing, largest first (oldest first) when shrinking.
pub fn proportional_specs(
    sets: &[(i32, Option<i32>)],
    replicas: i32,
    allowed: i32,
    status_replicas: i32,
) -> Vec<i32> {
    let total: i32 = sets.iter().map(|(spec, _)| spec).sum();
    let to_add = allowed - total;
    let mut added = 0;
    let mut specs: Vec<i32> = sets
        .iter()
        .map(|&(spec, annotated)| {
            if to_add == 0 || spec == 0 || added == to_add {
                return spec;
            }
            let fraction = if replicas == 0 {
                -spec
            } else {
                let base = annotated.unwrap_or(status_replicas).max(1);
                let size = f64::from(spec) * f64::from(allowed) / f64::from(base);
                size.round() as i32 - spec
            };
            let left = to_add - added;
            let share = if to_add > 0 {
                fraction.min(left)
            } else {
                fraction.max(left)
            };
            added += share;
            spec + share
        })
        .collect();
    if let Some(first) = specs.first_mut()
        && to_add != 0
    {
        *first = (*first + to_add - added).max(0);
    }
    specs
}

pub struct DeploymentController {
    client: Client,
    deployments: Arc<Informer<Deployment>>,
    sets: Arc<Informer<ReplicaSet>>,
    pods: Arc<Informer<Pod>>,
}

impl DeploymentController {
    pub fn start(client: Client, workers: usize) {
        let deployments = client.informers.get::<Deployment>();
        let sets = client.informers.get::<ReplicaSet>();
        let queue: Arc<Queue<String>> = Queue::new();
        let q = queue.clone();
        deployments.on_change(move |c| q.add(key_of(&c.object().metadata)));
        let q = queue.clone();
        sets.on_change(move |c| {
            let rs = c.object();
            if let Some(owner) = controller_of(&rs.metadata)
                && owner.kind == "Deployment"
            {
                let ns = rs.metadata.namespace.as_deref().unwrap_or_default();
                q.add(format!("{ns}/{}", owner.name));
            }
        });
        // A Recreate rollout waits for the old pods to be gone: their deletion (or end) is
        // what lets it go on.
        let pods = client.informers.get::<Pod>();
        let (q, s, d) = (queue.clone(), sets.clone(), deployments.clone());
        pods.on_change(move |c| {
            if c.new.as_ref().is_some_and(|p| !pod_finished(p)) {
                return;
            }
            let pod = c.object();
            let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
            let Some(rs) = controller_of(&pod.metadata)
                .filter(|o| o.kind == "ReplicaSet")
                .and_then(|o| s.get(&format!("{ns}/{}", o.name)))
            else {
                return;
            };
            if let Some(owner) = controller_of(&rs.metadata)
                && owner.kind == "Deployment"
            {
                let key = format!("{ns}/{}", owner.name);
                if d.get(&key).is_some_and(|d| recreates(&d)) {
                    q.add(key);
                }
            }
        });
        let controller = Arc::new(Self {
            client,
            deployments,
            sets,
            pods,
        });
        let informers = controller.client.informers.clone();
        run_workers("deployment", queue, workers, informers, move |key| {
            let c = controller.clone();
            async move { c.reconcile(&key).await }
        });
    }

    async fn scale(
        &self,
        rs: &ReplicaSet,
        replicas: i32,
        d: &Deployment,
    ) -> Result<ReplicaSet, ApiError> {
        let (surge, _) = fenceposts(d);
        let desired = d.spec.replicas.unwrap_or(1);
        self.client
            .update::<ReplicaSet>(
                rs.metadata.namespace.as_deref(),
                rs.metadata.name.as_deref().unwrap_or_default(),
                false,
                |r| {
                    let annotations = r.metadata.annotations.get_or_insert_with(BTreeMap::new);
                    let before = (r.spec.replicas, annotations.clone());
                    annotations.insert(DESIRED_REPLICAS.into(), desired.to_string());
                    annotations.insert(MAX_REPLICAS.into(), (desired + surge).to_string());
                    r.spec.replicas = Some(replicas);
                    (
                        r.spec.replicas,
                        r.metadata.annotations.clone().unwrap_or_default(),
                    ) != before
                },
            )
            .await
    }

    /// Whether a pod of one of the `old` sets still runs (or may: phase unknown), terminating
    /// or not, or their controller has not yet counted them all out (kube's oldPodsRunning).
    fn old_pods_running(&self, ns: &str, old: &[Arc<ReplicaSet>]) -> bool {
        if old
            .iter()
            .any(|rs| rs.status.as_ref().is_some_and(|s| s.replicas > 0))
        {
            return true;
        }
        self.pods
            .list_namespace(ns)
            .iter()
            .any(|p| !pod_finished(p) && old.iter().any(|rs| controlled_by(&p.metadata, &**rs)))
    }

    /// Whether the deployment's size changed since its active sets were last scaled (kube's
    /// isScalingEvent): they are scaled proportionally, not rolled.
    fn scaling_event(d: &Deployment, sets: &[Arc<ReplicaSet>]) -> bool {
        let replicas = d.spec.replicas.unwrap_or(1).to_string();
        sets.iter().filter(|rs| spec_replicas(rs) > 0).any(|rs| {
            rs.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DESIRED_REPLICAS))
                .is_some_and(|v| *v != replicas)
        })
    }

    /// Kube's `sync` for a paused deployment or a scaling event: no new set is created; one
    /// active set (or the latest) takes the new size; with the new set saturated the old ones
    /// go; otherwise (rolling update) the active sets share the new size proportionally.
    async fn scale_sets(
        &self,
        d: &Deployment,
        new: Option<&Arc<ReplicaSet>>,
        old: &[Arc<ReplicaSet>],
    ) -> Result<(), ApiError> {
        let replicas = d.spec.replicas.unwrap_or(1);
        if let Some(rs) = active_or_latest(new, old) {
            // Written even at the right size when its annotations are stale (scale writes
            // only what differs), or the scaling event would never end.
            self.scale(rs, replicas, d).await?;
            return Ok(());
        }
        let saturated = new.is_some_and(|n| {
            spec_replicas(n) == replicas
                && n.status
                    .as_ref()
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0)
                    >= replicas
        });
        if saturated {
            for rs in old.iter().filter(|rs| spec_replicas(rs) > 0) {
                self.scale(rs, 0, d).await?;
            }
            return Ok(());
        }
        if recreates(d) {
            return Ok(()); // the rollout itself scales a Recreate deployment's sets
        }
        let (surge, _) = fenceposts(d);
        let allowed = if replicas > 0 { replicas + surge } else { 0 };
        let mut active: Vec<&Arc<ReplicaSet>> = old
            .iter()
            .chain(new)
            .filter(|rs| spec_replicas(rs) > 0)
            .collect();
        let total: i32 = active.iter().map(|rs| spec_replicas(rs)).sum();
        let created = |rs: &ReplicaSet| rs.metadata.creation_timestamp.as_ref().map(|t| t.0);
        if allowed > total {
            active.sort_by_key(|rs| (Reverse(spec_replicas(rs)), Reverse(created(rs))));
        } else {
            active.sort_by_key(|rs| (Reverse(spec_replicas(rs)), created(rs)));
        }
        let shares: Vec<(i32, Option<i32>)> = active
            .iter()
            .map(|rs| (spec_replicas(rs), annotated_max_replicas(rs)))
            .collect();
        let status_replicas = d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let specs = proportional_specs(&shares, replicas, allowed, status_replicas);
        for (rs, spec) in active.into_iter().zip(specs) {
            // Every active set is written: its annotations record the size it now serves.
            self.scale(rs, spec, d).await?;
        }
        Ok(())
    }

    /// The set of the current template, if it exists.
    fn current_set<'a>(d: &Deployment, sets: &'a [Arc<ReplicaSet>]) -> Option<&'a Arc<ReplicaSet>> {
        let collisions = d
            .status
            .as_ref()
            .and_then(|s| s.collision_count)
            .unwrap_or(0);
        let hash = template_hash(&d.spec.template, collisions);
        sets.iter()
            .find(|rs| template_hash_label(rs) == Some(&hash))
    }

    /// The set for the current template: found by hash, created if missing (at `initial`
    /// replicas), its revision raised above every old one.
    async fn new_set(
        &self,
        d: &Deployment,
        sets: &[Arc<ReplicaSet>],
        initial: impl Fn(&[Arc<ReplicaSet>]) -> i32,
    ) -> Result<Option<ReplicaSet>, ApiError> {
        let spec = d.spec.clone();
        let collisions = d
            .status
            .as_ref()
            .and_then(|s| s.collision_count)
            .unwrap_or(0);
        let hash = template_hash(&spec.template, collisions);
        let max_old = sets
            .iter()
            .filter(|rs| template_hash_label(rs) != Some(&hash))
            .map(|rs| revision(rs))
            .max()
            .unwrap_or(0);
        let wanted_revision = (max_old + 1).to_string();
        if let Some(rs) = Self::current_set(d, sets) {
            if revision(rs) > max_old {
                return Ok(Some((**rs).clone()));
            }
            // Rolled back to this template: it becomes the newest revision.
            let updated = self
                .client
                .update::<ReplicaSet>(
                    rs.metadata.namespace.as_deref(),
                    rs.metadata.name.as_deref().unwrap_or_default(),
                    false,
                    |r| {
                        r.metadata
                            .annotations
                            .get_or_insert_with(BTreeMap::new)
                            .insert(REVISION.into(), wanted_revision.clone());
                        true
                    },
                )
                .await?;
            return Ok(Some(updated));
        }
        let name = d.metadata.name.clone().unwrap_or_default();
        let mut template = spec.template.clone();
        let meta = template.metadata.get_or_insert_with(Default::default);
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(TEMPLATE_HASH.into(), hash.clone());
        let mut selector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert(TEMPLATE_HASH.into(), hash.clone());
        let (surge, _) = fenceposts(d);
        let replicas = spec.replicas.unwrap_or(1);
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(format!("{name}-{hash}")),
                namespace: d.metadata.namespace.clone(),
                labels: meta.labels.clone(),
                annotations: Some(
                    [
                        (REVISION.to_owned(), wanted_revision),
                        (DESIRED_REPLICAS.to_owned(), replicas.to_string()),
                        (MAX_REPLICAS.to_owned(), (replicas + surge).to_string()),
                    ]
                    .into_iter()
                    .collect(),
                ),
                owner_references: Some(vec![controller_ref(d)]),
                ..Default::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(initial(sets)),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(template),
            },
            status: None,
        };
        match self.client.create(&rs).await {
            Ok(created) => Ok(Some(created)),
            Err(e) if e.reason == "AlreadyExists" => {
                let ns = d.metadata.namespace.as_deref();
                let existing: ReplicaSet = self
                    .client
                    .get(ns, rs.metadata.name.as_deref().unwrap_or_default())
                    .await?;
                if controlled_by(&existing.metadata, d) {
                    return Ok(Some(existing));
                }
                // Someone else's set holds the name: hash again with one more collision.
                self.client
                    .update::<Deployment>(ns, &name, true, |d| {
                        let status = d.status.get_or_insert_with(Default::default);
                        status.collision_count = Some(collisions + 1);
                        true
                    })
                    .await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn reconcile(&self, key: &str) -> Result<Next, ApiError> {
        let Some(d) = self.deployments.get(key) else {
            return Ok(Next::Done);
        };
        if d.metadata.deletion_timestamp.is_some() {
            return Ok(Next::Done);
        }
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let mut sets: Vec<Arc<ReplicaSet>> = self
            .sets
            .list_namespace(&ns)
            .into_iter()
            .filter(|rs| controlled_by(&rs.metadata, &*d))
            .collect();
        sets.sort_by_key(|rs| {
            (
                rs.metadata.creation_timestamp.as_ref().map(|t| t.0),
                rs.metadata.name.clone(),
            )
        });
        let spec = d.spec.clone();
        let replicas = spec.replicas.unwrap_or(1);
        let paused = spec.paused == Some(true);
        if paused || Self::scaling_event(&d, &sets) {
            let new = Self::current_set(&d, &sets).cloned();
            let new_uid = new.as_ref().and_then(|n| n.metadata.uid.clone());
            let old: Vec<Arc<ReplicaSet>> = sets
                .iter()
                .filter(|rs| rs.metadata.uid != new_uid)
                .cloned()
                .collect();
            self.scale_sets(&d, new.as_ref(), &old).await?;
            if paused {
                self.cleanup(&d, &old).await?;
            }
            return self.sync_status(&d, &sets, new.as_deref()).await;
        }
        let recreate = recreates(&d);
        let (surge, unavailable) = fenceposts(&d);
        let new = if recreate {
            self.new_set(&d, &sets, |_| 0).await?
        } else {
            self.new_set(&d, &sets, |all| {
                let all_pods: i32 = all.iter().map(|rs| pods_of(rs)).sum();
                new_set_replicas(replicas, surge, all_pods, 0)
            })
            .await?
        };
        let Some(new) = new else {
            return Ok(Next::Done); // collision: hashed again, the change brings us back
        };
        let new_uid = new.metadata.uid.clone();
        let old: Vec<Arc<ReplicaSet>> = sets
            .iter()
            .filter(|rs| rs.metadata.uid != new_uid)
            .cloned()
            .collect();
        if !sets.iter().any(|rs| rs.metadata.uid == new_uid) {
            sets.push(Arc::new(new.clone()));
        }
        let old_active = old.iter().any(|rs| spec_replicas(rs) > 0);
        if recreate {
            if old_active {
                for rs in old.iter().filter(|rs| spec_replicas(rs) > 0) {
                    self.scale(rs, 0, &d).await?;
                }
            } else if !self.old_pods_running(&ns, &old) && spec_replicas(&new) != replicas {
                self.scale(&new, replicas, &d).await?;
            }
        } else if !old_active {
            if spec_replicas(&new) != replicas {
                self.scale(&new, replicas, &d).await?;
            }
        } else {
            let all_pods: i32 = sets.iter().map(|rs| pods_of(rs)).sum();
            let up = new_set_replicas(replicas, surge, all_pods, spec_replicas(&new));
            if up != spec_replicas(&new) {
                self.scale(&new, up, &d).await?;
            } else {
                let olds: Vec<SetCounts> = old.iter().map(|rs| counts(rs)).collect();
                let specs = scale_down_old(replicas, unavailable, counts(&new), &olds);
                for (rs, s) in old.iter().zip(specs) {
                    if s != spec_replicas(rs) {
                        self.scale(rs, s, &d).await?;
                    }
                }
            }
        }
        self.cleanup(&d, &old).await?;
        self.sync_status(&d, &sets, Some(&new)).await
    }

    /// Deletes empty old sets beyond the revision history limit, oldest first.
    async fn cleanup(&self, d: &Deployment, old: &[Arc<ReplicaSet>]) -> Result<(), ApiError> {
        let limit = d.spec.revision_history_limit.unwrap_or(10).max(0) as usize;
        let mut empty: Vec<&Arc<ReplicaSet>> = old
            .iter()
            .filter(|rs| {
                spec_replicas(rs) == 0 && rs.status.as_ref().is_none_or(|s| s.replicas == 0)
            })
            .collect();
        if empty.len() <= limit {
            return Ok(());
        }
        empty.sort_by_key(|rs| revision(rs));
        let extra = empty.len() - limit;
        for rs in &empty[..extra] {
            self.client
                .delete::<ReplicaSet>(
                    rs.metadata.namespace.as_deref(),
                    rs.metadata.name.as_deref().unwrap_or_default(),
                    &DeleteParams::default(),
                )
                .await?;
        }
        Ok(())
    }

    async fn sync_status(
        &self,
        d: &Deployment,
        sets: &[Arc<ReplicaSet>],
        new: Option<&ReplicaSet>,
    ) -> Result<Next, ApiError> {
        let replicas = d.spec.replicas.unwrap_or(1);
        let (_, unavailable) = fenceposts(d);
        let sum = |f: &dyn Fn(&k8s_openapi::api::apps::v1::ReplicaSetStatus) -> i32| -> i32 {
            sets.iter().filter_map(|rs| rs.status.as_ref()).map(f).sum()
        };
        // The freshest view of the new set (it may just have been created or scaled).
        let new_status = new.and_then(|n| {
            sets.iter()
                .find(|rs| rs.metadata.uid == n.metadata.uid)
                .and_then(|rs| rs.status.clone())
        });
        let total = sum(&|s| s.replicas);
        let available = sum(&|s| s.available_replicas.unwrap_or(0));
        let updated = new_status.as_ref().map(|s| s.replicas).unwrap_or(0);
        let old = d.status.clone().unwrap_or_default();
        let now = Time(jiff::Timestamp::now());
        let condition = |type_: &str, status: &str, reason: &str, message: String| {
            let previous = old
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_.as_deref() == Some(type_));
            let same = previous.is_some_and(|p| {
                p.status.as_deref() == Some(status) && p.reason.as_deref() == Some(reason)
            });
            DeploymentCondition {
                type_: Some(type_.to_owned()),
                status: Some(status.to_owned()),
                reason: Some(reason.to_owned()),
                message: Some(message),
                last_transition_time: if same {
                    previous.and_then(|p| p.last_transition_time.clone())
                } else {
                    Some(now.clone())
                },
                last_update_time: if same {
                    previous.and_then(|p| p.last_update_time.clone())
                } else {
                    Some(now.clone())
                },
            }
        };
        let minimum = available >= replicas - unavailable;
        let new_name = new
            .and_then(|n| n.metadata.name.clone())
            .unwrap_or_default();
        let complete = updated == replicas && total == replicas && available == replicas;
        let ready = sum(&|s| s.ready_replicas.unwrap_or(0));
        // Progress, as kube-controller-manager counts it: more updated, ready or available
        // replicas, fewer old ones, or a spec it has not acted on yet (a new rollout).
        let progressed = updated > old.updated_replicas.unwrap_or(0)
            || total - updated < old.replicas.unwrap_or(0) - old.updated_replicas.unwrap_or(0)
            || ready > old.ready_replicas.unwrap_or(0)
            || available > old.available_replicas.unwrap_or(0)
            || d.metadata.generation != old.observed_generation;
        let previous = old
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_.as_deref() == Some("Progressing"))
            .cloned();
        let deadline =
            Duration::from_secs(d.spec.progress_deadline_seconds.unwrap_or(600).max(0) as u64);
        let mut next = Next::Done;
        let progressing = if d.spec.paused == Some(true) {
            // No progress is expected of a paused deployment: no deadline runs. Resuming
            // changes the spec, which counts as progress and starts the deadline again.
            condition(
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused".into(),
            )
        } else if complete {
            condition(
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            )
        } else if progressed || previous.is_none() {
            next = Next::After(deadline);
            DeploymentCondition {
                last_update_time: Some(now.clone()),
                ..condition(
                    "Progressing",
                    "True",
                    "ReplicaSetUpdated",
                    format!("ReplicaSet \"{new_name}\" is progressing."),
                )
            }
        } else {
            // No progress since the condition's last update: past the deadline, the rollout
            // has failed (`kubectl rollout status` says so instead of waiting forever).
            let since = previous
                .as_ref()
                .and_then(|p| p.last_update_time.as_ref())
                .map_or(now.0, |t| t.0);
            let waited = Duration::try_from(now.0 - since).unwrap_or_default();
            let exceeded = previous.as_ref().and_then(|p| p.reason.as_deref())
                == Some("ProgressDeadlineExceeded");
            if exceeded || waited >= deadline {
                condition(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                )
            } else {
                next = Next::After(deadline - waited);
                previous.clone().expect("checked above")
            }
        };
        let conditions = vec![
            condition(
                "Available",
                if minimum { "True" } else { "False" },
                if minimum {
                    "MinimumReplicasAvailable"
                } else {
                    "MinimumReplicasUnavailable"
                },
                if minimum {
                    "Deployment has minimum availability.".into()
                } else {
                    "Deployment does not have minimum availability.".into()
                },
            ),
            progressing,
        ];
        let status = DeploymentStatus {
            replicas: Some(total),
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            available_replicas: Some(available),
            unavailable_replicas: Some((replicas - available).max(0)),
            terminating_replicas: Some(sum(&|s| s.terminating_replicas.unwrap_or(0))),
            observed_generation: d.metadata.generation,
            collision_count: old.collision_count,
            conditions: Some(conditions),
        };
        let ns = d.metadata.namespace.as_deref();
        let name = d.metadata.name.as_deref().unwrap_or_default();
        if d.status.as_ref() != Some(&status) {
            self.client
                .update::<Deployment>(ns, name, true, |current| {
                    if current.status.as_ref() == Some(&status) {
                        return false;
                    }
                    current.status = Some(status.clone());
                    true
                })
                .await?;
        }
        // The deployment carries its current revision, as kubectl shows it.
        if let Some(new) = new {
            let rev = revision(new).to_string();
            if d.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REVISION))
                != Some(&rev)
            {
                self.client
                    .update::<Deployment>(ns, name, false, |current| {
                        let a = current
                            .metadata
                            .annotations
                            .get_or_insert_with(BTreeMap::new);
                        if a.get(REVISION) == Some(&rev) {
                            return false;
                        }
                        a.insert(REVISION.into(), rev.clone());
                        true
                    })
                    .await?;
            }
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_surge_rounds_up_and_max_unavailable_rounds_down() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(
            scaled_value(Some(&pct("25%")), 25, 5, true),
            2,
            "1.25 rounds up"
        );
        assert_eq!(
            scaled_value(Some(&pct("25%")), 25, 5, false),
            1,
            "1.25 rounds down"
        );
        assert_eq!(scaled_value(Some(&pct("10%")), 25, 3, false), 0);
        assert_eq!(scaled_value(Some(&IntOrString::Int(2)), 25, 5, true), 2);
        assert_eq!(scaled_value(None, 25, 10, true), 3);
    }

    #[test]
    fn the_new_set_grows_within_the_surge() {
        // 5 replicas, surge 2: 5 old + 0 new may add 2 new.
        assert_eq!(new_set_replicas(5, 2, 5, 0), 2);
        // Already at 7 in total: no more.
        assert_eq!(new_set_replicas(5, 2, 7, 2), 2);
        // Never past the replicas.
        assert_eq!(new_set_replicas(5, 10, 5, 0), 5);
    }

    #[test]
    fn old_sets_shrink_within_the_unavailability_budget() {
        // 5 replicas, maxUnavailable 1; 5 old available, new has 2 not yet available.
        let new = SetCounts {
            spec: 2,
            available: 0,
        };
        let old = [SetCounts {
            spec: 5,
            available: 5,
        }];
        // all 7, min available 4, new unavailable 2: at most 1 down.
        assert_eq!(scale_down_old(5, 1, new, &old), vec![4]);
        // Once the new ones are available, more can go.
        let new = SetCounts {
            spec: 2,
            available: 2,
        };
        assert_eq!(scale_down_old(5, 1, new, &old), vec![2]);
        // Unavailable old replicas go first and cost nothing.
        let old = [
            SetCounts {
                spec: 2,
                available: 0,
            },
            SetCounts {
                spec: 3,
                available: 3,
            },
        ];
        let new = SetCounts {
            spec: 1,
            available: 1,
        };
        assert_eq!(scale_down_old(5, 1, new, &old), vec![0, 3]);
    }

    #[test]
    fn a_resize_mid_rollout_keeps_each_sets_share() {
        // 10 replicas, surge 3, fully surged: 8 old and 5 new, both scaled for 13.
        let sets = [(8, Some(13)), (5, Some(13))];
        // To 20 (surge 5): 25 in all, in the same proportions.
        assert_eq!(proportional_specs(&sets, 20, 25, 13), vec![15, 10]);
        // To 5 (surge 2): 7 in all.
        assert_eq!(proportional_specs(&sets, 5, 7, 13), vec![4, 3]);
        // Rounding leftovers go to the first (largest) set.
        assert_eq!(
            proportional_specs(&[(1, Some(3)), (1, Some(3)), (1, Some(3))], 4, 4, 3),
            vec![2, 1, 1]
        );
        // To zero: every set empties.
        assert_eq!(proportional_specs(&sets, 0, 0, 13), vec![0, 0]);
        // Without the annotation the deployment's status counts.
        assert_eq!(
            proportional_specs(&[(2, None), (2, None)], 8, 8, 4),
            vec![4, 4]
        );
    }

    #[test]
    fn fenceposts_never_leave_a_rollout_stuck() {
        let d = Deployment {
            spec: k8s_openapi::api::apps::v1::DeploymentSpec {
                replicas: Some(3),
                strategy: Some(k8s_openapi::api::apps::v1::DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(k8s_openapi::api::apps::v1::RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(0)),
                        max_unavailable: Some(IntOrString::String("10%".into())),
                    }),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(fenceposts(&d), (0, 1), "0 and 0 become 0 and 1");
    }

    #[test]
    fn template_hashes_change_with_the_template_and_collisions() {
        let a = k8s_openapi::api::core::v1::PodTemplateSpec::default();
        let mut b = a.clone();
        b.metadata = Some(ObjectMeta {
            labels: Some([("v".to_owned(), "2".to_owned())].into_iter().collect()),
            ..Default::default()
        });
        assert_eq!(template_hash(&a, 0), template_hash(&a, 0));
        assert_ne!(template_hash(&a, 0), template_hash(&b, 0));
        assert_ne!(template_hash(&a, 0), template_hash(&a, 1));
        assert!(
            template_hash(&a, 0)
                .chars()
                .all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c))
        );
    }
}
