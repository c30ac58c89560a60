//! Garbage collection by ownerReferences: an object all of whose owners are gone is deleted;
//! an owner deleted with `propagationPolicy=Foreground` (finalizer `foregroundDeletion`) has its
//! dependents deleted first and goes when none is left; one deleted with `Orphan` has its
//! dependents' references to it removed, then goes.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use control_plane_apiserver::{
    error::ApiError,
    registry::DeleteParams,
    resources::{ResourceDef, by_kind},
};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet},
        coordination::v1::Lease,
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use serde_json::{Value, json};

use crate::{
    client::Client,
    informer::{Object, def},
    queue::{Next, Queue, run_workers},
    util::group_of,
};

#[derive(Clone, Debug)]
struct Record {
    def: &'static ResourceDef,
    namespace: Option<String>,
    name: String,
    owners: Vec<OwnerReference>,
    deleting: bool,
    finalizers: Vec<String>,
}

#[derive(Default)]
struct Graph {
    by_uid: HashMap<String, Record>,
    dependents: HashMap<String, HashSet<String>>,
}

impl Graph {
    fn remove(&mut self, uid: &str) -> Option<Record> {
        let old = self.by_uid.remove(uid)?;
        for o in &old.owners {
            if let Some(deps) = self.dependents.get_mut(&o.uid) {
                deps.remove(uid);
                if deps.is_empty() {
                    self.dependents.remove(&o.uid);
                }
            }
        }
        Some(old)
    }

    fn insert(&mut self, uid: String, record: Record) {
        self.remove(&uid);
        for o in &record.owners {
            self.dependents
                .entry(o.uid.clone())
                .or_default()
                .insert(uid.clone());
        }
        self.by_uid.insert(uid, record);
    }

    fn dependents_of(&self, uid: &str) -> Vec<(String, Record)> {
        self.dependents
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|d| Some((d.clone(), self.by_uid.get(d)?.clone())))
            .collect()
    }
}

pub struct GarbageCollector {
    client: Client,
    graph: Mutex<Graph>,
    queue: Arc<Queue<String>>,
}

impl GarbageCollector {
    pub fn start(client: Client) {
        let gc = Arc::new(Self {
            client,
            graph: Mutex::new(Graph::default()),
            queue: Queue::new(),
        });
        gc.track::<Deployment>();
        gc.track::<ReplicaSet>();
        gc.track::<Pod>();
        gc.track::<Service>();
        gc.track::<EndpointSlice>();
        gc.track::<Node>();
        gc.track::<Lease>();
        let g = gc.clone();
        run_workers(
            "garbage-collector",
            gc.queue.clone(),
            2,
            gc.client.informers.clone(),
            move |uid| {
                let g = g.clone();
                async move { g.process(&uid).await }
            },
        );
    }

    fn track<K: Object>(self: &Arc<Self>) {
        let gc = self.clone();
        self.client.informers.get::<K>().on_change(move |c| {
            let meta = c.object().metadata();
            let Some(uid) = meta.uid.clone() else { return };
            let mut graph = gc.graph.lock().expect("not poisoned");
            let mut wake: Vec<String> = meta
                .owner_references
                .iter()
                .flatten()
                .map(|o| o.uid.clone())
                .collect();
            match &c.new {
                Some(new) => {
                    let m = new.metadata();
                    graph.insert(
                        uid.clone(),
                        Record {
                            def: def::<K>(),
                            namespace: m.namespace.clone(),
                            name: m.name.clone().unwrap_or_default(),
                            owners: m.owner_references.clone().unwrap_or_default(),
                            deleting: m.deletion_timestamp.is_some(),
                            finalizers: m.finalizers.clone().unwrap_or_default(),
                        },
                    );
                    wake.push(uid);
                }
                None => {
                    graph.remove(&uid);
                    // Its dependents may be orphans now.
                    wake.extend(graph.dependents.get(&uid).into_iter().flatten().cloned());
                }
            }
            drop(graph);
            for u in wake {
                gc.queue.add(u);
            }
        });
    }

