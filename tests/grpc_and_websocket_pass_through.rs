//! Protocols beyond request/response HTTP/1 pass through the intercepting proxy intact: a unary
//! gRPC call over h2c (prior knowledge) arrives with `te: trailers` and comes back with its
//! `grpc-status` trailer; a WebSocket (HTTP/1.1 upgrade) completes its handshake and echoes a
//! frame. The app is the probe in the pod; the servers are in the remote namespace.
use sidecar_tests::Pod;

#[test]
fn grpc_unary_call_keeps_its_trailers() {
    let mut pod = Pod::new();
    let grpc = pod.grpc_upstream("10.200.0.1:50051", "greeter");
    pod.init(&[]);
    pod.start_proxy(&[]);

    let reply = pod.app_grpc("10.200.0.1:50051", "hello over h2c");

    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.message, "hello over h2c",
        "the message came back: {reply:?}"
    );
    assert_eq!(
        reply.grpc_status.as_deref(),
        Some("0"),
        "grpc-status arrived as a trailer: {reply:?}"
    );
    assert_eq!(reply.grpc_message.as_deref(), Some("ok"));
    assert!(
        reply
            .headers
            .iter()
            .any(|(n, v)| n == "x-upstream" && v == "greeter"),
        "the upstream's headers came through: {reply:?}"
    );

    let seen = grpc.only_request();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/sidecar.test.Echo/Unary");
    assert_eq!(
        seen.header("te"),
        Some("trailers"),
        "gRPC needs te: trailers end to end"
    );
    assert_eq!(seen.header("content-type"), Some("application/grpc"));
    assert_eq!(
        seen.header("x-forwarded-by"),
        Some("sidecar"),
        "it went through the proxy: {seen:#?}"
    );
    assert!(seen.header("traceparent").is_some(), "a trace was started");
}

#[test]
fn websocket_upgrade_and_frames_pass_through() {
    let mut pod = Pod::new();
    let ws = pod.websocket_upstream("10.200.0.1:8081", "ws");
    pod.init(&[]);
    pod.start_proxy(&[]);

    let reply = pod.app_websocket("10.200.0.1:8081", "hello over a websocket");

    assert_eq!(reply.status, 101, "{reply:?}");
    assert!(
        reply.accept_ok,
        "Sec-WebSocket-Accept matches the key: {reply:?}"
    );
    assert_eq!(reply.echoed, "hello over a websocket");
    let seen = ws.only_request();
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(
        seen.header("x-forwarded-by"),
        Some("sidecar"),
        "it went through the proxy: {seen:#?}"
    );
}
