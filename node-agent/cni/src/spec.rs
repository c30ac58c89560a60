//! What the CNI specification (1.0, with 1.1's STATUS and GC) fixes between a runtime and a
//! plugin: the environment variables, the network configuration on stdin, the result and the
//! error on stdout, the error codes.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The version results are written in.
pub const VERSION: &str = "1.0.0";
/// Versions of the configuration this plugin accepts.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's well-known error codes (1-99 are the spec's; 100 and up are the plugin's).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// keel-cni: the pod CIDR has no free address.
    pub const NO_FREE_ADDRESS: u32 = 100;
    /// keel-cni: a kernel call failed.
    pub const NETLINK: u32 = 101;
    /// keel-cni: CHECK found the container's networking not as ADD left it.
    pub const CHECK_FAILED: u32 = 102;
}

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }
}

/// The error object a plugin prints, and a runtime reads, when a command fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct Error {
    #[serde(default)]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl Error {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: VERSION.into(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

/// The runtime's side of one invocation (the `CNI_*` variables).
#[derive(Clone, Debug)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// `CNI_NETNS`: the path of the container's network namespace.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
    pub path: Vec<PathBuf>,
}

impl Invocation {
    /// Reads the `CNI_*` variables, with the spec's checks (code 4 when one is missing).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let command = get("CNI_COMMAND")
            .ok_or_else(|| Error::new(code::INVALID_ENVIRONMENT, "CNI_COMMAND is not set"))?;
        let command = Command::parse(&command).ok_or_else(|| {
            Error::new(
                code::INVALID_ENVIRONMENT,
                format!("unknown CNI_COMMAND {command:?}"),
            )
        })?;
        let required = |name: &str| -> Result<String, Error> {
            get(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| Error::new(code::INVALID_ENVIRONMENT, format!("{name} is not set")))
        };
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = if needs_container {
            let id = required("CNI_CONTAINERID")?;
            if !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                return Err(Error::new(
                    code::INVALID_ENVIRONMENT,
                    format!("CNI_CONTAINERID {id:?} has characters outside [A-Za-z0-9_.-]"),
                ));
            }
            id
        } else {
            get("CNI_CONTAINERID").unwrap_or_default()
        };
        let ifname = if needs_container {
            required("CNI_IFNAME")?
        } else {
            get("CNI_IFNAME").unwrap_or_default()
        };
        let netns = match command {
            Command::Add | Command::Check => Some(PathBuf::from(required("CNI_NETNS")?)),
            _ => get("CNI_NETNS")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        };
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args: get("CNI_ARGS").unwrap_or_default(),
            path: get("CNI_PATH")
                .unwrap_or_default()
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
        })
    }

    /// The variables for a plugin process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let path: Vec<String> = self.path.iter().map(|p| p.display().to_string()).collect();
        let mut env = vec![
            ("CNI_COMMAND", self.command.as_str().to_owned()),
            ("CNI_CONTAINERID", self.container_id.clone()),
            ("CNI_IFNAME", self.ifname.clone()),
            ("CNI_ARGS", self.args.clone()),
            ("CNI_PATH", path.join(":")),
        ];
        if let Some(netns) = &self.netns {
            env.push(("CNI_NETNS", netns.display().to_string()));
        }
        env
    }
}

/// keel-cni's network configuration (stdin).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin: String,
    /// The node's pod CIDR: addresses come from it.
    pub subnet: Ipv4Net,
    /// The pods' gateway, on the host side of every pod's veth (default: the subnet's first
    /// address).
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Where allocations are kept (default `/var/lib/keel/cni`).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The previous plugin's result (CHECK, DEL), as the spec passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<serde_json::Value>,
}

impl NetConf {
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(self.subnet.network()) + 1))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| Path::new("/var/lib/keel/cni").to_path_buf())
            .join(&self.name)
    }
}

/// The result of ADD (and the previous result CHECK and DEL receive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// The namespace path, for interfaces inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR notation.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

/// VERSION's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

impl CniResult {
    /// The container's first IPv4 address.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips
            .iter()
            .find_map(|ip| ip.address.split('/').next()?.parse().ok())
    }
}
