//! Per-kind rules applied before an object is stored: defaulting (the fields kube-apiserver
//! fills in), validation (answered with 422 and the invalid fields), and what an update may and
//! may not change (status through the main resource, spec through status, immutable fields).

use serde_json::{Value, json};

use crate::{error::Cause, resources::ResourceDef, selector::LabelSelector, validation};

/// Fills in defaults, as kube-apiserver's defaulting functions do.
pub fn default(def: &ResourceDef, obj: &mut Value) {
    match def.kind {
        "Pod" => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
            }
            if obj.pointer("/status/phase").is_none() {
                obj["status"]["phase"] = json!("Pending");
            }
        }
        "Service" => default_service(obj),
        "Deployment" | "ReplicaSet" => {
            let spec = &mut obj["spec"];
            set_if_missing(spec, "replicas", json!(1));
            if def.kind == "Deployment" {
                set_if_missing(spec, "revisionHistoryLimit", json!(10));
                set_if_missing(spec, "progressDeadlineSeconds", json!(600));
                if spec.pointer("/strategy/type").is_none() {
                    spec["strategy"]["type"] = json!("RollingUpdate");
                }
                if spec.pointer("/strategy/type") == Some(&json!("RollingUpdate")) {
                    let ru = &mut spec["strategy"]["rollingUpdate"];
                    set_if_missing(ru, "maxSurge", json!("25%"));
                    set_if_missing(ru, "maxUnavailable", json!("25%"));
                }
            }
            if let Some(pod) = spec.pointer_mut("/template/spec") {
                default_pod_spec(pod);
            }
        }
        "Namespace" => {
            if obj.pointer("/spec/finalizers").is_none() {
                obj["spec"]["finalizers"] = json!(["kubernetes"]);
            }
            if obj.pointer("/status/phase").is_none() {
                obj["status"]["phase"] = json!("Active");
            }
        }
        "EndpointSlice" => {
            for ep in obj
                .get_mut("endpoints")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if ep.get("conditions").is_none() {
                    ep["conditions"] = json!({});
                }
            }
            for port in obj
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                set_if_missing(port, "protocol", json!("TCP"));
            }
        }
        "Event" if obj.get("type").is_none() => {
            obj["type"] = json!("Normal");
        }
        "Secret" => {
            if obj.get("type").is_none() {
                obj["type"] = json!("Opaque");
            }
            // stringData is a convenience for writers: merged into data, never stored.
            if let Some(Value::Object(strings)) =
                obj.as_object_mut().and_then(|o| o.remove("stringData"))
            {
                use base64::Engine;
                for (key, value) in strings {
                    let text = value.as_str().unwrap_or_default();
                    obj["data"][key] =
                        json!(base64::engine::general_purpose::STANDARD.encode(text));
                }
            }
        }
        _ => {}
    }
}

/// What a create may not set: the status of kinds whose status is written through `/status`
/// (a client's `podIP` and `Ready` must not reach EndpointSlices and every node's data
/// plane), as kube-apiserver's PrepareForCreate resets it. Nodes keep theirs (a kubelet
/// registers its node with its addresses and capacity).
pub fn prepare_create(def: &ResourceDef, obj: &mut Value) {
    if def.has_status()
        && def.kind != "Node"
        && let Some(m) = obj.as_object_mut()
    {
        m.remove("status");
    }
}

fn set_if_missing(obj: &mut Value, field: &str, value: Value) {
    if !obj.is_object() {
        *obj = json!({});
    }
    if obj.get(field).is_none_or(Value::is_null) {
        obj[field] = value;
    }
}

fn default_pod_spec(spec: &mut Value) {
    set_if_missing(spec, "restartPolicy", json!("Always"));
    set_if_missing(spec, "dnsPolicy", json!("ClusterFirst"));
    set_if_missing(spec, "schedulerName", json!("default-scheduler"));
    set_if_missing(spec, "terminationGracePeriodSeconds", json!(30));
    set_if_missing(spec, "securityContext", json!({}));
    set_if_missing(spec, "enableServiceLinks", json!(true));
    for field in ["containers", "initContainers"] {
        for c in spec
            .get_mut(field)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let image = c
                .get("image")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let latest = !image.rsplit('/').next().unwrap_or_default().contains(':')
                || image.ends_with(":latest");
            set_if_missing(
                c,
                "imagePullPolicy",
                json!(if latest { "Always" } else { "IfNotPresent" }),
            );
            set_if_missing(c, "terminationMessagePath", json!("/dev/termination-log"));
            set_if_missing(c, "terminationMessagePolicy", json!("File"));
            set_if_missing(c, "resources", json!({}));
            for p in c
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                set_if_missing(p, "protocol", json!("TCP"));
            }
        }
    }
}

