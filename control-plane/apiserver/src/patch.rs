//! The three patch formats of PATCH requests: JSON patch (RFC 6902), JSON merge patch
//! (RFC 7386) and Kubernetes' strategic merge patch, which merges lists of objects by a key
//! (containers by name, service ports by port, ...) instead of replacing them, and understands
//! the directives `kubectl apply` sends (`$patch`, `$retainKeys`, `$setElementOrder/...`,
//! `$deleteFromPrimitiveList/...`).

use serde_json::{Map, Value};

/// Most operations one JSON patch may hold (kube-apiserver's limit).
const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;
/// Most bytes the `copy` operations of one JSON patch may duplicate: a few dozen copies of a
/// growing object would otherwise build one of unbounded size from a small request.
const MAX_COPIED_BYTES: usize = 3 * 1024 * 1024;

/// RFC 6902, by the `json-patch` crate, one operation at a time within the limits above.
pub fn json_patch(mut doc: Value, patch: &Value) -> Result<Value, String> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| format!("invalid JSON patch: {e}"))?;
    if ops.len() > MAX_JSON_PATCH_OPERATIONS {
        return Err(format!(
            "the JSON patch has {} operations, more than the {MAX_JSON_PATCH_OPERATIONS} allowed",
            ops.len()
        ));
    }
    let mut copied = 0;
    for op in ops.iter() {
        if let json_patch::PatchOperation::Copy(copy) = op {
            copied += doc
                .pointer(copy.from.as_str())
                .map_or(0, |v| serde_json::to_vec(v).map_or(0, |b| b.len()));
            if copied > MAX_COPIED_BYTES {
                return Err(format!(
                    "the JSON patch copies more than {MAX_COPIED_BYTES} bytes"
                ));
            }
        }
        json_patch::patch(&mut doc, std::slice::from_ref(op)).map_err(|e| e.to_string())?;
    }
    Ok(doc)
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
/// in an object of `kind`, as the OpenAPI documents publish it (`openapi::patch_meta`).
fn list_strategy(kind: &str, path: &[&str]) -> ListStrategy {
    match crate::openapi::patch_meta(kind, path) {
        (Some(strategy), key) if strategy.split(',').any(|s| s == "merge") => match key {
            Some(key) => ListStrategy::MergeByKey(key),
            None => ListStrategy::MergeScalars,
        },
        _ => ListStrategy::Replace,
    }
}

/// Applies a strategic merge patch to an object of `kind`.
pub fn strategic_merge(kind: &str, doc: Value, patch: &Value) -> Result<Value, String> {
    if patch.get("$patch").and_then(Value::as_str) == Some("delete") {
        return Err("$patch: delete cannot delete the object itself".into());
    }
    merge_value(kind, &mut Vec::new(), doc, patch)
}

/// Whether a patch map is `{"$patch": "delete", ...}`: the field it patches goes.
fn deletes(patch: &Value) -> bool {
    patch.get("$patch").and_then(Value::as_str) == Some("delete")
}

