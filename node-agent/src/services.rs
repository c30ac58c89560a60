//! kube-proxy's service semantics, from what the agent's view holds (services and their
//! endpoint slices, in the feed's types) to what the proxy programs (`node_agent_proxy`'s
//! model). The rules follow kube-proxy (`pkg/proxy/endpointslicecache.go`, `topology.go`):
//!
//! - a service's endpoint slices are merged; an endpoint's port for a service port is the
//!   port of the same name in its slice, so a named target port may differ from pod to pod;
//!   the same address and port in two slices counts once;
//! - new connections go to ready endpoints; when none is ready, to endpoints that are serving
//!   and terminating (KEP-1669), so a rolling update never leaves a gap;
//! - `internalTrafficPolicy: Local`: only endpoints on this node (none: connections are
//!   refused);
//! - topology-aware routing: when every ready endpoint carries zone hints, this node has a
//!   zone and some endpoint is hinted for it, only endpoints hinted for this zone are used;
//! - traffic from outside the cluster (NodePorts, ExternalIPs, LoadBalancer ingress IPs)
//!   follows `externalTrafficPolicy`: `Local` uses this node's endpoints only (and keeps the
//!   client's address), `Cluster` the same endpoints as cluster traffic would without
//!   `internalTrafficPolicy: Local`;
//! - ClientIP session affinity with its timeout;
//! - ignored: ExternalName and headless services, services another proxy owns (label
//!   `service.kubernetes.io/service-proxy-name`), SCTP ports; IPv6 addresses and IPv6 slices
//!   are counted and skipped until dual-stack lands.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use control_plane_api::{feed, view::View};
use node_agent_proxy::{Protocol, Service, ServicePort};

/// Services with this label belong to another proxy (kube-proxy skips them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Why a service the view holds is not programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    ExternalName,
    /// No cluster IP (`clusterIP: None`).
    Headless,
    /// Labelled for another proxy.
    OtherProxy,
    /// Only IPv6 cluster IPs.
    Ipv6Only,
}

/// What one service of the view becomes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translated {
    /// What the proxy programs; `None` if the service is gone or ignored.
    pub service: Option<Service>,
    pub ignored: Option<Ignored>,
    /// IPv6 cluster IPs and IPv6 endpoint slices left out.
    pub ipv6_skipped: usize,
}

/// Translates the service `key` (`namespace/name`) as the proxy on node `node` serves it.
pub fn translate(view: &View, key: &str, node: &str) -> Translated {
    let Some(svc) = view.services.get(key) else {
        return Translated::default();
    };
    let ignored = |why| Translated {
        ignored: Some(why),
        ..Default::default()
    };
    if svc.r#type == "ExternalName" {
        return ignored(Ignored::ExternalName);
    }
    if svc.labels.contains_key(SERVICE_PROXY_NAME_LABEL) {
        return ignored(Ignored::OtherProxy);
    }
    if svc.cluster_ips.is_empty() {
        return ignored(Ignored::Headless);
    }
    let mut ipv6_skipped = svc.cluster_ips.iter().filter(|ip| ip.contains(':')).count();
    let Some(cluster_ip) = svc
        .cluster_ips
        .iter()
        .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return Translated {
            ignored: Some(Ignored::Ipv6Only),
            ipv6_skipped,
            ..Default::default()
        };
    };

    let mut slices = Vec::new();
    for slice in view.slices_of(key) {
        match slice.address_type.as_str() {
            "IPv4" => slices.push(slice),
            "IPv6" => ipv6_skipped += 1,
            _ => {} // FQDN slices are not proxied.
        }
    }
    let zone = view.nodes.get(node).map(|n| n.zone.as_str()).unwrap_or("");
    let ports = svc
        .ports
        .iter()
        .filter_map(|port| {
            let protocol = match port.protocol.as_str() {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => return None,
            };
            let candidates = endpoints_of(&slices, &port.name, &port.protocol);
            let chosen = choose(&candidates, svc.internal_traffic_local, node, zone);
            // Traffic from outside has its own policy (kube-proxy's external endpoints).
            let external = (svc.internal_traffic_local != svc.external_traffic_local)
                .then(|| choose(&candidates, svc.external_traffic_local, node, zone));
            Some(ServicePort {
                name: port.name.clone(),
                protocol,
                port: u16::try_from(port.port).ok()?,
                endpoints: chosen,
                node_port: u16::try_from(port.node_port).ok().filter(|p| *p != 0),
                external_endpoints: external,
            })
        })
        .collect();
    Translated {
        service: Some(Service {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            cluster_ip,
            ports,
            session_affinity: (svc.session_affinity_timeout > 0)
                .then(|| Duration::from_secs(u64::from(svc.session_affinity_timeout))),
            external_ips: ipv4s(&svc.external_ips),
            load_balancer_ips: ipv4s(&svc.load_balancer_ips),
            load_balancer_source_ranges: svc
                .load_balancer_source_ranges
                .iter()
                .filter_map(|r| r.trim().parse::<ipnet::Ipv4Net>().ok())
                .map(|net| (net.network(), net.prefix_len()))
                .collect(),
            external_local: svc.external_traffic_local,
            health_check_node_port: u16::try_from(svc.health_check_node_port)
                .ok()
                .filter(|p| *p != 0 && svc.external_traffic_local),
        }),
        ignored: None,
        ipv6_skipped,
    }
}