fn default_service(obj: &mut Value) {
    let spec = &mut obj["spec"];
    set_if_missing(spec, "type", json!("ClusterIP"));
    set_if_missing(spec, "sessionAffinity", json!("None"));
    let external = matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer"));
    if spec["type"] != json!("ExternalName") {
        set_if_missing(spec, "internalTrafficPolicy", json!("Cluster"));
        set_if_missing(spec, "ipFamilies", json!(["IPv4"]));
        set_if_missing(spec, "ipFamilyPolicy", json!("SingleStack"));
    }
    if external {
        set_if_missing(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if spec["sessionAffinity"] == json!("ClientIP")
        && spec
            .pointer("/sessionAffinityConfig/clientIP/timeoutSeconds")
            .is_none()
    {
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 10800}});
    }
    for p in spec
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        set_if_missing(p, "protocol", json!("TCP"));
        if p.get("targetPort").is_none() {
            p["targetPort"] = p.get("port").cloned().unwrap_or(Value::Null);
        }
    }
    if obj.get("status").is_none() {
        obj["status"] = json!({"loadBalancer": {}});
    }
}

/// Validates an object about to be stored; the causes of a 422, empty if valid.
pub fn validate(def: &ResourceDef, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    validation::object_meta(def.kind, obj, &mut causes);
    match def.kind {
        "Pod" => {
            validate_pod_spec(obj.get("spec"), "spec", &mut causes);
            validation::resources(def.kind, obj, &mut causes);
        }
        "Service" => validate_service(obj, &mut causes),
        "Deployment" | "ReplicaSet" => {
            validate_workload(obj, &mut causes);
            validation::resources(def.kind, obj, &mut causes);
        }
        "EndpointSlice" => validate_endpoint_slice(obj, &mut causes),
        "ConfigMap" | "Secret" => validation::data_keys(def.kind, obj, &mut causes),
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => {
            causes.extend(crate::rbac::validate(def.kind, obj));
        }
        "Event" if obj.pointer("/involvedObject/name").is_none() => {
            causes.push(Cause::required("involvedObject.name"));
        }
        _ => {}
    }
    causes
}

fn validate_pod_spec(spec: Option<&Value>, at: &str, causes: &mut Vec<Cause>) {
    let Some(spec) = spec else {
        causes.push(Cause::required(at));
        return;
    };
    let containers = spec.get("containers").and_then(Value::as_array);
    match containers {
        None => causes.push(Cause::required(format!("{at}.containers"))),
        Some(list) if list.is_empty() => causes.push(Cause::required(format!("{at}.containers"))),
        Some(list) => {
            let mut seen = Vec::new();
            for (i, c) in list.iter().enumerate() {
                let field = format!("{at}.containers[{i}]");
                let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
                if name.is_empty() {
                    causes.push(Cause::required(format!("{field}.name")));
                } else if let Some(e) = validation::dns1123_label(name).into_iter().next() {
                    causes.push(Cause::invalid(
                        format!("{field}.name"),
                        format!("\"{name}\""),
                        e,
                    ));
                } else if seen.contains(&name) {
                    causes.push(Cause::duplicate(
                        format!("{field}.name"),
                        format!("\"{name}\""),
                    ));
                }
                seen.push(name);
                if c.get("image")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    causes.push(Cause::required(format!("{field}.image")));
                }
                for (j, p) in c
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let port = p.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
                    if !(1..=65535).contains(&port) {
                        causes.push(Cause::invalid(
                            format!("{field}.ports[{j}].containerPort"),
                            port,
                            "must be between 1 and 65535, inclusive",
                        ));
                    }
                }
            }
        }
    }
    if let Some(policy) = spec.get("restartPolicy").and_then(Value::as_str)
        && !["Always", "OnFailure", "Never"].contains(&policy)
    {
        causes.push(Cause::not_supported(
            format!("{at}.restartPolicy"),
            policy,
            &["Always", "OnFailure", "Never"],
        ));
    }
}

