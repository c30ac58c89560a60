//! The kubelet: the pods bound to this node become running containers. Each pod is a state
//! machine on a task of its own ([`pod`]): its sandbox is a network namespace wired by a CNI
//! plugin (keel-cni, run as the spec has a runtime run it), its containers are OCI bundles run
//! by runc under shims ([`runtime`], [`shim`]) from images of the node's store ([`image`]),
//! probed ([`probe`]), restarted with kubelet's back-off, stopped gracefully. Statuses go out
//! through a [`Reporter`] (the feed, or the API's status subresource: the agent decides), and
//! container logs are kept in files with rotation ([`logs`]).
//!
//! This crate knows Kubernetes' pod types but not where they come from or go to: the agent
//! feeds it [`pod::PodDesired`]s and gives it a reporter.

pub mod image;
pub mod logs;
pub mod pod;
pub mod probe;
pub mod runtime;
pub mod shim;

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, PodStatus, VolumeMount};
use node_agent_cni::invoke::Network;
use tokio::sync::watch;

use crate::{
    image::{Image, ImageStore},
    pod::PodDesired,
    runtime::{BindMount, ContainerSpec, Runtime},
};

/// Where pod statuses go.
pub trait Reporter: Send + Sync {
    /// The pod's status changed.
    fn status<'a>(
        &'a self,
        pod: &'a PodDesired,
        status: &'a PodStatus,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
    /// The pod was being deleted and is gone from the node.
    fn deleted<'a>(&'a self, pod: &'a PodDesired) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// A service as the environment of a container names it (`{NAME}_SERVICE_HOST`, ...).
#[derive(Clone, Debug)]
pub struct ServiceEnv {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// (port name, port, protocol).
    pub ports: Vec<(String, u16, String)>,
}

/// What the kubelet is told about its node and its pods' network.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    /// Pods, containers, images and logs live under this directory.
    pub root: PathBuf,
    /// The CNI network configuration (its `subnet` is the node's pod CIDR).
    pub cni_config: serde_json::Value,
    /// Where CNI plugins are.
    pub cni_path: Vec<PathBuf>,
    /// kubelet's container restart back-off: first step and cap (10 s and 5 min).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often each pod's task looks at its containers.
    pub tick: Duration,
    /// Log files rotate past this size.
    pub log_max_bytes: u64,
}

type SandboxReady = Box<dyn Fn(&Path, Ipv4Addr) + Send + Sync>;
type SandboxGone = Box<dyn Fn(&Path) + Send + Sync>;
type ServicesOf = Box<dyn Fn(&str) -> Vec<ServiceEnv> + Send + Sync>;

/// Callbacks into the rest of the agent.
pub struct Hooks {
    /// A pod's sandbox is up: its namespace and address (the proxy attaches to it).
    pub sandbox_ready: SandboxReady,
    pub sandbox_gone: SandboxGone,
    /// The services of a namespace, for the containers' environment.
    pub services: ServicesOf,
}

pub struct Kubelet {
    pub config: Config,
    pub root: PathBuf,
    pub runtime: Runtime,
    pub images: ImageStore,
    pub reporter: Arc<dyn Reporter>,
    hooks: Hooks,
    network: Mutex<Option<Network>>,
    pods: Mutex<HashMap<String, watch::Sender<PodDesired>>>,
    ips: Mutex<HashMap<PathBuf, Ipv4Addr>>,
}

impl Kubelet {
    pub fn new(
        config: Config,
        agent_binary: PathBuf,
        reporter: Arc<dyn Reporter>,
        hooks: Hooks,
    ) -> Arc<Self> {
        let root = config.root.clone();
        Arc::new(Self {
            runtime: Runtime::new(&root, agent_binary),
            images: ImageStore::new(root.join("images")),
            root,
            config,
            reporter,
            hooks,
            network: Mutex::new(None),
            pods: Mutex::new(HashMap::new()),
            ips: Mutex::new(HashMap::new()),
        })
    }

