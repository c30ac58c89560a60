//! The node agent. Today it is the kube-proxy replacement: it takes the desired services and
//! endpoints from the control plane's feed (`--feed`) or from any Kubernetes API server
//! (`--kubeconfig`), applies kube-proxy's semantics ([`services`]), and programs them through
//! `node_agent_proxy` (the eBPF data plane by default, or kube-proxy's iptables or nftables
//! layouts), incrementally. It serves `/metrics`, `/healthz` and `/status`, and its CLI inspects
//! a running agent (`status`) and the pinned data plane (`services`).
//!
//! - [`config`]: the command line;
//! - [`agent`]: the running process: shared state, the proxy thread, shutdown;
//! - [`source`]: the feed and the Kubernetes watches;
//! - [`services`]: from the view to the proxy's model, as kube-proxy decides;
//! - [`discover`]: pods' interfaces and network namespaces as they appear;
//! - [`http`], [`metrics`]: what the agent reports;
//! - [`healthcheck`]: load balancers' health checks of `externalTrafficPolicy: Local` services.

pub mod agent;
pub mod config;
pub mod discover;
pub mod healthcheck;
pub mod http;
pub mod kubelet_server;
pub mod launch;
pub mod metrics;
pub mod pods;
pub mod services;
pub mod source;
