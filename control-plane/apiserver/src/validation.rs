//! What apimachinery validates on every object, with its rules and its messages (clients and
//! users read them): names (DNS-1123 labels and subdomains, DNS-1035 labels, by kind), label
//! keys and values, annotations (keys, total size), owner references; and resource quantities
//! (parsed by `kube_quantity`, compared exactly).

use kube_quantity::ParsedQuantity;
use serde_json::Value;

use crate::error::Cause;

const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_LABEL: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const QUALIFIED_NAME: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const QUANTITY: &str =
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";
/// The most bytes all of an object's annotations (keys and values) may hold.
const ANNOTATIONS_MAX: usize = 256 * 1024;

/// What is wrong with `s` as a DNS-1123 label (namespaces, container names, ports' names).
pub fn dns1123_label(s: &str) -> Vec<String> {
    let mut errs = length(s, 63);
    if !label_like(s, false) {
        errs.push(DNS1123_LABEL.into());
    }
    errs
}

/// What is wrong with `s` as a DNS-1035 label (services: their names become DNS names that
/// must not look like numbers).
pub fn dns1035_label(s: &str) -> Vec<String> {
    let mut errs = length(s, 63);
    if !label_like(s, true) {
        errs.push(DNS1035_LABEL.into());
    }
    errs
}

/// What is wrong with `s` as a DNS-1123 subdomain (most object names, label key prefixes).
pub fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut errs = length(s, 253);
    if !s.split('.').all(|part| label_like(part, false)) {
        errs.push(DNS1123_SUBDOMAIN.into());
    }
    errs
}

fn length(s: &str, max: usize) -> Vec<String> {
    if s.len() > max {
        vec![format!("must be no more than {max} characters")]
    } else {
        Vec::new()
    }
}

fn label_like(s: &str, letter_first: bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && if letter_first {
            b[0].is_ascii_lowercase()
        } else {
            b[0] != b'-'
        }
        && b[b.len() - 1] != b'-'
}

/// Alphanumerics, with '-', '_' and '.' inside (label values, names of qualified names).
fn name_like(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// What is wrong with `s` as a qualified name (label and annotation keys):
/// `[prefix/]name`, the prefix a DNS subdomain, the name at most 63 characters.
pub fn qualified_name(s: &str) -> Vec<String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if name.contains('/') {
        return vec![format!(
            "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        )];
    }
    let mut errs = Vec::new();
    match prefix {
        Some("") => errs.push("prefix part must be non-empty".into()),
        Some(prefix) => errs.extend(
            dns1123_subdomain(prefix)
                .into_iter()
                .map(|e| format!("prefix part {e}")),
        ),
        None => {}
    }
    if name.is_empty() {
        errs.push("name part must be non-empty".into());
    } else {
        if name.len() > 63 {
            errs.push("name part must be no more than 63 characters".into());
        }
        if !name_like(name) {
            errs.push(QUALIFIED_NAME.into());
        }
    }
    errs
}

/// What is wrong with `s` as a label value.
pub fn label_value(s: &str) -> Vec<String> {
    let mut errs = length(s, 63);
    if !s.is_empty() && !name_like(s) {
        errs.push(LABEL_VALUE.into());
    }
    errs
}

/// What is wrong with a name that must be one segment of a URL path.
pub fn path_segment(name: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if name == "." || name == ".." {
        errs.push(format!("may not be '{name}'"));
    }
    for bad in ["/", "%"] {
        if name.contains(bad) {
            errs.push(format!("may not contain '{bad}'"));
        }
    }
    errs
}

/// What is wrong with an object's name, by its kind's rule.
pub fn object_name(kind: &str, name: &str) -> Vec<String> {
    match kind {
        "Namespace" => dns1123_label(name),
        "Service" => dns1035_label(name),
        // RBAC names are path segments (`system:discovery`).
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => path_segment(name),
        _ => dns1123_subdomain(name),
    }
}

/// Validates `metadata`: name (by kind), labels, annotations, owner references.
pub fn object_meta(kind: &str, obj: &Value, causes: &mut Vec<Cause>) {
    let meta = obj.get("metadata").cloned().unwrap_or_default();
    let name = meta.get("name").and_then(Value::as_str).unwrap_or_default();
    if name.is_empty() {
        causes.push(Cause::required("metadata.name"));
    } else {
        for e in object_name(kind, name) {
            causes.push(Cause::invalid("metadata.name", format!("\"{name}\""), e));
        }
    }
    for (key, value) in meta
        .get("labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        for e in qualified_name(key) {
            causes.push(Cause::invalid("metadata.labels", format!("\"{key}\""), e));
        }
        let value = value.as_str().unwrap_or_default();
        for e in label_value(value) {
            causes.push(Cause::invalid(
                format!("metadata.labels.{key}"),
                format!("\"{value}\""),
                e,
            ));
        }
    }
    let mut size = 0;
    for (key, value) in meta
        .get("annotations")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        for e in qualified_name(&key.to_lowercase()) {
            causes.push(Cause::invalid(
                "metadata.annotations",
                format!("\"{key}\""),
                e,
            ));
        }
        size += key.len() + value.as_str().map_or(0, str::len);
    }
    if size > ANNOTATIONS_MAX {
        causes.push(Cause::too_long(
            "metadata.annotations",
            format!("must have at most {ANNOTATIONS_MAX} bytes"),
        ));
    }
    owner_references(&meta, causes);
}

