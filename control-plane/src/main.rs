//! `control-plane`: the whole control plane in one binary: the Kubernetes API server, the
//! scheduler and controllers, and the gRPC feed to node agents.
//!
//! ```text
//! control-plane --store embedded:/var/lib/keel/store --listen 127.0.0.1:6443 --kubeconfig ./kubeconfig
//! control-plane --store etcd:http://127.0.0.1:2379 --feed-listen 0.0.0.0:6444
//! ```

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use control_plane_apiserver::server::{Config, Credentials, registry, serve, spawn_compactor};
use control_plane_controllers::Settings;
use control_plane_feed::{FeedService, hub::Hub};
use control_plane_store::{AnyStore, EtcdOptions, StoreSpec};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Where objects live: `embedded:<directory>` (SQLite) or `etcd:<endpoint>[,<endpoint>...]`.
    #[arg(long, default_value = "embedded:/var/lib/keel/control-plane/store")]
    store: StoreSpec,
    /// Address and port of the HTTPS API.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Address and port of the node agents' gRPC feed (TLS, node token).
    #[arg(long, default_value = "127.0.0.1:6444")]
    feed_listen: SocketAddr,
    /// Where to write a kubeconfig (server, CA, admin token) that kubectl uses as it is.
    #[arg(long, default_value = "/var/lib/keel/control-plane/admin.kubeconfig")]
    kubeconfig: PathBuf,
    /// Where the CA, its key, the admin token and the node token are kept across restarts.
    #[arg(long, default_value = "/var/lib/keel/control-plane")]
    state_dir: PathBuf,
    /// ClusterIPs are allocated from this range.
    #[arg(long, default_value = "10.96.0.0/16")]
    service_cluster_ip_range: String,
    /// NodePorts are allocated from this range.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// Pod CIDRs of nodes are cut from this range.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value = "24")]
    node_cidr_mask_size: u8,
    /// A node whose lease is not renewed for this long turns NotReady (and a pod bound to a
    /// node gone this long is deleted).
    #[arg(long, default_value = "40", value_name = "SECONDS")]
    node_monitor_grace_period: f64,
    /// How long a pod stays on an unreachable node before it is evicted, unless it has a
    /// toleration of its own for `node.kubernetes.io/unreachable:NoExecute`.
    #[arg(long, default_value = "300", value_name = "SECONDS")]
    default_unreachable_toleration_seconds: f64,
    /// How often the ClusterIP and NodePort allocations are checked against the services.
    #[arg(long, default_value = "180", value_name = "SECONDS")]
    repair_interval: f64,
    /// Addresses for LoadBalancer services, as CIDRs (comma-separated or repeated), handed out
    /// in `status.loadBalancer.ingress` as MetalLB does; without it they stay pending.
    #[arg(long = "load-balancer-ips", value_name = "CIDR", value_delimiter = ',')]
    load_balancer_ips: Vec<ipnet::Ipv4Net>,
    /// The CA of etcd's serving certificate (TLS to etcd; endpoints are then `https://`).
    #[arg(long, value_name = "FILE")]
    etcd_cafile: Option<std::path::PathBuf>,
    /// A client certificate to present to etcd (with `--etcd-keyfile`).
    #[arg(long, value_name = "FILE", requires = "etcd_keyfile")]
    etcd_certfile: Option<std::path::PathBuf>,
    /// The key of `--etcd-certfile`.
    #[arg(long, value_name = "FILE", requires = "etcd_certfile")]
    etcd_keyfile: Option<std::path::PathBuf>,
    /// How long a request to etcd may wait for its answer to start (watches then run on).
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    etcd_request_timeout: f64,
    /// Requests other than watches served at once; more get 429 and a Retry-After (as
    /// kube-apiserver's `--max-requests-inflight` plus `--max-mutating-requests-inflight`).
    #[arg(long, default_value = "600")]
    max_requests_inflight: usize,
    /// Watches (and followed logs) one client address may hold open; more get 429.
    #[arg(long, default_value = "1000")]
    max_watches_per_client: usize,
    /// On etcd, run the scheduler and controllers only while this process holds the
    /// `kube-system/keel-controller-manager` Lease, so that several control planes can serve
    /// one etcd (`--leader-elect=false`: always run them). An embedded store has one process.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// How long a lease not renewed stays its holder's.
    #[arg(long, default_value = "15", value_name = "SECONDS")]
    leader_elect_lease_duration: f64,
    /// How long the leader keeps leading while it cannot renew.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    leader_elect_renew_deadline: f64,
    /// How often the lease is renewed, or tried.
    #[arg(long, default_value = "2", value_name = "SECONDS")]
    leader_elect_retry_period: f64,
    /// How long an event lives after its last write (kube-apiserver's `--event-ttl`).
    #[arg(long, default_value = "3600", value_name = "SECONDS")]
    event_ttl: f64,
    /// Changes the feed keeps for agents to resume from after a reconnect.
    #[arg(long, default_value = "20000")]
    feed_history: usize,
    /// Serve the API and the feed only: no scheduler, no controllers (for API conformance
    /// tests, or when the control loops run elsewhere).
    #[arg(long)]
    disable_controllers: bool,
    /// Extra names or addresses the serving certificate is valid for (repeatable).
    #[arg(long = "tls-san")]
    tls_sans: Vec<String>,
    /// How often history older than one interval is compacted away.
    #[arg(long, default_value = "60", value_name = "SECONDS")]
    compaction_interval: u64,
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = Arc::new(
            AnyStore::open_with(
                &args.store,
                &EtcdOptions {
                    ca_file: args.etcd_cafile.clone(),
                    cert_file: args.etcd_certfile.clone(),
                    key_file: args.etcd_keyfile.clone(),
                    request_timeout: Some(seconds(args.etcd_request_timeout)),
                },
            )
            .await
            .with_context(|| format!("open the store {:?}", args.store))?,
        );
        // The feed serves the same certificate: valid for its address too.
        let mut tls_sans = args.tls_sans;
        if !args.feed_listen.ip().is_unspecified() {
            tls_sans.push(args.feed_listen.ip().to_string());
        }
        let config = Config {
            listen: args.listen,
            state_dir: args.state_dir,
            kubeconfig: args.kubeconfig,
            service_cidr: args.service_cluster_ip_range,
            node_port_range: args.service_node_port_range,
            tls_sans,
            compaction_interval: Duration::from_secs(args.compaction_interval.max(1)),
            max_requests_inflight: args.max_requests_inflight.max(1),
            max_watches_per_client: args.max_watches_per_client.max(1),
        };
        let credentials = Credentials::load_or_create(&config)?;
        let registry = registry(store.clone(), &config).await?;
        spawn_compactor(store.clone(), config.compaction_interval);
        control_plane_controllers::events::start_expiry(registry.clone(), seconds(args.event_ttl));
        let settings = Settings {
            cluster_cidr: args.cluster_cidr,
            node_cidr_mask_size: args.node_cidr_mask_size,
            node_monitor_grace_period: seconds(args.node_monitor_grace_period),
            default_unreachable_toleration: seconds(args.default_unreachable_toleration_seconds),
            repair_interval: seconds(args.repair_interval),
            load_balancer_pool: args.load_balancer_ips,
        };
        let elected = args.leader_elect && matches!(args.store, StoreSpec::Etcd(_));
        let client = if args.disable_controllers {
            control_plane_controllers::client_only(registry.clone())
        } else if elected {
            // Stable across restarts (a restarted leader takes its lease back at once), unique
            // among the control planes on one etcd.
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into());
            let election = control_plane_controllers::leader::Election {
                identity: format!("{host}_{}", args.listen),
                lease_duration: seconds(args.leader_elect_lease_duration),
                renew_deadline: seconds(args.leader_elect_renew_deadline),
                retry_period: seconds(args.leader_elect_retry_period),
            };
            // Settings a term would refuse are refused now, not at every election.
            control_plane_controllers::nodes::PodCidrs::new(
                &settings.cluster_cidr,
                settings.node_cidr_mask_size,
            )
            .map_err(anyhow::Error::msg)?;
            control_plane_controllers::leader::start(registry.clone(), settings, election);
            // The feed serves on every control plane, leader or not, from caches of its own.
            control_plane_controllers::client_only(registry.clone())
        } else {
            control_plane_controllers::start(registry.clone(), &settings)?
        };
        let hub = Hub::new(args.feed_history);
        tokio::spawn(hub.clone().run(store.clone()));
        let token = control_plane_feed::load_or_create_token(&config.state_dir)?;
        let node_token = token.clone();
        let credentials = Arc::new(credentials);
        let feed = control_plane_feed::serve(
            args.feed_listen,
            &credentials,
            token,
            FeedService::new(client, hub, credentials.clone()),
        )
        .await?;
        println!(
            "control-plane: serving the node feed on https://{}; node token: {}",
            args.feed_listen,
            config.state_dir.join("node-token").display()
        );
        let kubelets =
            control_plane_apiserver::logs::Kubelets::new(&credentials.ca_pem, node_token)?;
        let api = serve(registry, &credentials, &config, Some(kubelets)).await?;
        tokio::select! {
            result = api => result,
            result = feed => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
