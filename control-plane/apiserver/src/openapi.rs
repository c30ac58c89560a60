//! OpenAPI v3 documents, one per group/version, generated from the k8s-openapi types (their
//! schemars schemas) and the resource registry: every kind's schema with its
//! `x-kubernetes-group-version-kind`, every path with its operations, and on PATCH the
//! `fieldValidation` parameter and the four patch media types. That is what kubectl reads to
//! decide it can leave field validation to the server (`kubectl apply --validate=strict`) and
//! what `kubectl explain` shows.
//!
//! `/openapi/v2` is the same content as one Swagger 2.0 document, for the tools that still read
//! it ([`v2`]): definitions under `#/definitions/`, body parameters, `consumes`/`produces`.

use std::{collections::BTreeMap, sync::OnceLock};

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::resources::{
    RESOURCES, ResourceDef, Subresource, add_subresource_schemas, group_versions,
};

const PATCH_SCHEMA: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Patch";
const DELETE_OPTIONS_SCHEMA: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions";
const STATUS_SCHEMA: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Status";

/// The documents, built once: (path key like `api/v1`, document, hash).
fn documents() -> &'static BTreeMap<String, (Value, String)> {
    static DOCS: OnceLock<BTreeMap<String, (Value, String)>> = OnceLock::new();
    DOCS.get_or_init(|| {
        group_versions()
            .into_iter()
            .map(|(g, v)| {
                let doc = document(g, v);
                let text = serde_json::to_string(&doc).expect("serializes");
                let hash = format!("{:016X}", fnv1a(text.as_bytes()));
                let key = if g.is_empty() {
                    format!("api/{v}")
                } else {
                    format!("apis/{g}/{v}")
                };
                (key, (doc, hash))
            })
            .collect()
    })
}

/// `/openapi/v2`: every group/version's document as one Swagger 2.0 document, built once.
pub fn v2() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let (mut definitions, mut paths) = (Map::new(), Map::new());
        for (doc, _) in documents().values() {
            for (name, schema) in doc["components"]["schemas"].as_object().into_iter().flatten() {
                definitions.insert(name.clone(), v2_schema(schema));
            }
            for (path, item) in doc["paths"].as_object().into_iter().flatten() {
                paths.insert(path.clone(), v2_path_item(item));
            }
        }
        json!({
            "swagger": "2.0",
            "info": {"title": "Kubernetes", "version": format!("v1.{}.0", crate::discovery::KUBERNETES_MINOR)},
            "paths": paths,
            "definitions": definitions,
        })
    })
}

/// A v3 schema as Swagger 2.0 writes it: references to `#/definitions/`, a lone `allOf`
/// reference as the reference itself, int-or-string as kube's v2 spells it.
fn v2_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => {
                        let name = r.trim_start_matches("#/components/schemas/");
                        out.insert(k.clone(), json!(format!("#/definitions/{name}")));
                    }
                    ("allOf", Value::Array(all))
                        if all.len() == 1 && all[0].get("$ref").is_some() =>
                    {
                        if let Value::Object(inner) = v2_schema(&all[0]) {
                            out.extend(inner);
                        }
                    }
                    ("nullable", _) => {}
                    _ => {
                        out.insert(k.clone(), v2_schema(v));
                    }
                }
            }
            if out.get("x-kubernetes-int-or-string") == Some(&json!(true)) {
                out.insert("type".into(), json!("string"));
                out.insert("format".into(), json!("int-or-string"));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(v2_schema).collect()),
        other => other.clone(),
    }
}

/// A v3 parameter (`schema: {type}`) as a v2 one (`type` beside it).
fn v2_parameter(p: &Value) -> Value {
    let mut p = p.clone();
    if let Some(Value::Object(schema)) = p.as_object_mut().and_then(|m| m.remove("schema"))
        && let Some(map) = p.as_object_mut()
    {
        map.extend(schema);
    }
    p
}

fn v2_path_item(item: &Value) -> Value {
    let mut out = Map::new();
    for (k, v) in item.as_object().into_iter().flatten() {
        let converted = match k.as_str() {
            "parameters" => Value::Array(
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(v2_parameter)
                    .collect(),
            ),
            _ => v2_operation(v),
        };
        out.insert(k.clone(), converted);
    }
    Value::Object(out)
}