/// Whether `key` is one of [`host_port_services`]'s (a service name cannot hold '_'; the
/// name must also fit nftables chain names, which ':' and '.' do not).
pub fn is_host_port_key(key: &str) -> bool {
    key.contains(HOST_PORTS_SUFFIX)
}

const HOST_PORTS_SUFFIX: &str = "_hostports";

/// The `hostPort`s of this node's pods, as the proxy serves them: for each pod with some and an
/// address (`ips`, by pod uid), a service of its own (`namespace/pod_hostports`) without a
/// cluster IP, whose "NodePorts" are the host ports, to the pod's container ports only, keeping
/// the client's address (`externalTrafficPolicy: Local`), as the CNI `portmap` plugin does.
/// Host ports with a `hostIP` answer on that address only: one more service per address
/// (`namespace/pod_hostports-10-0-0-1`), whose external IP it is.
pub fn host_port_services(
    view: &View,
    ips: &std::collections::HashMap<String, Ipv4Addr>,
) -> Vec<Service> {
    let mut out = Vec::new();
    for pod in view.pods.values() {
        let Some(ip) = ips.get(&pod.uid) else {
            continue;
        };
        let Ok(spec) =
            serde_json::from_slice::<k8s_openapi::api::core::v1::PodSpec>(&pod.spec_json)
        else {
            continue;
        };
        // By host address; unspecified: every address NodePorts answer on.
        let mut by_host_ip: BTreeMap<Ipv4Addr, Vec<ServicePort>> = BTreeMap::new();
        for container in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            for port in container.ports.iter().flatten() {
                let (Some(host_port), Ok(container_port)) =
                    (port.host_port, u16::try_from(port.container_port))
                else {
                    continue;
                };
                let Ok(host_port) = u16::try_from(host_port) else {
                    continue;
                };
                let protocol = match port.protocol.as_deref() {
                    None | Some("TCP") => Protocol::Tcp,
                    Some("UDP") => Protocol::Udp,
                    Some(_) => continue,
                };
                // An IPv6 or malformed hostIP is not served (IPv4 only, as the rest).
                let host_ip = match port.host_ip.as_deref() {
                    None | Some("") => Ipv4Addr::UNSPECIFIED,
                    Some(ip) => match ip.parse() {
                        Ok(ip) => ip,
                        Err(_) => continue,
                    },
                };
                by_host_ip.entry(host_ip).or_default().push(ServicePort {
                    name: format!("{}-{}-{host_port}", container.name, protocol.name()),
                    protocol,
                    port: host_port,
                    endpoints: vec![SocketAddrV4::new(*ip, container_port)],
                    node_port: host_ip.is_unspecified().then_some(host_port),
                    external_endpoints: None,
                });
            }
        }
        for (host_ip, ports) in by_host_ip {
            let (name, external_ips) = if host_ip.is_unspecified() {
                (format!("{}{HOST_PORTS_SUFFIX}", pod.name), Vec::new())
            } else {
                let dashed = host_ip.to_string().replace('.', "-");
                (
                    format!("{}{HOST_PORTS_SUFFIX}-{dashed}", pod.name),
                    vec![host_ip],
                )
            };
            out.push(Service {
                namespace: pod.namespace.clone(),
                name,
                cluster_ip: Ipv4Addr::UNSPECIFIED,
                ports,
                external_ips,
                external_local: true,
                ..Service::default()
            });
        }
    }
    out
}

