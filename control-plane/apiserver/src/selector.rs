//! Label and field selectors, as `?labelSelector=` and `?fieldSelector=` spell them.

use serde_json::Value;

use crate::object::{field_string, labels};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Exists,
    NotExists,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A label selector; empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// Splits on commas outside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(s) {
            let req = if let Some(key) = part.strip_prefix('!') {
                Requirement {
                    key: key.trim().to_owned(),
                    op: Op::NotExists,
                }
            } else if let Some((key, rest)) = split_word(part, " notin ") {
                Requirement {
                    key,
                    op: Op::NotIn(set(rest)?),
                }
            } else if let Some((key, rest)) = split_word(part, " in ") {
                Requirement {
                    key,
                    op: Op::In(set(rest)?),
                }
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement {
                    key: key.trim().into(),
                    op: Op::NotEquals(value.trim().into()),
                }
            } else if let Some((key, value)) =
                part.split_once("==").or_else(|| part.split_once('='))
            {
                Requirement {
                    key: key.trim().into(),
                    op: Op::Equals(value.trim().into()),
                }
            } else {
                Requirement {
                    key: part.to_owned(),
                    op: Op::Exists,
                }
            };
            if !valid_key(&req.key) {
                return Err(format!("invalid label key {:?} in selector {s:?}", req.key));
            }
            let values: Vec<&String> = match &req.op {
                Op::Equals(v) | Op::NotEquals(v) => vec![v],
                Op::In(vs) | Op::NotIn(vs) => vs.iter().collect(),
                _ => vec![],
            };
            if let Some(bad) = values.into_iter().find(|v| !valid_value(v)) {
                return Err(format!("invalid label value {bad:?} in selector {s:?}"));
            }
            requirements.push(req);
        }
        Ok(Self { requirements })
    }

    /// The selector of a `matchLabels`/`matchExpressions` object (Deployment, ReplicaSet).
    pub fn from_label_selector(selector: &Value) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in labels {
                requirements.push(Requirement {
                    key: k.clone(),
                    op: Op::Equals(v.as_str().unwrap_or_default().into()),
                });
            }
        }
        for expr in selector
            .get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = expr
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let values: Vec<String> = expr
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            let op = match expr.get("operator").and_then(Value::as_str) {
                Some("In") => Op::In(values),
                Some("NotIn") => Op::NotIn(values),
                Some("Exists") => Op::Exists,
                Some("DoesNotExist") => Op::NotExists,
                other => return Err(format!("unknown selector operator {other:?}")),
            };
            requirements.push(Requirement { key, op });
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = labels(object);
        self.requirements.iter().all(|r| {
            let value = labels.and_then(|l| l.get(&r.key)).and_then(Value::as_str);
            match &r.op {
                Op::Exists => value.is_some(),
                Op::NotExists => value.is_none(),
                Op::Equals(v) => value == Some(v.as_str()),
                Op::NotEquals(v) => value != Some(v.as_str()),
                Op::In(vs) => value.is_some_and(|x| vs.iter().any(|v| v == x)),
                Op::NotIn(vs) => value.is_none_or(|x| vs.iter().all(|v| v != x)),
            }
        })
    }

    /// The selector as kubectl prints it.
    pub fn to_display(&self) -> String {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match &r.op {
                Op::Exists => r.key.clone(),
                Op::NotExists => format!("!{}", r.key),
                Op::Equals(v) => format!("{}={v}", r.key),
                Op::NotEquals(v) => format!("{}!={v}", r.key),
                Op::In(vs) => format!("{} in ({})", r.key, vs.join(",")),
                Op::NotIn(vs) => format!("{} notin ({})", r.key, vs.join(",")),
            })
            .collect();
        parts.join(",")
    }
}

fn split_word(part: &str, word: &str) -> Option<(String, String)> {
    let at = part.find(word)?;
    Some((
        part[..at].trim().to_owned(),
        part[at + word.len()..].trim().to_owned(),
    ))
}

fn set(s: String) -> Result<Vec<String>, String> {
    let inner = s
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesized set, got {s:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect())
}

/// A field selector: `field=value` and `field!=value` terms, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses `s`; every field must be one the resource supports (`supported`).
    pub fn parse(s: &str, supported: &[&str]) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in split_top_level(s) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector: {part:?}"));
            };
            let field = field.trim();
            if !supported.contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.terms
            .iter()
            .all(|(field, equal, value)| (field_string(object, field) == *value) == *equal)
    }
}

/// Fields each resource can be selected by, beside `metadata.name` and `metadata.namespace`.
pub fn supported_fields(plural: &str) -> Vec<&'static str> {
    let mut fields = vec!["metadata.name", "metadata.namespace"];
    fields.extend_from_slice(match plural {
        "pods" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ][..],
        "events" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ][..],
        "nodes" => &["spec.unschedulable"][..],
        "namespaces" => &["status.phase"][..],
        "services" => &["spec.clusterIP", "spec.type"][..],
        "replicasets" => &["status.replicas"][..],
        _ => &[][..],
    });
    fields
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "labels": labels}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}})
    }

    #[test]
    fn label_selectors_match_like_kubernetes() {
        let p = pod(json!({"app": "web", "tier": "front"}));
        for (selector, expected) in [
            ("", true),
            ("app=web", true),
            ("app==web,tier=front", true),
            ("app!=web", false),
            ("app in (web, api)", true),
            ("app notin (web)", false),
            ("tier,!canary", true),
            ("canary", false),
            ("app in (api),tier=front", false),
        ] {
            let s = LabelSelector::parse(selector).unwrap();
            assert_eq!(s.matches(&p), expected, "{selector}");
        }
        assert!(
            LabelSelector::parse("app in web").is_err(),
            "a set needs parentheses"
        );
        assert!(LabelSelector::parse("app=we b").is_err());
    }

    #[test]
    fn match_expressions_become_requirements() {
        let s = LabelSelector::from_label_selector(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "back"]}]
        }))
        .unwrap();
        assert!(s.matches(&pod(json!({"app": "web", "tier": "back"}))));
        assert!(!s.matches(&pod(json!({"app": "web"}))));
        assert_eq!(s.to_display(), "app=web,tier in (front,back)");
    }

    #[test]
    fn field_selectors_check_support_and_match() {
        let fields = supported_fields("pods");
        let s = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed", &fields).unwrap();
        assert!(s.matches(&pod(json!({}))));
        let s = FieldSelector::parse("metadata.name==q", &fields).unwrap();
        assert!(!s.matches(&pod(json!({}))));
        assert_eq!(
            FieldSelector::parse("spec.image=x", &fields).unwrap_err(),
            "field label not supported: spec.image"
        );
    }
}