/// A v3 operation as a v2 one: the request body as a `body` parameter (its media types in
/// `consumes`), responses with their schema directly.
fn v2_operation(op: &Value) -> Value {
    let Value::Object(map) = op else {
        return op.clone();
    };
    let mut out = Map::new();
    let mut parameters: Vec<Value> = map
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(v2_parameter)
        .collect();
    if let Some(body) = map.get("requestBody") {
        let content = body["content"].as_object();
        let consumes: Vec<&String> = content.into_iter().flat_map(|c| c.keys()).collect();
        let schema = content
            .and_then(|c| c.values().next())
            .map(|m| v2_schema(&m["schema"]))
            .unwrap_or(json!({"type": "object"}));
        parameters.insert(
            0,
            json!({"name": "body", "in": "body", "required": body["required"].as_bool().unwrap_or(true), "schema": schema}),
        );
        out.insert("consumes".into(), json!(consumes));
    }
    let responses: Map<String, Value> = map
        .get("responses")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(code, r)| {
            let mut response = json!({"description": r["description"].clone()});
            if let Some(m) = r["content"].as_object().and_then(|c| c.values().next()) {
                response["schema"] = v2_schema(&m["schema"]);
            }
            (code.clone(), response)
        })
        .collect();
    for (k, v) in map {
        if !matches!(k.as_str(), "parameters" | "requestBody" | "responses") {
            out.insert(k.clone(), v.clone());
        }
    }
    out.insert("parameters".into(), Value::Array(parameters));
    out.insert("responses".into(), Value::Object(responses));
    out.insert(
        "produces".into(),
        json!(["application/json", "application/yaml"]),
    );
    out.insert("schemes".into(), json!(["https"]));
    Value::Object(out)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `/openapi/v3`: where each group/version's document is.
pub fn root() -> Value {
    let paths: Map<String, Value> = documents()
        .iter()
        .map(|(key, (_, hash))| {
            (
                key.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={hash}")}),
            )
        })
        .collect();
    json!({ "paths": paths })
}

/// `/openapi/v3/<key>`.
pub fn group_version(key: &str) -> Option<&'static Value> {
    documents().get(key).map(|(doc, _)| doc)
}

