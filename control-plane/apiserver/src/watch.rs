//! Watches (`?watch=1`): newline-delimited WatchEvents streamed as the store changes.
//!
//! Without a resourceVersion (or with "0") the watch starts with a synthetic ADDED for every
//! object, then follows from the revision it listed at. With one, it follows from there; if that
//! history was compacted the stream carries one ERROR event with a 410 Status (client-go and
//! the Python client relist on it). `sendInitialEvents=true` (KEP-3157, streaming lists)
//! always starts with the whole state, at a revision no older than the one given, ended by a
//! bookmark annotated `k8s.io/initial-events-end`; `false` starts with nothing, from the given
//! revision or now. A revision the store has not reached is waited for, then refused (504,
//! ResourceVersionTooLarge). Selectors apply to transitions too: an object that stops
//! matching is sent as DELETED, one that starts matching as ADDED.
//!
//! Bookmarks, on request, carry the store's revision, not only this watch's last event, so an
//! idle watch's resume point stays inside the history kept: the revision read at the previous
//! bookmark (5 s earlier), by which time every event up to it has reached this watch.

use std::{convert::Infallible, pin::Pin, sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header::CONTENT_TYPE},
    response::Response,
};
use bytes::{Bytes, BytesMut};
use control_plane_store::{Event, EventKind, Store, StoreError, Watch};
use futures::{FutureExt, future::BoxFuture};
use serde_json::{Value, json};
use tokio::time::{Interval, Sleep};

use crate::{
    error::ApiError,
    registry::{ListParams, Registry, decode},
    resources::ResourceDef,
    table::table,
};

/// How often an idle watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);
/// Longest a watch stays open (clients reconnect), as kube-apiserver's 30-60 minutes.
const MAX_TIMEOUT: Duration = Duration::from_secs(1800);

pub struct WatchParams {
    pub list: ListParams,
    pub allow_bookmarks: bool,
    pub send_initial_events: Option<bool>,
    pub timeout: Option<Duration>,
    pub table: bool,
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).expect("serializes");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Most bytes of events that were already waiting sent in one write.
const MAX_BATCH: usize = 256 * 1024;

fn respond(body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

struct Encoder {
    def: &'static ResourceDef,
    table: bool,
    first: bool,
}

impl Encoder {
    fn event(&mut self, kind: &str, obj: &Value) -> Bytes {
        if self.table && kind != "BOOKMARK" && kind != "ERROR" {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(json!(""));
            let t = table(
                self.def.kind,
                std::slice::from_ref(obj),
                json!({"resourceVersion": rv}),
                self.first,
            );
            self.first = false;
            line(&json!({"type": kind, "object": t}))
        } else {
            let mut bytes = format!(r#"{{"type":"{kind}","object":"#).into_bytes();
            if self.def.conversion.is_some() && kind != "BOOKMARK" && kind != "ERROR" {
                serde_json::to_writer(&mut bytes, &self.def.from_storage(obj.clone()))
            } else {
                serde_json::to_writer(&mut bytes, obj)
            }
            .expect("serializes");
            bytes.extend_from_slice(b"}\n");
            Bytes::from(bytes)
        }
    }

    fn bookmark(&self, revision: i64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": revision.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            &json!({"type": "BOOKMARK", "object": {"kind": self.def.kind, "apiVersion": self.def.api_version(), "metadata": meta}}),
        )
    }
}

fn gone_event(message: String) -> Bytes {
    line(&json!({"type": "ERROR", "object": ApiError::gone(message).status()}))
}

pub async fn watch<S: Store>(
    registry: Arc<Registry<S>>,
    def: &'static ResourceDef,
    ns: Option<String>,
    params: WatchParams,
) -> Result<Response, ApiError> {
    let rv = params
        .list
        .resource_version
        .clone()
        .filter(|rv| !rv.is_empty() && rv != "0")
        .map(|rv| {
            rv.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))
        })
        .transpose()?;
    if let Some(rv) = rv {
        registry.wait_for_revision(rv).await?;
    }
    let (initial, from) = match (params.send_initial_events, rv) {
        (Some(true), _) | (None, None) => {
            let list = ListParams {
                resource_version: None,
                resource_version_match: None,
                limit: None,
                continue_token: None,
                ..params.list.clone()
            };
            let (items, meta) = registry.list(def, ns.as_deref(), &list).await?;
            (items, meta.resource_version)
        }
        (_, Some(rv)) => (Vec::new(), rv),
        (Some(false), None) => (
            Vec::new(),
            registry
                .store
                .revision()
                .await
                .map_err(ApiError::internal)?,
        ),
    };
    let encoder = Encoder {
        def,
        table: params.table,
        first: true,
    };
    let prefix = def.prefix(ns.as_deref());
    let watch = match registry.store.watch(&prefix, from).await {
        Ok(w) => w,
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => {
            let gone = gone_event(format!(
                "too old resource version: {requested} ({compacted})"
            ));
            return Ok(respond(Body::from(gone)));
        }
        Err(e) => {
            return Err(ApiError::from_store(
                e,
                crate::error::Subject {
                    group: def.group,
                    resource: def.plural,
                    name: "",
                },
            ));
        }
    };
    let timeout = params.timeout.unwrap_or(MAX_TIMEOUT).min(MAX_TIMEOUT);
    let mut bookmarks =
        tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
    bookmarks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let follow = Follow {
        initial: initial.into_iter(),
        initial_end: (params.allow_bookmarks && params.send_initial_events == Some(true))
            .then(|| encoder.bookmark(from, true)),
        watch,
        encoder,
        list: params.list,
        allow_bookmarks: params.allow_bookmarks,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        bookmarks,
        last: from,
        revision_now: {
            let registry = registry.clone();
            Box::new(move || {
                let registry = registry.clone();
                async move { registry.store.revision().await.ok() }.boxed()
            })
        },
        read_at_last_bookmark: None,
        ended: false,
        _open: crate::metrics::OpenWatch::new(def.plural),
    };
    let stream = futures::stream::unfold(follow, |mut follow| async move {
        let chunk = follow.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), follow))
    });
    Ok(respond(Body::from_stream(stream)))
}

