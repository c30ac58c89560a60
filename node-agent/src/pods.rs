//! The kubelet half of the agent (`--run-pods`): the pods of the view bound to this node go to
//! the kubelet (`node_agent_kubelet`), their statuses come back through the source they came
//! from (the feed's ReportPodStatus, or the API's status subresource), and the node's own
//! networking follows the cluster's nodes: IP forwarding, a route to every other node's pod
//! CIDR through its address (direct routing on the node network), masquerade for pod traffic
//! leaving the cluster's pod network.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use control_plane_api::{FeedClient, feed, view::View};
use futures::{FutureExt, TryStreamExt, future::BoxFuture};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use node_agent_kubelet::{Config, Hooks, Kubelet, Reporter, ServiceEnv, pod::PodDesired};
use rtnetlink::{RouteMessageBuilder, packet_route::route::RouteProtocol};

use crate::{
    agent::{Event, Shared},
    config::RunArgs,
};

/// Routes the agent adds carry this protocol number, so a restarted agent finds its own.
const ROUTE_PROTOCOL: u8 = 188;

/// What `--run-pods` sets up; the kubelet itself starts once the source can report.
#[derive(Clone, Debug)]
pub struct PodSettings {
    pub root: PathBuf,
    pub cni_path: Vec<PathBuf>,
    pub cluster_cidr: Ipv4Net,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub kubelet_port: u16,
}

impl PodSettings {
    pub fn from_args(args: &RunArgs) -> Result<Option<Self>> {
        if !args.run_pods {
            return Ok(None);
        }
        let exe = std::env::current_exe().context("find the agent's own binary")?;
        let cni_dir = args
            .cni_bin_dir
            .clone()
            .or_else(|| exe.parent().map(Path::to_path_buf))
            .context("no directory for CNI plugins")?;
        Ok(Some(Self {
            root: args.kubelet_root.clone(),
            cni_path: vec![cni_dir],
            cluster_cidr: args
                .cluster_cidr
                .parse()
                .with_context(|| format!("--cluster-cidr {}", args.cluster_cidr))?,
            backoff_base: Duration::from_secs_f64(args.restart_backoff.max(0.1)),
            backoff_max: Duration::from_secs_f64(
                args.max_restart_backoff.max(args.restart_backoff),
            ),
            kubelet_port: args.kubelet_port,
        }))
    }
}

/// Starts the kubelet with `reporter`; statuses of the pods it runs go there.
pub fn start_kubelet(
    shared: &Arc<Shared>,
    settings: &PodSettings,
    reporter: Arc<dyn Reporter>,
) -> Result<Arc<Kubelet>> {
    let exe = std::env::current_exe()?;
    let (ready, gone, services) = (shared.clone(), shared.clone(), shared.clone());
    let kubelet = Kubelet::new(
        Config {
            node_name: shared.node.clone(),
            root: settings.root.clone(),
            cni_config: serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "keel",
                "type": "keel-cni",
                "subnet": "0.0.0.0/32",
                "dataDir": settings.root.join("cni"),
            }),
            cni_path: settings.cni_path.clone(),
            backoff_base: settings.backoff_base,
            backoff_max: settings.backoff_max,
            tick: Duration::from_millis(100),
            log_max_bytes: 10 << 20,
        },
        exe,
        reporter,
        Hooks {
            sandbox_ready: Box::new(move |netns: &Path, ip| {
                if let Some(uid) = uid_of(netns) {
                    ready.send(Event::Interface(
                        node_agent_cni::netlink::host_ifname(uid, "eth0"),
                        vec![ip],
                    ));
                }
                ready.send(Event::Netns(netns.to_path_buf()));
                // Its host ports, if any, are served from now on.
                ready.send(Event::Changed);
            }),
            sandbox_gone: Box::new(move |netns: &Path| {
                gone.send(Event::NetnsGone(netns.to_path_buf()));
                gone.send(Event::Changed);
            }),
            services: Box::new(move |namespace: &str| {
                let view = services.view.lock().expect("not poisoned");
                service_env(&view, namespace)
            }),
        },
    );
    std::fs::create_dir_all(&settings.root)?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enable IP forwarding")?;
    masquerade(&settings.cluster_cidr)?;
    Ok(kubelet)
}

/// The addresses of this node's pods whose sandboxes are up, by pod uid (none without
/// `--run-pods`).
pub fn pod_ips(shared: &Shared) -> std::collections::HashMap<String, Ipv4Addr> {
    let Some(kubelet) = shared.kubelet.lock().expect("not poisoned").clone() else {
        return Default::default();
    };
    kubelet
        .pod_ips()
        .into_iter()
        .filter_map(|(netns, ip)| Some((uid_of(&netns)?.to_owned(), ip)))
        .collect()
}

fn uid_of(netns: &Path) -> Option<&str> {
    netns.file_name()?.to_str()?.strip_prefix("keel-")
}

fn service_env(view: &View, namespace: &str) -> Vec<ServiceEnv> {
    view.services
        .values()
        .filter(|s| s.namespace == namespace)
        .filter_map(|s| {
            Some(ServiceEnv {
                name: s.name.clone(),
                cluster_ip: s.cluster_ips.iter().find_map(|ip| ip.parse().ok())?,
                ports: s
                    .ports
                    .iter()
                    .map(|p| (p.name.clone(), p.port as u16, p.protocol.clone()))
                    .collect(),
            })
        })
        .collect()
}

