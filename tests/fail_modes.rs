//! Fail modes, decided in the kernel per connection and per direction: when the proxy is not
//! listening, `open` lets connections go straight to their destination and `closed` (the default)
//! refuses them. A restarted proxy is intercepting again at once, without re-running init: its
//! listeners are found again (outbound: by address; inbound: the sockops LISTEN callback puts
//! them back in the SOCKMAP).
//!
//! Outbound: the app in the pod calls upstream "alpha" in the remote netns. Inbound: a client in
//! the remote netns calls the app's server on the pod's address.
use sidecar_tests::{HttpReply, Pod, Upstream};

const ALPHA: &str = "10.200.0.1:8080";
const APP: &str = "10.200.0.2:8080";

fn assert_ok(reply: &HttpReply, from: &Upstream) {
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.body,
        format!("hello from {}\n", from.name),
        "{reply:?}"
    );
}

/// Which of the requests `server` received went through the proxy, in order.
fn via_proxy(server: &Upstream) -> Vec<bool> {
    server
        .requests()
        .iter()
        .map(|r| r.header("x-forwarded-by") == Some("sidecar"))
        .collect()
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

/// The probe app's outbound call, success or not.
fn app_try_http(pod: &Pod, addr: &str) -> Result<HttpReply, String> {
    let run = pod.run_app_raw(&["http", "--connect", addr]);
    if run.status.success() {
        serde_json::from_value(run.json.clone())
            .map_err(|e| format!("unexpected probe output {}: {e}", run.stdout))
    } else {
        Err(format!("{}{}", run.stdout, run.stderr))
    }
}

#[test]
fn outbound_fail_open_goes_direct_while_the_proxy_is_down_and_is_captured_again_after_restart() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream(ALPHA, "alpha");
    pod.init(&["--fail-mode-outbound", "open"]);
    pod.start_proxy(&[]);

    let up = pod.app_http(ALPHA);
    pod.stop_proxy();
    let down = pod.app_http(ALPHA);
    pod.start_proxy(&[]);
    let restarted = pod.app_http(ALPHA);

    for reply in [&up, &down, &restarted] {
        assert_ok(reply, &alpha);
    }
    assert_eq!(
        via_proxy(&alpha),
        [true, false, true],
        "proxied / direct while the proxy was down / proxied again: {:#?}",
        alpha.requests()
    );
    assert_eq!(
        alpha.requests()[1].peer.to_string(),
        down.local,
        "while the proxy was down, alpha saw the app's own socket"
    );
    let counters = pod.counters();
    assert_eq!(
        (
            counters.get("outbound_fail_open"),
            counters.get("redirected")
        ),
        (1, 2),
        "kernel counters (outbound_fail_open, redirected): {:?}",
        counters.nonzero()
    );
}

#[test]
fn outbound_fail_closed_by_default_refuses_while_the_proxy_is_down_and_recovers_after_restart() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream(ALPHA, "alpha");
    pod.init(&[]);
    pod.start_proxy(&[]);

    let up = pod.app_http(ALPHA);
    pod.stop_proxy();
    let down = app_try_http(&pod, ALPHA);
    pod.start_proxy(&[]);
    let restarted = pod.app_http(ALPHA);

    assert_ok(&up, &alpha);
    assert_refused(down, "app -> alpha while the proxy is down (fail-closed)");
    assert_ok(&restarted, &alpha);
    assert_eq!(
        via_proxy(&alpha),
        [true, true],
        "only the two proxied requests reached alpha: {:#?}",
        alpha.requests()
    );
    assert_eq!(
        alpha.connections().len(),
        2,
        "nothing got through while the proxy was down"
    );
    assert_eq!(pod.counters().get("outbound_fail_open"), 0);
}

