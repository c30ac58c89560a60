//! Any Kubernetes API server, read the way kube-proxy reads it: list and watch Services,
//! EndpointSlices and this Node (kube-rs's watcher: resumes from the last resourceVersion,
//! lists again on 410 Gone, asks for bookmarks, backs off on errors). Objects are converted to
//! the feed's types (`control_plane_api::convert`), so the same view and the same translation
//! serve both sources. The view is complete once all three kinds have been listed.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, Result};
use control_plane_api::{
    convert,
    view::{Changes, View, key},
};
use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};

use crate::agent::Shared;

/// The three kinds, each with its own relist buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Service,
    Slice,
    Node,
    Pod,
}

/// One event of one of the watches, converted.
enum Item {
    Upsert(Object),
    Delete(Kind, String),
    Init(Kind),
    InitApply(Kind, Object),
    InitDone(Kind),
    Error(String),
}

enum Object {
    Service(control_plane_api::feed::Service),
    Slice(control_plane_api::feed::EndpointSlice),
    Node(control_plane_api::feed::Node),
    /// A pod bound to this node (`None`: not bound yet, as far as it says).
    Pod(Option<control_plane_api::feed::Pod>),
}

impl Object {
    fn key(&self) -> String {
        match self {
            Object::Service(s) => key(&s.namespace, &s.name),
            Object::Slice(s) => key(&s.namespace, &s.name),
            Object::Node(n) => n.name.clone(),
            Object::Pod(p) => p
                .as_ref()
                .map(|p| key(&p.namespace, &p.name))
                .unwrap_or_default(),
        }
    }
}

fn stream<K, F>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    convert: F,
) -> BoxStream<'static, (Item, Option<String>)>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: Fn(&K) -> Object + Send + Sync + 'static,
{
    let object_key = |k: &K| {
        let meta = k.meta();
        key(
            meta.namespace.as_deref().unwrap_or(""),
            meta.name.as_deref().unwrap_or(""),
        )
    };
    let version = |k: &K| k.meta().resource_version.clone();
    watcher(api, config)
        .default_backoff()
        .map(move |event| match event {
            Ok(watcher::Event::Apply(k)) => (Item::Upsert(convert(&k)), version(&k)),
            Ok(watcher::Event::Delete(k)) => (Item::Delete(kind, object_key(&k)), version(&k)),
            Ok(watcher::Event::Init) => (Item::Init(kind), None),
            Ok(watcher::Event::InitApply(k)) => (Item::InitApply(kind, convert(&k)), version(&k)),
            Ok(watcher::Event::InitDone) => (Item::InitDone(kind), None),
            Err(e) => (Item::Error(format!("{kind:?}: {e}")), None),
        })
        .boxed()
}

pub async fn run(kubeconfig: &Path, shared: Arc<Shared>) -> Result<()> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .context("use the kubeconfig")?;
    let client = Client::try_from(config).context("a client for the API server")?;
    let node = shared.node.clone();
    let run_pods = shared.pods.is_some();
    if let Some(settings) = &shared.pods {
        let reporter = std::sync::Arc::new(crate::pods::ApiReporter {
            client: client.clone(),
        });
        let kubelet = crate::pods::start_kubelet(&shared, settings, reporter)?;
        *shared.kubelet.lock().expect("not poisoned") = Some(kubelet);
    }
    let mut streams = vec![
        stream(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            Kind::Service,
            |s| Object::Service(convert::service(s)),
        ),
        stream(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            Kind::Slice,
            |s| Object::Slice(convert::endpoint_slice(s)),
        ),
        stream(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            Kind::Node,
            |n| Object::Node(convert::node(n)),
        ),
    ];
    if run_pods {
        // As the real kubelet: the pods whose spec.nodeName is this node.
        streams.push(stream(
            Api::<Pod>::all(client),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            Kind::Pod,
            |p| Object::Pod(convert::pod(p).map(|(_, pod)| pod)),
        ));
    }
    let kinds = streams.len();
    let mut events = futures::stream::select_all(streams);
    let mut lists: HashMap<Kind, Vec<Object>> = HashMap::new();
    let mut listed: BTreeSet<&'static str> = BTreeSet::new();
    while let Some((item, version)) = events.next().await {
        {
            let mut status = shared.stream.lock().expect("not poisoned");
            status.last_message = Some(Instant::now());
            match &item {
                Item::Error(e) => {
                    status.connected = false;
                    status.reconnects += 1;
                    status.last_error = Some(e.clone());
                }
                _ => status.connected = true,
            }
        }
        let mut changes = Changes::default();
        let mut view = shared.view.lock().expect("not poisoned");
        match item {
            Item::Upsert(object) => upsert(&mut view, object, &mut changes),
            Item::Delete(kind, k) => remove(&mut view, kind, &k, &mut changes),
            Item::Init(kind) => {
                lists.insert(kind, Vec::new());
            }
            Item::InitApply(kind, object) => lists.entry(kind).or_default().push(object),
            Item::InitDone(kind) => {
                let objects = lists.remove(&kind).unwrap_or_default();
                replace(&mut view, kind, objects, &mut changes);
                listed.insert(match kind {
                    Kind::Service => "services",
                    Kind::Slice => "slices",
                    Kind::Node => "node",
                    Kind::Pod => "pods",
                });
                if listed.len() == kinds && !view.complete {
                    view.complete = true;
                    view.snapshots += 1;
                    changes.replaced = true;
                    tracing::info!("listed services, endpoint slices and this node");
                }
            }
            Item::Error(e) => {
                tracing::warn!(error = %e, "watch failed; the watcher retries with back-off");
            }
        }
        if let Some(v) = version.and_then(|v| v.parse::<u64>().ok()) {
            view.version = view.version.max(v);
        }
        shared.changed(&view, changes);
        drop(view);
    }
    anyhow::bail!("the watches ended")
}

fn upsert(view: &mut View, object: Object, changes: &mut Changes) {
    match object {
        Object::Service(s) => view.upsert_service(s, changes),
        Object::Slice(s) => view.upsert_slice(s, changes),
        Object::Node(n) => view.upsert_node(n, changes),
        Object::Pod(Some(p)) => view.upsert_pod(p, changes),
        Object::Pod(None) => {}
    }
}

fn remove(view: &mut View, kind: Kind, k: &str, changes: &mut Changes) {
    match kind {
        Kind::Service => view.remove_service(k, changes),
        Kind::Slice => view.remove_slice(k, changes),
        Kind::Node => view.remove_node(k, changes),
        Kind::Pod => view.remove_pod(k, changes),
    }
}

/// A relist: the objects of `kind` become exactly `objects`.
fn replace(view: &mut View, kind: Kind, objects: Vec<Object>, changes: &mut Changes) {
    let keep: BTreeSet<String> = objects.iter().map(Object::key).collect();
    let gone: Vec<String> = match kind {
        Kind::Service => view.services.keys().cloned().collect(),
        Kind::Slice => view.slices.keys().cloned().collect(),
        Kind::Node => view.nodes.keys().cloned().collect(),
        Kind::Pod => view.pods.keys().cloned().collect(),
    };
    for k in gone.into_iter().filter(|k| !keep.contains(k)) {
        remove(view, kind, &k, changes);
    }
    for object in objects {
        upsert(view, object, changes);
    }
}
