//! The eBPF mode: services become `ebpf-dataplane` frontends (one per service port), endpoints
//! become backends on the target port. One map update per changed service port.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result};
use ebpf_dataplane::{Config, Dataplane, DesiredService, Frontend, Scheduler, ServiceSpec};

use crate::{KernelUsage, Mode, Proxier, ProxyConfig, ProxyState, SyncReport, model::Protocol};

pub struct EbpfProxier {
    dataplane: Dataplane,
    interfaces: Vec<String>,
}

impl EbpfProxier {
    pub fn new(config: &ProxyConfig) -> Result<Self> {
        let mut dataplane = Dataplane::open(&Config::with_pin_dir(&config.pin_dir))
            .context("open the eBPF data plane")?;
        for iface in &config.interfaces {
            dataplane
                .attach(iface)
                .with_context(|| format!("attach to {iface}"))?;
        }
        if !config.pod_netns.is_empty() {
            let cgroup = cgroup2_root()?;
            dataplane
                .attach_cgroup(&cgroup)
                .with_context(|| format!("attach the socket hooks to {}", cgroup.display()))?;
            for netns in &config.pod_netns {
                let cookie = cookie_of(netns)?;
                dataplane.enable_socket_lb(cookie)?;
            }
        }
        Ok(Self {
            dataplane,
            interfaces: config.interfaces.clone(),
        })
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }
}

/// The data plane's view of `state`.
fn desired(state: &ProxyState) -> Vec<DesiredService> {
    let mut out = Vec::new();
    for service in &state.services {
        for port in &service.ports {
            let addr = std::net::SocketAddrV4::new(service.cluster_ip, port.port);
            let frontend = match port.protocol {
                Protocol::Tcp => Frontend::tcp(addr),
                Protocol::Udp => Frontend::udp(addr),
            };
            out.push(DesiredService {
                frontend,
                spec: ServiceSpec {
                    scheduler: Scheduler::Random,
                    affinity_timeout: service.session_affinity,
                },
                backends: service
                    .endpoints
                    .iter()
                    .map(|ip| std::net::SocketAddrV4::new(*ip, port.target_port))
                    .collect(),
            });
        }
    }
    out
}

impl Proxier for EbpfProxier {
    fn mode(&self) -> Mode {
        Mode::Ebpf
    }

    fn sync(&mut self, state: &ProxyState) -> Result<SyncReport> {
        let desired = desired(state);
        let start = Instant::now();
        let report = self.dataplane.sync(desired)?;
        Ok(SyncReport {
            full: false,
            written: report.created + report.updated + report.deleted,
            duration: start.elapsed(),
        })
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
fn cgroup2_root() -> Result<PathBuf> {
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

/// The cookie of the network namespace at `path`, read from a thread inside it.
fn cookie_of(path: &Path) -> Result<u64> {
    let ns = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on an fd we own, on a thread of our own.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns");
                }
                Ok(ebpf_dataplane::netns_cookie()?)
            })
            .join()
            .expect("cookie thread")
    })
    .with_context(|| format!("the netns cookie of {}", path.display()))
}
