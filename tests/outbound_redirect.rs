//! The app's outbound HTTP is steered through the proxy, and the proxy reaches the destination the
//! app asked for: two upstreams on different addresses and ports each get their own request, so
//! the original destination is really recovered per connection, not guessed or fixed.
use sidecar_tests::{Pod, POD_IP4};

#[test]
fn app_http_to_two_upstreams_goes_through_the_proxy_to_each_original_destination() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    let beta = pod.http_upstream("10.200.0.3:9090", "beta");
    pod.init(&[]);
    pod.start_proxy(&[]);

    let to_alpha = pod.app_http("10.200.0.1:8080");
    let to_beta = pod.app_http("10.200.0.3:9090");

    assert_eq!(to_alpha.status, 200, "app -> alpha: {to_alpha:?}");
    assert_eq!(
        to_alpha.body, "hello from alpha\n",
        "alpha's answer reached the app"
    );
    assert_eq!(to_beta.status, 200, "app -> beta: {to_beta:?}");
    assert_eq!(
        to_beta.body, "hello from beta\n",
        "beta's answer reached the app"
    );

    for upstream in [&alpha, &beta] {
        let seen = upstream.only_request();
        assert_eq!(
            seen.header_all("x-forwarded-by"),
            ["sidecar"],
            "{} must receive the request through the proxy: {seen:#?}",
            upstream.name
        );
        assert_eq!(seen.method, "GET");
        assert_eq!(seen.path, "/");
        assert_eq!(
            seen.peer.ip().to_string(),
            POD_IP4,
            "{} sees the connection come from the pod",
            upstream.name
        );
    }
}
