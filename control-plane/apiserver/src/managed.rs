//! Field management and server-side apply (`managedFields`, `application/apply-patch+yaml`),
//! as kube-apiserver's structured-merge-diff does them for the cases clients meet.
//!
//! Every object records which manager set which fields (`metadata.managedFields`, entries of
//! manager, operation `Update` or `Apply`, apiVersion, time, subresource, and the fields in
//! the `FieldsV1` form: `f:<field>`, `k:{<keys>}` for an item of a keyed list, `v:<value>`
//! for an item of a set, `.` for a map or item itself).
//!
//! - A create, update or patch (a [`Writer::Update`]) takes the fields it sets or changes:
//!   they become its manager's and stop being anyone else's; a field removed is nobody's.
//! - An apply sends the fields its manager wants to own, with their values. A field another
//!   manager owns with a different value is a conflict (409, each field named) unless the
//!   apply forces; the values are merged into the object (keyed lists by their keys, sets as
//!   sets, maps key by key, everything else replaced); fields the manager applied last time
//!   and no longer applies are removed unless another manager owns them.
//!
//! How a field merges comes from the OpenAPI schemas the server publishes
//! (`x-kubernetes-list-type`, `x-kubernetes-list-map-keys`, maps by `additionalProperties`):
//! the same source strategic merge patches use. Fields defaulted by the server on an apply
//! belong to no manager, as in kube.
//!
//! Which manager writes is carried with the request's task ([`writing_as`]): the registry's
//! create and update paths read it, so the HTTP handlers name the manager once and the
//! in-process controllers, which name none, leave ownership as it was.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Map, Value, json};

use crate::{
    error::{ApiError, ApiResult},
    openapi::{FieldShape, field_shape},
    resources::ResourceDef,
};

/// One field path, as `FieldsV1` spells its elements.
type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// Who writes, for the writes of a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Writer {
    /// A create, update or patch by this manager.
    Update(String),
    /// A server-side apply: the object carries the managedFields [`apply`] computed.
    Apply,
}

tokio::task_local! {
    static WRITER: Writer;
}

/// Runs `f` with its writes made by `writer`.
pub async fn writing_as<F: Future>(writer: Writer, f: F) -> F::Output {
    WRITER.scope(writer, f).await
}

fn writer() -> Option<Writer> {
    WRITER.try_with(Clone::clone).ok()
}

/// Metadata the server sets: no manager owns it.
const SERVER_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// Which part of an object a write covers: the main resource (without its status when the
/// kind has a status subresource) or the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Main { without_status: bool },
    Status,
}

impl Part {
    fn of(def: &ResourceDef, subresource: Option<&str>) -> Self {
        if subresource == Some("status") {
            Part::Status
        } else {
            Part::Main {
                without_status: def.has_status(),
            }
        }
    }
}

/// The fields `obj` sets.
fn fields_of(kind: &str, obj: &Value, part: Part) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(map) = obj.as_object() else {
        return out;
    };
    for (k, v) in map {
        let wanted = match part {
            Part::Status => k == "status",
            Part::Main { without_status } => {
                !(k == "apiVersion" || k == "kind" || (without_status && k == "status"))
            }
        };
        if !wanted || v.is_null() {
            continue;
        }
        let mut at = vec![format!("f:{k}")];
        let mut schema = vec![k.clone()];
        if k == "metadata" {
            let mut meta = v.as_object().cloned().unwrap_or_default();
            meta.retain(|field, _| !SERVER_META.contains(&field.as_str()));
            walk(kind, &meta, &mut schema, &mut at, &mut out);
        } else {
            field(kind, v, &mut schema, &mut at, &mut out);
        }
    }
    out
}

fn with(at: &Path, element: &str) -> Path {
    let mut p = at.clone();
    p.push(element.to_owned());
    p
}

