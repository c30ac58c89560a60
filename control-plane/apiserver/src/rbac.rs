//! Authorization: RBAC (`rbac.authorization.k8s.io/v1`) as kube-apiserver's authorizer and
//! its registry apply it.
//!
//! - Every request's attributes (verb, API group, resource/subresource, namespace, name, or
//!   a non-resource path) are checked against the rules of the roles bound to the user, its
//!   groups or its service account: ClusterRoleBindings everywhere, RoleBindings in their
//!   namespace. `system:masters` is allowed everything without a lookup (kube's superuser
//!   group), which is what the admin token's user is in.
//! - Aggregated ClusterRoles (`aggregationRule`) hold the rules of every ClusterRole their
//!   selectors match, so a ClusterRole labelled `rbac.authorization.k8s.io/aggregate-to-view`
//!   extends `view` at once (the controllers' aggregation loop also writes them into the
//!   role's `rules`, for kubectl to show).
//! - Nobody grants what they do not hold: a Role or ClusterRole written by a user must be
//!   covered by that user's own rules unless it may `escalate`; a binding needs the role's
//!   rules or `bind` on it (kube's escalation checks).
//! - The default roles kubectl users expect (`cluster-admin`, `admin`, `edit`, `view`,
//!   `system:discovery`, `system:basic-user`, `system:public-info-viewer`, and kube-proxy's
//!   `system:node-proxier` for node agents fed by a kubeconfig) and their bindings exist from
//!   the first start.
//!
//! Rules are read from the store at each decision (no cache to go stale, the same answer from
//! every API server on one etcd); the superuser path, which the controllers and the admin
//! take, reads nothing.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use control_plane_store::Store;
use serde_json::{Value, json};

use crate::{
    auth::UserInfo,
    error::{ApiError, ApiResult},
    registry::{ListParams, Registry},
    resources::by_kind,
    selector::LabelSelector,
};

pub const GROUP: &str = "rbac.authorization.k8s.io";

