//! A request message from the caller's path variables, query parameters and JSON body.
//!
//! Everything is gathered into one JSON object first (the body, then path variables over it,
//! then query parameters where neither set the field), which prost-reflect then reads with the
//! proto3 JSON mapping, so a value from the path or the query is parsed exactly as the same
//! value in a body would be. Errors name the field: `order.quantity: invalid type ...`.
use prost_reflect::{DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value as Json};

use super::template::{percent_decode, Binding};

/// Where the request body goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BodyField {
    /// No body: a non-empty one is refused.
    None,
    /// `body: "*"`: the whole message (but the fields bound by the path).
    All,
    /// `body: "order"`: that field.
    Field(Vec<String>),
}

/// The field at `path` (by proto or JSON name), which must be a singular, non-message field
/// (a path variable or query parameter is one text value; repeated fields take several).
pub(super) fn resolve(
    desc: &MessageDescriptor,
    path: &[String],
) -> Result<FieldDescriptor, String> {
    let field = resolve_any(desc, path)?;
    if field.is_map() || (matches!(field.kind(), Kind::Message(m) if !is_text_message(&m))) {
        return Err(format!(
            "{} is a message or map field: it cannot take a text value",
            path.join(".")
        ));
    }
    Ok(field)
}

/// The field at `path`, any kind; every step but the last must be a singular message.
pub(super) fn resolve_any(
    desc: &MessageDescriptor,
    path: &[String],
) -> Result<FieldDescriptor, String> {
    let mut current = desc.clone();
    let mut found = None;
    for i in 0..path.len() {
        let field = step(&current, path, i)?;
        if i + 1 < path.len() {
            match field.kind() {
                Kind::Message(m) if !field.is_list() && !field.is_map() => current = m,
                _ => return Err(format!("{} is not a message field", path[..=i].join("."))),
            }
        }
        found = Some(field);
    }
    found.ok_or_else(|| "empty field path".to_owned())
}

/// Field `path[i]` of `current` (by proto or JSON name), or an error naming the path so far.
fn step(current: &MessageDescriptor, path: &[String], i: usize) -> Result<FieldDescriptor, String> {
    let name = &path[i];
    current
        .get_field_by_name(name)
        .or_else(|| current.get_field_by_json_name(name))
        .ok_or_else(|| {
            format!(
                "{} has no field {:?}",
                current.full_name(),
                path[..=i].join(".")
            )
        })
}

/// Well-known message types whose JSON form is a string or a scalar.
fn is_text_message(m: &MessageDescriptor) -> bool {
    matches!(
        m.full_name(),
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.Int32Value"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.FloatValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.BoolValue"
    )
}

/// The JSON value a text value stands for in `field`: the mapping's own forms (numbers as
/// strings are valid JSON for every numeric type; booleans must be `true` / `false`).
fn text_value(field: &FieldDescriptor, name: &str, text: String) -> Result<Json, String> {
    let boolean = match field.kind() {
        Kind::Bool => true,
        Kind::Message(m) => m.full_name() == "google.protobuf.BoolValue",
        _ => false,
    };
    if boolean {
        return match text.as_str() {
            "true" => Ok(Json::Bool(true)),
            "false" => Ok(Json::Bool(false)),
            other => Err(format!("{name}: expected true or false, got {other:?}")),
        };
    }
    if let Kind::Enum(_) = field.kind() {
        // A number names a value too.
        if let Ok(n) = text.parse::<i32>() {
            return Ok(Json::from(n));
        }
    }
    Ok(Json::String(text))
}

/// Sets `path` in `root` to `value`: replaces (a path variable over the body) or, with
/// `append`, adds to a repeated field's list.
fn insert(
    root: &mut Map<String, Json>,
    path: &[String],
    value: Json,
    append: bool,
) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty field path")?;
    let mut node = root;
    for (i, step) in parents.iter().enumerate() {
        let entry = node
            .entry(step.clone())
            .or_insert_with(|| Json::Object(Map::new()));
        node = match entry {
            Json::Object(map) => map,
            _ => {
                return Err(format!(
                    "{}: the body gives it as a non-object",
                    path[..=i].join(".")
                ))
            }
        };
    }
    if append {
        match node
            .entry(last.clone())
            .or_insert_with(|| Json::Array(Vec::new()))
        {
            Json::Array(list) => list.push(value),
            _ => return Err(format!("{} is given twice", path.join("."))),
        }
    } else {
        node.insert(last.clone(), value);
    }
    Ok(())
}

