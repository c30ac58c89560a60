//! Watches (`?watch=1`): newline-delimited WatchEvents streamed as the store changes.
//!
//! Without a resourceVersion (or with "0") the watch starts with a synthetic ADDED for every
//! object, then follows from the revision it listed at. With one, it follows from there; if that
//! history was compacted the stream carries one ERROR event with a 410 Status (client-go and
//! the Python client relist on it). Selectors apply to transitions too: an object that stops
//! matching is sent as DELETED, one that starts matching as ADDED. Bookmarks on request.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header::CONTENT_TYPE},
    response::Response,
};
use bytes::Bytes;
use control_plane_store::{EventKind, Store, StoreError};
use serde_json::{Value, json};
use tokio::sync::mpsc;

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
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
    pub table: bool,
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).expect("serializes");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn streaming(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
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
        let object = if self.table && kind != "BOOKMARK" && kind != "ERROR" {
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
            t
        } else {
            obj.clone()
        };
        line(&json!({"type": kind, "object": object}))
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
        .filter(|rv| !rv.is_empty() && rv != "0");
    let (initial, from) = match rv {
        None => {
            let list = ListParams {
                resource_version: None,
                limit: None,
                continue_token: None,
                ..params.list.clone()
            };
            let (items, meta) = registry.list(def, ns.as_deref(), &list).await?;
            (items, meta.resource_version)
        }
        Some(rv) => {
            let rv: i64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?;
            (Vec::new(), rv)
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut encoder = Encoder {
        def,
        table: params.table,
        first: true,
    };
    let prefix = def.prefix(ns.as_deref());
    let watch = registry.store.watch(&prefix, from).await;
    let mut watch = match watch {
        Ok(w) => w,
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => {
            let _ = tx
                .send(gone_event(format!(
                    "too old resource version: {requested} ({compacted})"
                )))
                .await;
            return Ok(streaming(rx));
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
    tokio::spawn(async move {
        for obj in &initial {
            if tx.send(encoder.event("ADDED", obj)).await.is_err() {
                return;
            }
        }
        if params.allow_bookmarks
            && params.send_initial_events
            && tx.send(encoder.bookmark(from, true)).await.is_err()
        {
            return;
        }
        let selected = |o: &Value| params.list.labels.matches(o) && params.list.fields.matches(o);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmarks = tokio::time::interval(BOOKMARK_EVERY);
        bookmarks.tick().await;
        let mut last = from;
        loop {
            let out = tokio::select! {
                _ = &mut deadline => return,
                _ = bookmarks.tick(), if params.allow_bookmarks => encoder.bookmark(last, false),
                event = watch.next() => match event {
                    None => return,
                    Some(Err(StoreError::Compacted { requested, compacted })) => {
                        let _ = tx.send(gone_event(format!("too old resource version: {requested} ({compacted})"))).await;
                        return;
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(line(&json!({"type": "ERROR", "object": ApiError::internal(format!("{e:#}")).status()}))).await;
                        return;
                    }
                    Some(Ok(event)) => {
                        last = event.kv.mod_revision;
                        let Ok(new) = decode(&event.kv) else { continue };
                        let old = event.prev.as_ref().and_then(|p| decode(p).ok());
                        let kind = match (event.kind, old.as_ref().map(selected), selected(&new)) {
                            (EventKind::Delete, _, true) => "DELETED",
                            (EventKind::Delete, _, false) => continue,
                            (EventKind::Put, None | Some(false), true) => "ADDED",
                            (EventKind::Put, Some(true), true) => "MODIFIED",
                            (EventKind::Put, Some(true), false) => "DELETED",
                            (EventKind::Put, _, false) => continue,
                        };
                        encoder.event(kind, &new)
                    }
                },
            };
            if tx.send(out).await.is_err() {
                return;
            }
        }
    });
    Ok(streaming(rx))
}
