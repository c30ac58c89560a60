//! What a node agent holds of the cluster: services, endpoint slices, nodes and the pods bound
//! to it, in the feed's types. The feed fills it with snapshot chunks and deltas
//! ([`View::apply`]); an agent fed by a Kubernetes API server fills it object by object
//! ([`View::upsert_service`] and friends). Either way every change is reported as [`Changes`],
//! so the proxy and the kubelet redo only what changed.
//!
//! A message that does not fit what the view holds (a delta older than the view, deltas
//! before any snapshot, a snapshot chunk of another version than the chunks before it) is
//! refused with a [`ViewError`] and changes nothing; the session then asks for a new snapshot.

use std::collections::{BTreeSet, HashMap};

use crate::feed::{self, FeedMessage, delta::Change, feed_message};

/// `namespace/name`, or `name` for cluster-scoped objects.
pub fn key(ns: &str, name: &str) -> String {
    if ns.is_empty() {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

/// Why a feed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("deltas arrived before any snapshot")]
    DeltasBeforeSnapshot,
    #[error("deltas arrived in the middle of a snapshot")]
    DeltasInsideSnapshot,
    #[error("a delta at version {delta} arrived after version {held}")]
    OutOfOrder { delta: u64, held: u64 },
    #[error("a snapshot chunk at version {chunk} continued a snapshot at version {partial}")]
    MixedSnapshot { chunk: u64, partial: u64 },
    #[error("an empty feed message")]
    Empty,
}

/// What one message or one object changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// Everything was replaced (a snapshot, a relist): treat every object as changed.
    pub replaced: bool,
    /// Services (`namespace/name`) whose object or endpoint slices changed.
    pub services: BTreeSet<String>,
    /// Some node changed (addresses, pod CIDRs, zone, readiness).
    pub nodes: bool,
    /// Pods bound to this node that arrived or changed.
    pub pods: Vec<feed::Pod>,
    /// Pods (`namespace/name`) that are gone.
    pub pods_deleted: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.replaced
            && self.services.is_empty()
            && !self.nodes
            && self.pods.is_empty()
            && self.pods_deleted.is_empty()
    }

    /// Adds `other` to these changes (changes waiting to be applied pile up this way).
    pub fn merge(&mut self, other: Changes) {
        self.replaced |= other.replaced;
        self.services.extend(other.services);
        self.nodes |= other.nodes;
        self.pods.extend(other.pods);
        self.pods_deleted.extend(other.pods_deleted);
    }
}

/// What the agent holds.
#[derive(Default, Debug)]
pub struct View {
    /// The version of the last change applied (the store revision).
    pub version: u64,
    /// The identity of the history `version` belongs to (from the last snapshot).
    pub epoch: String,
    /// A full state has arrived (a snapshot, or the first lists): the view can be acted on.
    pub complete: bool,
    /// Snapshots received (the first, and any resync).
    pub snapshots: u32,
    /// Delta messages received.
    pub delta_messages: u32,
    /// Messages refused (each led to a resync).
    pub refused: u32,
    pub services: HashMap<String, feed::Service>,
    pub slices: HashMap<String, feed::EndpointSlice>,
    pub nodes: HashMap<String, feed::Node>,
    pub pods: HashMap<String, feed::Pod>,
    partial: Option<feed::SnapshotChunk>,
}

impl View {
    /// Applies one feed message; on error the view is unchanged.
    pub fn apply(&mut self, message: FeedMessage) -> Result<Changes, ViewError> {
        let result = match message.kind {
            Some(feed_message::Kind::Snapshot(chunk)) => self.apply_chunk(chunk),
            Some(feed_message::Kind::Deltas(deltas)) => self.apply_deltas(deltas),
            None => Err(ViewError::Empty),
        };
        if result.is_err() {
            self.refused += 1;
        }
        result
    }

    /// Forgets a snapshot that was arriving: the stream it came on ended.
    pub fn stream_ended(&mut self) {
        self.partial = None;
    }

    fn apply_chunk(&mut self, chunk: feed::SnapshotChunk) -> Result<Changes, ViewError> {
        let mut acc = match self.partial.take() {
            Some(partial) if (partial.version, &partial.epoch) != (chunk.version, &chunk.epoch) => {
                let error = ViewError::MixedSnapshot {
                    chunk: chunk.version,
                    partial: partial.version,
                };
                self.partial = Some(partial);
                return Err(error);
            }
            Some(partial) => partial,
            None => feed::SnapshotChunk {
                version: chunk.version,
                epoch: chunk.epoch.clone(),
                ..Default::default()
            },
        };
        acc.services.extend(chunk.services);
        acc.endpoint_slices.extend(chunk.endpoint_slices);
        acc.nodes.extend(chunk.nodes);
        acc.pods.extend(chunk.pods);
        if !chunk.last {
            self.partial = Some(acc);
            return Ok(Changes::default());
        }
        self.snapshots += 1;
        self.version = acc.version;
        self.epoch = acc.epoch;
        self.complete = true;
        let old_pods: BTreeSet<String> = self.pods.keys().cloned().collect();
        self.services = acc
            .services
            .into_iter()
            .map(|s| (key(&s.namespace, &s.name), s))
            .collect();
        self.slices = acc
            .endpoint_slices
            .into_iter()
            .map(|s| (key(&s.namespace, &s.name), s))
            .collect();
        self.nodes = acc.nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        self.pods = acc
            .pods
            .iter()
            .cloned()
            .map(|p| (key(&p.namespace, &p.name), p))
            .collect();
        Ok(Changes {
            replaced: true,
            pods_deleted: old_pods
                .into_iter()
                .filter(|k| !self.pods.contains_key(k))
                .collect(),
            pods: acc.pods,
            ..Default::default()
        })
    }

