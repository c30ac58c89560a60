//! `cargo xtask fresh`: the README's two commands on a fresh machine, on demand.
//!
//! A machine that has run the project keeps whatever was installed on it, so a green CI there
//! proves nothing about a newcomer's first run. This builds a throw-away Debian root holding
//! only what the README assumes (Debian, root, a C toolchain and ca-certificates, which rustup
//! needs) and runs the README's "Two commands" in it, exactly as written, timing each:
//!
//! - **Base root**: `debootstrap --variant=minbase` of this machine's Debian release from the
//!   mirror in its apt sources, cached under `target/fresh/base` (rebuilt when the recipe changes
//!   or with `--rebuild-base`).
//! - **Each run**: a new mount and PID namespace (`unshare`); an overlay on the base root, so the
//!   run writes nothing into it, with `/root` (where the tree builds and runs) bind-mounted from
//!   a directory on the host's file system, as a real machine's home is on a real one, and a
//!   tmpfs on `/tmp`; fresh proc, sysfs, bpffs and /run, the host's /dev and cgroup
//!   hierarchies, as a privileged container sees them; commands enter it with `pivot_root`,
//!   as a container's do (under `chroot`, `runc exec` enters containers at the host's root); the host's rustup toolchains through an
//!   overlay of their own, with the nightly `rust-src` removed there by `rustup component
//!   remove` and no bpf-linker and no crate cache (set-up must add them); the working tree
//!   copied in (tracked and untracked files, not ignored ones).
//! - **Clean-up**: when the namespace's first process ends, the kernel kills every process the
//!   run started and drops its mounts, network namespaces and pins; the overlay's upper layer is
//!   then removed. Ctrl-C, SIGTERM and the death of xtask itself end the run the same way, and
//!   the next run removes a layer left by an xtask that was killed.
//!
//! The run shares the host's network stack (set-up downloads packages and crates); the tests'
//! own network namespaces keep their traffic off it.

use std::{
    ffi::OsString,
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::symlink, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{setup, workspace_root};

/// What the base root holds besides minbase: what a rustup install needs.
const BASE_PACKAGES: &[&str] = &["gcc", "libc6-dev", "ca-certificates"];
/// The nightly component set-up must add back.
const REMOVED_COMPONENT: &str = "rust-src";
/// Where the tree is copied inside the root.
const TREE_IN_ROOT: &str = "root/keel";
/// Lines that mean a program panicked; none may appear in a command's output.
const PANIC_MARKS: &[&str] = &["panicked at", "stack backtrace:", "RUST_BACKTRACE="];

/// The arguments xtask hands itself inside the new namespaces.
#[derive(clap::Args)]
pub struct Inside {
    /// The run's directory (overlay layers and the merged root)
    #[arg(long)]
    run_dir: PathBuf,
    /// The cached base root
    #[arg(long)]
    base: PathBuf,
    /// Where the commands' logs go (outside the run directory, so they outlive it)
    #[arg(long)]
    logs: PathBuf,
    /// Commands to run instead of the README's
    #[arg(long = "command")]
    commands: Vec<String>,
}

pub fn fresh(rebuild_base: bool, commands: &[String]) -> Result<()> {
    let dir = workspace_root().join("target/fresh");
    fs::create_dir_all(&dir)?;
    remove_stale_runs(&dir);
    ensure_debootstrap()?;
    let base = dir.join("base");
    base_root(&base, rebuild_base)?;

    let run_dir = dir.join(format!("run-{}", std::process::id()));
    let logs = dir.join("logs");
    fs::create_dir_all(&logs)?;
    fs::create_dir_all(&run_dir)?;
    let result = run_inside_namespaces(&run_dir, &base, &logs, commands);
    eprintln!("fresh: removing {}", run_dir.display());
    let removed =
        fs::remove_dir_all(&run_dir).with_context(|| format!("remove {}", run_dir.display()));
    result.and(removed)
}

/// The process that owns the namespaces; killed (and with it every process of the run) when
/// xtask is interrupted.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn kill_child(_: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn run_inside_namespaces(
    run_dir: &Path,
    base: &Path,
    logs: &Path,
    commands: &[String],
) -> Result<()> {
    let xtask = std::env::current_exe().context("find xtask's own binary")?;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
    ])
    .arg(xtask)
    .arg("fresh-inside")
    .arg("--run-dir")
    .arg(run_dir)
    .arg("--base")
    .arg(base)
    .arg("--logs")
    .arg(logs);
    for command in commands {
        cmd.arg("--command").arg(command);
    }
    // SAFETY: prctl(2) is async-signal-safe: unshare (and so the run) dies with xtask.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("run unshare (util-linux)")?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    // SAFETY: the handler only calls kill(2) with a pid read from an atomic.
    unsafe {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(signal, kill_child as *const () as libc::sighandler_t);
        }
    }
    let status = child.wait().context("wait for the fresh run")?;
    CHILD.store(0, Ordering::SeqCst);
    if !status.success() {
        bail!(
            "the fresh run failed ({status}); logs in {}",
            logs.display()
        );
    }
    Ok(())
}