/// Builds the request message (see the module documentation).
pub(super) fn build(
    desc: &MessageDescriptor,
    bindings: Vec<Binding>,
    query: Option<&str>,
    body_field: &BodyField,
    body: &[u8],
    reject_unknown: bool,
) -> Result<DynamicMessage, String> {
    let blank = body.iter().all(u8::is_ascii_whitespace);
    let mut root = match body_field {
        BodyField::None if !blank => {
            return Err(
                "this method takes no request body; send its fields as query parameters".to_owned(),
            )
        }
        BodyField::None => Map::new(),
        BodyField::All if blank => Map::new(),
        BodyField::All => match parse_json(body)? {
            Json::Object(map) => map,
            _ => return Err("the request body must be a JSON object".to_owned()),
        },
        BodyField::Field(path) => {
            let mut root = Map::new();
            if !blank {
                let value = parse_json(body)?;
                let names = json_path(desc, path)?;
                insert(&mut root, &names, value, false)?;
            }
            root
        }
    };
    // Path variables: always, over whatever the body said (as Envoy and grpc-gateway do).
    let mut bound: Vec<Vec<String>> = Vec::with_capacity(bindings.len());
    for (path, text) in bindings {
        let field = resolve(desc, &path)?;
        let names = json_path(desc, &path)?;
        let value = text_value(&field, &path.join("."), text)?;
        if field.is_list() {
            insert(&mut root, &names, Json::Array(vec![value]), false)?;
        } else {
            insert(&mut root, &names, value, false)?;
        }
        bound.push(names);
    }
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, text) = pair.split_once('=').unwrap_or((pair, ""));
            let key = form_decode(key)?;
            let text = form_decode(text)?;
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            // With `body: "*"` every field is the body's: no query parameter can bind one.
            let field = match body_field {
                BodyField::All => Err(format!(
                    "query parameter {key:?}: this method takes all its fields from the body"
                )),
                _ => resolve(desc, &path).map_err(|e| format!("query parameter {key:?}: {e}")),
            };
            let field = match field {
                Ok(f) => f,
                Err(_) if !reject_unknown => continue,
                Err(e) => return Err(e),
            };
            let names = json_path(desc, &path)?;
            if bound.contains(&names) {
                // The path already bound it: the path wins.
                continue;
            }
            if let BodyField::Field(body_path) = body_field {
                if names.starts_with(&json_path(desc, body_path)?) && !blank {
                    continue;
                }
            }
            let value = text_value(&field, &key, text)?;
            insert(&mut root, &names, value, field.is_list())?;
        }
    }
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(Json::Object(root), &mut track);
    DynamicMessage::deserialize_with_options(
        desc.clone(),
        de,
        &DeserializeOptions::new().deny_unknown_fields(reject_unknown),
    )
    .map_err(|e| {
        let at = track.path().to_string();
        if at == "." || at.is_empty() {
            e.to_string()
        } else {
            format!("{at}: {e}")
        }
    })
}

/// The JSON names along a field path (so a proto name and a JSON name meet in one key).
fn json_path(desc: &MessageDescriptor, path: &[String]) -> Result<Vec<String>, String> {
    let mut current = desc.clone();
    let mut out = Vec::with_capacity(path.len());
    for i in 0..path.len() {
        let field = step(&current, path, i)?;
        out.push(field.json_name().to_owned());
        if let Kind::Message(m) = field.kind() {
            current = m;
        }
    }
    Ok(out)
}

fn parse_json(body: &[u8]) -> Result<Json, String> {
    serde_json::from_slice(body).map_err(|e| format!("the request body is not valid JSON: {e}"))
}

/// `application/x-www-form-urlencoded` decoding of a query key or value (`+` is a space).
fn form_decode(text: &str) -> Result<String, String> {
    let spaced;
    let text = if text.contains('+') {
        spaced = text.replace('+', " ");
        &spaced
    } else {
        text
    };
    percent_decode(text, false)
}
