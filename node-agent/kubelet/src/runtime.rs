//! Containers through a real OCI runtime, Debian's `runc`. Each container is an OCI bundle
//! under the kubelet's root: a `config.json` (written with the `oci-spec` types) and a root
//! filesystem that is an overlay on the image's unpacked root (the image stays untouched, each
//! container writes its own layer). The container joins its pod's network namespace and gets
//! mount, PID, UTS and IPC namespaces of its own; CPU and memory limits go into the OCI
//! resources and runc applies them on whichever cgroup hierarchy the host has (v1 here).
//!
//! A container runs under a shim (`node-agent shim`, [`crate::shim`]): a process detached from
//! the agent that runs `runc run` in the foreground, so the container's stdout and stderr go to
//! its log file and its exit code is written next to its bundle when it ends. The agent can
//! crash or restart without its containers noticing, and finds them again from the bundles
//! and runc's state.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxResourcesBuilder, MountBuilder, Spec,
};
use serde::Deserialize;

use crate::image::Image;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runc {args}: {stderr}")]
    Runc { args: String, stderr: String },
    #[error("{0}")]
    Spec(String),
    #[error("container {id} did not start within {timeout:?}; its log says: {log}")]
    NotStarted {
        id: String,
        timeout: Duration,
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

/// Everything runc needs to start one container.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    /// `<pod uid>-<container name>`.
    pub id: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    /// The pod's network namespace.
    pub netns: PathBuf,
    /// What is bind-mounted into the container: the pod's `/etc/hosts` and `/etc/resolv.conf`,
    /// its volumes.
    pub mounts: Vec<BindMount>,
    /// cgroup of the container, under each hierarchy (`/keel/<pod uid>/<container>`).
    pub cgroup: String,
    /// `resources.limits.cpu` in millicores.
    pub cpu_limit_millis: Option<i64>,
    /// `resources.requests.cpu` in millicores (CPU shares).
    pub cpu_request_millis: Option<i64>,
    /// `resources.limits.memory` in bytes.
    pub memory_limit: Option<i64>,
    /// Where stdout and stderr go.
    pub log: PathBuf,
}

/// A directory or file of the node bind-mounted into a container.
#[derive(Clone, Debug, PartialEq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// The file a container's shim writes in its bundle once runc started the container.
pub const STARTED: &str = "started";

/// What `runc state` says.
#[derive(Clone, Debug, Deserialize)]
pub struct State {
    /// `created`, `running`, `paused`, `stopped`.
    pub status: String,
    pub pid: i64,
}

pub struct Runtime {
    root: PathBuf,
    runc_root: PathBuf,
    /// The binary that runs `node-agent shim` (this process's own).
    agent_binary: PathBuf,
}

impl Runtime {
    /// A runtime keeping bundles under `root/containers` and runc's state under `root/runc`.
    pub fn new(root: &Path, agent_binary: PathBuf) -> Self {
        Self {
            root: root.join("containers"),
            runc_root: root.join("runc"),
            agent_binary,
        }
    }

    pub fn bundle(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(&self.runc_root);
        cmd
    }

