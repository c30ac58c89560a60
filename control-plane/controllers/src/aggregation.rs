//! Aggregated ClusterRoles, as kube-controller-manager's clusterrole-aggregation controller
//! keeps them: a ClusterRole with an `aggregationRule` has, in its `rules`, the rules of every
//! other ClusterRole its selectors match (in name order, each rule once), so `kubectl get` and
//! `kubectl describe` show what `admin`, `edit` and `view` grant. The authorizer does not wait
//! for this: it aggregates when it decides.

use std::sync::Arc;

use control_plane_apiserver::error::ApiError;
use k8s_openapi::api::rbac::v1::ClusterRole;

use crate::{
    client::Client,
    queue::{Next, Queue, run_workers},
    util::selects,
};

pub fn start(client: Client) {
    let roles = client.informers.get::<ClusterRole>();
    let queue: Arc<Queue<String>> = Queue::new();
    let (q, all) = (queue.clone(), roles.clone());
    // Any role's change may change what any aggregated role gathers.
    roles.on_change(move |_| {
        for role in all.list() {
            if role.aggregation_rule.is_some() {
                q.add(role.metadata.name.clone().unwrap_or_default());
            }
        }
    });
    run_workers(
        "clusterrole-aggregation",
        queue,
        1,
        client.informers.clone(),
        move |name| {
            let (client, roles) = (client.clone(), roles.clone());
            async move {
                let Some(role) = roles.get(&name) else {
                    return Ok::<_, ApiError>(Next::Done);
                };
                let Some(rule) = &role.aggregation_rule else {
                    return Ok(Next::Done);
                };
                let mut others = roles.list();
                others.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
                let mut rules = Vec::new();
                for selector in rule.cluster_role_selectors.iter().flatten() {
                    for other in &others {
                        if other.metadata.name.as_deref() == Some(name.as_str())
                            || !selects(selector, other.metadata.labels.as_ref())
                        {
                            continue;
                        }
                        for r in other.rules.iter().flatten() {
                            if !rules.contains(r) {
                                rules.push(r.clone());
                            }
                        }
                    }
                }
                if role
                    .rules
                    .as_ref()
                    .map_or(rules.is_empty(), |r| *r == rules)
                {
                    return Ok(Next::Done);
                }
                let result = client
                    .update::<ClusterRole>(None, &name, false, |r| {
                        let changed = r.rules.as_ref() != Some(&rules);
                        r.rules = Some(rules.clone());
                        changed
                    })
                    .await;
                match result {
                    Err(e) if e.reason == "NotFound" => Ok(Next::Done),
                    other => other.map(|_| Next::Done),
                }
            }
        },
    );
}
