//! Kubernetes' protobuf request bodies (`application/vnd.kubernetes.protobuf`), decoded into
//! the JSON form the rest of the server works on.
//!
//! kubectl's typed clients (`kubectl create namespace|configmap|secret|deployment|role|...`,
//! `kubectl create token`, `kubectl auth can-i`) send protobuf. A body is the four bytes
//! `k8s\0` and a `runtime.Unknown` message: the object's apiVersion and kind, and the object
//! encoded as its `generated.proto` message. The messages' fields come from
//! `protobuf.fields` (written by `cargo xtask gen-protobuf` from the k8s-pb crate); their JSON
//! names from the OpenAPI definitions this server publishes, so a name is spelled as kube's
//! JSON spells it (`podIPs`, not `podIps`).
//!
//! Responses go the other way ([`encode`]) for a client that prefers protobuf (client-go's
//! typed clients list it first): objects, lists and Status, with the same table. Anything the
//! table cannot say (a field of a newer Kubernetes) leaves the answer in JSON, which those
//! clients also take. Watches and Tables are answered in JSON.
//!
//! What JSON writes differently, converted as kube's types do: `Time` (seconds, nanos) as
//! RFC 3339, `MicroTime` with microseconds, `IntOrString` as a number or a string, `Quantity`
//! as its string, `RawExtension` and `FieldsV1` as the JSON they hold, bytes as base64, maps as
//! objects. Go writes every non-pointer field of a message, empty or not; empty strings and
//! zero times are left out here, as JSON's `omitempty` leaves them out (numbers and booleans
//! are kept: for a pointer field, `replicas: 0` or `automountServiceAccountToken: false` is
//! what the client asked for). A field this server does not know, an unknown message, or a
//! compressed body is refused with the reason, never dropped silently.

use std::{collections::HashMap, sync::OnceLock};

use base64::Engine;
use serde_json::{Map, Value, json};

/// The media type.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// What every body starts with.
const MAGIC: &[u8] = b"k8s\0";

const TIME: &str = "k8s.io.apimachinery.pkg.apis.meta.v1.Time";
const MICRO_TIME: &str = "k8s.io.apimachinery.pkg.apis.meta.v1.MicroTime";
const DURATION: &str = "k8s.io.apimachinery.pkg.apis.meta.v1.Duration";
const FIELDS_V1: &str = "k8s.io.apimachinery.pkg.apis.meta.v1.FieldsV1";
const INT_OR_STRING: &str = "k8s.io.apimachinery.pkg.util.intstr.IntOrString";
const QUANTITY: &str = "k8s.io.apimachinery.pkg.api.resource.Quantity";
const RAW_EXTENSION: &str = "k8s.io.apimachinery.pkg.runtime.RawExtension";
const OBJECT_META: &str = "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Label {
    Optional,
    Repeated,
    Map,
}

#[derive(Debug)]
struct Field {
    json_name: String,
    label: Label,
    /// A scalar (`string`, `bytes`, `bool`, `int32`, `int64`, `double`) or a message's name.
    kind: &'static str,
}

type Messages = HashMap<&'static str, HashMap<u32, Field>>;

/// Each message's fields by JSON name (for encoding).
fn names(message: &str) -> Option<&'static HashMap<&'static str, u32>> {
    static NAMES: OnceLock<HashMap<&'static str, HashMap<&'static str, u32>>> = OnceLock::new();
    NAMES
        .get_or_init(|| {
            messages()
                .iter()
                .map(|(m, fields)| {
                    let by_name = fields
                        .iter()
                        .map(|(tag, f)| (f.json_name.as_str(), *tag))
                        .collect();
                    (*m, by_name)
                })
                .collect()
        })
        .get(message)
}

/// The messages, read once from the table and named after the OpenAPI definitions.
fn messages() -> &'static Messages {
    static MESSAGES: OnceLock<Messages> = OnceLock::new();
    MESSAGES.get_or_init(|| {
        let definitions = &crate::openapi::v2()["definitions"];
        let mut messages = Messages::new();
        let mut current: Option<(&'static str, HashMap<u32, Field>)> = None;
        for line in include_str!("protobuf.fields").lines() {
            let parts: Vec<&'static str> = line.split(' ').collect();
            match parts.as_slice() {
                ["M", name] => {
                    if let Some((done, fields)) = current.replace((name, HashMap::new())) {
                        messages.insert(done, fields);
                    }
                }
                ["F", tag, rust_name, label, kind] => {
                    let (message, fields) = current.as_mut().expect("a field after a message");
                    let definition = &definitions[openapi_name(message)];
                    fields.insert(
                        tag.parse().expect("a field number"),
                        Field {
                            json_name: json_name(definition, rust_name),
                            label: match *label {
                                "rep" => Label::Repeated,
                                "map" => Label::Map,
                                _ => Label::Optional,
                            },
                            kind,
                        },
                    );
                }
                _ => {}
            }
        }
        if let Some((done, fields)) = current {
            messages.insert(done, fields);
        }
        messages
    })
}