/// A field's shape, remembered: every write asks for the same few hundred.
fn shape(kind: &str, schema: &[String]) -> FieldShape {
    static SHAPES: std::sync::OnceLock<std::sync::RwLock<HashMap<String, FieldShape>>> =
        std::sync::OnceLock::new();
    let shapes = SHAPES.get_or_init(Default::default);
    let key = format!("{kind}/{}", schema.join("/"));
    if let Some(found) = shapes.read().expect("not poisoned").get(&key) {
        return found.clone();
    }
    let path: Vec<&str> = schema.iter().map(String::as_str).collect();
    let found = field_shape(kind, &path);
    shapes
        .write()
        .expect("not poisoned")
        .insert(key, found.clone());
    found
}

fn walk(
    kind: &str,
    map: &Map<String, Value>,
    schema: &mut Vec<String>,
    at: &mut Path,
    out: &mut FieldSet,
) {
    for (k, v) in map {
        if v.is_null() {
            continue;
        }
        schema.push(k.clone());
        at.push(format!("f:{k}"));
        field(kind, v, schema, at, out);
        schema.pop();
        at.pop();
    }
}

/// The fields of one field's value `v` at `at`.
fn field(kind: &str, v: &Value, schema: &mut Vec<String>, at: &mut Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) => match shape(kind, schema) {
            FieldShape::Map => {
                out.insert(with(at, "."));
                for key in m.keys() {
                    out.insert(with(at, &format!("f:{key}")));
                }
            }
            FieldShape::Struct if !m.is_empty() => walk(kind, m, schema, at, out),
            _ => {
                out.insert(at.clone());
            }
        },
        Value::Array(items) => match shape(kind, schema) {
            FieldShape::ListMap(keys) => {
                for item in items {
                    at.push(format!("k:{}", key_of(item, &keys)));
                    out.insert(with(at, "."));
                    if let Value::Object(m) = item {
                        walk(kind, m, schema, at, out);
                    }
                    at.pop();
                }
            }
            FieldShape::Set => {
                for item in items {
                    out.insert(with(at, &format!("v:{item}")));
                }
            }
            _ => {
                out.insert(at.clone());
            }
        },
        _ => {
            out.insert(at.clone());
        }
    }
}

/// A key field's value in an item; an unset `protocol` is its default, TCP.
fn key_value(item: &Value, key: &str) -> Value {
    match item.get(key) {
        Some(v) if !v.is_null() => v.clone(),
        _ if key == "protocol" => json!("TCP"),
        _ => Value::Null,
    }
}

/// An item's keys as `k:` writes them: a JSON object, keys in order.
fn key_of(item: &Value, keys: &[&str]) -> String {
    let mut sorted: Vec<&&str> = keys.iter().collect();
    sorted.sort();
    let parts: Vec<String> = sorted
        .iter()
        .map(|k| format!("{}:{}", json!(k), key_value(item, k)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn same_keys(item: &Value, keys: &Map<String, Value>) -> bool {
    keys.iter().all(|(k, v)| key_value(item, k) == *v)
}

/// The value at `path` in `obj` (for `.`, the node itself).
fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = obj;
    for element in path {
        if element == "." {
            continue;
        }
        v = step(v, element)?;
    }
    Some(v)
}

fn step<'a>(v: &'a Value, element: &str) -> Option<&'a Value> {
    if let Some(f) = element.strip_prefix("f:") {
        v.get(f)
    } else if let Some(k) = element.strip_prefix("k:") {
        let keys: Map<String, Value> = serde_json::from_str(k).ok()?;
        v.as_array()?.iter().find(|item| same_keys(item, &keys))
    } else if let Some(x) = element.strip_prefix("v:") {
        let want: Value = serde_json::from_str(x).ok()?;
        v.as_array()?.iter().find(|item| **item == want)
    } else {
        None
    }
}

fn step_mut<'a>(v: &'a mut Value, element: &str) -> Option<&'a mut Value> {
    if let Some(f) = element.strip_prefix("f:") {
        v.get_mut(f)
    } else if let Some(k) = element.strip_prefix("k:") {
        let keys: Map<String, Value> = serde_json::from_str(k).ok()?;
        v.as_array_mut()?
            .iter_mut()
            .find(|item| same_keys(item, &keys))
    } else {
        None
    }
}

