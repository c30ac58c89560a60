//! Running the rule tools (iptables, iptables-restore, nft) with their input on stdin.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A rule tool ran past the sync timeout and was killed; the kernel kept its previous state
/// (iptables-restore and nft commit all or nothing).
#[derive(Debug, thiserror::Error)]
#[error("{program} ran past the {timeout:?} sync timeout and was stopped; nothing was applied")]
pub struct SyncTimedOut {
    pub program: String,
    pub timeout: Duration,
}

/// Runs `program args` with `input` on stdin; fails with its stderr, or with [`SyncTimedOut`]
/// if it runs longer than `timeout`.
pub fn run_with_input(
    program: &str,
    args: &[&str],
    input: &str,
    timeout: Option<Duration>,
) -> Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {program} (`cargo xtask setup` installs it)"))?;
    let mut stdin = child.stdin.take().expect("piped");
    // Write on another thread: a tool that fails early stops reading and would block us.
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    if let Some(timeout) = timeout {
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = writer.join();
                return Err(SyncTimedOut {
                    program: program.to_owned(),
                    timeout,
                }
                .into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let output = child.wait_with_output()?;
    let written = writer.join().expect("writer thread");
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    written.with_context(|| format!("write to {program}"))
}

/// Runs `program args` and returns its stdout; `None` if it failed (e.g. nothing to list).
pub fn output(program: &str, args: &[&str]) -> Result<Option<String>> {
    let output = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("run {program} (`cargo xtask setup` installs it)"))?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// kube-proxy's chain-name hash: base32 of SHA-256 of `input`, truncated.
pub fn hash(input: &str, len: usize) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = data_encoding::BASE32.encode(&digest);
    encoded.truncate(len);
    encoded
}
