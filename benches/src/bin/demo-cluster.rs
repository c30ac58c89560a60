//! `demo-cluster [--keep]` and `demo-cluster down`: the cluster demo (see
//! `benches::cluster_demo`). Run as root; `cargo xtask demo` and `cargo xtask down` build and
//! run it.

use anyhow::Result;
use benches::cluster_demo;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    /// Leave the cluster up at the end (`cargo xtask down` removes it)
    #[arg(long)]
    keep: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Remove a cluster a `--keep` demo left
    Down,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Down) => cluster_demo::down(),
        None => cluster_demo::run(cli.keep),
    }
}
