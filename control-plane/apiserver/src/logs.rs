//! `GET pods/{name}/log`: the API server asks the kubelet of the pod's node, over TLS (the
//! kubelet serves a certificate the cluster's CA issued it at registration) presenting the node
//! token, and streams the answer back, as kube-apiserver proxies to kubelets. Query parameters
//! as kubectl sends them: `container`, `follow`, `previous`, `tailLines`.

use std::collections::HashMap;

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use control_plane_store::Store;
use serde_json::Value;

use crate::{
    error::{ApiError, ApiResult},
    registry::Registry,
    resources::by_kind,
};

/// The kubelet port a node advertises when it says none (kubelet's default).
pub const KUBELET_PORT: u16 = 10250;

/// How the API server reaches kubelets.
#[derive(Clone)]
pub struct Kubelets {
    http: reqwest::Client,
    token: String,
}

impl Kubelets {
    /// Trusts `ca_pem` (the cluster CA) and presents `token` (the node token).
    pub fn new(ca_pem: &str, token: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?])
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()?;
        Ok(Self { http, token })
    }
}

pub async fn pod_log<S: Store>(
    registry: &Registry<S>,
    kubelets: Option<&Kubelets>,
    namespace: &str,
    name: &str,
    q: &HashMap<String, String>,
) -> ApiResult<Response> {
    let kubelets = kubelets.ok_or_else(|| {
        ApiError::service_unavailable("this API server has no way to reach kubelets")
    })?;
    let pods = by_kind("", "Pod").expect("served");
    let nodes = by_kind("", "Node").expect("served");
    let pod = registry.get(pods, Some(namespace), name).await?;
    let containers: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let container = match q.get("container") {
        Some(c) if containers.contains(&c.as_str()) => c.clone(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        None if containers.len() == 1 => containers[0].to_owned(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: {containers:?}"
            )));
        }
    };
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!("pod {name} is not scheduled to a node yet"))
        })?;
    let node = registry.get(nodes, None, node_name).await?;
    let address = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str())
        .ok_or_else(|| {
            ApiError::service_unavailable(format!("node {node_name} has no InternalIP"))
        })?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .unwrap_or(u64::from(KUBELET_PORT));
    let query: Vec<String> = ["follow", "previous", "tailLines"]
        .iter()
        .filter_map(|key| {
            let v = q.get(*key)?;
            // Only what the kubelet understands, and nothing that breaks the query string.
            v.chars()
                .all(|c| c.is_ascii_alphanumeric())
                .then(|| format!("{key}={v}"))
        })
        .collect();
    let url = format!(
        "https://{address}:{port}/containerLogs/{namespace}/{name}/{container}?{}",
        query.join("&")
    );
    let response = kubelets
        .http
        .get(&url)
        .bearer_auth(&kubelets.token)
        .send()
        .await
        .map_err(|e| {
            ApiError::service_unavailable(format!(
                "the kubelet of node {node_name} does not answer: {e}"
            ))
        })?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(match status.as_u16() {
            404 => ApiError::bad_request(text.trim().to_owned()),
            _ => ApiError::service_unavailable(format!(
                "the kubelet of node {node_name}: {status}: {}",
                text.trim()
            )),
        });
    }
    let mut out = (StatusCode::OK, Body::from_stream(response.bytes_stream())).into_response();
    out.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(out)
}
