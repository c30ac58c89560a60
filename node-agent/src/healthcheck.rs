//! The health-check node ports of services that keep their clients' addresses
//! (`externalTrafficPolicy: Local`, which only this node's endpoints serve): a load balancer
//! asks each node whether to send it traffic. Answered as kube-proxy answers
//! (`pkg/proxy/healthcheck/service_health.go`), whatever the proxy mode: 200 while the node has
//! local endpoints for the service, 503 otherwise, and in both cases the JSON
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":true}`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use node_agent_proxy::ProxyState;
use serde_json::json;
use tokio::{runtime::Handle, task::JoinHandle};

/// What a health-check port says.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

type Answers = Arc<Mutex<HashMap<u16, Answer>>>;

/// The listeners, kept equal to the services that ask for one.
pub struct HealthChecks {
    runtime: Handle,
    answers: Answers,
    servers: HashMap<u16, JoinHandle<()>>,
}

impl HealthChecks {
    pub fn new(runtime: Handle) -> Self {
        Self {
            runtime,
            answers: Answers::default(),
            servers: HashMap::new(),
        }
    }

    /// Opens the ports `state` asks for, closes the others, and updates what each answers.
    /// A port that cannot be opened is logged and tried again at the next update.
    pub fn update(&mut self, state: &ProxyState) {
        let wanted: HashMap<u16, Answer> = state
            .services
            .values()
            .filter_map(|svc| {
                let port = svc.health_check_node_port?;
                let local_endpoints = svc
                    .ports
                    .iter()
                    .map(|p| p.external_endpoints().len())
                    .max()
                    .unwrap_or(0);
                Some((
                    port,
                    Answer {
                        namespace: svc.namespace.clone(),
                        name: svc.name.clone(),
                        local_endpoints,
                    },
                ))
            })
            .collect();
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.abort();
            }
            keep
        });
        for port in wanted.keys() {
            if self.servers.contains_key(port) {
                continue;
            }
            match self.serve(*port) {
                Ok(server) => {
                    tracing::info!(port, "serving a load balancer's health check");
                    self.servers.insert(*port, server);
                }
                Err(e) => tracing::warn!(port, error = %e, "cannot serve a health check port"),
            }
        }
        *self.answers.lock().expect("not poisoned") = wanted;
    }

    fn serve(&self, port: u16) -> std::io::Result<JoinHandle<()>> {
        let listener =
            std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
        listener.set_nonblocking(true)?;
        let answers = self.answers.clone();
        let app = Router::new().fallback(answer).with_state((answers, port));
        Ok(self.runtime.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::warn!(port, error = %e, "health check server stopped");
                    }
                }
                Err(e) => tracing::warn!(port, error = %e, "health check listener"),
            }
        }))
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.abort();
        }
    }
}

async fn answer(State((answers, port)): State<(Answers, u16)>) -> Response {
    let Some(a) = answers.lock().expect("not poisoned").get(&port).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let status = if a.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "service": {"namespace": a.namespace, "name": a.name},
        "localEndpoints": a.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(weight) = HeaderValue::from_str(&a.local_endpoints.to_string()) {
        headers.insert("X-Load-Balancing-Endpoint-Weight", weight);
    }
    response
}
