//! Events (core/v1), as `kubectl describe` shows them: written by one task from a bounded
//! queue, so a burst of them never slows the loop that reports them (when the queue is full,
//! events are dropped and counted, as client-go's broadcaster does under pressure).
//!
//! A repeat of an event (same object, type, reason, message and component) raises the count
//! and last timestamp of the one already written instead of adding another, as client-go's
//! EventCorrelator does; and events expire an hour (`--event-ttl`) after their last write, as
//! kube-apiserver's event TTL makes them ([`start_expiry`]).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use control_plane_apiserver::registry::{DeleteParams, ListParams, Registry};
use control_plane_store::AnyStore;

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
};
use tokio::sync::mpsc;

use crate::{client::Client, informer::Object};

/// Events remembered for correlation at most (client-go's LRU holds 4,096).
const MAX_CORRELATED: usize = 4096;

/// What makes two events the same occurrence repeated.
fn correlation_key(e: &Event) -> String {
    let o = &e.involved_object;
    serde_json::json!([
        e.source.as_ref().and_then(|s| s.component.as_deref()),
        o.kind,
        o.namespace,
        o.name,
        o.uid,
        o.api_version,
        e.type_,
        e.reason,
        e.message,
    ])
    .to_string()
}

/// When an event was last written.
fn last_written(e: &Event) -> Option<jiff::Timestamp> {
    [
        e.last_timestamp.as_ref().map(|t| t.0),
        e.event_time.as_ref().map(|t| t.0),
        e.series
            .as_ref()
            .and_then(|s| s.last_observed_time.as_ref())
            .map(|t| t.0),
        e.metadata.creation_timestamp.as_ref().map(|t| t.0),
    ]
    .into_iter()
    .flatten()
    .max()
}

/// Deletes events `ttl` after their last write, checking every `ttl / 10` (at most every
/// minute): kube-apiserver's `--event-ttl`, for every writer's events.
pub fn start_expiry(registry: Arc<Registry<AnyStore>>, ttl: Duration) {
    let def = crate::informer::def::<Event>();
    let every = (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    tokio::spawn(async move {
        let mut params = ListParams {
            limit: Some(500),
            ..Default::default()
        };
        loop {
            if params.continue_token.is_none() {
                tokio::time::sleep(every).await;
            }
            let events = match registry.list(def, None, &params).await {
                Ok((events, meta)) => {
                    params.continue_token = meta.continue_token;
                    events
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing events to expire failed");
                    params.continue_token = None;
                    continue;
                }
            };
            let now = jiff::Timestamp::now();
            for value in events {
                let Ok(event) = serde_json::from_value::<Event>(value) else {
                    continue;
                };
                let age = last_written(&event).map(|t| now.duration_since(t));
                if age.is_none_or(|a| a < jiff::SignedDuration::try_from(ttl).unwrap_or_default()) {
                    continue;
                }
                let meta = &event.metadata;
                let name = meta.name.as_deref().unwrap_or_default();
                let params = DeleteParams {
                    // Only the event as read: one written again since lives on.
                    precondition_resource_version: meta.resource_version.clone(),
                    ..Default::default()
                };
                if let Err(e) = registry
                    .delete(def, meta.namespace.as_deref(), name, &params)
                    .await
                    && e.reason != "NotFound"
                    && e.reason != "Conflict"
                {
                    tracing::warn!(%name, error = %e, "expiring an event failed");
                }
            }
        }
    });
}

#[derive(Clone)]
pub struct Recorder {
    component: &'static str,
    tx: mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
}

/// `Normal` or `Warning`.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Normal,
    Warning,
}

impl Recorder {
    pub fn new(client: Client, component: &'static str) -> Self {
        let (tx, mut rx) = mpsc::channel::<Event>(1024);
        tokio::spawn(async move {
            // The event written for each key: (namespace, name).
            let mut written: HashMap<String, (String, String)> = HashMap::new();
            while let Some(event) = rx.recv().await {
                let key = correlation_key(&event);
                if let Some((ns, name)) = written.get(&key) {
                    let repeat = client
                        .update::<Event>(Some(ns), name, false, |e| {
                            e.count = Some(e.count.unwrap_or(1) + 1);
                            e.last_timestamp = event.last_timestamp.clone();
                            true
                        })
                        .await;
                    match repeat {
                        Ok(_) => continue,
                        // Expired or deleted: written anew.
                        Err(e) if e.reason == "NotFound" => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "updating a repeated event failed");
                            continue;
                        }
                    }
                }
                match client.create(&event).await {
                    Ok(created) => {
                        if written.len() >= MAX_CORRELATED {
                            written.clear(); // at worst, one more event per key
                        }
                        let meta = created.metadata;
                        written.insert(
                            key,
                            (
                                meta.namespace.unwrap_or_default(),
                                meta.name.unwrap_or_default(),
                            ),
                        );
                    }
                    Err(e) => tracing::debug!(error = %e, "creating an event failed"),
                }
            }
        });
        Self {
            component,
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records an event about `obj`.
    pub fn record<K: Object>(&self, obj: &K, kind: Kind, reason: &str, message: String) {
        let meta = obj.metadata();
        let now = jiff::Timestamp::now();
        let name = meta.name.clone().unwrap_or_default();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(meta.namespace.clone().unwrap_or_else(|| "default".into())),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some(K::API_VERSION.to_owned()),
                kind: Some(K::KIND.to_owned()),
                name: Some(name),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                resource_version: meta.resource_version.clone(),
                ..Default::default()
            },
            reason: Some(reason.to_owned()),
            message: Some(message),
            type_: Some(format!("{kind:?}")),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            source: Some(EventSource {
                component: Some(self.component.to_owned()),
                host: None,
            }),
            reporting_component: Some(self.component.to_owned()),
            reporting_instance: Some(self.component.to_owned()),
            action: Some(reason.to_owned()),
            ..Default::default()
        };
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
