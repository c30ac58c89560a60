//! The resources this API server serves, with what discovery, OpenAPI, tables and storage need
//! to know of each: group/version/kind, plural and short names, categories, scope, verbs,
//! subresources, and the k8s-openapi type that checks an object's shape.

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet},
        authentication::v1::{SelfSubjectReview, TokenRequest},
        authorization::v1::{SelfSubjectAccessReview, SelfSubjectRulesReview},
        autoscaling::v1::Scale,
        coordination::v1::Lease,
        core::v1::{
            Binding, ConfigMap, Endpoints, Event, Namespace, Node, Pod, Secret, Service,
            ServiceAccount,
        },
        discovery::v1::EndpointSlice,
        events::v1::Event as EventV1,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    serde::{Serialize, de::DeserializeOwned},
};
use serde_json::Value;

/// Verbs of a writable resource.
pub const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
/// Verbs of a resource clients only read (its controller writes it).
pub const READ_VERBS: &[&str] = &["get", "list", "watch"];

#[derive(Debug)]
pub struct Subresource {
    pub name: &'static str,
    /// What the subresource's body is (`Scale`, `Binding`, or the resource's own kind).
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub verbs: &'static [&'static str],
}

pub struct ResourceDef {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub verbs: &'static [&'static str],
    pub subresources: &'static [Subresource],
    /// Decodes an object into its typed form and back: the normalized object, or why it is
    /// not one. Fields that vanish on the way are unknown to the type.
    pub typed: fn(&Value) -> Result<Value, String>,
    /// The OpenAPI schema name of the kind (k8s-openapi's, e.g. `io.k8s.api.core.v1.Pod`).
    pub schema: &'static str,
    /// Adds the kind's schemas (and everything they refer to) to a generator.
    pub add_schema: fn(&mut schemars::SchemaGenerator),
    /// Set for a kind served in another form than it is stored in (as events.k8s.io/v1 Events
    /// are core/v1 Events in storage): objects are converted on their way in and out.
    pub conversion: Option<&'static Conversion>,
}

/// How a served form maps onto the stored one: the stored group/resource (its keys) and
/// apiVersion, and top-level fields renamed (served name, stored name).
pub struct Conversion {
    pub stored_as: &'static str,
    pub stored_api_version: &'static str,
    pub fields: &'static [(&'static str, &'static str)],
    /// Field selector names of the served form and what they select in the stored one.
    pub field_labels: &'static [(&'static str, &'static str)],
}

/// events.k8s.io/v1 Events, stored as core/v1 Events (kube-apiserver's conversion).
pub static EVENTS_V1: Conversion = Conversion {
    stored_as: "events",
    stored_api_version: "v1",
    fields: &[
        ("regarding", "involvedObject"),
        ("note", "message"),
        ("reportingController", "reportingComponent"),
        ("deprecatedSource", "source"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
    ],
    field_labels: &[
        ("regarding.", "involvedObject."),
        ("reportingController", "reportingComponent"),
        ("deprecatedSource", "source"),
    ],
};

fn rename(
    obj: Value,
    pairs: impl Iterator<Item = (&'static str, &'static str)>,
    api_version: String,
) -> Value {
    let Value::Object(mut map) = obj else {
        return obj;
    };
    for (from, to) in pairs {
        if let Some(v) = map.remove(from) {
            map.insert(to.to_owned(), v);
        }
    }
    if map.contains_key("apiVersion") || map.contains_key("kind") {
        map.insert("apiVersion".into(), Value::String(api_version));
    }
    Value::Object(map)
}

impl std::fmt::Debug for ResourceDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.group_resource())
    }
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn group_version_path(&self) -> String {
        if self.group.is_empty() {
            format!("api/{}", self.version)
        } else {
            format!("apis/{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `deployments.apps`.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn subresource(&'static self, name: &str) -> Option<&'static Subresource> {
        self.subresources.iter().find(|s| s.name == name)
    }

    pub fn has_status(&self) -> bool {
        self.subresources.iter().any(|s| s.name == "status")
    }

    /// The group/resource objects are stored under.
    fn stored_as(&self) -> String {
        self.conversion
            .map_or_else(|| self.group_resource(), |c| c.stored_as.to_owned())
    }

    /// The store key of an object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced => {
                format!("/registry/{}/{ns}/{name}", self.stored_as())
            }
            _ => format!("/registry/{}/{name}", self.stored_as()),
        }
    }

    /// The store prefix of a collection (one namespace, or all).
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("/registry/{}/{ns}/", self.stored_as()),
            _ => format!("/registry/{}/", self.stored_as()),
        }
    }

    /// An object as sent (served form) as it is stored.
    pub fn to_storage(&self, obj: Value) -> Value {
        match self.conversion {
            None => obj,
            Some(c) => rename(
                obj,
                c.fields.iter().copied(),
                c.stored_api_version.to_owned(),
            ),
        }
    }

    /// A stored object in the served form.
    pub fn from_storage(&self, obj: Value) -> Value {
        match self.conversion {
            None => obj,
            Some(c) => rename(
                obj,
                c.fields.iter().map(|(a, b)| (*b, *a)),
                self.api_version(),
            ),
        }
    }

    /// A field selector's field in the stored form.
    pub fn stored_field(&self, field: &str) -> String {
        self.conversion
            .and_then(|c| {
                c.field_labels.iter().find_map(|(served, stored)| {
                    field
                        .strip_prefix(served)
                        .map(|rest| format!("{stored}{rest}"))
                })
            })
            .unwrap_or_else(|| field.to_owned())
    }
}

