//! The runtime's side of CNI: finds the plugin named by the configuration's `type` in
//! `CNI_PATH`, runs it with the `CNI_*` variables and the configuration on stdin, and reads the
//! result or the error back. Works with any CNI plugin.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
};

use serde_json::Value;

use crate::spec::{self, CniResult, Command, Error, Invocation, VersionInfo};

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The plugin answered with the spec's error object.
    #[error("plugin {plugin} {command}: {error}")]
    Plugin {
        plugin: String,
        command: &'static str,
        error: Error,
    },
    #[error("plugin {plugin} {command}: {what}")]
    Runtime {
        plugin: String,
        command: &'static str,
        what: String,
    },
}

/// A network (its configuration) and where its plugins are.
#[derive(Clone, Debug)]
pub struct Network {
    pub config: Value,
    pub plugin_path: Vec<PathBuf>,
    /// The network namespace plugins run in (the node's); the caller's when `None`.
    pub runtime_netns: Option<PathBuf>,
}

impl Network {
    pub fn new(config: Value, plugin_path: Vec<PathBuf>) -> Self {
        Self {
            config,
            plugin_path,
            runtime_netns: None,
        }
    }

    /// Runs the plugins in the network namespace at `netns` (a node's, in a lab).
    pub fn in_netns(mut self, netns: PathBuf) -> Self {
        self.runtime_netns = Some(netns);
        self
    }

    fn plugin(&self) -> Result<(String, PathBuf), InvokeError> {
        let name = self
            .config
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let path = self
            .plugin_path
            .iter()
            .map(|dir| dir.join(&name))
            .find(|p| p.is_file())
            .ok_or_else(|| InvokeError::Runtime {
                plugin: name.clone(),
                command: "find",
                what: format!("not found in CNI_PATH {:?}", self.plugin_path),
            })?;
        Ok((name, path))
    }

    /// ADD: the container's network; the plugin's result.
    pub fn add(
        &self,
        container_id: &str,
        netns: &Path,
        ifname: &str,
    ) -> Result<CniResult, InvokeError> {
        let out = self.exec(
            Command::Add,
            container_id,
            Some(netns),
            ifname,
            &self.config,
        )?;
        let (plugin, _) = self.plugin()?;
        serde_json::from_slice(&out).map_err(|e| InvokeError::Runtime {
            plugin,
            command: "ADD",
            what: format!("the result does not decode: {e}"),
        })
    }

    /// DEL, with the result ADD gave (the spec passes it as `prevResult`).
    pub fn del(
        &self,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        prev: Option<&CniResult>,
    ) -> Result<(), InvokeError> {
        let config = self.with_prev(prev);
        self.exec(Command::Del, container_id, netns, ifname, &config)
            .map(drop)
    }

    /// CHECK, with the result ADD gave.
    pub fn check(
        &self,
        container_id: &str,
        netns: &Path,
        ifname: &str,
        prev: &CniResult,
    ) -> Result<(), InvokeError> {
        let config = self.with_prev(Some(prev));
        self.exec(Command::Check, container_id, Some(netns), ifname, &config)
            .map(drop)
    }

    pub fn version(&self) -> Result<VersionInfo, InvokeError> {
        let out = self.exec(Command::Version, "", None, "", &self.config)?;
        let (plugin, _) = self.plugin()?;
        serde_json::from_slice(&out).map_err(|e| InvokeError::Runtime {
            plugin,
            command: "VERSION",
            what: format!("the answer does not decode: {e}"),
        })
    }

    fn with_prev(&self, prev: Option<&CniResult>) -> Value {
        let mut config = self.config.clone();
        if let (Some(prev), Some(map)) = (prev, config.as_object_mut()) {
            map.insert(
                "prevResult".into(),
                serde_json::to_value(prev).expect("a result serializes"),
            );
        }
        config
    }

    fn exec(
        &self,
        command: Command,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        config: &Value,
    ) -> Result<Vec<u8>, InvokeError> {
        let (plugin, path) = self.plugin()?;
        let invocation = Invocation {
            command,
            container_id: container_id.to_owned(),
            netns: netns.map(Path::to_path_buf),
            ifname: ifname.to_owned(),
            args: String::new(),
            path: self.plugin_path.clone(),
        };
        let runtime_error = |what: String| InvokeError::Runtime {
            plugin: plugin.clone(),
            command: command.as_str(),
            what,
        };
        let mut process = Process::new(&path);
        if let Some(netns) = &self.runtime_netns {
            use std::os::{fd::AsRawFd, unix::process::CommandExt};
            let file = std::fs::File::open(netns)
                .map_err(|e| runtime_error(format!("open {}: {e}", netns.display())))?;
            // SAFETY: the hook only calls setns(2), which is async-signal-safe.
            unsafe {
                process.pre_exec(move || {
                    if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = process
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(invocation.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| runtime_error(format!("start {}: {e}", path.display())))?;
        let input = serde_json::to_vec(config).expect("a configuration serializes");
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(&input)
            .map_err(|e| runtime_error(format!("write the configuration: {e}")))?;
        let output = child
            .wait_with_output()
            .map_err(|e| runtime_error(format!("wait: {e}")))?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        match serde_json::from_slice::<Error>(&output.stdout) {
            Ok(error) => Err(InvokeError::Plugin {
                plugin,
                command: command.as_str(),
                error,
            }),
            Err(_) => Err(runtime_error(format!(
                "{} without an error object: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))),
        }
    }
}

/// The spec's error object of a failed invocation, if the plugin gave one.
pub fn spec_error(e: &InvokeError) -> Option<&spec::Error> {
    match e {
        InvokeError::Plugin { error, .. } => Some(error),
        InvokeError::Runtime { .. } => None,
    }
}