    /// Whether the owner exists: in the graph, or (for kinds not tracked, or not seen yet) in
    /// the API. Unknown kinds count as present: never delete on a guess.
    async fn owner_exists(
        &self,
        owner: &OwnerReference,
        namespace: Option<&str>,
    ) -> Result<bool, ApiError> {
        if self
            .graph
            .lock()
            .expect("not poisoned")
            .by_uid
            .contains_key(&owner.uid)
        {
            return Ok(true);
        }
        let Some(def) = by_kind(group_of(&owner.api_version), &owner.kind) else {
            return Ok(true);
        };
        let ns = if def.namespaced { namespace } else { None };
        match self.client.registry.get(def, ns, &owner.name).await {
            Ok(obj) => Ok(
                obj.pointer("/metadata/uid").and_then(Value::as_str) == Some(owner.uid.as_str())
            ),
            Err(e) if e.reason == "NotFound" => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn remove_finalizer(&self, r: &Record, finalizer: &str) -> Result<(), ApiError> {
        let result = self
            .client
            .registry
            .guaranteed_update(r.def, r.namespace.as_deref(), &r.name, None, false, |obj| {
                let mut obj = unconditional(obj);
                if let Some(list) = obj
                    .pointer_mut("/metadata/finalizers")
                    .and_then(Value::as_array_mut)
                {
                    list.retain(|f| f.as_str() != Some(finalizer));
                }
                Ok(obj)
            })
            .await;
        ignore_not_found(result.map(drop))
    }

    async fn process(&self, uid: &str) -> Result<Next, ApiError> {
        self.client.informers.synced().await;
        let Some(r) = self
            .graph
            .lock()
            .expect("not poisoned")
            .by_uid
            .get(uid)
            .cloned()
        else {
            return Ok(Next::Done);
        };
        if r.deleting && r.finalizers.iter().any(|f| f == "orphan") {
            let dependents = self.graph.lock().expect("not poisoned").dependents_of(uid);
            for (_, d) in dependents {
                let result = self
                    .client
                    .registry
                    .guaranteed_update(d.def, d.namespace.as_deref(), &d.name, None, false, |obj| {
                        let mut obj = unconditional(obj);
                        if let Some(list) = obj
                            .pointer_mut("/metadata/ownerReferences")
                            .and_then(Value::as_array_mut)
                        {
                            list.retain(|o| o.get("uid") != Some(&json!(uid)));
                        }
                        Ok(obj)
                    })
                    .await;
                ignore_not_found(result.map(drop))?;
            }
            self.remove_finalizer(&r, "orphan").await?;
            return Ok(Next::Done);
        }
        if r.deleting && r.finalizers.iter().any(|f| f == "foregroundDeletion") {
            let dependents = self.graph.lock().expect("not poisoned").dependents_of(uid);
            if dependents.is_empty() {
                self.remove_finalizer(&r, "foregroundDeletion").await?;
            }
            for (d_uid, d) in dependents.iter().filter(|(_, d)| !d.deleting) {
                let has_dependents = self
                    .graph
                    .lock()
                    .expect("not poisoned")
                    .dependents
                    .contains_key(d_uid);
                let policy = if has_dependents {
                    "Foreground"
                } else {
                    "Background"
                };
                self.delete(d, policy).await?;
            }
            return Ok(Next::Done);
        }
        if !r.owners.is_empty() && !r.deleting {
            for owner in &r.owners {
                if self.owner_exists(owner, r.namespace.as_deref()).await? {
                    return Ok(Next::Done);
                }
            }
            self.delete(&r, "Background").await?;
        }
        Ok(Next::Done)
    }

    async fn delete(&self, r: &Record, policy: &str) -> Result<(), ApiError> {
        let params = DeleteParams {
            propagation_policy: Some(policy.into()),
            ..Default::default()
        };
        let result = self
            .client
            .registry
            .delete(r.def, r.namespace.as_deref(), &r.name, &params)
            .await;
        ignore_not_found(result.map(drop))
    }
}

/// A copy without its resourceVersion: the update applies to the latest version (retried on
/// concurrent writes).
fn unconditional(obj: &Value) -> Value {
    let mut obj = obj.clone();
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    obj
}

fn ignore_not_found(result: Result<(), ApiError>) -> Result<(), ApiError> {
    match result {
        Err(e) if e.reason == "NotFound" => Ok(()),
        other => other,
    }
}
