//! Unit tests of [`super`] (`policy/config_file.rs`).
use super::*;
use http::StatusCode;
use std::time::Duration;

fn flag<'a>(path: &'static str, value: Option<&'a str>) -> Flag<'a> {
    Flag {
        path,
        name: path,
        value,
        source: "flag",
    }
}

fn render(errors: &[KeyError]) -> String {
    errors
        .iter()
        .map(|e| format!("{} = {:?}: {}\n", e.key, e.value, e.problem))
        .collect()
}

#[test]
fn no_file_no_flags_gives_the_defaults() {
    let c = load(None, &[]).unwrap();
    assert_eq!(c, PolicyConfig::default());
    assert_eq!(c.defaults.breaker.consecutive_failures, 5);
    assert_eq!(c.defaults.breaker.open_time, Duration::from_secs(10));
    assert_eq!(c.defaults.request_timeout, Duration::from_secs(30));
    assert_eq!(c.defaults.connect_timeout, Duration::from_secs(1));
}

#[test]
fn file_defaults_flags_and_destinations_layer() {
    let text = r#"
            [defaults]
            request_timeout = "10s"
            connect_timeout = "3s"
            breaker.open_time = "20s"

            [[destination]]
            match = "10.0.0.7:80"
            request_timeout = "2s"
            [destination.breaker]
            consecutive_failures = 3
            failure_on = ["connect", "503"]
            [destination.retry]
            max_retries = 0

            [[destination]]
            match = "API.example:443"
            retry = { on = "connect,5xx", budget_ratio = "50%" }
            breaker = { failure_rate = 0.5, failure_rate_min_requests = 4 }
        "#;
    let flags = [
        flag("connect_timeout", Some("250ms")),
        flag("request_timeout", None),
        flag("breaker.consecutive_failures", Some("7")),
    ];
    let c = from_str("policy.toml", text, &flags).unwrap();
    let d = &c.defaults;
    assert_eq!(d.request_timeout, Duration::from_secs(10), "file default");
    assert_eq!(
        d.connect_timeout,
        Duration::from_millis(250),
        "the flag wins"
    );
    assert_eq!(d.breaker.open_time, Duration::from_secs(20));
    assert_eq!(d.breaker.consecutive_failures, 7);

    let [a, b] = &c.destinations[..] else {
        panic!("two rules: {:?}", c.destinations)
    };
    assert_eq!(a.matcher, Match::Addr("10.0.0.7:80".parse().unwrap()));
    assert_eq!(a.policy.request_timeout, Duration::from_secs(2));
    assert_eq!(
        a.policy.connect_timeout,
        Duration::from_millis(250),
        "inherited"
    );
    assert_eq!(a.policy.breaker.consecutive_failures, 3);
    assert_eq!(
        a.policy.breaker.open_time,
        Duration::from_secs(20),
        "inherited"
    );
    assert!(a.policy.failure_on.connect && !a.policy.failure_on.reset);
    assert!(a
        .policy
        .failure_on
        .has_status(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!a
        .policy
        .failure_on
        .has_status(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(a.policy.retry.max_retries, 0);

    assert_eq!(
        b.matcher,
        Match::Authority {
            host: "api.example".into(),
            port: 443
        }
    );
    assert_eq!(b.policy.retry.on.describe(), "connect,5xx");
    assert_eq!(b.policy.retry.budget.ratio, 0.5);
    assert_eq!(b.policy.breaker.failure_rate, Some(0.5));
    assert_eq!(b.policy.breaker.failure_rate_min_requests, 4);
}

/// What users read when the file and flags are wrong: every problem at once.
#[test]
fn every_bad_key_is_reported() {
    let text = r#"
            colour = "blue"
            [defaults]
            request_timout = "10s"
            idle_timeout = 30
            breaker.open_time = "0s"
            breaker.max_open_time = "1s"
            [defaults.retry]
            on = ["timeout"]
            budget_ratio = 1.5
            [defaults.tls]
            mode = "strict"

            [[destination]]
            match = "10.0.0.7"
            [[destination]]
            request_timeout = "1s"
            [[destination]]
            match = "svc:80"
            breaker = { failure_on = ["connect", 404], consecutive_failures = -1 }
            [[destination]]
            match = "SVC:80"
            [[destination]]
            match = "other:80"
            breaker = { open_time = "1m", max_open_time = "30s" }
        "#;
    let flags = [flag("retry.max_retries", Some("many"))];
    let errors = from_str("policy.toml", text, &flags).unwrap_err();
    let expected = r#"policy.toml: colour = "blue": unknown section; expected [defaults], [[destination]], [mtls], [inbound], [[transcode]] or [run]
policy.toml: [defaults] breaker.open_time = "0s": must be greater than zero
policy.toml: [defaults] idle_timeout = "30": expected a duration string with a unit, e.g. "500ms" or "2s"
policy.toml: [defaults] request_timout = "10s": unknown key; did you mean request_timeout?
policy.toml: [defaults] retry.budget_ratio = "1.5": expected a fraction from 0 to 1 (e.g. 0.2 or "20%")
policy.toml: [defaults] retry.on = "[\"timeout\"]": timeouts are not retried: the request timeout covers all attempts; use connect, reset, 5xx or status codes
policy.toml: [defaults] tls = "(a table)": unknown table; valid tables here: breaker, retry
policy.toml: [[destination]] #1 match = "10.0.0.7": missing port; expected IP:PORT, [IPv6]:PORT or HOST:PORT, e.g. 10.0.0.7:80 or api.example:443
policy.toml: [[destination]] #2 match = "": missing; every [[destination]] needs match = "IP:PORT" or "HOST:PORT"
policy.toml: [[destination]] #4 (SVC:80) match = "SVC:80": another [[destination]] above has the same match
retry.max_retries = "many": expected a whole number from 0 to 10
policy.toml: [defaults] (with flags) breaker.max_open_time = "1s": must not be shorter than breaker.open_time (10s)
policy.toml: [[destination]] #3 (svc:80) breaker.consecutive_failures = "-1": expected a whole number from 0 to 1000000
policy.toml: [[destination]] #3 (svc:80) breaker.failure_on = "[\"connect\", 404]": write status codes as strings: "404" (a list of strings)
policy.toml: [[destination]] #5 (other:80) breaker.max_open_time = "30s": must not be shorter than breaker.open_time (60s)
"#;
    assert_eq!(render(&errors), expected);
}

#[test]
fn unreadable_or_invalid_files_are_reported() {
    let errors = load(Some(Path::new("/nonexistent/sidecar.toml")), &[]).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].problem.starts_with("cannot read the config file"));
    let errors = from_str("p.toml", "[defaults\n", &[]).unwrap_err();
    assert!(
        errors[0].problem.starts_with("not valid TOML"),
        "{errors:?}"
    );
}

#[test]
fn off_and_percentages() {
    let flags = [
        flag("breaker.failure_rate", Some("25%")),
        flag("retry.budget_ratio", Some("0.1")),
    ];
    let c = load(None, &flags).unwrap();
    assert_eq!(c.defaults.breaker.failure_rate, Some(0.25));
    assert_eq!(c.defaults.retry.budget.ratio, 0.1);
    let c = from_str("p", "[defaults]\nbreaker.failure_rate = \"off\"\n", &[]).unwrap();
    assert_eq!(c.defaults.breaker.failure_rate, None);
}

#[test]
fn connection_limit_per_destination_from_defaults_flags_and_rules() {
    let text = r#"
            [defaults]
            max_connections = 64
            [[destination]]
            match = "10.0.0.7:80"
            max_connections = 1000
        "#;
    let config = from_str("p.toml", text, &[]).unwrap();
    assert_eq!(config.defaults.max_connections, 64);
    assert_eq!(config.destinations[0].policy.max_connections, 1000);

    // A flag wins over the file's [defaults]; rules still override it.
    let flag = Flag {
        path: "max_connections",
        name: "--max-connections-per-destination",
        value: Some("32"),
        source: "environment",
    };
    let config = from_str("p.toml", text, &[flag]).unwrap();
    assert_eq!(config.defaults.max_connections, 32);
    assert_eq!(config.destinations[0].policy.max_connections, 1000);

    let errors = from_str("p.toml", "[defaults]\nmax_connections = 0\n", &[]).unwrap_err();
    let e = &errors[0];
    assert_eq!(
        format!("{} = {:?}: {}", e.key, e.value, e.problem),
        "p.toml: [defaults] max_connections = \"0\": expected a whole number from 1 to 65536"
    );
    let built_in = from_str("p.toml", "", &[]).unwrap();
    assert_eq!(
        built_in.defaults.max_connections,
        crate::policy::DEFAULT_MAX_CONNECTIONS_PER_DESTINATION
    );
}
