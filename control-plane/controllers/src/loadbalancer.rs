//! LoadBalancer addresses for clusters without a cloud, as MetalLB gives them on bare metal: a
//! service of type LoadBalancer (without `spec.loadBalancerClass`, which names another
//! implementation) gets an address of the pool (`--load-balancer-ips`) in
//! `status.loadBalancer.ingress`: the one `spec.loadBalancerIP` asks for when it is in the pool
//! and free, the first free one otherwise. Node agents then serve it on every node, and the
//! network sends it to any of them (in the lab, a route; in a real network, BGP or ARP
//! announcements, which this controller does not make).
//!
//! Which addresses are taken is read from the services themselves, so there is no allocation
//! state to lose or repair. A service that stops being a LoadBalancer gives its address back.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc, time::Duration};

use control_plane_apiserver::error::ApiError;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service};

use crate::{
    client::Client,
    events::{Kind, Recorder},
    informer::{Informer, key_of},
    queue::{Next, Queue, run_workers},
};

pub struct LoadBalancerController {
    client: Client,
    services: Arc<Informer<Service>>,
    pool: Vec<Ipv4Net>,
    recorder: Recorder,
}

/// The IPv4 addresses of a service's load-balancer status.
fn ingress_ips(svc: &Service) -> Vec<Ipv4Addr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

impl LoadBalancerController {
    /// Starts the controller; without a pool it does nothing (services stay `<pending>`, as
    /// in a cluster without a load-balancer implementation).
    pub fn start(client: Client, pool: Vec<Ipv4Net>) {
        if pool.is_empty() {
            return;
        }
        let services = client.informers.get::<Service>();
        let queue: Arc<Queue<String>> = Queue::new();
        let q = queue.clone();
        services.on_change(move |c| q.add(key_of(&c.object().metadata)));
        let controller = Arc::new(Self {
            recorder: Recorder::new(client.clone(), "load-balancer-controller"),
            client,
            services,
            pool,
        });
        // One worker: two services can never be handed the same free address at once.
        let informers = controller.client.informers.clone();
        run_workers("load-balancer", queue, 1, informers, move |key| {
            let c = controller.clone();
            async move { c.reconcile(&key).await }
        });
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.pool.iter().any(|net| net.contains(&ip))
    }

    /// The pool's addresses, in order (a /31 or /32 block is used whole; larger ones without
    /// their network and broadcast addresses).
    fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.pool.iter().flat_map(|net| {
            let all: Box<dyn Iterator<Item = Ipv4Addr>> = if net.prefix_len() >= 31 {
                Box::new(net.hosts().chain(std::iter::once(net.addr())))
            } else {
                Box::new(net.hosts())
            };
            all
        })
    }

    async fn reconcile(&self, key: &str) -> Result<Next, ApiError> {
        let Some(svc) = self.services.get(key) else {
            return Ok(Next::Done);
        };
        let spec = svc.spec.clone().unwrap_or_default();
        let ours = spec.type_.as_deref() == Some("LoadBalancer")
            && spec.load_balancer_class.is_none()
            && svc.metadata.deletion_timestamp.is_none();
        let current: Vec<Ipv4Addr> = ingress_ips(&svc)
            .into_iter()
            .filter(|ip| self.in_pool(*ip))
            .collect();
        let ns = svc.metadata.namespace.clone();
        let name = svc.metadata.name.clone().unwrap_or_default();
        if !ours {
            if !current.is_empty() {
                self.set_ingress(ns.as_deref(), &name, None).await?;
            }
            return Ok(Next::Done);
        }
        let taken: BTreeSet<Ipv4Addr> = self
            .services
            .list()
            .iter()
            .filter(|other| key_of(&other.metadata) != key)
            .flat_map(|other| ingress_ips(other))
            .collect();
        let requested: Option<Ipv4Addr> = spec
            .load_balancer_ip
            .as_deref()
            .filter(|ip| !ip.is_empty())
            .and_then(|ip| ip.parse().ok());
        // Kept while it is what was asked for (or nothing was) and nobody else holds it.
        if let Some(ip) = current.first()
            && requested.is_none_or(|r| r == *ip)
            && !taken.contains(ip)
        {
            return Ok(Next::Done);
        }
        let chosen = match requested {
            Some(ip) if self.in_pool(ip) && !taken.contains(&ip) => Some(ip),
            Some(ip) => {
                self.recorder.record(
                    &*svc,
                    Kind::Warning,
                    "AllocationFailed",
                    format!(
                        "loadBalancerIP {ip} is not free in the pool {:?}",
                        self.pool
                    ),
                );
                return Ok(Next::After(Duration::from_secs(30)));
            }
            None => self.addresses().find(|ip| !taken.contains(ip)),
        };
        let Some(ip) = chosen else {
            self.recorder.record(
                &*svc,
                Kind::Warning,
                "AllocationFailed",
                format!("no address left in the pool {:?}", self.pool),
            );
            return Ok(Next::After(Duration::from_secs(30)));
        };
        self.set_ingress(ns.as_deref(), &name, Some(ip)).await?;
        self.recorder.record(
            &*svc,
            Kind::Normal,
            "IPAllocated",
            format!("Assigned IP [\"{ip}\"]"),
        );
        Ok(Next::Done)
    }

    async fn set_ingress(
        &self,
        ns: Option<&str>,
        name: &str,
        ip: Option<Ipv4Addr>,
    ) -> Result<(), ApiError> {
        let status = LoadBalancerStatus {
            ingress: ip.map(|ip| {
                vec![LoadBalancerIngress {
                    ip: Some(ip.to_string()),
                    ip_mode: Some("VIP".into()),
                    ..Default::default()
                }]
            }),
        };
        self.client
            .update::<Service>(ns, name, true, |s| {
                let current = s.status.get_or_insert_with(Default::default);
                if current.load_balancer.as_ref() == Some(&status) {
                    return false;
                }
                current.load_balancer = Some(status.clone());
                true
            })
            .await
            .map(drop)
    }
}
