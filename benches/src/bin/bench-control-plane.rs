//! `bench-control-plane [--quick] [--json]`: the API server on the embedded store and on etcd,
//! driven over HTTPS by concurrent clients (see `benches::control_plane`). `cargo xtask bench
//! control-plane` builds it with the `control-plane` binary it starts, and runs it.

use std::time::Instant;

use anyhow::Result;
use benches::{control_plane, report};
use clap::Parser;

fn main() -> Result<()> {
    let report::Flags { quick, json } = report::Flags::parse();
    let opts = if quick {
        control_plane::Options::quick()
    } else {
        control_plane::Options::full()
    };
    let started = Instant::now();
    let mut progress = report::progress(started);
    let report = control_plane::run(&opts, &mut progress)?;
    eprintln!("\r\x1b[2K[{:>4}s] done", started.elapsed().as_secs());
    let machine = report::machine();
    let table = control_plane::markdown(&report, opts.clients, &machine);
    let json_text = serde_json::to_string(&report)?;
    let dir = report::dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("control-plane.md"), &table)?;
    std::fs::write(dir.join("control-plane.json"), &json_text)?;
    print!("{table}");
    println!(
        "\nWritten: {}/control-plane.md, control-plane.json",
        dir.display()
    );
    if json {
        println!("{json_text}");
    }
    Ok(())
}