    fn apply_deltas(&mut self, deltas: feed::Deltas) -> Result<Changes, ViewError> {
        if self.partial.is_some() {
            return Err(ViewError::DeltasInsideSnapshot);
        }
        if !self.complete {
            return Err(ViewError::DeltasBeforeSnapshot);
        }
        // Check the whole message first, so a refused one changes nothing.
        let mut last = self.version;
        for d in &deltas.deltas {
            if d.version != 0 && d.version <= last {
                return Err(ViewError::OutOfOrder {
                    delta: d.version,
                    held: last,
                });
            }
            last = last.max(d.version);
        }
        if deltas.version < last {
            return Err(ViewError::OutOfOrder {
                delta: last,
                held: deltas.version,
            });
        }
        self.delta_messages += 1;
        let mut changes = Changes::default();
        for d in deltas.deltas {
            match d.change {
                Some(Change::Service(s)) => self.upsert_service(s, &mut changes),
                Some(Change::ServiceDeleted(r)) => {
                    self.remove_service(&key(&r.namespace, &r.name), &mut changes)
                }
                Some(Change::EndpointSlice(s)) => self.upsert_slice(s, &mut changes),
                Some(Change::EndpointSliceDeleted(r)) => {
                    self.remove_slice(&key(&r.namespace, &r.name), &mut changes)
                }
                Some(Change::Node(n)) => self.upsert_node(n, &mut changes),
                Some(Change::NodeDeleted(r)) => self.remove_node(&r.name, &mut changes),
                Some(Change::Pod(p)) => self.upsert_pod(p, &mut changes),
                Some(Change::PodDeleted(r)) => {
                    self.remove_pod(&key(&r.namespace, &r.name), &mut changes)
                }
                None => {}
            }
        }
        self.version = deltas.version;
        Ok(changes)
    }

    pub fn upsert_service(&mut self, service: feed::Service, changes: &mut Changes) {
        let k = key(&service.namespace, &service.name);
        if self.services.get(&k) != Some(&service) {
            self.services.insert(k.clone(), service);
            changes.services.insert(k);
        }
    }

    pub fn remove_service(&mut self, k: &str, changes: &mut Changes) {
        if self.services.remove(k).is_some() {
            changes.services.insert(k.to_owned());
        }
    }

    pub fn upsert_slice(&mut self, slice: feed::EndpointSlice, changes: &mut Changes) {
        let k = key(&slice.namespace, &slice.name);
        let service = key(&slice.namespace, &slice.service_name);
        match self.slices.insert(k, slice.clone()) {
            Some(old) if old == slice => return,
            Some(old) => {
                changes
                    .services
                    .insert(key(&old.namespace, &old.service_name));
            }
            None => {}
        }
        changes.services.insert(service);
    }

    pub fn remove_slice(&mut self, k: &str, changes: &mut Changes) {
        if let Some(old) = self.slices.remove(k) {
            changes
                .services
                .insert(key(&old.namespace, &old.service_name));
        }
    }

    pub fn upsert_node(&mut self, node: feed::Node, changes: &mut Changes) {
        if self.nodes.get(&node.name) != Some(&node) {
            self.nodes.insert(node.name.clone(), node);
            changes.nodes = true;
        }
    }

    pub fn remove_node(&mut self, name: &str, changes: &mut Changes) {
        if self.nodes.remove(name).is_some() {
            changes.nodes = true;
        }
    }

    pub fn upsert_pod(&mut self, pod: feed::Pod, changes: &mut Changes) {
        let k = key(&pod.namespace, &pod.name);
        if self.pods.get(&k) != Some(&pod) {
            self.pods.insert(k, pod.clone());
            changes.pods.push(pod);
        }
    }

    pub fn remove_pod(&mut self, k: &str, changes: &mut Changes) {
        if self.pods.remove(k).is_some() {
            changes.pods_deleted.push(k.to_owned());
        }
    }

