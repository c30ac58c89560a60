//! The control plane's in-process client, shared by the controllers and the node feed:
//! [`informer`]s keep caches of every kind from one store watch each, [`client::Client`] reads
//! from them and writes through the API server's registry (applying its own writes to the
//! caches at once), [`queue`] is the deduplicating, rate-limited work queue reconcile loops run
//! on, and [`util`] holds object helpers (owner references, conditions, readiness, selectors).

pub mod client;
pub mod informer;
pub mod queue;
pub mod util;

/// The namespace of node heartbeat leases (`kube-node-lease`, as in Kubernetes).
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