/// The OpenAPI definition of a message (`k8s.io.api.core.v1.Pod` → `io.k8s.api.core.v1.Pod`).
fn openapi_name(message: &str) -> String {
    format!("io.k8s.{}", message.trim_start_matches("k8s.io."))
}

/// A field's JSON name: the definition's property that is the same name once case and
/// underscores are set aside (prost writes `podIPs` as `pod_i_ps`), else the lowerCamelCase
/// of prost's name.
fn json_name(definition: &Value, rust_name: &str) -> String {
    let plain = |s: &str| s.replace('_', "").to_ascii_lowercase();
    let wanted = plain(rust_name);
    if let Some(found) = definition["properties"]
        .as_object()
        .and_then(|p| p.keys().find(|k| plain(k) == wanted))
    {
        return found.clone();
    }
    let mut out = String::new();
    let mut upper = false;
    for c in rust_name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The proto message of an apiVersion and kind (`apps/v1` `Deployment` →
/// `k8s.io.api.apps.v1.Deployment`).
fn message_of(api_version: &str, kind: &str) -> String {
    if matches!(kind, "DeleteOptions" | "Status" | "WatchEvent") {
        return format!("k8s.io.apimachinery.pkg.apis.meta.v1.{kind}");
    }
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let package = match group {
        "" => "core",
        group => group.split('.').next().unwrap_or(group),
    };
    format!("k8s.io.api.{package}.{version}.{kind}")
}

/// How deep objects may nest in objects (a `List`'s items are envelopes of their own): a
/// body nested deeper is refused rather than followed down the stack.
const MAX_NESTING: usize = 16;

thread_local! {
    static NESTING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts one level of nesting while it lives.
struct Nested;

impl Nested {
    fn enter() -> Result<Self, String> {
        let depth = NESTING.with(|n| {
            n.set(n.get() + 1);
            n.get()
        });
        let guard = Nested;
        if depth > MAX_NESTING {
            return Err(format!("objects nested more than {MAX_NESTING} deep"));
        }
        Ok(guard)
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        NESTING.with(|n| n.set(n.get() - 1));
    }
}

/// A body: its object as JSON (apiVersion and kind first).
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let _nested = Nested::enter()?;
    let Some(unknown) = body.strip_prefix(MAGIC) else {
        return Err("a protobuf body must start with the bytes \"k8s\\0\"".into());
    };
    let (mut api_version, mut kind, mut raw, mut encoding) =
        (String::new(), String::new(), &[][..], String::new());
    for item in Reader(unknown) {
        match item? {
            (1, Wire::Bytes(type_meta)) => {
                for item in Reader(type_meta) {
                    match item? {
                        (1, Wire::Bytes(v)) => api_version = utf8(v)?,
                        (2, Wire::Bytes(k)) => kind = utf8(k)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(r)) => raw = r,
            (3, Wire::Bytes(e)) => encoding = utf8(e)?,
            _ => {}
        }
    }
    if !encoding.is_empty() {
        return Err(format!("content encoding {encoding:?} is not supported"));
    }
    if kind.is_empty() {
        return Err("the protobuf body names no kind".into());
    }
    let message = message_of(&api_version, &kind);
    let mut object = Map::new();
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    if let Value::Object(fields) = decode_message(raw, &message)? {
        object.extend(fields);
    }
    Ok(Value::Object(object))
}

/// One message as JSON.
fn decode_message(bytes: &[u8], message: &str) -> Result<Value, String> {
    match message {
        TIME | MICRO_TIME => return time(bytes, message == MICRO_TIME),
        DURATION => {
            let nanos = scalar_fields(bytes)?.get(&1).copied().unwrap_or(0);
            return Ok(json!(go_duration(nanos as i64)));
        }
        INT_OR_STRING => {
            let mut is_string = false;
            let (mut int, mut string) = (0i64, String::new());
            for item in Reader(bytes) {
                match item? {
                    (1, Wire::Varint(t)) => is_string = t == 1,
                    (2, Wire::Varint(i)) => int = i64::from(i as i32),
                    (3, Wire::Bytes(s)) => string = utf8(s)?,
                    _ => {}
                }
            }
            return Ok(if is_string { json!(string) } else { json!(int) });
        }
        QUANTITY => {
            for item in Reader(bytes) {
                if let (1, Wire::Bytes(s)) = item? {
                    return Ok(json!(utf8(s)?));
                }
            }
            return Ok(json!("0"));
        }
        RAW_EXTENSION | FIELDS_V1 => {
            for item in Reader(bytes) {
                if let (1, Wire::Bytes(raw)) = item? {
                    return if raw.starts_with(MAGIC) {
                        decode(raw)
                    } else if raw.is_empty() {
                        Ok(Value::Null)
                    } else {
                        serde_json::from_slice(raw).map_err(|e| {
                            format!("an embedded object of {message} is not JSON: {e}")
                        })
                    };
                }
            }
            return Ok(Value::Null);
        }
        _ => {}
    }
    let fields = messages()
        .get(message)
        .ok_or_else(|| format!("{message} is not a message this server decodes"))?;
    let mut out = Map::new();
    for item in Reader(bytes) {
        let (tag, wire) = item?;
        let field = fields.get(&tag).ok_or_else(|| {
            format!("field {tag} of {message} is not known to this server; send JSON")
        })?;
        let at = |e: String| format!("{message}.{}: {e}", field.json_name);
        match field.label {
            Label::Optional => {
                let value = value(field.kind, wire).map_err(at)?;
                // ObjectMeta's generation is the server's, and Go writes its zero.
                let unset_generation =
                    message == OBJECT_META && field.json_name == "generation" && value == json!(0);
                if !(value.is_null() || value == json!("") || unset_generation) {
                    out.insert(field.json_name.clone(), value);
                }
            }
            Label::Repeated => {
                let items = match (wire, is_varint(field.kind)) {
                    // Packed numbers and booleans: one run of varints.
                    (Wire::Bytes(run), true) => packed(run, field.kind).map_err(at)?,
                    (wire, _) => vec![value(field.kind, wire).map_err(at)?],
                };
                let list = out
                    .entry(field.json_name.clone())
                    .or_insert_with(|| json!([]));
                list.as_array_mut().expect("a list").extend(items);
            }
            Label::Map => {
                let Wire::Bytes(entry) = wire else {
                    return Err(at("a map entry must be length-delimited".into()));
                };
                let (mut key, mut entry_value) = (String::new(), None);
                for item in Reader(entry) {
                    match item.map_err(at)? {
                        (1, Wire::Bytes(k)) => key = utf8(k).map_err(at)?,
                        (2, wire) => entry_value = Some(value(field.kind, wire).map_err(at)?),
                        _ => {}
                    }
                }
                let entry_value = entry_value.unwrap_or_else(|| zero(field.kind));
                let map = out
                    .entry(field.json_name.clone())
                    .or_insert_with(|| json!({}));
                map.as_object_mut().expect("a map").insert(key, entry_value);
            }
        }
    }
    Ok(Value::Object(out))
}

/// Whether an Accept header puts protobuf first.
pub fn preferred(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.split(';').next().unwrap_or("").trim() == MEDIA_TYPE)
}

/// An object (with apiVersion and kind) as a protobuf body.
pub fn encode(object: &Value) -> Result<Vec<u8>, String> {
    let text = |f: &str| object.get(f).and_then(Value::as_str).unwrap_or_default();
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    if kind.is_empty() {
        return Err("an object without a kind".into());
    }
    let raw = encode_message(object, &message_of(api_version, kind))?;
    let mut type_meta = Vec::new();
    put_bytes(&mut type_meta, 1, api_version.as_bytes());
    put_bytes(&mut type_meta, 2, kind.as_bytes());
    let mut unknown = Vec::new();
    put_bytes(&mut unknown, 1, &type_meta);
    put_bytes(&mut unknown, 2, &raw);
    put_bytes(&mut unknown, 3, b"");
    put_bytes(&mut unknown, 4, b"");
    Ok([MAGIC, &unknown].concat())
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, tag: u32, wire: u64) {
    put_varint(buf, (u64::from(tag) << 3) | wire);
}

fn put_bytes(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    put_key(buf, tag, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// One message's bytes from its JSON.
fn encode_message(v: &Value, message: &str) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    match message {
        TIME | MICRO_TIME => {
            let at: jiff::Timestamp = v
                .as_str()
                .ok_or("a time must be a string")?
                .parse()
                .map_err(|e| format!("a time does not parse: {e}"))?;
            put_key(&mut buf, 1, 0);
            put_varint(&mut buf, at.as_second() as u64);
            put_key(&mut buf, 2, 0);
            put_varint(&mut buf, i64::from(at.subsec_nanosecond()) as u64);
            return Ok(buf);
        }
        INT_OR_STRING => {
            match v {
                Value::String(s) => {
                    put_key(&mut buf, 1, 0);
                    put_varint(&mut buf, 1);
                    put_bytes(&mut buf, 3, s.as_bytes());
                }
                _ => {
                    let n = v.as_i64().ok_or("an int-or-string must be either")?;
                    put_key(&mut buf, 1, 0);
                    put_varint(&mut buf, 0);
                    put_key(&mut buf, 2, 0);
                    put_varint(&mut buf, n as u64);
                }
            }
            return Ok(buf);
        }
        QUANTITY => {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return Err("a quantity must be a string".into()),
            };
            put_bytes(&mut buf, 1, text.as_bytes());
            return Ok(buf);
        }
        RAW_EXTENSION | FIELDS_V1 => {
            let raw = serde_json::to_vec(v).map_err(|e| e.to_string())?;
            put_bytes(&mut buf, 1, &raw);
            return Ok(buf);
        }
        DURATION => return Err("durations are not encoded".into()),
        _ => {}
    }
    let (fields, names) = match (messages().get(message), names(message)) {
        (Some(f), Some(n)) => (f, n),
        _ => return Err(format!("{message} is not a message this server encodes")),
    };
    let Value::Object(map) = v else {
        return Err(format!("{message} must be an object"));
    };
    for (name, value) in map {
        if value.is_null() {
            continue;
        }
        let Some(tag) = names.get(name.as_str()) else {
            if name == "apiVersion" || name == "kind" {
                continue; // in the envelope
            }
            return Err(format!("{message} has no field {name}"));
        };
        let field = &fields[tag];
        let at = |e: String| format!("{message}.{name}: {e}");
        match field.label {
            Label::Optional => put_value(&mut buf, *tag, field.kind, value).map_err(at)?,
            Label::Repeated => {
                for item in value
                    .as_array()
                    .ok_or_else(|| at("must be a list".into()))?
                {
                    put_value(&mut buf, *tag, field.kind, item).map_err(at)?;
                }
            }
            Label::Map => {
                for (key, item) in value
                    .as_object()
                    .ok_or_else(|| at("must be a map".into()))?
                {
                    let mut entry = Vec::new();
                    put_bytes(&mut entry, 1, key.as_bytes());
                    if !item.is_null() {
                        put_value(&mut entry, 2, field.kind, item).map_err(at)?;
                    }
                    put_bytes(&mut buf, *tag, &entry);
                }
            }
        }
    }
    Ok(buf)
}

fn put_value(buf: &mut Vec<u8>, tag: u32, kind: &str, v: &Value) -> Result<(), String> {
    match kind {
        "string" => put_bytes(buf, tag, v.as_str().ok_or("must be a string")?.as_bytes()),
        "bytes" => {
            let text = v.as_str().ok_or("must be base64 text")?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("not base64: {e}"))?;
            put_bytes(buf, tag, &bytes);
        }
        "bool" => {
            put_key(buf, tag, 0);
            put_varint(buf, u64::from(v.as_bool().ok_or("must be a boolean")?));
        }
        "int32" | "int64" => {
            put_key(buf, tag, 0);
            put_varint(buf, v.as_i64().ok_or("must be an integer")? as u64);
        }
        "double" => {
            put_key(buf, tag, 1);
            buf.extend_from_slice(&v.as_f64().ok_or("must be a number")?.to_le_bytes());
        }
        message => put_bytes(buf, tag, &encode_message(v, message)?),
    }
    Ok(())
}

fn is_varint(kind: &str) -> bool {
    matches!(kind, "bool" | "int32" | "int64")
}

/// A field's value of `kind` as JSON.
fn value(kind: &str, wire: Wire) -> Result<Value, String> {
    Ok(match (kind, wire) {
        ("string", Wire::Bytes(b)) => json!(utf8(b)?),
        ("bytes", Wire::Bytes(b)) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        ("bool", Wire::Varint(v)) => json!(v != 0),
        ("int32", Wire::Varint(v)) => json!(v as i32),
        ("int64", Wire::Varint(v)) => json!(v as i64),
        ("double", Wire::Fixed64(v)) => json!(f64::from_bits(v)),
        (message, Wire::Bytes(b)) if message.contains('.') => decode_message(b, message)?,
        (kind, wire) => return Err(format!("a {kind} cannot be encoded as {wire:?}")),
    })
}

/// The value of a map entry that has none.
fn zero(kind: &str) -> Value {
    match kind {
        "string" | "bytes" => json!(""),
        "bool" => json!(false),
        "int32" | "int64" | "double" => json!(0),
        _ => json!({}),
    }
}

fn packed(mut run: &[u8], kind: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    while !run.is_empty() {
        let (v, used) = varint(run)?;
        run = &run[used..];
        out.push(value(kind, Wire::Varint(v))?);
    }
    Ok(out)
}

/// A message's varint fields by number (for the small messages of times and durations).
fn scalar_fields(bytes: &[u8]) -> Result<HashMap<u32, u64>, String> {
    let mut out = HashMap::new();
    for item in Reader(bytes) {
        if let (tag, Wire::Varint(v)) = item? {
            out.insert(tag, v);
        }
    }
    Ok(out)
}

/// A `Time` (seconds) or `MicroTime` (microseconds) as RFC 3339 in UTC; an empty one (Go's
/// zero time) as null.
fn time(bytes: &[u8], micro: bool) -> Result<Value, String> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let fields = scalar_fields(bytes)?;
    let seconds = fields.get(&1).copied().unwrap_or(0) as i64;
    let nanos = fields.get(&2).copied().unwrap_or(0) as i32;
    let at = jiff::Timestamp::new(seconds, if micro { nanos / 1000 * 1000 } else { 0 })
        .map_err(|e| format!("a time out of range: {e}"))?;
    let format = if micro {
        "%Y-%m-%dT%H:%M:%S%.6fZ"
    } else {
        "%Y-%m-%dT%H:%M:%SZ"
    };
    Ok(json!(at.strftime(format).to_string()))
}

/// A duration as Go prints one (`1h2m3.5s`, `0s`).
fn go_duration(nanos: i64) -> String {
    if nanos == 0 {
        return "0s".into();
    }
    let sign = if nanos < 0 { "-" } else { "" };
    let n = nanos.unsigned_abs();
    let (h, m) = (n / 3_600_000_000_000, n / 60_000_000_000 % 60);
    let (s, frac) = (n / 1_000_000_000 % 60, n % 1_000_000_000);
    let mut out = String::from(sign);
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let frac = format!("{frac:09}");
        out.push_str(&format!("{s}.{}s", frac.trim_end_matches('0')));
    }
    out
}

