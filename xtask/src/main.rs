//! `cargo xtask`: sets a machine up and runs the project's jobs.
//!
//! - `setup`: installs what a fresh Debian machine lacks (apt packages, the nightly `rust-src`,
//!   bpf-linker), idempotently; every other command runs it first (a quick check when done).
//! - `demo`: the main job: the data plane carrying real traffic between network namespaces.
//! - `test`: every test (unit, kernel, network namespace), as root.
//! - `bench dataplane [--quick] [--json]`: per-packet cost under BPF_PROG_TEST_RUN.
//! - `bench cluster [--quick] [--json]`: the eBPF data plane against kube-proxy's iptables and
//!   nftables rules on the same topology and traffic, one run.
//! - `bench control-plane [--quick] [--json]`: the API server on the embedded store and on etcd.
//!
//! xtask itself depends on nothing that needs the set-up (no protoc, no eBPF build), so it
//! compiles on a bare machine.

mod setup;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup                              install what this machine lacks (idempotent)
  demo                               show the eBPF data plane carrying real traffic
  test                               run every test (as root)
  bench dataplane [--quick] [--json] per-packet cost of the data path, 1 to 100,000 services
  bench cluster [--quick] [--json]   eBPF vs kube-proxy iptables and nftables, side by side
  bench control-plane [--quick] [--json]
                                     API creates/s and watch latency, embedded store and etcd
";

fn main() -> ExitCode {
    match run(env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["setup"] => setup::setup(),
        ["demo"] => {
            setup::setup()?;
            require_root()?;
            let dpctl = build_release("ebpf-dpctl", "dpctl")?;
            status(Command::new(dpctl).arg("demo"))
        }
        ["test", rest @ ..] => {
            setup::setup()?;
            require_root()?;
            test(rest)
        }
        ["bench", "cluster", flags @ ..] => {
            check_flags(flags)?;
            setup::setup()?;
            require_root()?;
            let bench = build_release("benches", "bench-cluster")?;
            status(
                Command::new(bench)
                    .args(flags)
                    .current_dir(workspace_root()),
            )
        }
        ["bench", "control-plane", flags @ ..] => {
            check_flags(flags)?;
            setup::setup()?;
            // One build for both binaries: their dependencies' features unify once.
            status(cargo().args([
                "build",
                "--release",
                "--package",
                "control-plane",
                "--package",
                "benches",
                "--bin",
                "control-plane",
                "--bin",
                "bench-control-plane",
            ]))?;
            let bench = workspace_root().join("target/release/bench-control-plane");
            status(
                Command::new(bench)
                    .args(flags)
                    .current_dir(workspace_root()),
            )
        }
        ["bench", "dataplane", flags @ ..] => {
            check_flags(flags)?;
            setup::setup()?;
            require_root()?;
            let dpctl = build_release("ebpf-dpctl", "dpctl")?;
            status(Command::new(dpctl).arg("bench").args(flags))
        }
        _ => {
            eprint!("{USAGE}");
            bail!("unknown command {:?}", args.join(" "));
        }
    }
}

/// The benchmarks take `--quick` and `--json`, nothing else.
fn check_flags(flags: &[&str]) -> Result<()> {
    for flag in flags {
        if !matches!(*flag, "--quick" | "--json") {
            bail!("unknown flag {flag}\n\n{USAGE}");
        }
    }
    Ok(())
}

/// Runs the whole suite: unit tests, kernel tests (BPF_PROG_TEST_RUN) and network tests in
/// throw-away namespaces. Extra arguments go to the test binaries (a filter, say).
fn test(extra: &[&str]) -> Result<()> {
    cleanup_leftovers();
    // Lints first: clippy-clean with -D warnings, kernel programs included.
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
    let mut cargo = cargo();
    cargo.args([
        "test",
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
        let pid = name.split('-').find_map(|part| part.parse::<u32>().ok());
        pid.is_none_or(|pid| Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = ["kt-", "kb-", "keel-"].iter().any(|p| name.starts_with(p));
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
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(workspace_root());
    cmd.env_remove("CARGO").env_remove("RUSTC");
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
