//! Mesh mTLS between two pods, each with its own sidecar, joined by a veth (`mesh0`): app A calls
//! app B over plain HTTP; the sidecars speak mutual TLS 1.3 with SPIFFE identities minted by a
//! test CA (rcgen) into kubelet-style identity directories. What crosses the wire is captured
//! with tcpdump.
use std::time::Duration;

use sidecar_tests::mesh::{
    openssl_s_client, spiffe_id, tls_records, Capture, Leaf, MeshCa, MeshPair, LINK_IP_B, MESH_ALPN,
};
use sidecar_tests::metrics::value;
use sidecar_tests::{assert_eventually, Pod};

/// The pair of the tests: A is `ns/a/sa/a`, B is `ns/b/sa/b` with `b_config`.
fn mesh<T>(ca: &MeshCa, b_config: &str, b_apps: impl FnOnce(&Pod) -> T) -> (MeshPair, T) {
    MeshPair::start(
        ca,
        (&spiffe_id("a", "a"), &spiffe_id("b", "b")),
        b_config,
        b_apps,
    )
}

#[test]
fn a_calls_b_over_mutual_tls_and_b_sees_who_called() {
    let ca = MeshCa::new("mesh root");
    let (m, app) = mesh(&ca, "", |b| b.app_http_server("0.0.0.0:8080", "b"));
    let capture = Capture::start(m.a.pod_netns(), "mesh0", &m.a.log_dir().join("mesh0.pcap"));
    let reply = m.a.app_request(
        &format!("{LINK_IP_B}:8080"),
        "GET",
        &["x-forwarded-client-cert: By=forged;URI=spiffe://mesh.test/ns/evil/sa/evil"],
        "",
    );
    let flows = capture.stop();

    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hello from b\n");
    let seen = app.only_request();
    assert_eq!(
        seen.header_all("x-forwarded-client-cert"),
        [format!(
            "By={};URI={}",
            spiffe_id("b", "b"),
            spiffe_id("a", "a")
        )],
        "B's app learns A's verified identity, and the app's own forged header is gone: {seen:#?}"
    );
    // On the wire: TLS records only, both ways, and no trace of the HTTP exchange.
    let to_b: Vec<_> = flows.iter().filter(|f| f.dst_port == 8080).collect();
    let from_b: Vec<_> = flows.iter().filter(|f| f.src_port == 8080).collect();
    assert_eq!(to_b.len(), 1, "one connection A -> B: {flows:?}");
    assert_eq!(from_b.len(), 1, "{flows:?}");
    for flow in to_b.iter().chain(&from_b) {
        let records = tls_records(&flow.bytes).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            records.iter().any(|(kind, _)| *kind == 23),
            "application data travelled as TLS records: {records:?}"
        );
        let text = String::from_utf8_lossy(&flow.bytes);
        for plain in ["HTTP/1.1", "hello from b", "GET /", "x-forwarded"] {
            assert!(!text.contains(plain), "{plain:?} crossed the wire in clear");
        }
    }
    assert_eq!(
        to_b[0].bytes[0], 22,
        "the client spoke first: a ClientHello"
    );
    assert!(
        to_b[0]
            .bytes
            .windows(MESH_ALPN.len())
            .any(|w| w == MESH_ALPN.as_bytes()),
        "the ClientHello offers the mesh ALPN"
    );
    assert_eq!(
        value(
            &m.a,
            r#"sidecar_mtls_handshakes_total{direction="outbound",result="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &m.b,
            r#"sidecar_mtls_handshakes_total{direction="inbound",result="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &m.b,
            r#"sidecar_mtls_connections_total{direction="inbound",mode="mtls"}"#
        ),
        1.0
    );
    assert!(
        m.b.proxy_log()
            .contains(&format!("peer_id={}", spiffe_id("a", "a"))),
        "B's access log names the caller"
    );
    let expiry = value(&m.a, "sidecar_identity_expiry_timestamp_seconds");
    assert!(
        expiry > 1.7e9,
        "the certificate's expiry is exported: {expiry}"
    );
}

