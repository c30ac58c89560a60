//! The `default` ServiceAccount of every namespace, as kube-controller-manager's
//! serviceaccount controller keeps it: created with the namespace, and again if deleted, so a
//! pod (or a manifest naming `serviceAccountName: default`) always has one.

use std::sync::Arc;

use control_plane_apiserver::error::ApiError;
use k8s_openapi::{
    api::core::v1::{Namespace, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    client::Client,
    queue::{Next, Queue, run_workers},
};

const DEFAULT: &str = "default";

pub fn start(client: Client) {
    let namespaces = client.informers.get::<Namespace>();
    let accounts = client.informers.get::<ServiceAccount>();
    let queue: Arc<Queue<String>> = Queue::new();
    let q = queue.clone();
    namespaces.on_change(move |c| {
        if let Some(ns) = &c.new {
            q.add(ns.metadata.name.clone().unwrap_or_default());
        }
    });
    let q = queue.clone();
    accounts.on_change(move |c| {
        if c.new.is_none()
            && let Some(old) = &c.old
            && old.metadata.name.as_deref() == Some(DEFAULT)
        {
            q.add(old.metadata.namespace.clone().unwrap_or_default());
        }
    });
    run_workers(
        "serviceaccount",
        queue,
        1,
        client.informers.clone(),
        move |ns| {
            let (client, namespaces, accounts) =
                (client.clone(), namespaces.clone(), accounts.clone());
            async move {
                let Some(namespace) = namespaces.get(&ns) else {
                    return Ok::<_, ApiError>(Next::Done);
                };
                if namespace.metadata.deletion_timestamp.is_some()
                    || accounts.get(&format!("{ns}/{DEFAULT}")).is_some()
                {
                    return Ok(Next::Done);
                }
                let account = ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some(DEFAULT.into()),
                        namespace: Some(ns.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                match client.create(&account).await {
                    // Made meanwhile, or the namespace is going away.
                    Err(e) if matches!(e.reason, "AlreadyExists" | "NotFound" | "Forbidden") => {
                        Ok(Next::Done)
                    }
                    Err(e) => Err(e),
                    Ok(_) => Ok(Next::Done),
                }
            }
        },
    );
}
