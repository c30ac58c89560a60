//! The feed to node agents (`proto/feed.proto` in control-plane/api): registration, heartbeats
//! (the node's Lease), pod status reports, and the Watch stream of snapshot then deltas from
//! the [`hub::Hub`], over TLS with the control plane's CA, every call authenticated by the node
//! token.

pub mod convert;
pub mod hub;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use control_plane_api::feed::{
    self, FeedMessage, HeartbeatRequest, HeartbeatResponse, PodPhase, PodStatusAck,
    PodStatusReport, RegisterRequest, RegisterResponse, WatchRequest, feed_message,
    node_feed_server::{NodeFeed, NodeFeedServer},
};
use control_plane_apiserver::{error::ApiError, registry::DeleteParams, server::Credentials};
use control_plane_client::{
    NODE_LEASE_NAMESPACE,
    client::Client,
    util::{controller_ref, set_condition},
};
use futures::Stream;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
            ContainerStatus, DaemonEndpoint, HostIP, Node, NodeAddress, NodeCondition,
            NodeDaemonEndpoints, NodeStatus, Pod, PodCondition, PodIP, PodStatus,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, Time},
    },
};
use tokio::sync::mpsc;
use tonic::{
    Request, Response, Status,
    transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming},
};

use crate::hub::{Hub, Since};

/// Objects per snapshot chunk.
const CHUNK: usize = 2000;
/// Deltas per message at most.
const BATCH: usize = 1000;
/// An agent whose version moved only through changes it does not see hears of it this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long a node's lease lasts (kubelet's default).
const LEASE_SECONDS: i32 = 40;

/// The node token: created on first start in the state directory, reused after.
pub fn load_or_create_token(state_dir: &Path) -> Result<String> {
    let path = state_dir.join("node-token");
    if let Ok(t) = std::fs::read_to_string(&path)
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    control_plane_apiserver::server::create_private_dir(state_dir)?;
    control_plane_apiserver::server::write_private(&path, &token)?;
    Ok(token)
}

pub struct FeedService {
    client: Client,
    hub: Arc<Hub>,
    /// Issues the kubelets' serving certificates.
    credentials: Arc<Credentials>,
}

