//! HTTP: routes requests to discovery, OpenAPI and resources, decodes bodies and query
//! parameters, checks objects against their types (field validation), and encodes responses
//! (JSON objects, lists, Tables, watch streams, Status errors).

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use control_plane_store::Store;
use serde_json::{Value, json};

use crate::{
    auth::UserInfo,
    discovery,
    error::{ApiError, ApiResult, Cause},
    object::{name, namespace},
    openapi, patch,
    registry::{DeleteParams, ListParams, Registry},
    resources::{self, ResourceDef, Subresource, find},
    selector::{FieldSelector, LabelSelector, supported_fields},
    table::{table, wants_table},
    watch::{WatchParams, watch},
};

pub struct App<S: Store> {
    pub registry: Arc<Registry<S>>,
    /// Who requests come from.
    pub auth: crate::auth::Authenticator,
    /// What `/api` reports as the server's address.
    pub server_address: String,
    /// How `pods/log` reaches kubelets (none: it answers 503).
    pub kubelets: Option<crate::logs::Kubelets>,
    pub limits: Limits,
}

/// Most bytes of a request body (kube-apiserver's 3 MiB).
pub const MAX_BODY: usize = 3 << 20;
/// Longest a client may take to send its body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest a request that is not long-running (a watch, a followed log) may take, as
/// kube-apiserver's `--request-timeout`.
pub const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
/// What keeps one client from taking the whole server: requests (other than long-running
/// ones) served at once, and long-running requests (watches, followed logs) one client
/// address may hold open.
pub struct Limits {
    max_inflight: usize,
    inflight: Arc<tokio::sync::Semaphore>,
    max_long_running: usize,
    long_running: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
}

impl Limits {
    pub fn new(max_inflight: usize, max_long_running_per_client: usize) -> Self {
        Self {
            max_inflight,
            inflight: Arc::new(tokio::sync::Semaphore::new(max_inflight)),
            max_long_running: max_long_running_per_client,
            long_running: Arc::default(),
        }
    }
}

/// One long-running request of a client, counted while it lives.
struct LongRunning {
    counts: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
    client: std::net::IpAddr,
}

impl Limits {
    fn long_running(&self, client: std::net::IpAddr) -> Option<LongRunning> {
        let mut counts = self.long_running.lock().expect("not poisoned");
        let n = counts.entry(client).or_insert(0);
        if *n >= self.max_long_running {
            return None;
        }
        *n += 1;
        Some(LongRunning {
            counts: self.long_running.clone(),
            client,
        })
    }
}

impl Drop for LongRunning {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("not poisoned");
        if let Some(n) = counts.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

/// A resource request, parsed from the path.
struct Target {
    def: &'static ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<&'static Subresource>,
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).expect("serializes");
    let mut response = (code, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn flag(q: &HashMap<String, String>, key: &str) -> bool {
    matches!(q.get(key).map(String::as_str), Some("1" | "true" | "True"))
}

/// The entry point for every request: authenticated from its headers before its body is
/// read; the body capped ([`MAX_BODY`]) and timed ([`BODY_TIMEOUT`]); requests that are not
/// long-running limited in number ([`Limits`], then 429) and time ([`REQUEST_DEADLINE`],
/// then 504); long-running ones limited per client address.
pub async fn handle<S: Store>(
    State(app): State<Arc<App<S>>>,
    request: axum::extract::Request,
) -> Response {
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let (parts, body) = request.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let path = uri.path().trim_end_matches('/').to_owned();
    let public = matches!(
        path.as_str(),
        "/version" | "/healthz" | "/livez" | "/readyz"
    );
    // Who asks, and whether they may, before the body is read.
    let user = if public {
        None
    } else {
        match authorize(&app, &method, &uri, &path, &headers).await {
            Ok(user) => Some(user),
            Err(e) => return e.into_response(),
        }
    };
    let body = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Ok(Ok(body)) => body,
        Ok(Err(e)) if is_length_limit(&e) => return ApiError::too_large(MAX_BODY).into_response(),
        Ok(Err(e)) => return ApiError::bad_request(format!("read the body: {e}")).into_response(),
        Err(_) => {
            return ApiError::timeout(format!("the body did not arrive within {BODY_TIMEOUT:?}"))
                .into_response();
        }
    };
    if method == Method::GET && path == "/metrics" {
        return (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            crate::metrics::encode(),
        )
            .into_response();
    }
    let started = std::time::Instant::now();
    let (verb, resource) = classify(&method, &uri, &path);
    let long_running = verb == "WATCH"
        || (resource == "pods/log"
            && uri
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "follow=true")));
    let response = if long_running {
        let guard = match client.map(|c| app.limits.long_running(c)) {
            Some(None) => {
                return busy(format!(
                    "too many watches from this client (at most {})",
                    app.limits.max_long_running
                ));
            }
            guard => guard.flatten(),
        };
        let response = match route(&app, &method, &uri, &path, &headers, user.as_ref(), body).await
        {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
        // Counted while its body streams.
        response.map(|body| {
            let stream = futures::StreamExt::map(body.into_data_stream(), move |chunk| {
                let _held = &guard;
                chunk
            });
            axum::body::Body::from_stream(stream)
        })
    } else {
        let Ok(_permit) = app.limits.inflight.clone().try_acquire_owned() else {
            return busy(format!(
                "too many requests in flight (at most {}); retry",
                app.limits.max_inflight
            ));
        };
        let routed = route(&app, &method, &uri, &path, &headers, user.as_ref(), body);
        match tokio::time::timeout(REQUEST_DEADLINE, routed).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => e.into_response(),
            Err(_) => ApiError::timeout(format!(
                "the request did not complete within {REQUEST_DEADLINE:?}"
            ))
            .into_response(),
        }
    };
    crate::metrics::observe(
        verb,
        resource,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// 429 with the Retry-After client-go honours.
fn busy(message: String) -> Response {
    let mut response = ApiError::too_many_requests(message).into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        axum::http::HeaderValue::from_static("1"),
    );
    response
}

