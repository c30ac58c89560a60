//! `dpctl run`: owns a data plane and keeps it equal to a desired-state file, re-reading the
//! file when it changes. Killing it (even with SIGKILL) leaves the data plane running from its
//! pins; starting it again adopts them without disturbing a flow.

use std::{
    io::Write,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use ebpf_dataplane::{Config, Dataplane, GC_PERIOD};

use crate::state::State;

pub fn run(config: &Config, state_path: &Path) -> Result<()> {
    let mut dataplane = Dataplane::open(config).context("open the data plane")?;
    let adopted = dataplane.services().count();
    let mut seen = None;
    let mut next_collect = Instant::now() + GC_PERIOD;
    loop {
        if Instant::now() >= next_collect {
            next_collect = Instant::now() + GC_PERIOD;
            // Flows idle past their lifetime; closed ones the programs remove themselves.
            if let Err(e) = dataplane.gc() {
                eprintln!("dpctl: collecting conntrack: {e:#}");
            }
        }
        let modified = modified(state_path)?;
        if Some(modified) != seen {
            seen = Some(modified);
            match apply(&mut dataplane, state_path) {
                Ok(summary) => {
                    println!("dpctl: ready: {summary} (adopted {adopted} services from pins)")
                }
                // A bad file is reported and the data plane keeps its last good state.
                Err(e) => eprintln!(
                    "dpctl: {}: {e:#}; keeping the current state",
                    state_path.display()
                ),
            }
            std::io::stdout().flush()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn apply(dataplane: &mut Dataplane, state_path: &Path) -> Result<String> {
    let state = State::load(state_path)?;
    let desired = state.desired()?;
    for iface in &state.interfaces {
        dataplane
            .attach(iface, &[])
            .with_context(|| format!("attach to {iface}"))?;
    }
    let report = dataplane.sync(desired).check()?;
    Ok(format!(
        "{} services on {:?} ({} created, {} updated, {} deleted, {} unchanged)",
        dataplane.services().count(),
        state.interfaces,
        report.created,
        report.updated,
        report.deleted,
        report.unchanged
    ))
}

fn modified(path: &Path) -> Result<SystemTime> {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("stat {}", path.display()))
}
