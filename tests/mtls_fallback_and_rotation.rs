//! Mesh mTLS at its edges: servers without a sidecar (opportunistic fallback, `require`), the
//! app's own TLS passing through, and identity rotation (a leaf swapped under a live connection,
//! a three-step CA rotation) without a failed request.
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sidecar_tests::mesh::{
    link, openssl_s_client, same_serial, spiffe_id, IdentityDir, Leaf, MeshCa, MeshPair,
    NetnsServer, LINK_IP_B,
};
use sidecar_tests::metrics::{admin_get, value};
use sidecar_tests::{assert_eventually, Pod, REMOTE_IP4};

const RELOAD: Duration = Duration::from_secs(10);

fn identity(pod: &Pod, leaf: &Leaf, bundle: &str) -> IdentityDir {
    IdentityDir::create(&pod.log_dir().join("identity"), leaf, bundle)
}

fn start(pod: &mut Pod, id: &IdentityDir, config: Option<&str>) {
    let dir = id.path().display().to_string();
    let mut args = vec!["--identity-dir".to_owned(), dir];
    if let Some(text) = config {
        let file = pod.log_dir().join("sidecar.toml");
        std::fs::write(&file, text).unwrap();
        args.extend(["--config".to_owned(), file.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pod.start_proxy_with_inbound(&args);
}

/// The serial of the identity in force, from `/config`.
fn serial_in_force(pod: &Pod) -> String {
    let config: serde_json::Value = serde_json::from_str(&admin_get(pod, "/config")).unwrap();
    config["identity"]["serial"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

fn wait_for_serial(pod: &Pod, leaf: &Leaf) {
    assert_eventually!(
        RELOAD,
        same_serial(&serial_in_force(pod), &leaf.serial),
        "pod {} did not put certificate {} in force (in force: {})",
        pod.name(),
        leaf.serial,
        serial_in_force(pod)
    );
}

fn redis_cli(pod: &Pod, host: &str) -> String {
    let out = pod.app_command("redis-cli", &["-h", host, "-p", "6379", "PING"]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn opportunistic_mtls_falls_back_once_to_servers_without_a_sidecar() {
    let ca = MeshCa::new("mesh root");
    let mut a = Pod::new();
    // Servers in the remote netns (10.200.0.1, inside the mesh networks), with no sidecar.
    let http = a.http_upstream("10.200.0.1:8080", "plain");
    let greeting = a.greeting_upstream("10.200.0.1:2525", "smtp");
    let _redis = NetnsServer::start(
        a.remote_netns(),
        "10.200.0.1:6379",
        "redis-server",
        &[
            "--bind",
            REMOTE_IP4,
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
    );
    let id = identity(&a, &ca.leaf(&spiffe_id("a", "a")), &ca.pem());
    a.init_with_netns(&[]);
    start(&mut a, &id, None);

    for _ in 0..2 {
        let reply = a.app_http("10.200.0.1:8080");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, "hello from plain\n");
        let line = a.app_greeting("10.200.0.1:2525", Duration::from_secs(5));
        assert!(line.line.starts_with("220"), "{line:?}");
        assert_eq!(redis_cli(&a, "10.200.0.1"), "PONG");
    }
    assert_eq!(
        value(&a, "sidecar_mtls_fallbacks_total"),
        3.0,
        "one fallback per server; the second round went straight to plaintext"
    );
    // HTTP and the server that speaks first answer the ClientHello with something that is not
    // TLS; Redis waits for a line that never comes, so its handshake times out (the connect
    // timeout, 1 s): the price of learning by trying, paid once per fallback_ttl.
    assert_eq!(
        value(
            &a,
            r#"sidecar_mtls_handshakes_total{direction="outbound",result="not_mesh"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            &a,
            r#"sidecar_mtls_handshakes_total{direction="outbound",result="timeout"}"#
        ),
        1.0
    );
    assert_eq!(
        http.requests().len(),
        2,
        "both requests reached the server, in plaintext"
    );
    drop(greeting);
}

#[test]
fn require_never_falls_back() {
    let ca = MeshCa::new("mesh root");
    let mut a = Pod::new();
    let http = a.http_upstream("10.200.0.1:8080", "plain");
    let echo = a.echo_upstream("10.200.0.1:9000", "echo");
    let id = identity(&a, &ca.leaf(&spiffe_id("a", "a")), &ca.pem());
    a.init_with_netns(&[]);
    start(&mut a, &id, Some("[defaults]\nmtls = \"require\"\n"));

    let reply = a.app_http("10.200.0.1:8080");
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(
        reply.header("x-sidecar-error"),
        Some("upstream-mtls-failed")
    );
    let tcp = a.run_app_raw(&["tcp-echo", "--connect", "10.200.0.1:9000", "--bytes", "64"]);
    // With the in-pod redirect on (the suite's second run), this app (a connect with a timeout,
    // then a blocking reader on another thread) is closed with FIN instead: a reset could reach
    // its reader as EAGAIN (see tests/msg_redirect.rs).
    let closed = tcp.stdout.contains("reset")
        || (sidecar_tests::env::msg_redirect_everywhere()
            && tcp.stdout.contains("closed before all bytes came back"));
    assert!(
        tcp.stdout.contains("\"received\\\":0") && closed,
        "the app's TCP connection is reset: {}",
        tcp.stdout
    );
    assert!(
        http.requests().is_empty(),
        "no request reached the plaintext server"
    );
    assert_eq!(value(&a, "sidecar_mtls_fallbacks_total"), 0.0);
    drop(echo);
}

/// The certificate `openssl s_client` was shown by the server at `addr` (from `netns`), as its
/// serial; the client presents `leaf`.
fn server_serial(netns: &str, addr: &str, dir: &Path, leaf: &Leaf, ca: &str) -> String {
    let (text, err) = openssl_s_client(netns, addr, dir, leaf, ca, &["-verify_return_error"], b"");
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no server certificate shown:\n{text}\n{err}"));
    let end = text[start..].find("-----END CERTIFICATE-----").unwrap() + start + 25;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    x509.stdin
        .take()
        .unwrap()
        .write_all(&text.as_bytes()[start..end])
        .unwrap();
    let out = x509.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_owned()
}

#[test]
fn a_leaf_rotated_under_a_live_connection_keeps_it_and_new_handshakes_show_the_new_leaf() {
    let ca = MeshCa::new("mesh root");
    let (m, echo) = MeshPair::start(&ca, (&spiffe_id("a", "a"), &spiffe_id("b", "b")), "", |b| {
        b.app_echo_server("0.0.0.0:9000", "echo")
    });
    let MeshPair {
        a,
        b,
        a_identity: mut a_id,
        b_identity: mut b_id,
        b_leaf: first_b,
        ..
    } = m;
    let dir = b.log_dir().join("client");
    std::fs::create_dir_all(&dir).unwrap();
    let client = ca.leaf(&spiffe_id("c", "c"));
    let shown = server_serial(
        b.remote_netns(),
        "10.200.0.2:9000",
        &dir,
        &client,
        &ca.pem(),
    );
    assert!(
        same_serial(&shown, &first_b.serial),
        "{shown} vs {}",
        first_b.serial
    );

    // A long-lived connection from A's app to B's echo server, through both sidecars.
    let script = "import socket,sys\n\
                  s=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n\
                  for line in sys.stdin:\n    s.sendall(line.encode()); print(s.recv(4096).decode().strip(), flush=True)\n";
    let mut app = a.app_spawn("python3", &["-c", script, LINK_IP_B, "9000"]);
    let mut to_app = app.stdin.take().unwrap();
    let mut from_app = BufReader::new(app.stdout.take().unwrap()).lines();
    let mut echo_line = |text: &str| {
        writeln!(to_app, "{text}").unwrap();
        from_app.next().expect("a line").expect("readable")
    };
    assert_eq!(echo_line("before"), "before");

    // Both leaves are re-issued; the kubelet swaps `..data`.
    let second_a = ca.leaf(&spiffe_id("a", "a"));
    let second_b = ca.leaf(&spiffe_id("b", "b"));
    a_id.write(&second_a, &ca.pem());
    b_id.write(&second_b, &ca.pem());
    wait_for_serial(&a, &second_a);
    wait_for_serial(&b, &second_b);

    assert_eq!(
        echo_line("after"),
        "after",
        "the connection survived the rotation"
    );
    let shown = server_serial(
        b.remote_netns(),
        "10.200.0.2:9000",
        &dir,
        &client,
        &ca.pem(),
    );
    assert!(
        same_serial(&shown, &second_b.serial),
        "a new handshake shows the new leaf: {shown} vs {}",
        second_b.serial
    );
    let _ = app.kill();
    let _ = app.wait();
    assert_eq!(
        value(&b, r#"sidecar_identity_reloads_total{result="applied"}"#),
        2.0,
        "the first load and the rotation"
    );
    drop(echo);
}

#[test]
fn a_ca_rotation_in_three_steps_fails_no_request() {
    let old = MeshCa::new("old root");
    let new = MeshCa::new("new root");
    let (m, (app, echo)) = MeshPair::start(
        &old,
        (&spiffe_id("a", "a"), &spiffe_id("b", "b")),
        "",
        |b| {
            (
                b.app_http_server("0.0.0.0:8080", "b"),
                b.app_echo_server("0.0.0.0:9000", "echo"),
            )
        },
    );
    let MeshPair {
        a,
        b,
        a_identity: mut a_id,
        b_identity: mut b_id,
        a_leaf,
        b_leaf,
    } = m;
    let target = format!("{LINK_IP_B}:8080");
    let echo_target = format!("{LINK_IP_B}:9000");
    let mut requests = 0;
    let mut traffic = |what: &str| {
        for _ in 0..3 {
            let reply = a.app_http(&target);
            assert_eq!(reply.status, 200, "{what}: {reply:?}");
            // Opaque: a new connection, so a new handshake, every time.
            let tcp = a.app_echo(&echo_target, 256);
            assert!(tcp.ok, "{what}: {tcp:?}");
            requests += 1;
        }
    };
    traffic("before");
    // 1. Both trust both roots.
    let both = format!("{}{}", old.pem(), new.pem());
    a_id.write(&a_leaf, &both);
    b_id.write(&b_leaf, &both);
    let roots = |pod: &Pod| -> u64 {
        let config: serde_json::Value = serde_json::from_str(&admin_get(pod, "/config")).unwrap();
        config["identity"]["roots"].as_u64().unwrap_or(0)
    };
    for pod in [&a, &b] {
        assert_eventually!(RELOAD, roots(pod) == 2, "{} trusts both roots", pod.name());
    }
    traffic("both roots trusted");
    // 2. Leaves re-issued by the new root.
    let (a_new, b_new) = (
        new.leaf(&spiffe_id("a", "a")),
        new.leaf(&spiffe_id("b", "b")),
    );
    a_id.write(&a_new, &both);
    b_id.write(&b_new, &both);
    wait_for_serial(&a, &a_new);
    wait_for_serial(&b, &b_new);
    traffic("new leaves");
    // 3. The old root removed.
    a_id.write(&a_new, &new.pem());
    b_id.write(&b_new, &new.pem());
    for pod in [&a, &b] {
        assert_eventually!(
            RELOAD,
            roots(pod) == 1,
            "{} trusts the new root only",
            pod.name()
        );
    }
    traffic("old root removed");
    assert_eq!(requests, 12);
    assert_eq!(
        value(
            &b,
            r#"sidecar_mtls_handshakes_total{direction="inbound",result="ok"}"#
        ),
        value(
            &a,
            r#"sidecar_mtls_handshakes_total{direction="outbound",result="ok"}"#
        ),
        "every handshake A made, B accepted"
    );
    assert_eq!(app.requests().len(), 12);
    drop(echo);
}

#[test]
fn the_apps_own_https_passes_through_untouched() {
    let ca = MeshCa::new("mesh root");
    let mut a = Pod::new();
    let mut b = Pod::new();
    link(&a, &b);
    // B's app serves HTTPS itself (openssl s_server with a certificate of its own).
    let app_cert = MeshCa::new("the app's own CA").leaf("spiffe://app.example/own");
    let cert_file = b.log_dir().join("app.crt");
    let key_file = b.log_dir().join("app.key");
    std::fs::write(&cert_file, &app_cert.cert).unwrap();
    std::fs::write(&key_file, &app_cert.key).unwrap();
    let (cert_arg, key_arg) = (
        cert_file.display().to_string(),
        key_file.display().to_string(),
    );
    let _https = NetnsServer::start(
        b.pod_netns(),
        "10.200.0.2:8443",
        "openssl",
        &[
            "s_server", "-accept", "8443", "-cert", &cert_arg, "-key", &key_arg, "-www", "-quiet",
        ],
    );
    let a_id = identity(&a, &ca.leaf(&spiffe_id("a", "a")), &ca.pem());
    let b_id = identity(&b, &ca.leaf(&spiffe_id("b", "b")), &ca.pem());
    a.init_with_netns(&[]);
    b.init_with_netns(&[]);
    start(&mut a, &a_id, None);
    start(&mut b, &b_id, None);

    // A client without a sidecar: its TLS reaches the app as it was sent.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            b.remote_netns(),
            "curl",
            "-sk",
            "--max-time",
            "10",
        ])
        .arg("https://10.200.0.2:8443/")
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.contains("s_server"),
        "the app's own HTTPS answered: {page}"
    );
    assert_eq!(
        value(
            &b,
            r#"sidecar_mtls_connections_total{direction="inbound",mode="passthrough"}"#
        ),
        1.0
    );
    // From A's app (meshed): its TLS travels inside mesh TLS and still reaches the app.
    let out = a.app_command(
        "curl",
        &[
            "-sk",
            "--max-time",
            "10",
            &format!("https://{LINK_IP_B}:8443/"),
        ],
    );
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains("s_server"), "through both sidecars: {page}");
    assert_eq!(
        value(
            &b,
            r#"sidecar_mtls_connections_total{direction="inbound",mode="mtls"}"#
        ),
        1.0
    );
}

/// A strict port without an identity: `/ready` says why (the issuer has not written the files
/// yet); once valid files appear they are loaded without a restart and the pod becomes ready.
#[test]
fn a_strict_port_is_not_ready_until_an_identity_arrives() {
    let ca = MeshCa::new("mesh root");
    let mut b = Pod::new();
    let _app = b.app_http_server("0.0.0.0:8080", "b");
    b.init_with_netns(&[]);
    let dir = b.log_dir().join("identity");
    let conf = b.log_dir().join("sidecar.toml");
    std::fs::write(&conf, "[inbound]\nmtls = \"strict\"\n").unwrap();
    let (dir_arg, conf_arg) = (dir.display().to_string(), conf.display().to_string());
    b.start_proxy_with_inbound(&["--identity-dir", &dir_arg, "--config", &conf_arg]);
    let ready = |pod: &Pod| {
        sidecar_tests::netns::in_netns(pod.pod_netns(), || {
            sidecar_tests::client::http_get(
                std::net::SocketAddr::from(([127, 0, 0, 1], sidecar_tests::metrics::ADMIN_PORT)),
                "/ready",
                None,
            )
        })
        .unwrap()
        .unwrap()
    };
    assert_eventually!(
        RELOAD,
        {
            let r = ready(&b);
            r.status == 503 && r.body.contains("identity: no workload identity")
        },
        "/ready names the missing identity: {:?}",
        ready(&b)
    );
    let leaf = ca.leaf(&spiffe_id("b", "b"));
    let _id = IdentityDir::create(&dir, &leaf, &ca.pem());
    assert_eventually!(
        RELOAD,
        ready(&b).status == 200,
        "ready once the identity is in force: {:?}",
        ready(&b)
    );
    wait_for_serial(&b, &leaf);
}

/// `server_identities` pins who the server must be: another workload of the same mesh is refused.
#[test]
fn a_pinned_server_identity_refuses_any_other_workload() {
    let ca = MeshCa::new("mesh root");
    let mut a = Pod::new();
    let mut b = Pod::new();
    link(&a, &b);
    let app = b.app_http_server("0.0.0.0:8080", "b");
    let a_id = identity(&a, &ca.leaf(&spiffe_id("a", "a")), &ca.pem());
    let b_id = identity(&b, &ca.leaf(&spiffe_id("b", "impostor")), &ca.pem());
    a.init_with_netns(&[]);
    b.init_with_netns(&[]);
    let pin = format!(
        "[[destination]]\nmatch = \"{LINK_IP_B}:8080\"\nserver_identities = [\"{}\"]\n",
        spiffe_id("b", "b")
    );
    start(&mut a, &a_id, Some(&pin));
    start(&mut b, &b_id, None);
    let reply = a.app_http(&format!("{LINK_IP_B}:8080"));
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(
        reply.header("x-sidecar-error"),
        Some("upstream-mtls-failed")
    );
    assert!(app.requests().is_empty());
    // The attempt and its retries (a failed connect is retried; nothing was sent), plus the dial
    // started at accept when the request was not there yet: every one refused, none accepted.
    let mismatches = value(
        &a,
        r#"sidecar_mtls_handshakes_total{direction="outbound",result="identity_mismatch"}"#,
    );
    assert!((3.0..=4.0).contains(&mismatches), "{mismatches}");
    assert_eq!(
        value(
            &a,
            r#"sidecar_mtls_handshakes_total{direction="outbound",result="ok"}"#
        ),
        0.0
    );
}
