//! IPv6 outbound capture: a native IPv6 destination goes through the proxy's [::1]:15001 listener,
//! and an IPv6 socket connecting to an IPv4-mapped address (::ffff:a.b.c.d, common with dual-stack
//! runtimes) is captured too.
use sidecar_tests::{Pod, POD_IP4, POD_IP6};

#[test]
fn app_http_to_ipv6_upstream_goes_through_the_proxy() {
    let mut pod = Pod::new();
    let alpha6 = pod.http_upstream("[fd00:200::1]:8080", "alpha6");
    pod.init(&[]);
    pod.start_proxy(&[]);
    pod.wait_proxy_listening_v6();

    let reply = pod.app_http("[fd00:200::1]:8080");

    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hello from alpha6\n");
    let seen = alpha6.only_request();
    assert_eq!(seen.header_all("x-forwarded-by"), ["sidecar"], "{seen:#?}");
    assert_eq!(seen.peer.ip().to_string(), POD_IP6);
}

#[test]
fn ipv6_socket_to_ipv4_mapped_address_goes_through_the_proxy() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    pod.init(&[]);
    pod.start_proxy(&[]);

    // An AF_INET6 socket connecting to ::ffff:10.200.0.1.
    let reply = pod.app_http("[::ffff:10.200.0.1]:8080");

    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hello from alpha\n");
    let seen = alpha.only_request();
    assert_eq!(seen.header_all("x-forwarded-by"), ["sidecar"], "{seen:#?}");
    assert_eq!(seen.peer.ip().to_string(), POD_IP4);
}
