//! `sidecar run`: configuration (flags and `SIDECAR_*` environment), logging, runtime, signals.
//!
//! | flag | environment | default | why |
//! |---|---|---|---|
//! | `--outbound` | `SIDECAR_OUTBOUND` | `127.0.0.1:15001,[::1]:15001` | where the eBPF connect hooks send captured connections; loopback only, never `0.0.0.0`. The default `[::1]` is skipped with a warning if IPv6 is off. |
//! | `--inbound` | `SIDECAR_INBOUND` | `0.0.0.0:15006,[::]:15006` | where sk_lookup steers connections to the app's captured ports; `none` turns inbound off. The default `[::]` is skipped with a warning if IPv6 is off. Not used with `--target`. |
//! | `--target` | `SIDECAR_TARGET`, `TARGET_URL` | none | reverse-proxy mode (no interception): every request goes to this `http://` URL |
//! | `--service-name` | `SIDECAR_SERVICE_NAME`, `SERVICE_NAME` | none | names this workload in logs (and metrics) |
//! | `--config` | `SIDECAR_CONFIG` | none | policy file (TOML): `[defaults]` and per-destination `[[destination]]` timeouts, breaker and retries; format in [`crate::policy::config_file`]. Its `[defaults]` yield to the flags below when those are set |
//! | `--connect-timeout` | `SIDECAR_CONNECT_TIMEOUT` | `1s` | see [`crate::proxy::DEFAULT_CONNECT_TIMEOUT`]; a timeout answers 504 |
//! | `--request-timeout` | `SIDECAR_REQUEST_TIMEOUT` | `30s` | request head to response head, retries included, as in the seed proxy; answers 504 |
//! | `--idle-timeout` | `SIDECAR_IDLE_TIMEOUT` | `1h` | opaque TCP and upgraded (WebSocket) connections with no bytes either way are closed (see [`crate::policy::DEFAULT_IDLE_TIMEOUT`]) |
//! | `--breaker-consecutive-failures` | `SIDECAR_BREAKER_CONSECUTIVE_FAILURES` | `5` | failures in a row that open a destination's circuit breaker (the seed's 5); `0` turns it off |
//! | `--breaker-failure-rate` | `SIDECAR_BREAKER_FAILURE_RATE` | `off` | also open on this failure rate (`0.5`, `50%`) over 10 s with at least 20 requests |
//! | `--breaker-open-time` | `SIDECAR_BREAKER_OPEN_TIME` | `10s` | how long an open breaker answers 503 before it lets a probe through (the seed's 10 s); doubles on each re-trip up to 5 min |
//! | `--max-retries` | `SIDECAR_MAX_RETRIES` | `2` | retries of idempotent requests on connect failure, reset or 503; `0` turns retries off |
//! | `--retry-budget-ratio` | `SIDECAR_RETRY_BUDGET_RATIO` | `0.2` | retries may add at most this fraction of requests per destination (linkerd's budget) |
//! | `--retry-budget-min-per-second` | `SIDECAR_RETRY_BUDGET_MIN_PER_SECOND` | `10` | retries always allowed per second, so quiet destinations can retry |
//! | `--detect-timeout` | `SIDECAR_DETECT_TIMEOUT` | `1s` | wait for the rest of a partial client preface; never applied while nobody has sent anything |
//! | `--pool-idle-timeout` | `SIDECAR_POOL_IDLE_TIMEOUT` | `30s` | see [`crate::proxy::DEFAULT_POOL_IDLE_TIMEOUT`] |
//! | `--max-connections-per-destination` | `SIDECAR_MAX_CONNECTIONS_PER_DESTINATION` | `128` | upstream HTTP/1 connections per destination and direction; past it requests queue (within the request timeout) for the next free connection: bounds the upstream's sockets and the proxy's memory (see [`crate::proxy::DEFAULT_MAX_CONNECTIONS_PER_DESTINATION`]); per destination: `max_connections` in the config file |
//! | `--workers` | `SIDECAR_WORKERS` | `1` | a sidecar should be small: 1 = single-threaded runtime |
//! | `--drain-timeout` | `SIDECAR_DRAIN_TIMEOUT` | `30s` | bound on the whole drain (Kubernetes' default grace period) |
//! | `--drain-min` | `SIDECAR_DRAIN_MIN` | `0s` | outbound stays open at least this long after the drain starts; `0s` suits native sidecars (the app has exited before the proxy gets SIGTERM); classic sidecars, whose app gets SIGTERM at the same time, want a few seconds (Istio uses 5 s) |
//! | `--admin` | `SIDECAR_ADMIN` | `0.0.0.0:15090,[::]:15090` | admin listeners: `/live`, `/ready`, `/metrics`, `/config`, `POST /shutdown` (see [`crate::admin`]); `none` turns them off. Never captured by the kernel programs (`sidecar init --admin-port`). The default `[::]` is skipped with a warning if IPv6 is off |
//! | `--app-probe` | `SIDECAR_APP_PROBE` | none | `/ready` also needs the app: `http://HOST:PORT/PATH` (200-399) or `tcp://HOST:PORT`; use a loopback address (a pod IP would go through inbound capture) |
//! | `--app-probe-interval` | `SIDECAR_APP_PROBE_INTERVAL` | `1s` | how often the app probe and the interception check run |
//! | `--pin-dir` | `SIDECAR_PIN_DIR` | none | this pod's pin directory (`<pin root>/<pod id>`): `/ready` also needs the interception (the link pins present), and the kernel counters are exported when the stats map pin is readable. Without it neither is checked (`/config` says so) |
//! | `--exit-with-app` | `SIDECAR_EXIT_WITH_APP` | none | drain and exit when this process exits: a PID, or an absolute path to a pidfile (waited for). Needs a shared PID namespace in Kubernetes (`shareProcessNamespace: true`); also makes the drain wait for the app |
//! | `--shutdown-file` | `SIDECAR_SHUTDOWN_FILE` | none | drain and exit when this file appears (a Job's app `touch`es it in a shared `emptyDir` as its last step) |
//! | `--access-log` | `SIDECAR_ACCESS_LOG` | off | one line per request under the tracing target `access`: direction, method, authority, path, status, duration, upstream, peer, error reason |
//! | `--max-destinations` | `SIDECAR_MAX_DESTINATIONS` | `100` | distinct `destination` label values in metrics; later ones are `other` |
//! | `--log-format` | `SIDECAR_LOG_FORMAT` | `plain` | `plain` or `json` |
//! | | `SIDECAR_LOG`, else `RUST_LOG` | `info` | tracing-subscriber filter |
//!
//! Signals and other triggers:
//!
//! | trigger | behaviour |
//! |---|---|
//! | SIGTERM, SIGINT, `POST /shutdown` (loopback), `--exit-with-app` process exits, `--shutdown-file` appears | drain (see [`crate::lifecycle`]): `/ready` turns 503, inbound stops accepting (already queued connections are served) and finishes in-flight requests, outbound keeps working until inbound is done, `--drain-min` has passed and the app has no outbound connection open; then exit 0 |
//! | `--drain-timeout` passes during the drain | what is still open is closed; exit 0 |
//! | a second SIGTERM or SIGINT during the drain | exit 0 at once, closing everything |
//!
//! Bad configuration: every bad key is reported at once, exit 64.
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

