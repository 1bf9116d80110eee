//! Inbound authorization: `[inbound] default` and `[[inbound.rule]]` decide who may call the
//! app (Istio's order: deny rules, then allow rules, then the default), per HTTP request and per
//! opaque connection (before the app is dialled), with dry-run rules counted and never enforced,
//! gRPC denials as `grpc-status: 7`, and the kubelet's probes exempt. Callers with other
//! identities are `openssl s_client` with certificates minted for the test.
use std::time::Duration;

use sidecar_tests::mesh::{
    openssl_mesh_request, spiffe_id, IdentityDir, MeshCa, MeshPair, LINK_IP_B,
};
use sidecar_tests::metrics::value;
use sidecar_tests::{assert_eventually, Pod, Upstream};

const RULES: &str = r#"
[inbound]
default = "deny"
probe_paths = ["/healthz"]

[[inbound.rule]]
name = "a-reads-orders"
action = "allow"
from.principals = ["spiffe://mesh.test/ns/a/sa/a"]
to.methods = ["GET"]
to.paths = ["/orders/*"]

[[inbound.rule]]
name = "everyone-in-the-mesh"
action = "allow"
from.principals = ["*"]
to.paths = ["/public/*", "/admin/*"]

[[inbound.rule]]
name = "no-admin"
action = "deny"
to.paths = ["/admin/*"]

[[inbound.rule]]
name = "watch-b"
action = "deny"
dry_run = true
from.namespaces = ["b"]
"#;

/// The pair of the tests: A is `ns/a/sa/a`, B (the callee) `ns/server/sa/app` with `config`.
fn setup<T>(ca: &MeshCa, config: &str, b_apps: impl FnOnce(&Pod) -> T) -> (MeshPair, T) {
    MeshPair::start(
        ca,
        (&spiffe_id("a", "a"), &spiffe_id("server", "app")),
        config,
        b_apps,
    )
}

