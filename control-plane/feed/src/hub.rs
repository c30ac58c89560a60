//! The hub: what every node agent may need (services, endpoint slices, nodes, and pods by node),
//! kept from one store watch over `/registry/` so that every change has its place in one total
//! order (its store revision), and a bounded history of those changes that agents resume from.
//!
//! Changes a node agent would not notice (a pod's status, a service's status) are not changes
//! here: the hub converts each object to what the feed carries and records a delta only when
//! that differs.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use control_plane_api::feed::{self, delta::Change};
use control_plane_client::informer::def;
use control_plane_store::{AnyStore, EventKind, KeyValue, ListOptions, Store};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::watch;

use crate::convert;

/// A change in the history.
pub struct Entry {
    pub version: u64,
    /// Pods concern one node only.
    pub node: Option<String>,
    pub delta: Arc<feed::Delta>,
}

#[derive(Default)]
struct State {
    version: u64,
    services: BTreeMap<String, Arc<feed::Service>>,
    slices: BTreeMap<String, Arc<feed::EndpointSlice>>,
    nodes: BTreeMap<String, Arc<feed::Node>>,
    /// Bound pods: key to (node, pod).
    pods: BTreeMap<String, (String, Arc<feed::Pod>)>,
    history: VecDeque<Entry>,
    /// An agent at a version >= this can be brought up to date from the history.
    history_from: u64,
}

/// What an agent gets when it asks for changes after its version.
pub enum Since {
    /// Deltas for it (possibly none) and the version they bring it to.
    Deltas(Vec<Arc<feed::Delta>>, u64),
    /// Its version is older than the history: it needs a snapshot.
    TooOld,
}

/// A consistent copy of what one node needs.
pub struct Snapshot {
    pub version: u64,
    pub services: Vec<Arc<feed::Service>>,
    pub slices: Vec<Arc<feed::EndpointSlice>>,
    pub nodes: Vec<Arc<feed::Node>>,
    pub pods: Vec<Arc<feed::Pod>>,
}

pub struct Hub {
    state: Mutex<State>,
    capacity: usize,
    version: watch::Sender<u64>,
    /// The store's epoch, read before the first load.
    epoch: std::sync::OnceLock<String>,
}

#[derive(Clone, Copy)]
enum Kind {
    Service,
    Slice,
    Node,
    Pod,
}

fn prefixes() -> [(String, Kind); 4] {
    [
        (def::<Service>().prefix(None), Kind::Service),
        (def::<EndpointSlice>().prefix(None), Kind::Slice),
        (def::<Node>().prefix(None), Kind::Node),
        (def::<Pod>().prefix(None), Kind::Pod),
    ]
}

fn kind_of(key: &str, prefixes: &[(String, Kind); 4]) -> Option<(Kind, String)> {
    prefixes
        .iter()
        .find(|(p, _)| key.starts_with(p.as_str()))
        .map(|(p, k)| (*k, key[p.len()..].to_owned()))
}

fn object_ref(key: &str) -> feed::ObjectRef {
    match key.split_once('/') {
        Some((ns, name)) => feed::ObjectRef {
            namespace: ns.into(),
            name: name.into(),
        },
        None => feed::ObjectRef {
            namespace: String::new(),
            name: key.into(),
        },
    }
}

