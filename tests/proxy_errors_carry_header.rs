//! Every answer the proxy makes itself says who failed and why: `x-sidecar-error` (refused,
//! reset, timed out, connect timed out, breaker open), the request's `x-request-id`, and a short
//! text body, so a 5xx seen by the app is never opaque. An upstream's own 5xx is relayed as it
//! is, without the header.
use sidecar_tests::{HttpReply, Pod};

fn assert_explained(reply: &HttpReply, status: u16, code: &str, request_id: &str) {
    assert_eq!(reply.status, status, "{code}: {reply:?}");
    assert_eq!(reply.header("x-sidecar-error"), Some(code), "{reply:?}");
    assert_eq!(
        reply.header("x-request-id"),
        Some(request_id),
        "{code}: the app's request id is echoed: {reply:?}"
    );
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8"),
        "{reply:?}"
    );
    assert!(reply.body.starts_with("sidecar: "), "{code}: {reply:?}");
}

#[test]
fn every_proxy_made_error_names_its_cause() {
    let mut pod = Pod::new();
    let _refusing = pod.refusing_upstream("10.200.0.1:9001", "refusing");
    let _resetting = pod.resetting_upstream("10.200.0.1:9002", "resetting");
    let _hanging = pod.hanging_upstream("10.200.0.1:9003", "hanging");
    let _blackhole = pod.blackhole_upstream("10.200.0.3:9004", "blackhole");
    let _failing = pod.status_upstream("10.200.0.4:9005", "failing", 500);
    pod.init(&[]);
    // No retries: each answer is about one attempt (retries change how long, not what).
    pod.start_proxy(&[
        "--request-timeout",
        "500ms",
        "--connect-timeout",
        "300ms",
        "--max-retries",
        "0",
        "--breaker-consecutive-failures",
        "2",
        "--breaker-open-time",
        "60s",
    ]);

    let cases = [
        ("10.200.0.1:9001", 502, "upstream-connect-refused"),
        ("10.200.0.1:9002", 502, "upstream-reset"),
        ("10.200.0.1:9003", 504, "upstream-timeout"),
        ("10.200.0.3:9004", 504, "upstream-connect-timeout"),
    ];
    for (i, (addr, status, code)) in cases.into_iter().enumerate() {
        let id = format!("case-{i}");
        let reply = pod.app_request(addr, "GET", &[&format!("x-request-id: {id}")], "");
        assert_explained(&reply, status, code, &id);
    }

    // The upstream's own 500s are relayed untouched...
    for _ in 0..2 {
        let reply = pod.app_http("10.200.0.4:9005");
        assert_eq!(reply.status, 500, "{reply:?}");
        assert_eq!(reply.header("x-sidecar-error"), None, "{reply:?}");
    }
    // ...until the breaker opens; then the 503 is the proxy's, and says so.
    let reply = pod.app_request("10.200.0.4:9005", "GET", &["x-request-id: open"], "");
    assert_explained(&reply, 503, "upstream-breaker-open", "open");

    // Without an id from the app, the proxy's answer carries the one it generated.
    let reply = pod.app_http("10.200.0.1:9001");
    assert_eq!(
        reply.header("x-sidecar-error"),
        Some("upstream-connect-refused")
    );
    let generated = reply.header("x-request-id").unwrap_or_default();
    assert_eq!(generated.len(), 36, "a generated id: {reply:?}");

    let log = pod.proxy_log();
    assert!(
        log.contains("upstream-connect-refused") && log.contains("upstream-timeout"),
        "failures are logged with their code:\n{log}"
    );
}
