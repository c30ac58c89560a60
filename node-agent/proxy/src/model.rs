//! The desired state every mode programs: services with their ports, and for each port the
//! endpoints (address and port) new connections go to, from pods and from outside the cluster
//! (NodePorts, ExternalIPs and LoadBalancer IPs).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use indexmap::IndexMap;

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// Lower case, as iptables, nftables and kube-proxy's chain hashes spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Where new connections to this port go: each endpoint's address with the port it serves
    /// this service port on (a named target port can differ from pod to pod). Empty: new
    /// connections are rejected.
    pub endpoints: Vec<SocketAddrV4>,
    /// The port every node answers on for this service port (NodePort and LoadBalancer
    /// services).
    pub node_port: Option<u16>,
    /// Where new connections from outside the cluster go, when not to `endpoints`
    /// (`externalTrafficPolicy: Local`: this node's endpoints only, possibly none).
    pub external_endpoints: Option<Vec<SocketAddrV4>>,
}

impl ServicePort {
    /// Where new connections from outside the cluster go.
    pub fn external_endpoints(&self) -> &[SocketAddrV4] {
        self.external_endpoints
            .as_deref()
            .unwrap_or(&self.endpoints)
    }

    /// Whether traffic from outside has no endpoint here while the service has some elsewhere
    /// (kube-proxy drops it then, where no endpoint at all rejects it).
    pub fn drops_external(&self) -> bool {
        self.external_endpoints().is_empty() && !self.endpoints.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// ClientIP session affinity timeout.
    pub session_affinity: Option<Duration>,
    /// ExternalIPs: the service's ports answer on these too, for clients outside the cluster.
    pub external_ips: Vec<Ipv4Addr>,
    /// LoadBalancer ingress IPs: the same, for the clients of `load_balancer_source_ranges`.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// The client prefixes LoadBalancer IPs accept (empty: any).
    pub load_balancer_source_ranges: Vec<(Ipv4Addr, u8)>,
    /// `externalTrafficPolicy: Local`: traffic from outside keeps its client's address and
    /// goes to this node's endpoints only. Otherwise (`Cluster`) it goes to any endpoint, and
    /// leaves from the node's address towards other nodes' (so replies come back).
    pub external_local: bool,
    /// Where the node answers a load balancer's health check (with `external_local`).
    pub health_check_node_port: Option<u16>,
}

impl Default for Service {
    fn default() -> Self {
        Self {
            namespace: String::new(),
            name: String::new(),
            cluster_ip: Ipv4Addr::UNSPECIFIED,
            ports: Vec::new(),
            session_affinity: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            external_local: false,
            health_check_node_port: None,
        }
    }
}

impl Service {
    /// `namespace/name`, the service's key in a [`ProxyState`].
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// kube-proxy's ServicePortName: `namespace/name:port`.
    pub fn port_name(&self, port: &ServicePort) -> String {
        format!("{}/{}:{}", self.namespace, self.name, port.name)
    }
}

/// Services by `namespace/name`, in the order they were added (the last one is last in
/// iptables' KUBE-SERVICES).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyState {
    pub services: IndexMap<String, Service>,
}

impl ProxyState {
    /// Adds or replaces a service (a replaced one keeps its place).
    pub fn insert(&mut self, service: Service) -> Option<Service> {
        self.services.insert(service.key(), service)
    }

    /// Removes a service by `namespace/name`.
    pub fn remove(&mut self, key: &str) -> Option<Service> {
        self.services.shift_remove(key)
    }
}

impl FromIterator<Service> for ProxyState {
    fn from_iter<I: IntoIterator<Item = Service>>(services: I) -> Self {
        let mut state = Self::default();
        for service in services {
            state.insert(service);
        }
        state
    }
}