fn document(group: &str, version: &str) -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let resources: Vec<&ResourceDef> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    for r in &resources {
        (r.add_schema)(&mut generator);
    }
    add_subresource_schemas(&mut generator);
    let mut schemas = generator.take_definitions(true);
    schemas.insert(
        PATCH_SCHEMA.into(),
        json!({"type": "object", "description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body."}),
    );
    schemas
        .entry(DELETE_OPTIONS_SCHEMA.to_owned())
        .or_insert(json!({"type": "object"}));
    schemas
        .entry(STATUS_SCHEMA.to_owned())
        .or_insert(json!({"type": "object"}));
    for r in &resources {
        if let Some(Value::Object(schema)) = schemas.get_mut(r.schema) {
            schema.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": r.group, "kind": r.kind, "version": r.version}]),
            );
        }
    }
    for (name, kind, g, v) in [
        (
            "io.k8s.api.autoscaling.v1.Scale",
            "Scale",
            "autoscaling",
            "v1",
        ),
        ("io.k8s.api.core.v1.Binding", "Binding", "", "v1"),
    ] {
        if let Some(Value::Object(schema)) = schemas.get_mut(name) {
            schema.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": g, "kind": kind, "version": v}]),
            );
        }
    }
    annotate_patch_strategies(&mut schemas);
    let mut paths = Map::new();
    for r in &resources {
        add_paths(r, &mut paths);
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{}.0", crate::discovery::KUBERNETES_MINOR)},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

/// How strategic merge patches treat a field: (schema, property, patch strategy, merge key,
/// list map keys). These are the Go types' `patchStrategy`/`patchMergeKey`/`listMapKey` tags, as
/// kube-apiserver publishes them; kubectl apply reads them from here to compute its patches
/// (a list without them is atomic, replaced whole).
type PatchStrategy = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static [&'static str],
);

const PATCH_STRATEGIES: &[PatchStrategy] = &[
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "finalizers",
        "merge",
        None,
        &[],
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "ownerReferences",
        "merge",
        Some("uid"),
        &["uid"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "containers",
        "merge",
        Some("name"),
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "initContainers",
        "merge",
        Some("name"),
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "ephemeralContainers",
        "merge",
        Some("name"),
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "volumes",
        "merge,retainKeys",
        Some("name"),
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "imagePullSecrets",
        "merge",
        Some("name"),
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "hostAliases",
        "merge",
        Some("ip"),
        &["ip"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "ports",
        "merge",
        Some("containerPort"),
        &["containerPort", "protocol"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "env",
        "merge",
        Some("name"),
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeMounts",
        "merge",
        Some("mountPath"),
        &["mountPath"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeDevices",
        "merge",
        Some("devicePath"),
        &["devicePath"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "env",
        "merge",
        Some("name"),
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeMounts",
        "merge",
        Some("mountPath"),
        &["mountPath"],
    ),
    (
        "io.k8s.api.core.v1.ServiceSpec",
        "ports",
        "merge",
        Some("port"),
        &["port", "protocol"],
    ),
    (
        "io.k8s.api.core.v1.PodStatus",
        "conditions",
        "merge",
        Some("type"),
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "conditions",
        "merge",
        Some("type"),
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "addresses",
        "merge",
        Some("type"),
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.NamespaceStatus",
        "conditions",
        "merge",
        Some("type"),
        &["type"],
    ),
    (
        "io.k8s.api.apps.v1.DeploymentStatus",
        "conditions",
        "merge",
        Some("type"),
        &["type"],
    ),
    (
        "io.k8s.api.apps.v1.ReplicaSetStatus",
        "conditions",
        "merge",
        Some("type"),
        &["type"],
    ),
    (
        "io.k8s.api.apps.v1.DeploymentSpec",
        "strategy",
        "retainKeys",
        None,
        &[],
    ),
];

/// The patch strategy (`merge`, `retainKeys`, ...) and merge key of the field at `path`
/// (field names from the object's root, list indices left out) in objects of `kind`, as the
/// OpenAPI documents publish them: strategic merge patches follow the same table kubectl
/// reads to compute them.
pub fn patch_meta(kind: &str, path: &[&str]) -> (Option<&'static str>, Option<&'static str>) {
    let Some(prop) = property(kind, path) else {
        return (None, None);
    };
    let text = |name: &str| prop.get(name).and_then(Value::as_str);
    (
        text("x-kubernetes-patch-strategy"),
        text("x-kubernetes-patch-merge-key"),
    )
}

/// How server-side apply treats the field at `path` (as for [`patch_meta`]): a list is
/// `Atomic` unless its schema says `set` or `map` (with its keys); an object is a `Map` when
/// its schema has `additionalProperties` (labels, data), `Atomic` for the few structs kube
/// marks `x-kubernetes-map-type: atomic` (label selectors), else a struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldShape {
    Atomic,
    Set,
    ListMap(Vec<&'static str>),
    Map,
    Struct,
}

pub fn field_shape(kind: &str, path: &[&str]) -> FieldShape {
    let Some(prop) = property(kind, path) else {
        return FieldShape::Struct;
    };
    match prop.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => return FieldShape::Set,
        Some("map") => {
            let keys = prop
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            return FieldShape::ListMap(keys);
        }
        _ => {}
    }
    if prop.get("type").and_then(Value::as_str) == Some("array") || prop.get("items").is_some() {
        return FieldShape::Atomic;
    }
    if prop.get("additionalProperties").is_some() {
        return FieldShape::Map;
    }
    match schema_of(prop) {
        Some("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector") => FieldShape::Atomic,
        _ => FieldShape::Struct,
    }
}

/// The schema of the property at `path` in objects of `kind`.
fn property(kind: &str, path: &[&str]) -> Option<&'static Value> {
    let def = RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.conversion.is_none())?;
    let key = if def.group.is_empty() {
        format!("api/{}", def.version)
    } else {
        format!("apis/{}/{}", def.group, def.version)
    };
    let (doc, _) = documents().get(&key)?;
    let schemas = &doc["components"]["schemas"];
    let mut current = &schemas[def.schema];
    for (i, field) in path.iter().enumerate() {
        let prop = current.get("properties")?.get(*field)?;
        if i + 1 == path.len() {
            return Some(prop);
        }
        current = &schemas[schema_of(prop)?];
    }
    None
}

/// The schema a property refers to (through arrays' items and schemars' `allOf`/`anyOf`).
fn schema_of(prop: &Value) -> Option<&str> {
    if let Some(r) = prop.get("$ref").and_then(Value::as_str) {
        return r.strip_prefix("#/components/schemas/");
    }
    if let Some(items) = prop.get("items") {
        return schema_of(items);
    }
    ["allOf", "anyOf", "oneOf"]
        .iter()
        .filter_map(|k| prop.get(*k).and_then(Value::as_array))
        .flatten()
        .find_map(schema_of)
}

fn annotate_patch_strategies(schemas: &mut Map<String, Value>) {
    for (schema, property, strategy, key, map_keys) in PATCH_STRATEGIES {
        let Some(prop) = schemas
            .get_mut(*schema)
            .and_then(|s| s.pointer_mut(&format!("/properties/{property}")))
        else {
            continue;
        };
        let Some(prop) = prop.as_object_mut() else {
            continue;
        };
        prop.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
        if let Some(key) = key {
            prop.insert("x-kubernetes-patch-merge-key".into(), json!(key));
        }
        if !map_keys.is_empty() {
            prop.insert("x-kubernetes-list-type".into(), json!("map"));
            prop.insert("x-kubernetes-list-map-keys".into(), json!(map_keys));
        } else if *strategy == "merge" {
            prop.insert("x-kubernetes-list-type".into(), json!("set"));
        }
    }
}

fn reference(schema: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{schema}")})
}

fn query(name: &str, kind: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": kind}, "uniqueItems": true})
}

fn write_params() -> Vec<Value> {
    vec![
        query(
            "dryRun",
            "string",
            "When present, indicates that modifications should not be persisted.",
        ),
        query(
            "fieldManager",
            "string",
            "A name associated with the actor or entity that is making these changes.",
        ),
        query(
            "fieldValidation",
            "string",
            "Instructs the server on how to handle objects with unknown or duplicate fields: Ignore, Warn or Strict.",
        ),
    ]
}

fn list_params() -> Vec<Value> {
    vec![
        query(
            "allowWatchBookmarks",
            "boolean",
            "Requests watch events with type BOOKMARK.",
        ),
        query(
            "continue",
            "string",
            "The continue option should be set when retrieving more results from the server.",
        ),
        query(
            "fieldSelector",
            "string",
            "A selector to restrict the list of returned objects by their fields.",
        ),
        query(
            "labelSelector",
            "string",
            "A selector to restrict the list of returned objects by their labels.",
        ),
        query(
            "limit",
            "integer",
            "The maximum number of responses to return for a list call.",
        ),
        query(
            "resourceVersion",
            "string",
            "Sets a constraint on what resource versions a request may be served from.",
        ),
        query(
            "timeoutSeconds",
            "integer",
            "Timeout for the list/watch call.",
        ),
        query(
            "watch",
            "boolean",
            "Watch for changes to the described resources.",
        ),
    ]
}

fn ok(schema: &str) -> Value {
    json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference(schema)}}}})
}

