//! `bench-cluster [--quick] [--json] [--services 1,10000]`: the eBPF data plane against
//! kube-proxy's iptables and nftables rules, side by side in one run (see `benches::cluster`).
//! Run as root; `cargo xtask bench cluster` builds and runs it
//! (`target/release/bench-cluster` afterwards, for other service counts).

use std::time::Instant;

use anyhow::Result;
use benches::{cluster, report};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    flags: report::Flags,
    /// Service counts to measure, instead of the run's own (full: 1,1000,10000,50000; quick:
    /// 1,10000)
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<u32>>,
}

fn main() -> Result<()> {
    let Args {
        flags: report::Flags { quick, json },
        services,
    } = Args::parse();
    let mut opts = if quick {
        cluster::Options::quick()
    } else {
        cluster::Options::full()
    };
    if let Some(services) = services {
        opts.services = services;
    }
    let started = Instant::now();
    let mut progress = report::progress(started);
    let rows = cluster::run(&opts, &mut progress)?;
    eprintln!("\r\x1b[2K[{:>4}s] done", started.elapsed().as_secs());
    let machine = report::machine();
    let dir = report::dir();
    let json_text = report::write(&dir, &rows, &machine)?;
    print!("{}", report::markdown(&rows, &machine));
    println!(
        "\nWritten: {}/cluster.md, cluster.json, cps.svg, cps_p99.svg, cpu_per_conn.svg, program.svg",
        dir.display()
    );
    if json {
        println!("{json_text}");
    }
    Ok(())
}
