//! The control plane's storage, with etcd's semantics so the API server is the same whatever
//! holds its objects:
//!
//! - every write gets the next **revision** of a single, global counter;
//! - a key's **mod revision** is the revision of its last write (the object's
//!   resourceVersion), and writes can be conditional on it (compare-and-swap);
//! - **ranges** over a key prefix, ordered by key, with a limit, a start key and optionally at
//!   a past revision (consistent pagination);
//! - **watch** a prefix from a revision: every change after it, in revision order, then live;
//! - **compaction** drops history before a revision; reading or watching before it fails with
//!   [`StoreError::Compacted`] (the API server's 410 Gone).
//!
//! Two backends pass the same contract tests: [`SqliteStore`] (embedded, the default: one
//! binary runs a control plane with nothing else installed, in the manner of k3s's kine) and
//! [`EtcdStore`] (a real etcd, for when one machine is not enough).

mod etcd;
pub mod etcd_process;
pub mod metrics;
mod sqlite;

use std::{future::Future, path::PathBuf, str::FromStr};

pub use etcd::EtcdStore;
pub use sqlite::SqliteStore;
use tokio::sync::mpsc;

/// A key and its current value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: i64,
    /// Revision of the key's last write (for a deletion event: the deletion's revision).
    pub mod_revision: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as a watch delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// After a put: the new value. After a delete: the last value, with `mod_revision` the
    /// deletion's revision.
    pub kv: KeyValue,
    /// The value before the change, if the key existed and its history is still there.
    pub prev: Option<KeyValue>,
}

/// How to read a range.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// Only keys strictly after this one (pagination).
    pub start_after: Option<String>,
    /// At most this many keys.
    pub limit: Option<usize>,
    /// Read as of this revision (0 or None: the current one).
    pub revision: Option<i64>,
}

/// A range read.
#[derive(Clone, Debug, Default)]
pub struct ListResult {
    pub kvs: Vec<KeyValue>,
    /// The revision the range was read at.
    pub revision: i64,
    /// More keys follow the last one returned.
    pub more: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    #[error("key {key} has changed since revision {expected}")]
    Conflict {
        key: String,
        expected: i64,
        /// The key as it is now, if it exists.
        current: Option<Box<KeyValue>>,
    },
    #[error("revision {requested} has been compacted (history starts after {compacted})")]
    Compacted { requested: i64, compacted: i64 },
    #[error("revision {0} is newer than the store's")]
    FutureRevision(i64),
    #[error("storage backend")]
    Backend(#[source] anyhow::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The changes to a prefix, in revision order. Ends with an error (e.g. compaction) or when the
/// store goes away.
pub struct Watch {
    source: Source,
}

enum Source {
    /// Fed by a task of the backend (SQLite's fan-out).
    Channel(mpsc::Receiver<Result<Event>>),
    Etcd(Box<etcd::EtcdWatch>),
}

impl Watch {
    fn new(rx: mpsc::Receiver<Result<Event>>) -> Self {
        Self {
            source: Source::Channel(rx),
        }
    }

    fn etcd(watch: etcd::EtcdWatch) -> Self {
        Self {
            source: Source::Etcd(Box::new(watch)),
        }
    }

    /// The next change; `None` once the watch has ended. Cancel safe.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        match &mut self.source {
            Source::Channel(rx) => rx.recv().await,
            Source::Etcd(watch) => watch.next().await,
        }
    }
}

/// Storage with etcd's semantics (see the crate docs).
pub trait Store: Send + Sync + 'static {
    /// The key's current value.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>>> + Send;
    /// Keys starting with `prefix`, in key order.
    fn list(
        &self,
        prefix: &str,
        opts: ListOptions,
    ) -> impl Future<Output = Result<ListResult>> + Send;
    /// Creates the key; [`StoreError::AlreadyExists`] if it exists.
    fn create(&self, key: &str, value: Vec<u8>) -> impl Future<Output = Result<KeyValue>> + Send;
    /// Replaces the key's value if its mod revision is still `expected`;
    /// [`StoreError::Conflict`] otherwise, [`StoreError::NotFound`] if it does not exist.
    fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: i64,
    ) -> impl Future<Output = Result<KeyValue>> + Send;
    /// Deletes the key (if its mod revision is still `expected`, when given); returns its last
    /// value with `mod_revision` the deletion's revision.
    fn delete(
        &self,
        key: &str,
        expected: Option<i64>,
    ) -> impl Future<Output = Result<KeyValue>> + Send;
    /// Changes to keys under `prefix` with a revision greater than `after`. If that history
    /// was compacted, fails with [`StoreError::Compacted`] at once or as the first item.
    fn watch(&self, prefix: &str, after: i64) -> impl Future<Output = Result<Watch>> + Send;
    /// The latest revision.
    fn revision(&self) -> impl Future<Output = Result<i64>> + Send;
    /// Drops history up to `revision` (the latest value of every key is kept).
    fn compact(&self, revision: i64) -> impl Future<Output = Result<()>> + Send;
    /// The revision history starts after (0: nothing compacted).
    fn compacted(&self) -> impl Future<Output = Result<i64>> + Send;
}

/// Where the store's epoch lives (outside `/registry/`: no watch of objects sees it).
const EPOCH_KEY: &str = "/keel/epoch";