pub use crate::cli::LogFormat;
use crate::lifecycle::{self, AppProbe, AppTarget, DrainOutcome, DrainPlan, Readiness, Trigger};
use crate::metrics::ProxyMetrics;
use crate::policy::config_file::Flag;
use crate::policy::PolicyConfig;
use crate::proxy::{self, ListenAddr, ProxyConfig, Target};
use crate::units::{fmt_duration, parse_addrs, parse_duration};

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

    /// Policy file (TOML): [defaults] and per-destination [[destination]] overrides of
    /// timeouts, circuit breaker and retries
    #[arg(long, env = "SIDECAR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Upstream connect timeout [default: 1s]
    #[arg(long, env = "SIDECAR_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,

    /// Time allowed until the upstream's response head, retries included [default: 30s]
    #[arg(long, env = "SIDECAR_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<String>,

    /// Opaque TCP and upgraded (WebSocket) connections idle this long are closed [default: 1h]
    #[arg(long, env = "SIDECAR_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<String>,

    /// Failures in a row that open a destination's circuit breaker; 0: never [default: 5]
    #[arg(long, env = "SIDECAR_BREAKER_CONSECUTIVE_FAILURES", value_name = "N")]
    pub breaker_consecutive_failures: Option<String>,

    /// Failure rate (0-1, or N%) over the breaker window that opens it, or off [default: off]
    #[arg(long, env = "SIDECAR_BREAKER_FAILURE_RATE", value_name = "RATE|off")]
    pub breaker_failure_rate: Option<String>,

    /// How long an open circuit breaker answers 503 before probing [default: 10s]
    #[arg(long, env = "SIDECAR_BREAKER_OPEN_TIME", value_name = "DURATION")]
    pub breaker_open_time: Option<String>,

    /// Retries per idempotent request; 0: none [default: 2]
    #[arg(long, env = "SIDECAR_MAX_RETRIES", value_name = "N")]
    pub max_retries: Option<String>,

    /// Retries allowed as a fraction of requests (0-1, or N%) [default: 0.2]
    #[arg(long, env = "SIDECAR_RETRY_BUDGET_RATIO", value_name = "RATIO")]
    pub retry_budget_ratio: Option<String>,

    /// Retries always allowed per second, whatever the traffic [default: 10]
    #[arg(long, env = "SIDECAR_RETRY_BUDGET_MIN_PER_SECOND", value_name = "N")]
    pub retry_budget_min_per_second: Option<String>,

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

    /// Upstream HTTP/1 connections per destination; further requests queue for one [default: 128]
    #[arg(
        long,
        env = "SIDECAR_MAX_CONNECTIONS_PER_DESTINATION",
        value_name = "N"
    )]
    pub max_connections_per_destination: Option<String>,

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

    /// Outbound stays open at least this long once a drain starts (for apps stopped at the same
    /// time that still call out)
    #[arg(
        long,
        env = "SIDECAR_DRAIN_MIN",
        value_name = "DURATION",
        default_value = "0s"
    )]
    pub drain_min: String,

    /// Admin listeners (/live /ready /metrics /config, POST /shutdown), comma-separated, or
    /// `none`
    #[arg(
        long,
        env = "SIDECAR_ADMIN",
        value_name = "ADDR[,ADDR...]|none",
        default_value = crate::admin::DEFAULT_ADMIN
    )]
    pub admin: String,

    /// /ready also requires the app: http://HOST:PORT/PATH (200-399) or tcp://HOST:PORT
    #[arg(long, env = "SIDECAR_APP_PROBE", value_name = "URL")]
    pub app_probe: Option<String>,

    /// How often the app probe and the interception check run
    #[arg(
        long,
        env = "SIDECAR_APP_PROBE_INTERVAL",
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub app_probe_interval: String,

    /// This pod's pin directory (<pin root>/<pod id>): /ready requires the interception there,
    /// and its kernel counters are exported
    #[arg(long, env = "SIDECAR_PIN_DIR", value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,

    /// Drain and exit when this process exits: a PID, or an absolute path to a pidfile
    #[arg(long, env = "SIDECAR_EXIT_WITH_APP", value_name = "PID|PIDFILE")]
    pub exit_with_app: Option<String>,

    /// Drain and exit when this file appears
    #[arg(long, env = "SIDECAR_SHUTDOWN_FILE", value_name = "PATH")]
    pub shutdown_file: Option<PathBuf>,

    /// Log one line per request (tracing target `access`)
    #[arg(long, env = "SIDECAR_ACCESS_LOG")]
    pub access_log: bool,

    /// Distinct destinations labelled in metrics before the rest become `other`
    #[arg(
        long,
        env = "SIDECAR_MAX_DESTINATIONS",
        value_name = "N",
        default_value = "100"
    )]
    pub max_destinations: String,

    /// The log forwarder, run inside the proxy when `--logs-file` / `SIDECAR_LOGS_FILE` is set
    /// (same keys as `sidecar logs`, prefixed `--logs-`).
    #[command(flatten)]
    pub logs: crate::logs::LogsConfig,
}

