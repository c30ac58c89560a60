//! `bench-cluster [--quick] [--json]`: the eBPF data plane against kube-proxy's iptables and
//! nftables rules, side by side in one run (see `benches::cluster`). Run as root; `cargo xtask
//! bench cluster` builds and runs it.

use std::time::Instant;

use anyhow::Result;
use benches::{cluster, report};
use clap::Parser;

fn main() -> Result<()> {
    let report::Flags { quick, json } = report::Flags::parse();
    let opts = if quick {
        cluster::Options::quick()
    } else {
        cluster::Options::full()
    };
    let started = Instant::now();
    let mut progress = report::progress(started);
    let rows = cluster::run(&opts, &mut progress)?;
    eprintln!("\r\x1b[2K[{:>4}s] done", started.elapsed().as_secs());
    let machine = report::machine();
    let dir = report::dir();
    let json_text = report::write(&dir, &rows, &machine)?;
    print!("{}", report::markdown(&rows, &machine));
    println!(
        "\nWritten: {}/cluster.md, cluster.json, cps.svg, cps_p99.svg, program.svg",
        dir.display()
    );
    if json {
        println!("{json_text}");
    }
    Ok(())
}