/// kube's verb of a resource request (`list`, `watch`, `deletecollection`, ...).
fn resource_verb(method: &Method, uri: &Uri, collection: bool) -> &'static str {
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    match *method {
        Method::GET | Method::HEAD if watch => "watch",
        Method::GET | Method::HEAD if collection => "list",
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if collection => "deletecollection",
        Method::DELETE => "delete",
        _ => "other",
    }
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect()
}

/// kube-apiserver's verb and resource of a request, for the metrics.
fn classify(method: &Method, uri: &Uri, path: &str) -> (&'static str, String) {
    let segments = segments(path);
    let Some(target) = parse_target(&segments) else {
        let verb = if *method == Method::GET {
            "GET"
        } else {
            "OTHER"
        };
        // Discovery, OpenAPI, health: by their first segment, not every path.
        let first = segments.first().copied().unwrap_or("");
        return (verb, format!("/{first}"));
    };
    let verb = match resource_verb(method, uri, target.name.is_none()) {
        "watch" => "WATCH",
        "list" => "LIST",
        "get" => "GET",
        "create" => "CREATE",
        "update" => "UPDATE",
        "patch" => "PATCH",
        "deletecollection" => "DELETECOLLECTION",
        "delete" => "DELETE",
        _ => "OTHER",
    };
    let resource = match target.sub {
        Some(sub) => format!("{}/{}", target.def.plural, sub.name),
        None => target.def.plural.to_owned(),
    };
    (verb, resource)
}

/// What a request does, for the authorizer: a resource request's verb, group, resource,
/// subresource, namespace and name (a watch of one object by `metadata.name` names it), or
/// a path and the HTTP method's verb.
fn attributes(method: &Method, uri: &Uri, path: &str) -> crate::rbac::Attributes {
    let segments = segments(path);
    let Some(target) = parse_target(&segments) else {
        let verb = match *method {
            Method::HEAD => "get".to_owned(),
            ref m => m.as_str().to_ascii_lowercase(),
        };
        return crate::rbac::Attributes {
            verb,
            path: Some(if path.is_empty() {
                "/".into()
            } else {
                path.into()
            }),
            ..Default::default()
        };
    };
    let verb = resource_verb(method, uri, target.name.is_none());
    let name = target.name.clone().or_else(|| {
        (verb == "watch" || verb == "list")
            .then(|| query(uri).get("fieldSelector").cloned())
            .flatten()
            .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_owned))
            .filter(|n| !n.contains(','))
    });
    // A namespace is in itself, as kube's request info has it: a RoleBinding in `team` can
    // grant reading the `team` Namespace.
    let namespace = match (target.namespace, target.def.kind, &target.name) {
        (Some(ns), ..) => ns,
        (None, "Namespace", Some(name)) if target.def.group.is_empty() => name.clone(),
        _ => String::new(),
    };
    crate::rbac::Attributes {
        verb: verb.to_owned(),
        path: None,
        api_group: target.def.group.to_owned(),
        resource: target.def.plural.to_owned(),
        subresource: target.sub.map(|s| s.name.to_owned()).unwrap_or_default(),
        namespace,
        name: name.unwrap_or_default(),
    }
}

/// The user a request acts as (after impersonation), if it may do what it asks: 401 for no
/// user, 403 for a user without the permission.
async fn authorize<S: Store>(
    app: &App<S>,
    method: &Method,
    uri: &Uri,
    path: &str,
    headers: &HeaderMap,
) -> ApiResult<UserInfo> {
    let user = app
        .auth
        .authenticate(&app.registry, headers)
        .await
        .ok_or_else(ApiError::unauthorized)?;
    let user = crate::auth::impersonated(&app.registry, user, headers).await?;
    let attrs = attributes(method, uri, path);
    if crate::rbac::allowed(&app.registry, &user, &attrs).await? {
        Ok(user)
    } else {
        Err(crate::rbac::forbidden(&user, &attrs))
    }
}

