//! The control loops of the control plane (kube-controller-manager's and kube-scheduler's jobs),
//! running in the control-plane process on shared informers and writing through the API
//! server's registry (see [`client`]): the scheduler, the Deployment, ReplicaSet and
//! EndpointSlice controllers, node IPAM and lifecycle (taint-based eviction and pod GC too),
//! namespace deletion, garbage collection,
//! the repair of ClusterIP and NodePort allocations, and LoadBalancer addresses from a pool. All are level-triggered: each
//! reconciles one object from the cache's current state, however many events led there.

pub mod aggregation;
pub mod deployment;
pub mod endpointslice;
pub mod events;
pub mod gc;
pub mod leader;
pub mod loadbalancer;
pub mod namespace;
pub mod nodes;
pub mod podgc;
pub mod quantity;
pub mod repair;
pub mod replicaset;
pub mod scheduler;
pub mod serviceaccount;

pub use control_plane_client::{client, informer, queue, util};

use std::{sync::Arc, time::Duration};

use control_plane_apiserver::registry::Registry;
use control_plane_store::AnyStore;

/// How the loops are set up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pod CIDRs for nodes are cut from this range...
    pub cluster_cidr: String,
    /// ...in blocks of this prefix length.
    pub node_cidr_mask_size: u8,
    /// A node whose lease is older than this turns NotReady; a pod bound to a node gone for
    /// this long is deleted.
    pub node_monitor_grace_period: Duration,
    /// How long a pod without a toleration of its node's `unreachable` taint stays on it.
    pub default_unreachable_toleration: Duration,
    /// How often the ClusterIP/NodePort allocations are checked against the services.
    pub repair_interval: Duration,
    /// Addresses LoadBalancer services get (none: they stay pending).
    pub load_balancer_pool: Vec<ipnet::Ipv4Net>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            cluster_cidr: "10.244.0.0/16".into(),
            node_cidr_mask_size: 24,
            node_monitor_grace_period: Duration::from_secs(40),
            default_unreachable_toleration: Duration::from_secs(300),
            repair_interval: Duration::from_secs(180),
            load_balancer_pool: Vec::new(),
        }
    }
}

/// Starts every loop and the informers they share; returns the client they use.
pub fn start(
    registry: Arc<Registry<AnyStore>>,
    settings: &Settings,
) -> anyhow::Result<client::Client> {
    let cidrs = nodes::PodCidrs::new(&settings.cluster_cidr, settings.node_cidr_mask_size)
        .map_err(anyhow::Error::msg)?;
    let informers = Arc::new(informer::Informers::default());
    let client = client::Client::new(registry.clone(), informers.clone());
    scheduler::Scheduler::start(client.clone());
    replicaset::ReplicaSetController::start(client.clone(), 2);
    deployment::DeploymentController::start(client.clone(), 2);
    endpointslice::EndpointSliceController::start(client.clone(), 2);
    nodes::start_ipam(client.clone(), cidrs);
    nodes::Lifecycle::start(
        client.clone(),
        settings.node_monitor_grace_period,
        settings.default_unreachable_toleration,
    );
    podgc::start_pod_gc(client.clone(), settings.node_monitor_grace_period);
    namespace::start(client.clone());
    serviceaccount::start(client.clone());
    aggregation::start(client.clone());
    gc::GarbageCollector::start(client.clone());
    repair::start(client.clone(), settings.repair_interval);
    loadbalancer::LoadBalancerController::start(
        client.clone(),
        settings.load_balancer_pool.clone(),
    );
    informers.start(registry.store.clone());
    Ok(client)
}

/// A client for the feed without any loop (`--disable-controllers`).
pub fn client_only(registry: Arc<Registry<AnyStore>>) -> client::Client {
    let informers = Arc::new(informer::Informers::default());
    let client = client::Client::new(registry.clone(), informers.clone());
    informers.start(registry.store.clone());
    client
}
