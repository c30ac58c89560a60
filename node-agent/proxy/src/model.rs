//! The desired state every mode programs: services with their ports, and for each port the
//! endpoints (address and port) new connections go to.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use indexmap::IndexMap;

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Where new connections to this port go: each endpoint's address with the port it serves
    /// this service port on (a named target port can differ from pod to pod). Empty: new
    /// connections are rejected.
    pub endpoints: Vec<SocketAddrV4>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// ClientIP session affinity timeout.
    pub session_affinity: Option<Duration>,
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
