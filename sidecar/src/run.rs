//! `sidecar run`: configuration (flags and `SIDECAR_*` environment), logging, runtime, signals.
//!
//! | flag | environment | default | why |
//! |---|---|---|---|
//! | `--outbound` | `SIDECAR_OUTBOUND` | `127.0.0.1:15001,[::1]:15001` | where the eBPF connect hooks send captured connections; loopback only, never `0.0.0.0`. The default `[::1]` is skipped with a warning if IPv6 is off. |
//! | `--inbound` | `SIDECAR_INBOUND` | `0.0.0.0:15006,[::]:15006` | where sk_lookup steers connections to the app's captured ports; `none` turns inbound off. The default `[::]` is skipped with a warning if IPv6 is off. Not used with `--target`. |
//! | `--target` | `SIDECAR_TARGET`, `TARGET_URL` | none | reverse-proxy mode (no interception): every request goes to this `http://` URL |
//! | `--service-name` | `SIDECAR_SERVICE_NAME`, `SERVICE_NAME` | none | names this workload in logs (and metrics) |
//! | `--connect-timeout` | `SIDECAR_CONNECT_TIMEOUT` | `1s` | see [`crate::proxy::DEFAULT_CONNECT_TIMEOUT`] |
//! | `--request-timeout` | `SIDECAR_REQUEST_TIMEOUT` | `30s` | time to the response head, as in the seed proxy |
//! | `--detect-timeout` | `SIDECAR_DETECT_TIMEOUT` | `1s` | wait for the rest of a partial client preface; never applied while nobody has sent anything |
//! | `--pool-idle-timeout` | `SIDECAR_POOL_IDLE_TIMEOUT` | `30s` | see [`crate::proxy::DEFAULT_POOL_IDLE_TIMEOUT`] |
//! | `--workers` | `SIDECAR_WORKERS` | `1` | a sidecar should be small: 1 = single-threaded runtime |
//! | `--drain-timeout` | `SIDECAR_DRAIN_TIMEOUT` | `30s` | SIGTERM grace for in-flight connections (Kubernetes' default grace period) |
//! | `--log-format` | `SIDECAR_LOG_FORMAT` | `plain` | `plain` or `json` |
//! | | `SIDECAR_LOG`, else `RUST_LOG` | `info` | tracing-subscriber filter |
//!
//! Signals: SIGTERM / SIGINT stop accepting, let in-flight connections finish (up to the drain
//! timeout), exit 0. Bad configuration: every bad key is reported at once, exit 64.
use std::fmt;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::proxy::{self, ListenAddr, ProxyConfig, Target};

