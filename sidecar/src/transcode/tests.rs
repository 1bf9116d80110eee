use std::path::{Path, PathBuf};

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};

use super::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/transcode")
}

/// The fixture's descriptor set, compiled with protox (no protoc), options kept as encoded
/// (`google.api.http` is an extension: a decoded-and-re-encoded set would lose it).
pub(crate) fn descriptor_set(file: &str) -> Vec<u8> {
    let mut compiler = protox::Compiler::new([fixtures()]).unwrap();
    compiler.include_imports(true);
    compiler.open_file(file).unwrap();
    compiler.encode_file_descriptor_set()
}

fn transcoder_with(f: impl FnOnce(&mut Settings)) -> Transcoder {
    let mut settings = Settings::new(
        50051,
        PathBuf::from("orders.pb"),
        vec!["shop.v1.Orders".to_owned()],
    );
    f(&mut settings);
    Transcoder::from_bytes(settings, &descriptor_set("orders.proto")).unwrap()
}

fn transcoder() -> Transcoder {
    transcoder_with(|_| {})
}

/// The request `method path` would send, as JSON (proto field names), or the 400 text.
fn request(
    t: &Transcoder,
    method: &str,
    uri: &str,
    body: &str,
) -> Result<serde_json::Value, String> {
    let (path, query) = uri
        .split_once('?')
        .map_or((uri, None), |(p, q)| (p, Some(q)));
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let (route, bindings) = t.route(&method, path).ok_or("no route")?;
    let bytes = t
        .request(route, bindings?, query, body.as_bytes())
        .map_err(|BadRequest(e)| e)?;
    let msg = DynamicMessage::decode(route.method.input(), bytes.as_slice()).unwrap();
    Ok(msg
        .serialize_with_options(
            serde_json::value::Serializer,
            &SerializeOptions::new().use_proto_field_name(true),
        )
        .unwrap())
}

fn grpc_path(t: &Transcoder, method: &str, path: &str) -> Option<String> {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    t.route(&method, path).map(|(r, _)| r.grpc_path.to_string())
}

#[test]
fn routes_cover_bindings_verbs_and_wildcards() {
    let t = transcoder();
    let get = Some("/shop.v1.Orders/GetOrder".to_owned());
    assert_eq!(grpc_path(&t, "GET", "/v1/orders/42"), get);
    assert_eq!(grpc_path(&t, "GET", "/v1/shops/main/orders/42"), get);
    assert_eq!(
        grpc_path(&t, "POST", "/v1/orders/42:ship").as_deref(),
        Some("/shop.v1.Orders/ShipOrder")
    );
    assert_eq!(
        grpc_path(&t, "GET", "/v1/files/a/b/c").as_deref(),
        Some("/shop.v1.Orders/GetFile")
    );
    assert_eq!(
        grpc_path(&t, "GET", "/v1/orders").as_deref(),
        Some("/shop.v1.Orders/ListOrders")
    );
    assert_eq!(grpc_path(&t, "DELETE", "/v1/orders/42"), None);
    assert_eq!(grpc_path(&t, "GET", "/v2/orders/42"), None);
    assert!(t.routes().iter().any(|r| r.server_streaming()));
    assert!(t.skipped().is_empty());
}

#[test]
fn path_query_and_body_build_the_message() {
    let t = transcoder();
    assert_eq!(
        request(&t, "GET", "/v1/orders/42", "").unwrap(),
        serde_json::json!({"id": "42"})
    );
    assert_eq!(
        request(&t, "GET", "/v1/shops/a%20b/orders/7", "").unwrap(),
        serde_json::json!({"id": "7", "shop": "a b"})
    );
    assert_eq!(
        request(
            &t,
            "GET",
            "/v1/orders?item=big+box&limit=2&failFirst=true",
            ""
        )
        .unwrap(),
        serde_json::json!({"item": "big box", "limit": 2, "fail_first": true})
    );
    let created = request(
        &t,
        "POST",
        "/v1/orders?validate_only=true",
        r#"{"item":"gadget","quantity":2,"status":"SHIPPED","createdAt":"2026-01-02T03:04:05Z","tags":["x"],"shipTo":{"city":"Lyon"}}"#,
    )
    .unwrap();
    assert_eq!(
        created,
        serde_json::json!({
            "order": {"item": "gadget", "quantity": 2, "status": "SHIPPED",
                      "created_at": "2026-01-02T03:04:05Z", "tags": ["x"],
                      "ship_to": {"city": "Lyon"}},
            "validate_only": true
        })
    );
    // body "*": the path variable wins over the body.
    assert_eq!(
        request(
            &t,
            "POST",
            "/v1/orders/5:ship",
            r#"{"id":"9","carrier":"ups"}"#
        )
        .unwrap(),
        serde_json::json!({"id": "5", "carrier": "ups"})
    );
    assert_eq!(
        request(&t, "GET", "/v1/files/a/b%2Fc", "").unwrap(),
        serde_json::json!({"path": "a/b%2Fc"})
    );
}

