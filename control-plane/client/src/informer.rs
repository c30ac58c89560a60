//! Informers: a cache of one resource kept equal to the store by a list and a watch (relisting
//! when the history it needs was compacted), that tells registered handlers what changed.
//!
//! Writes made through [`crate::client::Client`] are applied to the cache as soon as they
//! succeed (read-your-writes): a controller that reconciles again before the watch catches up
//! sees its own last write, not a stale object that would only earn it a 409. Every change is
//! applied once, by resourceVersion: the watch event of a write already applied is a no-op, and
//! an old event never overwrites a newer object or resurrects a deleted one.

use std::{
    any::Any,
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::Duration,
};

use control_plane_apiserver::resources::ResourceDef;
use control_plane_store::{AnyStore, EventKind, KeyValue, ListOptions, Store};
use k8s_openapi::{Metadata, Resource, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Serialize, de::DeserializeOwned};

use crate::queue::backoff;

/// What the control loops can cache and write.
pub trait Object:
    Resource + Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned + Clone + Send + Sync + 'static
{
}

impl<T> Object for T where
    T: Resource
        + Metadata<Ty = ObjectMeta>
        + Serialize
        + DeserializeOwned
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// How the API serves `K` (its store prefix, whether it is namespaced).
pub fn def<K: Resource>() -> &'static ResourceDef {
    control_plane_apiserver::resources::by_kind(K::GROUP, K::KIND)
        .unwrap_or_else(|| panic!("{} is not served", K::KIND))
}

/// `namespace/name`, or `name` for cluster-scoped objects: the cache key.
pub fn key_of(meta: &ObjectMeta) -> String {
    match &meta.namespace {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}", meta.name.as_deref().unwrap_or("")),
        _ => meta.name.clone().unwrap_or_default(),
    }
}