/// Default listeners: the addresses the eBPF programs redirect to (IPv4 and IPv6).
pub const DEFAULT_OUTBOUND: &str = "127.0.0.1:15001,[::1]:15001";
/// Inbound listeners: any address, because sk_lookup hands over SYNs for the pod's addresses
/// (Istio's 15006). Only steered connections arrive: nothing else dials this port.
pub const DEFAULT_INBOUND: &str = "0.0.0.0:15006,[::]:15006";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `sidecar run`. Values are parsed and checked by [`Settings::from_args`] rather
/// than by clap, so that every bad key is reported at once with exit code 64.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// Listen addresses for redirected outbound connections, comma-separated
    /// [default: 127.0.0.1:15001,[::1]:15001]
    #[arg(long, env = "SIDECAR_OUTBOUND", value_name = "ADDR[,ADDR...]")]
    pub outbound: Option<String>,

    /// Listen addresses for captured inbound connections, comma-separated, or `none`
    /// [default: 0.0.0.0:15006,[::]:15006]
    #[arg(long, env = "SIDECAR_INBOUND", value_name = "ADDR[,ADDR...]|none")]
    pub inbound: Option<String>,

    /// Reverse-proxy mode: send every request to this http:// URL instead of the original
    /// destination (also read from TARGET_URL)
    #[arg(long, env = "SIDECAR_TARGET", value_name = "URL")]
    pub target: Option<String>,

    /// Name of the service this sidecar belongs to (also read from SERVICE_NAME)
    #[arg(long, env = "SIDECAR_SERVICE_NAME", value_name = "NAME")]
    pub service_name: Option<String>,

    /// Upstream connect timeout
    #[arg(
        long,
        env = "SIDECAR_CONNECT_TIMEOUT",
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub connect_timeout: String,

    /// Time allowed until the upstream's response head
    #[arg(
        long,
        env = "SIDECAR_REQUEST_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub request_timeout: String,

    /// How long a partial client preface may take to become recognisable (no timeout applies
    /// while neither side has sent anything)
    #[arg(
        long,
        env = "SIDECAR_DETECT_TIMEOUT",
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub detect_timeout: String,

    /// Idle upstream connections are closed after this
    #[arg(
        long,
        env = "SIDECAR_POOL_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub pool_idle_timeout: String,

    /// Runtime worker threads (1: single-threaded)
    #[arg(long, env = "SIDECAR_WORKERS", value_name = "N", default_value = "1")]
    pub workers: String,

    /// On SIGTERM/SIGINT, how long in-flight connections may take to finish
    #[arg(
        long,
        env = "SIDECAR_DRAIN_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub drain_timeout: String,

    /// Log format: plain or json (level from SIDECAR_LOG or RUST_LOG, default info)
    #[arg(
        long,
        env = "SIDECAR_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "plain"
    )]
    pub log_format: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Validated `sidecar run` settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub proxy: ProxyConfig,
    pub workers: usize,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    pub log_filter: String,
}

/// One bad configuration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: &'static str,
    pub value: String,
    pub problem: String,
}

/// Every bad key, for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "sidecar run: invalid configuration:")?;
        for e in &self.0 {
            writeln!(f, "  {} = {:?}: {}", e.key, e.value, e.problem)?;
        }
        write!(
            f,
            "fix the values above (flags or environment variables) and start again; \
             `sidecar run --help` lists every key"
        )
    }
}

impl std::error::Error for ConfigErrors {}