/// The pods of the view as the kubelet takes them.
pub fn desired(view: &View) -> Vec<PodDesired> {
    view.pods
        .values()
        .filter_map(|p| {
            let spec = serde_json::from_slice(&p.spec_json)
                .inspect_err(|e| tracing::warn!(pod = %p.name, error = %e, "a pod spec that does not decode"))
                .ok()?;
            Some(PodDesired {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                labels: p.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                spec,
                deleting: p.deleting,
                grace_period_seconds: p.grace_period_seconds,
            })
        })
        .collect()
}

/// After a change of the view: the kubelet's pods, the node's pod CIDR, the routes.
pub fn on_change(shared: &Shared, kubelet: &Arc<Kubelet>, view: &View, nodes_changed: bool) {
    if let Some(cidr) = view
        .nodes
        .get(&shared.node)
        .and_then(|n| n.pod_cidrs.first())
    {
        kubelet.set_pod_cidr(cidr);
    }
    kubelet.sync(desired(view));
    if nodes_changed {
        let routes: Vec<(Ipv4Net, Ipv4Addr)> = view
            .nodes
            .values()
            .filter(|n| n.name != shared.node)
            .filter_map(|n| {
                let via: Ipv4Addr = n.internal_ip.parse().ok()?;
                Some(
                    n.pod_cidrs
                        .iter()
                        .filter_map(move |c| Some((c.parse().ok()?, via))),
                )
            })
            .flatten()
            .collect();
        tokio::spawn(async move {
            if let Err(e) = sync_routes(routes).await {
                tracing::warn!(error = format!("{e:#}"), "routes to other nodes' pods");
            }
        });
    }
}

/// Makes the agent's routes exactly `wanted` (pod CIDR via node address).
async fn sync_routes(wanted: Vec<(Ipv4Net, Ipv4Addr)>) -> Result<()> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut stale = Vec::new();
    let want: BTreeSet<(Ipv4Net, Ipv4Addr)> = wanted.iter().copied().collect();
    while let Some(route) = routes.try_next().await? {
        if route.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
            stale.push(route);
        }
    }
    for (cidr, via) in &want {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(cidr.network(), cidr.prefix_len())
            .gateway(*via)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .with_context(|| format!("route {cidr} via {via}"))?;
    }
    for route in stale {
        let dst = route.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::route::RouteAttribute::Destination(
                rtnetlink::packet_route::route::RouteAddress::Inet(ip),
            ) => Some(*ip),
            _ => None,
        });
        let keep = dst.is_some_and(|ip| {
            want.iter().any(|(cidr, _)| {
                cidr.network() == ip && cidr.prefix_len() == route.header.destination_prefix_length
            })
        });
        if !keep {
            let _ = handle.route().del(route).execute().await;
        }
    }
    task.abort();
    Ok(())
}

/// Pod traffic to outside the pod network leaves with the node's address.
fn masquerade(cluster_cidr: &Ipv4Net) -> Result<()> {
    let script = format!(
        "table ip keel-node\n\
         delete table ip keel-node\n\
         table ip keel-node {{\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ip saddr {cluster_cidr} ip daddr != {cluster_cidr} masquerade\n\
           }}\n\
         }}\n"
    );
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run nft (`cargo xtask setup` installs it)")?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Reports over the feed.
pub struct FeedReporter {
    pub client: FeedClient,
    pub node: String,
}

impl Reporter for FeedReporter {
    fn status<'a>(
        &'a self,
        pod: &'a PodDesired,
        status: &'a PodStatus,
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            let mut client = self.client.clone();
            client
                .report_pod_status(feed::PodStatusReport {
                    node_name: self.node.clone(),
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                    status_json: serde_json::to_vec(status)?,
                    ..Default::default()
                })
                .await?;
            Ok(())
        }
        .boxed()
    }

    fn deleted<'a>(&'a self, pod: &'a PodDesired) -> BoxFuture<'a, Result<()>> {
        async move {
            let mut client = self.client.clone();
            client
                .report_pod_status(feed::PodStatusReport {
                    node_name: self.node.clone(),
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                    deleted: true,
                    ..Default::default()
                })
                .await?;
            Ok(())
        }
        .boxed()
    }
}

/// Reports through a Kubernetes API server (the status subresource; the final delete).
pub struct ApiReporter {
    pub client: kube::Client,
}

impl Reporter for ApiReporter {
    fn status<'a>(
        &'a self,
        pod: &'a PodDesired,
        status: &'a PodStatus,
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), &pod.namespace);
            api.patch_status(
                &pod.name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(serde_json::json!({"status": status})),
            )
            .await?;
            Ok(())
        }
        .boxed()
    }

    fn deleted<'a>(&'a self, pod: &'a PodDesired) -> BoxFuture<'a, Result<()>> {
        async move {
            let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), &pod.namespace);
            let params = kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(kube::api::Preconditions {
                    uid: Some(pod.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&pod.name, &params).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        .boxed()
    }
}
