//! Host-local style address management: one file per allocated address in the network's data
//! directory, holding the container ID and interface that own it, written while an exclusive
//! lock (flock) on the directory's lock file is held. An address is taken the moment its file
//! exists, so a plugin that crashes after allocating leaks that address until DEL, and never
//! hands it out twice; allocations survive restarts; the next allocation starts after the last
//! one, so a released address is not reused at once.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address in {0}")]
    Exhausted(Ipv4Net),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The allocations of one network.
pub struct Store {
    dir: PathBuf,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
}

/// An exclusive lock on the store, released on drop.
struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

const LAST: &str = "last_reserved_ip.0";

impl Store {
    pub fn new(dir: PathBuf, subnet: Ipv4Net, gateway: Ipv4Addr) -> Self {
        Self {
            dir,
            subnet,
            gateway,
        }
    }

    fn lock(&self) -> Result<Lock, IpamError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&path)(std::io::Error::last_os_error()));
        }
        Ok(Lock(file))
    }

    fn owner(container_id: &str, ifname: &str) -> String {
        format!("{container_id}\n{ifname}")
    }

    /// The addresses that can be handed out: the subnet's hosts but the gateway.
    fn candidates(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.subnet.hosts().filter(|ip| *ip != self.gateway)
    }

    fn find(&self, owner: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))?.flatten() {
            let Ok(ip) = entry.file_name().to_string_lossy().parse::<Ipv4Addr>() else {
                continue;
            };
            if fs::read_to_string(entry.path()).is_ok_and(|c| c.trim_end() == owner) {
                return Ok(Some(ip));
            }
        }
        Ok(None)
    }

    /// The address of `container_id`'s `ifname`: the one it already has (an ADD retried), or
    /// the next free one.
    pub fn allocate(&self, container_id: &str, ifname: &str) -> Result<Ipv4Addr, IpamError> {
        let _lock = self.lock()?;
        let owner = Self::owner(container_id, ifname);
        if let Some(ip) = self.find(&owner)? {
            return Ok(ip);
        }
        let last: Option<Ipv4Addr> = fs::read_to_string(self.dir.join(LAST))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let all: Vec<Ipv4Addr> = self.candidates().collect();
        let start = last
            .and_then(|l| all.iter().position(|ip| *ip == l))
            .map_or(0, |i| i + 1);
        for ip in all.iter().cycle().skip(start).take(all.len()) {
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    file.write_all(owner.as_bytes()).map_err(io(&path))?;
                    file.sync_all().map_err(io(&path))?;
                    let last_path = self.dir.join(LAST);
                    fs::write(&last_path, ip.to_string()).map_err(io(&last_path))?;
                    return Ok(*ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Err(IpamError::Exhausted(self.subnet))
    }

    /// The address `container_id`'s `ifname` holds, if any.
    pub fn lookup(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        self.find(&Self::owner(container_id, ifname))
    }

    /// Releases what `container_id`'s `ifname` holds; nothing held is not an error.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let owner = Self::owner(container_id, ifname);
        let found = self.find(&owner)?;
        if let Some(ip) = found {
            let path = self.dir.join(ip.to_string());
            fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(found)
    }

    /// Every allocation: (address, container ID, interface).
    pub fn allocations(&self) -> Result<Vec<(Ipv4Addr, String, String)>, IpamError> {
        let _lock = self.lock()?;
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))?.flatten() {
            let Ok(ip) = entry.file_name().to_string_lossy().parse::<Ipv4Addr>() else {
                continue;
            };
            let content = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = content.lines();
            let (id, ifname) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
            out.push((ip, id.to_owned(), ifname.to_owned()));
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, cidr: &str) -> Store {
        let subnet: Ipv4Net = cidr.parse().unwrap();
        Store::new(
            dir.to_path_buf(),
            subnet,
            Ipv4Addr::from(u32::from(subnet.network()) + 1),
        )
    }

    #[test]
    fn addresses_are_unique_kept_for_retries_and_not_reused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), "10.244.1.0/29");
        let a = s.allocate("c1", "eth0").unwrap();
        assert_eq!(
            a,
            Ipv4Addr::new(10, 244, 1, 2),
            "the gateway (.1) is skipped"
        );
        assert_eq!(
            s.allocate("c1", "eth0").unwrap(),
            a,
            "an ADD retried gets the same"
        );
        let b = s.allocate("c2", "eth0").unwrap();
        assert_ne!(a, b);
        assert_eq!(s.release("c1", "eth0").unwrap(), Some(a));
        assert_eq!(s.release("c1", "eth0").unwrap(), None, "DEL is idempotent");
        let c = s.allocate("c3", "eth0").unwrap();
        assert_ne!(c, a, "a released address is not handed out at once");
        // A new store on the same directory (a restart) sees the same allocations.
        let again = store(dir.path(), "10.244.1.0/29");
        assert_eq!(again.lookup("c2", "eth0").unwrap(), Some(b));
    }

    #[test]
    fn a_full_range_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), "10.244.1.0/30"); // hosts .1 (gateway) and .2
        s.allocate("c1", "eth0").unwrap();
        assert!(matches!(
            s.allocate("c2", "eth0"),
            Err(IpamError::Exhausted(_))
        ));
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let s = store(&path, "10.244.1.0/24");
                    (0..20)
                        .map(|i| s.allocate(&format!("c{t}-{i}"), "eth0").unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<Ipv4Addr> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "no address handed out twice");
    }
}
