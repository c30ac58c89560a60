//! The desired-state file `dpctl run` serves: interfaces to attach to and services to hold.
//!
//! ```json
//! {
//!   "interfaces": ["cli0"],
//!   "services": [
//!     {"frontend": "tcp/10.96.0.10:80", "backends": ["10.244.1.2:8080", "10.244.2.2:8080"]},
//!     {"frontend": "tcp/10.96.0.11:80", "backends": ["10.244.1.2:8080"],
//!      "scheduler": "maglev", "maglev_table_size": 16381, "affinity_timeout_s": 10800}
//!   ]
//! }
//! ```

use std::{net::SocketAddrV4, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use ebpf_dataplane::{DesiredService, Frontend, Scheduler, ServiceSpec, defaults};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    /// `tcp/<ipv4>:<port>` or `udp/<ipv4>:<port>`.
    pub frontend: String,
    #[serde(default)]
    pub backends: Vec<SocketAddrV4>,
    /// `random` (default) or `maglev`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u64>,
}

impl State {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        // Write and rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
    }

    /// The services as the data plane takes them; errors name the bad entry.
    pub fn desired(&self) -> Result<Vec<DesiredService>> {
        self.services
            .iter()
            .map(|entry| {
                entry
                    .desired()
                    .with_context(|| format!("service {}", entry.frontend))
            })
            .collect()
    }
}

impl ServiceEntry {
    fn desired(&self) -> Result<DesiredService> {
        let frontend: Frontend = self.frontend.parse().map_err(anyhow::Error::msg)?;
        let scheduler = match self.scheduler.as_deref() {
            None | Some("random") => Scheduler::Random,
            Some("maglev") => Scheduler::Maglev {
                table_size: self
                    .maglev_table_size
                    .unwrap_or(defaults::MAGLEV_TABLE_SIZE),
            },
            Some(other) => bail!("unknown scheduler {other:?} (random or maglev)"),
        };
        Ok(DesiredService {
            frontend,
            spec: ServiceSpec {
                scheduler,
                affinity_timeout: self.affinity_timeout_s.map(Duration::from_secs),
                ..Default::default()
            },
            backends: self.backends.clone(),
            source_ranges: Vec::new(),
        })
    }
}
