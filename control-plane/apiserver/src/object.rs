//! Helpers on objects as JSON values: metadata fields, names, times.

use serde_json::{Map, Value, json};

/// `metadata`, created if missing.
pub fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

pub fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

pub fn name(object: &Value) -> Option<&str> {
    meta_str(object, "name").filter(|n| !n.is_empty())
}

pub fn namespace(object: &Value) -> Option<&str> {
    meta_str(object, "namespace").filter(|n| !n.is_empty())
}

pub fn resource_version(object: &Value) -> Option<&str> {
    meta_str(object, "resourceVersion").filter(|v| !v.is_empty())
}

pub fn set_resource_version(object: &mut Value, revision: i64) {
    meta_mut(object).insert(
        "resourceVersion".into(),
        Value::String(revision.to_string()),
    );
}

pub fn labels(object: &Value) -> Option<&Map<String, Value>> {
    object.get("metadata")?.get("labels")?.as_object()
}

/// Now, as Kubernetes writes times (RFC 3339, seconds).
pub fn now() -> String {
    let now = jiff::Timestamp::now();
    format!("{}", now.strftime("%Y-%m-%dT%H:%M:%SZ"))
}

/// Seconds since an RFC 3339 time (for AGE columns); None if it does not parse.
pub fn age_seconds(time: &str) -> Option<i64> {
    let then: jiff::Timestamp = time.parse().ok()?;
    Some(jiff::Timestamp::now().as_second() - then.as_second())
}

/// kubectl's AGE format: 5s, 3m, 2h, 4d (with a second unit for short spans, as kubectl does).
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..120 => format!("{s}s"),
        120..600 if s % 60 == 0 => format!("{}m", s / 60),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10_800 => format!("{}m", s / 60),
        10_800..28_800 => {
            let (h, m) = (s / 3600, (s % 3600) / 60);
            if m == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{m}m")
            }
        }
        28_800..172_800 => format!("{}h", s / 3600),
        172_800..31_536_000 => format!("{}d", s / 86_400),
        _ => format!("{}y", s / 31_536_000),
    }
}

/// A random name suffix as kube-apiserver makes them for `generateName`: 5 characters from an
/// alphabet without vowels (no accidental words) or look-alike characters.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    use rand::Rng;
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The value at a dotted path (`spec.nodeName`), if present.
pub fn at<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(object, |v, part| v.get(part))
}

/// A field as a string for selectors and columns: strings as they are, numbers and booleans
/// printed, missing as "".
pub fn field_string(object: &Value, path: &str) -> String {
    match at(object, path) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_print_like_kubectl() {
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(900), "15m");
        assert_eq!(human_duration(3 * 86_400), "3d");
    }

    #[test]
    fn generated_suffixes_use_the_alphabet() {
        let s = random_suffix();
        assert_eq!(s.len(), 5);
        assert!(
            s.bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
        );
    }
}