fn owner_references(meta: &Value, causes: &mut Vec<Cause>) {
    let refs = meta
        .get("ownerReferences")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut controllers = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let field = format!("metadata.ownerReferences[{i}]");
        for (key, what) in [
            ("apiVersion", "version"),
            ("kind", "kind"),
            ("name", "name"),
            ("uid", "uid"),
        ] {
            if r.get(key).and_then(Value::as_str).is_none_or(str::is_empty) {
                causes.push(Cause::invalid(
                    format!("{field}.{key}"),
                    "\"\"",
                    format!("{what} must not be empty"),
                ));
            }
        }
        if r.get("controller").and_then(Value::as_bool) == Some(true) {
            controllers.push(format!(
                "{}/{}",
                r.get("kind").and_then(Value::as_str).unwrap_or_default(),
                r.get("name").and_then(Value::as_str).unwrap_or_default()
            ));
        }
    }
    if controllers.len() > 1 {
        causes.push(Cause::invalid(
            "metadata.ownerReferences",
            format!("[{}]", controllers.join(", ")),
            format!(
                "Only one reference can have Controller set to true. Found \"true\" in references for {}",
                controllers.join(" and ")
            ),
        ));
    }
}

/// The most bytes a ConfigMap's or Secret's data may hold.
const DATA_MAX: usize = 1024 * 1024;

/// A ConfigMap's `data` and `binaryData`, a Secret's `data`: keys as files in a volume
/// would have them (alphanumerics, '-', '_', '.'; not `.` or `..`), each once, at most 1 MiB
/// in all.
pub fn data_keys(kind: &str, obj: &Value, causes: &mut Vec<Cause>) {
    let fields: &[&str] = if kind == "ConfigMap" {
        &["data", "binaryData"]
    } else {
        &["data"]
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut size = 0;
    for field in fields {
        for (key, value) in obj
            .get(*field)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let valid = !key.is_empty()
                && key.len() <= 253
                && key != "."
                && key != ".."
                && key
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
            if !valid {
                causes.push(Cause::invalid(
                    format!("{field}[{key}]"),
                    format!("\"{key}\""),
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                ));
            }
            if !seen.insert(key.clone()) {
                causes.push(Cause::invalid(
                    format!("{field}[{key}]"),
                    format!("\"{key}\""),
                    "duplicate of key present in data",
                ));
            }
            size += key.len() + value.as_str().map_or(0, str::len);
        }
    }
    if size > DATA_MAX {
        causes.push(Cause::too_long(
            "",
            format!("must have at most {DATA_MAX} bytes"),
        ));
    }
}

/// A quantity, or kube-apiserver's message for one that is not.
pub fn quantity(s: &str) -> Result<ParsedQuantity, String> {
    if !matches_quantity_pattern(s) {
        return Err(QUANTITY.into());
    }
    ParsedQuantity::try_from(s).map_err(|_| QUANTITY.into())
}

/// `^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$`, the shape kube-apiserver accepts.
fn matches_quantity_pattern(s: &str) -> bool {
    let rest = s.strip_prefix(['+', '-']).unwrap_or(s);
    let number = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    if number == 0 {
        return false;
    }
    let suffix = &rest[number..];
    let letters = suffix
        .find(|c: char| !"eEinumkKMGTP".contains(c))
        .unwrap_or(suffix.len());
    let exponent = &suffix[letters..];
    let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    digits.bytes().all(|c| c.is_ascii_digit())
}