impl Hub {
    /// A hub that keeps at most `capacity` changes of history.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            capacity,
            version: watch::channel(0).0,
            epoch: std::sync::OnceLock::new(),
        })
    }

    /// The epoch of the store the hub follows (empty until it has loaded).
    pub fn epoch(&self) -> &str {
        self.epoch.get().map_or("", String::as_str)
    }

    /// The version the hub has reached; changes when it moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn record(
        state: &mut State,
        capacity: usize,
        version: u64,
        node: Option<String>,
        change: Change,
    ) {
        state.history.push_back(Entry {
            version,
            node,
            delta: Arc::new(feed::Delta {
                version,
                change: Some(change),
            }),
        });
        while state.history.len() > capacity {
            let dropped = state.history.pop_front().expect("not empty");
            state.history_from = dropped.version;
        }
    }

    /// Applies one store change at `version` (`None` value: deleted).
    fn apply(
        &self,
        state: &mut State,
        version: u64,
        kind: Kind,
        key: String,
        value: Option<&[u8]>,
        record: bool,
    ) {
        let cap = self.capacity;
        macro_rules! upsert {
            ($map:ident, $conv:expr, $set:ident, $del:ident) => {{
                let new = value.and_then(|v| $conv(v));
                match new {
                    Some(obj) => {
                        if state.$map.get(&key).map(|o| **o != obj).unwrap_or(true) {
                            let obj = Arc::new(obj);
                            state.$map.insert(key, obj.clone());
                            if record {
                                Self::record(
                                    state,
                                    cap,
                                    version,
                                    None,
                                    Change::$set((*obj).clone()),
                                );
                            }
                        }
                    }
                    None => {
                        if state.$map.remove(&key).is_some() && record {
                            Self::record(state, cap, version, None, Change::$del(object_ref(&key)));
                        }
                    }
                }
            }};
        }
        match kind {
            Kind::Service => upsert!(services, convert::service, Service, ServiceDeleted),
            Kind::Slice => upsert!(
                slices,
                convert::endpoint_slice,
                EndpointSlice,
                EndpointSliceDeleted
            ),
            Kind::Node => upsert!(nodes, convert::node, Node, NodeDeleted),
            Kind::Pod => {
                let new = value.and_then(convert::pod);
                let old = state.pods.get(&key).cloned();
                match (new, old) {
                    (Some((node, pod)), old) => {
                        if old.as_ref().is_some_and(|(n, p)| *n == node && **p == pod) {
                            return;
                        }
                        if let Some((old_node, _)) = &old
                            && *old_node != node
                            && record
                        {
                            Self::record(
                                state,
                                cap,
                                version,
                                Some(old_node.clone()),
                                Change::PodDeleted(object_ref(&key)),
                            );
                        }
                        let pod = Arc::new(pod);
                        state.pods.insert(key, (node.clone(), pod.clone()));
                        if record {
                            Self::record(
                                state,
                                cap,
                                version,
                                Some(node),
                                Change::Pod((*pod).clone()),
                            );
                        }
                    }
                    (None, Some((old_node, _))) => {
                        state.pods.remove(&key);
                        if record {
                            Self::record(
                                state,
                                cap,
                                version,
                                Some(old_node),
                                Change::PodDeleted(object_ref(&key)),
                            );
                        }
                    }
                    (None, None) => {}
                }
            }
        }
    }

    /// Loads the state at `revision` (the history starts there).
    async fn load(&self, store: &AnyStore, revision: Option<i64>) -> anyhow::Result<i64> {
        let prefixes = prefixes();
        let mut fresh = State::default();
        let mut read_at = revision;
        for (prefix, kind) in &prefixes {
            let mut opts = ListOptions {
                limit: Some(1000),
                revision: read_at,
                ..Default::default()
            };
            loop {
                let page = store.list(prefix, opts.clone()).await?;
                read_at = Some(page.revision);
                for kv in &page.kvs {
                    self.apply(
                        &mut fresh,
                        0,
                        *kind,
                        kv.key[prefix.len()..].to_owned(),
                        Some(&kv.value),
                        false,
                    );
                }
                if !page.more {
                    break;
                }
                opts.revision = Some(page.revision);
                opts.start_after = page.kvs.last().map(|kv| kv.key.clone());
            }
        }
        let revision = read_at.unwrap_or(0);
        fresh.version = revision as u64;
        fresh.history_from = revision as u64;
        *self.state.lock().expect("not poisoned") = fresh;
        self.version.send_replace(revision as u64);
        Ok(revision)
    }

    fn apply_event(
        &self,
        version: u64,
        kv: &KeyValue,
        deleted: bool,
        prefixes: &[(String, Kind); 4],
    ) {
        let mut state = self.state.lock().expect("not poisoned");
        if let Some((kind, key)) = kind_of(&kv.key, prefixes) {
            self.apply(
                &mut state,
                version,
                kind,
                key,
                (!deleted).then_some(kv.value.as_slice()),
                true,
            );
        }
        state.version = state.version.max(version);
        drop(state);
        self.version.send_replace(version);
    }

    /// Follows the store until the process ends. It starts from as far back as the store's
    /// history allows (up to the history's capacity), so agents of a control plane that
    /// restarted can still resume.
    pub async fn run(self: Arc<Self>, store: Arc<AnyStore>) {
        let prefixes = prefixes();
        while self.epoch.get().is_none() {
            match control_plane_store::epoch(&*store).await {
                Ok(epoch) => {
                    let _ = self.epoch.set(epoch);
                }
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "feed: reading the store's epoch failed"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let mut first = true;
        loop {
            let start = if first {
                let (now, compacted) = (
                    store.revision().await.unwrap_or(0),
                    store.compacted().await.unwrap_or(0),
                );
                Some(compacted.max(now - self.capacity as i64).max(0)).filter(|r| *r > 0)
            } else {
                None
            };
            first = false;
            let revision = match self.load(&store, start).await {
                Ok(r) => r,
                Err(e) if start.is_some() => {
                    tracing::info!(
                        ?start,
                        error = format!("{e:#}"),
                        "feed: cannot read history; starting from now"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "feed: load failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut watch = match store.watch("/registry/", revision).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "feed: watch failed");
                    continue;
                }
            };
            while let Some(event) = watch.next().await {
                match event {
                    Ok(e) => self.apply_event(
                        e.kv.mod_revision as u64,
                        &e.kv,
                        e.kind == EventKind::Delete,
                        &prefixes,
                    ),
                    Err(e) => {
                        // The history the hub had is no longer continuous: agents resync.
                        tracing::info!(error = %e, "feed: watch ended; loading again");
                        break;
                    }
                }
            }
        }
    }

    /// Changes for `node` after `version`, at most `max`.
    pub fn since(&self, version: u64, node: &str, max: usize) -> Since {
        let state = self.state.lock().expect("not poisoned");
        if version < state.history_from || version > state.version {
            return Since::TooOld;
        }
        let start = state.history.partition_point(|e| e.version <= version);
        let mut out = Vec::new();
        let mut reached = state.version;
        for e in state.history.range(start..) {
            if e.node.as_deref().is_none_or(|n| n == node) {
                out.push(e.delta.clone());
                if out.len() == max {
                    reached = e.version;
                    break;
                }
            }
        }
        Since::Deltas(out, reached)
    }

    /// Whether an agent at `version` can be brought up to date from the history (0: never).
    pub fn can_resume(&self, version: u64) -> bool {
        let state = self.state.lock().expect("not poisoned");
        version > 0 && version >= state.history_from && version <= state.version
    }

    pub fn snapshot(&self, node: &str) -> Snapshot {
        let state = self.state.lock().expect("not poisoned");
        Snapshot {
            version: state.version,
            services: state.services.values().cloned().collect(),
            slices: state.slices.values().cloned().collect(),
            nodes: state.nodes.values().cloned().collect(),
            pods: state
                .pods
                .values()
                .filter(|(n, _)| n == node)
                .map(|(_, p)| p.clone())
                .collect(),
        }
    }
}