fn validate_service(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    let kind = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    const TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    if !TYPES.contains(&kind) {
        causes.push(Cause::not_supported("spec.type", kind, &TYPES));
    }
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    if ports.is_empty() && kind != "ExternalName" && !headless {
        causes.push(Cause::required("spec.ports"));
    }
    let mut names = Vec::new();
    let mut keys = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            causes.push(Cause::invalid(
                format!("{at}.port"),
                port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
        if !["TCP", "UDP", "SCTP"].contains(&proto) {
            causes.push(Cause::not_supported(
                format!("{at}.protocol"),
                proto,
                &["SCTP", "TCP", "UDP"],
            ));
        }
        let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            causes.push(Cause::required(format!("{at}.name")));
        } else if !name.is_empty() && names.contains(&name) {
            causes.push(Cause::duplicate(
                format!("{at}.name"),
                format!("\"{name}\""),
            ));
        }
        names.push(name);
        if keys.contains(&(port, proto)) {
            causes.push(Cause::duplicate(
                at.to_string(),
                format!("{{\"protocol\":\"{proto}\",\"port\":{port}}}"),
            ));
        }
        keys.push((port, proto));
        if let Some(node_port) = p.get("nodePort").and_then(Value::as_i64)
            && !node_ports_of(kind)
            && node_port != 0
        {
            causes.push(Cause::forbidden(
                format!("{at}.nodePort"),
                format!("may not be used when `type` is '{kind}'"),
            ));
        }
    }
    if let Some(port) = spec.get("healthCheckNodePort").and_then(Value::as_i64)
        && port != 0
        && !health_check_of(&spec)
    {
        causes.push(Cause::invalid(
            "spec.healthCheckNodePort",
            port,
            "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
        ));
    }
    if kind == "ExternalName"
        && spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .is_some_and(|ip| !ip.is_empty())
    {
        causes.push(Cause::forbidden(
            "spec.clusterIPs",
            "may not be set for ExternalName services",
        ));
    }
    if let Some(affinity) = spec.get("sessionAffinity").and_then(Value::as_str)
        && !["None", "ClientIP"].contains(&affinity)
    {
        causes.push(Cause::not_supported(
            "spec.sessionAffinity",
            affinity,
            &["ClientIP", "None"],
        ));
    }
}

/// Whether services of type `kind` have node ports.
pub fn node_ports_of(kind: &str) -> bool {
    matches!(kind, "NodePort" | "LoadBalancer")
}

/// Whether a service spec has a health check node port (a LoadBalancer keeping the client's
/// address).
pub fn health_check_of(spec: &Value) -> bool {
    spec.get("type").and_then(Value::as_str) == Some("LoadBalancer")
        && spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local")
}

/// What an update of a service's type leaves behind goes with it, when the client left it
/// as it was (kube-apiserver's dropTypeDependentFields): the ClusterIP of a service becoming
/// an ExternalName, the node ports of one becoming a ClusterIP, the health check node port of
/// one no longer a `Local` LoadBalancer. Changed values stay, for validation to refuse.
fn drop_type_dependent_fields(old: &Value, new: &mut Value) {
    let type_of = |svc: &Value| {
        svc.pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_owned()
    };
    let (old_type, new_type) = (type_of(old), type_of(new));
    let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if old_type != "ExternalName"
        && new_type == "ExternalName"
        && spec.get("clusterIP") == old.pointer("/spec/clusterIP")
    {
        spec.remove("clusterIP");
        spec.remove("clusterIPs");
    }
    if node_ports_of(&old_type) && !node_ports_of(&new_type) {
        let old_ports: Vec<&Value> = old
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("nodePort"))
            .collect();
        for port in spec
            .get_mut("ports")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if port.get("nodePort").is_some_and(|n| old_ports.contains(&n))
                && let Some(port) = port.as_object_mut()
            {
                port.remove("nodePort");
            }
        }
    }
    let old_spec = old.get("spec").cloned().unwrap_or_default();
    let new_spec = Value::Object(spec.clone());
    if health_check_of(&old_spec)
        && !health_check_of(&new_spec)
        && spec.get("healthCheckNodePort") == old_spec.get("healthCheckNodePort")
    {
        spec.remove("healthCheckNodePort");
    }
}