fn utf8(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "a string is not UTF-8".to_owned())
}

/// A field's payload on the wire.
#[derive(Debug)]
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    /// Skipped: no Kubernetes message has a 32-bit fixed field.
    Fixed32,
    Bytes(&'a [u8]),
}

/// The (field number, payload) pairs of a message.
struct Reader<'a>(&'a [u8]);

impl<'a> Iterator for Reader<'a> {
    type Item = Result<(u32, Wire<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let item = self.read();
        if item.is_err() {
            self.0 = &[]; // one error, then the end
        }
        Some(item)
    }
}

impl<'a> Reader<'a> {
    fn read(&mut self) -> Result<(u32, Wire<'a>), String> {
        let (key, used) = varint(self.0)?;
        self.0 = &self.0[used..];
        let tag = u32::try_from(key >> 3).map_err(|_| "a field number out of range")?;
        let take = |buf: &mut &'a [u8], n: usize| -> Result<&'a [u8], String> {
            if buf.len() < n {
                return Err("the body ends inside a field".into());
            }
            let (head, tail) = buf.split_at(n);
            *buf = tail;
            Ok(head)
        };
        let wire = match key & 7 {
            0 => {
                let (v, used) = varint(self.0)?;
                self.0 = &self.0[used..];
                Wire::Varint(v)
            }
            1 => Wire::Fixed64(u64::from_le_bytes(
                take(&mut self.0, 8)?.try_into().expect("8 bytes"),
            )),
            2 => {
                let (len, used) = varint(self.0)?;
                self.0 = &self.0[used..];
                let len = usize::try_from(len).map_err(|_| "a length out of range")?;
                Wire::Bytes(take(&mut self.0, len)?)
            }
            5 => {
                take(&mut self.0, 4)?;
                Wire::Fixed32
            }
            other => return Err(format!("wire type {other} of field {tag} is not supported")),
        };
        Ok((tag, wire))
    }
}

