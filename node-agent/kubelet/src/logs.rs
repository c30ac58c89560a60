//! Container logs: each run of a container writes stdout and stderr to a file of its own
//! (`logs/<namespace>_<pod>_<uid>/<container>/<restart count>.log`, as kubelet lays out
//! /var/log/pods), so `--previous` is the file of the run before. Files past the size limit are
//! rotated by copy and truncate (the container keeps its descriptor, appending): the newest
//! `.1` copy is kept beside the live file.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use crate::pod::PodDesired;

pub fn pod_dir(root: &Path, pod: &PodDesired) -> PathBuf {
    root.join("logs")
        .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid))
}

pub fn log_path(root: &Path, pod: &PodDesired, container: &str, restart: i32) -> PathBuf {
    pod_dir(root, pod)
        .join(container)
        .join(format!("{restart}.log"))
}

/// The runs of a container of a pod (by namespace and name): the pod's uid and the log files,
/// newest run last.
pub fn runs(
    root: &Path,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Option<(String, Vec<PathBuf>)> {
    let prefix = format!("{namespace}_{pod}_");
    let dir = fs::read_dir(root.join("logs"))
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?;
    let uid = dir.file_name().to_string_lossy()[prefix.len()..].to_owned();
    let mut files: Vec<(i32, PathBuf)> = fs::read_dir(dir.path().join(container))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_suffix(".log")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    files.sort();
    Some((uid, files.into_iter().map(|(_, p)| p).collect()))
}

/// Rotates `path` when it passed `max` bytes: its content moves to `path.1`.
pub fn rotate(path: &Path, max: u64) -> std::io::Result<bool> {
    if fs::metadata(path).map(|m| m.len()).unwrap_or(0) <= max {
        return Ok(false);
    }
    let old = path.with_extension("log.1");
    fs::copy(path, &old)?;
    fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// The last `tail` lines (all when `None`) of a log file, with its rotated part before it.
pub fn read(path: &Path, tail: Option<usize>) -> std::io::Result<String> {
    let mut text = fs::read_to_string(path.with_extension("log.1")).unwrap_or_default();
    text.push_str(&fs::read_to_string(path)?);
    Ok(match tail {
        Some(n) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].iter().map(|l| format!("{l}\n")).collect()
        }
        None => text,
    })
}

/// What was appended to `path` since `offset`; the new offset (0 again after a rotation).
pub fn read_from(path: &Path, offset: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let mut file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    let from = if len < offset { 0 } else { offset };
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    let end = from + buf.len() as u64;
    Ok((buf, end))
}
