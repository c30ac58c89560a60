//! The EndpointSlice controller (and the v1 Endpoints beside it): for every service with a
//! selector, the pods it selects that have an IP become endpoints with `ready` / `serving` /
//! `terminating` conditions, their node and zone, grouped by the ports they resolve to (a
//! named targetPort can differ per pod), packed at most 100 per slice.
//!
//! Packing keeps churn low, as kube's reconciler does: an endpoint stays in the slice that
//! holds it; new endpoints fill slices that change anyway, then slices with room, then new
//! slices; emptied slices are deleted, and a service without endpoints keeps one empty slice.

use std::{collections::BTreeMap, sync::Arc};

use control_plane_apiserver::{error::ApiError, registry::DeleteParams};
use k8s_openapi::{
    api::{
        core::v1::{
            EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, Node,
            ObjectReference, Pod, Service,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::{
    client::Client,
    informer::{Informer, key_of},
    queue::{Next, Queue, run_workers},
    util::{controlled_by, controller_ref, map_selects, pod_finished, pod_ready},
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A port list as a sortable key: (name, protocol, port) of each.
pub type PortsKey = Vec<(String, String, i32)>;

/// Endpoints grouped by the port list they resolve to.
pub type Desired = BTreeMap<PortsKey, (Vec<EndpointPort>, Vec<Endpoint>)>;

/// The slices to write for one service.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub create: Vec<EndpointSlice>,
    pub update: Vec<EndpointSlice>,
    pub delete: Vec<String>,
}

fn ports_key(ports: &[EndpointPort]) -> PortsKey {
    let mut key: PortsKey = ports
        .iter()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.port.unwrap_or(0),
            )
        })
        .collect();
    key.sort();
    key
}

fn address(e: &Endpoint) -> &str {
    e.addresses.first().map(String::as_str).unwrap_or("")
}

/// Plans the slices for `desired` (endpoints grouped by their port list) given the
/// `existing` slices; new slices start from `template` (name prefix, labels, owner).
pub fn plan(
    existing: &[EndpointSlice],
    desired: &Desired,
    template: &EndpointSlice,
    max: usize,
) -> Plan {
    let mut plan = Plan::default();
    let mut kept: Vec<EndpointSlice> = Vec::new();
    let total: usize = desired.values().map(|(_, e)| e.len()).sum();
    for (key, (ports, endpoints)) in desired {
        let mut pool: BTreeMap<&str, &Endpoint> =
            endpoints.iter().map(|e| (address(e), e)).collect();
        let mut slices: Vec<(EndpointSlice, bool)> = Vec::new();
        for slice in existing
            .iter()
            .filter(|s| ports_key(s.ports.as_deref().unwrap_or_default()) == *key)
        {
            let before = slice.endpoints.clone().unwrap_or_default();
            let after: Vec<Endpoint> = before
                .iter()
                .filter_map(|e| pool.remove(address(e)).cloned())
                .collect();
            let changed = after != before;
            let mut s = slice.clone();
            s.endpoints = Some(after);
            slices.push((s, changed));
        }
        // Fill slices that change anyway first, then any with room.
        slices.sort_by_key(|(_, changed)| !changed);
        let mut rest: Vec<&Endpoint> = pool.into_values().collect();
        for (slice, changed) in slices.iter_mut() {
            let eps = slice.endpoints.get_or_insert_with(Vec::new);
            while eps.len() < max && !rest.is_empty() {
                eps.push(rest.remove(0).clone());
                *changed = true;
            }
        }
        for (slice, changed) in slices {
            if slice.endpoints.as_ref().is_none_or(Vec::is_empty) {
                plan.delete
                    .push(slice.metadata.name.clone().unwrap_or_default());
            } else {
                if changed {
                    plan.update.push(slice.clone());
                }
                kept.push(slice);
            }
        }
        for chunk in rest.chunks(max) {
            let mut s = template.clone();
            s.ports = Some(ports.clone());
            s.endpoints = Some(chunk.iter().map(|e| (*e).clone()).collect());
            plan.create.push(s);
        }
    }
    // Slices for port lists no longer wanted.
    for slice in existing {
        let key = ports_key(slice.ports.as_deref().unwrap_or_default());
        if !desired.contains_key(&key) {
            plan.delete
                .push(slice.metadata.name.clone().unwrap_or_default());
        }
    }
    // A service without endpoints keeps one empty slice (kube's placeholder).
    if total == 0 {
        let empty = |s: &EndpointSlice| {
            s.endpoints.as_ref().is_none_or(Vec::is_empty)
                && s.ports.as_ref().is_none_or(Vec::is_empty)
        };
        match existing.iter().find(|s| empty(s)) {
            Some(placeholder) => plan
                .delete
                .retain(|n| Some(n) != placeholder.metadata.name.as_ref()),
            None => {
                let mut s = template.clone();
                s.ports = Some(Vec::new());
                s.endpoints = Some(Vec::new());
                plan.create.push(s);
            }
        }
    }
    plan.delete.sort();
    plan.delete.dedup();
    plan
}