pub fn revision_of(meta: &ObjectMeta) -> i64 {
    meta.resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

/// One change: `old` absent for an addition, `new` absent for a deletion.
pub struct Change<K> {
    pub old: Option<Arc<K>>,
    pub new: Option<Arc<K>>,
}

impl<K: Object> Change<K> {
    /// The object after the change, or the last one seen before a deletion.
    pub fn object(&self) -> &Arc<K> {
        self.new
            .as_ref()
            .or(self.old.as_ref())
            .expect("a change has an object")
    }
}

type Handler<K> = Box<dyn Fn(&Change<K>) + Send + Sync>;

/// A watch that lasted this long was healthy, even if idle.
const HEALTHY_WATCH: Duration = Duration::from_secs(30);

struct State<K> {
    objects: BTreeMap<String, Arc<K>>,
    /// Keys deleted at a revision the watch has not passed yet: older puts must not revive them.
    tombstones: HashMap<String, i64>,
    /// The revision the watch has reached.
    revision: i64,
}

pub struct Informer<K> {
    prefix: String,
    state: RwLock<State<K>>,
    /// Held from a change to the cache until its handlers have run, so handlers see changes in
    /// the order the cache took them (the watch task and writers reading their own writes
    /// apply concurrently).
    delivery: std::sync::Mutex<()>,
    handlers: RwLock<Vec<Handler<K>>>,
    synced: tokio::sync::watch::Sender<bool>,
    running: std::sync::atomic::AtomicBool,
}

fn decode<K: Object>(kv: &KeyValue) -> Option<K> {
    match serde_json::from_slice::<K>(&kv.value) {
        Ok(mut obj) => {
            obj.metadata_mut().resource_version = Some(kv.mod_revision.to_string());
            Some(obj)
        }
        Err(e) => {
            tracing::warn!(kind = %K::KIND, key = %kv.key, error = %e, "an object does not decode");
            None
        }
    }
}

impl<K: Object> Informer<K> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            prefix: def::<K>().prefix(None),
            state: RwLock::new(State {
                objects: BTreeMap::new(),
                tombstones: HashMap::new(),
                revision: 0,
            }),
            delivery: std::sync::Mutex::new(()),
            handlers: RwLock::new(Vec::new()),
            synced: tokio::sync::watch::channel(false).0,
            running: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Calls `f` for every change from now on (and for every object of the first list). `f`
    /// runs on the informer's task: it must be quick (enqueue keys, not write).
    pub fn on_change(&self, f: impl Fn(&Change<K>) + Send + Sync + 'static) {
        self.handlers
            .write()
            .expect("not poisoned")
            .push(Box::new(f));
    }

    pub fn get(&self, key: &str) -> Option<Arc<K>> {
        self.state
            .read()
            .expect("not poisoned")
            .objects
            .get(key)
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<K>> {
        self.state
            .read()
            .expect("not poisoned")
            .objects
            .values()
            .cloned()
            .collect()
    }

    /// The objects of one namespace.
    pub fn list_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        let from = format!("{namespace}/");
        let to = format!("{namespace}0"); // '0' follows '/'
        self.state
            .read()
            .expect("not poisoned")
            .objects
            .range(from..to)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.state.read().expect("not poisoned").objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the first list is in the cache.
    pub async fn synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn notify(&self, change: Change<K>) {
        for handler in self.handlers.read().expect("not poisoned").iter() {
            handler(&change);
        }
    }

    /// Applies an object read or written at its resourceVersion, unless the cache holds a newer
    /// state of its key. A revision the watch has already passed is never newer: the watch
    /// delivered it (or what replaced it), so a writer reading its own write late cannot revive
    /// an object deleted since.
    pub fn apply(&self, obj: K) {
        self.apply_at(obj, false);
    }

    /// `from_store`: the object comes from the list or the watch, in the store's order.
    fn apply_at(&self, obj: K, from_store: bool) {
        let key = key_of(obj.metadata());
        let rev = revision_of(obj.metadata());
        let _delivery = self.delivery.lock().expect("not poisoned");
        let old = {
            let mut state = self.state.write().expect("not poisoned");
            if (!from_store && rev <= state.revision)
                || state.tombstones.get(&key).is_some_and(|t| *t >= rev)
                || state
                    .objects
                    .get(&key)
                    .is_some_and(|o| revision_of(o.metadata()) >= rev)
            {
                return;
            }
            state.objects.insert(key, Arc::new(obj.clone()))
        };
        self.notify(Change {
            old,
            new: Some(Arc::new(obj)),
        });
    }

    /// Applies the deletion of `key` at revision `rev`.
    pub fn apply_delete(&self, key: &str, rev: i64) {
        let _delivery = self.delivery.lock().expect("not poisoned");
        let old = {
            let mut state = self.state.write().expect("not poisoned");
            if state
                .objects
                .get(key)
                .is_some_and(|o| revision_of(o.metadata()) > rev)
            {
                return;
            }
            if state.revision < rev {
                state.tombstones.insert(key.to_owned(), rev);
            }
            state.objects.remove(key)
        };
        if let Some(old) = old {
            self.notify(Change {
                old: Some(old),
                new: None,
            });
        }
    }

    fn advance(&self, rev: i64) {
        let mut state = self.state.write().expect("not poisoned");
        state.revision = state.revision.max(rev);
        if !state.tombstones.is_empty() {
            let revision = state.revision;
            state.tombstones.retain(|_, t| *t > revision);
        }
    }

    /// Reads everything at one revision and makes the cache equal to it.
    async fn relist(&self, store: &AnyStore) -> anyhow::Result<i64> {
        let mut objects = BTreeMap::new();
        let mut opts = ListOptions {
            limit: Some(1000),
            ..Default::default()
        };
        let revision = loop {
            let page = store.list(&self.prefix, opts.clone()).await?;
            for kv in &page.kvs {
                if let Some(obj) = decode::<K>(kv) {
                    objects.insert(key_of(obj.metadata()), obj);
                }
            }
            opts.revision = Some(page.revision);
            opts.start_after = page.kvs.last().map(|kv| kv.key.clone());
            if !page.more {
                break page.revision;
            }
        };
        let gone: Vec<(String, i64)> = {
            let state = self.state.read().expect("not poisoned");
            state
                .objects
                .keys()
                .filter(|k| !objects.contains_key(*k))
                .map(|k| (k.clone(), revision))
                .collect()
        };
        for (key, rev) in gone {
            self.apply_delete(&key, rev);
        }
        for obj in objects.into_values() {
            self.apply_at(obj, true);
        }
        self.advance(revision);
        Ok(revision)
    }

    /// Keeps the cache equal to the store until the process ends. A failed list, or a watch
    /// that fails before it delivered anything, backs off (200 ms doubling to 30 s, with
    /// jitter so informers do not relist in step): a struggling store is not answered with a
    /// storm of full lists.
    pub async fn run(self: Arc<Self>, store: Arc<AnyStore>) {
        let mut failures = 0;
        loop {
            if failures > 0 {
                let delay = backoff(failures, Duration::from_millis(200));
                tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..=1.0))).await;
            }
            let revision = match self.relist(&store).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, error = format!("{e:#}"), "list failed");
                    failures += 1;
                    continue;
                }
            };
            self.synced.send_replace(true);
            let mut watch = match store.watch(&self.prefix, revision).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, error = format!("{e:#}"), "watch failed");
                    failures += 1;
                    continue;
                }
            };
            let started = tokio::time::Instant::now();
            let mut delivered = false;
            while let Some(event) = watch.next().await {
                match event {
                    Ok(event) => {
                        let rev = event.kv.mod_revision;
                        match event.kind {
                            EventKind::Put => {
                                if let Some(obj) = decode::<K>(&event.kv) {
                                    self.apply_at(obj, true);
                                }
                            }
                            EventKind::Delete => {
                                self.apply_delete(&event.kv.key[self.prefix.len()..], rev)
                            }
                        }
                        self.advance(rev);
                        delivered = true;
                    }
                    Err(e) => {
                        tracing::info!(prefix = %self.prefix, error = %e, "watch ended; listing again");
                        break;
                    }
                }
            }
            // A watch that worked (it delivered, or lasted) ends the run of failures: its end
            // (a compaction, a restart of the store) is relisted at once.
            if delivered || started.elapsed() >= HEALTHY_WATCH {
                failures = 0;
            } else {
                failures += 1;
            }
        }
    }
}