/// Removes what `path` names from `obj` (a field, a keyed item, a set's value, or with a
/// final `.` the map or item itself).
fn remove_at(obj: &mut Value, path: &[String]) {
    let path = match path.last().map(String::as_str) {
        Some(".") => &path[..path.len() - 1],
        _ => path,
    };
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut v = obj;
    for element in parents {
        match step_mut(v, element) {
            Some(next) => v = next,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = v.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Ok(keys), Some(items)) = (
            serde_json::from_str::<Map<String, Value>>(k),
            v.as_array_mut(),
        ) {
            items.retain(|item| !same_keys(item, &keys));
        }
    } else if let Some(x) = last.strip_prefix("v:")
        && let (Ok(want), Some(items)) = (serde_json::from_str::<Value>(x), v.as_array_mut())
    {
        items.retain(|item| *item != want);
    }
}

/// A field set in the `FieldsV1` form.
fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = json!({});
    for path in set {
        let mut node = &mut root;
        for element in path {
            node = node
                .as_object_mut()
                .expect("an object")
                .entry(element.clone())
                .or_insert_with(|| json!({}));
        }
    }
    root
}

fn from_fields_v1(v: &Value, at: &mut Path, out: &mut FieldSet) {
    for (k, child) in v.as_object().into_iter().flatten() {
        at.push(k.clone());
        match child.as_object() {
            Some(m) if !m.is_empty() => from_fields_v1(child, at, out),
            _ => {
                out.insert(at.clone());
            }
        }
        at.pop();
    }
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: String,
    fields: FieldSet,
}

fn entries_of(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let text = |f: &str| e.get(f).and_then(Value::as_str).unwrap_or("").to_owned();
            let mut fields = FieldSet::new();
            from_fields_v1(&e["fieldsV1"], &mut Vec::new(), &mut fields);
            Entry {
                manager: text("manager"),
                operation: text("operation"),
                api_version: text("apiVersion"),
                time: text("time"),
                subresource: text("subresource"),
                fields,
            }
        })
        .collect()
}

fn set_entries(obj: &mut Value, entries: &[Entry]) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({"manager": e.manager, "operation": e.operation,
                "apiVersion": e.api_version, "time": e.time, "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields)});
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Records a create (`old` none) or an update of `new` in its managedFields, as the task's
/// [`Writer`] says: an update's manager takes the fields it changed (over the managedFields
/// the client sent, if it changed them); an apply's object keeps what [`apply`] wrote; a write
/// without a writer (the controllers) leaves ownership as it was.
pub fn track(def: &ResourceDef, old: Option<&Value>, new: &mut Value, subresource: Option<&str>) {
    let manager = match writer() {
        Some(Writer::Apply) => return,
        Some(Writer::Update(manager)) => manager,
        None => {
            let entries = old.map(entries_of).unwrap_or_default();
            set_entries(new, &entries);
            return;
        }
    };
    let part = Part::of(def, subresource);
    // managedFields the client set itself (kubectl's move from client-side to server-side
    // apply patches them; `[{}]` clears them) are taken as they are, as kube-apiserver takes
    // them; otherwise the stored ones carry on.
    let sent = new.pointer("/metadata/managedFields");
    let stored = old.and_then(|o| o.pointer("/metadata/managedFields"));
    let mut entries = match sent {
        Some(sent) if Some(sent) != stored => entries_of(new),
        _ => old.map(entries_of).unwrap_or_default(),
    };
    let after = fields_of(def.kind, new, part);
    let before = old.map_or_else(FieldSet::new, |o| fields_of(def.kind, o, part));
    let changed: FieldSet = after
        .iter()
        .filter(|p| {
            !before.contains(*p)
                || (p.last().map(String::as_str) != Some(".")
                    && old.and_then(|o| value_at(o, p)) != value_at(new, p))
        })
        .cloned()
        .collect();
    let removed: FieldSet = before.difference(&after).cloned().collect();
    let sub = subresource.filter(|s| *s == "status").unwrap_or("");
    let mine = |e: &Entry| e.manager == manager && e.operation == "Update" && e.subresource == sub;
    for e in &mut entries {
        e.fields.retain(|p| !removed.contains(p));
        if !mine(e) {
            e.fields.retain(|p| !changed.contains(p));
        }
    }
    if !changed.is_empty() {
        match entries.iter_mut().find(|e| mine(e)) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now();
                e.api_version = def.api_version();
            }
            None => entries.push(Entry {
                manager,
                operation: "Update".into(),
                api_version: def.api_version(),
                time: now(),
                subresource: sub.into(),
                fields: changed,
            }),
        }
    }
    entries.retain(|e| !e.fields.is_empty());
    set_entries(new, &entries);
}