impl Settings {
    /// Checks every value; `env` reads the fallback variables (`TARGET_URL`, `SERVICE_NAME`,
    /// `SIDECAR_LOG`, `RUST_LOG`) so tests need not touch the process environment.
    pub fn from_args(
        args: &RunArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigErrors> {
        let mut errors = Vec::new();
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());

        let mut listeners = |key: &'static str, value: Option<&String>, default: &str| {
            let Some(value) = value else {
                // IPv6 may be disabled in the pod: only the default IPv6 address may be missing.
                return parse_addrs(default)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|addr| ListenAddr {
                        addr,
                        required: addr.is_ipv4(),
                    })
                    .collect();
            };
            match parse_addrs(value) {
                Ok(addrs) => addrs
                    .into_iter()
                    .map(|addr| ListenAddr {
                        addr,
                        required: true,
                    })
                    .collect(),
                Err(problem) => {
                    errors.push(ConfigError {
                        key,
                        value: value.clone(),
                        problem,
                    });
                    Vec::new()
                }
            }
        };
        let listen = listeners(
            "--outbound / SIDECAR_OUTBOUND",
            args.outbound.as_ref(),
            DEFAULT_OUTBOUND,
        );
        let inbound = match args.inbound.as_deref().map(str::trim) {
            Some(off) if off.eq_ignore_ascii_case("none") => Vec::new(),
            _ => listeners(
                "--inbound / SIDECAR_INBOUND",
                args.inbound.as_ref(),
                DEFAULT_INBOUND,
            ),
        };

        let (target_key, target_value) = match &args.target {
            Some(t) => ("--target / SIDECAR_TARGET", Some(t.clone())),
            None => ("TARGET_URL", env("TARGET_URL")),
        };
        let target = target_value.and_then(|value| match Target::parse(value.trim()) {
            Ok(t) => Some(t),
            Err(problem) => {
                errors.push(ConfigError {
                    key: target_key,
                    value,
                    problem,
                });
                None
            }
        });

        let service_name = args
            .service_name
            .clone()
            .or_else(|| env("SERVICE_NAME"))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());

        let mut duration =
            |key: &'static str, value: &str, allow_zero: bool| match parse_duration(value) {
                Ok(d) if d.is_zero() && !allow_zero => {
                    errors.push(ConfigError {
                        key,
                        value: value.to_owned(),
                        problem: "must be greater than zero".to_owned(),
                    });
                    None
                }
                Ok(d) => Some(d),
                Err(problem) => {
                    errors.push(ConfigError {
                        key,
                        value: value.to_owned(),
                        problem,
                    });
                    None
                }
            };
        let connect_timeout = duration(
            "--connect-timeout / SIDECAR_CONNECT_TIMEOUT",
            &args.connect_timeout,
            false,
        );
        let request_timeout = duration(
            "--request-timeout / SIDECAR_REQUEST_TIMEOUT",
            &args.request_timeout,
            false,
        );
        let detect_timeout = duration(
            "--detect-timeout / SIDECAR_DETECT_TIMEOUT",
            &args.detect_timeout,
            false,
        );
        let pool_idle_timeout = duration(
            "--pool-idle-timeout / SIDECAR_POOL_IDLE_TIMEOUT",
            &args.pool_idle_timeout,
            false,
        );
        let drain_timeout = duration(
            "--drain-timeout / SIDECAR_DRAIN_TIMEOUT",
            &args.drain_timeout,
            true,
        );

        let workers = match args.workers.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Some(n),
            _ => {
                errors.push(ConfigError {
                    key: "--workers / SIDECAR_WORKERS",
                    value: args.workers.clone(),
                    problem: "expected a whole number from 1 to 1024".to_owned(),
                });
                None
            }
        };

        let log_format = match args.log_format.trim().to_ascii_lowercase().as_str() {
            "plain" | "text" => Some(LogFormat::Plain),
            "json" => Some(LogFormat::Json),
            _ => {
                errors.push(ConfigError {
                    key: "--log-format / SIDECAR_LOG_FORMAT",
                    value: args.log_format.clone(),
                    problem: "expected plain or json".to_owned(),
                });
                None
            }
        };

        let (filter_key, log_filter) = match env("SIDECAR_LOG") {
            Some(f) => ("SIDECAR_LOG", f),
            None => match env("RUST_LOG") {
                Some(f) => ("RUST_LOG", f),
                None => ("SIDECAR_LOG", "info".to_owned()),
            },
        };
        if let Err(e) = EnvFilter::try_new(&log_filter) {
            errors.push(ConfigError {
                key: filter_key,
                value: log_filter.clone(),
                problem: format!("not a log filter ({e}); try info, debug or sidecar=debug,info"),
            });
        }

        match (
            connect_timeout,
            request_timeout,
            detect_timeout,
            pool_idle_timeout,
            drain_timeout,
            workers,
            log_format,
        ) {
            (
                Some(connect_timeout),
                Some(request_timeout),
                Some(detect_timeout),
                Some(pool_idle_timeout),
                Some(drain_timeout),
                Some(workers),
                Some(log_format),
            ) if errors.is_empty() => Ok(Settings {
                proxy: ProxyConfig {
                    listen,
                    inbound,
                    target,
                    service_name,
                    connect_timeout,
                    request_timeout,
                    detect_timeout,
                    pool_idle_timeout,
                },
                workers,
                drain_timeout,
                log_format,
                log_filter,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// `ADDR[,ADDR...]`, each `IPv4:PORT` or `[IPv6]:PORT`.
fn parse_addrs(value: &str) -> Result<Vec<SocketAddr>, String> {
    let mut addrs = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr: SocketAddr = item.parse().map_err(|_| {
            format!("{item:?} is not an address; use IP:PORT or [IPv6]:PORT, e.g. 127.0.0.1:15001")
        })?;
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err("no address given; e.g. 127.0.0.1:15001".to_owned());
    }
    Ok(addrs)
}

/// A duration with a unit: `500ms`, `1s`, `2m`, `1h` (also `1500us`, `0s`).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    let hint = "expected a whole number with a unit (ms, s, m, h), e.g. 1s or 500ms";
    let number: u64 = number.parse().map_err(|_| hint.to_owned())?;
    let too_long = || "too long".to_owned();
    match unit.trim() {
        "us" | "µs" => Ok(Duration::from_micros(number)),
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => number
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(too_long),
        "h" => number
            .checked_mul(3600)
            .map(Duration::from_secs)
            .ok_or_else(too_long),
        "" => Err(format!("missing unit; {hint}")),
        _ => Err(hint.to_owned()),
    }
}

fn init_logging(settings: &Settings) {
    // Validated in `Settings::from_args`; the fallback only guards against a race on the env.
    let filter =
        EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Container log collectors store escape codes verbatim: colour only on a terminal.
        .with_ansi(std::io::stderr().is_terminal());
    // `try_init` fails only if a subscriber is already installed (embedding): keep that one.
    let _ = match settings.log_format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// `sidecar run`.
pub fn main(args: RunArgs) -> ExitCode {
    let settings = match Settings::from_args(&args, &|name| std::env::var(name).ok()) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    init_logging(&settings);
    let runtime = if settings.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.workers)
            .thread_name("sidecar-worker")
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(settings));
    // Connections still running after the drain deadline are dropped here, without waiting.
    runtime.shutdown_background();
    code
}