/// Answers a review: created, never stored. `SelfSubjectReview` (`kubectl auth whoami`) says
/// who asks; `SelfSubjectAccessReview` (`kubectl auth can-i`) whether they may do what its
/// spec says; `SelfSubjectRulesReview` (`kubectl auth can-i --list`) what they may do in a
/// namespace.
async fn review<S: Store>(
    registry: &Registry<S>,
    def: &ResourceDef,
    user: &UserInfo,
    body: Value,
) -> ApiResult<Response> {
    let mut answer = body;
    answer["apiVersion"] = json!(def.api_version());
    answer["kind"] = json!(def.kind);
    answer["metadata"] = json!({"creationTimestamp": null});
    let spec = answer.get("spec").cloned().unwrap_or(json!({}));
    let text = |field: &str| {
        spec.pointer(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    answer["status"] = match def.kind {
        "SelfSubjectReview" => json!({"userInfo": user.to_json()}),
        "SelfSubjectRulesReview" => {
            let namespace = text("/namespace");
            let rules = crate::rbac::rules(registry, user, &namespace).await?;
            let (mut resource_rules, mut non_resource_rules) = (Vec::new(), Vec::new());
            for rule in rules {
                let mut rule = rule.clone();
                if let Some(m) = rule.as_object_mut() {
                    m.retain(|_, v| v.as_array().is_some_and(|a| !a.is_empty()));
                }
                if rule.get("nonResourceURLs").is_some() {
                    non_resource_rules.push(rule);
                } else {
                    resource_rules.push(rule);
                }
            }
            json!({"resourceRules": resource_rules, "nonResourceRules": non_resource_rules,
                "incomplete": false})
        }
        _ => {
            let attrs = if spec.get("nonResourceAttributes").is_some() {
                crate::rbac::Attributes {
                    verb: text("/nonResourceAttributes/verb"),
                    path: Some(text("/nonResourceAttributes/path")),
                    ..Default::default()
                }
            } else {
                crate::rbac::Attributes {
                    verb: text("/resourceAttributes/verb"),
                    path: None,
                    api_group: text("/resourceAttributes/group"),
                    resource: text("/resourceAttributes/resource"),
                    subresource: text("/resourceAttributes/subresource"),
                    namespace: text("/resourceAttributes/namespace"),
                    name: text("/resourceAttributes/name"),
                }
            };
            if crate::rbac::allowed(registry, user, &attrs).await? {
                json!({"allowed": true, "reason": if user.is_superuser() {
                    "the user is in system:masters"
                } else {
                    "allowed by a role bound to the user"
                }})
            } else {
                json!({"allowed": false})
            }
        }
    };
    Ok(json_response(StatusCode::CREATED, &answer))
}

/// An update of an RBAC object by a function of the current one, with kube's escalation
/// check. The check needs the store (async), which a retried update function cannot reach:
/// the new object is checked, then written only over the revision it was made from (a 409
/// if another write came between).
#[expect(
    clippy::too_many_arguments,
    reason = "the object's place, the user, and the update"
)]
async fn checked_rbac_update<S: Store>(
    reg: &Registry<S>,
    user: &UserInfo,
    def: &ResourceDef,
    ns: Option<&str>,
    name: &str,
    sub: Option<&Subresource>,
    dry: bool,
    update: impl Fn(&Value) -> ApiResult<Value>,
) -> ApiResult<Value> {
    let current = reg.get(def, ns, name).await?;
    let mut updated = update(&current)?;
    updated["metadata"]["resourceVersion"] = current
        .pointer("/metadata/resourceVersion")
        .cloned()
        .unwrap_or_default();
    crate::rbac::check_escalation(reg, user, def.kind, ns.unwrap_or(""), &updated).await?;
    reg.update(def, ns, name, updated, sub, dry).await
}

/// A server-side apply (`application/apply-patch+yaml`, JSON or YAML): the object created
/// (201) or updated (200) as [`crate::managed::apply`] merges it, the conflicts a 409.
async fn server_side_apply<S: Store>(
    app: &Arc<App<S>>,
    target: &Target,
    name: &str,
    sub: Option<&'static Subresource>,
    q: &HashMap<String, String>,
    user: &UserInfo,
    body: &Bytes,
) -> ApiResult<Response> {
    use crate::managed::{Writer, apply, writing_as};
    let (def, reg, ns) = (target.def, &app.registry, target.namespace.as_deref());
    let manager = q
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "PATCH requests with apply content type must specify fieldManager",
            )
        })?;
    let manager = crate::managed::manager_of(Some(manager), None)?;
    if sub.is_some_and(|s| s.name != "status") {
        return Err(ApiError::method_not_allowed(
            "server-side apply is served on the resource and its status",
        ));
    }
    let sub_name = sub.map(|s| s.name);
    let applied: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => serde_norway::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("the applied object does not parse: {e}"))
        })?,
    };
    if applied.pointer("/metadata/managedFields").is_some() {
        return Err(ApiError::bad_request(
            "metadata.managedFields must be nil in an applied configuration",
        ));
    }
    // Checked as any object, but applied as sent: the typed form fills in empty required
    // fields (`spec.selector: {}`), which the manager would then claim.
    let (_, warnings) = check_object(def.kind, &def.api_version(), def.typed, applied.clone(), q)?;
    if crate::object::name(&applied) != Some(name) {
        return Err(ApiError::bad_request(format!(
            "the name of the applied object ({}) does not match the name on the URL ({name})",
            crate::object::name(&applied).unwrap_or_default()
        )));
    }
    let applied = def.to_storage(applied);
    let (force, dry) = (flag(q, "force"), dry_run(q)?);
    let exists = match reg.get(def, ns, name).await {
        Ok(_) => true,
        Err(e) if e.reason == "NotFound" => false,
        Err(e) => return Err(e),
    };
    let one = |live: &Value| apply(def, Some(live), &applied, &manager, force, sub_name);
    let (code, object) = if !exists {
        let created = apply(def, None, &applied, &manager, force, sub_name)?;
        if def.group == crate::rbac::GROUP {
            crate::rbac::check_escalation(reg, user, def.kind, ns.unwrap_or(""), &created).await?;
        }
        let created = writing_as(Writer::Apply, reg.create(def, ns, created, dry)).await?;
        (StatusCode::CREATED, created)
    } else if def.group == crate::rbac::GROUP {
        let update = checked_rbac_update(reg, user, def, ns, name, sub, dry, one);
        (StatusCode::OK, writing_as(Writer::Apply, update).await?)
    } else {
        let update = reg.guaranteed_update(def, ns, name, sub, dry, one);
        (StatusCode::OK, writing_as(Writer::Apply, update).await?)
    };
    Ok(with_warnings(
        json_response(code, &def.from_storage(object)),
        &warnings,
    ))
}

/// A JSON answer in protobuf, for a client that prefers it; left in JSON when the object
/// holds what the protobuf table cannot say.
async fn as_protobuf(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes() == b"application/json");
    if !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::internal("a response body could not be read").into_response();
    };
    let encoded = serde_json::from_slice::<Value>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|v| crate::protobuf::encode(&v));
    match encoded {
        Ok(pb) => {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::protobuf::MEDIA_TYPE),
            );
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, axum::body::Body::from(pb))
        }
        Err(e) => {
            tracing::debug!(error = %e, "answered in JSON, not protobuf");
            Response::from_parts(parts, axum::body::Body::from(bytes))
        }
    }
}

