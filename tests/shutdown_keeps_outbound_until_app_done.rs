//! During a drain the app keeps its egress: after SIGTERM, inbound is closed (new connections are
//! refused) and `/ready` is 503, yet the app's outbound connection stays up and new outbound
//! requests still go through, until the app has no outbound connection left; then the proxy
//! exits 0 at once, long before its deadline.
#[path = "lifecycle_support.rs"]
mod support;

use std::time::{Duration, Instant};

use sidecar_tests::metrics::{metrics, series};
use sidecar_tests::{env, Pod};
use support::{admin_get, wait_for, PodProcess, Sidecar};

const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

fn outbound_active(pod: &Pod) -> Option<f64> {
    series(
        &metrics(pod),
        r#"sidecar_tcp_connections_active{direction="outbound"}"#,
    )
}

#[test]
fn outbound_works_while_draining_until_the_app_is_done() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    let _echo = pod.echo_upstream("10.200.0.1:9000", "echo");
    let _app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&[]);
    let before = pod.counters().get("inbound_listener_seen");
    let mut sidecar = Sidecar::start(&pod, "proxy", &["--drain-timeout", "60s"]);
    sidecar.wait_inbound_registered(&mut pod, before);
    assert_eq!(pod.remote_http("10.200.0.2:8080").status, 200);

    // The app's long-lived outbound connection (it waits for a greeting the echo server never
    // sends; the probe gives up after a minute, the test ends it long before).
    let holder = PodProcess::spawn(
        &pod,
        &env::probe_bin(),
        &[
            "greeting",
            "--connect",
            "10.200.0.1:9000",
            "--timeout-ms",
            "60000",
        ],
    );
    wait_for(
        Duration::from_secs(20),
        "the app's outbound connection is open",
        || outbound_active(&pod) == Some(1.0),
    );

    sidecar.signal(libc::SIGTERM);
    wait_for(Duration::from_secs(20), "draining", || {
        admin_get(&pod, "/ready")
            .is_ok_and(|(status, body)| status == 503 && body.contains("draining"))
    });
    // Inbound is closed: the kernel refuses (the pod is fail-closed, the listener is gone).
    wait_for(Duration::from_secs(20), "inbound refused", || {
        pod.try_remote_http("10.200.0.2:8080")
            .is_err_and(|e| e.contains("refused"))
    });
    // Outbound still works, new connections included.
    let reply = pod.app_http("10.200.0.1:8080");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(alpha.requests().len(), 1);
    assert!(
        sidecar.try_status().is_none(),
        "the proxy must stay while the app has an outbound connection:\n{}",
        sidecar.log()
    );

    // The app is done: its last connection closes, and the proxy goes.
    let done = Instant::now();
    drop(holder);
    let status = sidecar.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status}:\n{}", sidecar.log());
    assert!(
        done.elapsed() < DRAIN_TIMEOUT / 2,
        "exited {:?} after the app's last connection closed",
        done.elapsed()
    );
    assert!(
        sidecar.log().contains("drained; exiting"),
        "{}",
        sidecar.log()
    );
}
