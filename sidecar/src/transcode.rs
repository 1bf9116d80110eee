//! REST/JSON callers to a gRPC app: the mapping from HTTP requests to gRPC methods, and from
//! gRPC messages and statuses back to JSON. The proxy side (reading bodies, the HTTP/2 call to
//! the app, streaming the answer) is `proxy/transcode.rs`; this module is pure data and
//! conversion, built once per config load.
//!
//! A [`Transcoder`] is one `[[transcode]]` section: the app's gRPC port, a protobuf
//! `FileDescriptorSet` (with `google/api/annotations.proto` and `http.proto` in it, as
//! `protoc --include_imports` writes it) and the services to expose. Every method of those
//! services with a `google.api.http` option (and its `additional_bindings`) becomes a [`Route`].
//! Requests are built with the proto3 JSON mapping (prost-reflect): path variables, then query
//! parameters, then the body (`body: "*"` or a field); responses are the JSON of the message
//! (or of its `response_body` field).
//!
//! Client-streaming and bidirectional methods are not transcoded (a REST request is one
//! message); they are listed in [`Transcoder::skipped`] and still reachable as native gRPC.
use std::path::PathBuf;
use std::sync::Arc;

use http::Method;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MethodDescriptor, SerializeOptions, Value,
};
use sha2::{Digest, Sha256};

pub mod grpc;
mod message;
pub mod stream;
pub mod template;

pub use grpc::{Deframer, StatusBody};
use message::BodyField;
use template::{Binding, Template};

/// What to do with JSON fields and query parameters the request message does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownFields {
    /// 400 `transcode-bad-request`, naming the field (a typo is found at once).
    #[default]
    Reject,
    /// Dropped (callers newer than the app's schema keep working).
    Ignore,
}

impl UnknownFields {
    pub fn as_str(self) -> &'static str {
        match self {
            UnknownFields::Reject => "reject",
            UnknownFields::Ignore => "ignore",
        }
    }
}

/// The field names of response JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JsonNames {
    /// `lowerCamelCase`, as the proto3 JSON mapping says (and `json_name` overrides).
    #[default]
    LowerCamel,
    /// The names in the `.proto` file (`created_at`).
    Proto,
}

impl JsonNames {
    pub fn as_str(self) -> &'static str {
        match self {
            JsonNames::LowerCamel => "lower_camel",
            JsonNames::Proto => "proto",
        }
    }
}

/// Requests that match no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unmatched {
    /// 404 `transcode-no-route` with a JSON status body: the port is a gRPC app's.
    #[default]
    NotFound,
    /// Passed to the app unchanged (an app that also serves HTTP on that port).
    Pass,
}

impl Unmatched {
    pub fn as_str(self) -> &'static str {
        match self {
            Unmatched::NotFound => "not_found",
            Unmatched::Pass => "pass",
        }
    }
}

/// Default `max_body_bytes`: a JSON request body (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// Default `max_message_bytes`: one gRPC response message (4 MiB, gRPC's own default).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;
/// A descriptor set larger than this is refused (a wrong file, not a schema).
pub const MAX_DESCRIPTOR_SET_BYTES: u64 = 16 << 20;

/// One `[[transcode]]` section, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub port: u16,
    pub descriptor_set: PathBuf,
    pub services: Vec<String>,
    pub unknown_fields: UnknownFields,
    pub json_names: JsonNames,
    /// Print fields at their default value (0, "", false) in responses.
    pub print_defaults: bool,
    pub max_body_bytes: usize,
    pub max_message_bytes: usize,
    pub unmatched: Unmatched,
}

impl Settings {
    pub fn new(port: u16, descriptor_set: PathBuf, services: Vec<String>) -> Settings {
        Settings {
            port,
            descriptor_set,
            services,
            unknown_fields: UnknownFields::default(),
            json_names: JsonNames::default(),
            print_defaults: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            unmatched: Unmatched::default(),
        }
    }
}

/// One HTTP binding of a gRPC method.
#[derive(Debug)]
pub struct Route {
    pub http_method: Method,
    pub template: Template,
    /// `/package.Service/Method`: the gRPC path, and the metrics' `route` label.
    pub grpc_path: Arc<str>,
    /// `GET /v1/orders/{id}`, for `/config` and logs.
    pub pattern: String,
    method: MethodDescriptor,
    body: BodyField,
    response_body: Option<String>,
}

impl Route {
    pub fn server_streaming(&self) -> bool {
        self.method.is_server_streaming()
    }
}

/// The request of a route, built from the caller's path, query and body.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// The routes of one `[[transcode]]` section, compiled.
#[derive(Debug)]
pub struct Transcoder {
    settings: Settings,
    digest: [u8; 32],
    pool: DescriptorPool,
    routes: Vec<Route>,
    skipped: Vec<String>,
    serialize: SerializeOptions,
}