/// Admin, readiness, drain and telemetry settings (see the table at the top).
#[derive(Debug, Clone)]
pub struct LifecycleSettings {
    /// Empty: no admin listener.
    pub admin: Vec<ListenAddr>,
    pub app_probe: Option<AppProbe>,
    pub probe_interval: Duration,
    pub pin_dir: Option<PathBuf>,
    pub drain_min: Duration,
    pub exit_with_app: Option<AppTarget>,
    pub shutdown_file: Option<PathBuf>,
    pub access_log: bool,
    pub max_destinations: usize,
}

impl LifecycleSettings {
    /// Parses the lifecycle keys, adding what is wrong to `errors`.
    fn from_args(args: &RunArgs, errors: &mut Vec<ConfigError>) -> Option<LifecycleSettings> {
        let mut bad = |key: &'static str, value: &str, problem: String| {
            errors.push(ConfigError {
                key: key.into(),
                value: value.to_owned(),
                problem,
            });
        };
        let admin = match args.admin.trim() {
            off if off.eq_ignore_ascii_case("none") => Some(Vec::new()),
            value => match parse_addrs(value) {
                Ok(addrs) => {
                    // As for the other listeners: only the default's IPv6 address may be missing.
                    let default = value == crate::admin::DEFAULT_ADMIN;
                    Some(
                        addrs
                            .into_iter()
                            .map(|addr| ListenAddr {
                                addr,
                                required: !default || addr.is_ipv4(),
                            })
                            .collect(),
                    )
                }
                Err(problem) => {
                    bad(
                        "--admin / SIDECAR_ADMIN",
                        &args.admin,
                        format!("{problem}, or none"),
                    );
                    None
                }
            },
        };
        let app_probe = match &args.app_probe {
            None => Some(None),
            Some(v) if v.trim().is_empty() => Some(None),
            Some(v) => match AppProbe::parse(v) {
                Ok(p) => Some(Some(p)),
                Err(problem) => {
                    bad("--app-probe / SIDECAR_APP_PROBE", v, problem);
                    None
                }
            },
        };
        let probe_interval = match parse_duration(&args.app_probe_interval) {
            Ok(d) if d >= Duration::from_millis(10) => Some(d),
            Ok(_) => {
                bad(
                    "--app-probe-interval / SIDECAR_APP_PROBE_INTERVAL",
                    &args.app_probe_interval,
                    "must be at least 10ms".to_owned(),
                );
                None
            }
            Err(problem) => {
                bad(
                    "--app-probe-interval / SIDECAR_APP_PROBE_INTERVAL",
                    &args.app_probe_interval,
                    problem,
                );
                None
            }
        };
        let drain_min = match parse_duration(&args.drain_min) {
            Ok(d) => Some(d),
            Err(problem) => {
                bad("--drain-min / SIDECAR_DRAIN_MIN", &args.drain_min, problem);
                None
            }
        };
        let pin_dir = args.pin_dir.clone().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = &pin_dir {
            if !dir.is_absolute() {
                bad(
                    "--pin-dir / SIDECAR_PIN_DIR",
                    &dir.display().to_string(),
                    "expected an absolute path, e.g. /sys/fs/bpf/sidecar/<pod id>".to_owned(),
                );
            }
        }
        let exit_with_app = match &args.exit_with_app {
            None => Some(None),
            Some(v) if v.trim().is_empty() => Some(None),
            Some(v) => match AppTarget::parse(v) {
                Ok(t) => Some(Some(t)),
                Err(problem) => {
                    bad("--exit-with-app / SIDECAR_EXIT_WITH_APP", v, problem);
                    None
                }
            },
        };
        let shutdown_file = args
            .shutdown_file
            .clone()
            .filter(|p| !p.as_os_str().is_empty());
        if let Some(path) = &shutdown_file {
            if !path.is_absolute() {
                bad(
                    "--shutdown-file / SIDECAR_SHUTDOWN_FILE",
                    &path.display().to_string(),
                    "expected an absolute path".to_owned(),
                );
            }
        }
        let max_destinations = match args.max_destinations.trim().parse::<usize>() {
            Ok(n) if (1..=100_000).contains(&n) => Some(n),
            _ => {
                bad(
                    "--max-destinations / SIDECAR_MAX_DESTINATIONS",
                    &args.max_destinations,
                    "expected a whole number from 1 to 100000".to_owned(),
                );
                None
            }
        };
        Some(LifecycleSettings {
            admin: admin?,
            app_probe: app_probe?,
            probe_interval: probe_interval?,
            pin_dir,
            drain_min: drain_min?,
            exit_with_app: exit_with_app?,
            shutdown_file,
            access_log: args.access_log,
            max_destinations: max_destinations?,
        })
    }
}

