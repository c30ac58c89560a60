//! `bench-dataplane [--quick] [--json]`: per-packet cost of the data path under
//! BPF_PROG_TEST_RUN for 1 to 100,000 services (see `benches::dataplane`). Run as root;
//! `cargo xtask bench dataplane` builds and runs it.

use std::io::Write;

use anyhow::Result;
use benches::{dataplane, report};
use clap::Parser;

fn main() -> Result<()> {
    let report::Flags { quick, json } = report::Flags::parse();
    let rounds = if quick { 3 } else { 9 };
    let report = dataplane::bench(rounds, |step| {
        eprint!("\r\x1b[2K{step}");
        let _ = std::io::stderr().flush();
    })?;
    eprintln!("\r\x1b[2K");
    print!("{}", dataplane::table(&report));
    if json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