fn status(e: ApiError) -> Status {
    match e.code.as_u16() {
        404 => Status::not_found(e.message),
        409 => Status::aborted(e.message),
        400 | 422 => Status::invalid_argument(e.message),
        _ => Status::internal(e.message),
    }
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn ready_condition(now: Time) -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: Some("KubeletReady".into()),
        message: Some("kubelet is posting ready status".into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl FeedService {
    pub fn new(client: Client, hub: Arc<Hub>, credentials: Arc<Credentials>) -> Self {
        static REGISTER: std::sync::Once = std::sync::Once::new();
        REGISTER.call_once(|| {
            control_plane_apiserver::metrics::register(
                "keel_feed_agents_connected",
                "Node agents with a Watch stream open",
                AGENTS_CONNECTED.clone(),
            );
        });
        Self {
            client,
            hub,
            credentials,
        }
    }

    async fn renew_lease(&self, node: &Node) -> Result<(), ApiError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let renewed = MicroTime(jiff::Timestamp::now());
        let result = self
            .client
            .update::<Lease>(Some(NODE_LEASE_NAMESPACE), &name, false, |l| {
                l.spec.get_or_insert_with(Default::default).renew_time = Some(renewed.clone());
                true
            })
            .await;
        match result {
            Err(e) if e.reason == "NotFound" => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(NODE_LEASE_NAMESPACE.into()),
                        owner_references: Some(vec![controller_ref(node)]),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(name),
                        lease_duration_seconds: Some(LEASE_SECONDS),
                        renew_time: Some(renewed),
                        ..Default::default()
                    }),
                };
                self.client.create(&lease).await.map(drop)
            }
            other => other.map(drop),
        }
    }

    /// Whether `node` exists and its lease was renewed within its duration.
    async fn alive(&self, node: &str) -> bool {
        let Ok(lease) = self
            .client
            .get::<Lease>(Some(NODE_LEASE_NAMESPACE), node)
            .await
        else {
            return false;
        };
        let Some(spec) = lease.spec else {
            return false;
        };
        let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
        let node_exists = self.client.get::<Node>(None, node).await.is_ok();
        node_exists
            && spec.renew_time.is_some_and(|t| {
                jiff::Timestamp::now().duration_since(t.0)
                    < jiff::SignedDuration::from_secs(duration)
            })
    }

    /// Marks the node Ready (the kubelet's job: it is alive and says so).
    async fn mark_ready(&self, name: &str) -> Result<Node, ApiError> {
        let now = now();
        self.client
            .update::<Node>(None, name, true, |n| {
                let conditions = n
                    .status
                    .get_or_insert_with(Default::default)
                    .conditions
                    .get_or_insert_with(Vec::new);
                if conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
                {
                    return false;
                }
                conditions.retain(|c| c.type_ != "Ready");
                conditions.push(ready_condition(now.clone()));
                true
            })
            .await
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<FeedMessage, Status>> + Send>>;

#[tonic::async_trait]
impl NodeFeed for FeedService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let bootstrap = request.extensions().get::<Caller>() == Some(&Caller::Bootstrap);
        if !bootstrap {
            act_as(&request, &request.get_ref().node_name)?;
        }
        let r = request.into_inner();
        if r.node_name.is_empty() {
            return Err(Status::invalid_argument("node_name is required"));
        }
        if bootstrap {
            if r.client_csr_pem.is_empty() {
                return Err(Status::invalid_argument(
                    "registering with the bootstrap token needs client_csr_pem: the node's \
                     certificate is what it calls with afterwards",
                ));
            }
            // A node that is alive is registered again only by itself: the shared token must
            // not take over another node's identity.
            if self.alive(&r.node_name).await {
                return Err(Status::permission_denied(format!(
                    "node {} is registered and its lease is current: only its own certificate \
                     registers it again (or delete the Node)",
                    r.node_name
                )));
            }
        }
        let client_cert_pem = if r.client_csr_pem.is_empty() {
            String::new()
        } else {
            self.credentials
                .sign_node_client(&r.client_csr_pem, &r.node_name)
                .map_err(|e| Status::invalid_argument(format!("client_csr_pem: {e:#}")))?
        };
        let capacity = r.capacity.unwrap_or_default();
        let resources: BTreeMap<String, Quantity> = [
            ("cpu", format!("{}m", capacity.cpu_millis)),
            ("memory", capacity.memory_bytes.to_string()),
            ("pods", capacity.pods.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Quantity(v)))
        .collect();
        let mut labels: BTreeMap<String, String> = [
            ("kubernetes.io/hostname", r.node_name.as_str()),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", std::env::consts::ARCH),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        labels.extend(r.labels);
        let node_status = NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: r.internal_ip.clone(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: r.node_name.clone(),
                },
            ]),
            conditions: Some(vec![ready_condition(now())]),
            daemon_endpoints: (r.kubelet_port != 0).then_some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint {
                    port: r.kubelet_port as i32,
                }),
            }),
            ..Default::default()
        };
        let existing = self.client.get::<Node>(None, &r.node_name).await;
        let node = match existing {
            Err(e) if e.reason == "NotFound" => {
                let node = Node {
                    metadata: ObjectMeta {
                        name: Some(r.node_name.clone()),
                        labels: Some(labels.clone()),
                        ..Default::default()
                    },
                    spec: None,
                    status: None,
                };
                match self.client.create(&node).await {
                    Err(e) if e.reason != "AlreadyExists" => return Err(status(e)),
                    _ => {}
                }
                self.client
                    .get::<Node>(None, &r.node_name)
                    .await
                    .map_err(status)?
            }
            other => other.map_err(status)?,
        };
        if node
            .metadata
            .labels
            .as_ref()
            .is_none_or(|l| labels.iter().any(|(k, v)| l.get(k) != Some(v)))
        {
            self.client
                .update::<Node>(None, &r.node_name, false, |n| {
                    n.metadata
                        .labels
                        .get_or_insert_with(BTreeMap::new)
                        .extend(labels.clone());
                    true
                })
                .await
                .map_err(status)?;
        }
        let node = self
            .client
            .update::<Node>(None, &r.node_name, true, |n| {
                let status = n.status.get_or_insert_with(Default::default);
                let ready = status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == "Ready")
                    .cloned();
                *status = node_status.clone();
                // Keep when it last turned Ready, if it already was.
                if let (Some(old), Some(new)) = (
                    ready,
                    status.conditions.as_mut().and_then(|c| c.first_mut()),
                ) && old.status == "True"
                {
                    new.last_transition_time = old.last_transition_time;
                }
                true
            })
            .await
            .map_err(status)?;
        self.renew_lease(&node).await.map_err(status)?;
        let mut names = vec![r.node_name.clone()];
        names.extend((!r.internal_ip.is_empty()).then(|| r.internal_ip.clone()));
        let (kubelet_cert_pem, kubelet_key_pem) = self
            .credentials
            .issue(&format!("system:node:{}", r.node_name), &names)
            .map_err(|e| Status::internal(format!("issue the kubelet's certificate: {e}")))?;
        Ok(Response::new(RegisterResponse {
            pod_cidr: node.spec.and_then(|s| s.pod_cidr).unwrap_or_default(),
            kubelet_cert_pem,
            kubelet_key_pem,
            client_cert_pem,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        act_as(&request, &request.get_ref().node_name)?;
        let name = request.into_inner().node_name;
        let node = match self.client.informers.get::<Node>().get(&name) {
            Some(n) => (*n).clone(),
            None => self.client.get::<Node>(None, &name).await.map_err(|e| {
                if e.reason == "NotFound" {
                    Status::not_found(format!("node {name} is not registered"))
                } else {
                    status(e)
                }
            })?,
        };
        self.renew_lease(&node).await.map_err(status)?;
        if !node_ready(&node) {
            self.mark_ready(&name).await.map_err(status)?;
        }
        Ok(Response::new(HeartbeatResponse {}))
    }

    async fn report_pod_status(
        &self,
        request: Request<PodStatusReport>,
    ) -> Result<Response<PodStatusAck>, Status> {
        // Its own pods only: the pod must be bound to the node that calls (checked below).
        act_as(&request, &request.get_ref().node_name)?;
        let r = request.into_inner();
        let pod: Pod = self
            .client
            .get(Some(&r.namespace), &r.name)
            .await
            .map_err(status)?;
        if pod.metadata.uid.as_deref() != Some(r.uid.as_str()) {
            return Err(Status::failed_precondition(format!(
                "pod {}/{} is not the pod with uid {}",
                r.namespace, r.name, r.uid
            )));
        }
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(r.node_name.as_str()) {
            return Err(Status::permission_denied(format!(
                "pod {}/{} is not bound to {}",
                r.namespace, r.name, r.node_name
            )));
        }
        if r.deleted {
            if pod.metadata.deletion_timestamp.is_none() {
                return Err(Status::failed_precondition("the pod is not being deleted"));
            }
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                precondition_uid: Some(r.uid.clone()),
                ..Default::default()
            };
            self.client
                .delete::<Pod>(Some(&r.namespace), &r.name, &params)
                .await
                .map_err(status)?;
            return Ok(Response::new(PodStatusAck {}));
        }
        let host_ip = self
            .client
            .informers
            .get::<Node>()
            .get(&r.node_name)
            .and_then(|n| {
                n.status
                    .as_ref()?
                    .addresses
                    .as_ref()?
                    .iter()
                    .find(|a| a.type_ == "InternalIP")
                    .map(|a| a.address.clone())
            });
        if !r.status_json.is_empty() {
            let reported: PodStatus = serde_json::from_slice(&r.status_json)
                .map_err(|e| Status::invalid_argument(format!("status_json: {e}")))?;
            self.client
                .update::<Pod>(Some(&r.namespace), &r.name, true, |p| {
                    let old = p.status.clone().unwrap_or_default();
                    let mut status = reported.clone();
                    status.host_ip = host_ip.clone().or(old.host_ip.clone());
                    if let Some(ip) = &status.host_ip {
                        status.host_ips = Some(vec![HostIP { ip: ip.clone() }]);
                    }
                    status.start_time = old.start_time.clone().or(status.start_time);
                    // A condition keeps its transition time while its status holds.
                    for c in status.conditions.iter_mut().flatten() {
                        if let Some(before) = old
                            .conditions
                            .iter()
                            .flatten()
                            .find(|o| o.type_ == c.type_ && o.status == c.status)
                        {
                            c.last_transition_time = before.last_transition_time.clone();
                        }
                    }
                    if p.status.as_ref() == Some(&status) {
                        return false;
                    }
                    p.status = Some(status);
                    true
                })
                .await
                .map_err(status)?;
            return Ok(Response::new(PodStatusAck {}));
        }
        let phase = match PodPhase::try_from(r.phase).unwrap_or(PodPhase::Unspecified) {
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
            PodPhase::Pending | PodPhase::Unspecified => "Pending",
        };
        let containers: Vec<ContainerStatus> = r
            .containers
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone(),
                image_id: String::new(),
                ready: c.ready,
                restart_count: c.restart_count,
                started: Some(c.running),
                state: Some(match (c.running, c.exit_code) {
                    (true, _) => ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: Some(now()),
                        }),
                        ..Default::default()
                    },
                    (false, Some(code)) => ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: code,
                            finished_at: Some(now()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    (false, None) => ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("ContainerCreating".into()),
                            message: None,
                        }),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            })
            .collect();
        self.client
            .update::<Pod>(Some(&r.namespace), &r.name, true, |p| {
                let mut changed = false;
                let s = p.status.get_or_insert_with(Default::default);
                let before = (s.phase.clone(), s.pod_ip.clone(), s.host_ip.clone());
                s.phase = Some(phase.to_owned());
                if !r.pod_ip.is_empty() {
                    s.pod_ip = Some(r.pod_ip.clone());
                    s.pod_ips = Some(vec![PodIP {
                        ip: r.pod_ip.clone(),
                    }]);
                }
                if let Some(ip) = &host_ip {
                    s.host_ip = Some(ip.clone());
                }
                if s.start_time.is_none() {
                    s.start_time = Some(now());
                    changed = true;
                }
                changed |= before != (s.phase.clone(), s.pod_ip.clone(), s.host_ip.clone());
                // Container states carry timestamps: only a change of readiness or restarts
                // rewrites them.
                let summary = |cs: &[ContainerStatus]| {
                    cs.iter()
                        .map(|c| (c.name.clone(), c.ready, c.restart_count, c.started))
                        .collect::<Vec<_>>()
                };
                if summary(s.container_statuses.as_deref().unwrap_or_default())
                    != summary(&containers)
                {
                    s.container_statuses = Some(containers.clone());
                    changed = true;
                }
                let flag = |b: bool| if b { "True" } else { "False" }.to_owned();
                for (type_, ok) in [
                    ("Initialized", true),
                    ("ContainersReady", r.ready),
                    ("Ready", r.ready),
                ] {
                    changed |= set_condition(
                        p,
                        PodCondition {
                            type_: type_.into(),
                            status: flag(ok),
                            ..Default::default()
                        },
                    );
                }
                changed
            })
            .await
            .map_err(status)?;
        Ok(Response::new(PodStatusAck {}))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        // Its own pods only: the stream carries the pods bound to the node asked for.
        act_as(&request, &request.get_ref().node_name)?;
        // The stream's task ends when the agent goes (its channel closes); it counts the agent
        // as connected until then.
        let WatchRequest {
            node_name,
            resume_from,
            epoch,
        } = request.into_inner();
        if node_name.is_empty() {
            return Err(Status::invalid_argument("node_name is required"));
        }
        let hub = self.hub.clone();
        let (tx, rx) = mpsc::channel::<Result<FeedMessage, Status>>(16);
        tokio::spawn(async move {
            let _connected = Connected::new();
            let mut changed = hub.subscribe();
            // Not before the hub has loaded (a snapshot of nothing would be followed by another).
            if changed.wait_for(|v| *v > 0).await.is_err() {
                return;
            }
            let mut cursor = resume_from;
            // Versions of another history (the store was replaced) mean nothing here.
            let mut need_snapshot = epoch != hub.epoch() || !hub.can_resume(resume_from);
            let mut last_sent = Instant::now();
            loop {
                if need_snapshot {
                    cursor = match send_snapshot(&hub, &node_name, &tx).await {
                        Some(v) => v,
                        None => return,
                    };
                    need_snapshot = false;
                    last_sent = Instant::now();
                }
                match hub.since(cursor, &node_name, BATCH) {
                    Since::TooOld => need_snapshot = true,
                    Since::Deltas(deltas, version) => {
                        let progress = version > cursor && last_sent.elapsed() >= PROGRESS_EVERY;
                        if !deltas.is_empty() || progress {
                            let message = FeedMessage {
                                kind: Some(feed_message::Kind::Deltas(feed::Deltas {
                                    version,
                                    deltas: deltas.iter().map(|d| (**d).clone()).collect(),
                                })),
                            };
                            if tx.send(Ok(message)).await.is_err() {
                                return;
                            }
                            cursor = version;
                            last_sent = Instant::now();
                            continue;
                        }
                        // Nothing for this node yet: wait for the hub to move (or for the
                        // progress tick).
                        tokio::select! {
                            c = changed.changed() => if c.is_err() { return },
                            _ = tokio::time::sleep(PROGRESS_EVERY) => {}
                            _ = tx.closed() => return,
                        }
                    }
                }
            }
        });
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Sends the node's snapshot in chunks; returns its version.
async fn send_snapshot(
    hub: &Hub,
    node: &str,
    tx: &mpsc::Sender<Result<FeedMessage, Status>>,
) -> Option<u64> {
    let snap = hub.snapshot(node);
    let version = snap.version;
    let empty = || feed::SnapshotChunk {
        version,
        epoch: hub.epoch().to_owned(),
        ..Default::default()
    };
    let mut chunks = vec![empty()];
    let room = |chunks: &mut Vec<feed::SnapshotChunk>| {
        let c = chunks.last().expect("one chunk at least");
        if c.services.len() + c.endpoint_slices.len() + c.nodes.len() + c.pods.len() >= CHUNK {
            chunks.push(empty());
        }
        chunks.len() - 1
    };
    for x in &snap.services {
        let i = room(&mut chunks);
        chunks[i].services.push((**x).clone());
    }
    for x in &snap.slices {
        let i = room(&mut chunks);
        chunks[i].endpoint_slices.push((**x).clone());
    }
    for x in &snap.nodes {
        let i = room(&mut chunks);
        chunks[i].nodes.push((**x).clone());
    }
    for x in &snap.pods {
        let i = room(&mut chunks);
        chunks[i].pods.push((**x).clone());
    }
    chunks.last_mut().expect("one chunk at least").last = true;
    for chunk in chunks {
        tx.send(Ok(FeedMessage {
            kind: Some(feed_message::Kind::Snapshot(chunk)),
        }))
        .await
        .ok()?;
    }
    Some(version)
}

