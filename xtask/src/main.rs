//! `cargo xtask`: sets a machine up and runs the project's jobs.
//!
//! - `setup [--check]`: installs what a fresh Debian machine lacks (apt packages, the nightly
//!   `rust-src`, bpf-linker, the Python venv) and proves each tool works; every other command
//!   runs it first (about a second when done). `--check` prints the table only.
//! - `demo [--keep]`: the main job: a 3-node cluster on this machine, a Deployment and a
//!   Service applied with kubectl, traffic through the eBPF data plane, a node failing;
//!   `demo dataplane`: the data plane alone. `down` removes what `demo --keep` left.
//! - `test`: every test (unit, kernel, network namespace), as root.
//! - `bench dataplane [--quick] [--json]`: per-packet cost under BPF_PROG_TEST_RUN.
//! - `bench cluster [--quick] [--json]`: the eBPF data plane against kube-proxy's iptables and
//!   nftables rules on the same topology and traffic, one run.
//! - `bench control-plane [--quick] [--json]`: the API server on the embedded store and on etcd.
//! - `bench nodeport [--quick] [--json]`: NodePort forwarding to another node, XDP and tc
//!   against iptables and nftables.
//! - `fresh`: the README's two commands in a throw-away Debian root, as a newcomer runs them.
//! - `gen-protobuf`: the API server's protobuf message table, from the k8s-pb crate.
//!
//! xtask itself depends on nothing that needs the set-up (no protoc, no eBPF build), so it
//! compiles on a bare machine.

mod fresh;
mod protobuf;
mod setup;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Sets a machine up and runs the project's jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks and prove every tool works (idempotent)
    Setup {
        /// Print what is found and what is missing; install nothing
        #[arg(long)]
        check: bool,
    },
    /// A 3-node cluster on this machine running the echo server behind a Service; `demo
    /// dataplane` shows the eBPF data plane alone
    Demo {
        #[arg(value_enum)]
        which: Option<DemoKind>,
        /// Leave the cluster up (`cargo xtask down` removes it)
        #[arg(long)]
        keep: bool,
    },
    /// Remove every trace of a cluster `demo --keep` left
    Down,
    /// Run every test: lints, unit, kernel, network namespaces, control plane (as root)
    Test {
        /// Passed to the test binaries (a name filter, say)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: numbers, as Markdown tables (and one JSON line with --json)
    Bench {
        #[arg(value_enum)]
        which: Bench,
        /// Fewer services and rounds
        #[arg(long)]
        quick: bool,
        /// End stdout with one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Run the README's two commands in a throw-away Debian root, as on a fresh machine
    Fresh {
        /// Build the cached base root again (debootstrap)
        #[arg(long)]
        rebuild_base: bool,
        /// Run these shell commands in the fresh root instead of the README's (repeatable;
        /// e.g. `--command 'cargo xtask setup' --command 'cargo test -p benches --test pods'`
        /// to chase one failure)
        #[arg(long = "command", value_name = "SHELL")]
        commands: Vec<String>,
    },
    /// Write the API server's protobuf message table from the k8s-pb crate's source
    GenProtobuf,
    /// `fresh`'s own second half, inside its mount and PID namespaces
    #[command(hide = true)]
    FreshInside(fresh::Inside),
}

#[derive(Clone, Copy, ValueEnum)]
enum DemoKind {
    /// The cluster (the default)
    Cluster,
    /// The eBPF data plane alone, in a lab of network namespaces
    Dataplane,
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// Per-packet cost of the data path under BPF_PROG_TEST_RUN, 1 to 100,000 services
    Dataplane,
    /// eBPF vs kube-proxy's iptables and nftables rules, side by side
    Cluster,
    /// API creates/s and watch latency on both stores; scheduler; feed
    ControlPlane,
    /// NodePort forwarding to another node: XDP, tc, iptables, nftables (pps, CPU/packet)
    Nodeport,
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup { check: true } => setup::check(),
        Task::Setup { check: false } => setup::setup(),
        Task::Demo {
            which: Some(DemoKind::Dataplane),
            ..
        } => {
            setup::setup()?;
            require_root()?;
            status(&mut Command::new(build_release(
                "benches",
                "demo-dataplane",
            )?))
        }
        Task::Demo { keep, .. } => {
            setup::setup()?;
            require_root()?;
            let demo = build_cluster_binaries("demo-cluster")?;
            let mut cmd = Command::new(demo);
            if keep {
                cmd.arg("--keep");
            }
            status(cmd.current_dir(workspace_root()))
        }
        Task::Down => {
            require_root()?;
            let demo = workspace_root().join("target/release/demo-cluster");
            if !demo.exists() {
                eprintln!("xtask: no demo cluster was built here; nothing to remove");
                return Ok(());
            }
            status(Command::new(demo).arg("down"))
        }
        Task::Test { args } => {
            setup::setup()?;
            require_root()?;
            test(&args)
        }
        Task::Bench { which, quick, json } => {
            setup::setup()?;
            let flags: Vec<&str> = [(quick, "--quick"), (json, "--json")]
                .into_iter()
                .filter_map(|(on, flag)| on.then_some(flag))
                .collect();
            let binary = match which {
                Bench::Dataplane => {
                    require_root()?;
                    build_release("benches", "bench-dataplane")?
                }
                Bench::Cluster => {
                    require_root()?;
                    build_release("benches", "bench-cluster")?
                }
                Bench::Nodeport => {
                    require_root()?;
                    build_release("benches", "bench-nodeport")?
                }
                Bench::ControlPlane => {
                    // Real node agents too (eBPF data planes in network namespaces), and a
                    // cluster lab running pods.
                    require_root()?;
                    build_cluster_binaries("bench-control-plane")?
                }
            };
            status(
                Command::new(binary)
                    .args(&flags)
                    .current_dir(workspace_root()),
            )
        }
        Task::Fresh {
            rebuild_base,
            commands,
        } => {
            require_root()?;
            fresh::fresh(rebuild_base, &commands)
        }
        Task::FreshInside(args) => fresh::inside(args),
        Task::GenProtobuf => protobuf::generate(&workspace_root()),
    }
}