async fn run(settings: Settings) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};

    // Register before listening so a signal right after start-up is not lost.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let mode = match &settings.proxy.target {
        Some(t) => format!("target {}", t.as_str()),
        None => "intercept".to_owned(),
    };
    let service = settings
        .proxy
        .service_name
        .clone()
        .unwrap_or_else(|| "-".to_owned());
    let proxy = match proxy::start(settings.proxy, proxy::original_dst_resolver()).await {
        Ok(p) => p,
        Err(e) => {
            error!(error = %e, "cannot start the proxy");
            return ExitCode::FAILURE;
        }
    };
    let list = |addrs: &[SocketAddr]| {
        if addrs.is_empty() {
            "-".to_owned()
        } else {
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    info!(
        addresses = %list(proxy.local_addrs()),
        inbound = %list(proxy.inbound_addrs()),
        %mode,
        %service,
        workers = settings.workers,
        "listening"
    );

    let signal_name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = signal_name, drain_timeout = ?settings.drain_timeout, "stopping: no new connections, draining");
    if proxy.shutdown(settings.drain_timeout).await {
        info!("drained; exiting");
    } else {
        warn!("drain timeout reached; closing remaining connections");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
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
        assert_eq!(s.proxy.connect_timeout, Duration::from_secs(1));
        assert_eq!(s.proxy.request_timeout, Duration::from_secs(30));
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
            outbound: None,
            inbound: None,
            target: None,
            service_name: None,
            connect_timeout: "1s".into(),
            request_timeout: "30s".into(),
            detect_timeout: "1s".into(),
            pool_idle_timeout: "30s".into(),
            workers: "1".into(),
            drain_timeout: "30s".into(),
            log_format: "plain".into(),
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
        assert_eq!(s.proxy.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.workers, 2);
        assert_eq!(s.log_format, LogFormat::Json);
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
            connect_timeout: "1".into(),
            request_timeout: "0s".into(),
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
        assert!(text.ends_with("`sidecar run --help` lists every key"));
        assert_eq!(err.0.len(), 8);
    }

    #[test]
    fn target_urls() {
        assert!(Target::parse("http://127.0.0.1:8080").is_ok());
        assert!(Target::parse("http://svc").is_ok());
        assert!(Target::parse("ftp://svc").is_err());
        assert!(Target::parse("svc:8080").is_err());
        assert!(Target::parse("http://svc/?a=1").is_err());
    }
}