/// What a request does, as the authorizer sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    /// A non-resource request's path (then the resource fields are empty).
    pub path: Option<String>,
    pub api_group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl Attributes {
    /// `pods` or `pods/log`.
    fn combined_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

fn strings(rule: &Value, field: &str) -> Vec<String> {
    rule.get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

fn has(list: &[String], wanted: &str) -> bool {
    list.iter().any(|v| v == "*" || v == wanted)
}

/// Whether one PolicyRule allows the attributes (kube's `RuleAllows`).
pub fn rule_allows(rule: &Value, attrs: &Attributes) -> bool {
    if !has(&strings(rule, "verbs"), &attrs.verb) {
        return false;
    }
    if let Some(path) = &attrs.path {
        return strings(rule, "nonResourceURLs").iter().any(|url| {
            url == "*"
                || url == path
                || url
                    .strip_suffix('*')
                    .is_some_and(|prefix| path.starts_with(prefix))
        });
    }
    if !has(&strings(rule, "apiGroups"), &attrs.api_group) {
        return false;
    }
    let combined = attrs.combined_resource();
    let resource_matches = strings(rule, "resources").iter().any(|r| {
        r == "*"
            || *r == combined
            || (!attrs.subresource.is_empty()
                && r.strip_prefix("*/") == Some(attrs.subresource.as_str()))
    });
    if !resource_matches {
        return false;
    }
    let names = strings(rule, "resourceNames");
    names.is_empty() || names.contains(&attrs.name)
}

/// Whether a binding's subjects include the user.
fn applies_to(binding: &Value, user: &UserInfo, binding_namespace: &str) -> bool {
    binding
        .get("subjects")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|s| {
            let name = s.get("name").and_then(Value::as_str).unwrap_or_default();
            match s.get("kind").and_then(Value::as_str) {
                Some("User") => user.username == name,
                Some("Group") => user.groups.iter().any(|g| g == name),
                Some("ServiceAccount") => {
                    let ns = s
                        .get("namespace")
                        .and_then(Value::as_str)
                        .filter(|n| !n.is_empty())
                        .unwrap_or(binding_namespace);
                    user.username == format!("system:serviceaccount:{ns}:{name}")
                }
                _ => false,
            }
        })
}

/// What the RBAC objects say, read once for a decision.
struct Policy {
    cluster_roles: Vec<Value>,
    cluster_bindings: Vec<Value>,
}

async fn list<S: Store>(
    registry: &Registry<S>,
    kind: &str,
    namespace: Option<&str>,
) -> ApiResult<Vec<Value>> {
    let def = by_kind(GROUP, kind).expect("served");
    Ok(registry
        .list(def, namespace, &ListParams::default())
        .await?
        .0)
}

impl Policy {
    async fn read<S: Store>(registry: &Registry<S>) -> ApiResult<Self> {
        Ok(Self {
            cluster_roles: list(registry, "ClusterRole", None).await?,
            cluster_bindings: list(registry, "ClusterRoleBinding", None).await?,
        })
    }

    /// A ClusterRole's rules, aggregated ones included.
    fn cluster_role_rules(&self, name: &str) -> Vec<Value> {
        let Some(role) = self
            .cluster_roles
            .iter()
            .find(|r| crate::object::name(r) == Some(name))
        else {
            return Vec::new();
        };
        let Some(selectors) = role
            .pointer("/aggregationRule/clusterRoleSelectors")
            .and_then(Value::as_array)
        else {
            return strings_of(role.get("rules"));
        };
        // An aggregated role's rules are what it gathers now; what the aggregation loop last
        // wrote into it may be a moment behind.
        let mut rules = Vec::new();
        for selector in selectors {
            let Ok(selector) = LabelSelector::from_label_selector(selector) else {
                continue;
            };
            for other in &self.cluster_roles {
                if crate::object::name(other) != Some(name) && selector.matches(other) {
                    rules.extend(strings_of(other.get("rules")));
                }
            }
        }
        rules
    }

    /// The rules that apply to `user` in `namespace` (empty: cluster-wide only).
    async fn rules_for<S: Store>(
        &self,
        registry: &Registry<S>,
        user: &UserInfo,
        namespace: &str,
    ) -> ApiResult<Vec<Value>> {
        let mut rules = Vec::new();
        for binding in &self.cluster_bindings {
            if applies_to(binding, user, "")
                && binding.pointer("/roleRef/kind").and_then(Value::as_str) == Some("ClusterRole")
            {
                let role = binding
                    .pointer("/roleRef/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                rules.extend(self.cluster_role_rules(role));
            }
        }
        if namespace.is_empty() {
            return Ok(rules);
        }
        let bindings = list(registry, "RoleBinding", Some(namespace)).await?;
        let mut roles: Option<Vec<Value>> = None;
        for binding in bindings.iter().filter(|b| applies_to(b, user, namespace)) {
            let role = binding
                .pointer("/roleRef/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match binding.pointer("/roleRef/kind").and_then(Value::as_str) {
                Some("ClusterRole") => rules.extend(self.cluster_role_rules(role)),
                Some("Role") => {
                    if roles.is_none() {
                        roles = Some(list(registry, "Role", Some(namespace)).await?);
                    }
                    if let Some(r) = roles
                        .iter()
                        .flatten()
                        .find(|r| crate::object::name(r) == Some(role))
                    {
                        rules.extend(strings_of(r.get("rules")));
                    }
                }
                _ => {}
            }
        }
        Ok(rules)
    }
}

fn strings_of(rules: Option<&Value>) -> Vec<Value> {
    rules.and_then(Value::as_array).cloned().unwrap_or_default()
}

/// Whether `user` may do what `attrs` say.
pub async fn allowed<S: Store>(
    registry: &Registry<S>,
    user: &UserInfo,
    attrs: &Attributes,
) -> ApiResult<bool> {
    if user.is_superuser() {
        return Ok(true);
    }
    let policy = Policy::read(registry).await?;
    let rules = policy.rules_for(registry, user, &attrs.namespace).await?;
    Ok(rules.iter().any(|r| rule_allows(r, attrs)))
}

/// Every rule that applies to `user` in `namespace` (`kubectl auth can-i --list`).
pub async fn rules<S: Store>(
    registry: &Registry<S>,
    user: &UserInfo,
    namespace: &str,
) -> ApiResult<Vec<Value>> {
    if user.is_superuser() {
        return Ok(vec![
            json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}),
            json!({"verbs": ["*"], "nonResourceURLs": ["*"]}),
        ]);
    }
    let policy = Policy::read(registry).await?;
    policy.rules_for(registry, user, namespace).await
}

