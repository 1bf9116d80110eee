//! Unit tests of [`super`] (`metrics.rs`).
use super::*;

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn requests_are_counted_with_bounded_destinations() {
    let registry = Registry::new();
    let m = ProxyMetrics::new(&registry, "svc", 2).unwrap();
    let a = m.destination(Dir::Outbound, "10.0.0.1:80".parse().unwrap());
    let b = m.destination(Dir::Inbound, "10.0.0.2:8080".parse().unwrap());
    let c = m.destination(Dir::Outbound, "10.0.0.3:80".parse().unwrap());
    assert_eq!(&**c.label(), OVERFLOW_DESTINATION);
    // Seen before: the same handles, also after the cap.
    let a2 = m.destination(Dir::Outbound, "10.0.0.1:80".parse().unwrap());
    assert!(Arc::ptr_eq(&a, &a2));
    let ms = Duration::from_millis(1);
    a.record(&Method::GET, StatusCode::OK, ms);
    a.record(&Method::GET, StatusCode::OK, ms);
    a2.record(&Method::POST, StatusCode::BAD_GATEWAY, ms);
    b.record(
        &Method::from_bytes(b"PROPFIND").unwrap(),
        StatusCode::OK,
        ms,
    );
    c.record(&Method::GET, StatusCode::OK, ms);
    let text = render(&registry);
    let s = |labels: &str| value(&text, &format!("sidecar_requests_total{{{labels}}}"));
    assert_eq!(
        s(
            r#"destination="10.0.0.1:80",direction="outbound",method="GET",service="svc",status="200""#
        ),
        Some(2.0)
    );
    assert_eq!(
        s(
            r#"destination="10.0.0.1:80",direction="outbound",method="POST",service="svc",status="502""#
        ),
        Some(1.0)
    );
    assert_eq!(
        s(
            r#"destination="10.0.0.2:8080",direction="inbound",method="other",service="svc",status="200""#
        ),
        Some(1.0)
    );
    assert_eq!(
        s(r#"destination="other",direction="outbound",method="GET",service="svc",status="200""#),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"sidecar_request_duration_seconds_count{destination="10.0.0.1:80",direction="outbound",method="GET",service="svc",status="200"}"#
        ),
        Some(2.0)
    );
}

#[test]
fn more_combinations_than_slots_still_count() {
    let registry = Registry::new();
    let m = ProxyMetrics::new(&registry, "svc", 10).unwrap();
    let d = m.destination(Dir::Outbound, "10.0.0.1:80".parse().unwrap());
    // 9 methods x 4 statuses = 36 combinations, more than the 32 slots.
    let methods = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
    ];
    let statuses = [200, 404, 500, 503];
    for method in methods {
        for code in statuses {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let status = StatusCode::from_u16(code).unwrap();
            d.record(&method, status, Duration::ZERO);
            d.record(&method, status, Duration::ZERO);
        }
    }
    let text = render(&registry);
    assert_eq!(
        value(
            &text,
            r#"sidecar_requests_total{destination="10.0.0.1:80",direction="outbound",method="CONNECT",service="svc",status="503"}"#
        ),
        Some(2.0)
    );
}

#[test]
fn unregistered_statuses_share_their_class() {
    let registry = Registry::new();
    let m = ProxyMetrics::new(&registry, "svc", 10).unwrap();
    let d = m.destination(Dir::Outbound, "10.0.0.1:80".parse().unwrap());
    for code in 520..600 {
        d.record(
            &Method::GET,
            StatusCode::from_u16(code).unwrap(),
            Duration::ZERO,
        );
    }
    d.record(
        &Method::GET,
        StatusCode::from_u16(599).unwrap(),
        Duration::ZERO,
    );
    d.record(&Method::GET, StatusCode::OK, Duration::ZERO);
    let text = render(&registry);
    let series = |status: &str| {
        value(
            &text,
            &format!(
                r#"sidecar_requests_total{{destination="10.0.0.1:80",direction="outbound",method="GET",service="svc",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(series("5xx"), Some(81.0));
    assert_eq!(series("200"), Some(1.0));
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("sidecar_requests_total"))
            .count(),
        2,
        "{text}"
    );
}

#[test]
fn errors_and_connections() {
    let registry = Registry::new();
    let m = ProxyMetrics::new(&registry, "svc", 10).unwrap();
    m.error(Dir::Outbound, ProxyError::UpstreamConnectRefused);
    m.conns(Dir::Inbound).opened.inc();
    m.conns(Dir::Inbound).active.inc();
    let text = render(&registry);
    assert_eq!(
        value(
            &text,
            r#"sidecar_proxy_errors_total{direction="outbound",reason="upstream-connect-refused"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"sidecar_tcp_connections_opened_total{direction="inbound"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"sidecar_tcp_connections_active{direction="inbound"}"#
        ),
        Some(1.0)
    );
    // Registered once per registry.
    assert!(ProxyMetrics::new(&registry, "svc", 10).is_err());
}