/// A field path as kube's conflict messages write it (`.spec.containers[name="web"].image`).
fn display(path: &[String]) -> String {
    let mut out = String::new();
    for element in path {
        if let Some(f) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = element.strip_prefix("k:") {
            let keys: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = element.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        }
    }
    out
}

/// Merges an applied configuration into the live value: objects field by field (maps key by
/// key), keyed lists item by item, sets as unions, anything else replaced.
fn merge(kind: &str, live: &Value, applied: &Value, schema: &mut Vec<String>) -> Value {
    let (Value::Object(l), Value::Object(a)) = (live, applied) else {
        return applied.clone();
    };
    let mut out = l.clone();
    for (k, av) in a {
        if av.is_null() {
            continue;
        }
        schema.push(k.clone());
        let merged = match (l.get(k), av) {
            (Some(Value::Array(lv)), Value::Array(items)) => match shape(kind, schema) {
                FieldShape::ListMap(keys) => {
                    let mut result = lv.clone();
                    for item in items {
                        let key = key_of(item, &keys);
                        match result.iter_mut().find(|r| key_of(r, &keys) == key) {
                            Some(existing) => *existing = merge(kind, existing, item, schema),
                            None => result.push(item.clone()),
                        }
                    }
                    Value::Array(result)
                }
                FieldShape::Set => {
                    let mut result = lv.clone();
                    for item in items {
                        if !result.contains(item) {
                            result.push(item.clone());
                        }
                    }
                    Value::Array(result)
                }
                _ => av.clone(),
            },
            (Some(lv @ Value::Object(_)), Value::Object(_)) => match shape(kind, schema) {
                FieldShape::Atomic => av.clone(),
                _ => merge(kind, lv, av, schema),
            },
            _ => av.clone(),
        };
        schema.pop();
        out.insert(k.clone(), merged);
    }
    Value::Object(out)
}

