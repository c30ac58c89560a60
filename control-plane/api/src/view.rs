//! The node agent's side of the feed: the state a node holds, kept by applying snapshot
//! chunks and deltas as they arrive.

use std::collections::HashMap;

use crate::feed::{self, FeedMessage, delta::Change, feed_message};

/// What the agent holds from the feed.
#[derive(Default, Debug)]
pub struct View {
    pub version: u64,
    /// Snapshots received (the first, and any resync).
    pub snapshots: u32,
    /// Delta messages received.
    pub delta_messages: u32,
    /// Deltas that were not newer than the version before them (never, from a sound feed).
    pub out_of_order: u32,
    pub services: HashMap<String, feed::Service>,
    pub slices: HashMap<String, feed::EndpointSlice>,
    pub nodes: HashMap<String, feed::Node>,
    pub pods: HashMap<String, feed::Pod>,
    partial: Option<feed::SnapshotChunk>,
}

/// `namespace/name`, or `name` for cluster-scoped objects.
pub fn key(ns: &str, name: &str) -> String {
    if ns.is_empty() {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

impl View {
    /// Applies one message; returns the pods that changed (for the kubelet part).
    pub fn apply(&mut self, message: FeedMessage) -> Vec<feed::Pod> {
        let mut changed = Vec::new();
        match message.kind {
            Some(feed_message::Kind::Snapshot(chunk)) => {
                let mut acc = self.partial.take().unwrap_or_default();
                acc.version = chunk.version;
                acc.services.extend(chunk.services);
                acc.endpoint_slices.extend(chunk.endpoint_slices);
                acc.nodes.extend(chunk.nodes);
                acc.pods.extend(chunk.pods);
                if !chunk.last {
                    self.partial = Some(acc);
                    return changed;
                }
                self.snapshots += 1;
                self.version = acc.version;
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
                changed.extend(acc.pods);
            }
            Some(feed_message::Kind::Deltas(deltas)) => {
                self.delta_messages += 1;
                for d in deltas.deltas {
                    assert!(
                        d.version > self.version || d.version == 0,
                        "deltas come in order: {} after {}",
                        d.version,
                        self.version
                    );
                    match d.change {
                        Some(Change::Service(s)) => {
                            drop(self.services.insert(key(&s.namespace, &s.name), s))
                        }
                        Some(Change::ServiceDeleted(r)) => {
                            drop(self.services.remove(&key(&r.namespace, &r.name)))
                        }
                        Some(Change::EndpointSlice(s)) => {
                            drop(self.slices.insert(key(&s.namespace, &s.name), s))
                        }
                        Some(Change::EndpointSliceDeleted(r)) => {
                            drop(self.slices.remove(&key(&r.namespace, &r.name)))
                        }
                        Some(Change::Node(n)) => drop(self.nodes.insert(n.name.clone(), n)),
                        Some(Change::NodeDeleted(r)) => drop(self.nodes.remove(&r.name)),
                        Some(Change::Pod(p)) => {
                            self.pods.insert(key(&p.namespace, &p.name), p.clone());
                            changed.push(p);
                        }
                        Some(Change::PodDeleted(r)) => {
                            drop(self.pods.remove(&key(&r.namespace, &r.name)))
                        }
                        None => {}
                    }
                }
                self.version = deltas.version;
            }
            None => {}
        }
        changed
    }

    /// Endpoints of a service (namespace/name) as the agent sees them: (address, ready).
    pub fn endpoints(&self, service: &str) -> Vec<(String, bool)> {
        let (ns, name) = service.split_once('/').expect("namespace/name");
        let mut out: Vec<(String, bool)> = self
            .slices
            .values()
            .filter(|s| s.namespace == ns && s.service_name == name)
            .flat_map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| (e.addresses[0].clone(), e.ready))
            })
            .collect();
        out.sort();
        out
    }
}