#[test]
fn strict_port_refuses_plaintext_but_serves_probe_paths() {
    let ca = MeshCa::new("mesh root");
    let config = "[inbound]\nmtls = \"strict\"\nprobe_paths = [\"/healthz\"]\n";
    let (m, (app, echo)) = mesh(&ca, config, |b| {
        (
            b.app_http_server("0.0.0.0:8080", "b"),
            b.app_echo_server("0.0.0.0:9000", "echo"),
        )
    });

    // A client without a sidecar (B's remote netns) over HTTP: 403, and why.
    let refused = m.b.try_remote_http("10.200.0.2:8080").expect("an answer");
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(
        refused.header("x-sidecar-error"),
        Some("inbound-mtls-required")
    );
    // A kubelet-style probe path still answers.
    let probe =
        m.b.remote_request("10.200.0.2:8080", "GET", "/healthz", &[], "");
    assert_eq!(probe.status, 200, "{probe:?}");
    assert_eq!(app.requests().len(), 1, "only the probe reached the app");
    // Raw TCP from it: reset before anything reaches the app.
    let tcp = m.b.remote_echo("10.200.0.2:9000", 64);
    assert!(!tcp.ok && tcp.received == 0, "{tcp:?}");
    assert!(
        echo.connections().is_empty(),
        "a strict port never dials the app for a plaintext client: {:?}",
        echo.connections()
    );
    // A with its sidecar: mesh TLS, served.
    let meshed = m.a.app_http(&format!("{LINK_IP_B}:8080"));
    assert_eq!(meshed.status, 200, "{meshed:?}");
    assert_eq!(
        value(
            &m.b,
            r#"sidecar_proxy_errors_total{direction="inbound",reason="inbound-mtls-required"}"#
        ),
        2.0,
        "the 403 and the reset are counted"
    );
}

