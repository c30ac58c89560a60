//! The kube-proxy replacement. It takes one desired state (services, their ports and ready
//! endpoints) and programs it in one of three modes:
//!
//! - [`Mode::Ebpf`] (the default): the eBPF data plane's maps, through `ebpf-dataplane`;
//! - [`Mode::Iptables`]: the rules kube-proxy's iptables mode writes (KUBE-SERVICES,
//!   KUBE-SVC-*, KUBE-SEP-* with the `statistic` match), applied with `iptables-restore` as
//!   kube-proxy applies them: a full sync, then partial syncs of the chains that changed;
//! - [`Mode::Nftables`]: the rules kube-proxy's nftables mode writes (table `ip kube-proxy`,
//!   a `service-ips` verdict map, per-service chains choosing endpoints with
//!   `numgen random mod N vmap`), applied with `nft -f` in transactions.
//!
//! The last two exist so benchmarks compare data planes on the same machine, services and
//! traffic. Like kube-proxy, a proxy programs the network namespace of the thread that calls it,
//! and starting one mode removes whatever the other modes left behind.

mod ebpf;
mod exec;
mod iptables;
mod model;
mod nftables;

use std::{collections::BTreeSet, fmt, path::Path, str::FromStr, time::Duration};

use anyhow::Result;
pub use ebpf::{EbpfProxier, cgroup2_root, local_addrs};
pub use ebpf_dataplane::NodeSettings;
pub use exec::SyncTimedOut;
pub use iptables::IptablesProxier;
pub use model::{Protocol, ProxyState, Service, ServicePort};
pub use nftables::NftablesProxier;

/// How services are programmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    #[default]
    Ebpf,
    Iptables,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Ebpf, Mode::Iptables, Mode::Nftables];

    pub const fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown proxy mode {s:?} (ebpf, iptables or nftables)"))
    }
}

/// How the eBPF mode sends flows from outside to backends on other nodes
/// (`externalTrafficPolicy: Cluster`); Cilium's `loadBalancer.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbMode {
    /// Masqueraded to the node (kube-proxy's way): replies come back through it.
    #[default]
    Snat,
    /// Direct server return: the backend sees the client and its node answers the client
    /// directly; every node must run the eBPF mode.
    Dsr,
    /// DSR for TCP, SNAT for UDP (every UDP datagram would carry the DSR option).
    Hybrid,
}

impl LbMode {
    /// The way a flow of `protocol` reaches another node's backend.
    pub fn remote(self, protocol: Protocol) -> ebpf_dataplane::Remote {
        match (self, protocol) {
            (LbMode::Dsr, _) | (LbMode::Hybrid, Protocol::Tcp) => {
                ebpf_dataplane::Remote::DirectReturn
            }
            _ => ebpf_dataplane::Remote::Masquerade,
        }
    }
}

impl std::str::FromStr for LbMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "snat" => Ok(LbMode::Snat),
            "dsr" => Ok(LbMode::Dsr),
            "hybrid" => Ok(LbMode::Hybrid),
            other => Err(format!(
                "load-balancing mode {other:?}: expected snat, dsr or hybrid"
            )),
        }
    }
}

/// Settings shared by the modes.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Pod network; traffic to a service from outside it is masqueraded (kube-proxy's
    /// `--cluster-cidr`). The eBPF mode serves pod clients only and does not masquerade.
    pub cluster_cidr: String,
    /// eBPF mode: the host-side veths of the pods whose traffic is translated.
    pub interfaces: Vec<String>,
    /// eBPF mode: where maps and links are pinned.
    pub pin_dir: std::path::PathBuf,
    /// eBPF mode: network namespaces of pods (e.g. `/run/netns/<name>`) whose sockets are
    /// load balanced when they connect, so their flows need no per-packet translation. More
    /// can be enabled later ([`Proxier::enable_netns`]).
    pub pod_netns: Vec<std::path::PathBuf>,
    /// eBPF mode: attach the socket hooks even before any namespace is enabled (an agent
    /// enables pods' namespaces as they appear).
    pub socket_lb: bool,
    /// eBPF mode: load balance the sockets of the proxy's own network namespace too (processes
    /// on the host network, as Cilium's host-reachable services do).
    pub host_socket_lb: bool,
    /// eBPF mode: the cgroup v2 directory whose processes' sockets the socket hooks see. None:
    /// the root of the unified hierarchy, every process on the node (benchmarks narrow it so
    /// the other modes' load generators do not pay for the hooks).
    pub socket_cgroup: Option<std::path::PathBuf>,
    /// eBPF mode: the Maglev table size of frontends for traffic from outside (NodePorts,
    /// external and LoadBalancer addresses), so every node sends a flow to the same backend;
    /// None: random.
    pub external_maglev: Option<u32>,
    /// eBPF mode: the XDP fast path on the node's interfaces that take traffic from outside.
    pub xdp: ebpf_dataplane::XdpAcceleration,
    /// eBPF mode: how flows from outside reach backends on other nodes.
    pub lb_mode: LbMode,
    /// iptables and nftables modes: stop a restore or transaction that runs longer (the sync
    /// then fails with [`SyncTimedOut`] and nothing is applied). None: wait as kube-proxy does.
    pub sync_timeout: Option<Duration>,
    /// eBPF mode: start even when the pinned flow state of another build cannot be carried
    /// over (those flows are balanced again); otherwise the start is refused.
    pub allow_flow_loss: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: "10.244.0.0/16".into(),
            interfaces: Vec::new(),
            pin_dir: "/sys/fs/bpf/keel".into(),
            pod_netns: Vec::new(),
            socket_lb: false,
            host_socket_lb: false,
            socket_cgroup: None,
            external_maglev: Some(ebpf_dataplane::defaults::EXTERNAL_MAGLEV_TABLE_SIZE),
            xdp: ebpf_dataplane::XdpAcceleration::Off,
            lb_mode: LbMode::Snat,
            sync_timeout: None,
            allow_flow_loss: false,
        }
    }
}

