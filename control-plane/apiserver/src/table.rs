//! `Table` responses (meta.k8s.io/v1), what `kubectl get` asks for: columns as kubectl's
//! server-side printers define them (priority 1 columns are the `-o wide` ones) and a row per
//! object with its metadata.

use serde_json::{Value, json};

use crate::{
    object::{age_seconds, field_string, human_duration, meta_str},
    selector::LabelSelector,
};

/// A column: (name, type, priority).
type Column = (&'static str, &'static str, u8);

fn columns(kind: &str) -> Vec<Column> {
    let mut cols: Vec<Column> = vec![("Name", "string", 0)];
    cols.extend_from_slice(match kind {
        "Pod" => &[
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ][..],
        "Service" => &[
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            ("Age", "string", 0),
            ("Selector", "string", 1),
        ][..],
        "Endpoints" => &[("Endpoints", "string", 0), ("Age", "string", 0)][..],
        "Namespace" => &[("Status", "string", 0), ("Age", "string", 0)][..],
        "Node" => &[
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ][..],
        "Event" => &[
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ][..],
        "Deployment" => &[
            ("Ready", "string", 0),
            ("Up-to-date", "string", 0),
            ("Available", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ][..],
        "ReplicaSet" => &[
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ][..],
        "EndpointSlice" => &[
            ("AddressType", "string", 0),
            ("Ports", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ][..],
        "Lease" => &[("Holder", "string", 0), ("Age", "string", 0)][..],
        _ => &[("Age", "string", 0)][..],
    });
    cols
}

fn age(obj: &Value) -> String {
    meta_str(obj, "creationTimestamp")
        .and_then(age_seconds)
        .map(human_duration)
        .unwrap_or_else(|| "<unknown>".into())
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn arr(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn int(obj: &Value, path: &str) -> i64 {
    crate::object::at(obj, path)
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn containers_and_images(pod_spec: Option<&Value>) -> (String, String) {
    let cs = arr(pod_spec.and_then(|s| s.get("containers")));
    let names: Vec<&str> = cs.iter().filter_map(|c| c.get("name")?.as_str()).collect();
    let images: Vec<&str> = cs.iter().filter_map(|c| c.get("image")?.as_str()).collect();
    (names.join(","), images.join(","))
}

fn selector_text(selector: Option<&Value>) -> String {
    selector
        .and_then(|s| LabelSelector::from_label_selector(s).ok())
        .map(|s| s.to_display())
        .unwrap_or_default()
}

/// The status kubectl shows for a pod.
fn pod_status(pod: &Value) -> String {
    if meta_str(pod, "deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let mut reason = field_string(pod, "status.reason");
    if reason.is_empty() {
        reason = field_string(pod, "status.phase");
    }
    for cs in arr(pod.pointer("/status/containerStatuses")) {
        if let Some(r) = cs.pointer("/state/waiting/reason").and_then(Value::as_str) {
            reason = r.to_owned();
        } else if let Some(r) = cs
            .pointer("/state/terminated/reason")
            .and_then(Value::as_str)
        {
            reason = r.to_owned();
        }
    }
    reason
}

fn cells(kind: &str, obj: &Value) -> Vec<Value> {
    let name = json!(meta_str(obj, "name").unwrap_or_default());
    let rest: Vec<Value> = match kind {
        "Pod" => {
            let statuses = arr(obj.pointer("/status/containerStatuses"));
            let total = arr(obj.pointer("/spec/containers")).len();
            let ready = statuses
                .iter()
                .filter(|c| c.get("ready") == Some(&json!(true)))
                .count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|c| c.get("restartCount")?.as_i64())
                .sum();
            vec![
                json!(format!("{ready}/{total}")),
                json!(pod_status(obj)),
                json!(restarts.to_string()),
                json!(age(obj)),
                json!(or_none(field_string(obj, "status.podIP"))),
                json!(or_none(field_string(obj, "spec.nodeName"))),
                json!(or_none(field_string(obj, "status.nominatedNodeName"))),
                json!("<none>"),
            ]
        }
        "Service" => {
            let kind = field_string(obj, "spec.type");
            let external: Vec<String> = arr(obj.pointer("/status/loadBalancer/ingress"))
                .iter()
                .filter_map(|i| {
                    i.get("ip")
                        .or_else(|| i.get("hostname"))?
                        .as_str()
                        .map(str::to_owned)
                })
                .chain(
                    arr(obj.pointer("/spec/externalIPs"))
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned)),
                )
                .collect();
            let external = if external.is_empty() {
                if kind == "LoadBalancer" {
                    "<pending>".into()
                } else {
                    "<none>".into()
                }
            } else {
                external.join(",")
            };
            let ports: Vec<String> = arr(obj.pointer("/spec/ports"))
                .iter()
                .map(|p| {
                    let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect();
            let selector: Vec<String> = obj
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                json!(kind),
                json!(or_none(field_string(obj, "spec.clusterIP"))),
                json!(external),
                json!(or_none(ports.join(","))),
                json!(age(obj)),
                json!(or_none(selector.join(","))),
            ]
        }
        "Endpoints" => {
            let mut eps = Vec::new();
            for subset in arr(obj.get("subsets")) {
                for addr in arr(subset.get("addresses")) {
                    for port in arr(subset.get("ports")) {
                        eps.push(format!(
                            "{}:{}",
                            addr.get("ip").and_then(Value::as_str).unwrap_or_default(),
                            port.get("port").and_then(Value::as_i64).unwrap_or(0)
                        ));
                    }
                }
            }
            vec![json!(or_none(eps.join(","))), json!(age(obj))]
        }
        "Namespace" => vec![json!(field_string(obj, "status.phase")), json!(age(obj))],
        "Node" => {
            let ready = arr(obj.pointer("/status/conditions"))
                .iter()
                .find(|c| c.get("type") == Some(&json!("Ready")))
                .and_then(|c| c.get("status")?.as_str().map(str::to_owned));
            let mut status = match ready.as_deref() {
                Some("True") => "Ready".to_owned(),
                _ => "NotReady".to_owned(),
            };
            if obj.pointer("/spec/unschedulable") == Some(&json!(true)) {
                status.push_str(",SchedulingDisabled");
            }
            let address = |t: &str| {
                arr(obj.pointer("/status/addresses"))
                    .iter()
                    .find(|a| a.get("type").and_then(Value::as_str) == Some(t))
                    .and_then(|a| a.get("address")?.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "<none>".into())
            };
            vec![
                json!(status),
                json!("<none>"),
                json!(age(obj)),
                json!(field_string(obj, "status.nodeInfo.kubeletVersion")),
                json!(address("InternalIP")),
                json!(address("ExternalIP")),
                json!(or_none(field_string(obj, "status.nodeInfo.osImage"))),
                json!(or_none(field_string(obj, "status.nodeInfo.kernelVersion"))),
                json!(or_none(field_string(
                    obj,
                    "status.nodeInfo.containerRuntimeVersion"
                ))),
            ]
        }
        "Event" => {
            let last = ["lastTimestamp", "eventTime"]
                .iter()
                .map(|f| field_string(obj, f))
                .find(|s| !s.is_empty())
                .or_else(|| meta_str(obj, "creationTimestamp").map(str::to_owned))
                .and_then(|t| age_seconds(&t))
                .map(human_duration)
                .unwrap_or_else(|| "<unknown>".into());
            vec![
                json!(last),
                json!(field_string(obj, "type")),
                json!(field_string(obj, "reason")),
                json!(format!(
                    "{}/{}",
                    field_string(obj, "involvedObject.kind").to_lowercase(),
                    field_string(obj, "involvedObject.name")
                )),
                json!(field_string(obj, "message")),
            ]
        }
        "Deployment" | "ReplicaSet" => {
            let (containers, images) = containers_and_images(obj.pointer("/spec/template/spec"));
            let selector = selector_text(obj.pointer("/spec/selector"));
            let mut row = if kind == "Deployment" {
                vec![
                    json!(format!(
                        "{}/{}",
                        int(obj, "status.readyReplicas"),
                        int(obj, "spec.replicas")
                    )),
                    json!(int(obj, "status.updatedReplicas")),
                    json!(int(obj, "status.availableReplicas")),
                ]
            } else {
                vec![
                    json!(int(obj, "spec.replicas")),
                    json!(int(obj, "status.replicas")),
                    json!(int(obj, "status.readyReplicas")),
                ]
            };
            row.extend([
                json!(age(obj)),
                json!(containers),
                json!(images),
                json!(selector),
            ]);
            row
        }
        "EndpointSlice" => {
            let ports: Vec<String> = arr(obj.get("ports"))
                .iter()
                .map(|p| {
                    p.get("port")
                        .and_then(Value::as_i64)
                        .map_or("<unset>".into(), |p| p.to_string())
                })
                .collect();
            let addrs: Vec<&str> = arr(obj.get("endpoints"))
                .iter()
                .flat_map(|e| arr(e.get("addresses")).iter().filter_map(Value::as_str))
                .collect();
            let shown = if addrs.len() > 3 {
                format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
            } else {
                addrs.join(",")
            };
            vec![
                json!(field_string(obj, "addressType")),
                json!(or_none(ports.join(","))),
                json!(or_none(shown)),
                json!(age(obj)),
            ]
        }
        "Lease" => vec![
            json!(or_none(field_string(obj, "spec.holderIdentity"))),
            json!(age(obj)),
        ],
        _ => vec![json!(age(obj))],
    };
    std::iter::once(name).chain(rest).collect()
}

fn column_definitions(kind: &str) -> Vec<Value> {
    columns(kind)
        .into_iter()
        .map(|(name, ty, priority)| {
            json!({
                "name": name,
                "type": ty,
                "format": if name == "Name" { "name" } else { "" },
                "description": format!("{name} of the {kind}"),
                "priority": priority,
            })
        })
        .collect()
}

fn row(kind: &str, obj: &Value) -> Value {
    json!({
        "cells": cells(kind, obj),
        "object": {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        },
    })
}

/// A Table of `objects`; `list_meta` is the list's metadata (resourceVersion, continue).
pub fn table(kind: &str, objects: &[Value], list_meta: Value, with_columns: bool) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": if with_columns { column_definitions(kind) } else { vec![] },
        "rows": objects.iter().map(|o| row(kind, o)).collect::<Vec<_>>(),
    })
}

/// Whether an Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let params: Vec<&str> = part.split(';').map(str::trim).collect();
        params.contains(&"as=Table") && params.contains(&"g=meta.k8s.io")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_rows_have_kubectls_columns() {
        let d = json!({
            "metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"spec": {"containers": [{"name": "nginx", "image": "nginx:1"}]}}},
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}
        });
        let t = table("Deployment", &[d], json!({"resourceVersion": "5"}), true);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Name",
                "Ready",
                "Up-to-date",
                "Available",
                "Age",
                "Containers",
                "Images",
                "Selector"
            ]
        );
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web");
        assert_eq!(cells[1], "2/3");
        assert_eq!(cells[7], "app=web");
        assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "web");
    }

    #[test]
    fn service_ports_show_node_ports() {
        let s = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.9",
            "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}], "selector": {"app": "web"}}});
        let t = table("Service", &[s], json!({}), true);
        assert_eq!(t["rows"][0]["cells"][4], "80:30080/TCP");
        assert_eq!(t["rows"][0]["cells"][3], "<none>");
    }

    #[test]
    fn accept_headers_asking_for_tables() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