fn decisions(pod: &Pod, rule: &str, action: &str, result: &str) -> f64 {
    value(
        pod,
        // Prometheus orders the labels by name.
        &format!(
            r#"sidecar_authz_decisions_total{{action="{action}",result="{result}",rule="{rule}"}}"#
        ),
    )
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn default_deny_allows_only_what_a_rule_allows_and_counts_the_deciding_rule() {
    let ca = MeshCa::new("mesh root");
    let (s, app) = setup(&ca, RULES, |b| b.app_http_server("0.0.0.0:8080", "b"));
    let target = format!("{LINK_IP_B}:8080");
    let as_a = |method: &str, path: &str| {
        s.a.run_app_raw(&[
            "http",
            "--connect",
            &target,
            "--method",
            method,
            "--path",
            path,
        ])
    };
    let get = as_a("GET", "/orders/1");
    assert!(get.stdout.contains("\"status\":200"), "{}", get.stdout);
    let post = as_a("POST", "/orders/1");
    assert!(post.stdout.contains("\"status\":403"), "{}", post.stdout);
    assert!(
        post.stdout.contains("inbound-authz-denied"),
        "{}",
        post.stdout
    );
    // Principal B: a mesh client of the same trust domain, another identity.
    let leaf_b = ca.leaf(&spiffe_id("b", "b"));
    let b_said = openssl_mesh_request(
        s.b.remote_netns(),
        "10.200.0.2:8080",
        &s.b.log_dir().join("client-b"),
        &leaf_b,
        &ca.pem(),
        b"GET /orders/1 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&b_said), 403, "{b_said}");
    // A plaintext client.
    let plain =
        s.b.remote_request("10.200.0.2:8080", "GET", "/orders/1", &[], "");
    assert_eq!(plain.status, 403, "{plain:?}");
    assert_eq!(
        plain.header("x-sidecar-error"),
        Some("inbound-authz-denied")
    );
    assert!(
        plain.header("x-sidecar-authz-rule").is_none(),
        "the rule is not named to callers unless expose_rule is on"
    );
    // The kubelet's probe path from the same plaintext source: answered.
    let probe =
        s.b.remote_request("10.200.0.2:8080", "GET", "/healthz", &[], "");
    assert_eq!(probe.status, 200, "{probe:?}");

    assert_eq!(decisions(&s.b, "a-reads-orders", "allow", "allow"), 1.0);
    assert_eq!(
        decisions(&s.b, "default", "deny", "deny"),
        3.0,
        "A's POST, B's GET and the plaintext GET fell through to the default"
    );
    assert_eq!(decisions(&s.b, "probe", "allow", "allow"), 1.0);
    assert_eq!(
        decisions(&s.b, "watch-b", "deny", "dry_run_deny"),
        1.0,
        "the dry-run rule saw B's request and only counted it"
    );
    assert_eq!(
        app.requests().len(),
        2,
        "A's GET and the probe reached the app"
    );
    assert!(
        s.b.proxy_log().contains("authz=a-reads-orders"),
        "the access log names the deciding rule"
    );
}

#[test]
fn a_deny_rule_wins_over_a_broad_allow_and_dry_run_never_enforces() {
    let ca = MeshCa::new("mesh root");
    let (s, app) = setup(&ca, RULES, |b| b.app_http_server("0.0.0.0:8080", "b"));
    let target = format!("{LINK_IP_B}:8080");
    let public =
        s.a.run_app_raw(&["http", "--connect", &target, "--path", "/public/x"]);
    assert!(
        public.stdout.contains("\"status\":200"),
        "{}",
        public.stdout
    );
    let admin =
        s.a.run_app_raw(&["http", "--connect", &target, "--path", "/admin/x"]);
    assert!(admin.stdout.contains("\"status\":403"), "{}", admin.stdout);
    assert_eq!(decisions(&s.b, "no-admin", "deny", "deny"), 1.0);
    // B is watched by a dry-run deny: its allowed request succeeds, and the rule is counted.
    let leaf_b = ca.leaf(&spiffe_id("b", "b"));
    let b_said = openssl_mesh_request(
        s.b.remote_netns(),
        "10.200.0.2:8080",
        &s.b.log_dir().join("client-b"),
        &leaf_b,
        &ca.pem(),
        b"GET /public/y HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&b_said), 200, "{b_said}");
    assert_eq!(decisions(&s.b, "watch-b", "deny", "dry_run_deny"), 1.0);
    assert_eq!(
        decisions(&s.b, "everyone-in-the-mesh", "allow", "allow"),
        2.0
    );
    assert_eq!(app.requests().len(), 2);
}

#[test]
fn a_denied_opaque_connection_is_reset_before_the_app_accepts_anything() {
    let config = "[inbound]\ndefault = \"deny\"\n[[inbound.rule]]\nname = \"a-only\"\naction = \"allow\"\nports = [9000]\nfrom.principals = [\"spiffe://mesh.test/ns/a/sa/a\"]\n";
    let ca = MeshCa::new("mesh root");
    let (s, echo) = setup(&ca, config, |b| b.app_echo_server("0.0.0.0:9000", "echo"));
    // A plaintext client of raw TCP: reset, and the app never saw a connection.
    let plain = s.b.remote_echo("10.200.0.2:9000", 64);
    assert!(!plain.ok && plain.received == 0, "{plain:?}");
    assert!(
        echo.connections().is_empty(),
        "the app accepted nothing: {:?}",
        echo.connections()
    );
    assert_eq!(decisions(&s.b, "default", "deny", "deny"), 1.0);
    // A (allowed) gets through.
    let ok = s.a.app_echo(&format!("{LINK_IP_B}:9000"), 512);
    assert!(ok.ok, "{ok:?}");
    assert_eq!(echo.connections().len(), 1);
    assert_eq!(decisions(&s.b, "a-only", "allow", "allow"), 1.0);
}

#[test]
fn a_denied_grpc_call_gets_status_7_and_other_streams_go_on() {
    let config = "[inbound]\nexpose_rule = true\n[[inbound.rule]]\nname = \"no-admin\"\naction = \"deny\"\nto.paths = [\"/admin/*\", \"/sidecar.test.Echo/*\"]\n";
    let ca = MeshCa::new("mesh root");
    let (s, grpc) = setup(&ca, config, |b| {
        Upstream::grpc(b.pod_netns(), "0.0.0.0:50051", "grpc-b")
    });
    let reply = s.a.app_grpc(&format!("{LINK_IP_B}:50051"), "denied");
    assert_eq!(reply.status, 200, "{reply:?}");
    // Trailers-only (the status in the one HEADERS frame that ends the stream), as gRPC servers
    // answer an immediate error.
    let status = reply
        .headers
        .iter()
        .chain(&reply.trailers)
        .find(|(k, _)| k == "grpc-status")
        .map(|(_, v)| v.as_str());
    assert_eq!(status, Some("7"), "PERMISSION_DENIED: {reply:?}");
    assert!(
        reply
            .headers
            .iter()
            .any(|(k, v)| k == "x-sidecar-authz-rule" && v == "no-admin"),
        "expose_rule names the rule: {reply:?}"
    );
    assert!(grpc.requests().is_empty());
    // Two requests on one HTTP/2 connection (nghttp, prior knowledge, both streams at once): the
    // denied one does not break the other.
    let out = s.a.app_command(
        "nghttp",
        &[
            "-n",
            "-s",
            &format!("http://{LINK_IP_B}:50051/admin/x"),
            &format!("http://{LINK_IP_B}:50051/ok"),
        ],
    );
    let stats = String::from_utf8_lossy(&out.stdout);
    let statuses: Vec<(String, String)> = stats
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Stat lines: `<stream id> +<end> +<start> <time> <status> <size> <path>`.
            (f.len() >= 7 && f[1].starts_with('+')).then(|| (f[6].to_owned(), f[4].to_owned()))
        })
        .collect();
    assert!(
        statuses.contains(&("/admin/x".to_owned(), "403".to_owned()))
            && statuses.contains(&("/ok".to_owned(), "200".to_owned())),
        "both streams answered on one connection: {stats}"
    );
    assert_eq!(
        grpc.requests().len(),
        1,
        "only the allowed stream reached the app"
    );
    assert_eq!(decisions(&s.b, "no-admin", "deny", "deny"), 2.0);
    // An absolute-form HTTP/1 request (a client that takes us for its proxy) is decided on its
    // own path, the one the app would get.
    let leaf = ca.leaf(&spiffe_id("b", "b"));
    let said = openssl_mesh_request(
        s.b.remote_netns(),
        "10.200.0.2:50051",
        &s.b.log_dir().join("absolute-form"),
        &leaf,
        &ca.pem(),
        b"GET http://b/admin/x HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&said), 403, "{said}");
    assert!(said.contains("x-sidecar-authz-rule: no-admin"), "{said}");
}

#[test]
fn a_reload_flips_the_decision_for_new_requests() {
    let ca = MeshCa::new("mesh root");
    let (s, _app) = setup(&ca, "[inbound]\ndefault = \"allow\"\n", |b| {
        b.app_http_server("0.0.0.0:8080", "b")
    });
    let target = format!("{LINK_IP_B}:8080");
    let get = || {
        s.a.run_app_raw(&["http", "--connect", &target, "--path", "/x"])
    };
    assert!(get().stdout.contains("\"status\":200"));
    std::fs::write(
        s.b.log_dir().join("sidecar.toml"),
        "[inbound]\ndefault = \"deny\"\n",
    )
    .unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        get().stdout.contains("\"status\":403"),
        "the reload denies new requests"
    );
    // A broken file keeps the rules in force.
    std::fs::write(
        s.b.log_dir().join("sidecar.toml"),
        "[inbound]\ndefault = \"nope\"\n",
    )
    .unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        value(&s.b, r#"sidecar_config_reloads_total{result="rejected"}"#) >= 1.0,
        "the broken file is rejected"
    );
    assert!(get().stdout.contains("\"status\":403"));
}

/// `sidecar inject` reads the pod's `httpGet` probes and hands their paths to the proxy; under
/// default-deny and strict mTLS, the kubelet (a plaintext client from outside the pod) still gets
/// its probe answered, while any other path from the same source is refused.
#[test]
fn probes_of_an_injected_deployment_pass_under_default_deny_and_strict_mtls() {
    let deployment = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders
spec:
  selector:
    matchLabels: {app: orders}
  template:
    metadata:
      labels: {app: orders}
    spec:
      containers:
      - name: app
        image: orders:1
        readinessProbe:
          httpGet: {path: /ready, port: 8080}
        livenessProbe:
          httpGet: {path: /healthz?verbose=1, port: 8080}
";
    let mut inject = std::process::Command::new(sidecar_tests::env::sidecar_bin())
        .args(["inject", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sidecar inject");
    {
        use std::io::Write;
        inject
            .stdin
            .take()
            .unwrap()
            .write_all(deployment.as_bytes())
            .unwrap();
    }
    let out = inject.wait_with_output().unwrap();
    let yaml = String::from_utf8_lossy(&out.stdout);
    let paths = yaml
        .split("name: SIDECAR_PROBE_PATHS")
        .nth(1)
        .and_then(|rest| rest.lines().nth(1))
        .and_then(|line| line.trim().strip_prefix("value: "))
        .unwrap_or_else(|| panic!("inject wrote no SIDECAR_PROBE_PATHS:\n{yaml}"))
        .trim_matches('"')
        .to_owned();
    assert_eq!(paths, "/ready,/healthz");

    let config = "[inbound]\ndefault = \"deny\"\nmtls = \"strict\"\n";
    let ca = MeshCa::new("mesh root");
    let mut b = Pod::new();
    let app = b.app_http_server("0.0.0.0:8080", "orders");
    let id = IdentityDir::create(
        &b.log_dir().join("identity"),
        &ca.leaf(&spiffe_id("shop", "orders")),
        &ca.pem(),
    );
    let conf = b.log_dir().join("sidecar.toml");
    std::fs::write(&conf, config).unwrap();
    b.init_with_netns(&[]);
    let (d, c) = (id.path().display().to_string(), conf.display().to_string());
    b.start_proxy_with_inbound(&[
        "--identity-dir",
        &d,
        "--config",
        &c,
        "--probe-paths",
        &paths,
    ]);
    for probe in ["/ready", "/healthz"] {
        let r = b.remote_request("10.200.0.2:8080", "GET", probe, &[], "");
        assert_eq!(r.status, 200, "the kubelet's probe {probe}: {r:?}");
    }
    let other = b.remote_request("10.200.0.2:8080", "GET", "/orders", &[], "");
    assert_eq!(other.status, 403, "{other:?}");
    assert_eq!(app.requests().len(), 2, "only the probes reached the app");
    assert_eq!(decisions(&b, "probe", "allow", "allow"), 2.0);
}

/// `sidecar check-config` checks the rules as `sidecar run` would: every bad key named, exit 64;
/// a good file passes.
#[test]
fn check_config_names_every_bad_rule_key() {
    let dir = std::env::temp_dir().join(format!("sidecar-authz-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |text: &str| {
        let file = dir.join("policy.toml");
        std::fs::write(&file, text).unwrap();
        std::process::Command::new(sidecar_tests::env::sidecar_bin())
            .arg("check-config")
            .arg(&file)
            .output()
            .expect("run sidecar check-config")
    };
    let bad = check(
        "[inbound]\ndefault = \"closed\"\n[[inbound.rule]]\nname = \"x\"\naction = \"permit\"\nfrom.principals = [\"a*b\"]\nto.paths = [\"orders\"]\n",
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(64), "{stderr}");
    for key in [
        "[inbound] default",
        "rule #1 action",
        "rule #1 from.principals",
        "rule #1 to.paths",
    ] {
        assert!(stderr.contains(key), "{key} not named:\n{stderr}");
    }
    let good = check(RULES);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