/// A varint and the bytes it took.
fn varint(bytes: &[u8]) -> Result<(u64, usize), String> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err("a varint is cut short or too long".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_pb::apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta, Time},
        runtime::{TypeMeta, Unknown},
        util::intstr::IntOrString,
    };
    use prost::Message;

    /// A body as client-go writes one.
    fn envelope(api_version: &str, kind: &str, object: &impl Message) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(object.encode_to_vec()),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        [MAGIC, &unknown.encode_to_vec()].concat()
    }

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            // Go writes the empty ones too.
            generate_name: Some(String::new()),
            namespace: Some(String::new()),
            creation_timestamp: Some(Time::default()),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_deployment_as_kubectl_create_sends_it() {
        use k8s_pb::api::{apps::v1 as apps, core::v1 as core};
        let deployment = apps::Deployment {
            metadata: Some(meta("web")),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(0),
                selector: Some(LabelSelector {
                    match_labels: [("app".to_owned(), "web".to_owned())].into(),
                    ..Default::default()
                }),
                template: Some(core::PodTemplateSpec {
                    metadata: Some(meta("")),
                    spec: Some(core::PodSpec {
                        containers: vec![core::Container {
                            name: Some("nginx".into()),
                            image: Some("nginx:1.27".into()),
                            ports: vec![core::ContainerPort {
                                container_port: Some(80),
                                ..Default::default()
                            }],
                            resources: Some(core::ResourceRequirements {
                                limits: [(
                                    "cpu".to_owned(),
                                    Quantity {
                                        string: Some("500m".into()),
                                    },
                                )]
                                .into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        automount_service_account_token: Some(false),
                        ..Default::default()
                    }),
                }),
                strategy: Some(apps::DeploymentStrategy::default()),
                ..Default::default()
            }),
            status: Some(apps::DeploymentStatus::default()),
        };
        let json = decode(&envelope("apps/v1", "Deployment", &deployment)).unwrap();
        assert_eq!(
            json,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27",
                            "ports": [{"containerPort": 80}],
                            "resources": {"limits": {"cpu": "500m"}}}],
                            "automountServiceAccountToken": false}},
                    "strategy": {}},
                "status": {}})
        );
    }

    #[test]
    fn special_types_as_json_writes_them() {
        use k8s_pb::api::core::v1 as core;
        let service = core::Service {
            metadata: Some(ObjectMeta {
                name: Some("web".into()),
                creation_timestamp: Some(Time {
                    seconds: Some(1_700_000_000),
                    nanos: Some(0),
                }),
                ..Default::default()
            }),
            spec: Some(core::ServiceSpec {
                ports: vec![
                    core::ServicePort {
                        port: Some(80),
                        target_port: Some(IntOrString {
                            r#type: Some(1),
                            int_val: Some(0),
                            str_val: Some("http".into()),
                        }),
                        ..Default::default()
                    },
                    core::ServicePort {
                        port: Some(81),
                        target_port: Some(IntOrString {
                            r#type: Some(0),
                            int_val: Some(8081),
                            str_val: Some(String::new()),
                        }),
                        ..Default::default()
                    },
                ],
                cluster_ips: vec!["10.0.0.1".into()],
                ..Default::default()
            }),
            status: None,
        };
        let json = decode(&envelope("v1", "Service", &service)).unwrap();
        assert_eq!(
            json["metadata"]["creationTimestamp"],
            json!("2023-11-14T22:13:20Z")
        );
        assert_eq!(json["spec"]["ports"][0]["targetPort"], json!("http"));
        assert_eq!(json["spec"]["ports"][1]["targetPort"], json!(8081));
        assert_eq!(json["spec"]["clusterIPs"], json!(["10.0.0.1"]));
        let secret = core::Secret {
            metadata: Some(meta("s")),
            data: [("k".to_owned(), b"\x00\xffv".to_vec())].into(),
            ..Default::default()
        };
        let json = decode(&envelope("v1", "Secret", &secret)).unwrap();
        assert_eq!(json["data"], json!({"k": "AP92"}));
    }

    #[test]
    fn what_it_cannot_decode_is_refused_with_the_reason() {
        assert!(decode(b"{}").unwrap_err().contains("k8s"));
        let unknown_kind = envelope("v1", "Frobnicator", &ObjectMeta::default());
        assert!(
            decode(&unknown_kind)
                .unwrap_err()
                .contains("k8s.io.api.core.v1.Frobnicator")
        );
        // Field 99 of a ConfigMap: a field from a newer Kubernetes.
        let mut raw = ObjectMeta::default().encode_to_vec();
        raw.extend([0x98, 0x06, 0x01]);
        let body = [
            MAGIC,
            &Unknown {
                type_meta: Some(TypeMeta {
                    api_version: Some("v1".into()),
                    kind: Some("ConfigMap".into()),
                }),
                raw: Some(raw),
                ..Default::default()
            }
            .encode_to_vec(),
        ]
        .concat();
        let error = decode(&body).unwrap_err();
        assert!(error.contains("field 99"), "{error}");
        // Cut short.
        let whole = envelope("v1", "ConfigMap", &core_config_map());
        assert!(decode(&whole[..whole.len() - 3]).is_err());
    }

    fn core_config_map() -> k8s_pb::api::core::v1::ConfigMap {
        k8s_pb::api::core::v1::ConfigMap {
            metadata: Some(meta("c")),
            data: [("a".to_owned(), "b".to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn answers_encode_as_kube_encodes_them() {
        use k8s_pb::api::apps::v1 as apps;
        let object = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "uid": "u-1",
                "resourceVersion": "42", "generation": 3,
                "creationTimestamp": "2023-11-14T22:13:20Z",
                "labels": {"app": "web"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                    "apiVersion": "apps/v1", "time": "2023-11-14T22:13:20Z",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx",
                        "resources": {"limits": {"cpu": "500m"}}}]}}},
            "status": {"replicas": 2, "conditions": [{"type": "Available", "status": "True",
                "lastUpdateTime": "2023-11-14T22:13:20Z"}]}});
        let body = encode(&object).unwrap();
        // Read back by prost's types (k8s-pb): what a Go or Rust client decodes.
        let unknown = Unknown::decode(&body[4..]).unwrap();
        assert_eq!(
            unknown.type_meta.unwrap().kind.as_deref(),
            Some("Deployment")
        );
        let d = apps::Deployment::decode(unknown.raw.unwrap().as_slice()).unwrap();
        let meta = d.metadata.unwrap();
        assert_eq!(meta.resource_version.as_deref(), Some("42"));
        assert_eq!(
            meta.creation_timestamp.unwrap().seconds,
            Some(1_700_000_000)
        );
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(0));
        let surge = spec
            .strategy
            .unwrap()
            .rolling_update
            .unwrap()
            .max_surge
            .unwrap();
        assert_eq!(surge.str_val.as_deref(), Some("25%"));
        // And the round trip gives the object back.
        assert_eq!(decode(&body).unwrap(), object);
    }

    #[test]
    fn what_the_table_cannot_say_is_not_encoded() {
        let newer = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c"}, "fromTheFuture": true});
        assert!(encode(&newer).unwrap_err().contains("fromTheFuture"));
        assert!(preferred(
            "application/vnd.kubernetes.protobuf, application/json"
        ));
        assert!(!preferred(
            "application/json, application/vnd.kubernetes.protobuf"
        ));
    }

    #[test]
    fn nesting_is_bounded() {
        // A List whose one item is a List whose one item is ... 100 deep.
        let mut body = envelope("v1", "ConfigMap", &core_config_map());
        for _ in 0..100 {
            let raw = k8s_pb::apimachinery::pkg::runtime::RawExtension { raw: Some(body) };
            let list = k8s_pb::api::core::v1::List {
                metadata: None,
                items: vec![raw],
            };
            body = envelope("v1", "List", &list);
        }
        let error = decode(&body).unwrap_err();
        assert!(error.contains("nested more than"), "{error}");
        // The counter unwound: a plain body still decodes.
        assert!(decode(&envelope("v1", "ConfigMap", &core_config_map())).is_ok());
    }

    #[test]
    fn durations_as_go_prints_them() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
        assert_eq!(go_duration(3_723_000_000_000), "1h2m3s");
        assert_eq!(go_duration(-60_000_000_000), "-1m0s");
    }
}
