//! `control-plane`: the Kubernetes API server in one binary.
//!
//! ```text
//! control-plane --store embedded:/var/lib/keel/store --listen 127.0.0.1:6443 --kubeconfig ./kubeconfig
//! control-plane --store etcd:http://127.0.0.1:2379
//! ```

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use control_plane_apiserver::server::{Config, serve};
use control_plane_store::{AnyStore, StoreSpec};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Where objects live: `embedded:<directory>` (SQLite) or `etcd:<endpoint>[,<endpoint>...]`.
    #[arg(long, default_value = "embedded:/var/lib/keel/control-plane/store")]
    store: StoreSpec,
    /// Address and port of the HTTPS API.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Where to write a kubeconfig (server, CA, admin token) that kubectl uses as it is.
    #[arg(long, default_value = "/var/lib/keel/control-plane/admin.kubeconfig")]
    kubeconfig: PathBuf,
    /// Where the CA, its key and the admin token are kept across restarts.
    #[arg(long, default_value = "/var/lib/keel/control-plane")]
    state_dir: PathBuf,
    /// ClusterIPs are allocated from this range.
    #[arg(long, default_value = "10.96.0.0/16")]
    service_cluster_ip_range: String,
    /// NodePorts are allocated from this range.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// Extra names or addresses the serving certificate is valid for (repeatable).
    #[arg(long = "tls-san")]
    tls_sans: Vec<String>,
    /// How often history older than one interval is compacted away.
    #[arg(long, default_value = "60", value_name = "SECONDS")]
    compaction_interval: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = Arc::new(
            AnyStore::open(&args.store)
                .await
                .with_context(|| format!("open the store {:?}", args.store))?,
        );
        let config = Config {
            listen: args.listen,
            state_dir: args.state_dir,
            kubeconfig: args.kubeconfig,
            service_cidr: args.service_cluster_ip_range,
            node_port_range: args.service_node_port_range,
            tls_sans: args.tls_sans,
            compaction_interval: Duration::from_secs(args.compaction_interval.max(1)),
        };
        tokio::select! {
            result = serve(store, config) => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