/// A server-side apply of `applied` by `manager` to `live` (none: the object is created):
/// the object to store, its managedFields written, or a 409 naming every conflict when
/// `force` is not set.
pub fn apply(
    def: &ResourceDef,
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    subresource: Option<&str>,
) -> ApiResult<Value> {
    let part = Part::of(def, subresource);
    let wanted = fields_of(def.kind, applied, part);
    let sub = subresource.filter(|s| *s == "status").unwrap_or("");
    let mine = |e: &Entry| e.manager == manager && e.operation == "Apply" && e.subresource == sub;
    let entry = |fields: FieldSet| Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        api_version: def.api_version(),
        time: now(),
        subresource: sub.into(),
        fields,
    };
    let Some(live) = live else {
        let mut created = applied.clone();
        set_entries(&mut created, &[entry(wanted)]);
        return Ok(created);
    };
    let mut entries = entries_of(live);
    // Conflicts: fields another manager owns that this apply would set to another value.
    let mut conflicts = Vec::new();
    for e in entries.iter().filter(|e| !mine(e)) {
        for path in e.fields.intersection(&wanted) {
            if path.last().map(String::as_str) != Some(".")
                && value_at(live, path) != value_at(applied, path)
            {
                conflicts.push((e.manager.clone(), e.api_version.clone(), path.clone()));
            }
        }
    }
    // An object kubectl applied client-side moves to server-side apply as in kube-apiserver
    // (its lastAppliedManager): for kubectl's manager, conflicts over fields of the
    // last-applied configuration are taken over as if forced.
    let upgrade = manager == "kubectl"
        && last_applied(live).is_some_and(|last| {
            let fields = fields_of(def.kind, &last, part);
            conflicts.iter().all(|(_, _, path)| fields.contains(path))
        });
    if !conflicts.is_empty() && !force && !upgrade {
        return Err(conflict_error(&conflicts));
    }
    for e in entries.iter_mut().filter(|e| !mine(e)) {
        e.fields
            .retain(|p| !conflicts.iter().any(|(_, _, c)| c == p));
    }
    let previous = entries
        .iter()
        .find(|e| mine(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut merged = {
        let mut without = live.clone();
        if let Some(m) = without.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
        let mut applied = applied.clone();
        if let (
            Part::Main {
                without_status: true,
            },
            Some(m),
        ) = (part, applied.as_object_mut())
        {
            m.remove("status");
        }
        merge(def.kind, &without, &applied, &mut Vec::new())
    };
    // What this manager applied before and applies no longer goes, unless another owns it
    // (or, for a map or an item, something inside it).
    let others: FieldSet = entries
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut dropped: Vec<&Path> = previous
        .iter()
        .filter(|p| !wanted.contains(*p))
        .filter(|p| {
            let node = match p.last().map(String::as_str) {
                Some(".") => &p[..p.len() - 1],
                _ => &p[..],
            };
            !others.iter().any(|o| o.starts_with(node))
        })
        .collect();
    // Deepest first, so an item's fields go before the item.
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for path in dropped {
        remove_at(&mut merged, path);
        // A list or map emptied by the removal goes too, as Go's omitempty drops it.
        for end in (2..path.len()).rev() {
            let parent = &path[..end];
            let empty = match value_at(&merged, parent) {
                None => continue, // the item removed itself
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(m)) => m.is_empty(),
                Some(_) => false,
            };
            if !empty {
                break;
            }
            remove_at(&mut merged, parent);
        }
    }
    entries.retain(|e| !mine(e));
    entries.push(entry(wanted));
    set_entries(&mut merged, &entries);
    Ok(merged)
}

/// The annotation kubectl's client-side apply keeps.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The last configuration kubectl applied client-side, if the object carries it.
fn last_applied(obj: &Value) -> Option<Value> {
    let text = obj
        .pointer("/metadata/annotations")?
        .get(LAST_APPLIED)?
        .as_str()?;
    serde_json::from_str(text).ok()
}

/// kube's 409 for an apply's conflicts.
fn conflict_error(conflicts: &[(String, String, Path)]) -> ApiError {
    let lines: Vec<String> = conflicts
        .iter()
        .map(|(m, v, p)| format!("conflict with \"{m}\" using {v}: {}", display(p)))
        .collect();
    let message = if lines.len() == 1 {
        format!("Apply failed with 1 conflict: {}", lines[0])
    } else {
        format!(
            "Apply failed with {} conflicts: {}",
            lines.len(),
            lines.join("\n")
        )
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(m, v, p)| {
            json!({"reason": "FieldManagerConflict",
                "message": format!("conflict with \"{m}\" using {v}"), "field": display(p)})
        })
        .collect();
    ApiError {
        code: axum::http::StatusCode::CONFLICT,
        reason: "Conflict",
        message,
        details: Some(json!({"causes": causes})),
    }
}