/// A watch being followed. The response body polls it, so a store event goes from the store's
/// stream to the client's connection without waiting for another task to be scheduled.
struct Follow {
    /// Counted in `apiserver_longrunning_requests` while the body lives.
    _open: crate::metrics::OpenWatch,
    initial: std::vec::IntoIter<Value>,
    /// The bookmark that ends the initial events, when asked for.
    initial_end: Option<Bytes>,
    watch: Watch,
    encoder: Encoder,
    list: ListParams,
    allow_bookmarks: bool,
    deadline: Pin<Box<Sleep>>,
    bookmarks: Interval,
    /// The revision of the last event read (or bookmark sent).
    last: i64,
    /// Reads the store's revision.
    revision_now: Box<dyn Fn() -> BoxFuture<'static, Option<i64>> + Send>,
    /// The store's revision when the last bookmark was sent.
    read_at_last_bookmark: Option<i64>,
    /// The stream has carried its last event (an ERROR).
    ended: bool,
}

/// What one store event becomes.
enum Outcome {
    Send(Bytes),
    /// Not selected.
    Skip,
    /// The watch is over, with a last event to send if any.
    End(Option<Bytes>),
}

impl Follow {
    /// The next bytes for the client (events that are already waiting are sent together);
    /// `None` ends the response.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        let mut out = BytesMut::new();
        for obj in self.initial.by_ref() {
            out.extend_from_slice(&self.encoder.event("ADDED", &obj));
            if out.len() >= MAX_BATCH {
                return Some(out.freeze());
            }
        }
        if let Some(bookmark) = self.initial_end.take() {
            out.extend_from_slice(&bookmark);
        }
        if !out.is_empty() {
            return Some(out.freeze());
        }
        if self.ended {
            return None;
        }
        loop {
            let event = tokio::select! {
                _ = &mut self.deadline => return None,
                _ = self.bookmarks.tick(), if self.allow_bookmarks => {
                    if let Some(read) = self.read_at_last_bookmark {
                        self.last = self.last.max(read);
                    }
                    self.read_at_last_bookmark = (self.revision_now)().await;
                    return Some(self.encoder.bookmark(self.last, false));
                }
                event = self.watch.next() => event,
            };
            match self.outcome(event) {
                Outcome::Skip => continue,
                Outcome::End(last) => {
                    self.ended = true;
                    return last;
                }
                Outcome::Send(bytes) => out.extend_from_slice(&bytes),
            }
            // `next` is cancel safe: polling it once loses nothing when nothing is waiting.
            while out.len() < MAX_BATCH {
                let Some(event) = self.watch.next().now_or_never() else {
                    break;
                };
                match self.outcome(event) {
                    Outcome::Skip => {}
                    Outcome::Send(bytes) => out.extend_from_slice(&bytes),
                    Outcome::End(last) => {
                        self.ended = true;
                        if let Some(last) = last {
                            out.extend_from_slice(&last);
                        }
                        break;
                    }
                }
            }
            return Some(out.freeze());
        }
    }

    fn outcome(&mut self, event: Option<Result<Event, StoreError>>) -> Outcome {
        let event = match event {
            None => return Outcome::End(None),
            Some(Err(StoreError::Compacted {
                requested,
                compacted,
            })) => {
                return Outcome::End(Some(gone_event(format!(
                    "too old resource version: {requested} ({compacted})"
                ))));
            }
            Some(Err(e)) => {
                let status = ApiError::internal(format!("{e:#}")).status();
                return Outcome::End(Some(line(&json!({"type": "ERROR", "object": status}))));
            }
            Some(Ok(event)) => event,
        };
        self.last = event.kv.mod_revision;
        let Ok(new) = decode(&event.kv) else {
            return Outcome::Skip;
        };
        let selected = |o: &Value| self.list.labels.matches(o) && self.list.fields.matches(o);
        let old = event.prev.as_ref().and_then(|p| decode(p).ok());
        let kind = match (event.kind, old.as_ref().map(selected), selected(&new)) {
            (EventKind::Delete, _, true) => "DELETED",
            (EventKind::Delete, _, false) => return Outcome::Skip,
            (EventKind::Put, None | Some(false), true) => "ADDED",
            (EventKind::Put, Some(true), true) => "MODIFIED",
            (EventKind::Put, Some(true), false) => "DELETED",
            (EventKind::Put, _, false) => return Outcome::Skip,
        };
        Outcome::Send(self.encoder.event(kind, &new))
    }
}