/// The 403 kube-apiserver answers a request it refuses with.
pub fn forbidden(user: &UserInfo, attrs: &Attributes) -> ApiError {
    let who = format!("User \"{}\"", user.username);
    let message = match &attrs.path {
        Some(path) => format!("forbidden: {who} cannot {} path \"{path}\"", attrs.verb),
        None => {
            let qualified = if attrs.api_group.is_empty() {
                attrs.resource.clone()
            } else {
                format!("{}.{}", attrs.resource, attrs.api_group)
            };
            let subject = if attrs.name.is_empty() {
                qualified
            } else {
                format!("{qualified} \"{}\"", attrs.name)
            };
            let scope = if attrs.namespace.is_empty() {
                "at the cluster scope".to_owned()
            } else {
                format!("in the namespace \"{}\"", attrs.namespace)
            };
            format!(
                "{subject} is forbidden: {who} cannot {} resource \"{}\" in API group \"{}\" {scope}",
                attrs.verb,
                attrs.combined_resource(),
                attrs.api_group
            )
        }
    };
    ApiError {
        code: StatusCode::FORBIDDEN,
        reason: "Forbidden",
        message,
        details: attrs
            .path
            .is_none()
            .then(|| json!({"name": attrs.name, "group": attrs.api_group, "kind": attrs.resource})),
    }
}

/// The single-verb, single-resource pieces of a rule, as attributes (kube breaks rules down
/// the same way to compare them).
fn pieces(rule: &Value, namespace: &str) -> Vec<Attributes> {
    let mut out = Vec::new();
    let names = strings(rule, "resourceNames");
    let names = if names.is_empty() {
        vec![String::new()]
    } else {
        names
    };
    for verb in strings(rule, "verbs") {
        for group in strings(rule, "apiGroups") {
            for resource in strings(rule, "resources") {
                let (resource, subresource) = resource
                    .split_once('/')
                    .map(|(r, s)| (r.to_owned(), s.to_owned()))
                    .unwrap_or((resource, String::new()));
                for name in &names {
                    out.push(Attributes {
                        verb: verb.clone(),
                        api_group: group.clone(),
                        resource: resource.clone(),
                        subresource: subresource.clone(),
                        namespace: namespace.to_owned(),
                        name: name.clone(),
                        path: None,
                    });
                }
            }
        }
        for url in strings(rule, "nonResourceURLs") {
            out.push(Attributes {
                verb: verb.clone(),
                path: Some(url),
                ..Attributes::default()
            });
        }
    }
    out
}

/// Whether the owner's rules cover a requested piece: what the piece names (a `*` literally)
/// is allowed by some owner rule; a piece for every name (no name) only by a rule for every
/// name, which is what [`rule_allows`] says of an empty name.
fn covers(owner: &[Value], piece: &Attributes) -> bool {
    owner.iter().any(|rule| rule_allows(rule, piece))
}

/// Most rule pieces one escalation check compares.
const MAX_PIECES: usize = 100_000;

