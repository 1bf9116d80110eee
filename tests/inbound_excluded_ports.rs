//! Inbound ports that are not captured reach the app directly: ports excluded at init (kubelet
//! probe ports), the proxy's own admin port, and, with `--include-inbound-ports`, every port not
//! in the list.
//!
//! The tests without a proxy use fail-closed (the default) as the detector: a captured port is
//! refused when no proxy listens, so a port that still reaches the app was never captured. That
//! is the kernel's decision alone, whatever the proxy does.
use sidecar_tests::{HttpReply, Pod, Upstream, REMOTE_IP4};

/// The request reached the app straight from the client in the remote netns.
fn assert_direct(app: &Upstream, reply: &HttpReply) {
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, format!("hello from {}\n", app.name));
    let seen = app.only_request();
    assert_eq!(
        seen.header("x-forwarded-by"),
        None,
        "{} ({}) must not be captured: {seen:#?}",
        app.name,
        app.addr
    );
    assert_eq!(
        seen.peer.to_string(),
        reply.local,
        "{} saw the client's own socket",
        app.name
    );
}

fn assert_refused(result: Result<HttpReply, String>, what: &str) {
    match result {
        Ok(reply) => panic!("{what}: expected the connection to be refused, got {reply:?}"),
        Err(e) => assert!(
            e.to_lowercase().contains("refused"),
            "{what}: expected 'connection refused', got: {e}"
        ),
    }
}

#[test]
fn excluded_port_reaches_the_app_directly_while_a_captured_port_goes_through_the_proxy() {
    let mut pod = Pod::new();
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    let probes = pod.app_http_server("0.0.0.0:9000", "kubelet-probes");
    pod.init_with_netns(&["--exclude-inbound-ports", "9000"]);
    pod.start_proxy_with_inbound(&[]);

    let captured = pod.remote_http("10.200.0.2:8080");
    let excluded = pod.remote_http("10.200.0.2:9000");

    assert_eq!(captured.status, 200, "{captured:?}");
    let seen = app.only_request();
    assert_eq!(seen.header_all("x-forwarded-by"), ["sidecar"], "{seen:#?}");
    assert_eq!(seen.peer.ip().to_string(), "127.0.0.6", "{seen:#?}");
    assert_direct(&probes, &excluded);
    assert!(excluded.local.starts_with(REMOTE_IP4), "{excluded:?}");
}

#[test]
fn excluded_and_admin_ports_are_never_captured_even_with_no_proxy_in_fail_closed_mode() {
    let mut pod = Pod::new();
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    let probes = pod.app_http_server("0.0.0.0:9000", "kubelet-probes");
    // A stand-in for the proxy's admin endpoint, on an admin port chosen at init.
    let admin = pod.app_http_server("0.0.0.0:9090", "admin");
    pod.init_with_netns(&["--exclude-inbound-ports", "9000", "--admin-port", "9090"]);
    let before = pod.counters();

    let captured = pod.try_remote_http("10.200.0.2:8080");
    let excluded = pod.remote_http("10.200.0.2:9000");
    let admin_reply = pod.remote_http("10.200.0.2:9090");

    assert_refused(
        captured,
        "control: captured port 8080 with no proxy, fail-closed",
    );
    assert!(app.requests().is_empty(), "{:#?}", app.requests());
    assert_direct(&probes, &excluded);
    assert_direct(&admin, &admin_reply);
    let moved = pod.counters().since(&before);
    assert_eq!(
        (moved.get("inbound_skip_port"), moved.get("inbound_refused")),
        (2, 1),
        "kernel counters (inbound_skip_port, inbound_refused): {:?}",
        moved.nonzero()
    );
}

#[test]
fn include_list_limits_capture_to_the_listed_ports() {
    let mut pod = Pod::new();
    let listed = pod.app_http_server("0.0.0.0:8080", "listed");
    let unlisted = pod.app_http_server("0.0.0.0:8081", "unlisted");
    pod.init_with_netns(&["--include-inbound-ports", "8080"]);

    // No proxy, fail-closed: only the listed port is captured, hence refused.
    let to_listed = pod.try_remote_http("10.200.0.2:8080");
    let to_unlisted = pod.remote_http("10.200.0.2:8081");

    assert_refused(to_listed, "listed port 8080 with no proxy, fail-closed");
    assert!(listed.requests().is_empty(), "{:#?}", listed.requests());
    assert_direct(&unlisted, &to_unlisted);
}
