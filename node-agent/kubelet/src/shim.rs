//! `node-agent shim`: what keeps a container's process company, as containerd's shims do. It
//! detaches from the agent (forks, and its first process exits at once; the second starts a
//! session of its own), runs `runc run` in the foreground with the container's stdout and
//! stderr appended to its log file, and writes the container's exit code next to its bundle
//! when it ends (`<bundle>/exit`, written whole). The agent may die and come back meanwhile:
//! nothing of the container depends on it.

use std::{
    fs::{self, OpenOptions},
    path::Path,
    process::{Command, Stdio},
};

/// Runs the shim; in the calling process, returns once the detached one is on its way.
pub fn run(runc_root: &Path, bundle: &Path, id: &str, log: &Path) -> std::io::Result<()> {
    // SAFETY: called before any thread exists (the shim's main); the child only continues
    // with ordinary Rust code in a fresh single-threaded process.
    match unsafe { libc::fork() } {
        -1 => return Err(std::io::Error::last_os_error()),
        0 => {}
        _ => return Ok(()),
    }
    // SAFETY: setsid has no preconditions; a new session leaves the agent's process group,
    // so signals meant for the agent do not reach the container.
    unsafe { libc::setsid() };
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let status = Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status();
    let code = match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }
        Err(_) => 255,
    };
    let tmp = bundle.join("exit.tmp");
    if fs::write(&tmp, code.to_string()).is_ok() {
        let _ = fs::rename(&tmp, bundle.join("exit"));
    }
    std::process::exit(0);
}