/// Validated `sidecar run` settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub proxy: ProxyConfig,
    pub workers: usize,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub lifecycle: LifecycleSettings,
    /// The log forwarder's settings, when it is on.
    pub logs: Option<crate::logs::Settings>,
}

pub use crate::config_errors::{ConfigError, ConfigErrors};

impl Settings {
    /// Checks every value; `env` reads the fallback variables (`TARGET_URL`, `SERVICE_NAME`,
    /// `SIDECAR_LOG`, `RUST_LOG`) so tests need not touch the process environment.
    pub fn from_args(
        args: &RunArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigErrors> {
        let mut errors = Vec::new();
        let logs = match args.logs.settings("logs-", env) {
            Ok(Some(logs)) => Some(logs),
            Ok(None) => None,
            Err(e) => {
                errors.extend(e.errors);
                None
            }
        };
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
                        key: key.into(),
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
                    key: target_key.into(),
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

        let policy = policy_config(args, &mut errors);
        let mut duration =
            |key: &'static str, value: &str, allow_zero: bool| match parse_duration(value) {
                Ok(d) if d.is_zero() && !allow_zero => {
                    errors.push(ConfigError {
                        key: key.into(),
                        value: value.to_owned(),
                        problem: "must be greater than zero".to_owned(),
                    });
                    None
                }
                Ok(d) => Some(d),
                Err(problem) => {
                    errors.push(ConfigError {
                        key: key.into(),
                        value: value.to_owned(),
                        problem,
                    });
                    None
                }
            };
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
                    key: "--workers / SIDECAR_WORKERS".into(),
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
                    key: "--log-format / SIDECAR_LOG_FORMAT".into(),
                    value: args.log_format.clone(),
                    problem: "expected plain or json".to_owned(),
                });
                None
            }
        };

        let lifecycle = LifecycleSettings::from_args(args, &mut errors);

        let (filter_key, log_filter) = match env("SIDECAR_LOG") {
            Some(f) => ("SIDECAR_LOG", f),
            None => match env("RUST_LOG") {
                Some(f) => ("RUST_LOG", f),
                None => ("SIDECAR_LOG", "info".to_owned()),
            },
        };
        if let Err(e) = EnvFilter::try_new(&log_filter) {
            errors.push(ConfigError {
                key: filter_key.into(),
                value: log_filter.clone(),
                problem: format!("not a log filter ({e}); try info, debug or sidecar=debug,info"),
            });
        }

        match (
            policy,
            detect_timeout,
            pool_idle_timeout,
            drain_timeout,
            workers,
            log_format,
            lifecycle,
        ) {
            (
                Some(policy),
                Some(detect_timeout),
                Some(pool_idle_timeout),
                Some(drain_timeout),
                Some(workers),
                Some(log_format),
                Some(lifecycle),
            ) if errors.is_empty() => Ok(Settings {
                proxy: ProxyConfig {
                    listen,
                    inbound,
                    target,
                    service_name,
                    policy,
                    detect_timeout,
                    pool_idle_timeout,
                },
                workers,
                drain_timeout,
                log_format,
                log_filter,
                lifecycle,
                logs,
            }),
            _ => Err(ConfigErrors {
                command: "run",
                errors,
            }),
        }
    }
}

