//! REST/JSON to gRPC through the real interception path: the app is a Python grpcio server (not
//! ours: it knows the service only from a descriptor set, through the protobuf runtime) on port
//! 50051 of the pod; callers are curl (HTTP/1.1 and HTTP/2 REST) and a grpcio client (native
//! gRPC on the same port) in the remote namespace. The sidecar has a `[[transcode]]` section for
//! port 50051 with the fixture's descriptor set (compiled here with protox, no protoc).
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use sidecar_tests::metrics::{admin_get, metrics, series, value};
use sidecar_tests::{eventually, Pod};

const APP: &str = "10.200.0.2:50051";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/transcode")
}

/// The python with grpcio and protobuf: $GRPC_PYTHON (`cargo xtask test` installs it), else
/// the venv it installs into.
fn grpc_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/grpcio/bin/python");
    let found = std::env::var_os("GRPC_PYTHON")
        .map(PathBuf::from)
        .or(Some(venv))
        .filter(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "\n\n*** no python with grpcio: the transcoding tests need the grpcio app. ***\n\
             `cargo xtask test` installs it; by hand:\n  python3 -m venv target/tools/grpcio && \
             target/tools/grpcio/bin/pip install grpcio==1.85.3 protobuf==7.36.2\n\
             (or set GRPC_PYTHON to a python that has them)\n"
        )
    })
}

/// `file`'s descriptor set with its imports, options kept as written (protox).
fn descriptor_set(file: &str) -> Vec<u8> {
    let mut compiler = protox::Compiler::new([fixtures()]).expect("protox includes");
    compiler.include_imports(true);
    compiler
        .open_file(file)
        .unwrap_or_else(|e| panic!("compile {file}: {e:?}"));
    compiler.encode_file_descriptor_set()
}

fn write_readable(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    // Renamed into place: the proxy never reads half a file.
    fs::rename(&tmp, path).unwrap();
}

/// The grpcio app, killed when dropped.
struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pod whose app is the grpcio order service and whose sidecar transcodes port 50051.
struct Setup {
    pod: Pod,
    _app: App,
    dir: PathBuf,
}

impl Setup {
    /// `section` is appended to the `[[transcode]]` section (extra keys).
    fn start(section: &str) -> Setup {
        let mut pod = Pod::new();
        let dir = pod.log_dir().join("transcode");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        // The app knows every method (v2); the sidecar starts with v1's routes.
        write_readable(&dir.join("app.pb"), &descriptor_set("orders_v2.proto"));
        write_readable(&dir.join("orders.pb"), &descriptor_set("orders.proto"));
        let setup_config = |dir: &Path| {
            write_readable(
                &dir.join("sidecar.toml"),
                format!(
                    "[[transcode]]\nport = 50051\ndescriptor_set = \"orders.pb\"\n\
                     services = [\"shop.v1.Orders\"]\n{section}\n"
                )
                .as_bytes(),
            );
        };
        setup_config(&dir);
        let server = fixtures().join("orders_server.py");
        let app_pb = dir.join("app.pb");
        let mut child = pod.app_spawn(
            grpc_python().to_str().unwrap(),
            &[
                server.to_str().unwrap(),
                "--descriptor-set",
                app_pb.to_str().unwrap(),
                "--port",
                "50051",
            ],
        );
        let mut ready = String::new();
        let stdout = child.stdout.take().expect("the app's stdout");
        BufReader::new(stdout)
            .read_line(&mut ready)
            .expect("read the app's first line");
        let app = App(child);
        assert_eq!(ready.trim(), "ready", "the grpcio app did not start");
        pod.init_with_netns(&[]);
        let config = dir.join("sidecar.toml").display().to_string();
        pod.start_proxy_with_inbound(&["--config", &config, "--access-log"]);
        Setup {
            pod,
            _app: app,
            dir,
        }
    }
}

/// curl's view of one exchange.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The body's JSON lines (a server stream).
    fn lines(&self) -> Vec<Value> {
        self.body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
            .collect()
    }
}