    fn runc_output(&self, args: &[&str]) -> Result<Vec<u8>, RuntimeError> {
        let out = self
            .runc()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io("run runc (`cargo xtask setup` installs it)"))?;
        if !out.status.success() {
            return Err(RuntimeError::Runc {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(out.stdout)
    }

    /// Creates the bundle and starts the container under its shim; returns when runc says it
    /// runs (or it already ended: a container may exit at once).
    pub fn start(&self, image: &Image, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        let bundle = self.bundle(&spec.id);
        // A previous run of the same container (a restart) goes first.
        self.remove(&spec.id)?;
        let (upper, work, rootfs) = (
            bundle.join("upper"),
            bundle.join("work"),
            bundle.join("rootfs"),
        );
        for dir in [&upper, &work, &rootfs] {
            fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        }
        mount_overlay(&image.rootfs, &upper, &work, &rootfs)?;
        let config = oci_config(spec)?;
        config
            .save(bundle.join("config.json"))
            .map_err(|e| RuntimeError::Spec(format!("write config.json: {e}")))?;
        if let Some(dir) = spec.log.parent() {
            fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        }
        // The shim detaches at once (it forks and its first process exits): wait for that.
        let status = Command::new(&self.agent_binary)
            .arg("shim")
            .arg("--runc-root")
            .arg(&self.runc_root)
            .arg("--bundle")
            .arg(&bundle)
            .arg("--id")
            .arg(&spec.id)
            .arg("--log")
            .arg(&spec.log)
            .arg("--cgroup")
            .arg(&spec.cgroup)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(io("start the container's shim"))?;
        if !status.success() {
            return Err(RuntimeError::Spec(format!("the shim failed: {status}")));
        }
        // The shim marks the container started once `runc run` returned (or ended, when it
        // exits at once or runc failed): files, so waiting costs no runc invocations.
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;
        loop {
            if bundle.join(STARTED).exists() || self.exit_code(&spec.id).is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(&spec.log).unwrap_or_default();
                return Err(RuntimeError::NotStarted {
                    id: spec.id.clone(),
                    timeout,
                    log: log.lines().rev().take(5).collect::<Vec<_>>().join(" / "),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// runc's view of a container; `None` when runc does not know it.
    pub fn state(&self, id: &str) -> Option<State> {
        let out = self.runc_output(&["state", id]).ok()?;
        serde_json::from_slice(&out).ok()
    }

    /// The exit code the shim recorded when the container ended (128+n for signal n).
    pub fn exit_code(&self, id: &str) -> Option<i32> {
        fs::read_to_string(self.bundle(id).join("exit"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the OOM killer ended the container (its shim read the container's memory
    /// cgroup when it ended).
    pub fn oom_killed(&self, id: &str) -> bool {
        self.bundle(id).join("oom").exists()
    }

    /// Sends a signal to the container's processes.
    pub fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.runc_output(&["kill", "--all", id, signal]).map(drop)
    }

    /// Runs a command in the container; (exit code, output), killed after `timeout`.
    pub fn exec(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<(i32, String), RuntimeError> {
        let mut child = self
            .runc()
            .arg("exec")
            .arg(id)
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("run runc exec"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().map_err(io("wait for runc exec"))? {
                let out = child.wait_with_output().map_err(io("read runc exec"))?;
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                return Ok((status.code().unwrap_or(128 + status_signal(&status)), text));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok((-1, format!("timed out after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes the container: runc's state, its root filesystem, its bundle (logs stay).
    pub fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        // runc keeps a directory per container it knows under its root.
        if self.runc_root.join(id).exists() {
            let _ = self.runc_output(&["delete", "--force", id]);
        }
        let bundle = self.bundle(id);
        let rootfs = bundle.join("rootfs");
        if rootfs.exists() {
            unmount(&rootfs);
        }
        match fs::remove_dir_all(&bundle) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("remove {}", bundle.display()))(e))
            }
            _ => Ok(()),
        }
    }

    /// Removes a pod's own cgroup in every hierarchy (runc removes only its containers').
    pub fn remove_cgroup(&self, cgroup: &str) {
        let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in hierarchies.flatten() {
            let _ = fs::remove_dir(h.path().join(cgroup.trim_start_matches('/')));
        }
    }

    /// The containers with a bundle on this node (after an agent restart: what to adopt).
    pub fn bundles(&self) -> Vec<String> {
        fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn status_signal(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.signal().unwrap_or(0)
}

fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), RuntimeError> {
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL");
    let (source, fstype) = (c(Path::new("overlay")), c(Path::new("overlay")));
    let (target_c, data) = (c(target), std::ffi::CString::new(options).expect("no NUL"));
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        // The commonest cause, named: the kubelet's directory is itself on an overlay (a
        // container's root), which cannot be another overlay's upper layer.
        let hint = if on_overlayfs(upper) {
            format!(
                " ({} is on overlayfs, which cannot hold an overlay's upper layer: give the \
                 kubelet a directory on another file system)",
                upper.display()
            )
        } else {
            String::new()
        };
        return Err(io(format!(
            "mount the root filesystem at {}{hint}",
            target.display()
        ))(error));
    }
    Ok(())
}

/// Whether `path` is on an overlay file system.
fn on_overlayfs(path: &Path) -> bool {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == OVERLAYFS_SUPER_MAGIC
    }
}

fn unmount(target: &Path) {
    if let Ok(c) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 with a NUL-terminated path; MNT_DETACH never blocks.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The container's `config.json`: runc's defaults (mounts, capabilities, masked paths), the
/// process, the pod's network namespace and files, the resources.
fn oci_config(spec: &ContainerSpec) -> Result<Spec, RuntimeError> {
    let invalid = |e: oci_spec::OciSpecError| RuntimeError::Spec(e.to_string());
    let mut config = Spec::default();
    config.set_hostname(Some(spec.hostname.clone()));
    let mut root = config.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from("rootfs"));
    root.set_readonly(Some(false));
    config.set_root(Some(root));
    let mut process = config.process().clone().unwrap_or_default();
    process.set_args(Some(spec.args.clone()));
    process.set_env(Some(spec.env.clone()));
    process.set_cwd(PathBuf::from(if spec.cwd.is_empty() {
        "/"
    } else {
        &spec.cwd
    }));
    process.set_terminal(Some(false));
    config.set_process(Some(process));

    let mut mounts = config.mounts().clone().unwrap_or_default();
    for m in &spec.mounts {
        mounts.push(
            MountBuilder::default()
                .destination(&m.destination)
                .typ("bind")
                .source(&m.source)
                .options(vec![
                    "rbind".into(),
                    if m.read_only { "ro" } else { "rw" }.into(),
                ])
                .build()
                .map_err(invalid)?,
        );
    }
    config.set_mounts(Some(mounts));

    let mut linux = config.linux().clone().unwrap_or_default();
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .chain([LinuxNamespaceBuilder::default()
        .typ(LinuxNamespaceType::Network)
        .path(spec.netns.clone())
        .build()])
    .collect::<Result<Vec<_>, _>>()
    .map_err(invalid)?;
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(PathBuf::from(&spec.cgroup)));
    let mut resources = LinuxResourcesBuilder::default();
    let mut cpu = LinuxCpuBuilder::default();
    let mut any_cpu = false;
    if let Some(limit) = spec.cpu_limit_millis {
        // kubelet's conversion: quota over a 100 ms period.
        cpu = cpu.quota(limit * 100).period(100_000u64);
        any_cpu = true;
    }
    if let Some(request) = spec.cpu_request_millis {
        cpu = cpu.shares(((request * 1024) / 1000).max(2) as u64);
        any_cpu = true;
    }
    if any_cpu {
        resources = resources.cpu(cpu.build().map_err(invalid)?);
    }
    if let Some(limit) = spec.memory_limit {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .build()
                .map_err(invalid)?,
        );
    }
    linux.set_resources(Some(resources.build().map_err(invalid)?));
    config.set_linux(Some(linux));
    Ok(config)
}