/// Runs in the new mount and PID namespaces (as PID 1): builds the root, runs the README's
/// commands in it, reports.
pub fn inside(args: Inside) -> Result<()> {
    let root = args.run_dir.join("root");
    let started = Instant::now();
    mount_root(&args.run_dir, &args.base, &root)?;
    let files = copy_tree(&root.join(TREE_IN_ROOT))?;
    prepare_toolchains(&root)?;
    eprintln!(
        "fresh: root ready in {:.0?}: Debian minbase + {}, {files} files of the tree in /{TREE_IN_ROOT}, \
         rustup toolchains without {REMOVED_COMPONENT} and bpf-linker",
        started.elapsed(),
        BASE_PACKAGES.join(" "),
    );

    let commands = if args.commands.is_empty() {
        readme_commands()?
    } else {
        args.commands.clone()
    };
    let mut results = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        let log = args.logs.join(format!("{}.log", i + 1));
        eprintln!("\nfresh: $ {command}    (log: {})", log.display());
        let started = Instant::now();
        let outcome = run_logged(&root, command, &log);
        let elapsed = started.elapsed();
        let verdict = match outcome {
            Ok(()) => "passed".to_owned(),
            Err(e) => format!("FAILED: {e:#}"),
        };
        results.push((command.clone(), verdict, elapsed));
    }

    eprintln!("\nfresh: the commands on a fresh Debian root");
    let width = commands.iter().map(String::len).max().unwrap_or(0);
    for (command, verdict, elapsed) in &results {
        eprintln!("  {command:<width$}  {:>9}  {verdict}", minutes(*elapsed));
    }
    if results.iter().any(|(_, verdict, _)| verdict != "passed") {
        bail!("a README command failed on a fresh machine");
    }
    Ok(())
}

/// A command that runs `program` (a path inside `root`) with `root` as its root file system, as
/// a container's processes have theirs: in a mount namespace of its own whose root mount is
/// `root` (`pivot_root`), not under `chroot`, in which the mount namespaces `runc` makes keep
/// the host's root and `runc exec` would enter a container there instead of its root.
fn in_root(root: &Path, program: &str) -> Result<Command> {
    use std::os::unix::ffi::OsStrExt;
    let root = std::ffi::CString::new(root.as_os_str().as_bytes())?;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::chdir(root.as_ptr()))?;
            // pivot_root(".", "."): the old root ends up on top of the new one, then goes.
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            )?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))
        });
    }
    Ok(cmd)
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m {:02}s", s / 60, s % 60)
}

/// The commands in the README's "Two commands" block, without their comments.
fn readme_commands() -> Result<Vec<String>> {
    let readme = fs::read_to_string(workspace_root().join("README.md"))?;
    let section = readme
        .split_once("## Two commands")
        .context("the README has no \"## Two commands\" section")?
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .context("the README's \"Two commands\" section has no ```sh block")?
        .0;
    let commands: Vec<String> = block
        .lines()
        .map(|l| {
            l.split_once('#')
                .map_or(l, |(cmd, _)| cmd)
                .trim()
                .to_owned()
        })
        .filter(|l| !l.is_empty())
        .collect();
    if commands.len() != 2 {
        bail!(
            "the README's \"Two commands\" block holds {} commands",
            commands.len()
        );
    }
    Ok(commands)
}