#[test]
fn bad_requests_name_the_field() {
    let t = transcoder();
    let err = |m, u, b| request(&t, m, u, b).unwrap_err();
    let e = err("POST", "/v1/orders", r#"{"item":"x","colour":"red"}"#);
    assert!(e.contains("colour"), "{e}");
    let e = err("POST", "/v1/orders", r#"{"quantity":"many"}"#);
    assert!(e.contains("quantity"), "{e}");
    let e = err("GET", "/v1/orders/abc", "");
    assert!(e.contains("id"), "{e}");
    let e = err("GET", "/v1/orders?colour=red", "");
    assert!(e.contains("colour"), "{e}");
    let e = err("GET", "/v1/orders?fail_first=yes", "");
    assert!(e.contains("fail_first"), "{e}");
    let e = err("GET", "/v1/orders/42", "{}");
    assert!(e.contains("no request body"), "{e}");
    let e = err("POST", "/v1/orders", "{not json");
    assert!(e.contains("not valid JSON"), "{e}");
    let e = err("POST", "/v1/orders/1:ship?carrier=x", "{}");
    assert!(e.contains("carrier"), "{e}");
    let e = err("POST", "/v1/orders/1:ship", "[1]");
    assert!(e.contains("JSON object"), "{e}");
    let e = err("GET", "/v1/orders/%zz", "");
    assert!(e.contains("percent"), "{e}");
}

#[test]
fn unknown_fields_can_be_ignored() {
    let t = transcoder_with(|s| s.unknown_fields = UnknownFields::Ignore);
    assert_eq!(
        request(
            &t,
            "POST",
            "/v1/orders?colour=red",
            r#"{"item":"x","colour":"red"}"#
        )
        .unwrap(),
        serde_json::json!({"order": {"item": "x"}})
    );
}

fn order_bytes(t: &Transcoder, json: &str) -> Vec<u8> {
    let desc = t.pool.get_message_by_name("shop.v1.Order").unwrap();
    let mut de = serde_json::Deserializer::from_str(json);
    DynamicMessage::deserialize(desc, &mut de)
        .unwrap()
        .encode_to_vec()
}

#[test]
fn responses_follow_the_proto3_json_mapping() {
    let t = transcoder();
    let (route, _) = t.route(&Method::GET, "/v1/orders/1").unwrap();
    let msg = order_bytes(
        &t,
        r#"{"id":"9007199254740993","status":"SHIPPED","createdAt":"2026-01-02T03:04:05Z","shipTo":{"postalCode":"69001"}}"#,
    );
    let json: serde_json::Value =
        serde_json::from_slice(&t.response_json(route, &msg).unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"id": "9007199254740993", "status": "SHIPPED",
                           "createdAt": "2026-01-02T03:04:05Z", "shipTo": {"postalCode": "69001"}})
    );
    let t = transcoder_with(|s| {
        s.json_names = JsonNames::Proto;
        s.print_defaults = true;
    });
    let (route, _) = t.route(&Method::GET, "/v1/orders/1").unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&t.response_json(route, &msg).unwrap()).unwrap();
    assert_eq!(json["ship_to"]["postal_code"], "69001");
    assert_eq!(json["quantity"], 0);
    assert!(t
        .response_json(route, &[0xff, 0xff])
        .unwrap_err()
        .contains("shop.v1.Order"));
}

#[test]
fn response_body_selects_a_field() {
    let t = transcoder();
    let (route, _) = t.route(&Method::GET, "/v1/files/x").unwrap();
    let desc = t.pool.get_message_by_name("shop.v1.File").unwrap();
    let mut de = serde_json::Deserializer::from_str(r#"{"path":"a/b","size":"3"}"#);
    let msg = DynamicMessage::deserialize(desc, &mut de)
        .unwrap()
        .encode_to_vec();
    assert_eq!(t.response_json(route, &msg).unwrap(), br#""a/b""#);
}

#[test]
fn bad_descriptor_sets_and_settings_are_refused_with_what_to_do() {
    let settings = || Settings::new(1, PathBuf::from("x.pb"), vec!["shop.v1.Orders".to_owned()]);
    let e = Transcoder::from_bytes(settings(), b"\x0a\x03abc").unwrap_err();
    assert!(e.contains("not a valid FileDescriptorSet"), "{e}");
    let e = Transcoder::from_bytes(settings(), b"garbage that is not protobuf").unwrap_err();
    assert!(e.contains("protoc --include_imports"), "{e}");
    // A set without google.api.http.
    let bare = protox::compile(["google/protobuf/timestamp.proto"], [fixtures()])
        .unwrap()
        .encode_to_vec();
    let e = Transcoder::from_bytes(settings(), &bare).unwrap_err();
    assert!(e.contains("google/api/annotations.proto"), "{e}");
    let mut s = settings();
    s.services = vec!["shop.v1.Nope".to_owned()];
    let e = Transcoder::from_bytes(s, &descriptor_set("orders.proto")).unwrap_err();
    assert!(e.contains("shop.v1.Orders"), "names what the set has: {e}");
    let mut s = settings();
    s.services.clear();
    assert!(Transcoder::from_bytes(s, &descriptor_set("orders.proto")).is_err());
    let e =
        Transcoder::load(Settings::new(1, PathBuf::from("/nonexistent/x.pb"), vec![])).unwrap_err();
    assert!(e.contains("cannot read /nonexistent/x.pb"), "{e}");
}

#[test]
fn the_v2_set_adds_a_route() {
    let v2 = Transcoder::from_bytes(
        Settings::new(1, PathBuf::from("v2.pb"), vec!["shop.v1.Orders".to_owned()]),
        &descriptor_set("orders_v2.proto"),
    )
    .unwrap();
    assert_eq!(
        grpc_path(&v2, "POST", "/v1/orders/3:cancel").as_deref(),
        Some("/shop.v1.Orders/CancelOrder")
    );
    assert_eq!(
        grpc_path(&transcoder(), "POST", "/v1/orders/3:cancel"),
        None
    );
    assert_ne!(v2.digest_hex(), transcoder().digest_hex());
    let _ = DescriptorPool::decode(descriptor_set("orders_v2.proto").as_slice()).unwrap();
}