fn typed<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, String> {
    let object: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(object).map_err(|e| e.to_string())
}

fn add_schema<T: schemars::JsonSchema>(generator: &mut schemars::SchemaGenerator) {
    generator.subschema_for::<T>();
}

const fn status(group: &'static str, version: &'static str, kind: &'static str) -> Subresource {
    Subresource {
        name: "status",
        group,
        version,
        kind,
        verbs: &["get", "patch", "update"],
    }
}

const fn scale() -> Subresource {
    Subresource {
        name: "scale",
        group: "autoscaling",
        version: "v1",
        kind: "Scale",
        verbs: &["get", "patch", "update"],
    }
}

macro_rules! resource {
    ($ty:ty, $schema:literal, {$($field:ident: $value:expr),* $(,)?}) => {
        resource!($ty, $schema, None, {$($field: $value),*})
    };
    ($ty:ty, $schema:literal, $conversion:expr, {$($field:ident: $value:expr),* $(,)?}) => {
        ResourceDef {
            typed: typed::<$ty>,
            schema: $schema,
            add_schema: add_schema::<$ty>,
            conversion: $conversion,
            $($field: $value,)*
        }
    };
}

pub static RESOURCES: &[ResourceDef] = &[
    resource!(Namespace, "io.k8s.api.core.v1.Namespace", {
        group: "", version: "v1", kind: "Namespace", plural: "namespaces", singular: "namespace",
        namespaced: false, short_names: &["ns"], categories: &[], verbs: &["create", "delete", "get", "list", "patch", "update", "watch"],
        subresources: &[status("", "v1", "Namespace"), Subresource { name: "finalize", group: "", version: "v1", kind: "Namespace", verbs: &["update"] }],
    }),
    resource!(Node, "io.k8s.api.core.v1.Node", {
        group: "", version: "v1", kind: "Node", plural: "nodes", singular: "node",
        namespaced: false, short_names: &["no"], categories: &[], verbs: ALL_VERBS,
        subresources: &[status("", "v1", "Node")],
    }),
    resource!(Pod, "io.k8s.api.core.v1.Pod", {
        group: "", version: "v1", kind: "Pod", plural: "pods", singular: "pod",
        namespaced: true, short_names: &["po"], categories: &["all"], verbs: ALL_VERBS,
        subresources: &[
            status("", "v1", "Pod"),
            Subresource { name: "binding", group: "", version: "v1", kind: "Binding", verbs: &["create"] },
            Subresource { name: "log", group: "", version: "v1", kind: "Pod", verbs: &["get"] },
        ],
    }),
    resource!(Service, "io.k8s.api.core.v1.Service", {
        group: "", version: "v1", kind: "Service", plural: "services", singular: "service",
        namespaced: true, short_names: &["svc"], categories: &["all"], verbs: ALL_VERBS,
        subresources: &[status("", "v1", "Service")],
    }),
    resource!(Endpoints, "io.k8s.api.core.v1.Endpoints", {
        group: "", version: "v1", kind: "Endpoints", plural: "endpoints", singular: "endpoints",
        namespaced: true, short_names: &["ep"], categories: &[], verbs: READ_VERBS,
        subresources: &[],
    }),
    resource!(Event, "io.k8s.api.core.v1.Event", {
        group: "", version: "v1", kind: "Event", plural: "events", singular: "event",
        namespaced: true, short_names: &["ev"], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
    resource!(Deployment, "io.k8s.api.apps.v1.Deployment", {
        group: "apps", version: "v1", kind: "Deployment", plural: "deployments", singular: "deployment",
        namespaced: true, short_names: &["deploy"], categories: &["all"], verbs: ALL_VERBS,
        subresources: &[status("apps", "v1", "Deployment"), scale()],
    }),
    resource!(ReplicaSet, "io.k8s.api.apps.v1.ReplicaSet", {
        group: "apps", version: "v1", kind: "ReplicaSet", plural: "replicasets", singular: "replicaset",
        namespaced: true, short_names: &["rs"], categories: &["all"], verbs: ALL_VERBS,
        subresources: &[status("apps", "v1", "ReplicaSet"), scale()],
    }),
    resource!(EndpointSlice, "io.k8s.api.discovery.v1.EndpointSlice", {
        group: "discovery.k8s.io", version: "v1", kind: "EndpointSlice", plural: "endpointslices", singular: "endpointslice",
        namespaced: true, short_names: &[], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
    resource!(ConfigMap, "io.k8s.api.core.v1.ConfigMap", {
        group: "", version: "v1", kind: "ConfigMap", plural: "configmaps", singular: "configmap",
        namespaced: true, short_names: &["cm"], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
    resource!(Secret, "io.k8s.api.core.v1.Secret", {
        group: "", version: "v1", kind: "Secret", plural: "secrets", singular: "secret",
        namespaced: true, short_names: &[], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
    resource!(ServiceAccount, "io.k8s.api.core.v1.ServiceAccount", {
        group: "", version: "v1", kind: "ServiceAccount", plural: "serviceaccounts", singular: "serviceaccount",
        namespaced: true, short_names: &["sa"], categories: &[], verbs: ALL_VERBS,
        subresources: &[Subresource { name: "token", group: "authentication.k8s.io", version: "v1", kind: "TokenRequest", verbs: &["create"] }],
    }),
    resource!(EventV1, "io.k8s.api.events.v1.Event", Some(&EVENTS_V1), {
        group: "events.k8s.io", version: "v1", kind: "Event", plural: "events", singular: "event",
        namespaced: true, short_names: &["ev"], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
    // Reviews: asked (created) and answered, never stored.
    resource!(SelfSubjectReview, "io.k8s.api.authentication.v1.SelfSubjectReview", {
        group: "authentication.k8s.io", version: "v1", kind: "SelfSubjectReview", plural: "selfsubjectreviews", singular: "selfsubjectreview",
        namespaced: false, short_names: &[], categories: &[], verbs: &["create"],
        subresources: &[],
    }),
    resource!(SelfSubjectAccessReview, "io.k8s.api.authorization.v1.SelfSubjectAccessReview", {
        group: "authorization.k8s.io", version: "v1", kind: "SelfSubjectAccessReview", plural: "selfsubjectaccessreviews", singular: "selfsubjectaccessreview",
        namespaced: false, short_names: &[], categories: &[], verbs: &["create"],
        subresources: &[],
    }),
    resource!(SelfSubjectRulesReview, "io.k8s.api.authorization.v1.SelfSubjectRulesReview", {
        group: "authorization.k8s.io", version: "v1", kind: "SelfSubjectRulesReview", plural: "selfsubjectrulesreviews", singular: "selfsubjectrulesreview",
        namespaced: false, short_names: &[], categories: &[], verbs: &["create"],
        subresources: &[],
    }),
    resource!(ClusterRole, "io.k8s.api.rbac.v1.ClusterRole", {
        group: "rbac.authorization.k8s.io", version: "v1", kind: "ClusterRole", plural: "clusterroles", singular: "clusterrole",
        namespaced: false, short_names: &[], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
    resource!(ClusterRoleBinding, "io.k8s.api.rbac.v1.ClusterRoleBinding", {
        group: "rbac.authorization.k8s.io", version: "v1", kind: "ClusterRoleBinding", plural: "clusterrolebindings", singular: "clusterrolebinding",
        namespaced: false, short_names: &[], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
    resource!(Role, "io.k8s.api.rbac.v1.Role", {
        group: "rbac.authorization.k8s.io", version: "v1", kind: "Role", plural: "roles", singular: "role",
        namespaced: true, short_names: &[], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
    resource!(RoleBinding, "io.k8s.api.rbac.v1.RoleBinding", {
        group: "rbac.authorization.k8s.io", version: "v1", kind: "RoleBinding", plural: "rolebindings", singular: "rolebinding",
        namespaced: true, short_names: &[], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
    resource!(Lease, "io.k8s.api.coordination.v1.Lease", {
        group: "coordination.k8s.io", version: "v1", kind: "Lease", plural: "leases", singular: "lease",
        namespaced: true, short_names: &[], categories: &[], verbs: ALL_VERBS,
        subresources: &[],
    }),
];

/// Bodies of subresources that are not the resource itself.
pub fn typed_subresource(kind: &str, value: &Value) -> Result<Value, String> {
    match kind {
        "Scale" => typed::<Scale>(value),
        "Binding" => typed::<Binding>(value),
        "TokenRequest" => typed::<TokenRequest>(value),
        _ => Err(format!("no type for {kind}")),
    }
}

/// Schemas of subresource bodies, for OpenAPI.
pub fn add_subresource_schemas(generator: &mut schemars::SchemaGenerator) {
    add_schema::<Scale>(generator);
    add_schema::<Binding>(generator);
    add_schema::<TokenRequest>(generator);
}

/// The resource a URL names: by group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource of a kind.
pub fn by_kind(group: &str, kind: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.kind == kind)
}

/// Group/versions served, in discovery's preferred order.
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}
