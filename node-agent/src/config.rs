//! The agent's command line.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use node_agent_proxy::{LbMode, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "node-agent",
    version,
    about = "The node agent: a kube-proxy replacement programming the eBPF data plane from the control plane's feed or any Kubernetes API server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (until SIGTERM or Ctrl-C; the data plane keeps serving after it exits)
    Run(Box<RunArgs>),
    /// What a running agent holds: its source, version, services, endpoints, last sync
    Status {
        /// The running agent's metrics address
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_addr: SocketAddr,
    },
    /// The services the data plane holds, read back from its pinned maps
    Services {
        #[arg(long, default_value = "/sys/fs/bpf/keel")]
        pin_dir: PathBuf,
    },
    /// Remove everything any proxy mode installed (maps, links, iptables and nftables rules)
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/keel")]
        pin_dir: PathBuf,
    },
    /// The node's image store
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Keeps one container company (started by the kubelet; not for people)
    #[command(hide = true)]
    Shim {
        #[arg(long)]
        runc_root: PathBuf,
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        cgroup: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import an OCI image layout (a directory, or a tar file of one)
    Import {
        path: PathBuf,
        #[arg(long, default_value = "/var/lib/keel/kubelet")]
        kubelet_root: PathBuf,
    },
    /// List the images by name
    List {
        #[arg(long, default_value = "/var/lib/keel/kubelet")]
        kubelet_root: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// This node's name (default: the host name)
    #[arg(long)]
    pub node_name: Option<String>,

    #[command(flatten)]
    pub source: SourceArgs,

    /// How services are programmed
    #[arg(long, default_value = "ebpf", value_parser = parse_mode)]
    pub proxy_mode: Mode,
    /// Where the eBPF data plane pins its maps and links
    #[arg(long, default_value = "/sys/fs/bpf/keel")]
    pub pin_dir: PathBuf,
    /// The pod network; iptables and nftables modes masquerade service traffic from outside it
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// Host-side pod interfaces to attach the tc programs to as they appear (glob, repeatable)
    #[arg(long = "pod-interfaces", value_name = "GLOB")]
    pub pod_interfaces: Vec<String>,
    /// Pod network namespaces whose sockets are load balanced at connect time, as they appear
    /// (glob on paths, repeatable; e.g. '/run/netns/cni-*')
    #[arg(long = "pod-netns", value_name = "GLOB")]
    pub pod_netns: Vec<String>,
    /// The node addresses NodePorts answer on, as CIDRs: every local address in one of them,
    /// loopback excepted (kube-proxy's --nodeport-addresses; comma-separated or repeated;
    /// 0.0.0.0/0 for every address). Default: the node's InternalIP, as kube-proxy's nftables
    /// mode
    #[arg(
        long = "nodeport-addresses",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub nodeport_addresses: Vec<ipnet::Ipv4Net>,
    /// Maglev table size (a prime) of NodePorts and external addresses, so every node sends a
    /// client's flow to the same backend (eBPF mode; 0: random)
    #[arg(long, default_value_t = ebpf_dataplane::defaults::EXTERNAL_MAGLEV_TABLE_SIZE)]
    pub external_maglev_table_size: u32,
    /// The XDP fast path for traffic from outside on the node's interfaces (eBPF mode): off,
    /// native (in the driver; on a veth its peer needs XDP or GRO) or generic
    #[arg(long, default_value = "off")]
    pub xdp: ebpf_dataplane::XdpAcceleration,
    /// Start even when the eBPF data plane pinned by another build holds flow state (conntrack,
    /// reverse NAT, affinity) in a layout this build cannot carry over: those flows are then
    /// balanced again. Without it such a start is refused and the old data plane keeps serving
    #[arg(long)]
    pub allow_flow_loss: bool,
    /// How flows from outside reach backends on other nodes under externalTrafficPolicy
    /// Cluster (eBPF mode): snat (masqueraded to the node, as kube-proxy), dsr (direct server
    /// return: the backend sees the client and its node answers the client directly, the
    /// service address carried in an IPv4 option; every node must run the eBPF mode) or
    /// hybrid (DSR for TCP, SNAT for UDP)
    #[arg(long, default_value = "snat")]
    pub lb_mode: LbMode,
    /// Which local sockets are load balanced at connect time (eBPF mode)
    #[arg(long, value_enum, default_value = "all")]
    pub socket_lb: SocketLb,
    /// Wait at least this long between syncs, so bursts of changes coalesce (default: 0 for
    /// eBPF, 1 s for iptables and nftables, as kube-proxy)
    #[arg(long, value_name = "SECONDS")]
    pub min_sync_period: Option<f64>,
    /// Where /metrics, /healthz and /status are served
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    /// Also run the pods bound to this node (the kubelet): containers through runc, pod
    /// networking through keel-cni, routes to the other nodes' pods
    #[arg(long)]
    pub run_pods: bool,
    /// Where the kubelet serves container logs to the API server (on --node-ip), with the
    /// certificate the control plane issues at registration (--feed)
    #[arg(long, default_value = "10250")]
    pub kubelet_port: u16,
    /// Where the kubelet keeps images, containers, pods and logs
    #[arg(long, default_value = "/var/lib/keel/kubelet")]
    pub kubelet_root: PathBuf,
    /// Where the CNI plugins are (default: next to node-agent, where keel-cni is built)
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
    /// First step of the container restart back-off (kubelet's 10 s)
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub restart_backoff: f64,
    /// Cap of the container restart back-off (kubelet's 5 min)
    #[arg(long, default_value = "300", value_name = "SECONDS")]
    pub max_restart_backoff: f64,
}

impl RunArgs {
    pub fn min_sync_period(&self) -> Duration {
        let default = match self.proxy_mode {
            Mode::Ebpf => 0.0,
            Mode::Iptables | Mode::Nftables => 1.0,
        };
        Duration::from_secs_f64(self.min_sync_period.unwrap_or(default).max(0.0))
    }
}

/// Where the desired state comes from: exactly one of the feed and a kubeconfig.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// The control plane's feed, `https://HOST:PORT`
    #[arg(long, requires_all = ["feed_ca", "feed_token_file"], conflicts_with = "kubeconfig", required_unless_present = "kubeconfig")]
    pub feed: Option<String>,
    /// Any Kubernetes API server, the way kube-proxy reads it (Services, EndpointSlices,
    /// this Node)
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The control plane's CA (PEM), for --feed
    #[arg(long)]
    pub feed_ca: Option<PathBuf>,
    /// A file holding the node (bootstrap) token, for --feed: it registers the node once; the
    /// node then calls with its own certificate
    #[arg(long)]
    pub feed_token_file: Option<PathBuf>,
    /// Where the node keeps its feed certificate and key (`<node>.crt`, `<node>.key`, 0600)
    #[arg(long, default_value = "/var/lib/keel/node-agent")]
    pub feed_credentials_dir: PathBuf,
    /// The address registered as this node's InternalIP (--feed)
    #[arg(long)]
    pub node_ip: Option<String>,
    /// This node's zone, registered as label topology.kubernetes.io/zone (--feed)
    #[arg(long)]
    pub zone: Option<String>,
    /// Labels registered on the node, `key=value` (--feed, repeatable)
    #[arg(long = "node-label", value_name = "KEY=VALUE")]
    pub node_labels: Vec<String>,
    /// Heartbeat interval (--feed)
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub heartbeat: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SocketLb {
    /// Pods and the host's own processes (as Cilium's host-reachable services)
    All,
    /// Pods only (their namespaces from --pod-netns)
    Pods,
    /// None: every packet goes through the tc programs
    Off,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}
