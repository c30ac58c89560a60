//! The eBPF mode: services become `ebpf-dataplane` frontends (one per service port), endpoints
//! become backends. One map update per changed service port; an update touches only the
//! services that changed. Pod veths get the tc programs; network namespaces enabled for
//! socket-level load balancing have their sockets' connects translated once, by the cgroup
//! hooks, instead of every packet.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddrV4,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result};
use ebpf_dataplane::{
    Config, Dataplane, DesiredService, Frontend, NodeSettings, Reach, Remote, Scheduler,
    ServiceSpec,
};

use crate::{
    KernelUsage, LbMode, Mode, Proxier, ProxyConfig, ProxyState, SyncReport,
    model::{Protocol, Service},
};

pub struct EbpfProxier {
    dataplane: Dataplane,
    interfaces: Vec<String>,
    /// The frontends written for each service (`namespace/name`), so an update can remove the
    /// ports a service no longer has.
    frontends: HashMap<String, Vec<Frontend>>,
    /// Whether the socket hooks are attached.
    socket_lb: bool,
    /// The cookies of the namespaces enabled for socket-level load balancing, by path.
    netns: HashMap<PathBuf, u64>,
    /// The node's interfaces `from_outside` is attached to.
    external: BTreeSet<String>,
    external_maglev: Option<u32>,
    lb_mode: LbMode,
    xdp: ebpf_dataplane::XdpAcceleration,
}

impl EbpfProxier {
    pub fn new(config: &ProxyConfig) -> Result<Self> {
        let mut dataplane = Dataplane::open(&Config {
            allow_state_loss: config.allow_flow_loss,
            ..Config::with_pin_dir(&config.pin_dir)
        })
        .context("open the eBPF data plane")?;
        for m in dataplane.migrations() {
            tracing::info!(
                from = %m.from.display(),
                services = m.services,
                entries = m.entries,
                skipped = ?m.skipped,
                "moved the data plane's state from maps of an earlier layout or size"
            );
        }
        for iface in &config.interfaces {
            dataplane
                .attach(iface, &[])
                .with_context(|| format!("attach to {iface}"))?;
        }
        let socket_lb = config.socket_lb || config.host_socket_lb || !config.pod_netns.is_empty();
        if socket_lb {
            let cgroup = match &config.socket_cgroup {
                Some(cgroup) => cgroup.clone(),
                None => cgroup2_root()?,
            };
            dataplane
                .attach_cgroup(&cgroup)
                .with_context(|| format!("attach the socket hooks to {}", cgroup.display()))?;
        }
        if config.host_socket_lb {
            let cookie = ebpf_dataplane::netns_cookie()
                .context("the cookie of the agent's own network namespace")?;
            dataplane.enable_socket_lb(cookie)?;
        }
        let mut proxier = Self {
            dataplane,
            interfaces: config.interfaces.clone(),
            frontends: HashMap::new(),
            socket_lb,
            netns: HashMap::new(),
            external: BTreeSet::new(),
            external_maglev: config.external_maglev,
            lb_mode: config.lb_mode,
            xdp: config.xdp,
        };
        for netns in &config.pod_netns {
            proxier.enable_netns(netns)?;
        }
        Ok(proxier)
    }

    /// Ends, in every load-balanced pod namespace, the UDP sockets connected to backends that
    /// left (see [`Dataplane::end_sockets_to`]). Best effort: a failure is logged, the sync
    /// stands.
    fn end_sockets(&self, left: &[SocketAddrV4]) {
        if left.is_empty() {
            return;
        }
        for path in self.netns.keys() {
            let ended = in_netns(path, || Ok(ebpf_dataplane::sockets::Diag::open()?))
                .and_then(|diag| Ok(self.dataplane.end_sockets_to(&diag, left)?));
            match ended {
                Ok(0) => {}
                Ok(ended) => tracing::info!(
                    netns = %path.display(),
                    ended,
                    "ended UDP sockets connected to backends that left"
                ),
                Err(e) => tracing::warn!(
                    netns = %path.display(),
                    error = format!("{e:#}"),
                    "could not end the UDP sockets connected to backends that left"
                ),
            }
        }
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }
}

