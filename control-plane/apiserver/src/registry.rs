//! The API's storage semantics over the store: objects kept one key per object, the
//! resourceVersion as the store's mod revision, optimistic concurrency, metadata the server
//! owns (uid, creationTimestamp, generation), namespace lifecycle, ClusterIP/NodePort
//! allocation, graceful deletion, finalizers and propagation policies.

use std::{net::Ipv4Addr, sync::Arc};

use base64::Engine;
use control_plane_store::{KeyValue, ListOptions, Store, StoreError};
use serde_json::{Value, json};

use crate::{
    alloc::{AllocError, Allocator},
    error::{ApiError, ApiResult, Cause, Subject},
    object::{
        meta_mut, meta_str, name, namespace, now, random_suffix, resource_version,
        set_resource_version,
    },
    resources::{ResourceDef, Subresource, by_kind},
    selector::{FieldSelector, LabelSelector},
    strategy,
};

/// How a list reads the store.
#[derive(Clone, Debug, Default)]
pub struct ListParams {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

/// What a list returns beside its items.
#[derive(Clone, Debug, Default)]
pub struct ListMeta {
    pub resource_version: i64,
    pub continue_token: Option<String>,
}

impl ListMeta {
    pub fn to_json(&self) -> Value {
        let mut meta = json!({"resourceVersion": self.resource_version.to_string()});
        if let Some(token) = &self.continue_token {
            meta["continue"] = json!(token);
        }
        meta
    }
}

/// How a DELETE asks for the object to go.
#[derive(Clone, Debug, Default)]
pub struct DeleteParams {
    pub grace_period_seconds: Option<i64>,
    pub propagation_policy: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_resource_version: Option<String>,
    /// `dryRun: [All]`: what would happen, nothing written.
    pub dry_run: bool,
}

pub struct Registry<S: Store> {
    pub store: Arc<S>,
    pub cluster_ips: Allocator<S>,
    pub node_ports: Allocator<S>,
}

fn subject<'a>(def: &'a ResourceDef, name: &'a str) -> Subject<'a> {
    Subject {
        group: def.group,
        resource: def.plural,
        name,
    }
}

/// An object from the store, with its resourceVersion.
pub fn decode(kv: &KeyValue) -> ApiResult<Value> {
    let mut obj: Value = serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
    set_resource_version(&mut obj, kv.mod_revision);
    Ok(obj)
}

/// An object for the store: without its resourceVersion (the store's revision is).
pub fn encode(obj: &Value) -> Vec<u8> {
    let mut obj = obj.clone();
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&obj).expect("objects serialize")
}

fn parse_rv(rv: &str) -> ApiResult<i64> {
    rv.parse::<i64>().map_err(|_| {
        ApiError::bad_request(format!("invalid resource version {rv:?}: not an integer"))
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    v: String,
    rv: i64,
    start: String,
}

fn encode_continue(rv: i64, last_key: &str) -> String {
    let token = ContinueToken {
        v: "meta.k8s.io/v1".into(),
        rv,
        start: last_key.to_owned(),
    };
    base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&token).expect("serializes"))
}

fn decode_continue(token: &str) -> ApiResult<ContinueToken> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

impl<S: Store> Registry<S> {
    pub async fn get(&self, def: &ResourceDef, ns: Option<&str>, name: &str) -> ApiResult<Value> {
        let kv = self
            .store
            .get(&def.key(ns, name))
            .await
            .map_err(|e| ApiError::from_store(e, subject(def, name)))?
            .ok_or_else(|| ApiError::not_found(subject(def, name)))?;
        decode(&kv)
    }

    async fn get_kv(&self, def: &ResourceDef, ns: Option<&str>, name: &str) -> ApiResult<KeyValue> {
        self.store
            .get(&def.key(ns, name))
            .await
            .map_err(|e| ApiError::from_store(e, subject(def, name)))?
            .ok_or_else(|| ApiError::not_found(subject(def, name)))
    }

