//! The control plane's feed: register this node (addresses, capacity, labels, zone), renew its
//! lease, and follow the Watch stream with the agents' session code
//! (`control_plane_api::session`): resume after a dropped connection or a control-plane
//! restart, a fresh snapshot when a message does not fit.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use control_plane_api::{
    convert::ZONE_LABEL,
    feed::{RegisterRequest, Resources},
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

    // The control plane may not be up yet: keep trying, as after any outage.
    let mut backoff = Backoff::default();
    let mut client = loop {
        match control_plane_api::connect(&url, &ca, &token).await {
            Ok(client) => break client,
            Err(e) => {
                tracing::warn!(url = %url, error = format!("{e:#}"), "cannot reach the feed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
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
    };
    let registered = session::register(&mut client, request).await;
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
