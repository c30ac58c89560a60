//! A node's session with the control plane over the feed, as every agent runs it (the node
//! agent, and the agents tests and benchmarks play): register the node, renew its lease, and
//! follow the Watch stream into a [`View`], resuming where it left off after a dropped
//! connection or a control-plane restart, and asking for a fresh snapshot when a message does
//! not fit what the view holds. Retries back off exponentially up to a cap, with jitter, so a
//! control plane coming back is not met by every node at the same instant.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic::Code;

use crate::{
    FeedClient,
    feed::{HeartbeatRequest, RegisterRequest, RegisterResponse, WatchRequest},
    view::{Changes, View},
};

/// Capped exponential back-off with jitter.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next attempt: the current step, plus up to a quarter of it at
    /// random; the step then doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = step.mul_f64(rand::random::<f64>() / 4.0);
        step + jitter
    }

    /// After a success: start again from the initial step.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    /// 100 ms, doubling up to 5 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// The state of the Watch stream, for status pages and metrics.
#[derive(Clone, Debug, Default)]
pub struct StreamStatus {
    pub connected: bool,
    /// Streams opened after the first.
    pub reconnects: u64,
    /// Snapshots asked for because a message did not fit the view.
    pub resyncs: u64,
    pub last_message: Option<Instant>,
    pub last_error: Option<String>,
}

