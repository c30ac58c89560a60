//! How long store operations take, by operation and result, for the control plane's
//! `/metrics` (`keel_store_operation_duration_seconds`).

use std::{sync::LazyLock, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `get`, `list`, `create`, `update`, `delete`, `watch`, `revision`, `compact`, ...
    pub operation: &'static str,
    /// `embedded` or `etcd`.
    pub store: &'static str,
    /// `ok` or `error` (a conflict or a missing key counts as an error).
    pub result: &'static str,
}

/// Operation latency, 50 µs to about 13 s.
pub static OPERATIONS: LazyLock<Family<OperationLabels, Histogram>> = LazyLock::new(|| {
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.0, 18)))
});

pub(crate) fn observe(operation: &'static str, store: &'static str, ok: bool, took: Duration) {
    OPERATIONS
        .get_or_create(&OperationLabels {
            operation,
            store,
            result: if ok { "ok" } else { "error" },
        })
        .observe(took.as_secs_f64());
}