/// The data plane's view of one service: a frontend per port on its cluster IP, and for
/// clients outside the cluster one on each external address and its NodePort.
fn desired(
    service: &Service,
    external_maglev: Option<u32>,
    lb_mode: LbMode,
) -> Vec<DesiredService> {
    let mut out = Vec::new();
    for port in &service.ports {
        let proto = match port.protocol {
            Protocol::Tcp => ebpf_dataplane::Protocol::Tcp,
            Protocol::Udp => ebpf_dataplane::Protocol::Udp,
        };
        let spec = ServiceSpec {
            scheduler: Scheduler::Random,
            affinity_timeout: service.session_affinity,
            reach: Reach::Cluster,
        };
        // Without a cluster IP (a pod's host ports), external frontends only.
        if !service.cluster_ip.is_unspecified() {
            out.push(DesiredService {
                frontend: Frontend::new(SocketAddrV4::new(service.cluster_ip, port.port), proto),
                spec,
                backends: port.endpoints.clone(),
                source_ranges: Vec::new(),
            });
        }
        let external = ServiceSpec {
            scheduler: match external_maglev {
                Some(table_size) => Scheduler::Maglev { table_size },
                None => Scheduler::Random,
            },
            reach: Reach::External {
                remote: if service.external_local {
                    Remote::AsItCame
                } else {
                    lb_mode.remote(port.protocol)
                },
                drop_when_empty: port.drops_external(),
            },
            ..spec
        };
        // loadBalancerSourceRanges apply to the LoadBalancer addresses only, as in kube-proxy.
        let on = |ip: &std::net::Ipv4Addr| Frontend::new(SocketAddrV4::new(*ip, port.port), proto);
        let frontends = service
            .external_ips
            .iter()
            .map(|ip| (on(ip), Vec::new()))
            .chain(
                service
                    .load_balancer_ips
                    .iter()
                    .map(|ip| (on(ip), service.load_balancer_source_ranges.clone())),
            )
            .chain(
                port.node_port
                    .map(|p| (Frontend::node_port(p, proto), Vec::new())),
            );
        for (frontend, source_ranges) in frontends {
            out.push(DesiredService {
                frontend,
                spec: external,
                backends: port.external_endpoints().to_vec(),
                source_ranges,
            });
        }
    }
    out
}

fn report(report: ebpf_dataplane::SyncReport, full: bool, start: Instant) -> SyncReport {
    SyncReport {
        full,
        written: report.created + report.updated + report.deleted,
        failed: report
            .failed
            .into_iter()
            .map(|(frontend, why)| format!("{frontend}: {why}"))
            .collect(),
        duration: start.elapsed(),
    }
}

impl Proxier for EbpfProxier {
    fn mode(&self) -> Mode {
        Mode::Ebpf
    }

    fn sync(&mut self, state: &ProxyState) -> Result<SyncReport> {
        let start = Instant::now();
        self.frontends.clear();
        let mut all = Vec::new();
        for (key, service) in &state.services {
            let services = desired(service, self.external_maglev, self.lb_mode);
            self.frontends
                .insert(key.clone(), services.iter().map(|d| d.frontend).collect());
            all.extend(services);
        }
        let done = self.dataplane.sync(all);
        self.end_sockets(&done.left_udp);
        Ok(report(done, true, start))
    }

    fn update(&mut self, state: &ProxyState, changed: &BTreeSet<String>) -> Result<SyncReport> {
        let start = Instant::now();
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for key in changed {
            let old = self.frontends.remove(key).unwrap_or_default();
            let new = state
                .services
                .get(key)
                .map(|s| desired(s, self.external_maglev, self.lb_mode))
                .unwrap_or_default();
            removed.extend(
                old.into_iter()
                    .filter(|f| !new.iter().any(|d| d.frontend == *f)),
            );
            if !new.is_empty() {
                self.frontends
                    .insert(key.clone(), new.iter().map(|d| d.frontend).collect());
            }
            upserts.extend(new);
        }
        let done = self.dataplane.update(upserts, removed);
        self.end_sockets(&done.left_udp);
        Ok(report(done, false, start))
    }

    fn set_node(&mut self, node: &NodeSettings) -> Result<()> {
        self.dataplane
            .set_node(node)
            .context("write the node's settings")?;
        // The interfaces clients reach NodePorts on, and the masquerade address's, where the
        // replies of flows masqueraded to it come back.
        for (iface, _) in local_addrs()?.into_iter().filter(|(_, addr)| {
            node.nodeport_addrs.contains(addr) || node.masquerade_addr == Some(*addr)
        }) {
            if self.external.contains(&iface) {
                continue;
            }
            self.dataplane
                .attach_external(&iface)
                .with_context(|| format!("attach to the node's interface {iface}"))?;
            self.dataplane
                .attach_xdp(&iface, self.xdp)
                .with_context(|| format!("attach XDP ({:?}) to {iface}", self.xdp))?;
            tracing::info!(interface = %iface, xdp = ?self.xdp, "serving NodePorts and external addresses");
            self.interfaces.push(iface.clone());
            self.external.insert(iface);
        }
        Ok(())
    }

    /// Attaches (again, for an interface re-created under the same name: the link pinned for
    /// the old one is stale and replaced).
    fn attach_interface(&mut self, iface: &str, sources: &[std::net::Ipv4Addr]) -> Result<()> {
        self.dataplane
            .attach(iface, sources)
            .with_context(|| format!("attach to {iface}"))?;
        if !self.interfaces.iter().any(|i| i == iface) {
            self.interfaces.push(iface.to_owned());
        }
        Ok(())
    }

