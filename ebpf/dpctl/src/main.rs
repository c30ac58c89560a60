//! `dpctl`: run, inspect and measure the service data plane on its own.

use std::{io::Write, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};
use ebpf_dataplane::{Config, Dataplane};
use ebpf_dpctl::{bench, demo, run};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a lab of network namespaces and show the data plane carrying real traffic.
    Demo,
    /// Own a data plane and keep it equal to a desired-state file (re-read on change).
    Run {
        #[arg(long, default_value = "/sys/fs/bpf/keel")]
        pin_dir: PathBuf,
        /// JSON file: {"interfaces": [...], "services": [...]}.
        #[arg(long)]
        state: PathBuf,
    },
    /// Print the services a pinned data plane holds.
    List {
        #[arg(long, default_value = "/sys/fs/bpf/keel")]
        pin_dir: PathBuf,
    },
    /// Print a pinned data plane's counters.
    Stats {
        #[arg(long, default_value = "/sys/fs/bpf/keel")]
        pin_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Detach a pinned data plane everywhere and remove its pins (drops its flows).
    Destroy {
        #[arg(long, default_value = "/sys/fs/bpf/keel")]
        pin_dir: PathBuf,
    },
    /// Per-packet cost under BPF_PROG_TEST_RUN for 1 to 100,000 services.
    Bench {
        /// Fewer rounds (under a minute).
        #[arg(long)]
        quick: bool,
        /// End with one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Demo => demo::demo(),
        Command::Run { pin_dir, state } => run::run(&Config::with_pin_dir(pin_dir), &state),
        Command::List { pin_dir } => {
            let dataplane = Dataplane::open(&Config::with_pin_dir(pin_dir))?;
            for (frontend, state) in dataplane.services() {
                let backends: Vec<String> =
                    state.backends.iter().map(ToString::to_string).collect();
                println!(
                    "{frontend:<26} {:?} affinity {:?} -> [{}]",
                    state.spec.scheduler,
                    state.spec.affinity_timeout,
                    backends.join(", ")
                );
            }
            Ok(())
        }
        Command::Stats { pin_dir, json } => {
            let stats = Dataplane::open(&Config::with_pin_dir(pin_dir))?.stats()?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> = stats
                    .iter()
                    .map(|(c, v)| (c.name().to_owned(), v.into()))
                    .collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                for (counter, value) in stats.iter() {
                    println!("{:<22} {value}", counter.name());
                }
            }
            Ok(())
        }
        Command::Destroy { pin_dir } => {
            Ok(Dataplane::open(&Config::with_pin_dir(pin_dir))?.destroy()?)
        }
        Command::Bench { quick, json } => {
            let rounds = if quick { 3 } else { 9 };
            let report = bench::bench(rounds, |step| {
                eprint!("\r\x1b[2K{step}");
                let _ = std::io::stderr().flush();
            })?;
            eprintln!("\r\x1b[2K");
            print!("{}", bench::table(&report));
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(())
        }
    }
}
