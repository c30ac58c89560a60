//! Small rules the loops share: owner references, pod readiness and availability, label
//! selectors.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::core::v1::{Pod, PodCondition},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
};

use crate::informer::Object;

/// The owner reference that makes `owner` the controller of an object.
pub fn controller_ref<K: Object>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::API_VERSION.to_owned(),
        kind: K::KIND.to_owned(),
        name: owner.metadata().name.clone().unwrap_or_default(),
        uid: owner.metadata().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The controller owner reference of an object, if it has one.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

/// Whether `owner` (by uid) controls the object.
pub fn controlled_by<K: Object>(meta: &ObjectMeta, owner: &K) -> bool {
    controller_of(meta).is_some_and(|r| Some(&r.uid) == owner.metadata().uid.as_ref())
}

pub fn is_terminating(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

pub fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Counted by its ReplicaSet: neither being deleted nor finished.
pub fn pod_active(pod: &Pod) -> bool {
    !is_terminating(&pod.metadata) && !pod_finished(pod)
}

/// When the pod's Ready condition turned True, if it is ready.
pub fn ready_since(pod: &Pod) -> Option<Timestamp> {
    let c = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    (c.status == "True").then(|| {
        c.last_transition_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(Timestamp::UNIX_EPOCH)
    })
}

pub fn pod_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// Ready for at least `min_ready` seconds at `now`; otherwise how long until it will be (if
/// ready at all).
pub fn available(pod: &Pod, min_ready: i32, now: Timestamp) -> Result<(), Option<SignedDuration>> {
    let since = ready_since(pod).ok_or(None)?;
    let left = SignedDuration::from_secs(i64::from(min_ready)) - now.duration_since(since);
    if min_ready == 0 || left <= SignedDuration::ZERO {
        Ok(())
    } else {
        Err(Some(left))
    }
}

/// Whether a label selector (matchLabels and matchExpressions) selects `labels`. An empty
/// selector selects everything, as for workloads.
pub fn selects(selector: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    by_labels
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Whether a service's selector (a plain map) selects `labels`.
pub fn map_selects(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The `group` of an apiVersion ("apps/v1" -> "apps", "v1" -> "").
pub fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("")
}

/// Sets a pod condition (its transition time changes only when its status does); false when
/// nothing changed.
pub fn set_condition(pod: &mut Pod, mut condition: PodCondition) -> bool {
    let status = pod.status.get_or_insert_with(Default::default);
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(c) => {
            if c.status == condition.status
                && c.reason == condition.reason
                && c.message == condition.message
            {
                return false;
            }
            condition.last_transition_time = if c.status == condition.status {
                c.last_transition_time.clone()
            } else {
                Some(now)
            };
            *c = condition;
        }
        None => {
            condition.last_transition_time = Some(now);
            conditions.push(condition);
        }
    }
    true
}