fn validate_workload(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    if let Some(replicas) = spec.get("replicas").and_then(Value::as_i64)
        && replicas < 0
    {
        causes.push(Cause::invalid(
            "spec.replicas",
            replicas,
            "must be greater than or equal to 0",
        ));
    }
    let Some(selector) = spec.get("selector") else {
        causes.push(Cause::required("spec.selector"));
        return;
    };
    let parsed = LabelSelector::from_label_selector(selector);
    match &parsed {
        Err(e) => causes.push(Cause::invalid("spec.selector", "selector", e)),
        Ok(s) if s.is_empty() => causes.push(Cause::invalid(
            "spec.selector",
            "{}",
            "empty selector is invalid for deployment",
        )),
        Ok(s) => {
            let template = json!({"metadata": spec.pointer("/template/metadata").cloned().unwrap_or(json!({}))});
            if !s.matches(&template) {
                causes.push(Cause::invalid(
                    "spec.template.metadata.labels",
                    format!(
                        "{}",
                        spec.pointer("/template/metadata/labels")
                            .cloned()
                            .unwrap_or(json!({}))
                    ),
                    "`selector` does not match template `labels`",
                ));
            }
        }
    }
    validate_pod_spec(spec.pointer("/template/spec"), "spec.template.spec", causes);
}

fn validate_endpoint_slice(obj: &Value, causes: &mut Vec<Cause>) {
    match obj.get("addressType").and_then(Value::as_str) {
        None => causes.push(Cause::required("addressType")),
        Some(t) if !["IPv4", "IPv6", "FQDN"].contains(&t) => causes.push(Cause::not_supported(
            "addressType",
            t,
            &["FQDN", "IPv4", "IPv6"],
        )),
        _ => {}
    }
    for (i, ep) in obj
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if ep
            .get("addresses")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            causes.push(Cause::required(format!("endpoints[{i}].addresses")));
        }
    }
}