impl PartialEq for Transcoder {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.digest == other.digest
    }
}

impl Transcoder {
    /// Reads the descriptor set and compiles the routes; the error says what to fix.
    pub fn load(settings: Settings) -> Result<Transcoder, String> {
        use std::io::Read as _;
        let path = &settings.descriptor_set;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_DESCRIPTOR_SET_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.len() as u64 > MAX_DESCRIPTOR_SET_BYTES {
            return Err(format!(
                "{} is larger than {} MiB: is it a descriptor set?",
                path.display(),
                MAX_DESCRIPTOR_SET_BYTES >> 20
            ));
        }
        Transcoder::from_bytes(settings, &bytes)
    }

    /// [`Transcoder::load`] from the descriptor set's bytes.
    pub fn from_bytes(settings: Settings, bytes: &[u8]) -> Result<Transcoder, String> {
        let path = settings.descriptor_set.display().to_string();
        let pool = DescriptorPool::decode(bytes).map_err(|e| {
            format!(
                "{path} is not a valid FileDescriptorSet ({e}); build it with \
                 `protoc --include_imports --descriptor_set_out=FILE ...`"
            )
        })?;
        let http = pool
            .get_extension_by_name("google.api.http")
            .ok_or_else(|| {
                format!(
                    "{path} does not define the google.api.http option: include \
                 google/api/annotations.proto and google/api/http.proto \
                 (`protoc --include_imports`)"
                )
            })?;
        if settings.services.is_empty() {
            return Err("services is empty: name the gRPC services to expose".to_owned());
        }
        let mut routes = Vec::new();
        let mut skipped = Vec::new();
        for name in &settings.services {
            let service = pool.get_service_by_name(name).ok_or_else(|| {
                let known: Vec<String> =
                    pool.services().map(|s| s.full_name().to_owned()).collect();
                format!(
                    "service {name:?} is not in {path} (it has: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )
            })?;
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&http) {
                    continue;
                }
                let grpc_path: Arc<str> =
                    Arc::from(format!("/{}/{}", service.full_name(), method.name()));
                if method.is_client_streaming() {
                    skipped.push(format!(
                        "{grpc_path}: client streaming cannot be called as REST (native gRPC only)"
                    ));
                    continue;
                }
                let Value::Message(rule) = options.get_extension(&http).into_owned() else {
                    continue;
                };
                let mut rules = vec![rule.clone()];
                if let Some(Value::List(extra)) = rule
                    .get_field_by_name("additional_bindings")
                    .map(|v| v.into_owned())
                {
                    rules.extend(extra.into_iter().filter_map(|v| match v {
                        Value::Message(m) => Some(m),
                        _ => None,
                    }));
                }
                for rule in rules {
                    let route = compile(&method, &rule, &grpc_path)
                        .map_err(|e| format!("{grpc_path}: {e}"))?;
                    routes.push(route);
                }
            }
        }
        if routes.is_empty() {
            return Err(format!(
                "no method of {} has a google.api.http option: nothing to transcode",
                settings.services.join(", ")
            ));
        }
        // Most specific first: a verb, then more literal segments, then no trailing `**`.
        routes.sort_by_key(|r| {
            (
                !r.template.has_verb(),
                std::cmp::Reverse(r.template.literals()),
                r.template.is_open(),
            )
        });
        let serialize = SerializeOptions::new()
            .use_proto_field_name(settings.json_names == JsonNames::Proto)
            .skip_default_fields(!settings.print_defaults);
        Ok(Transcoder {
            digest: Sha256::digest(bytes).into(),
            settings,
            pool,
            routes,
            skipped,
            serialize,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Methods not transcoded, and why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The sha256 of the descriptor set this was built from.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The sha256 of the descriptor set in force (hex), for `/config`.
    pub fn digest_hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The route for a request, with its path variables (or why they are not valid).
    pub fn route(
        &self,
        method: &Method,
        path: &str,
    ) -> Option<(&Route, Result<Vec<Binding>, String>)> {
        self.route_index(method, path)
            .map(|(i, b)| (&self.routes[i], b))
    }

    /// [`Transcoder::route`], by index into [`Transcoder::routes`].
    pub fn route_index(
        &self,
        method: &Method,
        path: &str,
    ) -> Option<(usize, Result<Vec<Binding>, String>)> {
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.http_method == *method)
            .find_map(|(i, r)| r.template.matches(path).map(|b| (i, b)))
    }

    /// The encoded request message of `route`.
    pub fn request(
        &self,
        route: &Route,
        bindings: Vec<Binding>,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Vec<u8>, BadRequest> {
        let reject = self.settings.unknown_fields == UnknownFields::Reject;
        let message = message::build(
            &route.method.input(),
            bindings,
            query,
            &route.body,
            body,
            reject,
        )
        .map_err(BadRequest)?;
        Ok(message.encode_to_vec())
    }

    /// The JSON of one response message of `route` (or of its `response_body` field).
    pub fn response_json(&self, route: &Route, message: &[u8]) -> Result<Vec<u8>, String> {
        let output = route.method.output();
        let name = output.full_name().to_owned();
        let message = DynamicMessage::decode(output, message)
            .map_err(|e| format!("the app sent a message that is not a valid {name}: {e}"))?;
        let mut out = Vec::with_capacity(message.encoded_len() * 2 + 16);
        match &route.response_body {
            None => {
                let mut ser = serde_json::Serializer::new(&mut out);
                message
                    .serialize_with_options(&mut ser, &self.serialize)
                    .map_err(|e| format!("cannot write {name} as JSON: {e}"))?;
            }
            Some(field) => {
                // The whole message as a tree, then the one field (its JSON key in either
                // naming); a field at its default value is absent: `null`.
                let tree = message
                    .serialize_with_options(
                        serde_json::value::Serializer,
                        &self.serialize.clone().skip_default_fields(false),
                    )
                    .map_err(|e| format!("cannot write {name} as JSON: {e}"))?;
                let key = route.method.output().get_field_by_name(field).map(|f| {
                    if self.settings.json_names == JsonNames::Proto {
                        f.name().to_owned()
                    } else {
                        f.json_name().to_owned()
                    }
                });
                let value = key
                    .and_then(|k| tree.get(&k).cloned())
                    .unwrap_or(serde_json::Value::Null);
                serde_json::to_writer(&mut out, &value)
                    .map_err(|e| format!("cannot write {name} as JSON: {e}"))?;
            }
        }
        Ok(out)
    }

    /// The JSON status body for a gRPC error (`grpc-status-details-bin` decoded where the
    /// descriptor set knows the detail types).
    pub fn status_body(&self, status: &StatusBody) -> Vec<u8> {
        status.to_json(Some(&self.pool))
    }
}

/// One binding of `rule` (an `HttpRule` message) for `method`.
fn compile(
    method: &MethodDescriptor,
    rule: &DynamicMessage,
    grpc_path: &Arc<str>,
) -> Result<Route, String> {
    let text = |name: &str| match rule.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let verbs = [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ];
    let (http_method, path) = match verbs
        .into_iter()
        .find(|(name, _)| rule.has_field_by_name(name))
    {
        Some((name, m)) => (m, text(name)),
        None => match rule.get_field_by_name("custom").as_deref() {
            Some(Value::Message(custom)) if rule.has_field_by_name("custom") => {
                let field = |n: &str| match custom.get_field_by_name(n).as_deref() {
                    Some(Value::String(s)) => s.clone(),
                    _ => String::new(),
                };
                let kind = field("kind");
                let m = Method::from_bytes(kind.as_bytes())
                    .map_err(|_| format!("custom kind {kind:?} is not an HTTP method"))?;
                (m, field("path"))
            }
            _ => return Err("the google.api.http rule has no pattern (get, post, ...)".to_owned()),
        },
    };
    let template = Template::parse(&path)?;
    let input = method.input();
    for field in template.fields() {
        message::resolve(&input, field).map_err(|e| format!("path {path:?}: {e}"))?;
    }
    let body = match text("body").as_str() {
        "" => BodyField::None,
        "*" => BodyField::All,
        field => {
            let parts: Vec<String> = field.split('.').map(str::to_owned).collect();
            let leaf = message::resolve_any(&input, &parts).map_err(|e| format!("body: {e}"))?;
            if leaf.is_list() || leaf.is_map() || !matches!(leaf.kind(), Kind::Message(_)) {
                // A scalar body is legal in the spec, rare in practice: refuse it clearly.
                return Err(format!("body {field:?} must name a message field"));
            }
            BodyField::Field(parts)
        }
    };
    let response_body = match text("response_body") {
        r if r.is_empty() => None,
        r => {
            if method.output().get_field_by_name(&r).is_none() {
                return Err(format!(
                    "response_body {r:?} is not a field of {}",
                    method.output().full_name()
                ));
            }
            Some(r)
        }
    };
    Ok(Route {
        pattern: format!("{http_method} {path}"),
        http_method,
        template,
        grpc_path: Arc::clone(grpc_path),
        method: method.clone(),
        body,
        response_body,
    })
}

#[cfg(test)]
#[cfg(test)]
pub(crate) mod tests;