/// Whether an Accept header lets the answer be JSON.
fn accepts_json(accept: &str) -> bool {
    accept.split(',').any(|t| {
        let t = t.split(';').next().unwrap_or("").trim();
        t.is_empty() || t == "*/*" || t == "application/*" || t.starts_with("application/json")
    })
}

/// What the client takes (JSON when it does not say).
fn accept_of(headers: &HeaderMap) -> &str {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
}

/// How long a readiness check waits for the store.
const STORE_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

async fn route<S: Store>(
    app: &Arc<App<S>>,
    method: &Method,
    uri: &Uri,
    path: &str,
    headers: &HeaderMap,
    user: Option<&UserInfo>,
    body: Bytes,
) -> ApiResult<Response> {
    let accept = accept_of(headers);
    let segments = segments(path);
    if *method == Method::GET {
        match segments.as_slice() {
            ["version"] => return Ok(json_response(StatusCode::OK, &discovery::version())),
            ["livez"] => return Ok((StatusCode::OK, "ok").into_response()),
            // Ready (and healthy) only while the store answers, as kube-apiserver's etcd check.
            ["healthz" | "readyz"] => {
                let store = tokio::time::timeout(STORE_CHECK, app.registry.store.revision()).await;
                return Ok(match store {
                    Ok(Ok(_)) => (StatusCode::OK, "ok").into_response(),
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => format!("{e:#}"),
                            _ => format!("no answer within {STORE_CHECK:?}"),
                        };
                        tracing::warn!(reason = %why, "readiness: the store failed");
                        (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "[-]etcd failed: reason withheld\nreadyz check failed\n",
                        )
                            .into_response()
                    }
                });
            }
            ["api"] | ["apis"] => {
                let core = segments[0] == "api";
                if let Some(media) = discovery::aggregated_media_type(accept) {
                    let version = if media.contains("v=v2beta1") {
                        "apidiscovery.k8s.io/v2beta1"
                    } else {
                        "apidiscovery.k8s.io/v2"
                    };
                    let mut response =
                        json_response(StatusCode::OK, &discovery::aggregated(core, version));
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
                    return Ok(response);
                }
                let body = if core {
                    discovery::api_versions(&app.server_address)
                } else {
                    discovery::api_group_list()
                };
                return Ok(json_response(StatusCode::OK, &body));
            }
            ["api", version] => {
                return discovery::resource_list("", version)
                    .map(|b| json_response(StatusCode::OK, &b))
                    .ok_or_else(|| ApiError::not_found_path(path));
            }
            ["apis", group] => {
                return discovery::group(group)
                    .map(|b| json_response(StatusCode::OK, &b))
                    .ok_or_else(|| ApiError::not_found_path(path));
            }
            ["apis", group, version] => {
                return discovery::resource_list(group, version)
                    .map(|b| json_response(StatusCode::OK, &b))
                    .ok_or_else(|| ApiError::not_found_path(path));
            }
            ["openapi", "v3"] => return Ok(json_response(StatusCode::OK, &openapi::root())),
            ["openapi", "v2"] => {
                // Served as JSON; a client that only takes the protobuf form is told so (406)
                // rather than handed what it cannot read.
                if !accepts_json(accept) {
                    return Err(ApiError::not_acceptable(
                        "only application/json is served for /openapi/v2",
                    ));
                }
                return Ok(json_response(StatusCode::OK, openapi::v2()));
            }
            ["openapi", "v3", rest @ ..] => {
                let key = rest.join("/");
                return openapi::group_version(&key)
                    .map(|doc| json_response(StatusCode::OK, doc))
                    .ok_or_else(|| ApiError::not_found_path(path));
            }
            _ => {}
        }
    }
    let target = parse_target(&segments).ok_or_else(|| ApiError::not_found_path(path))?;
    let q = query(uri);
    let user = user.ok_or_else(ApiError::unauthorized)?;
    // Answers are JSON, or protobuf where the client prefers it and the object can be said
    // in it (watches and tables are JSON): a client that takes protobuf alone is told so
    // rather than handed what it might not read. client-go and kubectl accept both.
    if !accepts_json(accept) {
        return Err(ApiError::not_acceptable(format!(
            "answers are application/json, and protobuf where the client lists it first beside JSON (Accept: {accept})"
        )));
    }
    // The manager of a write's fields (managedFields); a DELETE (which can end in an update,
    // a finalizer's) is named by its User-Agent.
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    let manager = if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        crate::managed::manager_of(q.get("fieldManager").map(String::as_str), user_agent)?
    } else {
        crate::managed::manager_of(None, user_agent).unwrap_or_else(|_| "unknown".into())
    };
    let response = crate::managed::writing_as(
        crate::managed::Writer::Update(manager),
        resource(app, method, &target, &q, headers, user, body),
    )
    .await?;
    let streaming = flag(&q, "watch") || target.sub.is_some_and(|s| s.name == "log");
    if crate::protobuf::preferred(accept) && !streaming {
        return Ok(as_protobuf(response).await);
    }
    Ok(response)
}

