//! The three patch formats of PATCH requests: JSON patch (RFC 6902), JSON merge patch
//! (RFC 7386) and Kubernetes' strategic merge patch, which merges lists of objects by a key
//! (containers by name, service ports by port, ...) instead of replacing them, and understands
//! the directives `kubectl apply` sends (`$patch`, `$retainKeys`, `$setElementOrder/...`,
//! `$deleteFromPrimitiveList/...`).

use serde_json::{Map, Value};

pub fn json_patch(mut doc: Value, patch: &Value) -> Result<Value, String> {
    let ops = patch
        .as_array()
        .ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("an operation needs \"op\"")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("an operation needs \"path\"")?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("{kind} {path}: needs \"value\""))
        };
        match kind {
            "add" => add(&mut doc, path, value()?)?,
            "remove" => {
                remove(&mut doc, path)?;
            }
            "replace" => {
                remove(&mut doc, path)?;
                add(&mut doc, path, value()?)?;
            }
            "move" | "copy" => {
                let from = op
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or("move/copy needs \"from\"")?;
                let moved = if kind == "move" {
                    remove(&mut doc, from)?
                } else {
                    get(&doc, from)
                        .cloned()
                        .ok_or_else(|| format!("copy: {from} does not exist"))?
                };
                add(&mut doc, path, moved)?;
            }
            "test" => {
                let expected = value()?;
                if get(&doc, path) != Some(&expected) {
                    return Err(format!("test failed: {path} is not {expected}"));
                }
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(doc)
}

fn tokens(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(vec![]);
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("path {path:?} must start with /"))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn get<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = doc;
    for t in tokens(path).ok()? {
        cur = match cur {
            Value::Object(m) => m.get(&t)?,
            Value::Array(a) => a.get(t.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn parent<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    let mut toks = tokens(path)?;
    let last = toks
        .pop()
        .ok_or("the document itself cannot be the target")?;
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(&t)
                .ok_or_else(|| format!("{path}: {t} does not exist"))?,
            Value::Array(a) => {
                let i: usize = t
                    .parse()
                    .map_err(|_| format!("{path}: {t} is not an index"))?;
                a.get_mut(i)
                    .ok_or_else(|| format!("{path}: index {i} out of range"))?
            }
            _ => return Err(format!("{path}: {t} is inside a scalar")),
        };
    }
    Ok((cur, last))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = parent(doc, path)?;
    match parent {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse().map_err(|_| format!("{path}: bad index"))?
            };
            if i > a.len() {
                return Err(format!("{path}: index {i} out of range"));
            }
            a.insert(i, value);
        }
        _ => return Err(format!("{path}: parent is a scalar")),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = parent(doc, path)?;
    match parent {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("{path} does not exist")),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("{path}: bad index"))?;
            if i >= a.len() {
                return Err(format!("{path}: index {i} out of range"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("{path}: parent is a scalar")),
    }
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(doc: Value, patch: &Value) -> Value {
    match patch {
        Value::Object(p) => {
            let mut target = match doc {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            for (k, v) in p {
                if v.is_null() {
                    target.remove(k);
                } else {
                    let current = target.remove(k).unwrap_or(Value::Null);
                    target.insert(k.clone(), merge_patch(current, v));
                }
            }
            Value::Object(target)
        }
        other => other.clone(),
    }
}

/// How a list field merges in a strategic merge patch.
enum ListStrategy {
    /// Lists of objects merged by this key.
    MergeByKey(&'static str),
    /// Lists of scalars merged as sets.
    MergeScalars,
    /// Replaced whole (the default).
    Replace,
}

/// The patch strategy of a list at `path` (field names from the object root, indices left out)
/// in an object of `kind`, as the Go types' `patchStrategy`/`patchMergeKey` tags say.
fn list_strategy(kind: &str, path: &[&str]) -> ListStrategy {
    let Some(&field) = path.last() else {
        return ListStrategy::Replace;
    };
    let in_container = path
        .iter()
        .any(|p| matches!(*p, "containers" | "initContainers" | "ephemeralContainers"));
    match field {
        "finalizers" if path.len() == 2 && path[0] == "metadata" => ListStrategy::MergeScalars,
        "ownerReferences" => ListStrategy::MergeByKey("uid"),
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "imagePullSecrets" => ListStrategy::MergeByKey("name"),
        "env" if in_container => ListStrategy::MergeByKey("name"),
        "volumeMounts" if in_container => ListStrategy::MergeByKey("mountPath"),
        "volumeDevices" if in_container => ListStrategy::MergeByKey("devicePath"),
        "ports" if in_container => ListStrategy::MergeByKey("containerPort"),
        "ports" if kind == "Service" && path == ["spec", "ports"] => {
            ListStrategy::MergeByKey("port")
        }
        "hostAliases" => ListStrategy::MergeByKey("ip"),
        "conditions" => ListStrategy::MergeByKey("type"),
        "addresses" if kind == "Node" => ListStrategy::MergeByKey("type"),
        _ => ListStrategy::Replace,
    }
}

/// Applies a strategic merge patch to an object of `kind`.
pub fn strategic_merge(kind: &str, doc: Value, patch: &Value) -> Result<Value, String> {
    merge_value(kind, &mut Vec::new(), doc, patch)
}

fn merge_value(
    kind: &str,
    path: &mut Vec<String>,
    doc: Value,
    patch: &Value,
) -> Result<Value, String> {
    match patch {
        Value::Object(p) => {
            if p.get("$patch").and_then(Value::as_str) == Some("replace") {
                let mut replaced = p.clone();
                replaced.remove("$patch");
                return Ok(Value::Object(replaced));
            }
            let mut target = match doc {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            let retain: Option<Vec<String>> =
                p.get("$retainKeys").and_then(Value::as_array).map(|keys| {
                    keys.iter()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect()
                });
            for (key, value) in p {
                if key.starts_with("$setElementOrder/") || key == "$retainKeys" || key == "$patch" {
                    continue;
                }
                if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
                    let remove: Vec<&Value> = value
                        .as_array()
                        .map(|a| a.iter().collect())
                        .unwrap_or_default();
                    if let Some(Value::Array(items)) = target.get_mut(field) {
                        items.retain(|i| !remove.contains(&i));
                    }
                    continue;
                }
                if value.is_null() {
                    target.remove(key);
                    continue;
                }
                path.push(key.clone());
                let current = target.remove(key).unwrap_or(Value::Null);
                let merged = match value {
                    Value::Array(items) => merge_list(kind, path, current, items)?,
                    Value::Object(_) => merge_value(kind, path, current, value)?,
                    _ => value.clone(),
                };
                path.pop();
                target.insert(key.clone(), merged);
            }
            if let Some(retain) = retain {
                target.retain(|k, _| retain.contains(k));
            }
            Ok(Value::Object(target))
        }
        other => Ok(other.clone()),
    }
}

fn merge_list(
    kind: &str,
    path: &mut Vec<String>,
    current: Value,
    patch: &[Value],
) -> Result<Value, String> {
    let strategy = {
        let names: Vec<&str> = path.iter().map(String::as_str).collect();
        list_strategy(kind, &names)
    };
    let mut items = match current {
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    match strategy {
        ListStrategy::Replace => Ok(Value::Array(
            patch
                .iter()
                .filter(|v| v.get("$patch").is_none())
                .cloned()
                .collect(),
        )),
        ListStrategy::MergeScalars => {
            for v in patch {
                if !items.contains(v) {
                    items.push(v.clone());
                }
            }
            Ok(Value::Array(items))
        }
        ListStrategy::MergeByKey(key) => {
            if patch
                .iter()
                .any(|v| v.get("$patch").and_then(Value::as_str) == Some("replace"))
            {
                return Ok(Value::Array(
                    patch
                        .iter()
                        .filter(|v| v.get("$patch").is_none())
                        .cloned()
                        .collect(),
                ));
            }
            for element in patch {
                let Some(id) = element.get(key) else {
                    return Err(format!(
                        "{}: list item without its merge key {key:?}",
                        path.join(".")
                    ));
                };
                let existing = items.iter().position(|i| i.get(key) == Some(id));
                if element.get("$patch").and_then(Value::as_str) == Some("delete") {
                    if let Some(at) = existing {
                        items.remove(at);
                    }
                    continue;
                }
                match existing {
                    Some(at) => {
                        let old = std::mem::take(&mut items[at]);
                        items[at] = merge_value(kind, path, old, element)?;
                    }
                    None => {
                        let mut fresh = element.clone();
                        if let Value::Object(m) = &mut fresh {
                            m.retain(|k, _| !k.starts_with('$'));
                        }
                        items.push(fresh);
                    }
                }
            }
            Ok(Value::Array(items))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_patch_follows_rfc_6902() {
        let doc = json!({"a": {"b": [1, 2]}, "c": "x"});
        let patched = json_patch(
            doc,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "replace", "path": "/c", "value": "y"},
                {"op": "remove", "path": "/a/b/0"},
                {"op": "test", "path": "/c", "value": "y"},
                {"op": "copy", "from": "/c", "path": "/d"},
                {"op": "add", "path": "/e~1f", "value": true}
            ]),
        )
        .unwrap();
        assert_eq!(
            patched,
            json!({"a": {"b": [2, 3]}, "c": "y", "d": "y", "e/f": true})
        );
        assert!(json_patch(json!({}), &json!([{"op": "remove", "path": "/missing"}])).is_err());
        assert!(
            json_patch(
                json!({"a": 1}),
                &json!([{"op": "test", "path": "/a", "value": 2}])
            )
            .is_err()
        );
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let patched = merge_patch(
            json!({"a": {"b": 1, "c": 2}, "d": [1]}),
            &json!({"a": {"b": null, "e": 3}, "d": [2]}),
        );
        assert_eq!(patched, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }

    #[test]
    fn strategic_merge_merges_containers_by_name_and_ports_by_key() {
        let deployment = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80}], "env": [{"name": "A", "value": "1"}]},
            {"name": "sidecar", "image": "busybox"}
        ]}}}});
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "web"}, {"name": "sidecar"}],
            "containers": [
                {"name": "web", "image": "nginx:2", "env": [{"name": "B", "value": "2"}]},
                {"name": "sidecar", "$patch": "delete"}
            ]
        }}}});
        let patched = strategic_merge("Deployment", deployment, &patch).unwrap();
        let containers = &patched["spec"]["template"]["spec"]["containers"];
        assert_eq!(
            containers.as_array().unwrap().len(),
            1,
            "the sidecar is deleted"
        );
        assert_eq!(containers[0]["image"], "nginx:2");
        assert_eq!(
            containers[0]["ports"],
            json!([{"containerPort": 80}]),
            "untouched fields stay"
        );
        assert_eq!(
            containers[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
        );
        assert!(
            patched["spec"]["template"]["spec"]
                .get("$setElementOrder/containers")
                .is_none()
        );
    }

    #[test]
    fn strategic_merge_service_ports_and_lists_without_strategy() {
        let svc = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}], "externalIPs": ["1.1.1.1"]}});
        let patched = strategic_merge(
            "Service",
            svc,
            &json!({"spec": {"ports": [{"port": 443, "targetPort": 8443}], "externalIPs": ["2.2.2.2"]}}),
        )
        .unwrap();
        assert_eq!(
            patched["spec"]["ports"].as_array().unwrap().len(),
            2,
            "ports merge by port"
        );
        assert_eq!(
            patched["spec"]["externalIPs"],
            json!(["2.2.2.2"]),
            "lists without a strategy are replaced"
        );
    }

    #[test]
    fn strategic_merge_directives() {
        let obj = json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patched = strategic_merge(
            "Deployment",
            obj,
            &json!({
                "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "finalizers": ["c"]},
                "spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}
            }),
        )
        .unwrap();
        assert_eq!(patched["metadata"]["finalizers"], json!(["b", "c"]));
        assert_eq!(
            patched["spec"]["strategy"],
            json!({"type": "Recreate"}),
            "$retainKeys drops rollingUpdate"
        );
    }
}