/// The policy flags (defaults of every destination) and the `--config` file, through
/// [`crate::policy::config_file`]; problems are added to `errors`.
fn policy_config(args: &RunArgs, errors: &mut Vec<ConfigError>) -> Option<PolicyConfig> {
    fn flag<'a>(path: &'static str, name: &'static str, value: &'a Option<String>) -> Flag<'a> {
        Flag {
            path,
            name,
            value: value.as_deref().filter(|v| !v.trim().is_empty()),
        }
    }
    let flags = [
        flag(
            "connect_timeout",
            "--connect-timeout / SIDECAR_CONNECT_TIMEOUT",
            &args.connect_timeout,
        ),
        flag(
            "request_timeout",
            "--request-timeout / SIDECAR_REQUEST_TIMEOUT",
            &args.request_timeout,
        ),
        flag(
            "idle_timeout",
            "--idle-timeout / SIDECAR_IDLE_TIMEOUT",
            &args.idle_timeout,
        ),
        flag(
            "max_connections",
            "--max-connections-per-destination / SIDECAR_MAX_CONNECTIONS_PER_DESTINATION",
            &args.max_connections_per_destination,
        ),
        flag(
            "breaker.consecutive_failures",
            "--breaker-consecutive-failures / SIDECAR_BREAKER_CONSECUTIVE_FAILURES",
            &args.breaker_consecutive_failures,
        ),
        flag(
            "breaker.failure_rate",
            "--breaker-failure-rate / SIDECAR_BREAKER_FAILURE_RATE",
            &args.breaker_failure_rate,
        ),
        flag(
            "breaker.open_time",
            "--breaker-open-time / SIDECAR_BREAKER_OPEN_TIME",
            &args.breaker_open_time,
        ),
        flag(
            "retry.max_retries",
            "--max-retries / SIDECAR_MAX_RETRIES",
            &args.max_retries,
        ),
        flag(
            "retry.budget_ratio",
            "--retry-budget-ratio / SIDECAR_RETRY_BUDGET_RATIO",
            &args.retry_budget_ratio,
        ),
        flag(
            "retry.budget_min_per_second",
            "--retry-budget-min-per-second / SIDECAR_RETRY_BUDGET_MIN_PER_SECOND",
            &args.retry_budget_min_per_second,
        ),
    ];
    let file = args.config.as_deref().filter(|p| !p.as_os_str().is_empty());
    match crate::policy::config_file::load(file, &flags) {
        Ok(config) => Some(config),
        Err(problems) => {
            errors.extend(problems.into_iter().map(|e| ConfigError {
                key: e.key.into(),
                value: e.value,
                problem: e.problem,
            }));
            None
        }
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
    let life = settings.lifecycle.clone();

    let registry = prometheus::default_registry().clone();
    let metrics = match ProxyMetrics::new(
        &registry,
        settings.proxy.service_name.as_deref().unwrap_or(""),
        life.max_destinations,
    ) {
        Ok(m) => m,
        Err(e) => {
            // Only possible when embedded twice in one process: count, export the first.
            warn!(error = %e, "proxy metrics already registered; these are not exported");
            ProxyMetrics::unregistered()
        }
    };
    match crate::metrics::process::ProcessCollector::new() {
        Ok(c) => crate::metrics::register(&registry, Box::new(c), "process"),
        Err(e) => warn!(error = %e, "process metrics unavailable"),
    }
    if let Some(dir) = &life.pin_dir {
        match crate::metrics::ebpf::EbpfCollector::new(dir) {
            Ok(c) => crate::metrics::register(&registry, Box::new(c), "ebpf"),
            Err(e) => warn!(error = %e, "kernel counter metrics unavailable"),
        }
    }
    let telemetry = proxy::Telemetry {
        metrics,
        access_log: life.access_log,
    };
    let readiness = Arc::new(Readiness::new(
        life.pin_dir.is_some(),
        life.app_probe.is_some(),
    ));

    let config_for_admin = settings.clone();
    // The log forwarder runs beside the proxy until the drain is over, then flushes what it has
    // read (bounded by its own --logs-shutdown-timeout).
    let logs_stop = tokio_util::sync::CancellationToken::new();
    let logs_task = settings.logs.clone().map(|logs| {
        let stop = logs_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::logs::forward(logs, stop).await {
                error!(error = %e, "log forwarder stopped");
            }
        })
    });
    let proxy =
        match proxy::start_observed(settings.proxy, proxy::Resolvers::kernel(), telemetry).await {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "cannot start the proxy");
                return ExitCode::FAILURE;
            }
        };
    readiness.set_listening();

    let (trigger_tx, mut trigger_rx) = tokio::sync::mpsc::unbounded_channel::<Trigger>();
    let background = tokio_util::sync::CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    let mut admin_addrs = Vec::new();
    let state = Arc::new(crate::admin::AdminState {
        readiness: Arc::clone(&readiness),
        registry: registry.clone(),
        config: config_json(&config_for_admin, &proxy).to_string(),
        shutdown: trigger_tx.clone(),
    });
    for l in &life.admin {
        let listener = match crate::net::bind(l.addr) {
            Ok(listener) => listener,
            Err(e) if !l.required => {
                warn!(addr = %l.addr, error = %e, "optional admin listener not bound (IPv6 disabled?); continuing without it");
                continue;
            }
            Err(e) => {
                error!(addr = %l.addr, error = %e, "cannot listen on the admin address (--admin)");
                return ExitCode::FAILURE;
            }
        };
        admin_addrs.push(l.addr);
        let state = Arc::clone(&state);
        tokio::spawn(crate::admin::serve(listener, state, background.clone()));
    }
    if admin_addrs.is_empty() {
        warn!("no admin listener (--admin none): no probes, metrics or /shutdown");
    }
    {
        let readiness = Arc::clone(&readiness);
        let (pin_dir, probe, interval) = (
            life.pin_dir.clone(),
            life.app_probe.clone(),
            life.probe_interval,
        );
        let stop = background.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = lifecycle::keep_checking(&readiness, pin_dir, probe, interval) => {}
            }
        });
    }
    // Set once the watched app has exited, or once it turns out it cannot be watched (then the
    // drain does not wait for it).
    let (app_done_tx, mut app_done_rx) = tokio::sync::watch::channel(false);
    let watching_app = life.exit_with_app.is_some();
    if let Some(target) = life.exit_with_app.clone() {
        let triggers = trigger_tx.clone();
        info!(app = %target, "will drain and exit when the app exits");
        tokio::spawn(async move {
            match lifecycle::watch_app(target, life.probe_interval).await {
                Ok(pid) => {
                    let _ = triggers.send(Trigger::AppExited(pid));
                }
                Err(e) => warn!(error = %e, "not watching the app (--exit-with-app)"),
            }
            let _ = app_done_tx.send(true);
        });
    }
    if let Some(path) = life.shutdown_file.clone() {
        let triggers = trigger_tx.clone();
        tokio::spawn(async move {
            let path = lifecycle::watch_shutdown_file(path, life.probe_interval).await;
            let _ = triggers.send(Trigger::ShutdownFile(path));
        });
    }
    drop(trigger_tx);

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
        admin = %list(&admin_addrs),
        %mode,
        %service,
        workers = settings.workers,
        "listening"
    );

    let trigger = tokio::select! {
        _ = term.recv() => Trigger::Signal("SIGTERM"),
        _ = int.recv() => Trigger::Signal("SIGINT"),
        Some(trigger) = trigger_rx.recv() => trigger,
    };
    info!(
        trigger = %trigger,
        drain_timeout = ?settings.drain_timeout,
        "draining: not ready, inbound closed, outbound open until the app is done"
    );
    let plan = DrainPlan {
        deadline: settings.drain_timeout,
        min: life.drain_min,
    };
    let app_done = async move {
        let _ = app_done_rx.wait_for(|done| *done).await;
    };
    let force = async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    };
    match lifecycle::drain(&proxy, &readiness, &plan, app_done, watching_app, force).await {
        DrainOutcome::Drained => info!("drained; exiting"),
        DrainOutcome::DeadlineReached { inbound, outbound } => warn!(
            inbound,
            outbound, "drain timeout reached; closing the connections still open"
        ),
        DrainOutcome::Forced(signal) => warn!(
            signal,
            inbound = proxy.active(crate::metrics::Dir::Inbound).get(),
            outbound = proxy.active(crate::metrics::Dir::Outbound).get(),
            "second signal: exiting at once, closing what is still open"
        ),
    }
    if let Some(task) = logs_task {
        logs_stop.cancel();
        let _ = task.await;
    }
    ExitCode::SUCCESS
}