/// Parses `/api/v1/...` or `/apis/<group>/<version>/...` into a resource target.
fn parse_target(segments: &[&str]) -> Option<Target> {
    let (group, version, rest) = match segments {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let owned = |s: &&str| (*s).to_owned();
    // /namespaces/{ns}/{plural}[/{name}[/{sub}]] for namespaced resources.
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(def) = find(group, version, plural).filter(|d| d.namespaced)
    {
        return build(
            def,
            Some((*ns).to_owned()),
            tail.first().map(owned),
            tail.get(1).copied(),
            tail.len(),
        );
    }
    let [plural, tail @ ..] = rest else {
        return None;
    };
    let def = find(group, version, plural)?;
    build(
        def,
        None,
        tail.first().map(owned),
        tail.get(1).copied(),
        tail.len(),
    )
}

fn build(
    def: &'static ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<&str>,
    len: usize,
) -> Option<Target> {
    if len > 2 {
        return None;
    }
    let sub = match sub {
        Some(s) => Some(def.subresource(s)?),
        None => None,
    };
    Some(Target {
        def,
        namespace,
        name,
        sub,
    })
}

/// Decodes a request body (JSON, or Kubernetes' protobuf) into an object.
fn decode_body(headers: &HeaderMap, body: &Bytes) -> ApiResult<Value> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let base = content_type.split(';').next().unwrap_or("").trim();
    if base == crate::protobuf::MEDIA_TYPE {
        return crate::protobuf::decode(body)
            .map_err(|e| ApiError::bad_request(format!("the protobuf body does not decode: {e}")));
    }
    if !base.is_empty() && base != "application/json" && base != "*/*" {
        return Err(ApiError::unsupported_media_type(content_type));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

/// Paths in `input` (objects only) that are absent from `typed`: fields the type does not know.
fn unknown_fields(input: &Value, typed: &Value, at: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match b.get(k) {
                    Some(t) => unknown_fields(v, t, &path, out),
                    None if !v.is_null() => out.push(path),
                    None => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, t)) in a.iter().zip(b).enumerate() {
                unknown_fields(v, t, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Checks an object against its type: apiVersion and kind, shape, unknown fields (rejected
/// with `fieldValidation=Strict`, warned with `Warn`). Returns the typed object and warnings.
fn check_object(
    kind: &str,
    api_version: &str,
    typed: fn(&Value) -> Result<Value, String>,
    mut obj: Value,
    q: &HashMap<String, String>,
) -> ApiResult<(Value, Vec<String>)> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    let version = api_version.rsplit('/').next().unwrap_or(api_version);
    for (field, expected) in [("kind", kind), ("apiVersion", api_version)] {
        match obj.get(field).and_then(Value::as_str) {
            None | Some("") => obj[field] = json!(expected),
            Some(got) if got != expected => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({}) does not match the expected API version ({api_version}) or kind ({})",
                    obj.get("apiVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                    obj.get("kind").and_then(Value::as_str).unwrap_or_default()
                )));
            }
            _ => {}
        }
    }
    let undecodable = |e: String| {
        ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: {e}"
        ))
    };
    let normalized = typed(&obj).map_err(undecodable)?;
    // A quantity that does not parse fails decoding, as in kube-apiserver (a 400, not 422).
    for (_, q) in crate::validation::quantities(kind, &normalized) {
        crate::validation::quantity(q).map_err(undecodable)?;
    }
    let mut unknown = Vec::new();
    unknown_fields(&obj, &normalized, "", &mut unknown);
    let mode = q
        .get("fieldValidation")
        .map(String::as_str)
        .unwrap_or("Warn");
    let messages: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    match mode {
        "Strict" if !messages.is_empty() => Err(ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
            messages.join(", ")
        ))),
        "Ignore" => Ok((normalized, Vec::new())),
        "Strict" | "Warn" | "" => Ok((normalized, messages)),
        other => Err(ApiError::bad_request(format!(
            "fieldValidation must be one of Ignore, Warn or Strict, got {other:?}"
        ))),
    }
}

fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "\\\""))) {
            response.headers_mut().append(header::WARNING, v);
        }
    }
    response
}

fn list_params(target: &Target, q: &HashMap<String, String>) -> ApiResult<ListParams> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    // Selectors apply to stored objects: a served form's field names are translated.
    let raw = q.get("fieldSelector").map(String::as_str).unwrap_or("");
    let stored: Vec<String> = raw
        .split(',')
        .map(|term| {
            let at = term.find(['=', '!']).unwrap_or(term.len());
            format!(
                "{}{}",
                target.def.stored_field(term[..at].trim()),
                &term[at..]
            )
        })
        .collect();
    let fields = FieldSelector::parse(&stored.join(","), &supported_fields(target.def.plural))
        .map_err(ApiError::bad_request)?;
    let limit = match q.get("limit").filter(|l| !l.is_empty()) {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        )
        .filter(|l| *l > 0),
        None => None,
    };
    Ok(ListParams {
        labels,
        fields,
        limit,
        continue_token: q.get("continue").filter(|c| !c.is_empty()).cloned(),
        resource_version: q.get("resourceVersion").cloned(),
        resource_version_match: q.get("resourceVersionMatch").cloned(),
    })
}

/// ListOptions combinations kube-apiserver refuses (`ValidateListOptions`), as it refuses
/// them: 422 Invalid, kind ListOptions. Returns `sendInitialEvents`.
fn validate_list_options(q: &HashMap<String, String>, watch: bool) -> ApiResult<Option<bool>> {
    let given = |key: &str| q.get(key).map(String::as_str).filter(|v| !v.is_empty());
    let send_initial_events = match given("sendInitialEvents") {
        None => None,
        Some("true" | "1") => Some(true),
        Some("false" | "0") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "sendInitialEvents: invalid boolean {other:?}"
            )));
        }
    };
    let (rv, rv_match, continued) = (
        given("resourceVersion"),
        given("resourceVersionMatch"),
        given("continue").is_some(),
    );
    let mut causes = Vec::new();
    let forbidden = |causes: &mut Vec<Cause>, field: &str, why: &str| {
        causes.push(Cause::forbidden(field, why));
    };
    if continued && rv_match.is_some() {
        forbidden(
            &mut causes,
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden when continue is provided",
        );
    }
    if watch {
        if let Some(initial) = send_initial_events {
            if rv_match != Some("NotOlderThan") {
                forbidden(
                    &mut causes,
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                );
            }
            if initial && !flag(q, "allowWatchBookmarks") {
                forbidden(
                    &mut causes,
                    "allowWatchBookmarks",
                    "sendInitialEvents requires allowWatchBookmarks (the end of the initial events is a bookmark)",
                );
            }
        }
        if let Some(m) = rv_match {
            if send_initial_events.is_none() {
                forbidden(
                    &mut causes,
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                );
            }
            if m != "NotOlderThan" {
                causes.push(Cause::not_supported(
                    "resourceVersionMatch",
                    m,
                    &["NotOlderThan"],
                ));
            }
        }
    } else {
        if let Some(m) = rv_match {
            if rv.is_none() {
                forbidden(
                    &mut causes,
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                );
            }
            if !["Exact", "NotOlderThan"].contains(&m) {
                causes.push(Cause::not_supported(
                    "resourceVersionMatch",
                    m,
                    &["Exact", "NotOlderThan", ""],
                ));
            }
            if m == "Exact" && rv == Some("0") {
                forbidden(
                    &mut causes,
                    "resourceVersionMatch",
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                );
            }
        }
        if send_initial_events.is_some() {
            forbidden(
                &mut causes,
                "sendInitialEvents",
                "sendInitialEvents is forbidden for list",
            );
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid("meta.k8s.io", "ListOptions", "", causes));
    }
    Ok(send_initial_events)
}

