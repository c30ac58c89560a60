//! `dpctl`: run, inspect and measure the service data plane on its own.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ebpf_dataplane::{Config, Dataplane, Pinned};
use ebpf_dpctl::run;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Own a data plane and keep it equal to a desired-state file (re-read on change).
    Run {
        #[arg(long, default_value = "/sys/fs/bpf/keel")]
        pin_dir: PathBuf,
        /// JSON file: {"interfaces": [...], "services": [...]}.
        #[arg(long)]
        state: PathBuf,
    },
    /// Print the services a pinned data plane holds (read-only: the owner keeps running).
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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run { pin_dir, state } => run::run(&Config::with_pin_dir(pin_dir), &state),
        Command::List { pin_dir } => {
            for (frontend, spec, backends) in Pinned::open(&pin_dir)?.services()? {
                let backends: Vec<String> = backends.iter().map(ToString::to_string).collect();
                println!(
                    "{frontend:<26} {:?} affinity {:?} -> [{}]",
                    spec.scheduler,
                    spec.affinity_timeout,
                    backends.join(", ")
                );
            }
            Ok(())
        }
        Command::Stats { pin_dir, json } => {
            let stats = Pinned::open(&pin_dir)?.stats()?;
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
    }
}
