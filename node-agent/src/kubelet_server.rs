//! The kubelet's HTTPS endpoint (`--kubelet-port`, 10250 as kubelet's): container logs for the
//! API server's `pods/log`, as kubelet serves them (`/containerLogs/{namespace}/{pod}/{container}`
//! with `follow`, `previous`, `tailLines`). It serves the certificate the cluster's CA issued the
//! node at registration and answers only requests presenting the node token.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use axum::{
    Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use node_agent_kubelet::{Kubelet, logs, pod::container_id};
use serde::Deserialize;

struct App {
    kubelet: Arc<Kubelet>,
    token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    previous: bool,
    tail_lines: Option<usize>,
}

/// Serves on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    cert_pem: &str,
    key_pem: &str,
    token: String,
    kubelet: Arc<Kubelet>,
) -> Result<()> {
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        cert_pem.as_bytes().to_vec(),
        key_pem.as_bytes().to_vec(),
    )
    .await
    .context("the kubelet's TLS configuration")?;
    let app = Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .with_state(Arc::new(App { kubelet, token }));
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    tracing::info!(%addr, "serving container logs");
    tokio::spawn(async move {
        if let Err(e) = axum_server::from_tcp_rustls(listener, tls)
            .serve(app.into_make_service())
            .await
        {
            tracing::error!(error = %e, "the kubelet's log server stopped");
        }
    });
    Ok(())
}

async fn container_logs(
    State(app): State<Arc<App>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    if !presented.is_some_and(|t| constant_time_eq(t.trim().as_bytes(), app.token.as_bytes())) {
        return (StatusCode::UNAUTHORIZED, "the node token is required\n").into_response();
    }
    let Some((uid, runs)) = logs::runs(&app.kubelet.root, &namespace, &pod, &container) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no logs of container {container} of pod {namespace}/{pod} on this node\n"),
        )
            .into_response();
    };
    let file = if q.previous {
        match runs.len() {
            n if n >= 2 => runs[n - 2].clone(),
            _ => {
                return (
                    StatusCode::NOT_FOUND,
                    format!(
                        "previous terminated container \"{container}\" in pod \"{pod}\" not found\n"
                    ),
                )
                    .into_response();
            }
        }
    } else {
        match runs.last() {
            Some(f) => f.clone(),
            None => {
                return (
                    StatusCode::NOT_FOUND,
                    format!("container \"{container}\" in pod \"{pod}\" has not started\n"),
                )
                    .into_response();
            }
        }
    };
    let text = match logs::read(&file, q.tail_lines) {
        Ok(t) => t,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    if !q.follow || q.previous {
        return (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], text).into_response();
    }
    // Follow: what is there, then what the container writes until it ends.
    let id = container_id(&uid, &container);
    let start = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let kubelet = app.kubelet.clone();
    let stream = futures::stream::unfold(
        (Some(text.into_bytes()), start, false),
        move |(first, offset, done)| {
            let (file, kubelet, id) = (file.clone(), kubelet.clone(), id.clone());
            async move {
                if let Some(first) = first {
                    return Some((Ok::<_, std::io::Error>(first), (None, offset, false)));
                }
                if done {
                    return None;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let ended = kubelet.runtime.exit_code(&id).is_some()
                        || !kubelet.runtime.bundle(&id).exists();
                    match logs::read_from(&file, offset) {
                        Ok((bytes, next)) if !bytes.is_empty() => {
                            return Some((Ok(bytes), (None, next, ended)));
                        }
                        Ok(_) if ended => return None,
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
            }
        },
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