fn list_body(def: &ResourceDef, items: Vec<Value>, meta: Value, accept: &str) -> Value {
    if wants_table(accept) {
        return table(def.kind, &items, meta, true);
    }
    let items: Vec<Value> = items.into_iter().map(|i| def.from_storage(i)).collect();
    json!({
        "kind": def.list_kind(),
        "apiVersion": def.api_version(),
        "metadata": meta,
        "items": items,
    })
}

fn object_body(def: &ResourceDef, obj: Value, accept: &str) -> Value {
    if wants_table(accept) {
        let rv = obj
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(json!(""));
        return table(def.kind, &[obj], json!({"resourceVersion": rv}), true);
    }
    def.from_storage(obj)
}

/// DeleteOptions, from the query and the body (where client-go sends them, `dryRun`
/// included).
fn delete_params(
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<DeleteParams> {
    let mut params = DeleteParams {
        grace_period_seconds: q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()),
        propagation_policy: q.get("propagationPolicy").cloned(),
        dry_run: dry_run(q)?,
        ..DeleteParams::default()
    };
    if !body.is_empty() {
        let options = decode_body(headers, body)?;
        if let Some(g) = options.get("gracePeriodSeconds").and_then(Value::as_i64) {
            params.grace_period_seconds = Some(g);
        }
        if let Some(p) = options.get("propagationPolicy").and_then(Value::as_str) {
            params.propagation_policy = Some(p.to_owned());
        }
        params.precondition_uid = options
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_owned);
        params.precondition_resource_version = options
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned);
        for value in options
            .get("dryRun")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            params.dry_run |= dry_run_value(value.as_str().unwrap_or_default())?;
        }
    }
    if params.propagation_policy.is_none()
        && let Some(orphan) = orphan_dependents(q, body)
    {
        params.propagation_policy = Some(if orphan { "Orphan" } else { "Background" }.into());
    }
    if let Some(p) = &params.propagation_policy
        && !["Orphan", "Background", "Foreground"].contains(&p.as_str())
    {
        return Err(ApiError::bad_request(format!(
            "propagationPolicy must be Orphan, Background or Foreground, got {p:?}"
        )));
    }
    Ok(params)
}

/// The deprecated `orphanDependents` delete option, from the query or the body.
fn orphan_dependents(q: &HashMap<String, String>, body: &Bytes) -> Option<bool> {
    q.get("orphanDependents")
        .and_then(|v| v.parse().ok())
        .or_else(|| {
            serde_json::from_slice::<Value>(body)
                .ok()?
                .get("orphanDependents")?
                .as_bool()
        })
}

fn success_status(def: &ResourceDef, name: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
        "details": {"name": name, "group": def.group, "kind": def.plural},
    })
}

/// A Scale view of a workload.
fn scale_of(obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector")
        .and_then(|s| LabelSelector::from_label_selector(s).ok())
        .map(|s| s.to_display())
        .unwrap_or_default();
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"), "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": selector},
    })
}

/// The workload with a Scale's replicas (and its resourceVersion as the precondition).
fn apply_scale(workload: &Value, scale: &Value) -> ApiResult<Value> {
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| ApiError::bad_request("a Scale needs spec.replicas"))?;
    if replicas < 0 {
        return Err(ApiError::invalid(
            "autoscaling",
            "Scale",
            name(workload).unwrap_or_default(),
            vec![crate::error::Cause::invalid(
                "spec.replicas",
                replicas,
                "must be greater than or equal to 0",
            )],
        ));
    }
    let mut updated = workload.clone();
    updated["spec"]["replicas"] = json!(replicas);
    match scale
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    {
        Some(rv) => updated["metadata"]["resourceVersion"] = json!(rv),
        None => {
            if let Some(m) = updated.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
        }
    }
    Ok(updated)
}

