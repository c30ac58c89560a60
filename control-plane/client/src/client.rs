//! The control loops' client of the API: typed (k8s-openapi) calls into the API server's
//! registry, in the same process. Every write goes through the registry's rules (defaulting,
//! validation, optimistic concurrency, allocation, graceful deletion), as a REST client's would,
//! without the HTTP and JSON round trip; successful writes update the informers' caches.

use std::sync::Arc;

use control_plane_apiserver::{
    error::{ApiError, ApiResult},
    registry::{DeleteParams, Registry},
};
use control_plane_store::AnyStore;
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use crate::informer::{Informers, Object, def, key_of, revision_of};

#[derive(Clone)]
pub struct Client {
    pub registry: Arc<Registry<AnyStore>>,
    pub informers: Arc<Informers>,
}

fn to_value<K: Object>(obj: &K) -> ApiResult<Value> {
    serde_json::to_value(obj).map_err(ApiError::internal)
}

fn from_value<K: Object>(value: Value) -> ApiResult<K> {
    serde_json::from_value(value).map_err(ApiError::internal)
}

fn namespace<K: Object>(obj: &K) -> Option<&str> {
    obj.metadata()
        .namespace
        .as_deref()
        .filter(|_| def::<K>().namespaced)
}

impl Client {
    pub fn new(registry: Arc<Registry<AnyStore>>, informers: Arc<Informers>) -> Self {
        Self {
            registry,
            informers,
        }
    }

    fn cached<K: Object>(&self, obj: K) -> K {
        if let Some(informer) = self.informers.existing::<K>() {
            informer.apply(obj.clone());
        }
        obj
    }

    pub async fn get<K: Object>(&self, ns: Option<&str>, name: &str) -> ApiResult<K> {
        from_value(self.registry.get(def::<K>(), ns, name).await?)
    }

    pub async fn create<K: Object>(&self, obj: &K) -> ApiResult<K> {
        let created = self
            .registry
            .create(def::<K>(), namespace(obj), to_value(obj)?, false)
            .await?;
        Ok(self.cached(from_value(created)?))
    }

    /// Replaces the object (or its status); conditional on the resourceVersion it carries.
    pub async fn replace<K: Object>(&self, obj: &K, status: bool) -> ApiResult<K> {
        let def = def::<K>();
        let sub = if status {
            def.subresource("status")
        } else {
            None
        };
        let name = obj.metadata().name.clone().unwrap_or_default();
        let updated = self
            .registry
            .update(def, namespace(obj), &name, to_value(obj)?, sub, false)
            .await?;
        Ok(self.cached(from_value(updated)?))
    }

    /// Applies `change` to the latest object (or its status), retrying on conflicts; `change`
    /// returns false when there is nothing to write. Returns the object as stored.
    pub async fn update<K: Object>(
        &self,
        ns: Option<&str>,
        name: &str,
        status: bool,
        change: impl Fn(&mut K) -> bool,
    ) -> ApiResult<K> {
        let def = def::<K>();
        let sub = if status {
            def.subresource("status")
        } else {
            None
        };
        let updated = self
            .registry
            .guaranteed_update(def, ns, name, sub, false, |current| {
                let mut obj: K = from_value(current.clone())?;
                if change(&mut obj) {
                    // Unconditional: a concurrent write makes it apply `change` again.
                    obj.metadata_mut().resource_version = None;
                    to_value(&obj)
                } else {
                    Ok(current.clone())
                }
            })
            .await?;
        Ok(self.cached(from_value(updated)?))
    }

    /// Deletes an object; `Ok(None)` once it is gone, `Ok(Some(obj))` while finalizers or a
    /// grace period keep it. Deleting what is already gone is not an error.
    pub async fn delete<K: Object>(
        &self,
        ns: Option<&str>,
        name: &str,
        params: &DeleteParams,
    ) -> ApiResult<Option<K>> {
        match self.registry.delete(def::<K>(), ns, name, params).await {
            Ok((obj, gone)) => {
                let obj: K = from_value(obj)?;
                if gone {
                    if let Some(informer) = self.informers.existing::<K>() {
                        informer.apply_delete(&key_of(obj.metadata()), revision_of(obj.metadata()));
                    }
                    Ok(None)
                } else {
                    Ok(Some(self.cached(obj)))
                }
            }
            Err(e) if e.reason == "NotFound" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Assigns a pod to a node through the binding subresource.
    pub async fn bind(&self, ns: &str, name: &str, node: &str) -> ApiResult<Pod> {
        let def = def::<Pod>();
        let binding = def
            .subresource("binding")
            .expect("pods have a binding subresource");
        let bound = self
            .registry
            .bind(def, Some(ns), name, binding, node, false)
            .await?;
        Ok(self.cached(from_value(bound)?))
    }
}