/// Runs the whole suite: unit tests, kernel tests (BPF_PROG_TEST_RUN) and network tests in
/// throw-away namespaces. Extra arguments go to the test binaries (a filter, say).
fn test(extra: &[String]) -> Result<()> {
    cleanup_leftovers();
    // Lints first: formatting (stable rustfmt, rustfmt.toml), then clippy-clean with
    // -D warnings, kernel programs included.
    status(cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs from rustfmt's: run `cargo fmt --all`")?;
    status(
        cargo()
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "ebpf-programs",
                "--all-targets",
            ])
            .args(["--", "-D", "warnings"]),
    )?;
    status(
        nightly_cargo()
            .args(["clippy", "--package", "ebpf-programs", "--release"])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
    )?;
    // Tests run the workspace's binaries (control-plane, node-agent, dpctl, keel-echo, ...)
    // from beside their own: build them all, whichever package's tests use them.
    status(cargo().args([
        "build",
        "--workspace",
        "--exclude",
        "ebpf-programs",
        "--bins",
    ]))?;
    let mut cargo = cargo();
    // Every test binary runs even after one fails: a run reports all its failures.
    cargo.args([
        "test",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "ebpf-programs",
        "--all-targets",
    ]);
    if !extra.is_empty() {
        cargo.arg("--").args(extra);
    }
    status(&mut cargo)
}

/// Kernel and network tests need root; say so instead of letting them fail one by one.
fn require_root() -> Result<()> {
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("this needs root (eBPF programs, bpffs, network namespaces): run it as root");
    }
    Ok(())
}

/// Removes network namespaces and bpffs pins left by runs that were killed (their owning
/// process is gone), so they cannot confuse this run. Names carry the owner's pid.
fn cleanup_leftovers() {
    let alive = |name: &str| {
        // A pod's namespace (`keel-<uid>`) belongs to a kubelet, not to a run: a UUID's
        // all-digit group would read as a pid.
        let pod = name
            .strip_prefix("keel-")
            .is_some_and(|uid| uid.len() == 36 && uid.split('-').count() == 5);
        let pid = name.split('-').find_map(|part| part.parse::<u32>().ok());
        pod || pid.is_none_or(|pid| Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = ["kt-", "kb-", "ka-", "kp-", "keel-"]
                .iter()
                .any(|p| name.starts_with(p));
            if ours && !alive(&name) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("keel-") && !alive(&name) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// `bin` of the benches package (the cluster demo, a benchmark) and everything a cluster lab
/// starts, in one build (features unify once).
fn build_cluster_binaries(bin: &str) -> Result<PathBuf> {
    status(cargo().args([
        "build",
        "--release",
        "--package",
        "control-plane",
        "--package",
        "node-agent",
        "--package",
        "node-agent-cni",
        "--package",
        "benches",
        "--bin",
        "control-plane",
        "--bin",
        "node-agent",
        "--bin",
        "keel-echo",
        "--bin",
        "keel-cni",
        "--bin",
        bin,
    ]))?;
    Ok(workspace_root().join("target/release").join(bin))
}

fn build_release(package: &str, bin: &str) -> Result<PathBuf> {
    status(cargo().args(["build", "--release", "--package", package, "--bin", bin]))?;
    Ok(workspace_root().join("target/release").join(bin))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Cargo of the nightly toolchain (through the rustup proxy), for the kernel programs.
fn nightly_cargo() -> Command {
    let mut cmd = setup::nightly_cargo();
    cmd.current_dir(workspace_root());
    cmd
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
