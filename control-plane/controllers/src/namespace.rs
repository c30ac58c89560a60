//! Namespace deletion: a namespace being deleted has its objects deleted (pods with their grace
//! period), and once nothing is left its `kubernetes` finalizer is removed, which lets the API
//! server remove it.

use std::{sync::Arc, time::Duration};

use control_plane_apiserver::{
    error::ApiError,
    object::name,
    registry::{DeleteParams, ListParams},
    resources::RESOURCES,
};
use k8s_openapi::api::core::v1::Namespace;
use serde_json::json;

use crate::{
    client::Client,
    informer::{def, key_of},
    queue::{Next, Queue, run_workers},
};

pub fn start(client: Client) {
    let namespaces = client.informers.get::<Namespace>();
    let queue: Arc<Queue<String>> = Queue::new();
    let q = queue.clone();
    namespaces.on_change(move |c| {
        if let Some(ns) = &c.new
            && ns.metadata.deletion_timestamp.is_some()
        {
            q.add(key_of(&ns.metadata));
        }
    });
    run_workers(
        "namespace",
        queue,
        1,
        client.informers.clone(),
        move |ns_name| {
            let (client, namespaces) = (client.clone(), namespaces.clone());
            async move {
                let Some(ns) = namespaces.get(&ns_name) else {
                    return Ok::<_, ApiError>(Next::Done);
                };
                let finalizers = ns
                    .spec
                    .as_ref()
                    .and_then(|s| s.finalizers.clone())
                    .unwrap_or_default();
                if ns.metadata.deletion_timestamp.is_none()
                    || !finalizers.iter().any(|f| f == "kubernetes")
                {
                    return Ok(Next::Done);
                }
                let registry = &client.registry;
                let mut remaining = 0;
                // Each stored object once: a kind also served in another form is deleted as stored.
                for resource in RESOURCES
                    .iter()
                    .filter(|r| r.namespaced && r.conversion.is_none())
                {
                    let (items, _) = registry
                        .list(resource, Some(&ns_name), &ListParams::default())
                        .await?;
                    for item in &items {
                        let item_name = name(item).unwrap_or_default();
                        match registry
                            .delete(
                                resource,
                                Some(&ns_name),
                                item_name,
                                &DeleteParams::default(),
                            )
                            .await
                        {
                            Ok((_, true)) => {}
                            Ok((_, false)) => remaining += 1,
                            Err(e) if e.reason == "NotFound" => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                if remaining > 0 {
                    return Ok(Next::After(Duration::from_secs(1)));
                }
                let finalize = def::<Namespace>().subresource("finalize");
                let kept: Vec<&String> = finalizers.iter().filter(|f| *f != "kubernetes").collect();
                let body = json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns_name},
                    "spec": {"finalizers": kept},
                });
                match registry
                    .update(def::<Namespace>(), None, &ns_name, body, finalize, false)
                    .await
                {
                    Err(e) if e.reason != "NotFound" => Err(e),
                    _ => Ok(Next::Done),
                }
            }
        },
    );
}
