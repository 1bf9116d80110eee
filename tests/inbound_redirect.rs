//! Inbound capture: a client in another network namespace connects to the app's port on the pod's
//! address; sk_lookup hands the SYN to the proxy's inbound listener (15006), which reads the
//! original destination with getsockname() and connects to the app from 127.0.0.6 (IPv6: from the
//! pod's address), adding `X-Forwarded-By: sidecar` to HTTP. Opaque TCP passes through untouched.
//! The app's own calls to itself (loopback or its pod address) are not captured.
use std::time::Duration;

use sidecar_tests::{Pod, Upstream, POD_IP4, POD_IP6};

/// Istio's inbound passthrough address: the source of the proxy's connections to the app.
const PASSTHROUGH: &str = "127.0.0.6";

fn assert_via_proxy(app: &Upstream, expected_peer_ip: &str) {
    let seen = app.only_request();
    assert_eq!(
        seen.header_all("x-forwarded-by"),
        ["sidecar"],
        "the request must reach the app through the proxy: {seen:#?}"
    );
    assert_eq!(
        seen.peer.ip().to_string(),
        expected_peer_ip,
        "the app sees the proxy's connection: {seen:#?}"
    );
}

#[test]
fn client_in_another_netns_reaches_the_app_through_the_proxy() {
    let mut pod = Pod::new();
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&[]);
    pod.start_proxy_with_inbound(&[]);
    let before = pod.counters();

    let reply = pod.remote_http("10.200.0.2:8080");

    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.body, "hello from app\n",
        "the app's answer reached the client"
    );
    assert_eq!(
        reply.peer, "10.200.0.2:8080",
        "the client talks to the pod's address, as it asked"
    );
    assert_via_proxy(&app, PASSTHROUGH);
    let seen = app.only_request();
    assert_eq!(
        seen.header("host"),
        Some("10.200.0.2:8080"),
        "the proxy is transparent: Host is what the client sent"
    );
    let moved = pod.counters().since(&before);
    assert_eq!(
        moved.get("inbound_redirected"),
        1,
        "one SYN steered to the proxy: {:?}",
        moved.nonzero()
    );
}

#[test]
fn ipv6_client_reaches_the_app_through_the_proxy_from_the_pod_address() {
    let mut pod = Pod::new();
    // [::] is dual-stack: the app listens the way most servers do.
    let app = pod.app_http_server("[::]:8080", "app6");
    pod.init_with_netns(&[]);
    pod.start_proxy_with_inbound(&[]);

    let reply = pod.remote_http("[fd00:200::2]:8080");

    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hello from app6\n");
    assert_via_proxy(&app, POD_IP6);
}

#[test]
fn app_own_loopback_and_pod_address_calls_are_not_captured() {
    let mut pod = Pod::new();
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&[]);
    pod.start_proxy_with_inbound(&[]);

    // Control first: capture is in place for a client from outside.
    let from_remote = pod.remote_http("10.200.0.2:8080");
    // The app (in the pod's cgroup and netns) calls its own server.
    let via_loopback = pod.app_http("127.0.0.1:8080");
    let via_pod_ip = pod.app_http("10.200.0.2:8080");

    for reply in [&from_remote, &via_loopback, &via_pod_ip] {
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, "hello from app\n");
    }
    let seen = app.requests();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    assert_eq!(
        seen[0].header("x-forwarded-by"),
        Some("sidecar"),
        "control: the remote client's request went through the proxy: {:#?}",
        seen[0]
    );
    for (request, reply, what) in [
        (&seen[1], &via_loopback, "loopback"),
        (&seen[2], &via_pod_ip, "the pod's own address"),
    ] {
        assert_eq!(
            request.header("x-forwarded-by"),
            None,
            "the app's call via {what} must not go through the proxy: {request:#?}"
        );
        assert_eq!(
            request.peer.to_string(),
            reply.local,
            "the server saw the app's own socket (via {what})"
        );
    }
    assert_eq!(seen[1].peer.ip().to_string(), "127.0.0.1");
    assert_eq!(seen[2].peer.ip().to_string(), POD_IP4);
}

#[test]
fn inbound_opaque_tcp_passes_through_byte_exact() {
    let mut pod = Pod::new();
    let echo = pod.app_echo_server("0.0.0.0:7000", "app-echo");
    pod.init_with_netns(&[]);
    pod.start_proxy_with_inbound(&[]);

    let reply = pod.remote_echo("10.200.0.2:7000", 256 * 1024);

    assert!(
        reply.ok,
        "256 KiB of binary data must come back unchanged: {reply:?}"
    );
    let peer = echo.only_connection();
    assert_eq!(
        peer.ip().to_string(),
        PASSTHROUGH,
        "the echo server saw the proxy's connection, not the client's {}",
        reply.local
    );
}

#[test]
fn inbound_server_speaks_first_greeting_reaches_the_client() {
    let mut pod = Pod::new();
    let greeter = pod.app_greeting_server("0.0.0.0:2525", "app-greeter");
    pod.init_with_netns(&[]);
    // A proxy that waits for client bytes to detect the protocol would hold the greeting for 60 s;
    // the client gives up after 5 s. Not a speed assertion: a proxy that relays server bytes
    // while detecting passes with a wide margin.
    pod.start_proxy_with_inbound(&["--detect-timeout", "60s"]);

    let reply = pod.remote_greeting("10.200.0.2:2525", Duration::from_secs(5));

    assert_eq!(reply.line, "220 greeting", "{reply:?}");
    assert_eq!(greeter.only_connection().ip().to_string(), PASSTHROUGH);
}