/// The rules of `wanted` that `user` does not hold in `namespace`, as kube lists them.
async fn not_held<S: Store>(
    registry: &Registry<S>,
    user: &UserInfo,
    namespace: &str,
    wanted: &[Value],
) -> ApiResult<Vec<String>> {
    // Each rule is compared piece by piece (verbs × groups × resources × names): bounded, so
    // a role of a few long lists cannot keep the server busy multiplying them.
    let count: usize = wanted
        .iter()
        .map(|rule| {
            let n = |f: &str| strings(rule, f).len().max(1);
            n("verbs")
                .saturating_mul(n("apiGroups"))
                .saturating_mul(n("resources"))
                .saturating_mul(n("resourceNames"))
                .saturating_add(strings(rule, "nonResourceURLs").len())
        })
        .fold(0, usize::saturating_add);
    if count > MAX_PIECES {
        return Err(ApiError::forbidden(format!(
            "the rules hold {count} verb/group/resource/name combinations; a user outside \
             system:masters may grant at most {MAX_PIECES} at once"
        )));
    }
    let policy = Policy::read(registry).await?;
    let owner = policy.rules_for(registry, user, namespace).await?;
    let mut missing = BTreeSet::new();
    for rule in wanted {
        for piece in pieces(rule, namespace) {
            if !covers(&owner, &piece) {
                missing.insert(match &piece.path {
                    Some(url) => format!(
                        "{{NonResourceURLs:[\"{url}\"], Verbs:[\"{}\"]}}",
                        piece.verb
                    ),
                    None => format!(
                        "{{APIGroups:[\"{}\"], Resources:[\"{}\"]{}, Verbs:[\"{}\"]}}",
                        piece.api_group,
                        piece.combined_resource(),
                        if piece.name.is_empty() {
                            String::new()
                        } else {
                            format!(", ResourceNames:[\"{}\"]", piece.name)
                        },
                        piece.verb
                    ),
                });
            }
        }
    }
    Ok(missing.into_iter().collect())
}

/// Whether `user` may use a special RBAC verb (`escalate`, `bind`) on a role by name.
async fn may<S: Store>(
    registry: &Registry<S>,
    user: &UserInfo,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: &str,
) -> ApiResult<bool> {
    let attrs = Attributes {
        verb: verb.into(),
        api_group: GROUP.into(),
        resource: resource.into(),
        namespace: namespace.into(),
        name: name.into(),
        ..Attributes::default()
    };
    allowed(registry, user, &attrs).await
}