/// The identity of the store's history: made once, when a store is first used, and kept with
/// its data. Revisions are only comparable within one epoch: a store replaced by an empty one
/// (or another cluster's) counts its revisions again from the start.
pub async fn epoch(store: &impl Store) -> Result<String> {
    loop {
        if let Some(kv) = store.get(EPOCH_KEY).await? {
            return Ok(String::from_utf8_lossy(&kv.value).into_owned());
        }
        let fresh = uuid::Uuid::new_v4().to_string();
        match store.create(EPOCH_KEY, fresh.clone().into_bytes()).await {
            Ok(_) => return Ok(fresh),
            Err(StoreError::AlreadyExists(_)) => continue, // another server made it first
            Err(e) => return Err(e),
        }
    }
}

/// The end of the key range that starts with `prefix` (exclusive).
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).expect("ASCII keys");
        }
    }
    // Everything: no upper bound below this.
    "\u{7f}".to_owned()
}

/// Which store to use, as the command line names it: `embedded:<dir>` or
/// `etcd:<endpoint>[,<endpoint>...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    Embedded(PathBuf),
    Etcd(Vec<String>),
}

impl FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.split_once(':') {
            Some(("embedded", dir)) if !dir.is_empty() => Ok(Self::Embedded(dir.into())),
            Some(("etcd", endpoints)) if !endpoints.is_empty() => Ok(Self::Etcd(
                endpoints.split(',').map(|e| e.trim().to_owned()).collect(),
            )),
            _ => Err(format!(
                "{s:?}: expected embedded:<directory> or etcd:<endpoint>[,<endpoint>...]"
            )),
        }
    }
}

/// How to reach etcd beyond its endpoints: kube-apiserver's `--etcd-cafile`,
/// `--etcd-certfile`, `--etcd-keyfile`, and a request timeout.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// The CA that signed etcd's serving certificate (with it, endpoints are `https://`).
    pub ca_file: Option<PathBuf>,
    /// The client certificate (and its key) presented to etcd.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How long a request may wait for etcd's answer to start (a watch's stream runs on).
    pub request_timeout: Option<std::time::Duration>,
}

/// Either backend, chosen at run time.
pub enum AnyStore {
    Sqlite(SqliteStore),
    Etcd(Box<EtcdStore>),
}

impl AnyStore {
    pub async fn open(spec: &StoreSpec) -> Result<Self> {
        Self::open_with(spec, &EtcdOptions::default()).await
    }

    /// Opens the store; an etcd one reached as `etcd` says.
    pub async fn open_with(spec: &StoreSpec, etcd: &EtcdOptions) -> Result<Self> {
        Ok(match spec {
            StoreSpec::Embedded(dir) => Self::Sqlite(SqliteStore::open(dir).await?),
            StoreSpec::Etcd(endpoints) => {
                Self::Etcd(Box::new(EtcdStore::connect_with(endpoints, etcd).await?))
            }
        })
    }
}

/// Calls the backend, timing the operation for [`metrics`].
macro_rules! delegate {
    ($self:ident, $op:literal, $store:ident => $call:expr) => {{
        let started = std::time::Instant::now();
        let (backend, result) = match $self {
            AnyStore::Sqlite($store) => ("embedded", $call.await),
            AnyStore::Etcd($store) => ("etcd", $call.await),
        };
        metrics::observe($op, backend, result.is_ok(), started.elapsed());
        result
    }};
}

impl Store for AnyStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        delegate!(self, "get", s => s.get(key))
    }
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult> {
        delegate!(self, "list", s => s.list(prefix, opts))
    }
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue> {
        delegate!(self, "create", s => s.create(key, value))
    }
    async fn update(&self, key: &str, value: Vec<u8>, expected: i64) -> Result<KeyValue> {
        delegate!(self, "update", s => s.update(key, value, expected))
    }
    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<KeyValue> {
        delegate!(self, "delete", s => s.delete(key, expected))
    }
    async fn watch(&self, prefix: &str, after: i64) -> Result<Watch> {
        delegate!(self, "watch", s => s.watch(prefix, after))
    }
    async fn revision(&self) -> Result<i64> {
        delegate!(self, "revision", s => s.revision())
    }
    async fn compact(&self, revision: i64) -> Result<()> {
        delegate!(self, "compact", s => s.compact(revision))
    }
    async fn compacted(&self) -> Result<i64> {
        delegate!(self, "compacted", s => s.compacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_bound_exactly_the_prefix() {
        assert_eq!(prefix_end("/registry/pods/"), "/registry/pods0");
        assert_eq!(prefix_end("a"), "b");
        assert!("/registry/pods/x" < prefix_end("/registry/pods/").as_str());
        assert!("/registry/podsx" > prefix_end("/registry/pods/").as_str());
    }

    #[test]
    fn store_specs_parse() {
        assert_eq!(
            "embedded:/var/lib/keel".parse(),
            Ok(StoreSpec::Embedded("/var/lib/keel".into()))
        );
        assert_eq!(
            "etcd:http://127.0.0.1:2379,http://10.0.0.2:2379".parse(),
            Ok(StoreSpec::Etcd(vec![
                "http://127.0.0.1:2379".into(),
                "http://10.0.0.2:2379".into()
            ]))
        );
        assert!("sqlite:/x".parse::<StoreSpec>().is_err());
        assert!("etcd:".parse::<StoreSpec>().is_err());
    }
}