    /// The endpoint slices of a service (`namespace/name`).
    pub fn slices_of<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = &'a feed::EndpointSlice> {
        let (ns, name) = service.split_once('/').unwrap_or(("", service));
        self.slices
            .values()
            .filter(move |s| s.namespace == ns && s.service_name == name)
    }

    /// Endpoints of a service (`namespace/name`) as the agent sees them: (address, ready).
    pub fn endpoints(&self, service: &str) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = self
            .slices_of(service)
            .flat_map(|s| {
                s.endpoints
                    .iter()
                    .filter_map(|e| Some((e.addresses.first()?.clone(), e.ready)))
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::feed::{Delta, Deltas, ObjectRef, SnapshotChunk};

    pub(crate) fn service(name: &str) -> feed::Service {
        feed::Service {
            namespace: "default".into(),
            name: name.into(),
            cluster_ips: vec!["10.96.0.10".into()],
            ..Default::default()
        }
    }

    pub(crate) fn snapshot(version: u64, services: &[&str], last: bool) -> FeedMessage {
        FeedMessage {
            kind: Some(feed_message::Kind::Snapshot(SnapshotChunk {
                version,
                services: services.iter().map(|s| service(s)).collect(),
                last,
                ..Default::default()
            })),
        }
    }

    pub(crate) fn deltas(version: u64, changes: Vec<(u64, Change)>) -> FeedMessage {
        FeedMessage {
            kind: Some(feed_message::Kind::Deltas(Deltas {
                version,
                deltas: changes
                    .into_iter()
                    .map(|(version, change)| Delta {
                        version,
                        change: Some(change),
                    })
                    .collect(),
            })),
        }
    }

    #[test]
    fn a_snapshot_in_chunks_replaces_everything_when_its_last_chunk_arrives() {
        let mut view = View::default();
        assert_eq!(
            view.apply(snapshot(5, &["a"], false)),
            Ok(Changes::default())
        );
        assert!(!view.complete && view.services.is_empty());
        let changes = view.apply(snapshot(5, &["b"], true)).unwrap();
        assert!(changes.replaced);
        assert!(view.complete);
        assert_eq!(view.version, 5);
        assert_eq!(view.services.len(), 2);
    }

    #[test]
    fn deltas_report_the_services_they_touch() {
        let mut view = View::default();
        view.apply(snapshot(5, &["a"], true)).unwrap();
        let slice = feed::EndpointSlice {
            namespace: "default".into(),
            name: "a-xyz".into(),
            service_name: "a".into(),
            ..Default::default()
        };
        let changes = view
            .apply(deltas(
                7,
                vec![
                    (6, Change::EndpointSlice(slice)),
                    (
                        7,
                        Change::ServiceDeleted(ObjectRef {
                            namespace: "default".into(),
                            name: "gone".into(),
                        }),
                    ),
                ],
            ))
            .unwrap();
        // "gone" was never held: deleting it changes nothing.
        assert_eq!(changes.services, BTreeSet::from(["default/a".to_owned()]));
        assert_eq!(view.version, 7);
    }

    #[test]
    fn messages_that_do_not_fit_are_refused_and_change_nothing() {
        let mut view = View::default();
        let early = deltas(3, vec![(3, Change::Service(service("x")))]);
        assert_eq!(view.apply(early), Err(ViewError::DeltasBeforeSnapshot));

        view.apply(snapshot(5, &["a"], true)).unwrap();
        // Out of order inside one message: nothing of it is applied.
        let message = deltas(
            9,
            vec![
                (8, Change::Service(service("b"))),
                (6, Change::Service(service("c"))),
            ],
        );
        assert_eq!(
            view.apply(message),
            Err(ViewError::OutOfOrder { delta: 6, held: 8 })
        );
        assert_eq!(view.version, 5);
        assert_eq!(view.services.len(), 1);
        // Older than the view.
        let stale = deltas(4, vec![(4, Change::Service(service("d")))]);
        assert_eq!(
            view.apply(stale),
            Err(ViewError::OutOfOrder { delta: 4, held: 5 })
        );
        assert_eq!(
            view.apply(FeedMessage { kind: None }),
            Err(ViewError::Empty)
        );
        assert_eq!(view.refused, 4);
    }

    #[test]
    fn a_snapshot_cut_short_never_merges_into_the_next() {
        let mut view = View::default();
        view.apply(snapshot(5, &["stale"], false)).unwrap();
        assert_eq!(
            view.apply(snapshot(9, &["x"], true)),
            Err(ViewError::MixedSnapshot {
                chunk: 9,
                partial: 5
            })
        );
        view.stream_ended();
        view.apply(snapshot(9, &["fresh"], true)).unwrap();
        let names: Vec<&str> = view.services.values().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["fresh"]);
    }

    #[test]
    fn chunks_of_another_history_never_merge_and_the_epoch_is_kept() {
        let chunk = |epoch: &str, name: &str, last| FeedMessage {
            kind: Some(feed_message::Kind::Snapshot(SnapshotChunk {
                version: 5,
                epoch: epoch.into(),
                services: vec![service(name)],
                last,
                ..Default::default()
            })),
        };
        let mut view = View::default();
        view.apply(chunk("old-store", "stale", false)).unwrap();
        assert!(view.apply(chunk("new-store", "x", true)).is_err());
        view.stream_ended();
        view.apply(chunk("new-store", "fresh", true)).unwrap();
        assert_eq!(view.epoch, "new-store", "resumes ask with it");
        assert_eq!(view.services.len(), 1);
    }
}