/// kube's escalation checks on a write of an RBAC object by `user`: a role's rules must be
/// the user's own (or it may `escalate`), a binding's role too (or it may `bind` it).
pub async fn check_escalation<S: Store>(
    registry: &Registry<S>,
    user: &UserInfo,
    kind: &str,
    namespace: &str,
    object: &Value,
) -> ApiResult<()> {
    if user.is_superuser() {
        return Ok(());
    }
    let name = crate::object::name(object).unwrap_or_default().to_owned();
    let (resource, wanted) = match kind {
        "Role" | "ClusterRole" => {
            let resource = if kind == "Role" {
                "roles"
            } else {
                "clusterroles"
            };
            let mut wanted = strings_of(object.get("rules"));
            if kind == "ClusterRole" {
                // What an aggregated role would gather is granted by it too.
                let policy = Policy::read(registry).await?;
                let mut with = policy.cluster_roles.clone();
                with.retain(|r| crate::object::name(r) != Some(&name));
                with.push(object.clone());
                wanted = Policy {
                    cluster_roles: with,
                    cluster_bindings: Vec::new(),
                }
                .cluster_role_rules(&name);
            }
            if may(registry, user, "escalate", resource, namespace, &name).await? {
                return Ok(());
            }
            (resource, wanted)
        }
        _ => {
            let role_kind = object
                .pointer("/roleRef/kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let role_name = object
                .pointer("/roleRef/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let resource = if kind == "RoleBinding" {
                "rolebindings"
            } else {
                "clusterrolebindings"
            };
            // May it bind that role by name?
            let role_resource = if role_kind == "Role" {
                "roles"
            } else {
                "clusterroles"
            };
            if may(registry, user, "bind", role_resource, namespace, role_name).await? {
                return Ok(());
            }
            let rules = match role_kind {
                "Role" => list(registry, "Role", Some(namespace))
                    .await?
                    .into_iter()
                    .find(|r| crate::object::name(r) == Some(role_name))
                    .map(|r| strings_of(r.get("rules")))
                    .unwrap_or_default(),
                _ => Policy::read(registry).await?.cluster_role_rules(role_name),
            };
            (resource, rules)
        }
    };
    let missing = not_held(registry, user, namespace, &wanted).await?;
    if missing.is_empty() {
        return Ok(());
    }
    let groups = user.groups.join(" ");
    Err(ApiError {
        code: StatusCode::FORBIDDEN,
        reason: "Forbidden",
        message: format!(
            "{resource}.{GROUP} \"{name}\" is forbidden: user \"{}\" (groups=[{groups}]) is attempting to grant RBAC permissions not currently held:\n{}",
            user.username,
            missing.join("\n")
        ),
        details: Some(json!({"name": name, "group": GROUP, "kind": resource})),
    })
}

/// Checks a role or binding's shape beyond its type (kube's RBAC validation): a binding's
/// roleRef names a Role or ClusterRole of this group (and never changes: the update
/// strategy's check); subjects are users, groups or service accounts (these with a namespace
/// in a ClusterRoleBinding); a rule names verbs, and resources or non-resource URLs (these
/// only in ClusterRoles).
pub fn validate(kind: &str, object: &Value) -> Vec<crate::error::Cause> {
    use crate::error::Cause;
    let mut causes = Vec::new();
    match kind {
        "Role" | "ClusterRole" => {
            for (i, rule) in strings_of(object.get("rules")).iter().enumerate() {
                let at = format!("rules[{i}]");
                if strings(rule, "verbs").is_empty() {
                    causes.push(Cause::required(format!("{at}.verbs")));
                }
                let urls = strings(rule, "nonResourceURLs");
                if !urls.is_empty() && kind == "Role" {
                    causes.push(Cause::invalid(
                        format!("{at}.nonResourceURLs"),
                        format!("{urls:?}"),
                        "namespaced rules cannot apply to non-resource URLs",
                    ));
                }
                let resources = strings(rule, "resources");
                if !urls.is_empty() && !resources.is_empty() {
                    causes.push(Cause::invalid(
                        format!("{at}.nonResourceURLs"),
                        format!("{urls:?}"),
                        "rules cannot apply to both regular resources and non-resource URLs",
                    ));
                }
                if urls.is_empty() && (resources.is_empty() || rule.get("apiGroups").is_none()) {
                    let field = if resources.is_empty() {
                        "resources"
                    } else {
                        "apiGroups"
                    };
                    causes.push(Cause::required(format!("{at}.{field}")));
                }
            }
        }
        _ => {
            let role_ref = object.get("roleRef").cloned().unwrap_or(Value::Null);
            let allowed_kinds: &[&str] = if kind == "RoleBinding" {
                &["Role", "ClusterRole"]
            } else {
                &["ClusterRole"]
            };
            let ref_kind = role_ref
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !allowed_kinds.contains(&ref_kind) {
                causes.push(Cause::not_supported(
                    "roleRef.kind",
                    ref_kind,
                    allowed_kinds,
                ));
            }
            let ref_group = role_ref
                .get("apiGroup")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if ref_group != GROUP {
                causes.push(Cause::not_supported(
                    "roleRef.apiGroup",
                    ref_group,
                    &[GROUP],
                ));
            }
            if role_ref
                .get("name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                causes.push(Cause::required("roleRef.name"));
            }
            for (i, s) in strings_of(object.get("subjects")).iter().enumerate() {
                let at = format!("subjects[{i}]");
                let subject_kind = s.get("kind").and_then(Value::as_str).unwrap_or_default();
                if !["User", "Group", "ServiceAccount"].contains(&subject_kind) {
                    causes.push(Cause::not_supported(
                        format!("{at}.kind"),
                        subject_kind,
                        &["ServiceAccount", "User", "Group"],
                    ));
                }
                if s.get("name")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    causes.push(Cause::required(format!("{at}.name")));
                }
                if subject_kind == "ServiceAccount"
                    && kind == "ClusterRoleBinding"
                    && s.get("namespace")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                {
                    causes.push(Cause::required(format!("{at}.namespace")));
                }
            }
        }
    }
    causes
}

