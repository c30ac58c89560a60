//! `node-agent shim`: what keeps a container's process company, as containerd's shims do. It
//! detaches from the agent (forks, and its first process exits at once; the second starts a
//! session of its own), becomes a child subreaper, and has runc start the container detached
//! with the container's stdout and stderr appended to its log file. The container's first
//! process then becomes the shim's child: the shim waits for it, reads whether its memory
//! cgroup saw the OOM killer (runc has not removed that cgroup yet), and writes what it found
//! next to the bundle (`<bundle>/started` once runc has started it, `<bundle>/oom`, then
//! `<bundle>/exit`, each written whole). The agent may die and come back meanwhile: nothing of
//! the container depends on it.

use std::{
    fs::{self, OpenOptions},
    path::Path,
    process::{Command, Stdio},
};

/// Runs the shim; in the calling process, returns once the detached one is on its way.
pub fn run(
    runc_root: &Path,
    bundle: &Path,
    id: &str,
    log: &Path,
    cgroup: &str,
) -> std::io::Result<()> {
    // SAFETY: called before any thread exists (the shim's main); the child only continues
    // with ordinary Rust code in a fresh single-threaded process.
    match unsafe { libc::fork() } {
        -1 => return Err(std::io::Error::last_os_error()),
        0 => {}
        _ => return Ok(()),
    }
    // SAFETY: setsid and prctl have no preconditions. A new session leaves the agent's process
    // group; as a subreaper, the container's process (runc's orphan) becomes our child.
    unsafe {
        libc::setsid();
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let code = supervise(runc_root, bundle, id, log, cgroup).unwrap_or(255);
    write_whole(&bundle.join("exit"), &code.to_string());
    std::process::exit(0);
}

fn supervise(
    runc_root: &Path,
    bundle: &Path,
    id: &str,
    log: &Path,
    cgroup: &str,
) -> std::io::Result<i32> {
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let pid_file = bundle.join("pid");
    let status = Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .arg("run")
        .arg("--detach")
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()?;
    if !status.success() {
        return Ok(255);
    }
    let pid: libc::pid_t = fs::read_to_string(&pid_file)?
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("runc wrote no pid"))?;
    write_whole(&bundle.join(crate::runtime::STARTED), &pid.to_string());
    loop {
        let mut raw = 0;
        // SAFETY: waitpid fills `raw`; we reap every orphan that comes our way.
        let reaped = unsafe { libc::waitpid(-1, &mut raw, 0) };
        if reaped == -1 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if reaped != pid {
            continue;
        }
        let oom = fs::read_to_string(format!("/sys/fs/cgroup/memory{cgroup}/memory.oom_control"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        if oom > 0 {
            write_whole(&bundle.join("oom"), &oom.to_string());
        }
        return Ok(if libc::WIFEXITED(raw) {
            libc::WEXITSTATUS(raw)
        } else if libc::WIFSIGNALED(raw) {
            128 + libc::WTERMSIG(raw)
        } else {
            255
        });
    }
}

fn write_whole(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    if fs::write(&tmp, content).is_ok() {
        let _ = fs::rename(&tmp, path);
    }
}