    /// Sets the pod CIDR pods get addresses from (known once the node is registered).
    pub fn set_pod_cidr(&self, cidr: &str) {
        let mut config = self.config.cni_config.clone();
        config["subnet"] = serde_json::Value::String(cidr.to_owned());
        *self.network.lock().expect("not poisoned") =
            Some(Network::new(config, self.config.cni_path.clone()));
    }

    fn network(&self) -> anyhow::Result<Network> {
        self.network
            .lock()
            .expect("not poisoned")
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the node has no pod CIDR yet"))
    }

    /// Makes the running pods those of `desired`: new pods start, changed ones hear of it
    /// (deletion), pods no longer bound here stop at once.
    pub fn sync(self: &Arc<Self>, desired: Vec<PodDesired>) {
        let mut pods = self.pods.lock().expect("not poisoned");
        let wanted: std::collections::HashSet<String> =
            desired.iter().map(|p| p.uid.clone()).collect();
        for pod in desired {
            match pods.get(&pod.uid) {
                Some(tx) if !tx.is_closed() => {
                    if *tx.borrow() != pod {
                        let _ = tx.send(pod);
                    }
                }
                _ => {
                    let (tx, rx) = watch::channel(pod.clone());
                    pods.insert(pod.uid.clone(), tx);
                    let kubelet = self.clone();
                    let uid = pod.uid.clone();
                    tokio::spawn(async move {
                        pod::run(kubelet.clone(), rx).await;
                        kubelet.pods.lock().expect("not poisoned").remove(&uid);
                    });
                }
            }
        }
        // Dropping a pod's sender tells its task the pod is gone (force deletion).
        pods.retain(|uid, _| wanted.contains(uid));
    }

    /// How many pods run (or are being set up or torn down).
    pub fn pod_count(&self) -> usize {
        self.pods.lock().expect("not poisoned").len()
    }

    fn sandbox_ready(&self, netns: &Path, ip: Ipv4Addr) {
        self.ips
            .lock()
            .expect("not poisoned")
            .insert(netns.to_path_buf(), ip);
        (self.hooks.sandbox_ready)(netns, ip);
    }

    fn sandbox_gone(&self, netns: &Path) {
        self.ips.lock().expect("not poisoned").remove(netns);
        (self.hooks.sandbox_gone)(netns);
    }

    /// The pods' network namespaces whose sandboxes are up, with the pods' addresses.
    pub fn pod_ips(&self) -> Vec<(PathBuf, Ipv4Addr)> {
        let ips = self.ips.lock().expect("not poisoned");
        ips.iter().map(|(netns, ip)| (netns.clone(), *ip)).collect()
    }

    fn pod_ip_of(&self, netns: &Path) -> Option<Ipv4Addr> {
        self.ips.lock().expect("not poisoned").get(netns).copied()
    }

    fn logs_gone(&self, pod: &PodDesired) {
        let _ = std::fs::remove_dir_all(logs::pod_dir(&self.root, pod));
    }

