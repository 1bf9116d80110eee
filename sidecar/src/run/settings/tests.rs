//! Unit tests of [`super`] (`run/settings.rs`).
use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn args(argv: &[&str]) -> RunArgs {
    let mut full = vec!["sidecar-run"];
    full.extend_from_slice(argv);
    Cli::try_parse_from(full).expect("clap accepts").run
}

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn durations() {
    assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
    assert!(parse_duration("1").unwrap_err().contains("missing unit"));
    assert!(parse_duration("1.5s").is_err());
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("-1s").is_err());
}

#[test]
fn defaults_are_valid() {
    // Explicit values so the test does not depend on SIDECAR_* in the environment.
    let s = Settings::from_args(&RunArgs { ..defaults() }, &no_env).unwrap();
    assert_eq!(s.workers, 1);
    assert_eq!(
        s.proxy.policy.defaults.connect_timeout,
        Duration::from_secs(1)
    );
    assert_eq!(
        s.proxy.policy.defaults.request_timeout,
        Duration::from_secs(30)
    );
    assert_eq!(s.proxy.policy, PolicyConfig::default());
    assert_eq!(s.drain_timeout, Duration::from_secs(30));
    assert_eq!(s.log_filter, "info");
    assert!(s.proxy.target.is_none());
    assert_eq!(
        s.proxy.inbound,
        vec![
            ListenAddr {
                addr: "0.0.0.0:15006".parse().unwrap(),
                required: true
            },
            ListenAddr {
                addr: "[::]:15006".parse().unwrap(),
                required: false
            },
        ]
    );
    assert_eq!(
        s.proxy.listen,
        vec![
            ListenAddr {
                addr: "127.0.0.1:15001".parse().unwrap(),
                required: true
            },
            ListenAddr {
                addr: "[::1]:15001".parse().unwrap(),
                required: false
            },
        ]
    );
}

fn defaults() -> RunArgs {
    RunArgs {
        // Off: no --logs-file (clap's defaults for its other keys do not matter then).
        logs: Default::default(),
        outbound: None,
        inbound: None,
        target: None,
        service_name: None,
        config: None,
        identity_dir: None,
        probe_paths: None,
        connect_timeout: None,
        request_timeout: None,
        idle_timeout: None,
        breaker_consecutive_failures: None,
        breaker_failure_rate: None,
        breaker_open_time: None,
        max_retries: None,
        retry_budget_ratio: None,
        retry_budget_min_per_second: None,
        detect_timeout: "1s".into(),
        pool_idle_timeout: "30s".into(),
        http1_engine: "native".into(),
        header_timeout: "30s".into(),
        max_header_bytes: "32KiB".into(),
        http2_max_concurrent_streams: "100".into(),
        http2_keepalive: "30s".into(),
        http2_idle_timeout: "5m".into(),
        park_idle_after: "1s".into(),
        max_downstream_connections: "10000".into(),
        inbound_max_connections: "1024".into(),
        max_connections_per_destination: None,
        workers: "1".into(),
        drain_timeout: "30s".into(),
        log_format: "plain".into(),
        drain_min: "0s".into(),
        admin: crate::admin::DEFAULT_ADMIN.into(),
        app_probe: None,
        app_probe_interval: "1s".into(),
        pin_dir: None,
        exit_with_app: None,
        shutdown_file: None,
        access_log: false,
        max_destinations: "100".into(),
    }
}

#[test]
fn flags_parse() {
    let a = args(&[
        "--outbound",
        "127.0.0.1:0, [::1]:0",
        "--inbound",
        "none",
        "--target",
        "http://127.0.0.1:8080/api/",
        "--connect-timeout",
        "250ms",
        "--workers",
        "2",
        "--log-format",
        "json",
    ]);
    let s = Settings::from_args(&a, &no_env).unwrap();
    assert_eq!(s.proxy.listen.len(), 2);
    assert!(s.proxy.listen.iter().all(|l| l.required));
    assert!(s.proxy.inbound.is_empty());
    assert_eq!(
        s.proxy.target.as_ref().map(Target::as_str),
        Some("http://127.0.0.1:8080/api/")
    );
    assert_eq!(
        s.proxy.policy.defaults.connect_timeout,
        Duration::from_millis(250)
    );
    assert_eq!(s.workers, 2);
    assert_eq!(s.log_format, LogFormat::Json);
}

