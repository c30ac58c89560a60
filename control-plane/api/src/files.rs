//! Files that hold secrets, on the control plane and on nodes: private directories, and
//! writes that leave either the old content or all of the new one.

use std::path::Path;

use anyhow::{Context, Result};

/// Creates `dir` (and its parents) if needed and makes it private to its owner (0700).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("make {} private", dir.display()))
}

/// Writes a secret (mode 0600) atomically.
pub fn write_private(path: &Path, content: &str) -> Result<()> {
    write_atomically(path, content, 0o600)
}

/// Writes `path` so that it holds either its old content or all of the new one, whatever
/// happens: a temporary file beside it, flushed to disk, renamed over it, the rename flushed.
pub fn write_atomically(path: &Path, content: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        std::io::Write::write_all(&mut file, content.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("write {}", path.display()))
}
