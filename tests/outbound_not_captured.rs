//! What must NOT be captured: the proxy's own upstream connections (uid 1337; otherwise every
//! request would loop back into the proxy), processes outside the pod cgroup even when they share
//! the pod's network namespace, and destinations excluded by port or CIDR.
use sidecar_tests::{Pod, POD_IP4};

#[test]
fn proxy_own_upstream_connection_is_not_captured_so_the_request_arrives_once() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    pod.init(&[]);
    pod.start_proxy(&[]);

    let reply = pod.app_http("10.200.0.1:8080");

    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hello from alpha\n");
    // A loop (proxy -> itself) would add the header again or never reach alpha at all.
    let seen = alpha.only_request();
    assert_eq!(seen.header_all("x-forwarded-by"), ["sidecar"], "{seen:#?}");
    assert_eq!(
        seen.peer.ip().to_string(),
        POD_IP4,
        "the proxy's connection to alpha went out directly from the pod"
    );
    assert_eq!(
        alpha.connections().len(),
        1,
        "exactly one connection reached alpha"
    );
}

#[test]
fn process_outside_the_pod_cgroup_is_not_captured() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    pod.init(&[]);
    pod.start_proxy(&[]);

    // Control: interception is in place for the app in the pod cgroup.
    let from_app = pod.app_http("10.200.0.1:8080");
    assert_eq!(from_app.status, 200, "{from_app:?}");
    // Same netns, but a thread of the test process, which is not in the pod cgroup.
    let from_outside = pod.outside_http("10.200.0.1:8080");
    assert_eq!(from_outside.status, 200, "{from_outside:?}");

    let seen = alpha.requests();
    assert_eq!(seen.len(), 2, "two requests reached alpha: {seen:#?}");
    assert_eq!(
        seen[0].header("x-forwarded-by"),
        Some("sidecar"),
        "the app's request went through the proxy: {:#?}",
        seen[0]
    );
    assert_eq!(
        seen[1].header("x-forwarded-by"),
        None,
        "the outside process's request went direct: {:#?}",
        seen[1]
    );
    assert_eq!(
        seen[1].peer.to_string(),
        from_outside.local,
        "alpha saw the outside process's own socket"
    );
}

#[test]
fn excluded_ports_and_cidrs_are_not_captured() {
    let mut pod = Pod::new();
    let captured = pod.http_upstream("10.200.0.1:8080", "captured");
    let port_excluded = pod.http_upstream("10.200.0.1:8081", "port-excluded");
    let cidr_excluded = pod.http_upstream("10.200.0.4:8080", "cidr-excluded");
    // In the same /24 as the excluded 10.200.0.4/32: shows the CIDR match is exact.
    let cidr_neighbour = pod.http_upstream("10.200.0.3:8080", "cidr-neighbour");
    pod.init(&[
        "--exclude-outbound-ports",
        "8081",
        "--exclude-outbound-cidrs",
        "10.200.0.4/32",
    ]);
    pod.start_proxy(&[]);

    for upstream in [&captured, &port_excluded, &cidr_excluded, &cidr_neighbour] {
        let reply = pod.app_http(&upstream.addr.to_string());
        assert_eq!(reply.status, 200, "app -> {}: {reply:?}", upstream.name);
        assert_eq!(reply.body, format!("hello from {}\n", upstream.name));
    }

    for (upstream, via_proxy) in [
        (&captured, true),
        (&port_excluded, false),
        (&cidr_excluded, false),
        (&cidr_neighbour, true),
    ] {
        let seen = upstream.only_request();
        let expected: &[&str] = if via_proxy { &["sidecar"] } else { &[] };
        assert_eq!(
            seen.header_all("x-forwarded-by"),
            expected,
            "{} ({}) should {}be captured: {seen:#?}",
            upstream.name,
            upstream.addr,
            if via_proxy { "" } else { "NOT " }
        );
    }
}