/// Runs `command` in the root from the tree's directory, as a login shell of root would, with
/// nothing of xtask's environment; its output goes to the terminal and to `log`. Fails on a
/// non-zero exit and on any sign of a panic in the output.
fn run_logged(root: &Path, command: &str, log: &Path) -> Result<()> {
    let mut child = in_root(root, "/bin/bash")?
        .arg("-c")
        .arg(format!("cd /{TREE_IN_ROOT} && ( {command} ) 2>&1"))
        .env_clear()
        .envs(machine_network_env())
        .env("HOME", "/root")
        .env("USER", "root")
        .env(
            "TERM",
            std::env::var_os("TERM").unwrap_or_else(|| "dumb".into()),
        )
        .env(
            "PATH",
            "/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("start a shell in the fresh root")?;
    let mut file = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut panics = Vec::new();
    let mut last_lines = Vec::new();
    let reader = BufReader::new(child.stdout.take().expect("piped"));
    for line in reader.split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        println!("{line}");
        writeln!(file, "{line}")?;
        if PANIC_MARKS.iter().any(|m| line.contains(m)) {
            panics.push(line.clone());
        }
        last_lines.push(line);
        if last_lines.len() > 3 {
            last_lines.remove(0);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("exit {status}; last lines: {}", last_lines.join(" / "));
    }
    if !panics.is_empty() {
        bail!(
            "exit 0, but the output shows a panic: {}",
            panics.join(" / ")
        );
    }
    Ok(())
}

/// Mounts the overlay and the kernel filesystems a privileged container gets.
fn mount_root(run_dir: &Path, base: &Path, root: &Path) -> Result<()> {
    let upper = run_dir.join("upper");
    let work = run_dir.join("work");
    for dir in [&upper, &work, root] {
        fs::create_dir_all(dir)?;
    }
    mount(
        "overlay",
        root,
        "overlay",
        &format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=on",
            base.display(),
            upper.display(),
            work.display()
        ),
        &[],
    )?;
    // /root on the host's own file system, as a real machine's home is: the tree builds there
    // and the kubelet mounts each container's root file system (an overlay) under it, which
    // cannot have another overlay, this root, as its upper layer.
    let home = run_dir.join("home");
    fs::create_dir_all(&home)?;
    run(Command::new("cp")
        .arg("-a")
        .arg(base.join("root").join("."))
        .arg(&home))?;
    mount(
        &home.display().to_string(),
        &root.join("root"),
        "",
        "",
        &["--bind"],
    )?;
    mount("proc", &root.join("proc"), "proc", "", &[])?;
    mount("sysfs", &root.join("sys"), "sysfs", "", &[])?;
    mount("bpffs", &root.join("sys/fs/bpf"), "bpf", "", &[])?;
    // The host's cgroup hierarchies (v1 controllers and the cgroup2 mount beside them).
    mount(
        "/sys/fs/cgroup",
        &root.join("sys/fs/cgroup"),
        "",
        "",
        &["--rbind"],
    )?;
    mount("/dev", &root.join("dev"), "", "", &["--rbind"])?;
    mount("tmpfs", &root.join("run"), "tmpfs", "mode=755", &[])?;
    // /tmp is a file system of its own too (tmpfs, as Debian 13 makes it): tests keep their
    // labs' container root file systems there.
    mount("tmpfs", &root.join("tmp"), "tmpfs", "mode=1777", &[])?;
    // The machine's network settings are the machine's, not the project's: name resolution,
    // and the certificate authorities it trusts (an egress proxy's, say) with pip's pointer to
    // them. A fresh machine of this kind has them too.
    for file in MACHINE_FILES {
        let from = Path::new("/").join(file);
        if !from.exists() {
            continue;
        }
        let to = root.join(file);
        // Never through a symlink the root holds: it would point at the host's file.
        let _ = fs::remove_file(&to);
        fs::create_dir_all(to.parent().expect("a file has a parent"))?;
        fs::copy(&from, &to).with_context(|| format!("copy {} into the root", from.display()))?;
    }
    if let Ok(entries) = fs::read_dir("/usr/local/share/ca-certificates") {
        let dir = root.join("usr/local/share/ca-certificates");
        fs::create_dir_all(&dir)?;
        for entry in entries.flatten() {
            fs::copy(entry.path(), dir.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Files that describe the machine's network rather than the project's needs.
const MACHINE_FILES: &[&str] = &[
    "etc/resolv.conf",
    "etc/hosts",
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pip.conf",
];

/// The machine's environment variables about its network (proxies, CA bundles), passed to the
/// commands in the root; nothing else of xtask's environment is.
fn machine_network_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(name, _)| {
            let name = name.to_string_lossy().to_ascii_uppercase();
            ["PROXY", "CERT", "CA_BUNDLE", "CAINFO"]
                .iter()
                .any(|part| name.contains(part))
        })
        .collect()
}

fn mount(source: &str, target: &Path, fstype: &str, options: &str, flags: &[&str]) -> Result<()> {
    fs::create_dir_all(target)?;
    let mut cmd = Command::new("mount");
    cmd.args(flags);
    if !fstype.is_empty() {
        cmd.args(["-t", fstype]);
    }
    if !options.is_empty() {
        cmd.args(["-o", options]);
    }
    run(cmd.arg(source).arg(target))
}

/// The host's rustup toolchains, seen through an overlay so that removing a component inside
/// changes nothing on the host; a fresh `~/.cargo` holding only rustup and its proxies.
fn prepare_toolchains(root: &Path) -> Result<()> {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()));
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".rustup"));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cargo"));
    let run_dir = root.parent().expect("root is in the run dir");
    let (upper, work) = (run_dir.join("rustup-upper"), run_dir.join("rustup-work"));
    fs::create_dir_all(&upper)?;
    fs::create_dir_all(&work)?;
    fs::create_dir_all(root.join("root/.rustup"))?;
    mount(
        "overlay",
        &root.join("root/.rustup"),
        "overlay",
        &format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=on",
            rustup_home.display(),
            upper.display(),
            work.display()
        ),
        &[],
    )?;

    // ~/.cargo as rustup's installer leaves it: rustup, symlinks to it, and `env`.
    let bin = root.join("root/.cargo/bin");
    fs::create_dir_all(&bin)?;
    let host_bin = cargo_home.join("bin");
    fs::copy(host_bin.join("rustup"), bin.join("rustup")).context("copy rustup")?;
    for entry in fs::read_dir(&host_bin)?.flatten() {
        let is_proxy = fs::read_link(entry.path()).is_ok_and(|t| t == Path::new("rustup"));
        if is_proxy {
            symlink("rustup", bin.join(entry.file_name()))?;
        }
    }
    if let Ok(env) = fs::read(cargo_home.join("env")) {
        fs::write(root.join("root/.cargo/env"), env)?;
    }

    let rustup = |args: &[&str]| -> Result<()> {
        run(in_root(root, "/root/.cargo/bin/rustup")?
            .args(args)
            .env_clear()
            .envs(machine_network_env())
            .env("HOME", "/root")
            .env("PATH", "/root/.cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin"))
    };
    rustup(&[
        "component",
        "remove",
        REMOVED_COMPONENT,
        "--toolchain",
        "nightly",
    ])?;
    if root.join("root/.cargo/bin/bpf-linker").exists() {
        bail!("bpf-linker is in the fresh root's ~/.cargo/bin");
    }
    Ok(())
}

