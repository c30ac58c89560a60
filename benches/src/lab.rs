//! A whole cluster on one machine, for the demo, the end-to-end tests and the benchmarks: a
//! control plane (embedded store) serving on the host's end of a bridged node network, and
//! nodes as network namespaces on that network, each running `node-agent run --run-pods`
//! (proxy, kubelet and CNI). Images are built from this machine's files (Debian's static
//! busybox, the project's `keel-echo`) and imported into every node's store. Everything goes
//! when the lab is dropped: agents, pods (their containers, namespaces, cgroups), pins.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use control_plane::launch::{Api, Process};
use node_agent::launch::AgentProcess;
use node_agent_kubelet::image::{
    ImageConfig, ImageSpec, ImageStore, build_layout, shared_libraries,
};
use node_agent_netns::{
    lab::{NodeNetwork, set_tx_checksum},
    netns::Netns,
};

/// The images every node of a lab has.
pub const BUSYBOX: &str = "busybox:latest";
pub const ECHO: &str = "keel/echo:latest";

pub struct Options {
    /// Names start with this (namespaces, pins): unique per lab.
    pub prefix: String,
    pub nodes: usize,
    /// The control plane's node monitor grace period, seconds.
    pub node_grace: f64,
    /// The kubelet's restart back-off, first step (seconds).
    pub restart_backoff: f64,
    /// Keep the lab's files (for `--keep`): under this directory instead of a temporary one.
    pub dir: Option<PathBuf>,
    /// The agents' `RUST_LOG` (their logs go to stderr with the node's name in front).
    pub agent_log: &'static str,
    /// The agents' `--proxy-mode` (`ebpf`, `iptables`, `nftables`), with `-xdp` (`--xdp
    /// native`) and/or `-dsr` (`--lb-mode dsr`) after `ebpf`: `ebpf-xdp`, `ebpf-dsr`.
    pub proxy_mode: &'static str,
}

/// The binaries a lab runs.
pub struct Binaries {
    pub control_plane: PathBuf,
    pub node_agent: PathBuf,
    pub keel_echo: PathBuf,
}

impl Binaries {
    /// The binaries next to the running one (cargo puts a workspace's binaries together).
    pub fn siblings() -> Result<Self> {
        Ok(Self {
            control_plane: sibling_binary("control-plane")?,
            node_agent: sibling_binary("node-agent")?,
            keel_echo: sibling_binary("keel-echo")?,
        })
    }
}

/// The workspace's binary `name` next to the running one, or next to the directory of a test
/// binary (which lives one level down, in deps/).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    [exe.parent(), exe.parent().and_then(Path::parent)]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not built (`cargo build --workspace --bins`)"))
}

pub struct LabNode {
    pub name: String,
    pub ns: Netns,
    pub addr: Ipv4Addr,
    pub agent: AgentProcess,
    pub pin_dir: PathBuf,
    pub root: PathBuf,
}

pub struct ClusterLab {
    // Dropped in this order: agents and their pods, the control plane, the network.
    pub nodes: Vec<LabNode>,
    pub cp: Process,
    pub api: Api,
    pub network: NodeNetwork,
    /// The addresses the control plane hands LoadBalancer services (a /28 of the node
    /// network's /24, from .224).
    pub load_balancer_pool: (Ipv4Addr, u8),
    pub dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    binaries: Binaries,
    prefix: String,
}