#[test]
fn permissive_port_serves_plaintext_and_counts_it() {
    let ca = MeshCa::new("mesh root");
    let (m, app) = mesh(&ca, "", |b| b.app_http_server("0.0.0.0:8080", "b"));
    let reply = m.b.remote_request(
        "10.200.0.2:8080",
        "GET",
        "/",
        &["x-forwarded-client-cert: URI=spiffe://mesh.test/ns/forged/sa/x"],
        "",
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = app.only_request();
    assert!(
        seen.header("x-forwarded-client-cert").is_none(),
        "a plaintext client cannot forge its identity: {seen:#?}"
    );
    assert_eq!(
        value(
            &m.b,
            r#"sidecar_mtls_connections_total{direction="inbound",mode="plaintext"}"#
        ),
        1.0
    );
}

/// `openssl s_client` from B's remote netns to its app port, offering the mesh ALPN with `leaf`,
/// trusting `ca`: everything it printed.
fn openssl_client(b: &Pod, dir: &std::path::Path, leaf: &Leaf, ca: &str) -> String {
    let (out, err) = openssl_s_client(b.remote_netns(), "10.200.0.2:8080", dir, leaf, ca, &[], b"");
    format!("{out}{err}")
}

#[test]
fn client_certificates_from_elsewhere_are_refused_and_counted() {
    let ca = MeshCa::new("mesh root");
    let (m, _app) = mesh(&ca, "", |b| b.app_http_server("0.0.0.0:8080", "b"));
    let dir = m.b.log_dir().join("client");
    std::fs::create_dir_all(&dir).unwrap();
    let now = std::time::SystemTime::now();
    let other = MeshCa::new("another root");
    let cases = [
        ("unknown_ca", other.leaf(&spiffe_id("a", "a"))),
        (
            "expired",
            ca.leaf_valid(
                &spiffe_id("a", "a"),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            ),
        ),
        (
            "wrong_trust_domain",
            ca.leaf("spiffe://elsewhere.test/ns/a/sa/a"),
        ),
    ];
    for (result, leaf) in &cases {
        let out = openssl_client(&m.b, &dir, leaf, &ca.pem());
        let series =
            format!(r#"sidecar_mtls_handshakes_total{{direction="inbound",result="{result}"}}"#);
        assert_eventually!(
            Duration::from_secs(5),
            value(&m.b, &series) == 1.0,
            "a {result} client certificate is refused and counted as such; openssl said:\n{out}"
        );
    }
    // And a good one is accepted (the control).
    let good = ca.leaf(&spiffe_id("c", "c"));
    let out = openssl_client(&m.b, &dir, &good, &ca.pem());
    assert!(
        out.contains(&format!("ALPN protocol: {MESH_ALPN}")),
        "{out}"
    );
    assert_eventually!(
        Duration::from_secs(5),
        value(
            &m.b,
            r#"sidecar_mtls_handshakes_total{direction="inbound",result="ok"}"#
        ) == 1.0,
        "the control handshake succeeds"
    );
}

/// A hostile client on a strict port: a TLS record header promising 16 KiB, a few bytes, then
/// nothing. The proxy reads at most one record for at most `--detect-timeout`, then resets it as
/// the plaintext it is; nothing reaches the app.
#[test]
fn a_client_stalling_in_its_client_hello_is_reset_on_a_strict_port() {
    use std::io::{Read, Write};
    let ca = MeshCa::new("mesh root");
    let config = "[inbound]\nmtls = \"strict\"\n";
    let (m, echo) = mesh(&ca, config, |b| b.app_echo_server("0.0.0.0:9000", "echo"));
    let outcome = sidecar_tests::netns::in_netns(m.b.remote_netns(), || {
        let mut s = std::net::TcpStream::connect("10.200.0.2:9000").map_err(|e| e.to_string())?;
        s.write_all(&[22, 3, 1, 0x40, 0, 1, 0, 0x3f, 3, 3])
            .map_err(|e| e.to_string())?;
        // Far longer than the detect timeout (1 s): the proxy must end it, not this timeout.
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) => Ok(format!("closed after {n} bytes")),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok("reset".to_owned()),
            Err(e) => Err(format!("not ended by the proxy: {e}")),
        }
    })
    .expect("enter the remote netns");
    assert_eq!(outcome, Ok("reset".to_owned()));
    assert!(
        echo.connections().is_empty(),
        "the app never saw a connection: {:?}",
        echo.connections()
    );
    assert_eq!(
        value(
            &m.b,
            r#"sidecar_proxy_errors_total{direction="inbound",reason="inbound-mtls-required"}"#
        ),
        1.0
    );
}

/// gRPC (HTTP/2 with trailers) and a WebSocket upgrade travel inside mesh TLS as they do in the
/// clear: detection runs again on the decrypted stream at B.
#[test]
fn grpc_and_websockets_work_inside_mesh_tls() {
    let ca = MeshCa::new("mesh root");
    let (m, (grpc, ws)) = mesh(&ca, "[inbound]\nmtls = \"strict\"\n", |b| {
        (
            sidecar_tests::Upstream::grpc(b.pod_netns(), "0.0.0.0:50051", "grpc-b"),
            sidecar_tests::Upstream::websocket(b.pod_netns(), "0.0.0.0:8081", "ws-b"),
        )
    });
    let reply = m.a.app_grpc(&format!("{LINK_IP_B}:50051"), "over mesh tls");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{reply:?}");
    assert!(reply.message.contains("over mesh tls"), "{reply:?}");
    let seen = grpc.only_request();
    assert_eq!(
        seen.header("x-forwarded-client-cert"),
        Some(format!("By={};URI={}", spiffe_id("b", "b"), spiffe_id("a", "a")).as_str()),
        "{seen:#?}"
    );
    let reply =
        m.a.app_websocket(&format!("{LINK_IP_B}:8081"), "hello inside mTLS");
    assert_eq!(reply.status, 101, "{reply:?}");
    assert!(reply.accept_ok);
    assert_eq!(reply.echoed, "hello inside mTLS");
    assert_eq!(ws.requests().len(), 1);
    assert_eq!(
        value(
            &m.b,
            r#"sidecar_mtls_connections_total{direction="inbound",mode="mtls"}"#
        ),
        2.0
    );
}
