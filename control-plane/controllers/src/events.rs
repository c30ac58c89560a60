//! Events (core/v1), as `kubectl describe` shows them: written by one task from a bounded
//! queue, so a burst of them never slows the loop that reports them (when the queue is full,
//! events are dropped and counted, as client-go's broadcaster does under pressure).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
};
use tokio::sync::mpsc;

use crate::{client::Client, informer::Object};

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
            while let Some(event) = rx.recv().await {
                if let Err(e) = client.create(&event).await {
                    tracing::debug!("event: {e}");
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