#[test]
fn inbound_fail_open_reaches_the_app_directly_while_the_proxy_is_down_and_is_captured_again_after_restart(
) {
    let mut pod = Pod::new();
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&["--fail-mode-inbound", "open"]);
    pod.start_proxy_with_inbound(&[]);

    let up = pod.remote_http(APP);
    pod.stop_proxy();
    let down = pod.remote_http(APP);
    pod.start_proxy_with_inbound(&[]);
    let restarted = pod.remote_http(APP);

    for reply in [&up, &down, &restarted] {
        assert_ok(reply, &app);
    }
    assert_eq!(
        via_proxy(&app),
        [true, false, true],
        "proxied / direct while the proxy was down / proxied again: {:#?}",
        app.requests()
    );
    assert_eq!(
        app.requests()[1].peer.to_string(),
        down.local,
        "while the proxy was down, the app saw the client's own socket"
    );
    let counters = pod.counters();
    assert_eq!(
        (
            counters.get("inbound_fail_open"),
            counters.get("inbound_redirected")
        ),
        (1, 2),
        "kernel counters (inbound_fail_open, inbound_redirected): {:?}",
        counters.nonzero()
    );
}

#[test]
fn inbound_fail_closed_by_default_refuses_while_the_proxy_is_down_and_recovers_after_restart() {
    let mut pod = Pod::new();
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&[]);
    pod.start_proxy_with_inbound(&[]);

    let up = pod.remote_http(APP);
    pod.stop_proxy();
    let down = pod.try_remote_http(APP);
    pod.start_proxy_with_inbound(&[]);
    let restarted = pod.remote_http(APP);

    assert_ok(&up, &app);
    assert_refused(down, "client -> app while the proxy is down (fail-closed)");
    assert_ok(&restarted, &app);
    assert_eq!(
        via_proxy(&app),
        [true, true],
        "only the two proxied requests reached the app: {:#?}",
        app.requests()
    );
    let counters = pod.counters();
    assert_eq!(
        (
            counters.get("inbound_refused"),
            counters.get("inbound_fail_open")
        ),
        (1, 0),
        "kernel counters (inbound_refused, inbound_fail_open): {:?}",
        counters.nonzero()
    );
}

/// With no proxy at all, each direction follows its own setting: the kernel decides, per
/// connection, from the mode of the connection's direction.
#[test]
fn without_a_proxy_outbound_open_goes_direct_and_inbound_closed_is_refused() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream(ALPHA, "alpha");
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&[
        "--fail-mode-outbound",
        "open",
        "--fail-mode-inbound",
        "closed",
    ]);

    let outbound = pod.app_http(ALPHA);
    let inbound = pod.try_remote_http(APP);

    assert_ok(&outbound, &alpha);
    assert_eq!(via_proxy(&alpha), [false]);
    assert_refused(inbound, "inbound, fail-closed, no proxy");
    assert!(app.requests().is_empty(), "{:#?}", app.requests());
    let counters = pod.counters();
    assert_eq!(
        (
            counters.get("outbound_fail_open"),
            counters.get("inbound_refused")
        ),
        (1, 1),
        "kernel counters (outbound_fail_open, inbound_refused): {:?}",
        counters.nonzero()
    );
}

#[test]
fn without_a_proxy_outbound_closed_is_refused_and_inbound_open_reaches_the_app() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream(ALPHA, "alpha");
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&[
        "--fail-mode-outbound",
        "closed",
        "--fail-mode-inbound",
        "open",
    ]);

    let outbound = app_try_http(&pod, ALPHA);
    let inbound = pod.remote_http(APP);

    assert_refused(outbound, "outbound, fail-closed, no proxy");
    assert!(alpha.connections().is_empty(), "{:?}", alpha.connections());
    assert_ok(&inbound, &app);
    assert_eq!(via_proxy(&app), [false]);
    let counters = pod.counters();
    assert_eq!(
        (
            counters.get("inbound_fail_open"),
            counters.get("outbound_fail_open")
        ),
        (1, 0),
        "kernel counters (inbound_fail_open, outbound_fail_open): {:?}",
        counters.nonzero()
    );
}