impl ClusterLab {
    pub fn start(
        opts: &Options,
        binaries: Binaries,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (tempdir, dir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, std::fs::canonicalize(d)?)
            }
            None => {
                let t = tempfile::Builder::new().prefix("keel-lab-").tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        progress("building the node network");
        let mut network = NodeNetwork::new(&opts.prefix)?;
        if opts.proxy_mode.contains("-xdp") {
            network.accept_xdp_frames()?;
        }
        let mut namespaces = Vec::new();
        for i in 0..opts.nodes {
            let ns = Netns::new(&format!("{}-node{i}", opts.prefix))?;
            let addr = network.add(&ns, "eth0")?;
            namespaces.push((format!("node-{i}"), ns, addr));
        }
        progress("starting the control plane");
        let load_balancer_pool = (Ipv4Addr::from(u32::from(network.host) - 1 + 224), 28);
        let cp = Process::start_on(
            &binaries.control_plane,
            &format!("embedded:{}", dir.join("store").display()),
            &dir.join("control-plane"),
            network.host.into(),
            &[
                "--node-monitor-grace-period",
                &opts.node_grace.to_string(),
                "--load-balancer-ips",
                &format!("{}/{}", load_balancer_pool.0, load_balancer_pool.1),
            ],
        )?;
        let api = Api::new(&cp)?;
        progress("building images (busybox, keel-echo)");
        let layouts = build_images(&dir.join("images"), &binaries.keel_echo)?;
        let mut nodes = Vec::new();
        for (name, ns, addr) in namespaces {
            progress(&format!("starting {name}'s agent"));
            let root = dir.join(&name);
            let store = ImageStore::new(root.join("images"));
            for layout in &layouts {
                store.import(layout)?;
            }
            let pin_dir = PathBuf::from(format!("/sys/fs/bpf/keel-{}-{name}", opts.prefix));
            let metrics = SocketAddr::from((addr, 10249));
            let mut args: Vec<String> = vec![
                "run".into(),
                "--node-name".into(),
                name.clone(),
                "--node-ip".into(),
                addr.to_string(),
                "--feed".into(),
                cp.feed_url.clone(),
                "--feed-ca".into(),
                cp.ca_file().display().to_string(),
                "--feed-token-file".into(),
                cp.node_token.display().to_string(),
                "--feed-credentials-dir".into(),
                cp.node_credentials_dir().display().to_string(),
                "--heartbeat".into(),
                "1".into(),
                "--pin-dir".into(),
                pin_dir.display().to_string(),
                "--run-pods".into(),
                "--kubelet-root".into(),
                root.display().to_string(),
                "--restart-backoff".into(),
                opts.restart_backoff.to_string(),
                "--metrics-addr".into(),
                metrics.to_string(),
            ];
            args.extend(proxy_args(opts.proxy_mode));
            let (ns_path, binary, log) = (ns.path(), binaries.node_agent.clone(), opts.agent_log);
            let agent = AgentProcess::start(&name, metrics, move || {
                let mut cmd = in_netns(&ns_path, &binary)?;
                cmd.args(&args).env("RUST_LOG", log);
                Ok(cmd)
            })?;
            nodes.push(LabNode {
                name,
                ns,
                addr,
                agent,
                pin_dir,
                root,
            });
        }
        for node in &mut nodes {
            node.agent.wait_healthy(Duration::from_secs(60))?;
        }
        Ok(Self {
            nodes,
            cp,
            api,
            network,
            load_balancer_pool,
            dir,
            _tempdir: tempdir,
            binaries,
            prefix: opts.prefix.clone(),
        })
    }

    /// A host outside the cluster on the node network (a namespace removed when dropped): a
    /// client of NodePorts and external addresses. `routes` send prefixes (ExternalIPs, the
    /// LoadBalancer pool) to a node, as the router announcing them would.
    pub fn outside_host(
        &mut self,
        name: &str,
        routes: &[((Ipv4Addr, u8), Ipv4Addr)],
    ) -> Result<(Netns, Ipv4Addr)> {
        let ns = Netns::new(&format!("{}-{name}", self.prefix))?;
        let addr = self.network.add(&ns, "eth0")?;
        // Full checksums, as frames from a wire carry them: over a veth the stack would leave
        // them to an offload that never comes (CHECKSUM_PARTIAL), which XDP cannot complete.
        ns.run(|| set_tx_checksum("eth0", false))?
            .context("turn off checksum offload")?;
        for ((dest, len), via) in routes {
            ns.ip(&[
                "route",
                "add",
                &format!("{dest}/{len}"),
                "via",
                &via.to_string(),
            ])?;
        }
        Ok((ns, addr))
    }