/// An informer of any kind, to start and wait for.
trait Runnable: Send + Sync {
    fn start(self: Arc<Self>, store: Arc<AnyStore>);
    fn wait_synced(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

impl<K: Object> Runnable for Informer<K> {
    fn start(self: Arc<Self>, store: Arc<AnyStore>) {
        if !self.running.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tokio::spawn(self.run(store));
        }
    }

    fn wait_synced(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.synced())
    }
}

/// The informers of a control plane, one per kind, shared by every loop.
#[derive(Default)]
pub struct Informers {
    by_kind: RwLock<HashMap<&'static str, Arc<dyn Any + Send + Sync>>>,
    all: RwLock<Vec<Arc<dyn Runnable>>>,
    started: std::sync::OnceLock<Arc<AnyStore>>,
}

impl Informers {
    /// The informer of `K`, created on first use; [`Informers::start`] runs them all.
    pub fn get<K: Object>(&self) -> Arc<Informer<K>> {
        let name = K::KIND;
        if let Some(i) = self.by_kind.read().expect("not poisoned").get(name) {
            return i.clone().downcast().expect("one type per kind");
        }
        let mut map = self.by_kind.write().expect("not poisoned");
        if let Some(i) = map.get(name) {
            return i.clone().downcast().expect("one type per kind");
        }
        let informer = Informer::<K>::new();
        map.insert(name, informer.clone());
        self.all
            .write()
            .expect("not poisoned")
            .push(informer.clone());
        if let Some(store) = self.started.get() {
            informer.clone().start(store.clone());
        }
        informer
    }

    /// Runs every informer created so far, and those created later, on `store`.
    pub fn start(&self, store: Arc<AnyStore>) {
        if self.started.set(store.clone()).is_err() {
            return;
        }
        for informer in self.all.read().expect("not poisoned").iter() {
            informer.clone().start(store.clone());
        }
    }

    /// Waits until every informer has its first list.
    pub async fn synced(&self) {
        let all: Vec<Arc<dyn Runnable>> = self.all.read().expect("not poisoned").clone();
        for informer in all {
            informer.wait_synced().await;
        }
    }

    /// The informer of `K` if one was created (writes of kinds nobody caches skip the cache).
    pub fn existing<K: Object>(&self) -> Option<Arc<Informer<K>>> {
        self.by_kind
            .read()
            .expect("not poisoned")
            .get(K::KIND)
            .map(|i| i.clone().downcast().expect("one type per kind"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use k8s_openapi::api::core::v1::Pod;

    use super::*;

    fn pod(rev: i64, node: &str) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("default".into());
        pod.metadata.name = Some("web".into());
        pod.metadata.resource_version = Some(rev.to_string());
        pod.spec.get_or_insert_default().node_name = Some(node.into());
        pod
    }

    /// What the handlers saw, in order: the node of each state, "deleted" for a deletion.
    fn recorded(informer: &Informer<Pod>) -> Arc<Mutex<Vec<String>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        informer.on_change(move |c| {
            let what = match &c.new {
                Some(p) => p.spec.as_ref().unwrap().node_name.clone().unwrap(),
                None => "deleted".into(),
            };
            s.lock().unwrap().push(what);
        });
        seen
    }

    #[test]
    fn a_late_read_of_a_write_never_revives_a_deleted_object() {
        let informer = Informer::<Pod>::new();
        let seen = recorded(&informer);
        informer.apply_at(pod(4, "pending"), true);
        // The watch delivers the deletion (revision 6) before the binder applies its own
        // write (revision 5) to the cache.
        informer.apply_delete("default/web", 6);
        informer.apply(pod(5, "node-0"));
        assert!(
            informer.get("default/web").is_none(),
            "deleted stays deleted"
        );
        assert_eq!(*seen.lock().unwrap(), ["pending", "deleted"]);
        // Once the watch passed revision 6, any older state is ignored too.
        informer.advance(6);
        informer.apply(pod(6, "node-1"));
        assert!(informer.get("default/web").is_none());
    }

    #[test]
    fn an_older_state_never_replaces_a_newer_one() {
        let informer = Informer::<Pod>::new();
        let seen = recorded(&informer);
        informer.apply(pod(7, "node-1"));
        informer.apply_at(pod(5, "node-0"), true); // the watch catching up
        let cached = informer.get("default/web").unwrap();
        assert_eq!(
            cached.spec.as_ref().unwrap().node_name.as_deref(),
            Some("node-1")
        );
        assert_eq!(*seen.lock().unwrap(), ["node-1"]);
    }
}