/// The manager of a write: `fieldManager`, else the User-Agent up to its first `/` (as
/// kube-apiserver names a manager the client did not).
pub fn manager_of(field_manager: Option<&str>, user_agent: Option<&str>) -> ApiResult<String> {
    let manager = match field_manager.filter(|m| !m.is_empty()) {
        Some(m) => m.to_owned(),
        None => user_agent
            .and_then(|ua| ua.split('/').next())
            .filter(|m| !m.is_empty())
            .unwrap_or("unknown")
            .chars()
            .take(128)
            .collect(),
    };
    if manager.chars().count() > 128 {
        return Err(ApiError::bad_request(
            "fieldManager: Too long: may not be longer than 128 characters",
        ));
    }
    if manager.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad_request(
            "fieldManager: Invalid value: must only contain printable characters",
        ));
    }
    Ok(manager)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::by_kind;

    fn deployments() -> &'static ResourceDef {
        by_kind("apps", "Deployment").unwrap()
    }

    fn deployment(replicas: i64, image: &str, extra_env: bool) -> Value {
        let mut env = vec![json!({"name": "A", "value": "1"})];
        if extra_env {
            env.push(json!({"name": "B", "value": "2"}));
        }
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": image, "env": env,
                        "ports": [{"containerPort": 80}]}]}}}})
    }

    #[test]
    fn fields_are_written_as_kube_writes_them() {
        let set = fields_of(
            deployments().kind,
            &deployment(2, "nginx", false),
            Part::Main {
                without_status: true,
            },
        );
        let v1 = to_fields_v1(&set);
        assert_eq!(v1["f:metadata"]["f:labels"], json!({".": {}, "f:app": {}}));
        assert_eq!(
            v1["f:spec"]["f:selector"],
            json!({}),
            "a selector is atomic"
        );
        let container =
            &v1["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert_eq!(container["."], json!({}));
        assert_eq!(container["f:image"], json!({}));
        assert_eq!(
            container["f:ports"]["k:{\"containerPort\":80,\"protocol\":\"TCP\"}"]["f:containerPort"],
            json!({})
        );
        let mut back = FieldSet::new();
        from_fields_v1(&v1, &mut Vec::new(), &mut back);
        assert_eq!(back, set);
    }

    #[test]
    fn apply_conflicts_merges_and_removes_what_it_no_longer_applies() {
        let def = deployments();
        let first = apply(
            def,
            None,
            &deployment(2, "nginx", true),
            "alice",
            false,
            None,
        )
        .unwrap();
        // Someone scales it with an update: the replicas become theirs.
        let mut scaled = first.clone();
        scaled["spec"]["replicas"] = json!(5);
        writing_as_sync(Writer::Update("kubectl-scale".into()), || {
            track(def, Some(&first), &mut scaled, None);
        });
        let entries = entries_of(&scaled);
        let alice =
            |applied: &Value, force| apply(def, Some(&scaled), applied, "alice", force, None);
        assert_eq!(entries.len(), 2, "{entries:?}");
        // alice applies replicas 2 again: a conflict naming the field and the manager.
        let e = alice(&deployment(2, "nginx", true), false).unwrap_err();
        assert_eq!(e.code, axum::http::StatusCode::CONFLICT);
        assert_eq!(
            e.message,
            "Apply failed with 1 conflict: conflict with \"kubectl-scale\" using apps/v1: .spec.replicas"
        );
        // The same value is no conflict; dropping env B removes it; forcing takes replicas.
        let same = alice(&deployment(5, "nginx:2", false), false).unwrap();
        let env = &same["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(env, &json!([{"name": "A", "value": "1"}]));
        assert_eq!(
            same["spec"]["template"]["spec"]["containers"][0]["image"],
            "nginx:2"
        );
        let forced = alice(&deployment(3, "nginx", true), true).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        let scale_entry = entries_of(&forced)
            .into_iter()
            .find(|e| e.manager == "kubectl-scale");
        assert!(scale_entry.is_none(), "it owned only replicas, now alice's");
    }

    /// Runs `f` inside a task scope of `writer` (the tests are synchronous).
    fn writing_as_sync(writer: Writer, f: impl FnOnce()) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(writing_as(writer, async { f() }));
    }
}