    /// What runc runs for `container` of `pod`; an error says what in the spec this kubelet
    /// cannot do (the container waits with `CreateContainerConfigError`).
    #[allow(clippy::too_many_arguments)]
    fn container_spec(
        &self,
        pod: &PodDesired,
        container: &Container,
        id: &str,
        cgroup: &str,
        restarts: i32,
        image: &Image,
        netns: &Path,
    ) -> Result<ContainerSpec, String> {
        // Kubernetes: command replaces the entrypoint, args the cmd.
        let (entrypoint, cmd) = match (&container.command, &container.args) {
            (Some(command), Some(args)) => (command.clone(), args.clone()),
            (Some(command), None) => (command.clone(), Vec::new()),
            (None, Some(args)) => (image.config.entrypoint.clone(), args.clone()),
            (None, None) => (image.config.entrypoint.clone(), image.config.cmd.clone()),
        };
        let mut env: Vec<String> = image.config.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        env.push(format!("HOSTNAME={}", pod.name));
        if pod.spec.enable_service_links.unwrap_or(true) {
            env.extend(service_env(&(self.hooks.services)(&pod.namespace)));
        }
        for e in container.env.iter().flatten() {
            if let Some(value) = &e.value {
                env.push(format!("{}={value}", e.name));
            } else if let Some(field) = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
                // The downward API's common fields.
                let value = match field.field_path.as_str() {
                    "metadata.name" => pod.name.clone(),
                    "metadata.namespace" => pod.namespace.clone(),
                    "metadata.uid" => pod.uid.clone(),
                    "spec.nodeName" => self.config.node_name.clone(),
                    "status.podIP" => self
                        .pod_ip_of(netns)
                        .map(|i| i.to_string())
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                env.push(format!("{}={value}", e.name));
            }
        }
        let quantity =
            |map: Option<
                &std::collections::BTreeMap<
                    String,
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity,
                >,
            >,
             key: &str| { map.and_then(|m| m.get(key)).map(|q| q.0.clone()) };
        let resources = container.resources.as_ref();
        let cpu_limit =
            quantity(resources.and_then(|r| r.limits.as_ref()), "cpu").and_then(|q| millicores(&q));
        let cpu_request = quantity(resources.and_then(|r| r.requests.as_ref()), "cpu")
            .and_then(|q| millicores(&q));
        let memory_limit =
            quantity(resources.and_then(|r| r.limits.as_ref()), "memory").and_then(|q| bytes(&q));
        let pod_dir = self.root.join("pods").join(&pod.uid);
        let mut mounts = vec![
            BindMount {
                source: pod_dir.join("hosts"),
                destination: "/etc/hosts".into(),
                read_only: true,
            },
            BindMount {
                source: pod_dir.join("resolv.conf"),
                destination: "/etc/resolv.conf".into(),
                read_only: true,
            },
        ];
        for m in container.volume_mounts.iter().flatten() {
            mounts.push(volume_mount(pod, &pod_dir, m)?);
        }
        Ok(ContainerSpec {
            id: id.to_owned(),
            args: entrypoint.into_iter().chain(cmd).collect(),
            env,
            cwd: container
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| image.config.working_dir.clone()),
            hostname: pod
                .spec
                .hostname
                .clone()
                .unwrap_or_else(|| pod.name.clone()),
            netns: netns.to_path_buf(),
            mounts,
            cgroup: cgroup.to_owned(),
            cpu_limit_millis: cpu_limit,
            cpu_request_millis: cpu_request,
            memory_limit,
            log: logs::log_path(&self.root, pod, &container.name, restarts),
        })
    }
}

/// Where a container's volume mount comes from: `emptyDir` volumes are directories of the
/// pod (`pods/<uid>/volumes/<name>`, created on first use, removed with the pod), `hostPath`
/// volumes the node's own paths. Other volume types are refused by name.
fn volume_mount(pod: &PodDesired, pod_dir: &Path, m: &VolumeMount) -> Result<BindMount, String> {
    let volume = pod
        .spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .ok_or_else(|| format!("volume mount {:?}: the pod has no such volume", m.name))?;
    let mut source = if volume.empty_dir.is_some() {
        let dir = pod_dir.join("volumes").join(&volume.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("volume {:?}: create {}: {e}", volume.name, dir.display()))?;
        dir
    } else if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        match host.type_.as_deref().unwrap_or("") {
            "DirectoryOrCreate" => std::fs::create_dir_all(&path)
                .map_err(|e| format!("volume {:?}: create {}: {e}", volume.name, host.path))?,
            "" => {}
            _ if path.exists() => {}
            kind => {
                return Err(format!(
                    "volume {:?}: hostPath {} ({kind}) does not exist",
                    volume.name, host.path
                ));
            }
        }
        path
    } else {
        let kind = serde_json::to_value(volume)
            .ok()
            .and_then(|v| {
                v.as_object()?
                    .keys()
                    .find(|k| k.as_str() != "name")
                    .cloned()
            })
            .unwrap_or_else(|| "unknown".into());
        return Err(format!(
            "volume {:?}: {kind} volumes are not supported by this kubelet (emptyDir and hostPath are)",
            volume.name
        ));
    };
    if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
        let sub = Path::new(sub);
        if sub.is_absolute()
            || sub
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!(
                "volume mount {:?}: subPath {} must be relative and stay inside the volume",
                m.name,
                sub.display()
            ));
        }
        source = source.join(sub);
        if volume.empty_dir.is_some() {
            std::fs::create_dir_all(&source)
                .map_err(|e| format!("volume {:?}: create {}: {e}", m.name, source.display()))?;
        }
    }
    Ok(BindMount {
        source,
        destination: m.mount_path.clone(),
        read_only: m.read_only.unwrap_or(false),
    })
}