fn operation(
    action: &str,
    id: String,
    gvk: (&str, &str, &str),
    params: Vec<Value>,
    body: Option<Value>,
    response: &str,
    group_version: &str,
) -> Value {
    let mut op = json!({
        "operationId": id,
        "tags": [group_version],
        "parameters": params,
        "responses": ok(response),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": gvk.0, "version": gvk.1, "kind": gvk.2},
    });
    if let Some(body) = body {
        op["requestBody"] = body;
    }
    op
}

fn json_body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": reference(schema)}}})
}

fn patch_body() -> Value {
    let content: Map<String, Value> = [
        "application/apply-patch+yaml",
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
    ]
    .iter()
    .map(|t| ((*t).to_owned(), json!({"schema": reference(PATCH_SCHEMA)})))
    .collect();
    json!({"required": true, "content": content})
}

fn add_paths(r: &ResourceDef, paths: &mut Map<String, Value>) {
    let prefix = format!("/{}", r.group_version_path());
    let (collection, item) = if r.namespaced {
        (
            format!("{prefix}/namespaces/{{namespace}}/{}", r.plural),
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
        )
    } else {
        (
            format!("{prefix}/{}", r.plural),
            format!("{prefix}/{}/{{name}}", r.plural),
        )
    };
    let gvk = (r.group, r.version, r.kind);
    let tag = r.api_version().replace('/', "_");
    let id = |verb: &str, what: &str| {
        format!(
            "{verb}{}{}{what}",
            capitalize(r.group.split('.').next().unwrap_or("core")),
            r.kind
        )
    };
    let path_param = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}, "uniqueItems": true});
    let scope_params: Vec<Value> = if r.namespaced {
        vec![path_param("namespace")]
    } else {
        vec![]
    };
    let writable = r.verbs.contains(&"create");

    let mut coll = json!({ "parameters": scope_params.clone() });
    coll["get"] = operation(
        "list",
        id("list", "List"),
        gvk,
        list_params(),
        None,
        r.schema,
        &tag,
    );
    if writable {
        coll["post"] = operation(
            "post",
            id("create", ""),
            gvk,
            write_params(),
            Some(json_body(r.schema)),
            r.schema,
            &tag,
        );
    }
    if r.verbs.contains(&"deletecollection") {
        coll["delete"] = operation(
            "deletecollection",
            id("deleteCollection", ""),
            gvk,
            list_params(),
            None,
            STATUS_SCHEMA,
            &tag,
        );
    }
    paths.insert(collection, coll);
    if r.namespaced {
        paths.insert(
            format!("{prefix}/{}", r.plural),
            json!({"get": operation("list", id("list", "ForAllNamespaces"), gvk, list_params(), None, r.schema, &tag)}),
        );
    }

    let mut item_params = vec![path_param("name")];
    item_params.extend(scope_params);
    let mut one = json!({ "parameters": item_params.clone() });
    one["get"] = operation("get", id("read", ""), gvk, vec![], None, r.schema, &tag);
    if writable {
        one["put"] = operation(
            "put",
            id("replace", ""),
            gvk,
            write_params(),
            Some(json_body(r.schema)),
            r.schema,
            &tag,
        );
        let mut patch_params = write_params();
        patch_params.push(query(
            "force",
            "boolean",
            "Force is going to \"force\" Apply requests.",
        ));
        one["patch"] = operation(
            "patch",
            id("patch", ""),
            gvk,
            patch_params,
            Some(patch_body()),
            r.schema,
            &tag,
        );
        one["delete"] = operation(
            "delete",
            id("delete", ""),
            gvk,
            vec![],
            Some(json_body(DELETE_OPTIONS_SCHEMA)),
            STATUS_SCHEMA,
            &tag,
        );
    }
    paths.insert(item.clone(), one);

    for s in r.subresources {
        paths.insert(
            format!("{item}/{}", s.name),
            subresource_path(r, s, item_params.clone(), &tag),
        );
    }
}

