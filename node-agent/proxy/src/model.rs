//! The desired state every mode programs: services with their ports and ready endpoints.

use std::{net::Ipv4Addr, time::Duration};

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
    /// The port endpoints serve it on.
    pub target_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// Ready endpoints. Empty: new connections are rejected.
    pub endpoints: Vec<Ipv4Addr>,
    /// ClientIP session affinity timeout.
    pub session_affinity: Option<Duration>,
}

impl Service {
    /// kube-proxy's ServicePortName: `namespace/name:port`.
    pub fn port_name(&self, port: &ServicePort) -> String {
        format!("{}/{}:{}", self.namespace, self.name, port.name)
    }
}

/// Services, in the order they were added (the last one is last in iptables' KUBE-SERVICES).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyState {
    pub services: Vec<Service>,
}
