//! A node with a client pod and backend pods, each a network namespace:
//!
//! ```text
//!   client ns               node ns (ip_forward)                backend ns i
//!   eth0 10.244.0.2 ── veth ── cli0 10.244.0.1                                
//!                              be<i> 10.244.<i>.1 ── veth ── eth0 10.244.<i>.2 (echo server)
//! ```
//!
//! The data plane attaches to `cli0`, the host side of the client's veth, as it would to a pod
//! of a real node. Service addresses lead nowhere (the node's default route is a dummy uplink):
//! only a proxy makes them work.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};

use crate::{
    echo::EchoServer,
    netns::{Netns, veth},
};

/// The host side of the client's veth, where the data plane attaches.
pub const CLIENT_HOST_IF: &str = "cli0";
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// Port every backend serves TCP and UDP on.
pub const BACKEND_PORT: u16 = 8080;

pub struct LabBackend {
    pub name: String,
    pub addr: SocketAddrV4,
    pub ns: Netns,
    server: Option<EchoServer>,
}

impl LabBackend {
    /// Stops the backend's servers (connections to it are then refused).
    pub fn stop(&mut self) {
        self.server = None;
    }
}

pub struct Lab {
    pub node: Netns,
    pub client: Netns,
    /// The node's uplink peer.
    pub wan: Netns,
    pub backends: Vec<LabBackend>,
}

impl Lab {
    /// Builds the topology with `backends` backends and no servers; namespaces are named
    /// `<prefix>-node`, `<prefix>-client`, `<prefix>-wan`, `<prefix>-b<i>`, so concurrent labs need
    /// distinct prefixes.
    pub fn bare(prefix: &str, backends: u8) -> Result<Self> {
        let node = Netns::new(&format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        // An uplink with the default route, as a real node has: traffic to a service address
        // that no proxy translated is forwarded (where kube-proxy's filter rules meet it), not
        // refused by routing. The far end is a namespace that forwards nothing.
        let wan = Netns::new(&format!("{prefix}-wan"))?;
        veth(&node, "uplink0", &wan, "eth0")?;
        node.ip(&["addr", "add", "192.168.255.1/30", "dev", "uplink0"])?;
        wan.ip(&["addr", "add", "192.168.255.2/30", "dev", "eth0"])?;
        node.ip(&["route", "add", "default", "via", "192.168.255.2"])?;
        let client = Netns::new(&format!("{prefix}-client"))?;
        veth(&node, CLIENT_HOST_IF, &client, "eth0")?;
        node.ip(&["addr", "add", "10.244.0.1/24", "dev", CLIENT_HOST_IF])?;
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"])?;
        client.ip(&["route", "add", "default", "via", "10.244.0.1"])?;
        let mut lab = Self {
            node,
            client,
            wan,
            backends: Vec::new(),
        };
        for i in 1..=backends {
            let ns = Netns::new(&format!("{prefix}-b{i}"))?;
            let host_if = format!("be{i}");
            veth(&lab.node, &host_if, &ns, "eth0")?;
            lab.node
                .ip(&["addr", "add", &format!("10.244.{i}.1/24"), "dev", &host_if])?;
            ns.ip(&["addr", "add", &format!("10.244.{i}.2/24"), "dev", "eth0"])?;
            ns.ip(&["route", "add", "default", "via", &format!("10.244.{i}.1")])?;
            let addr = SocketAddrV4::new(Ipv4Addr::new(10, 244, i, 2), BACKEND_PORT);
            let name = format!("backend-{i}");
            lab.backends.push(LabBackend {
                name,
                addr,
                ns,
                server: None,
            });
        }
        Ok(lab)
    }

    /// The topology with an echo server (TCP and UDP, answering with its name) on every
    /// backend.
    pub fn new(prefix: &str, backends: u8) -> Result<Self> {
        let mut lab = Self::bare(prefix, backends)?;
        for backend in &mut lab.backends {
            let (addr, name) = (backend.addr, backend.name.clone());
            let server = backend
                .ns
                .run(move || EchoServer::start(addr, &name))?
                .with_context(|| format!("start {}", backend.name))?;
            backend.server = Some(server);
        }
        Ok(lab)
    }

    /// Gives the client `count` more addresses (10.244.0.10 on), to spread connections over
    /// more source addresses; returns all of the client's addresses.
    pub fn add_client_addrs(&self, count: u8) -> Result<Vec<Ipv4Addr>> {
        let mut addrs = vec![CLIENT_ADDR];
        for i in 0..count {
            let addr = Ipv4Addr::new(10, 244, 0, 10 + i);
            self.client
                .ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            addrs.push(addr);
        }
        Ok(addrs)
    }

    pub fn backend_addrs(&self) -> Vec<SocketAddrV4> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    /// The backend's name for its address.
    pub fn backend_name(&self, addr: SocketAddrV4) -> Option<&str> {
        self.backends
            .iter()
            .find(|b| b.addr == addr)
            .map(|b| b.name.as_str())
    }
}
