//! What the machine spends: CPU time from /proc/stat, and a cgroup to confine the eBPF socket
//! hooks to the load generator of the lab that measures them.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// CPU time all CPUs have spent working since boot: user, nice, system, irq and softirq (idle,
/// iowait and steal are not work done on this machine).
pub fn busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let jiffies: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let work: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| jiffies.get(i).copied().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_micros(work * 1_000_000 / hz))
}

/// CPU time spent while `work` runs; with what it returned.
pub fn spent<T>(work: impl FnOnce() -> Result<T>) -> Result<(Duration, Duration, T)> {
    let (before, started) = (busy()?, Instant::now());
    let value = work()?;
    Ok((busy()?.saturating_sub(before), started.elapsed(), value))
}

/// The machine's CPU time per second of wall time with nothing offered (timers, daemons, the
/// idle labs), measured over `over`.
pub fn background(over: Duration) -> Result<f64> {
    let (cpu, wall, ()) = spent(|| {
        std::thread::sleep(over);
        Ok(())
    })?;
    Ok(cpu.as_secs_f64() / wall.as_secs_f64())
}

/// A cgroup v2 directory of its own; this process moves in only while it should be seen by
/// hooks attached to it, and back to where it was after.
pub struct Cgroup {
    pub dir: PathBuf,
    home: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Self> {
        let root = node_agent_proxy::cgroup2_root()?;
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let own = std::fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
        let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
            bail!("this process is in no cgroup v2");
        };
        let home = root.join(path.trim_start_matches('/'));
        Ok(Self { dir, home })
    }

    /// Moves this process (every thread) in until the guard is dropped.
    pub fn enter(&self) -> Result<Entered<'_>> {
        move_self(&self.dir)?;
        Ok(Entered(self))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = move_self(&self.home);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// While alive, this process is in the cgroup.
pub struct Entered<'a>(&'a Cgroup);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let _ = move_self(&self.0.home);
    }
}

fn move_self(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("move into {}", cgroup.display()))
}
