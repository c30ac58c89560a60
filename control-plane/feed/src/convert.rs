//! Kubernetes objects (as stored, JSON) to what the feed carries.

use control_plane_api::feed;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};

pub fn service(json: &[u8]) -> Option<feed::Service> {
    let svc: Service = serde_json::from_slice(json).ok()?;
    let spec = svc.spec.unwrap_or_default();
    let mut cluster_ips: Vec<String> = spec.cluster_ips.unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip);
    }
    cluster_ips.retain(|ip| !ip.is_empty() && ip != "None");
    let affinity = spec.session_affinity.as_deref() == Some("ClientIP");
    Some(feed::Service {
        namespace: svc.metadata.namespace.unwrap_or_default(),
        name: svc.metadata.name.unwrap_or_default(),
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
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.ip)
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
    })
}

pub fn endpoint_slice(json: &[u8]) -> Option<feed::EndpointSlice> {
    let s: EndpointSlice = serde_json::from_slice(json).ok()?;
    Some(feed::EndpointSlice {
        service_name: s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .cloned()
            .unwrap_or_default(),
        namespace: s.metadata.namespace.unwrap_or_default(),
        name: s.metadata.name.unwrap_or_default(),
        address_type: s.address_type,
        ports: s
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| feed::EndpointPort {
                name: p.name.unwrap_or_default(),
                protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                port: p.port.unwrap_or(0) as u32,
            })
            .collect(),
        endpoints: s
            .endpoints
            .unwrap_or_default()
            .into_iter()
            .map(|e| {
                let c = e.conditions.unwrap_or_default();
                // discovery/v1: an unset `ready` means ready; unset `serving` follows `ready`.
                let ready = c.ready.unwrap_or(true);
                feed::Endpoint {
                    addresses: e.addresses,
                    ready,
                    serving: c.serving.unwrap_or(ready),
                    terminating: c.terminating.unwrap_or(false),
                    node_name: e.node_name.unwrap_or_default(),
                    zone: e.zone.unwrap_or_default(),
                }
            })
            .collect(),
    })
}

pub fn node(json: &[u8]) -> Option<feed::Node> {
    let n: Node = serde_json::from_slice(json).ok()?;
    let spec = n.spec.unwrap_or_default();
    let status = n.status.unwrap_or_default();
    let mut pod_cidrs = spec.pod_cidrs.unwrap_or_default();
    if pod_cidrs.is_empty() {
        pod_cidrs.extend(spec.pod_cidr);
    }
    Some(feed::Node {
        name: n.metadata.name.unwrap_or_default(),
        internal_ip: status
            .addresses
            .iter()
            .flatten()
            .find(|a| a.type_ == "InternalIP")
            .map(|a| a.address.clone())
            .unwrap_or_default(),
        pod_cidrs,
        ready: status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
    })
}

/// A bound pod and its node; `None` for pods not bound yet.
pub fn pod(json: &[u8]) -> Option<(String, feed::Pod)> {
    let p: Pod = serde_json::from_slice(json).ok()?;
    let spec = p.spec?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    Some((
        node,
        feed::Pod {
            namespace: p.metadata.namespace.unwrap_or_default(),
            name: p.metadata.name.unwrap_or_default(),
            uid: p.metadata.uid.unwrap_or_default(),
            labels: p.metadata.labels.unwrap_or_default().into_iter().collect(),
            spec_json: serde_json::to_vec(&spec).ok()?,
            deleting: p.metadata.deletion_timestamp.is_some(),
            grace_period_seconds: p.metadata.deletion_grace_period_seconds.unwrap_or(0),
        },
    ))
}
