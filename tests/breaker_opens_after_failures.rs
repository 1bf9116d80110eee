//! A destination that keeps failing gets its circuit breaker opened: after exactly N failures in
//! a row the proxy answers 503 itself (with `x-sidecar-error: upstream-breaker-open`) without
//! sending the request, or even connecting, to the upstream; after the open time one probe goes
//! through, and its success closes the breaker. All through the real interception path.
use std::time::{Duration, Instant};

use sidecar_tests::metrics::{metrics, series};
use sidecar_tests::{poll_until, HttpReply, Pod};

/// The breaker's open time in these tests: short, so that the half-open step comes quickly.
const OPEN_TIME: Duration = Duration::from_secs(1);
/// Generous bound on how long the breaker may take to let a probe through after the open time
/// (a debug build on a busy 2-core machine; probes are polled, never slept for).
const PROBE_DEADLINE: Duration = Duration::from_secs(20);

fn assert_upstream_answer(reply: &HttpReply, status: u16, what: &str) {
    assert_eq!(reply.status, status, "{what}: {reply:?}");
    assert_eq!(
        reply.header("x-sidecar-error"),
        None,
        "{what}: the upstream's own answer is relayed, not replaced: {reply:?}"
    );
}

fn assert_breaker_open(reply: &HttpReply, what: &str) {
    assert_eq!(reply.status, 503, "{what}: {reply:?}");
    assert_eq!(
        reply.header("x-sidecar-error"),
        Some("upstream-breaker-open"),
        "{what}: {reply:?}"
    );
    assert!(
        reply.header("retry-after").is_some(),
        "{what}: says when to come back: {reply:?}"
    );
    assert!(
        reply.body.starts_with("sidecar: circuit breaker open"),
        "{what}: {reply:?}"
    );
}

#[test]
fn opens_after_exactly_n_failures_and_answers_503_without_contacting_the_upstream() {
    let mut pod = Pod::new();
    let failing = pod.status_upstream("10.200.0.1:8080", "failing", 500);
    pod.init(&[]);
    pod.start_proxy(&[
        "--breaker-consecutive-failures",
        "3",
        "--breaker-open-time",
        "60s",
    ]);

    for i in 1..=3 {
        let reply = pod.app_http("10.200.0.1:8080");
        assert_upstream_answer(&reply, 500, &format!("failure {i} of 3"));
    }
    assert_eq!(
        failing.requests().len(),
        3,
        "each failure reached the upstream once"
    );

    let first_refusal = pod.app_http("10.200.0.1:8080");
    assert_breaker_open(&first_refusal, "the 4th request, breaker open");
    // Every connection the proxy opened so far has been accepted by now (a request was answered
    // since); a further refused request must not add one.
    let connections = failing.connections().len();
    let second_refusal = pod.app_http("10.200.0.1:8080");
    assert_breaker_open(&second_refusal, "the 5th request, still open");
    assert_eq!(
        failing.requests().len(),
        3,
        "no request reached the upstream while the breaker was open"
    );
    assert_eq!(
        failing.connections().len(),
        connections,
        "not even a TCP connection was opened to the upstream while the breaker was open"
    );
    let log = pod.proxy_log();
    assert!(
        log.contains("circuit breaker opened") && log.contains("10.200.0.1:8080"),
        "the state change is logged with its destination:\n{log}"
    );
    let text = metrics(&pod);
    let dest = r#"destination="10.200.0.1:8080""#;
    assert_eq!(
        series(&text, &format!("sidecar_breaker_state{{{dest}}}")),
        Some(1.0),
        "gauge: 1 = open\n{text}"
    );
    assert_eq!(
        series(
            &text,
            &format!("sidecar_breaker_transitions_total{{{dest},to=\"open\"}}")
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn half_opens_after_the_open_time_and_closes_on_success() {
    let mut pod = Pod::new();
    let flaky = pod.recovering_upstream("10.200.0.1:8080", "flaky");
    pod.init(&[]);
    pod.start_proxy(&[
        "--breaker-consecutive-failures",
        "2",
        "--breaker-open-time",
        "1s",
        "--max-retries",
        "0",
    ]);

    for i in 1..=2 {
        let reply = pod.app_http("10.200.0.1:8080");
        assert_upstream_answer(&reply, 503, &format!("failure {i} of 2"));
    }
    let opened = Instant::now();
    assert_breaker_open(&pod.app_http("10.200.0.1:8080"), "right after the trip");
    flaky.recover();

    // Refused while open; the first request after the open time is the probe.
    let mut refused_while_open = 0;
    let probe = poll_until(OPEN_TIME + PROBE_DEADLINE, || {
        let reply = pod.app_http("10.200.0.1:8080");
        if reply.status == 503 {
            assert_breaker_open(&reply, "while open");
            refused_while_open += 1;
            return None;
        }
        Some((reply, opened.elapsed()))
    });
    let Some((probe, after)) = probe else {
        panic!(
            "no request got through within {:?} of the trip; proxy log:\n{}",
            OPEN_TIME + PROBE_DEADLINE,
            pod.proxy_log()
        );
    };
    assert!(
        after >= OPEN_TIME,
        "the probe went through {after:?} after the trip, before the open time {OPEN_TIME:?}"
    );
    assert_upstream_answer(&probe, 200, "the half-open probe");
    assert_upstream_answer(&pod.app_http("10.200.0.1:8080"), 200, "closed again");
    assert_eq!(
        flaky.requests().len(),
        2 + 1 + 1,
        "two failures, the probe, one more; the {refused_while_open} refused requests never arrived"
    );
    let log = pod.proxy_log();
    for line in [
        "circuit breaker opened",
        "circuit breaker half-open",
        "circuit breaker closed",
    ] {
        assert!(log.contains(line), "{line:?} is logged:\n{log}");
    }
}

/// The config file overrides the flags per destination: one destination's breaker opens after
/// two failures, another's after the flag's four.
#[test]
fn config_file_sets_a_destination_of_its_own() {
    let mut pod = Pod::new();
    let strict = pod.status_upstream("10.200.0.1:8080", "strict", 500);
    let lenient = pod.status_upstream("10.200.0.3:8080", "lenient", 500);
    let config = pod.log_dir().join("policy.toml");
    std::fs::write(
        &config,
        r#"
[defaults]
breaker.open_time = "60s"

[[destination]]
match = "10.200.0.1:8080"
[destination.breaker]
consecutive_failures = 2
"#,
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
    let config = config.to_string_lossy().into_owned();
    pod.init(&[]);
    pod.start_proxy(&["--config", &config, "--breaker-consecutive-failures", "4"]);

    for _ in 0..2 {
        assert_upstream_answer(&pod.app_http("10.200.0.1:8080"), 500, "strict failing");
    }
    assert_breaker_open(&pod.app_http("10.200.0.1:8080"), "strict: its rule says 2");
    for i in 1..=4 {
        assert_upstream_answer(
            &pod.app_http("10.200.0.3:8080"),
            500,
            &format!("lenient failure {i}: the flag says 4"),
        );
    }
    assert_breaker_open(&pod.app_http("10.200.0.3:8080"), "lenient after 4");
    assert_eq!(strict.requests().len(), 2);
    assert_eq!(lenient.requests().len(), 4);
}