/// What an update of the main resource (not a subresource) keeps from the stored object, and
/// what it may not change. `new` is adjusted in place; returns the causes of a 422.
pub fn prepare_update(def: &ResourceDef, old: &Value, new: &mut Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    // Status is written through /status.
    if def.has_status() {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    match def.kind {
        "RoleBinding" | "ClusterRoleBinding" if old.get("roleRef") != new.get("roleRef") => {
            causes.push(Cause::invalid(
                "roleRef",
                new.get("roleRef").cloned().unwrap_or_default(),
                "cannot change roleRef",
            ));
        }
        "Service" => {
            drop_type_dependent_fields(old, new);
            // An address, once given, stays (an ExternalName has none to keep or change).
            let old_ip = old
                .pointer("/spec/clusterIP")
                .filter(|ip| ip.as_str().is_some_and(|ip| !ip.is_empty()));
            let new_ip = new.pointer("/spec/clusterIP");
            if old_ip.is_none() || new.pointer("/spec/type") == Some(&json!("ExternalName")) {
                // Nothing to keep.
            } else if new_ip.is_none_or(|v| v.as_str() == Some("")) {
                if let Some(ip) = old_ip {
                    new["spec"]["clusterIP"] = ip.clone();
                    if let Some(ips) = old.pointer("/spec/clusterIPs") {
                        new["spec"]["clusterIPs"] = ips.clone();
                    }
                }
            } else if new_ip != old_ip {
                causes.push(Cause::invalid(
                    "spec.clusterIPs[0]",
                    new_ip.cloned().unwrap_or_default(),
                    "may not change once set",
                ));
            }
        }
        "Pod" => {
            let (mut a, mut b) = (
                old.get("spec").cloned().unwrap_or_default(),
                new.get("spec").cloned().unwrap_or_default(),
            );
            // Images (and the deadline) may change; nothing else in a pod's spec may.
            for spec in [&mut a, &mut b] {
                for field in ["containers", "initContainers"] {
                    for c in spec
                        .get_mut(field)
                        .and_then(Value::as_array_mut)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(m) = c.as_object_mut() {
                            m.remove("image");
                        }
                    }
                }
                if let Some(m) = spec.as_object_mut() {
                    m.remove("activeDeadlineSeconds");
                }
            }
            if a != b {
                causes.push(Cause::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`",
                ));
            }
        }
        "Deployment" | "ReplicaSet"
            if old.pointer("/spec/selector") != new.pointer("/spec/selector") =>
        {
            causes.push(Cause::invalid(
                "spec.selector",
                new.pointer("/spec/selector").cloned().unwrap_or_default(),
                "field is immutable",
            ));
        }
        _ => {}
    }
    causes
}

/// An update through /status changes only the status: everything else comes from the stored
/// object (metadata labels and annotations included, as kube-apiserver does for most kinds).
pub fn prepare_status_update(old: &Value, new: &mut Value) {
    let status = new.get("status").cloned();
    let mut merged = old.clone();
    match status {
        Some(s) => merged["status"] = s,
        None => {
            if let Some(m) = merged.as_object_mut() {
                m.remove("status");
            }
        }
    }
    merged["metadata"]["resourceVersion"] = new
        .pointer("/metadata/resourceVersion")
        .cloned()
        .unwrap_or(Value::Null);
    *new = merged;
}

/// Whether an update changes what `metadata.generation` counts: the spec (or, for kinds
/// without one, anything but metadata and status).
pub fn spec_changed(old: &Value, new: &Value) -> bool {
    match (old.get("spec"), new.get("spec")) {
        (None, None) => {
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(m) = v.as_object_mut() {
                    m.remove("metadata");
                    m.remove("status");
                }
                v
            };
            strip(old) != strip(new)
        }
        (a, b) => a != b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    #[test]
    fn pods_get_kube_apiservers_defaults_and_need_containers() {
        let def = find("", "v1", "pods").unwrap();
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "nginx", "ports": [{"containerPort": 80}]}]}});
        default(def, &mut pod);
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(
            pod["spec"]["containers"][0]["imagePullPolicy"], "Always",
            "no tag means latest"
        );
        assert_eq!(pod["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(pod["status"]["phase"], "Pending");
        assert!(validate(def, &pod).is_empty());
        let bad = json!({"metadata": {"name": "Bad_Name"}, "spec": {"containers": []}});
        let causes: Vec<String> = validate(def, &bad).into_iter().map(|c| c.field).collect();
        assert_eq!(causes, ["metadata.name", "spec.containers"]);
    }

    #[test]
    fn services_default_target_ports_and_validate_ports() {
        let def = find("", "v1", "services").unwrap();
        let mut svc = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}});
        default(def, &mut svc);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert!(validate(def, &svc).is_empty());
        let bad = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}, {"port": 70000, "name": "b"}]}});
        let fields: Vec<String> = validate(def, &bad).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, ["spec.ports[0].name", "spec.ports[1].port"]);
    }

    #[test]
    fn deployments_need_a_selector_matching_the_template() {
        let def = find("apps", "v1", "deployments").unwrap();
        let mut d = json!({"metadata": {"name": "d"}, "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
        }});
        default(def, &mut d);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let fields: Vec<String> = validate(def, &d).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, ["spec.template.metadata.labels"]);
    }

    #[test]
    fn updates_keep_status_and_refuse_immutable_changes() {
        let def = find("", "v1", "services").unwrap();
        let old = json!({"spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 80}]}, "status": {"loadBalancer": {}}});
        let mut new = json!({"spec": {"ports": [{"port": 81}]}, "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}});
        assert!(prepare_update(def, &old, &mut new).is_empty());
        assert_eq!(
            new["spec"]["clusterIP"], "10.96.0.5",
            "an omitted clusterIP keeps the allocated one"
        );
        assert_eq!(
            new["status"],
            json!({"loadBalancer": {}}),
            "status is not written through the main resource"
        );
        let mut changed = json!({"spec": {"clusterIP": "10.96.0.6"}});
        assert_eq!(prepare_update(def, &old, &mut changed).len(), 1);
    }
}
