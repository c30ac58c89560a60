//! `node-agent`: run the agent, or inspect one.
//!
//! ```text
//! node-agent run --feed https://10.0.0.1:6444 --feed-ca ca.crt --feed-token-file node-token \
//!     --node-name node-1 --node-ip 10.0.0.11 --pod-interfaces 'veth*' --pod-netns '/run/netns/cni-*'
//! node-agent run --kubeconfig /etc/kubernetes/proxy.kubeconfig --node-name node-1
//! node-agent status
//! node-agent services
//! ```

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use node_agent::{
    config::{Cli, Command, ImageCommand},
    http::Status,
};
use node_agent_proxy::{Mode, ProxyConfig};
use tracing_subscriber::EnvFilter;

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The shim forks first thing: before any thread (the logger's included) exists.
    if let Command::Shim {
        runc_root,
        bundle,
        id,
        log,
        cgroup,
    } = &cli.command
    {
        return Ok(node_agent_kubelet::shim::run(
            runc_root, bundle, id, log, cgroup,
        )?);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Shim { .. } => unreachable!("handled above"),
        Command::Image { command } => match command {
            ImageCommand::Import { path, kubelet_root } => {
                let store = node_agent_kubelet::image::ImageStore::new(kubelet_root.join("images"));
                for name in store.import(&path)? {
                    println!("imported {name}");
                }
                Ok(())
            }
            ImageCommand::List { kubelet_root } => {
                let store = node_agent_kubelet::image::ImageStore::new(kubelet_root.join("images"));
                for (name, id) in store.list() {
                    println!("{name:<40} {}", &id[..12.min(id.len())]);
                }
                Ok(())
            }
        },
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(node_agent::agent::run(*args)),
        Command::Status { metrics_addr } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let status: Status = runtime.block_on(async {
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()?
                    .get(format!("http://{metrics_addr}/status"))
                    .send()
                    .await
                    .with_context(|| format!("no agent answers on {metrics_addr}"))?
                    .json()
                    .await
                    .context("read the agent's status")
            })?;
            print_status(&status);
            Ok(())
        }
        Command::Services { pin_dir } => {
            let pinned = ebpf_dataplane::Pinned::open(&pin_dir).with_context(|| {
                format!("open the data plane pinned under {}", pin_dir.display())
            })?;
            println!("{:<24} {:<24} BACKENDS", "FRONTEND", "SCHEDULER");
            for (frontend, spec, backends) in pinned.services()? {
                let mut scheduler = match spec.scheduler {
                    ebpf_dataplane::Scheduler::Random => "random".to_owned(),
                    ebpf_dataplane::Scheduler::Maglev { table_size } => {
                        format!("maglev/{table_size}")
                    }
                };
                if let Some(t) = spec.affinity_timeout {
                    scheduler.push_str(&format!(" affinity {}s", t.as_secs()));
                }
                let backends: Vec<String> = backends.iter().map(ToString::to_string).collect();
                let list = if backends.is_empty() {
                    "(none: new connections are refused)".to_owned()
                } else {
                    backends.join(", ")
                };
                println!("{:<24} {scheduler:<24} {list}", frontend.to_string());
            }
            Ok(())
        }
        Command::Cleanup { pin_dir } => {
            let config = ProxyConfig {
                pin_dir,
                ..ProxyConfig::default()
            };
            for mode in Mode::ALL {
                node_agent_proxy::cleanup_leftovers(mode, &config)
                    .with_context(|| format!("clean up the {mode} mode"))?;
            }
            Ok(())
        }
    }
}

fn print_status(s: &Status) {
    let ago = |t: Option<f64>| t.map_or("never".to_owned(), |t| format!("{t:.1} s ago"));
    println!("node:        {}", s.node);
    println!("mode:        {}", s.mode);
    println!(
        "source:      {} ({}, {} reconnects, {} resyncs, last message {})",
        s.source,
        if s.source_connected {
            "connected"
        } else {
            "disconnected"
        },
        s.source_reconnects,
        s.source_resyncs,
        ago(s.source_last_message_s_ago)
    );
    if let Some(e) = &s.source_last_error {
        println!("             last error: {e}");
    }
    println!(
        "view:        version {}, {} services, {} endpoint slices{}",
        s.view_version,
        s.view_services,
        s.view_slices,
        if s.view_complete {
            ""
        } else {
            " (not complete yet)"
        }
    );
    println!(
        "programmed:  version {}, {} services, {} endpoints, {} kernel objects",
        s.sync.version, s.sync.services, s.sync.endpoints, s.sync.kernel_objects
    );
    println!(
        "last sync:   {} ({}, {} written, {:.1} ms){}",
        ago(s.sync.last_sync_s_ago),
        s.sync.kind,
        s.sync.written,
        s.sync.last_sync_ms,
        s.sync
            .last_error
            .as_ref()
            .map(|e| format!(", failing: {e}"))
            .unwrap_or_default()
    );
    for f in &s.sync.failed {
        println!("not written: {f}");
    }
}