fn subresource_path(r: &ResourceDef, s: &Subresource, params: Vec<Value>, tag: &str) -> Value {
    let schema = match s.kind {
        "Scale" => "io.k8s.api.autoscaling.v1.Scale",
        "Binding" => "io.k8s.api.core.v1.Binding",
        _ => r.schema,
    };
    let gvk = (s.group, s.version, s.kind);
    let id = |verb: &str| {
        format!(
            "{verb}{}{}{}",
            capitalize(r.group.split('.').next().unwrap_or("core")),
            r.kind,
            capitalize(s.name)
        )
    };
    let mut path = json!({ "parameters": params });
    for verb in s.verbs {
        match *verb {
            "get" => path["get"] = operation("get", id("read"), gvk, vec![], None, schema, tag),
            "update" => {
                path["put"] = operation(
                    "put",
                    id("replace"),
                    gvk,
                    write_params(),
                    Some(json_body(schema)),
                    schema,
                    tag,
                )
            }
            "patch" => {
                path["patch"] = operation(
                    "patch",
                    id("patch"),
                    gvk,
                    write_params(),
                    Some(patch_body()),
                    schema,
                    tag,
                )
            }
            "create" => {
                path["post"] = operation(
                    "post",
                    id("create"),
                    gvk,
                    write_params(),
                    Some(json_body(schema)),
                    schema,
                    tag,
                )
            }
            _ => {}
        }
    }
    path
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_operations_carry_field_validation_and_the_kind() {
        let doc = group_version("apis/apps/v1").expect("apps/v1 is served");
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation" && p["in"] == "query")
        );
        assert!(
            patch["requestBody"]["content"]
                .get("application/strategic-merge-patch+json")
                .is_some()
        );
        let schema = &doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            schema["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        assert!(
            schema["properties"]["spec"].is_object(),
            "the schema comes from the type"
        );
        let containers =
            &doc["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(
            containers["x-kubernetes-patch-merge-key"], "name",
            "kubectl apply merges containers by name"
        );
    }

    #[test]
    fn the_root_points_at_every_group_version() {
        let root = root();
        for key in [
            "api/v1",
            "apis/apps/v1",
            "apis/discovery.k8s.io/v1",
            "apis/coordination.k8s.io/v1",
        ] {
            let url = root["paths"][key]["serverRelativeURL"].as_str().unwrap();
            assert!(
                url.starts_with(&format!("/openapi/v3/{key}?hash=")),
                "{url}"
            );
        }
    }
}