/// The IPv4 addresses of a list (each once).
fn ipv4s(list: &[String]) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = list.iter().filter_map(|ip| ip.parse().ok()).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// One endpoint of one service port, with what the choice needs to know.
#[derive(Clone, Debug)]
struct Candidate<'a> {
    addr: SocketAddrV4,
    endpoint: &'a feed::Endpoint,
}

/// The endpoints the slices give a service port: the slice port of the same name and protocol
/// gives the port; an address seen twice counts once.
fn endpoints_of<'a>(
    slices: &[&'a feed::EndpointSlice],
    port_name: &str,
    protocol: &str,
) -> Vec<Candidate<'a>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
            .and_then(|p| u16::try_from(p.port).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let addr = SocketAddrV4::new(ip, port);
            if seen.insert(addr) {
                out.push(Candidate { addr, endpoint });
            }
        }
    }
    out
}

/// kube-proxy's choice of endpoints for traffic from this node (CategorizeEndpoints).
fn choose(candidates: &[Candidate], local_only: bool, node: &str, zone: &str) -> Vec<SocketAddrV4> {
    let pick = |keep: &dyn Fn(&feed::Endpoint) -> bool| -> Vec<SocketAddrV4> {
        let primary: Vec<SocketAddrV4> = candidates
            .iter()
            .filter(|c| c.endpoint.ready && keep(c.endpoint))
            .map(|c| c.addr)
            .collect();
        if !primary.is_empty() {
            return sorted(primary);
        }
        // No ready endpoint: those still serving while they terminate (KEP-1669).
        sorted(
            candidates
                .iter()
                .filter(|c| c.endpoint.serving && c.endpoint.terminating && keep(c.endpoint))
                .map(|c| c.addr)
                .collect(),
        )
    };
    if local_only {
        return pick(&|e| e.node_name == node);
    }
    if use_topology(candidates, zone) {
        return pick(&|e| e.zone_hints.iter().any(|z| z == zone));
    }
    pick(&|_| true)
}

/// Topology hints apply when every ready endpoint has them, the node has a zone, and some ready
/// endpoint is hinted for it (kube-proxy's canUseTopology).
fn use_topology(candidates: &[Candidate], zone: &str) -> bool {
    if zone.is_empty() {
        return false;
    }
    let ready: Vec<&feed::Endpoint> = candidates
        .iter()
        .map(|c| c.endpoint)
        .filter(|e| e.ready)
        .collect();
    !ready.is_empty()
        && ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| e.zone_hints.iter().any(|z| z == zone))
}

