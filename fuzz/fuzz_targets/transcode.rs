//! REST/JSON to gRPC transcoding (what a hostile REST caller and a broken app control): path
//! templates, request messages from a path, query and body against the tests' order service
//! (the committed descriptor set), response messages and gRPC framing.
//!
//! The first byte picks the part; the rest is split at `\n` into its inputs. Invariants: nothing
//! panics; a template that parses matches its own literal text when it has no variables, with
//! exactly one binding per variable whenever it matches; a refused request says why; an accepted
//! one is not much larger than what the caller sent (no amplification); framing reassembles
//! whatever the split points.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sidecar::transcode::grpc::{frame, Deframer, StatusBody};
use sidecar::transcode::template::Template;
use sidecar::transcode::{BadRequest, Settings, Transcoder, UnknownFields};

static SET: &[u8] = include_bytes!("../../tests/fixtures/transcode/orders.pb");

fn transcoder(reject: bool) -> &'static Transcoder {
    static STRICT: OnceLock<Transcoder> = OnceLock::new();
    static LENIENT: OnceLock<Transcoder> = OnceLock::new();
    let cell = if reject { &STRICT } else { &LENIENT };
    cell.get_or_init(|| {
        let mut s = Settings::new(1, PathBuf::from("orders.pb"), vec!["shop.v1.Orders".into()]);
        if !reject {
            s.unknown_fields = UnknownFields::Ignore;
        }
        Transcoder::from_bytes(s, SET).expect("the fixture set compiles")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.splitn(4, '\n');
    let (a, b, c, d) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    match mode % 4 {
        0 => {
            let Ok(t) = Template::parse(a) else {
                return;
            };
            let vars = t.fields().count();
            if vars == 0 && !a.contains('*') {
                let own = t.matches(a).expect("a literal template matches its own text");
                assert!(own.unwrap().is_empty());
            }
            if let Some(Ok(bindings)) = t.matches(b) {
                assert_eq!(bindings.len(), vars);
            }
        }
        1 | 2 => {
            let t = transcoder(mode % 4 == 1);
            let method = match a.len() % 5 {
                0 => http::Method::GET,
                1 => http::Method::POST,
                2 => http::Method::PATCH,
                3 => http::Method::PUT,
                _ => http::Method::DELETE,
            };
            let Some((route, bindings)) = t.route(&method, b) else {
                return;
            };
            let Ok(bindings) = bindings else {
                return;
            };
            let query = (!c.is_empty()).then_some(c);
            match t.request(route, bindings, query, d.as_bytes()) {
                Ok(bytes) => assert!(
                    bytes.len() <= 8 * (b.len() + c.len() + d.len()) + 64,
                    "{} bytes from {} of input",
                    bytes.len(),
                    b.len() + c.len() + d.len()
                ),
                Err(BadRequest(why)) => assert!(!why.is_empty()),
            }
        }
        _ => {
            // The app's side: any bytes as a GetOrder answer, framed and split anywhere, and
            // as a status's details.
            let t = transcoder(true);
            let (route, _) = t.route(&http::Method::GET, "/v1/orders/1").expect("route");
            let _ = t.response_json(route, rest);
            let framed = frame(rest);
            let split = usize::from(a.len() as u8) % (framed.len() + 1);
            let mut d = Deframer::new(1 << 20);
            d.push(&framed[..split]);
            let first = d.next_message().expect("one valid frame");
            d.push(&framed[split..]);
            let got = match first {
                Some(m) => m,
                None => d.next_message().expect("valid").expect("whole now"),
            };
            assert_eq!(&got[..], rest);
            assert!(d.is_empty());
            let mut h = http::HeaderMap::new();
            h.insert("grpc-status", http::HeaderValue::from_static("5"));
            if let Ok(v) = http::HeaderValue::from_bytes(c.as_bytes()) {
                h.insert("grpc-status-details-bin", v);
            }
            if let Ok(v) = http::HeaderValue::from_bytes(b.as_bytes()) {
                h.insert("grpc-message", v);
            }
            let status = StatusBody::from_headers(&h).expect("a status");
            let json: serde_json::Value =
                serde_json::from_slice(&t.status_body(&status)).expect("the status body is JSON");
            assert_eq!(json["code"], 5);
        }
    }
});