/// The policies in force: defaults and the destination rules (of `--config`).
fn policy_json(settings: &Settings) -> serde_json::Value {
    let one = |p: &crate::policy::DestinationPolicy| {
        serde_json::json!({
            "connect_timeout": fmt_duration(p.connect_timeout),
            "request_timeout": fmt_duration(p.request_timeout),
            "idle_timeout": fmt_duration(p.idle_timeout),
            "max_connections": p.max_connections,
            "breaker": {
                "consecutive_failures": p.breaker.consecutive_failures,
                "failure_rate": p.breaker.failure_rate,
                "failure_rate_window": fmt_duration(p.breaker.failure_rate_window),
                "failure_rate_min_requests": p.breaker.failure_rate_min_requests,
                "open_time": fmt_duration(p.breaker.open_time),
                "max_open_time": fmt_duration(p.breaker.max_open_time),
                "half_open_probes": p.breaker.half_open_probes,
                "failure_on": p.failure_on.describe(),
            },
            "retry": {
                "max_retries": p.retry.max_retries,
                "on": p.retry.on.describe(),
                "budget_ratio": p.retry.budget.ratio,
                "budget_min_per_second": p.retry.budget.min_per_second,
                "budget_window": fmt_duration(p.retry.budget.window),
                "max_body_bytes": p.retry.max_body_bytes,
                "backoff": fmt_duration(p.retry.backoff),
            },
        })
    };
    let policy = &settings.proxy.policy;
    let destinations: Vec<_> = policy
        .destinations
        .iter()
        .map(|rule| {
            let mut v = one(&rule.policy);
            v["match"] = serde_json::Value::String(rule.matcher.to_string());
            v
        })
        .collect();
    serde_json::json!({ "defaults": one(&policy.defaults), "destinations": destinations })
}

