//! `/metrics` after a scripted set of requests through the real interception path (both
//! directions, HTTP and opaque TCP, a refused upstream): the request, connection and error series
//! with their exact labels and counts, as a dashboard reads them. Timings (histogram buckets and
//! sums), bytes and other families (process, policies) are checked separately or left out, so
//! that the snapshot only changes when what users read changes. The kernel counters are exported
//! once the stats map pin is readable by the proxy's user.
#[path = "lifecycle_support.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use sidecar_tests::metrics::{metrics, series};
use sidecar_tests::Pod;
use support::{wait_for, Sidecar};

/// The families pinned by the snapshot.
const FAMILIES: [&str; 6] = [
    "sidecar_requests_total",
    "sidecar_request_duration_seconds_count",
    "sidecar_proxy_errors_total",
    "sidecar_tcp_connections_opened_total",
    "sidecar_tcp_connections_closed_total",
    "sidecar_tcp_connections_active",
];

const EXPECTED: &str = r#"
sidecar_proxy_errors_total{direction="outbound",reason="upstream-connect-refused"} 1
sidecar_request_duration_seconds_count{destination="10.200.0.1:8080",direction="outbound",method="GET",service="snap",status="200"} 3
sidecar_request_duration_seconds_count{destination="10.200.0.2:8080",direction="inbound",method="GET",service="snap",status="200"} 2
sidecar_request_duration_seconds_count{destination="10.200.0.3:8080",direction="outbound",method="GET",service="snap",status="502"} 1
sidecar_requests_total{destination="10.200.0.1:8080",direction="outbound",method="GET",service="snap",status="200"} 3
sidecar_requests_total{destination="10.200.0.2:8080",direction="inbound",method="GET",service="snap",status="200"} 2
sidecar_requests_total{destination="10.200.0.3:8080",direction="outbound",method="GET",service="snap",status="502"} 1
sidecar_tcp_connections_active{direction="inbound"} 0
sidecar_tcp_connections_active{direction="outbound"} 0
sidecar_tcp_connections_closed_total{direction="inbound"} 2
sidecar_tcp_connections_closed_total{direction="outbound"} 5
sidecar_tcp_connections_opened_total{direction="inbound"} 2
sidecar_tcp_connections_opened_total{direction="outbound"} 5
"#;

/// The pinned families' series, sorted.
fn snapshot(text: &str) -> String {
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            FAMILIES.iter().any(|f| {
                l.strip_prefix(f)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
        })
        .collect();
    lines.sort_unstable();
    lines.join("\n")
}

#[test]
fn metrics_after_scripted_requests() {
    let mut pod = Pod::new();
    let _alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    let _echo = pod.echo_upstream("10.200.0.1:9000", "echo");
    let _app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&[]);
    let pin_dir = pod.status().pin_dir;
    // `sidecar init` makes the stats map pin world-readable so that the proxy (UID 1337, no
    // capabilities) can open it read-only and export the kernel counters.
    let stats = format!("{pin_dir}/map_SC_STATS");
    let mode = fs::metadata(&stats)
        .unwrap_or_else(|e| panic!("stat {stats}: {e}"))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444, "{stats} mode {mode:o}");
    let before = pod.counters().get("inbound_listener_seen");
    let mut sidecar = Sidecar::start(
        &pod,
        "proxy",
        &["--service-name", "snap", "--pin-dir", &pin_dir],
    );
    sidecar.wait_inbound_registered(&mut pod, before);

    for _ in 0..3 {
        let reply = pod.app_http("10.200.0.1:8080");
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    // 10.200.0.3 exists, but nothing listens on 8080 there.
    let refused = pod.app_http("10.200.0.3:8080");
    assert_eq!(refused.status, 502, "{refused:?}");
    assert_eq!(
        refused.header("x-sidecar-error"),
        Some("upstream-connect-refused")
    );
    let echoed = pod.app_echo("10.200.0.1:9000", 1000);
    assert!(echoed.ok, "{echoed:?}");
    for _ in 0..2 {
        let reply = pod.remote_http("10.200.0.2:8080");
        assert_eq!(reply.status, 200, "{reply:?}");
    }

    // A connection counts as closed once the proxy has seen it end, a moment after the client
    // had its answer.
    wait_for(
        Duration::from_secs(10),
        "every connection closed in the metrics",
        || {
            let text = metrics(&pod);
            let closed = |dir: &str| {
                series(
                    &text,
                    &format!("sidecar_tcp_connections_closed_total{{direction=\"{dir}\"}}"),
                )
            };
            closed("outbound") == Some(5.0) && closed("inbound") == Some(2.0)
        },
    );
    let text = metrics(&pod);
    assert_eq!(
        snapshot(&text),
        EXPECTED.trim(),
        "\n--- /metrics ---\n{text}"
    );

    // Bytes: at least the echo's 1000 each way outbound, and something inbound.
    let bytes = |name: &str, dir: &str| {
        series(&text, &format!("{name}{{direction=\"{dir}\"}}")).unwrap_or(0.0)
    };
    assert!(bytes("sidecar_tcp_received_bytes_total", "outbound") > 1000.0);
    assert!(bytes("sidecar_tcp_sent_bytes_total", "outbound") > 1000.0);
    assert!(bytes("sidecar_tcp_received_bytes_total", "inbound") > 0.0);
    assert!(bytes("sidecar_tcp_sent_bytes_total", "inbound") > 0.0);
    // Every request has a duration, in the buckets too.
    assert_eq!(
        series(
            &text,
            r#"sidecar_request_duration_seconds_bucket{destination="10.200.0.1:8080",direction="outbound",method="GET",service="snap",status="200",le="+Inf"}"#
        ),
        Some(3.0)
    );
    // The kernel's view of the same traffic: 5 outbound connects redirected, 2 inbound SYNs.
    let kernel = |name: &str| {
        series(
            &text,
            &format!("sidecar_ebpf_events_total{{counter=\"{name}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(kernel("redirected") >= 5.0, "\n{text}");
    assert!(kernel("inbound_redirected") >= 2.0, "\n{text}");
    // The process.
    assert!(series(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
    assert!(series(&text, "process_open_fds").unwrap_or(0.0) > 0.0);
}
