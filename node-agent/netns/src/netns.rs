//! Network namespaces as hosts: created with iproute2, joined by veth pairs, removed when
//! dropped (also when a test panics). Code runs inside one on a thread of its own, since a
//! network namespace is a per-thread property.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Command, Output},
    thread,
};

use anyhow::{Context, Result, bail};

/// A named network namespace (`ip netns`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with its loopback up. A stale one of the same name (left by a
    /// killed run) is replaced.
    pub fn new(name: &str) -> Result<Self> {
        if File::open(format!("/run/netns/{name}")).is_ok() {
            let _ = ip(&["netns", "del", name]);
        }
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file (`/run/netns/<name>`), for setns(2) by other code.
    pub fn path(&self) -> std::path::PathBuf {
        format!("/run/netns/{}", self.name).into()
    }

    /// Runs `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.ip_forward`, ...).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(move || std::fs::write(&path, value).with_context(|| format!("write {path}")))?
    }

    /// A command that runs inside the namespace. Only the network namespace changes (unlike
    /// `ip netns exec`, which also remounts /sys and would hide bpffs pins from the command).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let fd = self.fd()?;
        let mut cmd = Command::new(program);
        // SAFETY: the hook only calls setns(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || enter(&fd));
        }
        Ok(cmd)
    }

    /// Runs `f` on a thread inside the namespace and waits for it.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let fd = self.fd()?;
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(&fd).expect("setns into a namespace we opened");
                    f()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))
        })
    }

    /// Starts `f` on a thread inside the namespace.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<thread::JoinHandle<R>> {
        let fd = self.fd()?;
        Ok(thread::spawn(move || {
            enter(&fd).expect("setns into a namespace we opened");
            f()
        }))
    }

    fn fd(&self) -> Result<File> {
        File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("open namespace {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces, and with them their veth peers.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: setns on an fd we own; affects only the calling thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a network namespace that outlives any process in it, bound to the file at `path`
/// (what `ip netns add` does, without running it): a pod's sandbox.
pub fn create_at(path: &std::path::Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    File::create(path).with_context(|| format!("create {}", path.display()))?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let made = thread::spawn(move || -> io::Result<()> {
        // SAFETY: unshare moves only this thread into a new network namespace; the bind mount
        // keeps that namespace alive after the thread ends.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            let source = c"/proc/thread-self/ns/net";
            if libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("create a network namespace at {}", path.display()));
    }
    Ok(())
}

/// Removes a namespace made by [`create_at`] (it goes once nothing else holds it).
pub fn remove_at(path: &std::path::Path) -> Result<()> {
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: umount2 with a NUL-terminated path; MNT_DETACH never blocks.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Creates a veth pair: `a_if` in `a`, `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Creates a veth pair between the caller's network namespace (`here_if`) and `ns` (`ns_if`),
/// both up. Removing `ns` removes the pair.
pub fn veth_here(here_if: &str, ns: &Netns, ns_if: &str) -> Result<()> {
    ip(&[
        "link",
        "add",
        here_if,
        "type",
        "veth",
        "peer",
        "name",
        ns_if,
        "netns",
        ns.name(),
    ])?;
    ip(&["link", "set", here_if, "up"])?;
    ns.ip(&["link", "set", ns_if, "up"])?;
    Ok(())
}

/// Runs `ip <args>` in the caller's network namespace.
pub fn ip(args: &[&str]) -> Result<Output> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2; `cargo xtask setup` installs it)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}