/// `/config`: the configuration in force, as bound (listener ports resolved).
pub fn config_json(settings: &Settings, proxy: &proxy::Proxy) -> serde_json::Value {
    let p = &settings.proxy;
    let life = &settings.lifecycle;
    let addrs = |a: &[SocketAddr]| a.iter().map(ToString::to_string).collect::<Vec<_>>();
    serde_json::json!({
        "mode": if p.target.is_some() { "target" } else { "intercept" },
        "outbound": addrs(proxy.local_addrs()),
        "inbound": addrs(proxy.inbound_addrs()),
        "target": p.target.as_ref().map(Target::as_str),
        "service_name": p.service_name,
        "connect_timeout": fmt_duration(p.policy.defaults.connect_timeout),
        "request_timeout": fmt_duration(p.policy.defaults.request_timeout),
        "policy": policy_json(settings),
        "detect_timeout": fmt_duration(p.detect_timeout),
        "pool_idle_timeout": fmt_duration(p.pool_idle_timeout),
        "workers": settings.workers,
        "drain_timeout": fmt_duration(settings.drain_timeout),
        "drain_min": fmt_duration(life.drain_min),
        "admin": life.admin.iter().map(|l| l.addr.to_string()).collect::<Vec<_>>(),
        "readiness": {
            "listeners": "required",
            "interception": match &life.pin_dir {
                Some(dir) => format!("required: link pins in {}", dir.display()),
                None => "not checked (no --pin-dir)".to_owned(),
            },
            "app": match &life.app_probe {
                Some(probe) => format!("required: {probe}"),
                None => "not checked (no --app-probe)".to_owned(),
            },
            "interval": fmt_duration(life.probe_interval),
        },
        "ebpf_counters": match &life.pin_dir {
            Some(dir) => format!("exported when readable: {}/map_{}", dir.display(), sidecar_common::maps::STATS),
            None => "not exported (no --pin-dir)".to_owned(),
        },
        "exit_with_app": life.exit_with_app.as_ref().map(ToString::to_string),
        "shutdown_file": life.shutdown_file.as_ref().map(|p| p.display().to_string()),
        "access_log": life.access_log,
        "max_destinations": life.max_destinations,
        "logs": settings.logs.as_ref().map(|l| serde_json::json!({
            "file": l.file.display().to_string(),
            "endpoint": l.endpoint.to_string(),
            "service": l.service,
            "checkpoint": l.checkpoint.display().to_string(),
        })),
        "log_format": match settings.log_format {
            LogFormat::Plain => "plain",
            LogFormat::Json => "json",
        },
        "log_filter": settings.log_filter,
    })
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
        assert_eq!(
            s.proxy.policy.defaults.connect_timeout,
            Duration::from_secs(1)
        );
        assert_eq!(
            s.proxy.policy.defaults.request_timeout,
            Duration::from_secs(30)
        );
        assert_eq!(s.proxy.policy, crate::policy::PolicyConfig::default());
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
        assert!(text.ends_with("`sidecar run --help` lists every key"));
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
}