    /// Lists a collection: selectors applied, `limit`/`continue` paging over a consistent
    /// revision.
    pub async fn list(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        params: &ListParams,
    ) -> ApiResult<(Vec<Value>, ListMeta)> {
        let prefix = def.prefix(ns);
        let (mut revision, mut start_after) = (None, None);
        if let Some(token) = &params.continue_token {
            let token = decode_continue(token)?;
            revision = Some(token.rv);
            start_after = Some(token.start);
        } else if let Some(rv) = params
            .resource_version
            .as_deref()
            .filter(|rv| !rv.is_empty() && *rv != "0")
        {
            let rv = parse_rv(rv)?;
            self.wait_for_revision(rv).await?;
            // NotOlderThan (the default) is served from the latest state; Exact from `rv`.
            if params.resource_version_match.as_deref() == Some("Exact") || params.limit.is_some() {
                revision = Some(rv);
            }
        }
        let filtered = !params.labels.is_empty() || !params.fields.is_empty();
        let mut items = Vec::new();
        let (mut read_revision, mut more);
        loop {
            let want = params.limit.map(|l| {
                if filtered {
                    (l - items.len()).max(100)
                } else {
                    l - items.len()
                }
            });
            let page = self
                .store
                .list(&prefix, ListOptions { start_after: start_after.clone(), limit: want, revision })
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if params.continue_token.is_some() => ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                    e => ApiError::from_store(e, subject(def, "")),
                })?;
            read_revision = page.revision;
            revision = Some(page.revision);
            more = page.more;
            let mut last_key = None;
            for kv in &page.kvs {
                last_key = Some(kv.key.clone());
                let obj = decode(kv)?;
                if params.labels.matches(&obj) && params.fields.matches(&obj) {
                    items.push(obj);
                    if params.limit.is_some_and(|l| items.len() >= l) {
                        // Stop at this key; the rest of the page is for the next one.
                        more = more || page.kvs.last().map(|k| &k.key) != Some(&kv.key);
                        break;
                    }
                }
            }
            if let Some(k) = last_key {
                start_after = Some(k);
            }
            let full = params.limit.is_some_and(|l| items.len() >= l);
            if !more || full || params.limit.is_none() {
                break;
            }
        }
        let continue_token = if more && params.limit.is_some() {
            let last = items
                .last()
                .map(|o| def.key(namespace(o), name(o).unwrap_or_default()));
            last.or(start_after)
                .map(|k| encode_continue(read_revision, &k))
        } else {
            None
        };
        Ok((
            items,
            ListMeta {
                resource_version: read_revision,
                continue_token,
            },
        ))
    }

    /// Waits (up to 3 s, as kube-apiserver) for the store to reach revision `rv`: a client
    /// may ask for what another API server just wrote. 504 with the ResourceVersionTooLarge
    /// cause if it does not.
    pub async fn wait_for_revision(&self, rv: i64) -> ApiResult<()> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let current = self.store.revision().await.map_err(ApiError::internal)?;
            if rv <= current {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::too_large_resource_version(rv, Some(current)));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Namespaced objects need a namespace that exists and is not terminating.
    async fn check_namespace(&self, ns: &str) -> ApiResult<()> {
        let def = by_kind("", "Namespace").expect("namespaces are served");
        let namespace = self.get(def, None, ns).await?;
        if meta_str(&namespace, "deletionTimestamp").is_some() {
            return Err(ApiError::forbidden(format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            )));
        }
        Ok(())
    }

    /// Creates an object; `obj` has been decoded and checked against its type. `dry`: every
    /// step (defaults, validation, allocation checks, a taken name) but storing.
    pub async fn create(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        mut obj: Value,
        dry: bool,
    ) -> ApiResult<Value> {
        if def.namespaced {
            let ns = ns.ok_or_else(|| ApiError::bad_request("a namespace is required"))?;
            self.check_namespace(ns).await?;
            meta_mut(&mut obj).insert("namespace".into(), json!(ns));
        } else if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("namespace");
        }
        // generateName: a prefix (at most 58 characters, so the name fits 63) and a random
        // suffix, drawn again if the name is taken, as kube-apiserver does.
        let generate = if name(&obj).is_none() {
            meta_str(&obj, "generateName")
                .filter(|p| !p.is_empty())
                .map(|p| p.chars().take(MAX_GENERATE_NAME_PREFIX).collect::<String>())
        } else {
            None
        };
        if let Some(prefix) = &generate {
            meta_mut(&mut obj).insert("name".into(), json!(format!("{prefix}{}", random_suffix())));
        }
        {
            let meta = meta_mut(&mut obj);
            meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            meta.insert("creationTimestamp".into(), json!(now()));
            meta.insert("generation".into(), json!(1));
            for field in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
            ] {
                meta.remove(field);
            }
        }
        strategy::prepare_create(def, &mut obj);
        strategy::default(def, &mut obj);
        let obj_name = name(&obj).unwrap_or_default().to_owned();
        let causes = strategy::validate(def, &obj);
        if !causes.is_empty() {
            return Err(ApiError::invalid(def.group, def.kind, &obj_name, causes));
        }
        crate::managed::track(def, None, &mut obj, None);
        let key = def.key(ns, &obj_name);
        let allocated = if def.kind == "Service" {
            self.allocate_service(&mut obj, None, dry).await?
        } else {
            Allocations::default()
        };
        if dry {
            return match self.store.get(&key).await {
                Ok(None) => Ok(obj),
                Ok(Some(_)) => Err(ApiError::already_exists(subject(def, &obj_name))),
                Err(e) => Err(ApiError::from_store(e, subject(def, &obj_name))),
            };
        }
        let (mut key, mut obj_name) = (key, obj_name);
        let mut attempts = 1;
        loop {
            match self.store.create(&key, encode(&obj)).await {
                Ok(kv) => {
                    set_resource_version(&mut obj, kv.mod_revision);
                    return Ok(obj);
                }
                Err(StoreError::AlreadyExists(_))
                    if let Some(prefix) = &generate
                        && attempts < GENERATE_NAME_ATTEMPTS =>
                {
                    attempts += 1;
                    obj_name = format!("{prefix}{}", random_suffix());
                    meta_mut(&mut obj).insert("name".into(), json!(obj_name));
                    key = def.key(ns, &obj_name);
                }
                Err(e) => {
                    self.release(&allocated.fresh).await;
                    return Err(ApiError::from_store(e, subject(def, &obj_name)));
                }
            }
        }
    }

    /// Allocates what a service needs, on create (`old` None) or update: its ClusterIP (unless
    /// headless or ExternalName), NodePorts (NodePort and LoadBalancer services) and health
    /// check node port (LoadBalancer, `externalTrafficPolicy: Local`), keeping what `old`
    /// already holds, as kube-apiserver does: a port that asks for no nodePort keeps the one
    /// it had, a type change drops the fields the new type has no use for (an ExternalName
    /// loses its ClusterIP), a nodePort set in an update is reserved like one set on create.
    /// `dry`: checks availability and reserves nothing.
    async fn allocate_service(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
        dry: bool,
    ) -> ApiResult<Allocations> {
        let held = old.map(Self::service_allocations).unwrap_or_default();
        let mut fresh = Vec::new();
        if let Err(e) = self
            .allocate_service_fields(svc, old, &held, dry, &mut fresh)
            .await
        {
            if !dry {
                self.release(&fresh).await;
            }
            return Err(e);
        }
        let kept = Self::service_allocations(svc);
        let freed = held.into_iter().filter(|a| !kept.contains(a)).collect();
        if dry {
            fresh.clear();
        }
        Ok(Allocations { fresh, freed })
    }

    async fn allocate_service_fields(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
        held: &[Allocation],
        dry: bool,
        fresh: &mut Vec<Allocation>,
    ) -> ApiResult<()> {
        let name = name(svc).unwrap_or_default().to_owned();
        let type_of = |svc: &Value| {
            svc.pointer("/spec/type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP")
                .to_owned()
        };
        let kind = type_of(svc);
        let invalid = |field: &str, value: String, why: String| {
            ApiError::invalid(
                "",
                "Service",
                &name,
                vec![Cause::invalid(field, value, why)],
            )
        };
        // Fields a type has no use for were refused by validation, or dropped with an
        // update's type change (`strategy::prepare_update`).
        let wanted_ip = svc
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if kind == "ExternalName" {
            // No address.
        } else if wanted_ip == "None" {
            svc["spec"]["clusterIPs"] = json!(["None"]);
        } else {
            let requested = if wanted_ip.is_empty() {
                None
            } else {
                let ip: Ipv4Addr = wanted_ip.parse().map_err(|_| {
                    invalid(
                        "spec.clusterIPs",
                        format!("[]string{{\"{wanted_ip}\"}}"),
                        "must be a valid IP address".into(),
                    )
                })?;
                Some(u32::from(ip))
            };
            let ip = match requested {
                Some(ip) if held.contains(&Allocation::Ip(ip)) => ip,
                _ => {
                    let got = if dry {
                        self.cluster_ips.available(requested).await
                    } else {
                        self.cluster_ips.allocate(requested).await
                    };
                    let ip = got.map_err(|e| {
                        let why = match e {
                            AllocError::OutOfRange => format!(
                                "failed to allocate IP {wanted_ip}: provided IP is not in the valid range"
                            ),
                            AllocError::Taken => format!(
                                "failed to allocate IP {wanted_ip}: provided IP is already allocated"
                            ),
                            AllocError::Full => {
                                "failed to allocate a serviceIP: range is full".into()
                            }
                            AllocError::Store(e) => return ApiError::internal(e),
                        };
                        invalid(
                            "spec.clusterIPs",
                            format!("[]string{{\"{wanted_ip}\"}}"),
                            why,
                        )
                    })?;
                    fresh.push(Allocation::Ip(ip));
                    ip
                }
            };
            let ip = Ipv4Addr::from(ip).to_string();
            svc["spec"]["clusterIP"] = json!(ip);
            svc["spec"]["clusterIPs"] = json!([ip]);
        }

        let needs_node_ports = strategy::node_ports_of(&kind);
        let old_needed = old.is_some_and(|o| strategy::node_ports_of(&type_of(o)));
        let count = svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let port_field = |svc: &Value, i: usize, field: &str| -> Value {
            svc["spec"]["ports"][i]
                .get(field)
                .cloned()
                .unwrap_or(Value::Null)
        };
        for i in 0..count {
            let mut wanted = svc["spec"]["ports"][i]
                .get("nodePort")
                .and_then(Value::as_u64)
                .filter(|p| *p != 0)
                .map(|p| p as u32);
            if !needs_node_ports {
                continue;
            }
            // A port asking for none keeps the one it had (same port number and protocol).
            if wanted.is_none() && old_needed {
                let protocol = |p: &Value| p.get("protocol").cloned().unwrap_or(json!("TCP"));
                let this = (
                    port_field(svc, i, "port"),
                    protocol(&svc["spec"]["ports"][i]),
                );
                wanted = old
                    .and_then(|o| o.pointer("/spec/ports"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|p| (p.get("port").cloned().unwrap_or(Value::Null), protocol(p)) == this)
                    .and_then(|p| p.get("nodePort"))
                    .and_then(Value::as_u64)
                    .filter(|p| *p != 0)
                    .map(|p| p as u32);
            }
            // One node port may serve a port number on two protocols (DNS on TCP and UDP),
            // as kube-apiserver allows: an earlier port of this service holds it then.
            let protocol = |j: usize| {
                svc["spec"]["ports"][j]
                    .get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("TCP")
                    .to_owned()
            };
            let shared = wanted.and_then(|w| {
                (0..i).find(|&j| {
                    svc["spec"]["ports"][j]
                        .get("nodePort")
                        .and_then(Value::as_u64)
                        == Some(u64::from(w))
                })
            });
            if let (Some(j), Some(port)) = (shared, wanted) {
                if protocol(j) == protocol(i) {
                    return Err(invalid(
                        &format!("spec.ports[{i}].nodePort"),
                        port.to_string(),
                        "may not be used by two ports of the same protocol".into(),
                    ));
                }
                svc["spec"]["ports"][i]["nodePort"] = json!(port);
                continue;
            }
            let port = match wanted {
                Some(port) if held.contains(&Allocation::Port(port)) => port,
                _ => {
                    self.allocate_node_port(wanted, dry, fresh, |why| {
                        invalid(
                            &format!("spec.ports[{i}].nodePort"),
                            wanted.unwrap_or(0).to_string(),
                            why,
                        )
                    })
                    .await?
                }
            };
            svc["spec"]["ports"][i]["nodePort"] = json!(port);
        }

        // A LoadBalancer that keeps the client's address (externalTrafficPolicy Local) gets a
        // node port where each node says whether it has local endpoints, for the load
        // balancer's health checks (kube-apiserver allocates it from the NodePort range).
        let mut wanted = svc
            .pointer("/spec/healthCheckNodePort")
            .and_then(Value::as_u64)
            .filter(|p| *p != 0)
            .map(|p| p as u32);
        if strategy::health_check_of(&svc["spec"]) {
            if wanted.is_none() {
                wanted = old
                    .and_then(|o| o.pointer("/spec/healthCheckNodePort"))
                    .and_then(Value::as_u64)
                    .map(|p| p as u32);
            }
            let port = match wanted {
                Some(port) if held.contains(&Allocation::Port(port)) => port,
                _ => {
                    self.allocate_node_port(wanted, dry, fresh, |why| {
                        invalid(
                            "spec.healthCheckNodePort",
                            wanted.unwrap_or(0).to_string(),
                            why,
                        )
                    })
                    .await?
                }
            };
            svc["spec"]["healthCheckNodePort"] = json!(port);
        }
        Ok(())
    }

    /// Allocates a node port (`wanted`, or any), or checks it could be (`dry`); `invalid`
    /// makes the error of a port that cannot be had from the reason.
    async fn allocate_node_port(
        &self,
        wanted: Option<u32>,
        dry: bool,
        fresh: &mut Vec<Allocation>,
        invalid: impl Fn(String) -> ApiError,
    ) -> ApiResult<u32> {
        let got = if dry {
            self.node_ports.available(wanted).await
        } else {
            self.node_ports.allocate(wanted).await
        };
        let range = self.node_ports.range();
        match got {
            Ok(port) => {
                fresh.push(Allocation::Port(port));
                Ok(port)
            }
            Err(AllocError::OutOfRange) => Err(invalid(format!(
                "provided port is not in the valid range. The range of valid ports is {}-{}",
                range.first,
                range.first + range.size - 1
            ))),
            Err(AllocError::Taken) => Err(invalid("provided port is already allocated".into())),
            Err(AllocError::Full) => Err(invalid("range is full".into())),
            Err(AllocError::Store(e)) => Err(ApiError::internal(e)),
        }
    }

    async fn release(&self, allocations: &[Allocation]) {
        for a in allocations {
            let _ = match a {
                Allocation::Ip(ip) => self.cluster_ips.release(*ip).await,
                Allocation::Port(port) => self.node_ports.release(*port).await,
            };
        }
    }

    /// What a deleted service held.
    fn service_allocations(svc: &Value) -> Vec<Allocation> {
        let mut out = Vec::new();
        if let Some(ip) = svc
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        {
            out.push(Allocation::Ip(u32::from(ip)));
        }
        for p in svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(port) = p.get("nodePort").and_then(Value::as_u64) {
                out.push(Allocation::Port(port as u32));
            }
        }
        if let Some(port) = svc
            .pointer("/spec/healthCheckNodePort")
            .and_then(Value::as_u64)
        {
            out.push(Allocation::Port(port as u32));
        }
        out
    }

    /// Replaces an object (PUT), or its status (`sub` = status). With a resourceVersion in the
    /// body the update is conditional on it (409 if stale); without, it applies to the latest.
    pub async fn update(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        obj_name: &str,
        obj: Value,
        sub: Option<&Subresource>,
        dry: bool,
    ) -> ApiResult<Value> {
        if name(&obj).is_some_and(|n| n != obj_name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({obj_name})",
                name(&obj).unwrap_or_default()
            )));
        }
        // The object replaces the latest; its resourceVersion, if any, is the precondition.
        self.guaranteed_update(def, ns, obj_name, sub, dry, |_| Ok(obj.clone()))
            .await
    }

    /// Applies `f` to the latest object and stores the result, retrying on concurrent changes
    /// (kube-apiserver's GuaranteedUpdate). Used by PATCH, bindings and scale.
    pub async fn guaranteed_update(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        obj_name: &str,
        sub: Option<&Subresource>,
        dry: bool,
        f: impl Fn(&Value) -> ApiResult<Value>,
    ) -> ApiResult<Value> {
        loop {
            let current = self.get_kv(def, ns, obj_name).await?;
            let old = decode(&current)?;
            let mut candidate = f(&old)?;
            let precondition = resource_version(&candidate).map(parse_rv).transpose()?;
            if let Some(rv) = precondition
                && rv != current.mod_revision
            {
                return Err(ApiError::conflict(subject(def, obj_name)));
            }
            self.apply_update_rules(def, &old, &mut candidate, sub)?;
            match self
                .commit_update(
                    def,
                    ns,
                    obj_name,
                    &old,
                    candidate,
                    current.mod_revision,
                    dry,
                )
                .await
            {
                Err(e) if e.reason == "Conflict" && precondition.is_none() => continue,
                result => return result,
            }
        }
    }

    /// Metadata the server owns, status/spec separation, validation, generation.
    fn apply_update_rules(
        &self,
        def: &ResourceDef,
        old: &Value,
        new: &mut Value,
        sub: Option<&Subresource>,
    ) -> ApiResult<()> {
        let obj_name = name(old).unwrap_or_default().to_owned();
        for field in ["apiVersion", "kind"] {
            if new.get(field).is_none() {
                new[field] = old[field].clone();
            }
        }
        let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
        {
            let meta = meta_mut(new);
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match old_meta.get(field) {
                    Some(v) => {
                        meta.insert(field.into(), v.clone());
                    }
                    None => {
                        meta.remove(field);
                    }
                }
            }
        }
        match sub.map(|s| s.name) {
            Some("status") => strategy::prepare_status_update(old, new),
            // The binding is built here from the stored pod: only nodeName and the
            // PodScheduled condition change, which a client's update may not do.
            Some("binding") => {}
            Some("finalize") => {
                let finalizers = new
                    .pointer("/spec/finalizers")
                    .cloned()
                    .unwrap_or(json!([]));
                let rv = new.pointer("/metadata/resourceVersion").cloned();
                *new = old.clone();
                new["spec"]["finalizers"] = finalizers;
                if let Some(rv) = rv {
                    new["metadata"]["resourceVersion"] = rv;
                }
            }
            _ => {
                strategy::default(def, new);
                let mut causes = strategy::prepare_update(def, old, new);
                causes.extend(strategy::validate(def, new));
                if !causes.is_empty() {
                    return Err(ApiError::invalid(def.group, def.kind, &obj_name, causes));
                }
            }
        }
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let generation = if strategy::spec_changed(old, new) {
            generation + 1
        } else {
            generation
        };
        meta_mut(new).insert("generation".into(), json!(generation));
        crate::managed::track(def, Some(old), new, sub.map(|s| s.name));
        Ok(())
    }

    /// Stores an update (or, when the last finalizer went, the deletion); a service's
    /// allocations follow its new version. `dry`: everything but the writes.
    #[expect(
        clippy::too_many_arguments,
        reason = "where, both versions, the revision expected and dry-run"
    )]
    async fn commit_update(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        obj_name: &str,
        old: &Value,
        mut new: Value,
        expected: i64,
        dry: bool,
    ) -> ApiResult<Value> {
        let key = def.key(ns, obj_name);
        let deleting = meta_str(&new, "deletionTimestamp").is_some();
        if deleting && finalizers_done(&new) && !graceful_pending(def, &new) {
            if dry {
                return Ok(new);
            }
            let kv = self
                .store
                .delete(&key, Some(expected))
                .await
                .map_err(|e| ApiError::from_store(e, subject(def, obj_name)))?;
            self.after_delete(def, old).await;
            set_resource_version(&mut new, kv.mod_revision);
            return Ok(new);
        }
        let allocated = if def.kind == "Service" {
            self.allocate_service(&mut new, Some(old), dry).await?
        } else {
            Allocations::default()
        };
        if same_object(&new, old) {
            // Nothing changes: no new revision, no event (kube-apiserver skips no-op writes).
            return Ok(old.clone());
        }
        if dry {
            return Ok(new);
        }
        match self.store.update(&key, encode(&new), expected).await {
            Ok(kv) => {
                self.release(&allocated.freed).await;
                set_resource_version(&mut new, kv.mod_revision);
                Ok(new)
            }
            Err(e) => {
                self.release(&allocated.fresh).await;
                Err(ApiError::from_store(e, subject(def, obj_name)))
            }
        }
    }

    async fn after_delete(&self, def: &ResourceDef, obj: &Value) {
        if def.kind == "Service" {
            self.release(&Self::service_allocations(obj)).await;
        }
    }

    /// Deletes an object: at once, or by marking it (`deletionTimestamp`) when finalizers, a
    /// pod's grace period or a namespace's cleanup must come first. Returns the object and
    /// whether it is gone.
    pub async fn delete(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        obj_name: &str,
        params: &DeleteParams,
    ) -> ApiResult<(Value, bool)> {
        let dry = params.dry_run;
        loop {
            let current = self.get_kv(def, ns, obj_name).await?;
            let mut obj = decode(&current)?;
            if let Some(uid) = &params.precondition_uid
                && meta_str(&obj, "uid") != Some(uid)
            {
                return Err(ApiError::conflict_message(
                    subject(def, obj_name),
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&obj, "uid").unwrap_or_default()
                    ),
                ));
            }
            if let Some(rv) = &params.precondition_resource_version
                && *rv != current.mod_revision.to_string()
            {
                return Err(ApiError::conflict_message(
                    subject(def, obj_name),
                    format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        current.mod_revision
                    ),
                ));
            }
            let mut finalizers: Vec<Value> = obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let policy = params.propagation_policy.as_deref();
            for (wanted, finalizer) in [
                (Some("Orphan"), "orphan"),
                (Some("Foreground"), "foregroundDeletion"),
            ] {
                if policy == wanted && !finalizers.contains(&json!(finalizer)) {
                    finalizers.push(json!(finalizer));
                }
            }
            let grace = match def.kind {
                "Pod" => {
                    let scheduled = obj
                        .pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        .is_some_and(|n| !n.is_empty());
                    let finished = matches!(
                        obj.pointer("/status/phase").and_then(Value::as_str),
                        Some("Succeeded" | "Failed")
                    );
                    let default = obj
                        .pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                        .unwrap_or(30);
                    if scheduled && !finished {
                        params.grace_period_seconds.unwrap_or(default).max(0)
                    } else {
                        0
                    }
                }
                _ => 0,
            };
            let namespace_cleanup = def.kind == "Namespace"
                && obj
                    .pointer("/spec/finalizers")
                    .and_then(Value::as_array)
                    .is_some_and(|f| !f.is_empty());
            let already = meta_str(&obj, "deletionTimestamp").is_some();
            if finalizers.is_empty() && grace == 0 && !namespace_cleanup {
                if dry {
                    return Ok((obj, true));
                }
                match self
                    .store
                    .delete(&current.key, Some(current.mod_revision))
                    .await
                {
                    Ok(kv) => {
                        self.after_delete(def, &obj).await;
                        set_resource_version(&mut obj, kv.mod_revision);
                        return Ok((obj, true));
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(ApiError::from_store(e, subject(def, obj_name))),
                }
            }
            // Deleting again can shorten a pod's grace period, never lengthen it.
            let current_grace = obj
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if already && (def.kind != "Pod" || grace >= current_grace) {
                return Ok((obj, false));
            }
            {
                let meta = meta_mut(&mut obj);
                let when = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
                meta.insert(
                    "deletionTimestamp".into(),
                    json!(when.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
                );
                meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
                if !finalizers.is_empty() {
                    meta.insert("finalizers".into(), Value::Array(finalizers));
                }
            }
            if def.kind == "Namespace" {
                obj["status"]["phase"] = json!("Terminating");
            }
            if dry {
                return Ok((obj, false));
            }
            match self
                .store
                .update(&current.key, encode(&obj), current.mod_revision)
                .await
            {
                Ok(kv) => {
                    set_resource_version(&mut obj, kv.mod_revision);
                    return Ok((obj, false));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ApiError::from_store(e, subject(def, obj_name))),
            }
        }
    }

    /// Assigns a pod to a node (the `binding` subresource): once, and not while it is being
    /// deleted.
    pub async fn bind(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        pod_name: &str,
        binding: &Subresource,
        node: &str,
        dry: bool,
    ) -> ApiResult<Value> {
        let conflict = |message: String| {
            ApiError::conflict_message(
                Subject {
                    group: "",
                    resource: "pods",
                    name: pod_name,
                },
                message,
            )
        };
        self.guaranteed_update(def, ns, pod_name, Some(binding), dry, |pod| {
            if let Some(bound) = pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                return Err(conflict(format!(
                    "pod {pod_name} is already assigned to node \"{bound}\""
                )));
            }
            if pod.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(conflict(format!(
                    "pod {pod_name} is being deleted, cannot be assigned to a host"
                )));
            }
            let mut pod = pod.clone();
            pod["spec"]["nodeName"] = json!(node);
            let mut conditions: Vec<Value> = pod
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            conditions.retain(|c| c.get("type") != Some(&json!("PodScheduled")));
            conditions.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now()}));
            pod["status"]["conditions"] = json!(conditions);
            if let Some(m) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            Ok(pod)
        })
        .await
    }

    /// Makes sure an object exists (server bootstrap: default namespaces).
    pub async fn ensure(&self, def: &ResourceDef, obj: Value) -> ApiResult<()> {
        self.ensure_at(def, None, obj).await
    }

    /// The same for a namespaced object.
    pub async fn ensure_in(&self, def: &ResourceDef, ns: &str, obj: Value) -> ApiResult<()> {
        self.ensure_at(def, Some(ns), obj).await
    }

    async fn ensure_at(&self, def: &ResourceDef, ns: Option<&str>, obj: Value) -> ApiResult<()> {
        // Looked up first: creating what exists would fail in allocation before the name.
        let key = def.key(ns, name(&obj).unwrap_or_default());
        if self
            .store
            .get(&key)
            .await
            .map_err(ApiError::internal)?
            .is_some()
        {
            return Ok(());
        }
        match self.create(def, ns, obj, false).await {
            Err(e) if e.reason == "AlreadyExists" => Ok(()),
            other => other.map(drop),
        }
    }
}

/// The longest generateName prefix kept (kube's 63-character names less the 5-character
/// random suffix).
const MAX_GENERATE_NAME_PREFIX: usize = 58;
/// How many names a create with generateName tries before giving up (kube-apiserver's 8).
const GENERATE_NAME_ATTEMPTS: usize = 8;

/// Whether two versions of an object are the same but for their resourceVersions.
fn same_object(a: &Value, b: &Value) -> bool {
    let without_rv = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        v
    };
    without_rv(a) == without_rv(b)
}

fn finalizers_done(obj: &Value) -> bool {
    let meta_empty = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty);
    let spec_empty = obj.get("kind").and_then(Value::as_str) != Some("Namespace")
        || obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
    meta_empty && spec_empty
}

/// A scheduled pod waits for its kubelet within the grace period.
fn graceful_pending(def: &ResourceDef, obj: &Value) -> bool {
    def.kind == "Pod"
        && obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            > 0
}

/// Something a service holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Allocation {
    Ip(u32),
    Port(u32),
}

/// What a service's write allocated (released if the write fails) and what its old version
/// held that the new one does not (released once the write is stored).
#[derive(Debug, Default)]
struct Allocations {
    fresh: Vec<Allocation>,
    freed: Vec<Allocation>,
}
