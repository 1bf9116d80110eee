//! Timeouts through the real interception path: an upstream that never answers gets the app a
//! 504 (`upstream-timeout`) at the request timeout; one that never completes the TCP handshake,
//! a 504 (`upstream-connect-timeout`) at the connect timeout; an opaque TCP connection that
//! carries nothing for the idle timeout is closed. Times are asserted as "not before the
//! configured time" and "well before a generous bound", never as exact durations.
use std::time::{Duration, Instant};

use sidecar_tests::Pod;

/// Upper bound for "it answered at the configured time, not at some other timeout": far above the
/// configured times, far below the defaults (30 s request, 1 h idle) they replace.
const BOUND: Duration = Duration::from_secs(10);

/// The app's request to 10.200.0.1:8080 gets a 504 with `code`, not before `configured` and well
/// before [`BOUND`].
fn app_gets_504_after(pod: &Pod, code: &str, configured: Duration) {
    let start = Instant::now();
    let reply = pod.app_http("10.200.0.1:8080");
    let took = start.elapsed();
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(reply.header("x-sidecar-error"), Some(code), "{reply:?}");
    assert!(
        took >= configured,
        "answered after {took:?}, before the {configured:?} timeout"
    );
    assert!(
        took < BOUND,
        "answered after {took:?}: not the configured {configured:?}"
    );
}

#[test]
fn upstream_that_never_answers_gets_504_at_the_request_timeout() {
    let mut pod = Pod::new();
    let hanging = pod.hanging_upstream("10.200.0.1:8080", "hanging");
    pod.init(&[]);
    pod.start_proxy(&["--request-timeout", "500ms"]);

    app_gets_504_after(&pod, "upstream-timeout", Duration::from_millis(500));
    assert_eq!(
        hanging.requests().len(),
        1,
        "the request reached the upstream once (timeouts are not retried)"
    );
}

#[test]
fn upstream_that_never_accepts_gets_504_at_the_connect_timeout() {
    let mut pod = Pod::new();
    let _blackhole = pod.blackhole_upstream("10.200.0.1:8080", "blackhole");
    pod.init(&[]);
    pod.start_proxy(&["--connect-timeout", "300ms", "--max-retries", "0"]);

    app_gets_504_after(&pod, "upstream-connect-timeout", Duration::from_millis(300));
}

#[test]
fn idle_opaque_tcp_connection_is_closed_after_the_idle_timeout() {
    let mut pod = Pod::new();
    let _echo = pod.echo_upstream("10.200.0.1:7000", "echo");
    pod.init(&[]);
    pod.start_proxy(&["--idle-timeout", "500ms"]);

    let reply = pod.app_tcp_idle("10.200.0.1:7000", BOUND);

    assert!(
        reply.echoed,
        "the relay worked before going idle: {reply:?}"
    );
    assert_eq!(
        reply.ended, "eof",
        "the proxy closed the idle connection: {reply:?}"
    );
    // The proxy's idle clock started when it relayed the echo, a moment before the app read it.
    assert!(
        reply.after_ms >= 400,
        "closed {} ms after the last byte, before the 500ms idle timeout",
        reply.after_ms
    );
}