/// The quantities an object of `kind` holds, with their paths: containers' requests and
/// limits and a pod's overhead (pods and pod templates), a node's capacity and allocatable.
pub fn quantities<'a>(kind: &str, obj: &'a Value) -> Vec<(String, &'a str)> {
    let mut out = Vec::new();
    let mut list = |at: String, v: Option<&'a Value>| {
        for (name, q) in v.and_then(Value::as_object).into_iter().flatten() {
            if let Some(q) = q.as_str() {
                out.push((format!("{at}.{name}"), q));
            }
        }
    };
    let pod_spec = match kind {
        "Pod" => Some(("spec", obj.get("spec"))),
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job" => {
            Some(("spec.template.spec", obj.pointer("/spec/template/spec")))
        }
        _ => None,
    };
    if let Some((at, Some(spec))) = pod_spec {
        for group in ["initContainers", "containers"] {
            for (i, c) in spec
                .get(group)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                for part in ["requests", "limits"] {
                    list(
                        format!("{at}.{group}[{i}].resources.{part}"),
                        c.pointer(&format!("/resources/{part}")),
                    );
                }
            }
        }
        list(format!("{at}.overhead"), spec.get("overhead"));
    }
    if kind == "Node" {
        for part in ["capacity", "allocatable"] {
            list(
                format!("status.{part}"),
                obj.pointer(&format!("/status/{part}")),
            );
        }
    }
    out
}

/// Containers' requests and limits must be non-negative and a request no more than its limit.
pub fn resources(kind: &str, obj: &Value, causes: &mut Vec<Cause>) {
    for (path, q) in quantities(kind, obj) {
        if let Ok(parsed) = quantity(q)
            && parsed < ParsedQuantity::default()
        {
            causes.push(Cause::invalid(
                path,
                format!("\"{q}\""),
                "must be greater than or equal to 0",
            ));
        }
    }
    let spec = match kind {
        "Pod" => obj.get("spec"),
        _ => obj.pointer("/spec/template/spec"),
    };
    let at = if kind == "Pod" {
        "spec"
    } else {
        "spec.template.spec"
    };
    for group in ["initContainers", "containers"] {
        for (i, c) in spec
            .and_then(|s| s.get(group))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let requests = c.pointer("/resources/requests").and_then(Value::as_object);
            let limits = c.pointer("/resources/limits").and_then(Value::as_object);
            for (name, request) in requests.into_iter().flatten() {
                let Some(limit) = limits.and_then(|l| l.get(name)).and_then(Value::as_str) else {
                    continue;
                };
                let request = request.as_str().unwrap_or_default();
                if let (Ok(r), Ok(l)) = (quantity(request), quantity(limit))
                    && r > l
                {
                    causes.push(Cause::invalid(
                        format!("{at}.{group}[{i}].resources.requests"),
                        format!("\"{request}\""),
                        format!("must be less than or equal to {name} limit of {limit}"),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_follow_apimachinery() {
        assert!(dns1123_label("web-1").is_empty());
        assert!(!dns1123_label("Web").is_empty());
        assert!(!dns1123_label(&"a".repeat(64)).is_empty());
        assert!(dns1035_label("web").is_empty());
        assert!(
            !dns1035_label("1web").is_empty(),
            "a service name starts with a letter"
        );
        assert!(!dns1123_label("a.b").is_empty());
        assert!(dns1123_subdomain("web.example-1").is_empty());
        assert!(!dns1123_subdomain("-web").is_empty());
        assert!(!dns1123_subdomain("web..x").is_empty());
        assert!(qualified_name("app.kubernetes.io/name").is_empty());
        assert!(qualified_name("Tier_1").is_empty());
        assert!(!qualified_name("a/b/c").is_empty());
        assert!(!qualified_name("/x").is_empty());
        assert!(!qualified_name("Bad Prefix/x").is_empty());
        assert!(!qualified_name(&"k".repeat(64)).is_empty());
        assert!(label_value("").is_empty());
        assert!(label_value("v1.2_beta").is_empty());
        assert!(!label_value("-v").is_empty());
        assert!(!label_value("has space").is_empty());
    }

    #[test]
    fn quantities_are_checked_and_compared_exactly() {
        for good in ["100m", "1.5", "128Mi", "2e3", "1n", "0.1Gi"] {
            assert!(quantity(good).is_ok(), "{good}");
        }
        for bad in ["lots", "", "1 Gi", "12XB", "--1"] {
            assert!(quantity(bad).is_err(), "{bad}");
        }
        assert!(quantity("1001m").unwrap() > quantity("1").unwrap());
        assert!(quantity("1024Mi").unwrap() == quantity("1Gi").unwrap());
    }
}