fn apply_patch(
    kind: &str,
    content_type: &str,
    current: &Value,
    patch_body: &Value,
) -> ApiResult<Value> {
    let base = content_type.split(';').next().unwrap_or("").trim();
    let bad = |e: String| ApiError::bad_request(e);
    match base {
        "application/json-patch+json" => {
            patch::json_patch(current.clone(), patch_body).map_err(bad)
        }
        "application/merge-patch+json" => Ok(patch::merge_patch(current.clone(), patch_body)),
        "application/strategic-merge-patch+json" => {
            patch::strategic_merge(kind, current.clone(), patch_body).map_err(bad)
        }
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

async fn resource<S: Store>(
    app: &Arc<App<S>>,
    method: &Method,
    target: &Target,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    user: &UserInfo,
    body: Bytes,
) -> ApiResult<Response> {
    let accept = accept_of(headers);
    let def = target.def;
    let reg = &app.registry;
    let ns = target.namespace.as_deref();
    if def.namespaced && target.namespace.is_none() && target.name.is_some() {
        return Err(ApiError::not_found_path(
            "a namespaced resource needs /namespaces/<namespace>/",
        ));
    }
    let allowed = |verb: &str| -> ApiResult<()> {
        let verbs = target.sub.map_or(def.verbs, |s| s.verbs);
        if verbs.contains(&verb) {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({verb})"
            )))
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let dry = dry_run(q)?;

    match (method.clone(), target.name.as_deref(), target.sub) {
        (Method::GET, Some(name), Some(sub)) if sub.name == "log" => {
            crate::logs::pod_log(reg, app.kubelets.as_ref(), ns.unwrap_or("default"), name, q).await
        }
        (Method::GET, None, None) => {
            let params = list_params(target, q)?;
            let watching = flag(q, "watch");
            let send_initial_events = validate_list_options(q, watching)?;
            if watching {
                allowed("watch")?;
                let timeout = q
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                    .map(Duration::from_secs);
                let wp = WatchParams {
                    list: params,
                    allow_bookmarks: flag(q, "allowWatchBookmarks"),
                    send_initial_events,
                    timeout,
                    table: wants_table(accept),
                };
                return watch(reg.clone(), def, target.namespace.clone(), wp).await;
            }
            allowed("list")?;
            let (items, meta) = reg.list(def, ns, &params).await?;
            Ok(json_response(
                StatusCode::OK,
                &list_body(def, items, meta.to_json(), accept),
            ))
        }
        (Method::GET, Some(name), None) => {
            allowed("get")?;
            let obj = reg.get(def, ns, name).await?;
            Ok(json_response(
                StatusCode::OK,
                &object_body(def, obj, accept),
            ))
        }
        (Method::GET, Some(name), Some(sub)) => {
            allowed("get")?;
            let obj = reg.get(def, ns, name).await?;
            let body = if sub.name == "scale" {
                scale_of(&obj)
            } else {
                obj
            };
            Ok(json_response(StatusCode::OK, &body))
        }
        (Method::POST, None, None)
            if matches!(
                def.kind,
                "SelfSubjectReview" | "SelfSubjectAccessReview" | "SelfSubjectRulesReview"
            ) =>
        {
            review(reg, def, user, decode_body(headers, &body)?).await
        }
        (Method::POST, Some(name), Some(sub)) if sub.name == "token" => {
            let request = decode_body(headers, &body)?;
            let (request, _) = check_object(
                "TokenRequest",
                "authentication.k8s.io/v1",
                |v| resources::typed_subresource("TokenRequest", v),
                request,
                q,
            )?;
            let answer = app
                .auth
                .token_request(reg, ns.unwrap_or("default"), name, request, dry)
                .await?;
            Ok(json_response(StatusCode::CREATED, &answer))
        }
        (Method::POST, None, None) => {
            allowed("create")?;
            let (obj, warnings) = check_object(
                def.kind,
                &def.api_version(),
                def.typed,
                decode_body(headers, &body)?,
                q,
            )?;
            if let Some(obj_ns) = namespace(&obj)
                && ns.is_some_and(|n| n != obj_ns)
            {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            if def.group == crate::rbac::GROUP {
                crate::rbac::check_escalation(reg, user, def.kind, ns.unwrap_or(""), &obj).await?;
            }
            let created = reg.create(def, ns, def.to_storage(obj), dry).await?;
            Ok(with_warnings(
                json_response(StatusCode::CREATED, &def.from_storage(created)),
                &warnings,
            ))
        }
        (Method::POST, Some(name), Some(sub)) if sub.name == "binding" => {
            allowed("create")?;
            let (binding, _) = check_object(
                "Binding",
                "v1",
                |v| resources::typed_subresource("Binding", v),
                decode_body(headers, &body)?,
                q,
            )?;
            let node = binding
                .pointer("/target/name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "",
                        "Binding",
                        name,
                        vec![crate::error::Cause::required("target.name")],
                    )
                })?
                .to_owned();
            reg.bind(def, ns, name, sub, &node, dry)
                .await
            .map(|_| json_response(StatusCode::CREATED, &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})))
        }
        (Method::PUT, Some(name), sub) => {
            allowed("update")?;
            if let Some(s) = sub.filter(|s| s.name == "scale") {
                let (scale, _) = check_object(
                    "Scale",
                    "autoscaling/v1",
                    |v| resources::typed_subresource("Scale", v),
                    decode_body(headers, &body)?,
                    q,
                )?;
                let updated = reg
                    .guaranteed_update(def, ns, name, None, dry, |w| apply_scale(w, &scale))
                    .await?;
                let _ = s;
                return Ok(json_response(StatusCode::OK, &scale_of(&updated)));
            }
            let (obj, warnings) = check_object(
                def.kind,
                &def.api_version(),
                def.typed,
                decode_body(headers, &body)?,
                q,
            )?;
            if def.group == crate::rbac::GROUP {
                crate::rbac::check_escalation(reg, user, def.kind, ns.unwrap_or(""), &obj).await?;
            }
            let updated = reg
                .update(def, ns, name, def.to_storage(obj), sub, dry)
                .await?;
            Ok(with_warnings(
                json_response(StatusCode::OK, &def.from_storage(updated)),
                &warnings,
            ))
        }
        (Method::PATCH, Some(name), sub) if content_type.starts_with("application/apply-patch") => {
            allowed("patch")?;
            server_side_apply(app, target, name, sub, q, user, &body).await
        }
        (Method::PATCH, Some(name), sub) => {
            allowed("patch")?;
            let patch_body: Value = serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request(format!("invalid patch body: {e}")))?;
            let is_scale = sub.is_some_and(|s| s.name == "scale");
            let strict_q = q.clone();
            let mut warnings = Vec::new();
            let warnings_cell = std::sync::Mutex::new(&mut warnings);
            let patch_one = |current: &Value| -> ApiResult<Value> {
                let unconditional = patch_body.pointer("/metadata/resourceVersion").is_none();
                if is_scale {
                    let mut scale = scale_of(current);
                    if unconditional
                        && let Some(m) = scale.get_mut("metadata").and_then(Value::as_object_mut)
                    {
                        m.remove("resourceVersion");
                    }
                    let scale = apply_patch("Scale", &content_type, &scale, &patch_body)?;
                    return apply_scale(current, &scale);
                }
                let mut current = def.from_storage(current.clone());
                if unconditional
                    && let Some(m) = current.get_mut("metadata").and_then(Value::as_object_mut)
                {
                    // Without a resourceVersion in the patch, it applies to the latest.
                    m.remove("resourceVersion");
                }
                let patched = apply_patch(def.kind, &content_type, &current, &patch_body)?;
                let (checked, w) =
                    check_object(def.kind, &def.api_version(), def.typed, patched, &strict_q)?;
                **warnings_cell.lock().unwrap() = w;
                Ok(def.to_storage(checked))
            };
            let updated = if def.group == crate::rbac::GROUP {
                checked_rbac_update(reg, user, def, ns, name, sub, dry, patch_one).await?
            } else {
                reg.guaranteed_update(
                    def,
                    ns,
                    name,
                    sub.filter(|s| s.name != "scale"),
                    dry,
                    patch_one,
                )
                .await?
            };
            let body = if is_scale {
                scale_of(&updated)
            } else {
                def.from_storage(updated)
            };
            Ok(with_warnings(
                json_response(StatusCode::OK, &body),
                &warnings,
            ))
        }
        (Method::DELETE, Some(name), None) => {
            allowed("delete")?;
            let params = delete_params(q, headers, &body)?;
            let (obj, gone) = reg.delete(def, ns, name, &params).await?;
            // As kube-apiserver: 200 also when the object is only marked (graceful deletion,
            // finalizers, a namespace's cleanup); 202 only for the legacy orphanDependents=false.
            let code = if !gone && orphan_dependents(q, &body) == Some(false) {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            Ok(json_response(code, &def.from_storage(obj)))
        }
        (Method::DELETE, None, None) => {
            allowed("deletecollection")?;
            let params = list_params(target, q)?;
            let delete = delete_params(q, headers, &body)?;
            let (items, _) = reg.list(def, ns, &params).await?;
            for item in &items {
                let item_ns = namespace(item);
                match reg
                    .delete(def, item_ns, name(item).unwrap_or_default(), &delete)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.reason == "NotFound" => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(json_response(StatusCode::OK, &success_status(def, "")))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported here"
        ))),
    }
}

