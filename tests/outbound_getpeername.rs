//! After a redirected connect(), the app's getpeername() shows the destination it asked for, not
//! the proxy's 127.0.0.1:15001 (apps log it, and some check it). Each case also checks that the
//! request really went through the proxy, or the assertion on getpeername would prove nothing.
use sidecar_tests::{HttpReply, Pod, Upstream};

fn assert_via_proxy(upstream: &Upstream) {
    let seen = upstream.only_request();
    assert_eq!(
        seen.header_all("x-forwarded-by"),
        ["sidecar"],
        "the request must go through the proxy for this test to mean anything: {seen:#?}"
    );
}

fn assert_peer(reply: &HttpReply, expected: &str) {
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.peer, expected,
        "getpeername() right after connect must show the original destination (local end: {})",
        reply.local
    );
}

#[test]
fn ipv4_getpeername_shows_the_original_destination() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    pod.init(&[]);
    pod.start_proxy(&[]);

    let reply = pod.app_http("10.200.0.1:8080");

    assert_peer(&reply, "10.200.0.1:8080");
    assert_via_proxy(&alpha);
}

#[test]
fn ipv6_getpeername_shows_the_original_destination() {
    let mut pod = Pod::new();
    let alpha6 = pod.http_upstream("[fd00:200::1]:8080", "alpha6");
    pod.init(&[]);
    pod.start_proxy(&[]);
    pod.wait_proxy_listening_v6();

    let reply = pod.app_http("[fd00:200::1]:8080");

    assert_peer(&reply, "[fd00:200::1]:8080");
    assert_via_proxy(&alpha6);
}

#[test]
fn ipv4_mapped_getpeername_shows_the_original_destination() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    pod.init(&[]);
    pod.start_proxy(&[]);

    let reply = pod.app_http("[::ffff:10.200.0.1]:8080");

    assert_peer(&reply, "[::ffff:10.200.0.1]:8080");
    assert_via_proxy(&alpha);
}