/// Who calls: a node, by the client certificate the cluster's CA signed for it, or the holder
/// of the bootstrap token, who may only register nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Caller {
    Node(String),
    Bootstrap,
}

/// Finds the caller (its verified client certificate first, else the bootstrap token) and
/// passes it on to the handler; anyone else is unauthenticated.
#[derive(Clone)]
struct Auth(Arc<String>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        // The TLS layer verified the chain against the cluster's CA.
        let node = req.peer_certs().and_then(|certs| {
            let der = certs.first()?;
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            control_plane_api::node_of(&cert)
        });
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let caller = match (node, presented) {
            (Some(node), _) => Caller::Node(node),
            (None, Some(t)) if control_plane_apiserver::server::same_secret(t, &self.0) => {
                Caller::Bootstrap
            }
            (None, Some(_)) => return Err(Status::unauthenticated("invalid bootstrap token")),
            (None, None) => {
                return Err(Status::unauthenticated(
                    "a node certificate, or the bootstrap token to register, is required",
                ));
            }
        };
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The NodeRestriction rule: a node acts for itself only; the bootstrap token registers.
fn act_as<T>(request: &Request<T>, node: &str) -> Result<(), Status> {
    match request.extensions().get::<Caller>() {
        Some(Caller::Node(n)) if n == node => Ok(()),
        Some(Caller::Node(n)) => Err(Status::permission_denied(format!(
            "node {n} may not act for node {node}"
        ))),
        Some(Caller::Bootstrap) => Err(Status::permission_denied(
            "the bootstrap token only registers nodes: call with the node's certificate",
        )),
        None => Err(Status::unauthenticated("no caller")),
    }
}

/// Binds the feed's port (before returning, so callers can say it serves) and serves it over
/// TLS until the process ends.
pub async fn serve(
    listen: SocketAddr,
    credentials: &Credentials,
    token: String,
    service: FeedService,
) -> Result<impl Future<Output = Result<()>>> {
    let incoming = TcpIncoming::bind(listen)
        .with_context(|| format!("listen on {listen}"))?
        .with_nodelay(Some(true));
    // Nodes present certificates the cluster's CA signed; a node bootstrapping has none yet.
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &credentials.cert_pem,
            &credentials.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(&credentials.ca_pem))
        .client_auth_optional(true);
    let server = Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(NodeFeedServer::with_interceptor(
            service,
            Auth(Arc::new(token)),
        ));
    Ok(async move {
        server
            .serve_with_incoming(incoming)
            .await
            .context("the feed server")
    })
}

/// Agents with a Watch stream open (`keel_feed_agents_connected` on the control plane's
/// `/metrics`).
static AGENTS_CONNECTED: std::sync::LazyLock<prometheus_client::metrics::gauge::Gauge> =
    std::sync::LazyLock::new(Default::default);

/// Counts one agent as connected while it lives.
struct Connected;

impl Connected {
    fn new() -> Self {
        AGENTS_CONNECTED.inc();
        Self
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        AGENTS_CONNECTED.dec();
    }
}