#[test]
fn lifecycle_flags() {
    let s = Settings::from_args(&defaults(), &no_env).unwrap();
    let admin: Vec<_> = s
        .lifecycle
        .admin
        .iter()
        .map(|l| (l.addr.to_string(), l.required))
        .collect();
    assert_eq!(
        admin,
        [
            ("0.0.0.0:15090".to_owned(), true),
            ("[::]:15090".to_owned(), false)
        ]
    );
    assert_eq!(s.lifecycle.max_destinations, 100);
    assert_eq!(s.lifecycle.drain_min, Duration::ZERO);
    assert!(s.lifecycle.pin_dir.is_none() && s.lifecycle.app_probe.is_none());

    let a = args(&[
        "--admin",
        "none",
        "--app-probe",
        "http://127.0.0.1:8080/healthz",
        "--pin-dir",
        "/sys/fs/bpf/sidecar/pod",
        "--exit-with-app",
        "/run/app.pid",
        "--access-log",
        "--drain-min",
        "5s",
    ]);
    let s = Settings::from_args(&a, &no_env).unwrap();
    assert!(s.lifecycle.admin.is_empty());
    assert!(s.lifecycle.access_log);
    assert_eq!(s.lifecycle.drain_min, Duration::from_secs(5));
    assert_eq!(
        s.lifecycle.exit_with_app,
        Some(AppTarget::PidFile("/run/app.pid".into()))
    );

    let bad = RunArgs {
        admin: "localhost:15090".into(),
        app_probe: Some("127.0.0.1:8080".into()),
        app_probe_interval: "1ms".into(),
        pin_dir: Some("relative/dir".into()),
        exit_with_app: Some("app.pid".into()),
        shutdown_file: Some("done".into()),
        max_destinations: "0".into(),
        drain_min: "soon".into(),
        ..defaults()
    };
    let err = Settings::from_args(&bad, &no_env).unwrap_err();
    let keys: Vec<_> = err.errors.iter().map(|e| e.key.to_string()).collect();
    assert_eq!(
        keys,
        [
            "--admin / SIDECAR_ADMIN",
            "--app-probe / SIDECAR_APP_PROBE",
            "--app-probe-interval / SIDECAR_APP_PROBE_INTERVAL",
            "--drain-min / SIDECAR_DRAIN_MIN",
            "--pin-dir / SIDECAR_PIN_DIR",
            "--exit-with-app / SIDECAR_EXIT_WITH_APP",
            "--shutdown-file / SIDECAR_SHUTDOWN_FILE",
            "--max-destinations / SIDECAR_MAX_DESTINATIONS",
        ],
        "{err}"
    );
}

#[test]
fn seed_env_fallbacks() {
    let env = |name: &str| match name {
        "TARGET_URL" => Some("http://backend:9000".to_owned()),
        "SERVICE_NAME" => Some("frontend".to_owned()),
        "RUST_LOG" => Some("debug".to_owned()),
        _ => None,
    };
    let s = Settings::from_args(&defaults(), &env).unwrap();
    assert_eq!(
        s.proxy.target.as_ref().map(Target::as_str),
        Some("http://backend:9000")
    );
    assert_eq!(s.proxy.service_name.as_deref(), Some("frontend"));
    assert_eq!(s.log_filter, "debug");
}

/// The message users read when several keys are wrong: all of them, at once.
#[test]
fn every_bad_key_is_reported() {
    let a = RunArgs {
        outbound: Some("127.0.0.1:15001,localhost".into()),
        inbound: Some("0.0.0.0:99999".into()),
        target: Some("https://backend".into()),
        connect_timeout: Some("1".into()),
        request_timeout: Some("0s".into()),
        workers: "zero".into(),
        log_format: "xml".into(),
        ..defaults()
    };
    let env = |name: &str| (name == "SIDECAR_LOG").then(|| "sidecar=loud".to_owned());
    let err = Settings::from_args(&a, &env).unwrap_err();
    let expected = "\
sidecar run: invalid configuration:
  --outbound / SIDECAR_OUTBOUND = \"127.0.0.1:15001,localhost\": \"localhost\" is not an address; use IP:PORT or [IPv6]:PORT, e.g. 127.0.0.1:15001
  --inbound / SIDECAR_INBOUND = \"0.0.0.0:99999\": \"0.0.0.0:99999\" is not an address; use IP:PORT or [IPv6]:PORT, e.g. 127.0.0.1:15001
  --target / SIDECAR_TARGET = \"https://backend\": https targets are not supported (the proxy speaks plain HTTP to its target; TLS origination is out of scope): use http://
  --connect-timeout / SIDECAR_CONNECT_TIMEOUT = \"1\": missing unit; expected a whole number with a unit (ms, s, m, h), e.g. 1s or 500ms
  --request-timeout / SIDECAR_REQUEST_TIMEOUT = \"0s\": must be greater than zero
  --workers / SIDECAR_WORKERS = \"zero\": expected a whole number from 1 to 1024
  --log-format / SIDECAR_LOG_FORMAT = \"xml\": expected plain or json
";
    let text = err.to_string();
    assert!(text.starts_with(expected), "got:\n{text}");
    assert!(text.contains("SIDECAR_LOG = \"sidecar=loud\": not a log filter"));
    assert!(text.ends_with(
        "`sidecar run --help` lists every key; docs/operator-guide.md the config file's"
    ));
    assert_eq!(err.errors.len(), 8);
}

#[test]
fn target_urls() {
    assert!(Target::parse("http://127.0.0.1:8080").is_ok());
    assert!(Target::parse("http://svc").is_ok());
    assert!(Target::parse("ftp://svc").is_err());
    assert!(Target::parse("svc:8080").is_err());
    assert!(Target::parse("http://svc/?a=1").is_err());
}