/// The environment kubelet gives containers for the services of their namespace.
pub fn service_env(services: &[ServiceEnv]) -> Vec<String> {
    let mut env = Vec::new();
    for s in services {
        let name = s.name.to_uppercase().replace('-', "_");
        let Some((_, first_port, first_proto)) = s.ports.first() else {
            continue;
        };
        let ip = s.cluster_ip;
        env.push(format!("{name}_SERVICE_HOST={ip}"));
        env.push(format!("{name}_SERVICE_PORT={first_port}"));
        env.push(format!(
            "{name}_PORT={}://{ip}:{first_port}",
            first_proto.to_lowercase()
        ));
        for (port_name, port, proto) in &s.ports {
            if !port_name.is_empty() {
                env.push(format!(
                    "{name}_SERVICE_PORT_{}={port}",
                    port_name.to_uppercase().replace('-', "_")
                ));
            }
            let p = proto.to_uppercase();
            let prefix = format!("{name}_PORT_{port}_{p}");
            env.push(format!("{prefix}={}://{ip}:{port}", proto.to_lowercase()));
            env.push(format!("{prefix}_PROTO={}", proto.to_lowercase()));
            env.push(format!("{prefix}_PORT={port}"));
            env.push(format!("{prefix}_ADDR={ip}"));
        }
    }
    env
}

/// A CPU quantity in millicores (`500m`, `2`, `0.5`), rounded up as kubelet does.
pub fn millicores(q: &str) -> Option<i64> {
    nanos(q).map(|n| (n / 1e6).ceil() as i64)
}

/// A memory quantity in bytes (`64Mi`, `1G`, `1000`, `1e6`), rounded up.
pub fn bytes(q: &str) -> Option<i64> {
    nanos(q).map(|n| (n / 1e9).ceil() as i64)
}

/// A quantity in billionths of its unit, the finest it can express (so `1.1` is not read as
/// 1.1000000000000001 and rounded up to the next millicore); `None` if it does not parse or
/// is negative.
fn nanos(q: &str) -> Option<f64> {
    let value = kube_quantity::ParsedQuantity::try_from(q.trim())
        .ok()?
        .to_bytes_f64()?;
    let nanos = (value * 1e9).round();
    (nanos.is_finite() && nanos >= 0.0).then_some(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_as_kubelet_reads_them() {
        assert_eq!(millicores("500m"), Some(500));
        assert_eq!(millicores("2"), Some(2000));
        assert_eq!(millicores("0.25"), Some(250));
        assert_eq!(millicores("1.1"), Some(1100));
        assert_eq!(millicores("1n"), Some(1), "rounded up");
        assert_eq!(bytes("64Mi"), Some(64 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("1000"), Some(1000));
        assert_eq!(bytes("1e6"), Some(1_000_000));
        assert_eq!(bytes("lots"), None);
        assert_eq!(bytes("-1Mi"), None);
    }

    #[test]
    fn service_links_as_kubelet_writes_them() {
        let env = service_env(&[ServiceEnv {
            name: "my-web".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            ports: vec![("http".into(), 80, "TCP".into())],
        }]);
        for want in [
            "MY_WEB_SERVICE_HOST=10.96.0.10",
            "MY_WEB_SERVICE_PORT=80",
            "MY_WEB_SERVICE_PORT_HTTP=80",
            "MY_WEB_PORT=tcp://10.96.0.10:80",
            "MY_WEB_PORT_80_TCP_ADDR=10.96.0.10",
        ] {
            assert!(env.iter().any(|e| e == want), "{want} in {env:?}");
        }
    }
}