fn merge_value(
    kind: &str,
    path: &mut Vec<String>,
    doc: Value,
    patch: &Value,
) -> Result<Value, String> {
    match patch {
        Value::Object(p) => {
            match p.get("$patch").and_then(Value::as_str) {
                Some("replace") => {
                    let mut replaced = p.clone();
                    replaced.remove("$patch");
                    return Ok(Value::Object(replaced));
                }
                None | Some("merge" | "delete") => {}
                Some(other) => {
                    return Err(format!(
                        "{}: unknown $patch directive {other:?} (replace, merge or delete)",
                        path.join(".")
                    ));
                }
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
                if key.starts_with('$') && !key.starts_with("$deleteFromPrimitiveList/") {
                    return Err(format!(
                        "{}: unknown patch directive {key:?}",
                        path.join(".")
                    ));
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
                if value.is_null() || deletes(value) {
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
            for (key, order) in p {
                let Some(field) = key.strip_prefix("$setElementOrder/") else {
                    continue;
                };
                let order = order
                    .as_array()
                    .ok_or_else(|| format!("{key}: must be a list"))?;
                path.push(field.to_owned());
                let strategy = {
                    let names: Vec<&str> = path.iter().map(String::as_str).collect();
                    list_strategy(kind, &names)
                };
                path.pop();
                if let Some(Value::Array(items)) = target.get_mut(field) {
                    set_element_order(items, order, &strategy);
                }
            }
            Ok(Value::Object(target))
        }
        other => Ok(other.clone()),
    }
}

/// Orders a merged list as `$setElementOrder` says: the items it names in its order, then the
/// others (only the server had them) in the order they were.
fn set_element_order(items: &mut [Value], order: &[Value], strategy: &ListStrategy) {
    let rank = |item: &Value| {
        order
            .iter()
            .position(|o| match strategy {
                ListStrategy::MergeByKey(key) => {
                    o.get(*key).is_some() && o.get(*key) == item.get(*key)
                }
                _ => o == item,
            })
            .unwrap_or(usize::MAX)
    };
    items.sort_by_key(|item| rank(item));
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
                match element.get("$patch").and_then(Value::as_str) {
                    Some("delete") => {
                        if let Some(at) = existing {
                            items.remove(at);
                        }
                        continue;
                    }
                    None | Some("merge") => {}
                    Some(other) => {
                        return Err(format!(
                            "{}: unknown $patch directive {other:?} in a list item",
                            path.join(".")
                        ));
                    }
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
    fn json_patches_are_capped() {
        // Each copy doubles the document: sixty would need exabytes.
        let doubling: Vec<Value> = (0..60)
            .map(|i| json!({"op": "copy", "from": "/a", "path": format!("/a/x{i}")}))
            .collect();
        let err =
            json_patch(json!({"a": {"seed": "x".repeat(1000)}}), &json!(doubling)).unwrap_err();
        assert!(err.contains("copies more than"), "{err}");
        let many: Vec<Value> = (0..10_001)
            .map(|_| json!({"op": "test", "path": "/a", "value": 1}))
            .collect();
        let err = json_patch(json!({"a": 1}), &json!(many)).unwrap_err();
        assert!(err.contains("10000"), "{err}");
    }

    #[test]
    fn strategic_merge_orders_deletes_and_refuses_unknown_directives() {
        // $setElementOrder orders the merged list (the server-only item last).
        let pod = json!({"spec": {"containers": [
            {"name": "a", "image": "1"}, {"name": "b", "image": "1"}, {"name": "c", "image": "1"}
        ]}});
        let patched = strategic_merge(
            "Pod",
            pod.clone(),
            &json!({"spec": {"$setElementOrder/containers": [{"name": "c"}, {"name": "a"}],
                "containers": [{"name": "a", "image": "2"}]}}),
        )
        .unwrap();
        let names: Vec<&str> = patched["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["c", "a", "b"]);
        assert_eq!(patched["spec"]["containers"][1]["image"], "2");
        // $patch: delete on a map removes it.
        let labelled = json!({"metadata": {"labels": {"a": "1"}, "name": "p"}});
        let patched = strategic_merge(
            "Pod",
            labelled,
            &json!({"metadata": {"labels": {"$patch": "delete"}}}),
        )
        .unwrap();
        assert_eq!(patched, json!({"metadata": {"name": "p"}}));
        // Unknown directives are refused, not ignored.
        for bad in [
            json!({"spec": {"$patch": "bogus"}}),
            json!({"spec": {"$unknown": 1}}),
            json!({"spec": {"containers": [{"name": "a", "$patch": "bogus"}]}}),
            json!({"$patch": "delete"}),
        ] {
            assert!(strategic_merge("Pod", pod.clone(), &bad).is_err(), "{bad}");
        }
        // Strategies come from the published OpenAPI: status conditions merge by type.
        let status = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
        let patched = strategic_merge(
            "Pod",
            status,
            &json!({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}),
        )
        .unwrap();
        assert_eq!(patched["status"]["conditions"].as_array().unwrap().len(), 2);
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
