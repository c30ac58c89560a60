//! `bench-nodeport [--quick] [--json]`: NodePort forwarding to another node's backend in the
//! eBPF data plane (XDP and tc) and kube-proxy's iptables and nftables rules, side by side in
//! one run (see `benches::nodeport`). Run as root; `cargo xtask bench nodeport` builds and
//! runs it.

use std::time::Instant;

use anyhow::Result;
use benches::{nodeport, report};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    flags: report::Flags,
    /// Service counts to measure, instead of the run's own (full: 1,10000; quick: 1)
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<u32>>,
}

fn main() -> Result<()> {
    let Args {
        flags: report::Flags { quick, json },
        services,
    } = Args::parse();
    let mut opts = if quick {
        nodeport::Options::quick()
    } else {
        nodeport::Options::full()
    };
    if let Some(services) = services {
        opts.services = services;
    }
    let started = Instant::now();
    let mut progress = report::progress(started);
    let rows = nodeport::run(&opts, &mut progress)?;
    eprintln!("\r\x1b[2K[{:>4}s] done", started.elapsed().as_secs());
    let machine = report::machine();
    let table = nodeport::markdown(&rows, &machine);
    let dir = report::dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("nodeport.md"), &table)?;
    // One line: with --json, stdout ends with it.
    let json_text = serde_json::to_string(&serde_json::json!({ "results": rows }))?;
    std::fs::write(dir.join("nodeport.json"), &json_text)?;
    print!("{table}");
    println!("\nWritten: {}/nodeport.md, nodeport.json", dir.display());
    if json {
        println!("{json_text}");
    }
    Ok(())
}
