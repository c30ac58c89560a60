//! keel-cni's commands: what each does with the configuration and the invocation, and what it
//! answers (a result, or the spec's error object).

use serde_json::Value;

use crate::{
    ipam::{IpamError, Store},
    netlink,
    spec::{self, CniResult, Command, Dns, Error, Interface, Invocation, IpConfig, NetConf, Route},
};

/// Set in a plugin's environment, ADD aborts right after allocating the address (the tests
/// check that a crash there never leads to an address handed out twice).
pub const CRASH_AFTER_ALLOCATE: &str = "KEEL_CNI_CRASH_AFTER_ALLOCATE";

/// What a command prints on success.
pub enum Output {
    Result(CniResult),
    Version(spec::VersionInfo),
    /// DEL, CHECK, STATUS, GC print nothing.
    Nothing,
}

/// Runs one command.
pub fn run(invocation: &Invocation, stdin: &[u8]) -> Result<Output, Error> {
    if invocation.command == Command::Version {
        return Ok(Output::Version(spec::VersionInfo {
            cni_version: spec::VERSION.into(),
            supported_versions: spec::SUPPORTED_VERSIONS
                .iter()
                .map(|v| v.to_string())
                .collect(),
        }));
    }
    let conf = parse(stdin)?;
    let store = Store::new(conf.data_dir(), conf.subnet, conf.gateway());
    let gateway = conf.gateway();
    match invocation.command {
        Command::Add => {
            let netns = invocation.netns.as_deref().expect("checked for ADD");
            if !netns.exists() {
                return Err(Error::new(
                    spec::code::UNKNOWN_CONTAINER,
                    format!("no network namespace at {}", netns.display()),
                ));
            }
            let ip = store
                .allocate(&invocation.container_id, &invocation.ifname)
                .map_err(ipam_error)?;
            // Fault injection for the tests: a crash between allocating and configuring.
            if std::env::var_os(CRASH_AFTER_ALLOCATE).is_some() {
                std::process::abort();
            }
            let made = match netlink::add(
                &invocation.container_id,
                netns,
                &invocation.ifname,
                ip,
                gateway,
                conf.mtu,
            ) {
                Ok(made) => made,
                Err(e) => {
                    // Leave nothing half made: the runtime retries ADD or calls DEL.
                    let _ = netlink::del(&invocation.container_id, &invocation.ifname);
                    let _ = store.release(&invocation.container_id, &invocation.ifname);
                    return Err(Error::new(
                        spec::code::NETLINK,
                        "setting up the pod's network failed",
                    )
                    .with_details(e.to_string()));
                }
            };
            Ok(Output::Result(CniResult {
                cni_version: spec::VERSION.into(),
                interfaces: vec![
                    Interface {
                        name: netlink::host_ifname(&invocation.container_id, &invocation.ifname),
                        mac: made.host_mac,
                        sandbox: None,
                    },
                    Interface {
                        name: invocation.ifname.clone(),
                        mac: made.container_mac,
                        sandbox: Some(netns.display().to_string()),
                    },
                ],
                ips: vec![IpConfig {
                    address: format!("{ip}/32"),
                    gateway: Some(gateway.to_string()),
                    interface: Some(1),
                }],
                routes: vec![Route {
                    dst: "0.0.0.0/0".into(),
                    gw: Some(gateway.to_string()),
                }],
                dns: Dns::default(),
            }))
        }
        Command::Del => {
            // Idempotent, and possible without the namespace (it may be gone already).
            netlink::del(&invocation.container_id, &invocation.ifname).map_err(|e| {
                Error::new(spec::code::NETLINK, "removing the pod's network failed")
                    .with_details(e.to_string())
            })?;
            store
                .release(&invocation.container_id, &invocation.ifname)
                .map_err(ipam_error)?;
            Ok(Output::Nothing)
        }
        Command::Check => {
            let netns = invocation.netns.as_deref().expect("checked for CHECK");
            let ip = store
                .lookup(&invocation.container_id, &invocation.ifname)
                .map_err(ipam_error)?
                .ok_or_else(|| {
                    Error::new(
                        spec::code::CHECK_FAILED,
                        format!(
                            "no address is allocated to {}/{}",
                            invocation.container_id, invocation.ifname
                        ),
                    )
                })?;
            if let Some(prev) = &conf.prev_result {
                let prev: CniResult = serde_json::from_value(prev.clone()).map_err(|e| {
                    Error::new(spec::code::DECODE, "prevResult does not decode")
                        .with_details(e.to_string())
                })?;
                if prev.ipv4() != Some(ip) {
                    return Err(Error::new(
                        spec::code::CHECK_FAILED,
                        format!("prevResult says {:?}, the allocation is {ip}", prev.ipv4()),
                    ));
                }
            }
            netlink::check(
                &invocation.container_id,
                netns,
                &invocation.ifname,
                ip,
                gateway,
            )
            .map_err(|e| Error::new(spec::code::CHECK_FAILED, e.to_string()))?;
            Ok(Output::Nothing)
        }
        Command::Status => {
            // Ready when an address can still be handed out.
            let used = store.allocations().map_err(ipam_error)?.len();
            let capacity = conf.subnet.hosts().count().saturating_sub(1);
            if used >= capacity {
                return Err(Error::new(
                    spec::code::NO_FREE_ADDRESS,
                    format!("no free address in {}", conf.subnet),
                ));
            }
            Ok(Output::Nothing)
        }
        Command::Gc => {
            // CNI 1.1: release every allocation not in `cni.dev/valid-attachments`.
            let valid: Vec<(String, String)> = serde_json::from_slice::<Value>(stdin)
                .ok()
                .and_then(|v| v.get("cni.dev/valid-attachments").cloned())
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|a| {
                    Some((
                        a.get("containerID")?.as_str()?.to_owned(),
                        a.get("ifname")?.as_str()?.to_owned(),
                    ))
                })
                .collect();
            for (_, id, ifname) in store.allocations().map_err(ipam_error)? {
                if !valid
                    .iter()
                    .any(|(v_id, v_if)| *v_id == id && *v_if == ifname)
                {
                    let _ = netlink::del(&id, &ifname);
                    store.release(&id, &ifname).map_err(ipam_error)?;
                }
            }
            Ok(Output::Nothing)
        }
        Command::Version => unreachable!("answered above"),
    }
}

fn parse(stdin: &[u8]) -> Result<NetConf, Error> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        Error::new(spec::code::DECODE, "the network configuration is not JSON")
            .with_details(e.to_string())
    })?;
    let version = value
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !spec::SUPPORTED_VERSIONS.contains(&version) {
        return Err(Error::new(
            spec::code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {version:?} is not supported (supported: {})",
                spec::SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        Error::new(
            spec::code::INVALID_NETWORK_CONFIG,
            "the network configuration is not keel-cni's",
        )
        .with_details(e.to_string())
    })
}

fn ipam_error(e: IpamError) -> Error {
    match e {
        IpamError::Exhausted(subnet) => Error::new(
            spec::code::NO_FREE_ADDRESS,
            format!("no free address in {subnet}"),
        ),
        IpamError::Io { .. } => Error::new(spec::code::IO, e.to_string()),
    }
}