/// What a sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// A full sync (everything rewritten) rather than a partial one.
    pub full: bool,
    /// Chains or services written.
    pub written: usize,
    /// Services that could not be written, and why (the kernel keeps serving their previous
    /// state); the others were applied.
    pub failed: Vec<String>,
    /// Wall time of programming the kernel (the restore, the transaction, the map updates).
    pub duration: Duration,
}

/// What a mode holds in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelUsage {
    /// Bytes the kernel accounts to the mode's objects when it says (eBPF map memlock); `None`
    /// when it does not tell per object (iptables and nftables rules).
    pub bytes: Option<u64>,
    /// Rules (iptables), rules and map/set elements (nftables), map entries (eBPF).
    pub objects: u64,
}

/// A proxy mode.
pub trait Proxier: Send {
    fn mode(&self) -> Mode;
    /// Makes the kernel serve exactly `state`.
    fn sync(&mut self, state: &ProxyState) -> Result<SyncReport>;
    /// Makes the kernel serve `state` after only the services in `changed` (`namespace/name`;
    /// one absent from `state` was deleted) changed since the last sync or update. Modes whose
    /// rules are not written service by service do a [`Proxier::sync`] (the default).
    fn update(&mut self, state: &ProxyState, changed: &BTreeSet<String>) -> Result<SyncReport> {
        let _ = changed;
        self.sync(state)
    }
    /// A pod's host-side interface appeared (eBPF mode: attach the tc programs to it, and
    /// accept only `sources` as its packets' source when there are any).
    fn attach_interface(&mut self, iface: &str, sources: &[std::net::Ipv4Addr]) -> Result<()> {
        let _ = (iface, sources);
        Ok(())
    }
    /// What the mode must know of the node for traffic from outside the cluster: its pod
    /// network and the addresses NodePorts answer on (eBPF mode: the programs' node settings,
    /// and `from_outside` on the interfaces holding those addresses). Called again when they
    /// change.
    fn set_node(&mut self, node: &ebpf_dataplane::NodeSettings) -> Result<()> {
        let _ = node;
        Ok(())
    }
    /// Periodic housekeeping (eBPF mode: collect conntrack); what it found, if anything.
    fn collect(&mut self) -> Result<Option<ebpf_dataplane::GcReport>> {
        Ok(None)
    }
    /// A pod's network namespace appeared (eBPF mode: load balance its sockets).
    fn enable_netns(&mut self, netns: &Path) -> Result<()> {
        let _ = netns;
        Ok(())
    }
    /// A pod's network namespace enabled earlier is gone.
    fn disable_netns(&mut self, netns: &Path) -> Result<()> {
        let _ = netns;
        Ok(())
    }
    /// Loads `state` into a proxy that holds nothing yet, `step` services at a time: the same
    /// kernel state as one [`Proxier::sync`], without one giant restore or transaction.
    /// Benchmarks use it to set up big rule sets when the faithful sync would take too long.
    fn load_in_steps(&mut self, state: &ProxyState, step: usize) -> Result<()> {
        let _ = step;
        self.sync(state).map(drop)
    }
    /// What the mode holds in the kernel now.
    fn kernel_usage(&self) -> Result<KernelUsage>;
    /// Removes everything the mode installed.
    fn cleanup(self: Box<Self>) -> Result<()>;
}

/// Starts a proxy in `mode`, after removing what any other mode left in this network namespace
/// (as kube-proxy cleans up other modes' rules when it starts).
pub fn start(mode: Mode, config: &ProxyConfig) -> Result<Box<dyn Proxier>> {
    for other in Mode::ALL.into_iter().filter(|m| *m != mode) {
        cleanup_leftovers(other, config)?;
    }
    Ok(match mode {
        Mode::Ebpf => Box::new(EbpfProxier::new(config)?),
        Mode::Iptables => Box::new(IptablesProxier::new(config)?),
        Mode::Nftables => Box::new(NftablesProxier::new(config)?),
    })
}

/// Removes what `mode` may have installed, whether or not a proxier of that mode is running.
pub fn cleanup_leftovers(mode: Mode, config: &ProxyConfig) -> Result<()> {
    match mode {
        Mode::Ebpf => ebpf::cleanup(config),
        Mode::Iptables => iptables::cleanup(),
        Mode::Nftables => nftables::cleanup(),
    }
}
