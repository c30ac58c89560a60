//! Shared by the kernel tests: a data plane pinned under a directory of its own, removed when
//! the test ends (also when it fails).

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    ops::{Deref, DerefMut},
    path::PathBuf,
};

use ebpf_dataplane::{Config, Dataplane};

/// Kernel tests need root (BPF, bpffs, netns). Without it they fail, loudly: a skipped kernel
/// test must never look like a passing one.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "kernel tests must run as root (BPF programs, bpffs, network namespaces)"
    );
}

/// A unique pin directory for one test.
pub fn pin_dir(test: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/keel-test-{test}-{}",
        std::process::id()
    ))
}

/// A data plane that destroys its pins when dropped.
pub struct TestDataplane {
    dataplane: Option<Dataplane>,
    pub config: Config,
}

impl TestDataplane {
    pub fn open(test: &str) -> Self {
        Self::with_config(Config::with_pin_dir(pin_dir(test)))
    }

    pub fn with_config(config: Config) -> Self {
        require_root();
        let _ = std::fs::remove_dir_all(&config.pin_dir);
        let dataplane =
            Dataplane::open(&config).unwrap_or_else(|e| panic!("open data plane: {}", chain(&e)));
        Self {
            dataplane: Some(dataplane),
            config,
        }
    }

    /// Drops the data plane without removing its pins (a crashed or stopped owner), and opens
    /// it again from the pins.
    pub fn restart(&mut self) {
        drop(self.dataplane.take());
        self.dataplane =
            Some(Dataplane::open(&self.config).unwrap_or_else(|e| panic!("reopen: {}", chain(&e))));
    }
}

impl Deref for TestDataplane {
    type Target = Dataplane;
    fn deref(&self) -> &Dataplane {
        self.dataplane.as_ref().expect("open")
    }
}

impl DerefMut for TestDataplane {
    fn deref_mut(&mut self) -> &mut Dataplane {
        self.dataplane.as_mut().expect("open")
    }
}

impl Drop for TestDataplane {
    fn drop(&mut self) {
        drop(self.dataplane.take());
        let _ = std::fs::remove_dir_all(&self.config.pin_dir);
    }
}

/// An error with its causes, for panic messages.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub fn addr(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port)
}
