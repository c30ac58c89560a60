//! Kubernetes objects to what the feed carries. The control plane's feed converts what its store
//! holds; a node agent fed by any Kubernetes API server (`--kubeconfig`) converts what it
//! watches, so both arrive at the same [`crate::view::View`].

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};

use crate::feed;

/// The label that holds a node's zone (and an endpoint slice's endpoints' zone hints refer to).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The label that ties an endpoint slice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub fn service(svc: &Service) -> feed::Service {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut cluster_ips: Vec<String> = spec.cluster_ips.unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip);
    }
    // Headless services ("None") have no address to proxy.
    cluster_ips.retain(|ip| !ip.is_empty() && ip != "None");
    let affinity = spec.session_affinity.as_deref() == Some("ClientIP");
    feed::Service {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
        r#type: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
        cluster_ips,
        ports: spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| feed::ServicePort {
                name: p.name.unwrap_or_default(),
                protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                port: p.port as u32,
                node_port: p.node_port.unwrap_or(0) as u32,
            })
            .collect(),
        external_ips: spec.external_ips.unwrap_or_default(),
        load_balancer_ips: svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.clone())
            .collect(),
        session_affinity_timeout: if affinity {
            spec.session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10_800) as u32
        } else {
            0
        },
        external_traffic_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_traffic_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port: spec.health_check_node_port.unwrap_or(0) as u32,
        load_balancer_source_ranges: spec.load_balancer_source_ranges.unwrap_or_default(),
        labels: svc
            .metadata
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
    }
}

pub fn endpoint_slice(s: &EndpointSlice) -> feed::EndpointSlice {
    feed::EndpointSlice {
        service_name: s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .unwrap_or_default(),
        namespace: s.metadata.namespace.clone().unwrap_or_default(),
        name: s.metadata.name.clone().unwrap_or_default(),
        address_type: s.address_type.clone(),
        ports: s
            .ports
            .iter()
            .flatten()
            .map(|p| feed::EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port: p.port.unwrap_or(0) as u32,
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                let c = e.conditions.clone().unwrap_or_default();
                // discovery/v1: an unset `ready` means ready; unset `serving` follows `ready`.
                let ready = c.ready.unwrap_or(true);
                feed::Endpoint {
                    addresses: e.addresses.clone(),
                    ready,
                    serving: c.serving.unwrap_or(ready),
                    terminating: c.terminating.unwrap_or(false),
                    node_name: e.node_name.clone().unwrap_or_default(),
                    zone: e.zone.clone().unwrap_or_default(),
                    zone_hints: e
                        .hints
                        .as_ref()
                        .and_then(|h| h.for_zones.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                }
            })
            .collect(),
    }
}

pub fn node(n: &Node) -> feed::Node {
    let spec = n.spec.clone().unwrap_or_default();
    let status = n.status.as_ref();
    let mut pod_cidrs = spec.pod_cidrs.unwrap_or_default();
    if pod_cidrs.is_empty() {
        pod_cidrs.extend(spec.pod_cidr);
    }
    feed::Node {
        name: n.metadata.name.clone().unwrap_or_default(),
        internal_ip: status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .find(|a| a.type_ == "InternalIP")
            .map(|a| a.address.clone())
            .unwrap_or_default(),
        pod_cidrs,
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        zone: n
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned()
            .unwrap_or_default(),
    }
}

/// A bound pod and its node; `None` for pods not bound yet.
pub fn pod(p: &Pod) -> Option<(String, feed::Pod)> {
    let spec = p.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    Some((
        node,
        feed::Pod {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            uid: p.metadata.uid.clone().unwrap_or_default(),
            labels: p
                .metadata
                .labels
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            spec_json: serde_json::to_vec(spec).ok()?,
            deleting: p.metadata.deletion_timestamp.is_some(),
            grace_period_seconds: p.metadata.deletion_grace_period_seconds.unwrap_or(0),
        },
    ))
}