pub struct EndpointSliceController {
    client: Client,
    services: Arc<Informer<Service>>,
    pods: Arc<Informer<Pod>>,
    slices: Arc<Informer<EndpointSlice>>,
    endpoints: Arc<Informer<Endpoints>>,
    nodes: Arc<Informer<Node>>,
}

impl EndpointSliceController {
    pub fn start(client: Client, workers: usize) {
        let services = client.informers.get::<Service>();
        let pods = client.informers.get::<Pod>();
        let slices = client.informers.get::<EndpointSlice>();
        let endpoints = client.informers.get::<Endpoints>();
        let nodes = client.informers.get::<Node>();
        let queue: Arc<Queue<String>> = Queue::new();
        let q = queue.clone();
        services.on_change(move |c| q.add(key_of(&c.object().metadata)));
        let (q, svcs) = (queue.clone(), services.clone());
        pods.on_change(move |c| {
            let pod = c.object();
            let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
            for svc in svcs.list_namespace(ns) {
                let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
                    continue;
                };
                if [&c.old, &c.new]
                    .into_iter()
                    .flatten()
                    .any(|p| map_selects(selector, p.metadata.labels.as_ref()))
                {
                    q.add(key_of(&svc.metadata));
                }
            }
        });
        let q = queue.clone();
        slices.on_change(move |c| {
            let s = c.object();
            let labels = s.metadata.labels.as_ref();
            if labels
                .and_then(|l| l.get(MANAGED_BY_LABEL))
                .map(String::as_str)
                == Some(MANAGED_BY)
                && let Some(svc) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL))
            {
                let ns = s.metadata.namespace.as_deref().unwrap_or_default();
                q.add(format!("{ns}/{svc}"));
            }
        });
        let controller = Arc::new(Self {
            client,
            services,
            pods,
            slices,
            endpoints,
            nodes,
        });
        let informers = controller.client.informers.clone();
        run_workers("endpointslice", queue, workers, informers, move |key| {
            let c = controller.clone();
            async move { c.reconcile(&key).await }
        });
    }

    fn zone(&self, node: &str) -> Option<String> {
        self.nodes
            .get(node)?
            .metadata
            .labels
            .as_ref()?
            .get(ZONE_LABEL)
            .cloned()
    }

    /// The endpoints of `svc`, grouped by the ports they resolve to.
    fn desired(&self, svc: &Service) -> Desired {
        let spec = svc.spec.clone().unwrap_or_default();
        let selector = spec.selector.clone().unwrap_or_default();
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let publish = spec.publish_not_ready_addresses == Some(true);
        let mut out: BTreeMap<_, (Vec<EndpointPort>, Vec<Endpoint>)> = BTreeMap::new();
        for pod in self.pods.list_namespace(&ns) {
            if !map_selects(&selector, pod.metadata.labels.as_ref()) || pod_finished(&pod) {
                continue;
            }
            let Some(ip) = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty())
            else {
                continue;
            };
            let ports: Vec<EndpointPort> = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|sp| {
                    let port = match &sp.target_port {
                        None => sp.port,
                        Some(IntOrString::Int(n)) => *n,
                        Some(IntOrString::String(name)) => {
                            pod.spec
                                .as_ref()?
                                .containers
                                .iter()
                                .flat_map(|c| c.ports.iter().flatten())
                                .find(|p| p.name.as_deref() == Some(name.as_str()))?
                                .container_port
                        }
                    };
                    Some(EndpointPort {
                        name: Some(sp.name.clone().unwrap_or_default()),
                        port: Some(port),
                        protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                        app_protocol: sp.app_protocol.clone(),
                    })
                })
                .collect();
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let ready = pod_ready(&pod) || publish;
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let endpoint = Endpoint {
                addresses: vec![ip],
                conditions: Some(EndpointConditions {
                    ready: Some(ready && !terminating),
                    serving: Some(ready),
                    terminating: Some(terminating),
                }),
                zone: node.as_deref().and_then(|n| self.zone(n)),
                node_name: node,
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: Some(ns.clone()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let entry = out
                .entry(ports_key(&ports))
                .or_insert_with(|| (ports, Vec::new()));
            entry.1.push(endpoint);
        }
        for (_, endpoints) in out.values_mut() {
            endpoints.sort_by(|a, b| address(a).cmp(address(b)));
        }
        out
    }

    async fn reconcile(&self, key: &str) -> Result<Next, ApiError> {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        let Some(svc) = self.services.get(key) else {
            // Slices go with their owner (garbage collection); Endpoints are ours to remove.
            if self.endpoints.get(key).is_some() {
                self.client
                    .delete::<Endpoints>(Some(ns), name, &DeleteParams::default())
                    .await?;
            }
            return Ok(Next::Done);
        };
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.selector.as_ref().is_none_or(BTreeMap::is_empty)
            || spec.type_.as_deref() == Some("ExternalName")
            || svc.metadata.deletion_timestamp.is_some()
        {
            return Ok(Next::Done);
        }
        let desired = self.desired(&svc);
        let mut existing = Vec::new();
        for slice in self.slices.list_namespace(ns) {
            let labels = slice.metadata.labels.as_ref();
            if labels
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str)
                != Some(name)
                || labels
                    .and_then(|l| l.get(MANAGED_BY_LABEL))
                    .map(String::as_str)
                    != Some(MANAGED_BY)
            {
                continue;
            }
            if controlled_by(&slice.metadata, &*svc) {
                existing.push((*slice).clone());
            } else {
                // Left by an earlier service of the same name.
                self.client
                    .delete::<EndpointSlice>(
                        Some(ns),
                        slice.metadata.name.as_deref().unwrap_or_default(),
                        &DeleteParams::default(),
                    )
                    .await?;
            }
        }
        let mut labels: BTreeMap<String, String> = svc.metadata.labels.clone().unwrap_or_default();
        labels.insert(SERVICE_NAME_LABEL.into(), name.into());
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        let template = EndpointSlice {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}-")),
                namespace: Some(ns.to_owned()),
                labels: Some(labels),
                owner_references: Some(vec![controller_ref(&*svc)]),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: None,
            ports: None,
        };
        let plan = plan(&existing, &desired, &template, MAX_ENDPOINTS_PER_SLICE);
        for slice in &plan.update {
            self.client.replace(slice, false).await?;
        }
        for slice in &plan.create {
            self.client.create(slice).await?;
        }
        for name in &plan.delete {
            self.client
                .delete::<EndpointSlice>(Some(ns), name, &DeleteParams::default())
                .await?;
        }
        self.sync_endpoints(&svc, &desired).await?;
        Ok(Next::Done)
    }

    /// The v1 Endpoints of the service: ready addresses, and not-ready ones that are not
    /// terminating, per port group.
    async fn sync_endpoints(&self, svc: &Service, desired: &Desired) -> Result<(), ApiError> {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let subsets: Vec<EndpointSubset> = desired
            .values()
            .filter(|(_, eps)| !eps.is_empty())
            .map(|(ports, eps)| {
                let addr = |e: &Endpoint| EndpointAddress {
                    ip: address(e).to_owned(),
                    node_name: e.node_name.clone(),
                    target_ref: e.target_ref.clone(),
                    hostname: None,
                };
                let cond = |e: &Endpoint| e.conditions.clone().unwrap_or_default();
                let ready: Vec<EndpointAddress> = eps
                    .iter()
                    .filter(|e| cond(e).ready == Some(true))
                    .map(addr)
                    .collect();
                let not_ready: Vec<EndpointAddress> = eps
                    .iter()
                    .filter(|e| cond(e).ready != Some(true) && cond(e).terminating != Some(true))
                    .map(addr)
                    .collect();
                EndpointSubset {
                    addresses: (!ready.is_empty()).then_some(ready),
                    not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                    ports: Some(
                        ports
                            .iter()
                            .map(|p| CorePort {
                                name: p.name.clone().filter(|n| !n.is_empty()),
                                port: p.port.unwrap_or(0),
                                protocol: p.protocol.clone(),
                                app_protocol: p.app_protocol.clone(),
                            })
                            .collect(),
                    ),
                }
            })
            .filter(|s| s.addresses.is_some() || s.not_ready_addresses.is_some())
            .collect();
        let subsets = (!subsets.is_empty()).then_some(subsets);
        match self.endpoints.get(&format!("{ns}/{name}")) {
            Some(current) if current.subsets == subsets => Ok(()),
            Some(_) => self
                .client
                .update::<Endpoints>(Some(&ns), &name, false, |e| {
                    if e.subsets == subsets {
                        return false;
                    }
                    e.subsets = subsets.clone();
                    true
                })
                .await
                .map(drop),
            None => {
                let endpoints = Endpoints {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.clone()),
                        labels: svc.metadata.labels.clone(),
                        ..Default::default()
                    },
                    subsets,
                };
                match self.client.create(&endpoints).await {
                    Err(e) if e.reason == "AlreadyExists" => Err(e), // the cache lags: retry
                    other => other.map(drop),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Default::default()
        }
    }

    fn port(p: i32) -> Vec<EndpointPort> {
        vec![EndpointPort {
            name: Some(String::new()),
            port: Some(p),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]
    }

    fn want(p: i32, ips: &[String]) -> Desired {
        let ports = port(p);
        [(
            ports_key(&ports),
            (ports, ips.iter().map(|i| ep(i)).collect()),
        )]
        .into_iter()
        .collect()
    }

    fn slice(name: &str, p: i32, ips: &[String]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(port(p)),
            endpoints: Some(ips.iter().map(|i| ep(i)).collect()),
        }
    }

    fn ips(range: std::ops::Range<u32>) -> Vec<String> {
        range
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1))
            .collect()
    }

    #[test]
    fn slices_hold_at_most_the_maximum() {
        let plan = plan(&[], &want(80, &ips(0..250)), &EndpointSlice::default(), 100);
        let sizes: Vec<usize> = plan
            .create
            .iter()
            .map(|s| s.endpoints.as_ref().unwrap().len())
            .collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        assert!(plan.update.is_empty() && plan.delete.is_empty());
    }

    #[test]
    fn one_changed_endpoint_rewrites_one_slice() {
        let all = ips(0..150);
        let existing = [slice("a", 80, &all[..100]), slice("b", 80, &all[100..])];
        let mut desired = want(80, &all);
        desired.values_mut().next().unwrap().1[120]
            .conditions
            .as_mut()
            .unwrap()
            .ready = Some(false);
        let plan = plan(&existing, &desired, &EndpointSlice::default(), 100);
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        assert_eq!(plan.update.len(), 1);
        assert_eq!(plan.update[0].metadata.name.as_deref(), Some("b"));
    }

    #[test]
    fn emptied_slices_go_and_new_endpoints_fill_slices_that_change_anyway() {
        let all = ips(0..160);
        let existing = [
            slice("a", 80, &all[..100]),
            slice("b", 80, &all[100..110]),
            slice("c", 80, &all[110..120]),
        ];
        // c's endpoints leave: c goes, nothing else is written.
        let gone = plan(
            &existing,
            &want(80, &all[..110]),
            &EndpointSlice::default(),
            100,
        );
        assert_eq!(gone.delete, vec!["c".to_owned()]);
        assert!(gone.create.is_empty() && gone.update.is_empty());
        // ...while 40 new ones arrive: they go to c, which is rewritten anyway.
        let mut wanted: Vec<String> = all[..110].to_vec();
        wanted.extend(all[120..160].iter().cloned());
        let refill = plan(
            &existing,
            &want(80, &wanted),
            &EndpointSlice::default(),
            100,
        );
        assert!(refill.create.is_empty() && refill.delete.is_empty());
        assert_eq!(refill.update.len(), 1);
        assert_eq!(refill.update[0].metadata.name.as_deref(), Some("c"));
        assert_eq!(refill.update[0].endpoints.as_ref().unwrap().len(), 40);
    }

    #[test]
    fn a_service_without_endpoints_keeps_one_empty_slice_and_port_changes_move_endpoints() {
        let plan_empty = plan(
            &[slice("a", 80, &ips(0..3))],
            &BTreeMap::new(),
            &EndpointSlice::default(),
            100,
        );
        assert_eq!(plan_empty.delete, vec!["a".to_owned()]);
        assert_eq!(plan_empty.create.len(), 1);
        assert!(plan_empty.create[0].endpoints.as_ref().unwrap().is_empty());

        let moved = plan(
            &[slice("a", 80, &ips(0..3))],
            &want(8080, &ips(0..3)),
            &EndpointSlice::default(),
            100,
        );
        assert_eq!(moved.delete, vec!["a".to_owned()]);
        assert_eq!(moved.create.len(), 1);
        assert_eq!(moved.create[0].ports.as_ref().unwrap()[0].port, Some(8080));
    }
}