fn sorted(mut v: Vec<SocketAddrV4>) -> Vec<SocketAddrV4> {
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn host_ports_become_local_node_ports_of_running_pods() {
        let spec = serde_json::json!({"containers": [
            {"name": "web", "ports": [
                {"containerPort": 8080, "hostPort": 80},
                {"containerPort": 53, "hostPort": 5353, "protocol": "UDP"},
                {"containerPort": 9090},
                {"containerPort": 7, "hostPort": 7, "protocol": "SCTP"},
                {"containerPort": 8443, "hostPort": 443, "hostIP": "192.0.2.10"},
                {"containerPort": 8444, "hostPort": 444, "hostIP": "2001:db8::1"},
            ]},
        ]});
        let mut view = View::default();
        for (name, uid) in [("web", "u1"), ("starting", "u2")] {
            view.pods.insert(
                format!("default/{name}"),
                feed::Pod {
                    namespace: "default".into(),
                    name: name.into(),
                    uid: uid.into(),
                    spec_json: serde_json::to_vec(&spec).unwrap(),
                    ..Default::default()
                },
            );
        }
        // Only the pod whose sandbox is up (it has an address) is served.
        let ips = HashMap::from([("u1".to_owned(), Ipv4Addr::new(10, 244, 0, 5))]);
        let services = host_port_services(&view, &ips);
        assert_eq!(services.len(), 2, "{services:?}");
        let svc = &services[0];
        assert!(is_host_port_key(&svc.key()), "{}", svc.key());
        assert!(svc.cluster_ip.is_unspecified() && svc.external_local);
        let ports: Vec<(Protocol, u16, Option<u16>, Vec<SocketAddrV4>)> = svc
            .ports
            .iter()
            .map(|p| (p.protocol, p.port, p.node_port, p.endpoints.clone()))
            .collect();
        assert_eq!(
            ports,
            [
                (
                    Protocol::Tcp,
                    80,
                    Some(80),
                    vec![SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 8080)]
                ),
                (
                    Protocol::Udp,
                    5353,
                    Some(5353),
                    vec![SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 53)]
                ),
            ]
        );
        // A hostIP: that address only (an external IP, no NodePort); an IPv6 one is skipped.
        let on_ip = &services[1];
        assert_eq!(on_ip.key(), "default/web_hostports-192-0-2-10");
        assert!(is_host_port_key(&on_ip.key()));
        assert!(on_ip.cluster_ip.is_unspecified() && on_ip.external_local);
        assert_eq!(on_ip.external_ips, [Ipv4Addr::new(192, 0, 2, 10)]);
        let ports: Vec<(u16, Option<u16>, Vec<SocketAddrV4>)> = on_ip
            .ports
            .iter()
            .map(|p| (p.port, p.node_port, p.endpoints.clone()))
            .collect();
        assert_eq!(
            ports,
            [(
                443,
                None,
                vec![SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 8443)]
            )]
        );
    }

    struct Ep {
        ip: &'static str,
        ready: bool,
        serving: bool,
        terminating: bool,
        node: &'static str,
        hints: &'static [&'static str],
    }

    fn ep(ip: &'static str) -> Ep {
        Ep {
            ip,
            ready: true,
            serving: true,
            terminating: false,
            node: "n1",
            hints: &[],
        }
    }

    fn slice(name: &str, port: u32, endpoints: Vec<Ep>) -> feed::EndpointSlice {
        feed::EndpointSlice {
            namespace: "default".into(),
            name: name.into(),
            service_name: "web".into(),
            address_type: "IPv4".into(),
            ports: vec![feed::EndpointPort {
                name: "http".into(),
                protocol: "TCP".into(),
                port,
            }],
            endpoints: endpoints
                .into_iter()
                .map(|e| feed::Endpoint {
                    addresses: vec![e.ip.into()],
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    node_name: e.node.into(),
                    zone: String::new(),
                    zone_hints: e.hints.iter().map(|z| z.to_string()).collect(),
                })
                .collect(),
        }
    }

    fn view(svc: feed::Service, slices: Vec<feed::EndpointSlice>) -> View {
        let mut view = View::default();
        view.services.insert("default/web".into(), svc);
        for s in slices {
            view.slices.insert(format!("default/{}", s.name), s);
        }
        view.nodes.insert(
            "n1".into(),
            feed::Node {
                name: "n1".into(),
                zone: "zone-a".into(),
                ..Default::default()
            },
        );
        view
    }

    fn web() -> feed::Service {
        feed::Service {
            namespace: "default".into(),
            name: "web".into(),
            r#type: "ClusterIP".into(),
            cluster_ips: vec!["10.96.0.10".into()],
            ports: vec![feed::ServicePort {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 80,
                node_port: 0,
            }],
            labels: HashMap::new(),
            ..Default::default()
        }
    }

    fn endpoints(view: &View) -> Vec<String> {
        let t = translate(view, "default/web", "n1");
        t.service.expect("programmed").ports[0]
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn slices_merge_and_named_ports_differ_per_slice() {
        let v = view(
            web(),
            vec![
                slice("a", 8080, vec![ep("10.244.1.2"), ep("10.244.1.3")]),
                slice("b", 9090, vec![ep("10.244.2.2")]),
                // The same endpoint published twice counts once.
                slice("c", 8080, vec![ep("10.244.1.2")]),
            ],
        );
        assert_eq!(
            endpoints(&v),
            ["10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.2:9090"]
        );
    }

    #[test]
    fn only_ready_endpoints_then_serving_terminating_ones() {
        let mut not_ready = ep("10.244.1.3");
        not_ready.ready = false;
        not_ready.serving = false;
        let mut leaving = ep("10.244.1.4");
        (leaving.ready, leaving.terminating) = (false, true);
        let v = view(
            web(),
            vec![slice("a", 80, vec![ep("10.244.1.2"), not_ready, leaving])],
        );
        assert_eq!(endpoints(&v), ["10.244.1.2:80"]);

        let mut leaving = ep("10.244.1.4");
        (leaving.ready, leaving.terminating) = (false, true);
        let mut gone = ep("10.244.1.5");
        (gone.ready, gone.serving, gone.terminating) = (false, false, true);
        let v = view(web(), vec![slice("a", 80, vec![leaving, gone])]);
        assert_eq!(endpoints(&v), ["10.244.1.4:80"], "KEP-1669 fallback");
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
        let mut svc = web();
        svc.internal_traffic_local = true;
        let mut remote = ep("10.244.2.2");
        remote.node = "n2";
        let v = view(
            svc.clone(),
            vec![slice("a", 80, vec![ep("10.244.1.2"), remote])],
        );
        assert_eq!(endpoints(&v), ["10.244.1.2:80"]);
        let mut remote = ep("10.244.2.2");
        remote.node = "n2";
        let v = view(svc, vec![slice("a", 80, vec![remote])]);
        assert!(endpoints(&v).is_empty(), "no local endpoint: refused");
    }

    #[test]
    fn topology_hints_apply_only_when_every_ready_endpoint_has_them() {
        let hinted = |ip, zone: &'static [&'static str]| Ep {
            hints: zone,
            ..ep(ip)
        };
        let v = view(
            web(),
            vec![slice(
                "a",
                80,
                vec![
                    hinted("10.244.1.2", &["zone-a"]),
                    hinted("10.244.2.2", &["zone-b"]),
                ],
            )],
        );
        assert_eq!(endpoints(&v), ["10.244.1.2:80"]);
        let v = view(
            web(),
            vec![slice(
                "a",
                80,
                vec![hinted("10.244.1.2", &["zone-a"]), ep("10.244.2.2")],
            )],
        );
        assert_eq!(endpoints(&v), ["10.244.1.2:80", "10.244.2.2:80"]);
        let v = view(
            web(),
            vec![slice("a", 80, vec![hinted("10.244.2.2", &["zone-b"])])],
        );
        assert_eq!(endpoints(&v), ["10.244.2.2:80"], "none for this zone");
    }

    #[test]
    fn ignored_services_and_ipv6() {
        let mut external = web();
        external.r#type = "ExternalName".into();
        let mut headless = web();
        headless.cluster_ips.clear();
        let mut other = web();
        other
            .labels
            .insert(SERVICE_PROXY_NAME_LABEL.into(), "someone-else".into());
        let mut v6 = web();
        v6.cluster_ips = vec!["fd00::10".into()];
        for (svc, why) in [
            (external, Ignored::ExternalName),
            (headless, Ignored::Headless),
            (other, Ignored::OtherProxy),
            (v6, Ignored::Ipv6Only),
        ] {
            let t = translate(&view(svc, vec![]), "default/web", "n1");
            assert_eq!((t.service, t.ignored), (None, Some(why)));
        }
        let mut dual = web();
        dual.cluster_ips.push("fd00::10".into());
        let mut v6_slice = slice("b", 80, vec![]);
        v6_slice.address_type = "IPv6".into();
        let t = translate(
            &view(dual, vec![slice("a", 80, vec![ep("10.244.1.2")]), v6_slice]),
            "default/web",
            "n1",
        );
        assert_eq!(t.ipv6_skipped, 2);
        assert_eq!(t.service.unwrap().cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
    }

    #[test]
    fn external_traffic_has_its_own_policy_node_ports_and_addresses() {
        let mut svc = web();
        svc.r#type = "LoadBalancer".into();
        svc.ports[0].node_port = 30080;
        svc.external_ips = vec!["192.0.2.7".into(), "2001:db8::7".into()];
        svc.load_balancer_ips = vec!["192.0.2.9".into(), "192.0.2.7".into(), "192.0.2.9".into()];
        svc.load_balancer_source_ranges = vec!["203.0.113.0/24".into(), "2001:db8::/64".into()];
        svc.external_traffic_local = true;
        let mut remote = ep("10.244.2.2");
        remote.node = "n2";
        let v = view(
            svc.clone(),
            vec![slice("a", 8080, vec![ep("10.244.1.2"), remote])],
        );
        let t = translate(&v, "default/web", "n1").service.unwrap();
        assert_eq!(
            t.external_ips,
            ["192.0.2.7".parse::<Ipv4Addr>().unwrap()],
            "IPv4 external addresses"
        );
        assert_eq!(
            t.load_balancer_ips,
            [
                "192.0.2.7".parse::<Ipv4Addr>().unwrap(),
                "192.0.2.9".parse().unwrap()
            ],
            "load-balancer addresses, each once"
        );
        assert_eq!(
            t.load_balancer_source_ranges,
            [("203.0.113.0".parse::<Ipv4Addr>().unwrap(), 24)]
        );
        assert!(t.external_local);
        let port = &t.ports[0];
        assert_eq!(port.node_port, Some(30080));
        assert_eq!(port.endpoints.len(), 2, "cluster traffic: every endpoint");
        assert_eq!(
            port.external_endpoints(),
            ["10.244.1.2:8080".parse::<SocketAddrV4>().unwrap()],
            "traffic from outside: this node's only"
        );
        assert!(!port.drops_external());

        // No local endpoint: traffic from outside is dropped (there are endpoints elsewhere).
        let mut remote = ep("10.244.2.2");
        remote.node = "n2";
        let v = view(svc.clone(), vec![slice("a", 8080, vec![remote])]);
        let t = translate(&v, "default/web", "n1").service.unwrap();
        assert!(t.ports[0].external_endpoints().is_empty());
        assert!(t.ports[0].drops_external());

        // Cluster policy with internalTrafficPolicy Local: outside traffic still goes anywhere.
        svc.external_traffic_local = false;
        svc.internal_traffic_local = true;
        let mut remote = ep("10.244.2.2");
        remote.node = "n2";
        let v = view(svc, vec![slice("a", 8080, vec![ep("10.244.1.2"), remote])]);
        let t = translate(&v, "default/web", "n1").service.unwrap();
        assert_eq!(t.ports[0].endpoints.len(), 1);
        assert_eq!(t.ports[0].external_endpoints().len(), 2);
    }

    #[test]
    fn session_affinity_carries_its_timeout() {
        let mut svc = web();
        svc.session_affinity_timeout = 600;
        let t = translate(&view(svc, vec![]), "default/web", "n1");
        assert_eq!(
            t.service.unwrap().session_affinity,
            Some(Duration::from_secs(600))
        );
    }
}