/// The default roles and bindings (kube's bootstrap policy, for the resources served here).
pub fn defaults() -> Vec<(&'static str, Value)> {
    let labels = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
    let annotations = json!({"rbac.authorization.kubernetes.io/autoupdate": "true"});
    let meta = |name: &str, extra: Value| {
        let mut m = json!({"name": name, "labels": labels, "annotations": annotations});
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                m["labels"][k] = v;
            }
        }
        m
    };
    let role = |name: &str, extra_labels: Value, rules: Value| {
        json!({"apiVersion": format!("{GROUP}/v1"), "kind": "ClusterRole",
            "metadata": meta(name, extra_labels), "rules": rules})
    };
    let aggregated = |name: &str, to: &[&str]| {
        let selectors: Vec<Value> = to
            .iter()
            .map(|t| json!({"matchLabels": {format!("rbac.authorization.k8s.io/aggregate-to-{t}"): "true"}}))
            .collect();
        json!({"apiVersion": format!("{GROUP}/v1"), "kind": "ClusterRole",
            "metadata": meta(name, json!({})),
            "aggregationRule": {"clusterRoleSelectors": selectors}, "rules": []})
    };
    let binding = |name: &str, role: &str, subjects: Value| {
        json!({"apiVersion": format!("{GROUP}/v1"), "kind": "ClusterRoleBinding",
            "metadata": meta(name, json!({})),
            "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": role},
            "subjects": subjects})
    };
    let group = |name: &str| json!({"apiGroup": GROUP, "kind": "Group", "name": name});
    let read = json!(["get", "list", "watch"]);
    let write = json!(["create", "delete", "deletecollection", "patch", "update"]);
    let workloads = json!([
        "pods",
        "pods/log",
        "pods/status",
        "services",
        "services/status",
        "endpoints",
        "configmaps",
        "serviceaccounts",
        "events",
        "replicationcontrollers",
        "persistentvolumeclaims"
    ]);
    let apps = json!([
        "deployments",
        "deployments/scale",
        "deployments/status",
        "replicasets",
        "replicasets/scale",
        "replicasets/status",
        "statefulsets",
        "daemonsets"
    ]);
    vec![
        (
            "ClusterRole",
            role(
                "cluster-admin",
                json!({}),
                json!([
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
            ),
        ),
        ("ClusterRole", aggregated("admin", &["admin"])),
        ("ClusterRole", aggregated("edit", &["edit"])),
        ("ClusterRole", aggregated("view", &["view"])),
        (
            "ClusterRole",
            role(
                "system:aggregate-to-view",
                json!({
                "rbac.authorization.k8s.io/aggregate-to-view": "true",
                "rbac.authorization.k8s.io/aggregate-to-edit": "true",
                "rbac.authorization.k8s.io/aggregate-to-admin": "true"}),
                json!([
            {"apiGroups": [""], "resources": workloads, "verbs": read},
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": read},
            {"apiGroups": ["apps"], "resources": apps, "verbs": read},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": read},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": read}]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:aggregate-to-edit",
                json!({
                "rbac.authorization.k8s.io/aggregate-to-edit": "true",
                "rbac.authorization.k8s.io/aggregate-to-admin": "true"}),
                json!([
            {"apiGroups": [""], "resources": ["pods", "services", "endpoints", "configmaps",
                "secrets", "serviceaccounts", "persistentvolumeclaims"], "verbs": write},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": read},
            {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]},
            {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale",
                "replicasets", "replicasets/scale", "statefulsets", "daemonsets"], "verbs": write},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": write},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": write}]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:aggregate-to-admin",
                json!({
                "rbac.authorization.k8s.io/aggregate-to-admin": "true"}),
                json!([
            {"apiGroups": [GROUP], "resources": ["roles", "rolebindings"],
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["localsubjectaccessreviews"], "verbs": ["create"]}]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:discovery",
                json!({}),
                json!([
            {"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                "/openapi", "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:basic-user",
                json!({}),
                json!([
            {"apiGroups": ["authorization.k8s.io"],
                "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
            ),
        ),
        // What kube-proxy (and so a node agent fed by a kubeconfig) reads and writes.
        (
            "ClusterRole",
            role(
                "system:node-proxier",
                json!({}),
                json!([
            {"apiGroups": [""], "resources": ["endpoints", "services"], "verbs": ["list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:public-info-viewer",
                json!({}),
                json!([
            {"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "ClusterRoleBinding",
            binding(
                "cluster-admin",
                "cluster-admin",
                json!([group("system:masters")]),
            ),
        ),
        (
            "ClusterRoleBinding",
            binding(
                "system:discovery",
                "system:discovery",
                json!([group("system:authenticated")]),
            ),
        ),
        (
            "ClusterRoleBinding",
            binding(
                "system:basic-user",
                "system:basic-user",
                json!([group("system:authenticated")]),
            ),
        ),
        (
            "ClusterRoleBinding",
            binding(
                "system:public-info-viewer",
                "system:public-info-viewer",
                json!([
                    group("system:authenticated"),
                    group("system:unauthenticated")
                ]),
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, group: &str, resource: &str, sub: &str, name: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            api_group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: "default".into(),
            name: name.into(),
            path: None,
        }
    }

    #[test]
    fn rules_match_as_kube_matches_them() {
        let rule =
            json!({"apiGroups": [""], "resources": ["pods", "*/log"], "verbs": ["get", "list"]});
        assert!(rule_allows(&rule, &attrs("get", "", "pods", "", "a")));
        assert!(rule_allows(&rule, &attrs("get", "", "pods", "log", "a")));
        assert!(rule_allows(&rule, &attrs("get", "", "nodes", "log", "a")));
        assert!(!rule_allows(&rule, &attrs("get", "", "pods", "exec", "a")));
        assert!(!rule_allows(&rule, &attrs("delete", "", "pods", "", "a")));
        assert!(!rule_allows(&rule, &attrs("get", "apps", "pods", "", "a")));
        let named = json!({"apiGroups": ["*"], "resources": ["configmaps"], "verbs": ["*"], "resourceNames": ["one"]});
        assert!(rule_allows(
            &named,
            &attrs("update", "", "configmaps", "", "one")
        ));
        assert!(!rule_allows(
            &named,
            &attrs("update", "", "configmaps", "", "two")
        ));
        assert!(!rule_allows(
            &named,
            &attrs("list", "", "configmaps", "", "")
        ));
        let urls = json!({"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]});
        let path = |p: &str| Attributes {
            verb: "get".into(),
            path: Some(p.into()),
            ..Attributes::default()
        };
        assert!(rule_allows(&urls, &path("/apis/apps/v1")));
        assert!(rule_allows(&urls, &path("/version")));
        assert!(!rule_allows(&urls, &path("/metrics")));
    }

    #[test]
    fn coverage_takes_wildcards_literally() {
        let owner = vec![
            json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}),
            json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["one"]}),
        ];
        let wanted = |rule: Value| pieces(&rule, "default");
        let all = |rule: Value| wanted(rule).iter().all(|p| covers(&owner, p));
        assert!(all(
            json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]})
        ));
        assert!(!all(
            json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]})
        ));
        assert!(!all(
            json!({"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get"]})
        ));
        assert!(all(
            json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["one"]})
        ));
        assert!(!all(
            json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]})
        ));
    }

    #[test]
    fn bindings_name_users_groups_and_service_accounts() {
        let user = UserInfo::service_account("team", "builder", "u1");
        let binding = |subject: Value| json!({"subjects": [subject]});
        assert!(applies_to(
            &binding(json!({"kind": "ServiceAccount", "name": "builder"})),
            &user,
            "team"
        ));
        assert!(!applies_to(
            &binding(json!({"kind": "ServiceAccount", "name": "builder"})),
            &user,
            "other"
        ));
        assert!(applies_to(
            &binding(json!({"kind": "Group", "name": "system:serviceaccounts:team"})),
            &user,
            ""
        ));
        assert!(applies_to(
            &binding(json!({"kind": "User", "name": "system:serviceaccount:team:builder"})),
            &user,
            ""
        ));
        assert!(!applies_to(
            &binding(json!({"kind": "User", "name": "builder"})),
            &user,
            ""
        ));
    }
}