    /// Runs kubectl (the venv's) against the lab.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        Command::new(kubectl_path())
            .args(args)
            .env("KUBECONFIG", &self.cp.kubeconfig)
            .output()
            .context("run kubectl (`cargo xtask setup` installs it)")
    }

    /// kubectl that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies a manifest (YAML or JSON) with kubectl.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        let path = self.dir.join(format!(
            "manifest-{}.yaml",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        std::fs::write(&path, manifest)?;
        self.kubectl_ok(&["apply", "-f", &path.display().to_string()])
    }

    /// The pods matching `selector` (kubectl's JSON).
    pub fn pods(&self, selector: &str) -> Result<Vec<serde_json::Value>> {
        let out = self.kubectl_ok(&["get", "pods", "-l", selector, "-o", "json"])?;
        let list: serde_json::Value = serde_json::from_str(&out)?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `count` pods matching `selector` are Running and Ready.
    pub fn wait_ready(
        &self,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let pods = self.pods(selector)?;
            let ready: Vec<serde_json::Value> = pods
                .iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .filter(|p| {
                    p["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .cloned()
                .collect();
            if ready.len() >= count {
                return Ok(ready);
            }
            if Instant::now() > deadline {
                let summary: Vec<String> = pods
                    .iter()
                    .map(|p| {
                        format!(
                            "{} {} {}",
                            p["metadata"]["name"].as_str().unwrap_or(""),
                            p["status"]["phase"].as_str().unwrap_or("?"),
                            p["status"]["containerStatuses"]
                        )
                    })
                    .collect();
                bail!(
                    "{} of {count} pods {selector} ready after {timeout:?}: {summary:?}",
                    ready.len()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The network namespace of a pod (by uid): traffic "from the pod" runs in it.
    pub fn pod_netns(pod: &serde_json::Value) -> PathBuf {
        PathBuf::from(format!(
            "/run/netns/keel-{}",
            pod["metadata"]["uid"].as_str().unwrap_or_default()
        ))
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        // Agents go first, then their pods' containers (runc knows them by root), namespaces
        // and cgroups, then the pins.
        for node in &mut self.nodes {
            node.agent.kill();
            clean_node(node);
        }
    }
}

/// The agent's arguments for a lab's proxy mode (see [`Options::proxy_mode`]).
fn proxy_args(proxy_mode: &str) -> Vec<String> {
    let mut parts = proxy_mode.split('-');
    let mut args = vec![
        "--proxy-mode".to_owned(),
        parts.next().unwrap_or("ebpf").to_owned(),
    ];
    for option in parts {
        match option {
            "xdp" => args.extend(["--xdp".into(), "native".into()]),
            other => args.extend(["--lb-mode".into(), other.into()]),
        }
    }
    args
}

/// Removes what a node's kubelet left: containers (runc), pod namespaces, cgroups, pins.
pub fn clean_node(node: &LabNode) {
    clean_node_at(&node.root, &node.pin_dir);
}

/// [`clean_node`] by the node's kubelet root and pin directory.
pub fn clean_node_at(root: &Path, pin_dir: &Path) {
    let runc_root = root.join("runc");
    if let Ok(out) = Command::new("runc")
        .arg("--root")
        .arg(&runc_root)
        .args(["list", "-q"])
        .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force", id])
                .output();
        }
    }
    for entry in std::fs::read_dir(root.join("containers"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let rootfs = entry.path().join("rootfs");
        if let Ok(c) = std::ffi::CString::new(rootfs.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    for entry in std::fs::read_dir(root.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let netns = PathBuf::from(format!(
            "/run/netns/keel-{}",
            entry.file_name().to_string_lossy()
        ));
        let _ = node_agent_netns::netns::remove_at(&netns);
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            remove_cgroup(&hierarchy.path().join("keel").join(entry.file_name()));
        }
    }
    let _ = std::fs::remove_dir_all(pin_dir);
}

fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn kubectl_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/kubectl")
}

/// A command that runs in the network namespace at `netns`.
pub fn in_netns(netns: &Path, binary: &Path) -> Result<Command> {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let fd = std::fs::File::open(netns)?;
    let mut cmd = Command::new(binary);
    // SAFETY: the hook only calls setns(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Builds the lab's images as OCI layouts under `dir`: Debian's static busybox with its
/// applets, and keel-echo with the shared libraries it loads (and busybox beside it, for
/// probes and debugging).
pub fn build_images(dir: &Path, keel_echo: &Path) -> Result<Vec<PathBuf>> {
    let busybox = Path::new("/bin/busybox");
    let list = Command::new(busybox)
        .arg("--list-full")
        .output()
        .context("busybox --list-full (`cargo xtask setup` installs busybox-static)")?;
    let applets: Vec<(String, String)> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| !l.is_empty() && *l != "bin/busybox")
        .map(|l| (format!("/{l}"), "/bin/busybox".to_owned()))
        .collect();
    let base_dirs = vec![
        "/tmp".to_owned(),
        "/etc".to_owned(),
        "/proc".to_owned(),
        "/sys".to_owned(),
        "/dev".to_owned(),
    ];
    let busybox_layout = dir.join("busybox");
    build_layout(
        &busybox_layout,
        &ImageSpec {
            name: BUSYBOX,
            files: vec![(busybox.to_path_buf(), "/bin/busybox".into())],
            symlinks: applets.clone(),
            dirs: base_dirs.clone(),
            config: ImageConfig {
                cmd: vec!["sh".into()],
                ..Default::default()
            },
        },
    )?;
    let mut files = vec![
        (
            keel_echo.to_path_buf(),
            "/usr/local/bin/keel-echo".to_owned(),
        ),
        (busybox.to_path_buf(), "/bin/busybox".to_owned()),
    ];
    for lib in shared_libraries(keel_echo)? {
        let target = lib.display().to_string();
        files.push((std::fs::canonicalize(&lib)?, target));
    }
    let echo_layout = dir.join("keel-echo");
    build_layout(
        &echo_layout,
        &ImageSpec {
            name: ECHO,
            files,
            symlinks: applets,
            dirs: base_dirs,
            config: ImageConfig {
                entrypoint: vec!["/usr/local/bin/keel-echo".into()],
                ..Default::default()
            },
        },
    )?;
    Ok(vec![busybox_layout, echo_layout])
}