/// `curl <args>` from the remote namespace (a REST client with no sidecar).
fn curl(pod: &Pod, args: &[&str]) -> Reply {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            pod.remote_netns(),
            "curl",
            "-sS",
            "--max-time",
            "20",
        ])
        .args(["-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    // With HTTP/2 there is no 100-continue, with HTTP/1.1 curl may print one: the last head.
    let (headers, body) = rest.rsplit_once("\r\n\r\n").map_or((rest, ""), |(h, b)| {
        (h.rsplit("\r\n\r\n").next().unwrap_or(h), b)
    });
    let status = code.trim().parse().unwrap_or(0);
    assert!(
        status != 0,
        "curl {args:?} failed ({}): {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Reply {
        status,
        headers: headers.to_owned(),
        body: body.to_owned(),
    }
}

fn get(pod: &Pod, path: &str) -> Reply {
    curl(pod, &[&format!("http://{APP}{path}")])
}

/// `method path` with a JSON `body` (from a file: bodies may be larger than an argument can be).
fn send(pod: &Pod, method: &str, path: &str, body: &str) -> Reply {
    static BODIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BODIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = pod.log_dir().join(format!("body-{n}.json"));
    fs::write(&file, body).unwrap();
    let reply = curl(
        pod,
        &[
            "-X",
            method,
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("http://{APP}{path}"),
        ],
    );
    let _ = fs::remove_file(&file);
    reply
}

/// The native grpcio client's result of one call (see grpc_client.py).
fn grpc_call(s: &Setup, method: &str, request: &str, extra: &[&str]) -> Value {
    let client = fixtures().join("grpc_client.py");
    let out = Command::new("ip")
        .args(["netns", "exec", s.pod.remote_netns()])
        .arg(grpc_python())
        .arg(client)
        .arg("--descriptor-set")
        .arg(s.dir.join("app.pb"))
        .args(["--target", APP, "--method", method, "--request", request])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run grpc_client.py");
    assert!(
        out.status.success(),
        "grpc_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "grpc_client.py printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `tests/fixtures/transcode/orders.pb` is what protox makes of orders.proto today (the bench
/// and the docs' example use the committed file): `UPDATE_GOLDEN=1` rewrites it.
#[test]
fn the_committed_descriptor_set_is_current() {
    let path = fixtures().join("orders.pb");
    let fresh = descriptor_set("orders.proto");
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        fs::write(&path, &fresh).unwrap();
    }
    let committed = fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is stale: run `UPDATE_GOLDEN=1 cargo nextest run -p sidecar-tests --test \
         transcode_rest_to_grpc the_committed` and commit it",
        path.display()
    );
}

fn transcoded(pod: &Pod, route: &str, code: &str) -> f64 {
    value(
        pod,
        &format!(r#"sidecar_transcode_requests_total{{code="{code}",route="{route}"}}"#),
    )
}

#[test]
fn rest_calls_reach_the_grpc_app_with_the_proto3_json_mapping() {
    let s = Setup::start("");
    let pod = &s.pod;

    let order = get(pod, "/v1/orders/42");
    assert_eq!(order.status, 200, "{order:?}");
    assert_eq!(order.header("content-type"), Some("application/json"));
    assert_eq!(
        order.json(),
        json!({
            "id": "42",
            "item": "widget",
            "quantity": 3,
            "status": "PENDING",
            "createdAt": "2026-01-02T03:04:05Z",
            "tags": ["a", "b"],
            "shipTo": {"city": "Lyon", "postalCode": "69001"},
            "shop": "main"
        }),
        "int64 as a string, the enum by name, the Timestamp in RFC 3339, lowerCamel names"
    );
    // An additional binding, a variable in the middle.
    let by_shop = get(pod, "/v1/shops/main/orders/42");
    assert_eq!(by_shop.status, 200, "{by_shop:?}");
    assert_eq!(get(pod, "/v1/shops/other/orders/42").status, 404);

    let created = send(
        pod,
        "POST",
        "/v1/orders",
        r#"{"item":"gadget","quantity":2,"tags":["new"],"shipTo":{"city":"Oslo"}}"#,
    );
    assert_eq!(created.status, 200, "{created:?}");
    let body = created.json();
    assert_eq!(body["id"], "9007199254740993", "above 2^53: a string");
    assert_eq!(body["status"], "PENDING");
    assert_eq!(body["createdAt"], "2026-12-04T10:00:00Z");
    assert_eq!(body["shipTo"]["city"], "Oslo");
    assert_eq!(
        created.header("x-order-id"),
        Some("9007199254740993"),
        "the app's response metadata comes back as headers"
    );
    let fetched = get(pod, "/v1/orders/9007199254740993");
    assert_eq!(fetched.json()["item"], "gadget", "{fetched:?}");
    // A query parameter beside the body, and a custom verb with body "*".
    let dry = send(
        pod,
        "POST",
        "/v1/orders?validate_only=true",
        r#"{"item":"x","quantity":1}"#,
    );
    assert_eq!(dry.status, 200, "{dry:?}");
    let shipped = send(pod, "POST", "/v1/orders/42:ship", r#"{"carrier":"ups"}"#);
    assert_eq!(shipped.status, 200, "{shipped:?}");
    assert_eq!(shipped.json()["status"], "SHIPPED");
    assert_eq!(shipped.json()["tags"][2], "carrier:ups");
    // A client that waits for `100 Continue` before its body gets it (without it, curl would
    // wait its minute and the call would fail on curl's 20-second limit).
    let continued = curl(
        pod,
        &[
            "-H",
            "expect: 100-continue",
            "--expect100-timeout",
            "60",
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"carrier":"dhl"}"#,
            &format!("http://{APP}/v1/orders/42:ship"),
        ],
    );
    assert_eq!(continued.status, 200, "{continued:?}");
    let tags = continued.json()["tags"].clone();
    assert!(
        tags.as_array()
            .is_some_and(|t| t.iter().any(|t| t == "carrier:dhl")),
        "{continued:?}"
    );
    // `{path=**}` and `response_body`.
    let file = get(pod, "/v1/files/a/b/c.txt");
    assert_eq!(
        (file.status, file.body.as_str()),
        (200, "\"a/b/c.txt\""),
        "{file:?}"
    );

    // The app's errors, by the google.rpc table, with the JSON status body.
    let missing = get(pod, "/v1/orders/7");
    assert_eq!(missing.status, 404, "{missing:?}");
    assert_eq!(
        missing.json(),
        json!({"code": 5, "message": "order 7 not found", "details": []})
    );
    assert_eq!(
        missing.header("x-sidecar-error"),
        None,
        "the app's answer, not ours"
    );
    let invalid = send(pod, "POST", "/v1/orders", r#"{"item":"x","quantity":0}"#);
    assert_eq!(invalid.status, 400, "{invalid:?}");
    assert_eq!(invalid.json()["code"], 3);
    assert_eq!(invalid.json()["message"], "order.quantity must be positive");

    // The caller's mistakes: 400 naming the field, before anything reaches the app.
    let unknown = send(pod, "POST", "/v1/orders", r#"{"item":"x","colour":"red"}"#);
    assert_eq!(unknown.status, 400, "{unknown:?}");
    assert_eq!(
        unknown.header("x-sidecar-error"),
        Some("transcode-bad-request")
    );
    assert!(
        unknown.json()["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{unknown:?}"
    );
    let bad_id = get(pod, "/v1/orders/forty-two");
    assert_eq!(bad_id.status, 400, "{bad_id:?}");
    assert!(
        bad_id.json()["message"].as_str().unwrap().contains("id"),
        "{bad_id:?}"
    );
    let bad_type = send(pod, "POST", "/v1/orders", r#"{"quantity":"many"}"#);
    assert_eq!(bad_type.status, 400, "{bad_type:?}");
    assert!(
        bad_type.json()["message"]
            .as_str()
            .unwrap()
            .contains("quantity"),
        "{bad_type:?}"
    );
    let not_json = send(pod, "POST", "/v1/orders", "{item:");
    assert_eq!(not_json.status, 400, "{not_json:?}");
    // Over max_body_bytes (1 MiB by default): refused from its length, or, chunked, once the
    // limit is crossed.
    let big = s.dir.join("big.json");
    write_readable(
        &big,
        format!(r#"{{"item":"{}"}}"#, "x".repeat(1_100_000)).as_bytes(),
    );
    let big_arg = format!("@{}", big.display());
    let url = format!("http://{APP}/v1/orders");
    for chunked in [false, true] {
        let mut args = vec!["-X", "POST", "--data-binary", &big_arg, &url];
        if chunked {
            args.extend(["-H", "transfer-encoding: chunked"]);
        }
        let too_large = curl(pod, &args);
        assert_eq!(
            too_large.status, 413,
            "chunked {chunked}: {:?}",
            too_large.headers
        );
        assert_eq!(
            too_large.header("x-sidecar-error"),
            Some("transcode-body-too-large")
        );
    }
    let no_route = get(pod, "/v2/nothing");
    assert_eq!(no_route.status, 404, "{no_route:?}");
    assert_eq!(
        no_route.header("x-sidecar-error"),
        Some("transcode-no-route")
    );

    // HTTP/2 REST callers too (the h2c path of the same port).
    let h2 = curl(
        pod,
        &[
            "--http2-prior-knowledge",
            &format!("http://{APP}/v1/orders/42"),
        ],
    );
    assert_eq!(h2.status, 200, "{h2:?}");
    assert_eq!(h2.json()["id"], "42");

    // Native gRPC on the same port: untouched, trailers included.
    let native = grpc_call(
        &s,
        "GetOrder",
        r#"{"id":"42"}"#,
        &["--metadata", "x-echo-metadata=hi"],
    );
    assert_eq!(native["code"], "OK", "{native}");
    assert_eq!(native["responses"][0]["item"], "widget");
    assert_eq!(
        native["trailing"]["x-echoed"], "hi",
        "trailing metadata arrives: {native}"
    );
    let native_missing = grpc_call(&s, "GetOrder", r#"{"id":"7"}"#, &[]);
    assert_eq!(native_missing["code"], "NOT_FOUND", "{native_missing}");
    assert_eq!(native_missing["details"], "order 7 not found");

    // Counted per route and outcome; the native calls are not transcoded, so not counted.
    let route = "/shop.v1.Orders/GetOrder";
    assert_eq!(
        transcoded(pod, route, "OK"),
        4.0,
        "42, shops/main, 9007199254740993, h2"
    );
    assert_eq!(transcoded(pod, route, "NOT_FOUND"), 2.0);
    assert_eq!(transcoded(pod, route, "bad_request"), 1.0);
    assert_eq!(
        transcoded(pod, "/shop.v1.Orders/CreateOrder", "INVALID_ARGUMENT"),
        1.0
    );
    assert_eq!(
        transcoded(pod, "/shop.v1.Orders/CreateOrder", "too_large"),
        2.0
    );
    assert_eq!(transcoded(pod, "none", "no_route"), 1.0);
    // The access log says which method a request became.
    assert!(
        eventually(Duration::from_secs(5), || pod.proxy_log().lines().any(
            |l| l.contains("path=/v1/orders/42") && l.contains("grpc=/shop.v1.Orders/GetOrder")
        )),
        "no access log line with grpc=:\n{}",
        pod.proxy_log()
    );
    let config: Value = serde_json::from_str(&admin_get(pod, "/config")).unwrap();
    let routes = &config["policy"]["transcode"][0]["routes"];
    assert!(
        routes
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["http"] == "GET /v1/orders/{id}")),
        "{config}"
    );
}

#[test]
fn server_streams_are_json_lines_and_an_immediate_error_is_not_a_200() {
    let s = Setup::start("");
    let pod = &s.pod;
    let stream = get(pod, "/v1/orders?item=stream");
    assert_eq!(stream.status, 200, "{stream:?}");
    assert_eq!(stream.header("content-type"), Some("application/x-ndjson"));
    let ids: Vec<Value> = stream.lines().iter().map(|o| o["id"].clone()).collect();
    assert_eq!(ids, vec![json!("1"), json!("2"), json!("3")], "{stream:?}");
    let limited = get(pod, "/v1/orders?item=stream&limit=2");
    assert_eq!(limited.lines().len(), 2, "{limited:?}");
    // An HTTP/1.0 client cannot take chunks: the stream ends with the connection.
    let old = curl(
        pod,
        &["--http1.0", &format!("http://{APP}/v1/orders?item=stream")],
    );
    assert_eq!(old.status, 200, "{old:?}");
    assert_eq!(old.header("transfer-encoding"), None, "{old:?}");
    assert_eq!(old.lines().len(), 3, "{old:?}");
    let none = get(pod, "/v1/orders?item=nothing-like-it");
    assert_eq!(
        (none.status, none.body.as_str()),
        (200, ""),
        "an empty stream: {none:?}"
    );
    assert_eq!(none.header("content-type"), Some("application/x-ndjson"));

    // The app fails before its first message: the status line says so.
    let immediate = get(pod, "/v1/orders?failFirst=true");
    assert_eq!(immediate.status, 400, "{immediate:?}");
    assert_eq!(immediate.json()["code"], 3);
    assert_eq!(immediate.json()["message"], "fail_first set");
    // It fails after two: they were sent; the error is the last line.
    let broken = get(pod, "/v1/orders?item=stream&fail_after=2");
    assert_eq!(broken.status, 200, "{broken:?}");
    let lines = broken.lines();
    assert_eq!(lines.len(), 3, "{broken:?}");
    assert_eq!(lines[1]["id"], "2");
    assert_eq!(
        lines[2],
        json!({"error": {"code": 14, "message": "stream broken after 2", "details": []}})
    );
    let route = "/shop.v1.Orders/ListOrders";
    assert_eq!(
        transcoded(pod, route, "OK"),
        4.0,
        "the three streams and the HTTP/1.0 one"
    );
    assert_eq!(transcoded(pod, route, "INVALID_ARGUMENT"), 1.0);
    assert_eq!(
        transcoded(pod, route, "UNAVAILABLE"),
        1.0,
        "counted with the status it ended with"
    );
    // A native server-streaming call on the same port.
    let native = grpc_call(&s, "ListOrders", r#"{"item":"stream"}"#, &["--stream"]);
    assert_eq!(
        native["responses"].as_array().map(Vec::len),
        Some(3),
        "{native}"
    );
}

fn reloads(pod: &Pod, result: &str) -> f64 {
    series(
        &metrics(pod),
        &format!("sidecar_config_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn a_new_descriptor_set_arrives_by_reload_and_a_corrupt_one_is_rejected() {
    let s = Setup::start("");
    let pod = &s.pod;
    let cancel = || send(pod, "POST", "/v1/orders/42:cancel", r#"{"reason":"late"}"#);
    let before = cancel();
    assert_eq!(before.status, 404, "v1 has no CancelOrder: {before:?}");
    assert_eq!(before.header("x-sidecar-error"), Some("transcode-no-route"));

    // The set alone is replaced (the config file is unchanged): polled, reloaded.
    let applied = reloads(pod, "applied");
    write_readable(&s.dir.join("orders.pb"), &descriptor_set("orders_v2.proto"));
    assert!(
        eventually(Duration::from_secs(10), || reloads(pod, "applied")
            > applied),
        "the new descriptor set was not applied:\n{}",
        pod.proxy_log()
    );
    let after = cancel();
    assert_eq!(after.status, 200, "{after:?}");
    assert_eq!(after.json()["status"], "CANCELLED");

    // A corrupt set: rejected, named in /config, and every route still answers.
    let rejected = reloads(pod, "rejected");
    write_readable(&s.dir.join("orders.pb"), b"\x0a\x07garbage");
    assert!(
        eventually(Duration::from_secs(10), || reloads(pod, "rejected")
            > rejected),
        "the corrupt set was not rejected:\n{}",
        pod.proxy_log()
    );
    let config = admin_get(pod, "/config");
    assert!(config.contains("not a valid FileDescriptorSet"), "{config}");
    assert_eq!(get(pod, "/v1/orders/42").status, 200);
    assert_eq!(cancel().status, 200, "the mapping in force is kept");

    // The config file changes the options: unknown fields are now ignored.
    write_readable(&s.dir.join("orders.pb"), &descriptor_set("orders_v2.proto"));
    let applied = reloads(pod, "applied");
    write_readable(
        &s.dir.join("sidecar.toml"),
        b"[[transcode]]\nport = 50051\ndescriptor_set = \"orders.pb\"\n\
          services = [\"shop.v1.Orders\"]\nunknown_fields = \"ignore\"\n",
    );
    assert!(
        eventually(Duration::from_secs(10), || reloads(pod, "applied")
            > applied),
        "{}",
        pod.proxy_log()
    );
    let lenient = send(
        pod,
        "POST",
        "/v1/orders",
        r#"{"item":"x","quantity":1,"colour":"red"}"#,
    );
    assert_eq!(
        lenient.status, 200,
        "unknown_fields = \"ignore\": {lenient:?}"
    );
}

/// A raw HTTP/1.1 exchange from the remote namespace: `head` then `body`, then whatever comes
/// back until the server closes or 10 s pass.
fn raw(pod: &Pod, bytes: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let remote = pod.remote_netns().to_owned();
    sidecar_tests::netns::in_netns(&remote, move || {
        let mut s = std::net::TcpStream::connect(APP).expect("connect to the app port");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .expect("enter the remote netns")
}

#[test]
fn hostile_rest_callers_get_bounded_refusals() {
    let s = Setup::start("\n[defaults]\nrequest_timeout = \"1s\"\n");
    let pod = &s.pod;
    // A body that stops half-way: refused once the request timeout passes, the app never called.
    let stalled = raw(
        pod,
        b"POST /v1/orders HTTP/1.1\r\nHost: app\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"item\":"
            .to_vec(),
    );
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert!(
        stalled.contains("x-sidecar-error: downstream-timeout"),
        "{stalled}"
    );
    // JSON nested past any sane depth: a 400, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let nested = send(pod, "POST", "/v1/orders", &deep);
    assert_eq!(nested.status, 400, "{nested:?}");
    assert_eq!(
        nested.header("x-sidecar-error"),
        Some("transcode-bad-request")
    );
    // A flood of query parameters: one answer naming the first bad one.
    let flood: String = (0..2000).map(|i| format!("&p{i}=x")).collect();
    let flooded = get(pod, &format!("/v1/orders?limit=1{flood}"));
    assert_eq!(flooded.status, 400, "{flooded:?}");
    assert!(
        flooded.json()["message"].as_str().unwrap().contains("p0"),
        "{flooded:?}"
    );
    // Percent-encoding that does not decode, ambiguous framing: refused, and the proxy still
    // serves the next caller.
    assert_eq!(get(pod, "/v1/orders/%ff%fe").status, 400);
    let smuggled = raw(
        pod,
        b"POST /v1/orders HTTP/1.1\r\nHost: app\r\ncontent-length: 4\r\n\
          transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
            .to_vec(),
    );
    assert!(smuggled.starts_with("HTTP/1.1 400"), "CL+TE: {smuggled}");
    assert_eq!(get(pod, "/v1/orders/42").status, 200);
}

/// Authorization sees the REST request (method and path as the caller sent them) before it is
/// transcoded; `unmatched = "pass"` hands other requests to the app untouched.
#[test]
fn authorization_applies_to_the_rest_path_and_unmatched_requests_can_pass() {
    let s = Setup::start(
        "unmatched = \"pass\"\n\n[[inbound.rule]]\nname = \"no-create\"\naction = \"deny\"\n\
         to.methods = [\"POST\"]\nto.paths = [\"/v1/orders\"]\n",
    );
    let pod = &s.pod;
    let denied = send(pod, "POST", "/v1/orders", r#"{"item":"x","quantity":1}"#);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(
        denied.header("x-sidecar-error"),
        Some("inbound-authz-denied")
    );
    assert_eq!(get(pod, "/v1/orders/42").status, 200);
    assert_eq!(
        transcoded(pod, "/shop.v1.Orders/CreateOrder", "OK"),
        0.0,
        "a denied request is never transcoded"
    );
    // Not a route: passed to the app as it came (an h2c-only gRPC server cannot answer HTTP/1,
    // so the proxy reports the app's protocol failure), not answered `transcode-no-route`.
    let passed = get(pod, "/v2/nothing");
    assert_ne!(
        passed.header("x-sidecar-error"),
        Some("transcode-no-route"),
        "{passed:?}"
    );
    assert!(passed.status >= 500, "{passed:?}");
    assert_eq!(transcoded(pod, "none", "no_route"), 0.0);
    // Native gRPC is not a REST path: the rule does not apply to it.
    let native = grpc_call(&s, "GetOrder", r#"{"id":"42"}"#, &[]);
    assert_eq!(native["code"], "OK", "{native}");
}
