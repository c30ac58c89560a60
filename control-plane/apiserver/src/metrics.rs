//! The control plane's Prometheus metrics, served at `/metrics` (with the API's
//! authentication): request latency and counts by verb and resource (kube-apiserver's names),
//! watches open, store operation latency, and what other parts register (the feed's agents).

use std::{
    sync::{LazyLock, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// GET, LIST, WATCH, CREATE, UPDATE, PATCH, DELETE, DELETECOLLECTION (kube-apiserver's).
    pub verb: &'static str,
    /// The resource's plural, with its subresource (`pods/status`); the path for the rest.
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub verb: &'static str,
    pub resource: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub verb: &'static str,
    pub resource: String,
}

struct ApiMetrics {
    duration: Family<RequestLabels, Histogram>,
    total: Family<CodeLabels, Counter>,
    watches: Family<WatchLabels, Gauge>,
}

static METRICS: LazyLock<ApiMetrics> = LazyLock::new(|| ApiMetrics {
    duration: Family::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
    }),
    total: Family::default(),
    watches: Family::default(),
});

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    let mut registry = Registry::default();
    registry.register(
        "apiserver_request_duration_seconds",
        "Time to answer a request (for WATCH, to start the stream), by verb and resource",
        METRICS.duration.clone(),
    );
    registry.register(
        "apiserver_request",
        "Requests by verb, resource and HTTP code",
        METRICS.total.clone(),
    );
    registry.register(
        "apiserver_longrunning_requests",
        "Watches open, by resource",
        METRICS.watches.clone(),
    );
    registry.register(
        "keel_store_operation_duration_seconds",
        "Store operations by operation, store and result",
        control_plane_store::metrics::OPERATIONS.clone(),
    );
    Mutex::new(registry)
});

/// Adds a metric of another part of the control plane to `/metrics`.
pub fn register(name: &str, help: &str, metric: impl Metric) {
    REGISTRY
        .lock()
        .expect("not poisoned")
        .register(name, help, metric);
}

/// The metrics in the OpenMetrics text format.
pub fn encode() -> String {
    let mut out = String::new();
    let registry = REGISTRY.lock().expect("not poisoned");
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}

pub(crate) fn observe(verb: &'static str, resource: String, code: u16, took: Duration) {
    METRICS
        .duration
        .get_or_create(&RequestLabels {
            verb,
            resource: resource.clone(),
        })
        .observe(took.as_secs_f64());
    METRICS
        .total
        .get_or_create(&CodeLabels {
            verb,
            resource,
            code,
        })
        .inc();
}

/// Counts a watch as open until dropped (it lives as long as the watch's response body).
pub(crate) struct OpenWatch(WatchLabels);

impl OpenWatch {
    pub(crate) fn new(resource: &str) -> Self {
        let labels = WatchLabels {
            verb: "WATCH",
            resource: resource.to_owned(),
        };
        METRICS.watches.get_or_create(&labels).inc();
        Self(labels)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        METRICS.watches.get_or_create(&self.0).dec();
    }
}