/// Registers the node, retrying until the control plane answers; a refusal (this caller may
/// not register this node, or the request is wrong) is returned, since retrying cannot help.
pub async fn register(
    client: &mut FeedClient,
    request: RegisterRequest,
) -> anyhow::Result<RegisterResponse> {
    let mut backoff = Backoff::default();
    loop {
        match client.register(request.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status)
                if matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument
                ) =>
            {
                anyhow::bail!(
                    "register {}: {:?}: {}",
                    request.node_name,
                    status.code(),
                    status.message()
                );
            }
            Err(status) => {
                tracing::warn!(node = %request.node_name, error = %status.message(), code = ?status.code(), "register failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Renews the node's lease every `every` while `alive()` says so; failures are logged and
/// the next beat comes as usual. Runs until the task is dropped.
pub async fn heartbeat(
    mut client: FeedClient,
    node: String,
    every: Duration,
    alive: impl Fn() -> bool,
) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if !alive() {
            continue;
        }
        if let Err(status) = client
            .heartbeat(HeartbeatRequest {
                node_name: node.clone(),
            })
            .await
        {
            tracing::warn!(node = %node, error = %status.message(), "heartbeat failed");
        }
    }
}

/// Follows the Watch stream for `node` into `view` until the task is dropped, calling
/// `on_change` (with the view locked: keep it quick) after every message that changed something.
/// A broken stream resumes from the view's version (the control plane answers with the deltas
/// missed, or a snapshot if its history no longer reaches back); a message the view refuses, or
/// one the transport could not decode, leads to a fresh snapshot.
pub async fn follow(
    mut client: FeedClient,
    node: String,
    view: Arc<Mutex<View>>,
    status: Arc<Mutex<StreamStatus>>,
    mut on_change: impl FnMut(&View, Changes) + Send,
) {
    let mut backoff = Backoff::default();
    let mut resync = false;
    let mut first = true;
    loop {
        let (resume_from, epoch) = {
            let view = view.lock().expect("not poisoned");
            if view.complete && !resync {
                (view.version, view.epoch.clone())
            } else {
                (0, String::new())
            }
        };
        resync = false;
        if !first {
            status.lock().expect("not poisoned").reconnects += 1;
        }
        first = false;
        let stream = client
            .watch(WatchRequest {
                node_name: node.clone(),
                resume_from,
                epoch,
            })
            .await;
        let mut stream = match stream {
            Ok(stream) => stream.into_inner(),
            Err(e) => {
                note_error(&status, &e);
                tracing::warn!(node = %node, error = %e.message(), code = ?e.code(), "watch failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        status.lock().expect("not poisoned").connected = true;
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    backoff.reset();
                    status.lock().expect("not poisoned").last_message = Some(Instant::now());
                    let mut view = view.lock().expect("not poisoned");
                    match view.apply(message) {
                        Ok(changes) if changes.is_empty() => {}
                        Ok(changes) => on_change(&view, changes),
                        Err(e) => {
                            tracing::warn!(node = %node, error = %e, version = view.version, "feed message refused; asking for a snapshot");
                            status.lock().expect("not poisoned").resyncs += 1;
                            resync = true;
                            break;
                        }
                    }
                }
                Ok(None) => {
                    tracing::info!(node = %node, "feed stream ended; resuming");
                    break;
                }
                Err(e) => {
                    note_error(&status, &e);
                    // A message that did not decode: the history holds it, so resuming would
                    // fetch it again.
                    if e.code() == Code::Internal {
                        status.lock().expect("not poisoned").resyncs += 1;
                        resync = true;
                    }
                    tracing::warn!(node = %node, error = %e.message(), code = ?e.code(), "feed stream broke; resuming");
                    break;
                }
            }
        }
        view.lock().expect("not poisoned").stream_ended();
        status.lock().expect("not poisoned").connected = false;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

fn note_error(status: &Mutex<StreamStatus>, e: &tonic::Status) {
    let mut status = status.lock().expect("not poisoned");
    status.connected = false;
    status.last_error = Some(format!("{:?}: {}", e.code(), e.message()));
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use futures::{Stream, StreamExt};
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::{
        NodeAuth,
        feed::{
            FeedMessage, HeartbeatResponse, PodStatusAck, PodStatusReport,
            delta::Change,
            node_feed_server::{NodeFeed, NodeFeedServer},
        },
        view::tests::{deltas, service, snapshot},
    };

    /// A feed whose n-th Watch answers with `script[n]`, then holds the stream open (`true`)
    /// or ends it; it keeps every request.
    struct Scripted {
        script: Vec<(Vec<FeedMessage>, bool)>,
        requests: Arc<Mutex<Vec<WatchRequest>>>,
    }

    type Messages = Pin<Box<dyn Stream<Item = Result<FeedMessage, Status>> + Send>>;

    #[tonic::async_trait]
    impl NodeFeed for Scripted {
        async fn register(
            &self,
            _: Request<RegisterRequest>,
        ) -> Result<Response<RegisterResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn heartbeat(
            &self,
            _: Request<HeartbeatRequest>,
        ) -> Result<Response<HeartbeatResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn report_pod_status(
            &self,
            _: Request<PodStatusReport>,
        ) -> Result<Response<PodStatusAck>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        type WatchStream = Messages;

        async fn watch(
            &self,
            request: Request<WatchRequest>,
        ) -> Result<Response<Messages>, Status> {
            let n = {
                let mut requests = self.requests.lock().unwrap();
                requests.push(request.into_inner());
                requests.len() - 1
            };
            let (messages, hold) = self.script.get(n).cloned().unwrap_or_default();
            let messages = futures::stream::iter(messages.into_iter().map(Ok));
            Ok(Response::new(if hold {
                Box::pin(messages.chain(futures::stream::pending()))
            } else {
                Box::pin(messages)
            }))
        }
    }

    /// A message the view refuses (a delta older than what it holds) costs the stream and
    /// asks for a snapshot (`resume_from` 0), never a panic; a stream that merely ends
    /// resumes from the version held, with the history's epoch.
    #[tokio::test]
    async fn a_refused_message_brings_a_fresh_snapshot_and_an_ended_stream_resumes() {
        let mut fresh = snapshot(9, &["fresh"], true);
        if let Some(crate::feed::feed_message::Kind::Snapshot(chunk)) = &mut fresh.kind {
            chunk.epoch = "store-1".into();
        }
        let requests = Arc::new(Mutex::new(Vec::new()));
        let feed = Scripted {
            script: vec![
                (
                    vec![
                        snapshot(5, &["a"], true),
                        deltas(4, vec![(4, Change::Service(service("stale")))]),
                    ],
                    true,
                ),
                (vec![fresh], false),
                (vec![], true),
            ],
            requests: requests.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(socket, _)| socket);
            Some((accepted, listener))
        });
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(NodeFeedServer::new(feed))
                .serve_with_incoming(incoming),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = crate::client(channel, NodeAuth(None));

        let view = Arc::new(Mutex::new(View::default()));
        let status = Arc::new(Mutex::new(StreamStatus::default()));
        let follower = tokio::spawn(follow(
            client,
            "node-1".into(),
            view.clone(),
            status.clone(),
            |_, _| {},
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while requests.lock().unwrap().len() < 3 {
            assert!(
                Instant::now() < deadline,
                "the session stopped asking: {:?}",
                requests.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        follower.abort();
        server.abort();

        let requests = requests.lock().unwrap();
        let asked: Vec<(u64, &str)> = requests
            .iter()
            .map(|r| (r.resume_from, r.epoch.as_str()))
            .collect();
        assert_eq!(asked, [(0, ""), (0, ""), (9, "store-1")]);
        let view = view.lock().unwrap();
        let names: Vec<&str> = view.services.values().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["fresh"], "the refused delta left no trace");
        assert_eq!(view.version, 9);
        let status = status.lock().unwrap();
        assert_eq!((status.resyncs, status.reconnects), (1, 2), "{status:?}");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_bounded_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let steps: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (got, step) in steps.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            let step = Duration::from_millis(step);
            assert!(
                *got >= step && *got <= step + step / 4,
                "{got:?} for a step of {step:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(126));
    }
}