    fn enable_netns(&mut self, netns: &Path) -> Result<()> {
        if !self.socket_lb {
            return Ok(());
        }
        let cookie = cookie_of(netns)?;
        self.dataplane.enable_socket_lb(cookie)?;
        self.netns.insert(netns.to_path_buf(), cookie);
        Ok(())
    }

    fn disable_netns(&mut self, netns: &Path) -> Result<()> {
        match self.netns.remove(netns) {
            Some(cookie) => Ok(self.dataplane.disable_socket_lb(cookie)?),
            None => Ok(()),
        }
    }

    fn collect(&mut self) -> Result<Option<ebpf_dataplane::GcReport>> {
        Ok(Some(self.dataplane.gc().context("collect conntrack")?))
    }

    fn kernel_usage(&self) -> Result<KernelUsage> {
        let memory = self.dataplane.map_memory()?;
        let (slots, _) = self.dataplane.backend_slots();
        Ok(KernelUsage {
            bytes: Some(memory.total()),
            objects: self.dataplane.services().count() as u64 + slots,
        })
    }

    fn cleanup(self: Box<Self>) -> Result<()> {
        let Self {
            mut dataplane,
            interfaces,
            ..
        } = *self;
        for iface in &interfaces {
            // The interface may be gone already; its links went with it.
            let _ = dataplane.detach(iface);
        }
        Ok(dataplane.destroy()?)
    }
}

/// Removing the pins detaches the links (nothing else holds them) and frees the maps.
pub fn cleanup(config: &ProxyConfig) -> Result<()> {
    match std::fs::remove_dir_all(&config.pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", config.pin_dir.display()))
        }
        _ => Ok(()),
    }
}

/// Where cgroup v2 is mounted (the root of the unified hierarchy).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (fields, fs) = line.split_once(" - ")?;
            if !fs.starts_with("cgroup2 ") {
                return None;
            }
            fields.split(' ').nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 file system is mounted (socket-level load balancing needs one)")
}

/// The IPv4 addresses of this network namespace's interfaces, with their interface's name.
pub fn local_addrs() -> Result<Vec<(String, std::net::Ipv4Addr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut out = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its type.
        if i32::from(unsafe { (*entry.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in; the name is a C string.
        let (addr, name) = unsafe {
            let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
            (
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                std::ffi::CStr::from_ptr(entry.ifa_name),
            )
        };
        out.push((name.to_string_lossy().into_owned(), addr));
    }
    // SAFETY: the list getifaddrs returned, not used after this.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// The cookie of the network namespace at `path`, read from a thread inside it.
fn cookie_of(path: &Path) -> Result<u64> {
    in_netns(path, || Ok(ebpf_dataplane::netns_cookie()?))
        .with_context(|| format!("the netns cookie of {}", path.display()))
}

/// Runs `work` on a thread of its own inside the network namespace at `path`.
fn in_netns<T: Send>(path: &Path, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on an fd we own, on a thread of our own.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns");
                }
                work()
            })
            .join()
            .expect("netns thread")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServicePort;

    /// How each frontend of a NodePort service with a TCP and a UDP port reaches other nodes'
    /// backends.
    fn remotes(external_local: bool, lb_mode: LbMode) -> Vec<(Frontend, Reach)> {
        let port = |protocol| ServicePort {
            protocol,
            port: 80,
            node_port: Some(30080),
            endpoints: vec!["10.244.1.5:8080".parse().unwrap()],
            ..ServicePort::default()
        };
        let service = Service {
            cluster_ip: "10.96.0.10".parse().unwrap(),
            ports: vec![port(Protocol::Tcp), port(Protocol::Udp)],
            external_local,
            ..Service::default()
        };
        desired(&service, None, lb_mode)
            .into_iter()
            .map(|d| (d.frontend, d.spec.reach))
            .collect()
    }

    #[test]
    fn lb_modes_choose_how_flows_reach_other_nodes() {
        let external = |remote| Reach::External {
            remote,
            drop_when_empty: false,
        };
        let cluster_ip = |proto| Frontend::new("10.96.0.10:80".parse().unwrap(), proto);
        let (tcp, udp) = (ebpf_dataplane::Protocol::Tcp, ebpf_dataplane::Protocol::Udp);
        let expect = |tcp_remote, udp_remote| {
            vec![
                (cluster_ip(tcp), Reach::Cluster),
                (Frontend::node_port(30080, tcp), external(tcp_remote)),
                (cluster_ip(udp), Reach::Cluster),
                (Frontend::node_port(30080, udp), external(udp_remote)),
            ]
        };
        use Remote::*;
        assert_eq!(remotes(false, LbMode::Snat), expect(Masquerade, Masquerade));
        assert_eq!(
            remotes(false, LbMode::Dsr),
            expect(DirectReturn, DirectReturn)
        );
        assert_eq!(
            remotes(false, LbMode::Hybrid),
            expect(DirectReturn, Masquerade)
        );
        // externalTrafficPolicy Local keeps the client whatever the mode.
        assert_eq!(remotes(true, LbMode::Dsr), expect(AsItCame, AsItCame));
    }
}