/// `dryRun=All`: the request goes through every step but storing (kube-apiserver's only
/// value); anything else is refused rather than ignored (a client asking for a dry run must
/// never change the cluster).
fn dry_run(q: &HashMap<String, String>) -> ApiResult<bool> {
    q.get("dryRun").map_or(Ok(false), |v| dry_run_value(v))
}

fn dry_run_value(value: &str) -> ApiResult<bool> {
    match value {
        "All" => Ok(true),
        other => Err(ApiError::bad_request(format!(
            "dryRun: Unsupported value: {other:?}: supported values: \"All\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_resources() {
        let t = parse_target(&[
            "api",
            "v1",
            "namespaces",
            "default",
            "pods",
            "web",
            "status",
        ])
        .unwrap();
        assert_eq!(
            (
                t.def.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.sub.map(|s| s.name)
            ),
            ("pods", Some("default"), Some("web"), Some("status"))
        );
        let t = parse_target(&["api", "v1", "namespaces", "default"]).unwrap();
        assert_eq!(
            (t.def.plural, t.name.as_deref()),
            ("namespaces", Some("default"))
        );
        let t = parse_target(&["api", "v1", "namespaces", "kube-system", "finalize"]).unwrap();
        assert_eq!(
            (t.def.plural, t.name.as_deref(), t.sub.map(|s| s.name)),
            ("namespaces", Some("kube-system"), Some("finalize"))
        );
        let t = parse_target(&["apis", "apps", "v1", "deployments"]).unwrap();
        assert_eq!((t.def.plural, t.namespace), ("deployments", None));
        assert!(
            parse_target(&[
                "apis",
                "apps",
                "v1",
                "namespaces",
                "x",
                "deployments",
                "d",
                "nope"
            ])
            .is_none()
        );
    }

    #[test]
    fn unknown_fields_are_found_by_round_trip() {
        let q: HashMap<String, String> =
            [("fieldValidation".to_owned(), "Strict".to_owned())].into();
        let def = find("apps", "v1", "deployments").unwrap();
        let obj = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1, "replica": 2}});
        let err =
            check_object(def.kind, &def.api_version(), def.typed, obj.clone(), &q).unwrap_err();
        assert!(
            err.message
                .contains("strict decoding error: unknown field \"spec.replica\""),
            "{}",
            err.message
        );
        let warn: HashMap<String, String> = HashMap::new();
        let (_, warnings) =
            check_object(def.kind, &def.api_version(), def.typed, obj, &warn).unwrap();
        assert_eq!(warnings, ["unknown field \"spec.replica\""]);
        let wrong = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": "two"}});
        let err = check_object(def.kind, &def.api_version(), def.typed, wrong, &warn).unwrap_err();
        assert_eq!(err.code, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn query_strings_decode() {
        let uri: Uri = "/api/v1/pods?labelSelector=app%3Dweb%2Ctier+in+%28a%29&limit=5"
            .parse()
            .unwrap();
        let q = query(&uri);
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["limit"], "5");
    }
}
