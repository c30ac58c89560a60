//! The control plane's feed: register this node (addresses, capacity, labels, zone), renew its
//! lease, and follow the Watch stream with the agents' session code
//! (`control_plane_api::session`): resume after a dropped connection or a control-plane
//! restart, a fresh snapshot when a message does not fit.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use control_plane_api::{
    FeedClient, NodeIdentity,
    convert::ZONE_LABEL,
    feed::{RegisterRequest, RegisterResponse, Resources},
    files::{create_private_dir, write_private},
    session::{self, Backoff},
};

use crate::{agent::Shared, config::SourceArgs};

pub async fn run(args: &SourceArgs, shared: Arc<Shared>) -> Result<()> {
    let url = args.feed.clone().context("--feed")?;
    let ca_path = args.feed_ca.as_ref().context("--feed-ca")?;
    let token_path = args.feed_token_file.as_ref().context("--feed-token-file")?;
    let ca = std::fs::read_to_string(ca_path)
        .with_context(|| format!("read the control plane's CA {}", ca_path.display()))?;
    let token = std::fs::read_to_string(token_path)
        .with_context(|| format!("read the node token {}", token_path.display()))?;
    let token = token.trim().to_owned();

    let mut labels: std::collections::HashMap<String, String> = args
        .node_labels
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if let Some(zone) = &args.zone {
        labels.insert(ZONE_LABEL.into(), zone.clone());
    }
    let request = RegisterRequest {
        node_name: shared.node.clone(),
        internal_ip: args.node_ip.clone().unwrap_or_default(),
        capacity: Some(capacity()),
        labels,
        kubelet_port: if shared.pods.is_some() {
            u32::from(shared.pods.as_ref().map_or(0, |p| p.kubelet_port))
        } else {
            0
        },
        ..Default::default()
    };
    let store = Identities {
        dir: args.feed_credentials_dir.clone(),
        node: shared.node.clone(),
        ca: ca.clone(),
    };
    // The control plane may not be up yet: keep trying, as after any outage.
    let mut backoff = Backoff::default();
    let (client, registered) = loop {
        match register(&url, &ca, &token, &store, request.clone()).await {
            Ok(done) => break done,
            Err(e) => {
                tracing::warn!(url = %url, error = format!("{e:#}"), "cannot register on the feed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    tracing::info!(node = %shared.node, pod_cidr = %registered.pod_cidr, "registered");
    if let Some(settings) = &shared.pods {
        let reporter = std::sync::Arc::new(crate::pods::FeedReporter {
            client: client.clone(),
            node: shared.node.clone(),
        });
        let kubelet = crate::pods::start_kubelet(&shared, settings, reporter)?;
        if !registered.pod_cidr.is_empty() {
            kubelet.set_pod_cidr(&registered.pod_cidr);
        }
        if !registered.kubelet_cert_pem.is_empty() {
            let ip: std::net::IpAddr = args
                .node_ip
                .as_deref()
                .and_then(|ip| ip.parse().ok())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            crate::kubelet_server::serve(
                std::net::SocketAddr::new(ip, settings.kubelet_port),
                &registered.kubelet_cert_pem,
                &registered.kubelet_key_pem,
                token.clone(),
                kubelet.clone(),
            )
            .await?;
        }
        *shared.kubelet.lock().expect("not poisoned") = Some(kubelet);
    }

    let heartbeat = tokio::spawn(session::heartbeat(
        client.clone(),
        shared.node.clone(),
        Duration::from_secs_f64(args.heartbeat.max(0.1)),
        || true,
    ));
    let on_change = {
        let shared = shared.clone();
        move |view: &control_plane_api::view::View, changes| shared.changed(view, changes)
    };
    session::follow(
        client,
        shared.node.clone(),
        shared.view.clone(),
        shared.stream.clone(),
        on_change,
    )
    .await;
    heartbeat.abort();
    Ok(())
}

/// What this machine offers pods: CPUs, memory, and kubelet's default of 110 pods.
fn capacity() -> Resources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<i64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    Resources {
        cpu_millis: cpus as i64 * 1000,
        memory_bytes: memory,
        pods: 110,
    }
}

/// Where this node keeps its feed identity (as kubelet keeps its client certificate), with the
/// CA it was issued under: an identity from another control plane is not offered.
struct Identities {
    dir: std::path::PathBuf,
    node: String,
    ca: String,
}

impl Identities {
    fn path(&self, ext: &str) -> std::path::PathBuf {
        self.dir.join(format!("{}.{ext}", self.node))
    }

    /// The identity kept, if it is this node's, valid now and from this CA.
    fn load(&self) -> Option<NodeIdentity> {
        let read = |ext| std::fs::read_to_string(self.path(ext)).ok();
        let identity = NodeIdentity {
            cert_pem: read("crt")?,
            key_pem: read("key")?,
        };
        (read("ca")? == self.ca && identity.node() == Some((self.node.clone(), true)))
            .then_some(identity)
    }

    fn save(&self, identity: &NodeIdentity) -> Result<()> {
        create_private_dir(&self.dir)?;
        write_private(&self.path("key"), &identity.key_pem)?;
        write_private(&self.path("crt"), &identity.cert_pem)?;
        write_private(&self.path("ca"), &self.ca)
    }
}

/// Registers the node: with the identity it kept (and renews it: a new key and certificate),
/// or else with the bootstrap token, keeping the identity it gets. Returns a client that calls
/// as the node.
async fn register(
    url: &str,
    ca: &str,
    token: &str,
    store: &Identities,
    request: RegisterRequest,
) -> Result<(FeedClient, RegisterResponse)> {
    if let Some(identity) = store.load() {
        let mut client = control_plane_api::connect_as_node(url, ca, &identity).await?;
        let (key_pem, client_csr_pem) = control_plane_api::node_csr(&store.node)?;
        let renewal = RegisterRequest {
            client_csr_pem,
            ..request.clone()
        };
        match session::register(&mut client, renewal).await {
            Ok(registered) => {
                let renewed = NodeIdentity {
                    cert_pem: registered.client_cert_pem.clone(),
                    key_pem,
                };
                store.save(&renewed)?;
                let client = control_plane_api::connect_as_node(url, ca, &renewed).await?;
                return Ok((client, registered));
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "the node's certificate was refused; registering with the bootstrap token"
            ),
        }
    }
    let (client, registered, identity) = control_plane_api::join(url, ca, token, request).await?;
    store.save(&identity)?;
    Ok((client, registered))
}
