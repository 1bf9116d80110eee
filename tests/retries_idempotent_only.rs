//! Retries through the real interception path: idempotent requests (GET, PUT, DELETE...) are sent
//! again on a 503 or a reset, each retry marked `x-sidecar-attempt` and carrying the same
//! `x-request-id` and body; POST never is; and the retry budget caps retries at a fraction of
//! the requests, so that retries cannot multiply an outage.

use sidecar_tests::metrics::{metrics, series};
use sidecar_tests::{Pod, SeenRequest};

fn attempts(requests: &[SeenRequest]) -> Vec<Option<&str>> {
    requests
        .iter()
        .map(|r| r.header("x-sidecar-attempt"))
        .collect()
}

#[test]
fn idempotent_requests_are_retried_on_503_and_post_is_not() {
    let mut pod = Pod::new();
    let unavailable = pod.status_upstream("10.200.0.1:8080", "unavailable", 503);
    pod.init(&[]);
    // The breaker is off so that only retries are seen.
    pod.start_proxy(&["--max-retries", "2", "--breaker-consecutive-failures", "0"]);

    let get = pod.app_request("10.200.0.1:8080", "GET", &["x-request-id: get-1"], "");
    assert_eq!(get.status, 503, "the last attempt's answer: {get:?}");
    assert_eq!(
        get.header("x-sidecar-error"),
        None,
        "the upstream's own 503 is relayed"
    );
    let seen = unavailable.requests();
    assert_eq!(
        attempts(&seen),
        [None, Some("2"), Some("3")],
        "GET: first try and two retries"
    );
    assert!(
        seen.iter()
            .all(|r| r.header("x-request-id") == Some("get-1")),
        "one request, one id: {seen:#?}"
    );

    let put = pod.app_request("10.200.0.1:8080", "PUT", &[], "payload");
    assert_eq!(put.status, 503);
    let seen = unavailable.requests();
    assert_eq!(seen.len(), 6, "PUT retried too");
    assert!(seen[3..].iter().all(|r| r.method == "PUT"));

    let post = pod.app_request("10.200.0.1:8080", "POST", &[], "payload");
    assert_eq!(post.status, 503);
    let seen = unavailable.requests();
    assert_eq!(seen.len(), 7, "POST is not idempotent: sent once");
    assert_eq!(seen[6].method, "POST");
    assert_eq!(seen[6].header("x-sidecar-attempt"), None);
}

#[test]
fn a_reset_is_retried_for_get_but_not_for_post() {
    let mut pod = Pod::new();
    let resetting = pod.resetting_upstream("10.200.0.1:8080", "resetting");
    pod.init(&[]);
    pod.start_proxy(&["--max-retries", "2", "--breaker-consecutive-failures", "0"]);

    let get = pod.app_request("10.200.0.1:8080", "GET", &[], "");
    assert_eq!(get.status, 502, "{get:?}");
    assert_eq!(get.header("x-sidecar-error"), Some("upstream-reset"));
    assert_eq!(
        attempts(&resetting.requests()),
        [None, Some("2"), Some("3")],
        "GET retried after each reset"
    );

    let post = pod.app_request("10.200.0.1:8080", "POST", &[], "once");
    assert_eq!(post.status, 502, "{post:?}");
    assert_eq!(post.header("x-sidecar-error"), Some("upstream-reset"));
    assert_eq!(
        resetting.requests().len(),
        4,
        "POST may have been processed before the reset: never sent again"
    );
}

#[test]
fn retries_stop_at_the_budget() {
    let mut pod = Pod::new();
    let unavailable = pod.status_upstream("10.200.0.1:8080", "unavailable", 503);
    pod.init(&[]);
    // 20 % of requests, no per-second floor: over 10 requests, exactly 2 retries. The window is
    // long so that a slow machine cannot let early deposits expire mid-test.
    let config = pod.log_dir().join("policy.toml");
    std::fs::write(&config, "[defaults]\nretry.budget_window = \"10m\"\n")
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
    let config = config.to_string_lossy().into_owned();
    pod.start_proxy(&[
        "--config",
        &config,
        "--max-retries",
        "1",
        "--retry-budget-ratio",
        "0.2",
        "--retry-budget-min-per-second",
        "0",
        "--breaker-consecutive-failures",
        "0",
    ]);

    for i in 1..=10 {
        let reply = pod.app_http("10.200.0.1:8080");
        assert_eq!(reply.status, 503, "request {i}: {reply:?}");
    }

    let seen = unavailable.requests();
    let retries = attempts(&seen).iter().filter(|a| a.is_some()).count();
    assert_eq!(
        (seen.len(), retries),
        (12, 2),
        "10 requests + 20 % retries; without the budget there would be 20 attempts"
    );
    let text = metrics(&pod);
    assert_eq!(
        series(
            &text,
            r#"sidecar_retries_total{destination="10.200.0.1:8080"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        series(&text, "sidecar_retry_budget_exhausted_total"),
        Some(8.0),
        "the 8 retries the budget refused\n{text}"
    );
}
