//! The agent's HTTP endpoints (plain HTTP, on a local address by default, as kube-proxy's):
//! `/metrics` (Prometheus text format), `/healthz` (200 once the proxy has synced a complete
//! view and the last sync succeeded; 503 with the reason before), `/status` (JSON for
//! `node-agent status`).

use std::{net::SocketAddr, sync::Arc, time::Instant};

use anyhow::{Context, Result};
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{encoding::text::encode, registry::Registry};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::agent::{Shared, SyncStatus};

/// What `/status` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub source: String,
    pub mode: String,
    pub source_connected: bool,
    pub source_reconnects: u64,
    pub source_resyncs: u64,
    pub source_last_message_s_ago: Option<f64>,
    pub source_last_error: Option<String>,
    /// The view's version (the store revision it reflects).
    pub view_version: u64,
    pub view_complete: bool,
    pub view_services: usize,
    pub view_slices: usize,
    pub sync: SyncStatusOut,
}

/// [`SyncStatus`] as `/status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncStatusOut {
    pub synced: bool,
    pub last_sync_s_ago: Option<f64>,
    pub last_sync_ms: f64,
    pub version: u64,
    pub kind: String,
    pub written: usize,
    pub services: usize,
    pub endpoints: usize,
    pub kernel_objects: u64,
    pub failed: Vec<String>,
    pub last_error: Option<String>,
}

struct AppState {
    shared: Arc<Shared>,
    registry: Registry,
}

pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    registry: Registry,
) -> Result<JoinHandle<std::io::Result<()>>> {
    let state = Arc::new(AppState { shared, registry });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))?;
    Ok(tokio::spawn(
        async move { axum::serve(listener, app).await },
    ))
}

/// Copies the source's stream status into the metrics.
pub fn update_source_metrics(shared: &Shared) {
    let stream = shared.stream.lock().expect("not poisoned").clone();
    let m = &shared.metrics;
    m.source_connected.set(i64::from(stream.connected));
    m.source_reconnects.set(stream.reconnects as i64);
    m.source_resyncs.set(stream.resyncs as i64);
    m.source_last_message_age.set(
        stream
            .last_message
            .map_or(-1.0, |t| t.elapsed().as_secs_f64()),
    );
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    update_source_metrics(&state.shared);
    let registry = &state.registry;
    let mut body = String::new();
    // The data-plane collector reads pinned maps: a blocking but short read.
    match tokio::task::block_in_place(|| encode(&mut body, registry)) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("encoding the metrics failed: {e}"),
        ),
    }
}

async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let status = state.shared.status.lock().expect("not poisoned").clone();
    match (&status.synced, &status.last_error) {
        (true, None) => (StatusCode::OK, "ok\n".to_owned()),
        (_, Some(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the last sync failed: {e}\n"),
        ),
        (false, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not synced yet: waiting for a complete view of the cluster\n".to_owned(),
        ),
    }
}

async fn status(State(state): State<Arc<AppState>>) -> Json<Status> {
    let shared = &state.shared;
    let stream = shared.stream.lock().expect("not poisoned").clone();
    let (view_version, view_complete, view_services, view_slices) = {
        let view = shared.view.lock().expect("not poisoned");
        (
            view.version,
            view.complete,
            view.services.len(),
            view.slices.len(),
        )
    };
    let sync: SyncStatus = shared.status.lock().expect("not poisoned").clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    Json(Status {
        node: shared.node.clone(),
        source: shared.source.clone(),
        mode: shared.mode.to_string(),
        source_connected: stream.connected,
        source_reconnects: stream.reconnects,
        source_resyncs: stream.resyncs,
        source_last_message_s_ago: stream
            .last_message
            .map(|t: Instant| t.elapsed().as_secs_f64()),
        source_last_error: stream.last_error,
        view_version,
        view_complete,
        view_services,
        view_slices,
        sync: SyncStatusOut {
            synced: sync.synced,
            last_sync_s_ago: sync.synced.then(|| (now - sync.last_sync_unix).max(0.0)),
            last_sync_ms: sync.last_sync_ms,
            version: sync.version,
            kind: sync.kind.to_owned(),
            written: sync.written,
            services: sync.services,
            endpoints: sync.endpoints,
            kernel_objects: sync.kernel_objects,
            failed: sync.failed,
            last_error: sync.last_error,
        },
    })
}