/// Copies the working tree (tracked and untracked files, not ignored ones, no `.git`).
fn copy_tree(dest: &Path) -> Result<usize> {
    let top = workspace_root();
    let out = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(&top)
        .output()
        .context("git ls-files")?;
    if !out.status.success() {
        bail!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut count = 0;
    for name in out.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = PathBuf::from(OsString::from(String::from_utf8_lossy(name).into_owned()));
        let from = top.join(&name);
        // Deleted but still tracked: not part of the working tree.
        let Ok(meta) = fs::symlink_metadata(&from) else {
            continue;
        };
        let to = dest.join(&name);
        fs::create_dir_all(to.parent().expect("a file has a parent"))?;
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(&from)?, &to)?;
        } else {
            fs::copy(&from, &to).with_context(|| format!("copy {}", name.display()))?;
        }
        count += 1;
    }
    Ok(count)
}

/// The cached base root: minbase of this machine's release plus [`BASE_PACKAGES`]. A stamp
/// records the recipe; a root without it (an interrupted debootstrap) is rebuilt.
fn base_root(base: &Path, rebuild: bool) -> Result<()> {
    let (release, mirror, sources) = debian_sources()?;
    let recipe = format!(
        "debootstrap --variant=minbase --include={} {release} {mirror}\n",
        BASE_PACKAGES.join(",")
    );
    let stamp = base.with_extension("recipe");
    if !rebuild && fs::read_to_string(&stamp).is_ok_and(|s| s == recipe) && base.is_dir() {
        eprintln!(
            "fresh: base root {} (cached: {})",
            base.display(),
            recipe.trim()
        );
        return Ok(());
    }
    let _ = fs::remove_file(&stamp);
    if base.exists() {
        fs::remove_dir_all(base).with_context(|| format!("remove {}", base.display()))?;
    }
    eprintln!("fresh: building the base root: {}", recipe.trim());
    let started = Instant::now();
    run(Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", BASE_PACKAGES.join(",")))
        .arg(&release)
        .arg(base)
        .arg(&mirror))?;
    // The same Debian sources as this machine (suites, updates, security), and nothing cached.
    fs::write(base.join("etc/apt/sources.list.d/debian.sources"), sources)?;
    let _ = fs::remove_file(base.join("etc/apt/sources.list"));
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for entry in fs::read_dir(base.join(dir))?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    fs::write(&stamp, recipe)?;
    eprintln!("fresh: base root built in {:.0?}", started.elapsed());
    Ok(())
}

/// This machine's Debian release, its main mirror and its Debian apt sources (deb822).
fn debian_sources() -> Result<(String, String, String)> {
    let os = fs::read_to_string("/etc/os-release")?;
    let release = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .context("no VERSION_CODENAME in /etc/os-release")?
        .trim_matches('"')
        .to_owned();
    let path = "/etc/apt/sources.list.d/debian.sources";
    let sources = fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let mirror = sources
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|uris| uris.split_whitespace().next())
        .with_context(|| format!("no URIs in {path}"))?
        .to_owned();
    Ok((release, mirror, sources))
}

fn ensure_debootstrap() -> Result<()> {
    let works = Command::new("debootstrap")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    setup::install_apt(&["debootstrap"], true)
}

/// Removes run directories whose xtask is gone (killed before it could clean up).
fn remove_stale_runs(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("fresh: removing {name}, left by a run that was killed");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
