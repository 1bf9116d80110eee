//! `sidecar run`'s flags and environment, checked: every bad key is collected and reported at
//! once ([`ConfigErrors`], exit 64), then turned into the proxy's, the lifecycle's and the log
//! forwarder's settings.
use std::path::PathBuf;
use std::time::Duration;

use super::args::{RunArgs, DEFAULT_INBOUND, DEFAULT_OUTBOUND};
use crate::cli::{self, LogFormat};
pub use crate::config_errors::{ConfigError, ConfigErrors};
use crate::lifecycle::{AppProbe, AppTarget};
use crate::policy::config_file::{OwnedFlag, PolicySource};
use crate::policy::PolicyConfig;
use crate::proxy::{Http1Engine, HttpLimits, ListenAddr, ProxyConfig, Target};
use crate::units::{parse_addrs, parse_duration, parse_size};

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
    /// What the policies were built from (`proxy.policy`), read again on reload...
    pub policy_source: PolicySource,
    /// ...and the config file's text they were built from.
    pub policy_text: Option<String>,
    /// `--identity-dir`: the workload identity for mesh TLS.
    pub identity_dir: Option<PathBuf>,
}

impl Settings {
    /// Checks every value; `env` reads the fallback variables (`TARGET_URL`, `SERVICE_NAME`,
    /// `SIDECAR_LOG`, `RUST_LOG`) so tests need not touch the process environment.
    pub fn from_args(
        args: &RunArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigErrors> {
        let mut errors = Vec::new();
        // The forwarder names its service after the proxy's: `--service-name` counts as much
        // as its variable.
        let logs_env = |name: &str| match (name, &args.service_name) {
            ("SIDECAR_SERVICE_NAME", Some(flag)) => Some(flag.clone()),
            _ => env(name),
        };
        let logs = match args.logs.settings("logs-", &logs_env) {
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

        let (policy_source, policy_text, policy) = policy_config(args, &env, &mut errors);
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
        let header_timeout = duration(
            "--header-timeout / SIDECAR_HEADER_TIMEOUT",
            &args.header_timeout,
            false,
        );
        let h2_keepalive = duration(
            "--http2-keepalive / SIDECAR_HTTP2_KEEPALIVE",
            &args.http2_keepalive,
            false,
        );
        let park_idle_after = duration(
            "--park-idle-after / SIDECAR_PARK_IDLE_AFTER",
            &args.park_idle_after,
            true,
        );
        let h2_idle_timeout = duration(
            "--http2-idle-timeout / SIDECAR_HTTP2_IDLE_TIMEOUT",
            &args.http2_idle_timeout,
            false,
        );
        let mut number =
            |key: &'static str, value: &str, range: std::ops::RangeInclusive<u64>| match value
                .trim()
                .parse::<u64>()
            {
                Ok(n) if range.contains(&n) => Some(n),
                _ => {
                    errors.push(ConfigError {
                        key: key.into(),
                        value: value.to_owned(),
                        problem: format!(
                            "expected a whole number from {} to {}",
                            range.start(),
                            range.end()
                        ),
                    });
                    None
                }
            };
        let h2_max_concurrent_streams = number(
            "--http2-max-concurrent-streams / SIDECAR_HTTP2_MAX_CONCURRENT_STREAMS",
            &args.http2_max_concurrent_streams,
            1..=10_000,
        );
        let max_connections = number(
            "--max-downstream-connections / SIDECAR_MAX_DOWNSTREAM_CONNECTIONS",
            &args.max_downstream_connections,
            1..=1_000_000,
        );
        let inbound_max_connections = number(
            "--inbound-max-connections / SIDECAR_INBOUND_MAX_CONNECTIONS",
            &args.inbound_max_connections,
            1..=100_000,
        );
        let max_header_bytes = match parse_size(&args.max_header_bytes) {
            Ok(n) if (1024..=1024 * 1024).contains(&n) => Some(n),
            Ok(_) => {
                errors.push(ConfigError {
                    key: "--max-header-bytes / SIDECAR_MAX_HEADER_BYTES".into(),
                    value: args.max_header_bytes.clone(),
                    problem: "must be from 1KiB to 1MiB".to_owned(),
                });
                None
            }
            Err(problem) => {
                errors.push(ConfigError {
                    key: "--max-header-bytes / SIDECAR_MAX_HEADER_BYTES".into(),
                    value: args.max_header_bytes.clone(),
                    problem,
                });
                None
            }
        };
        let http1_engine = Http1Engine::parse(args.http1_engine.trim());
        if http1_engine.is_none() {
            errors.push(ConfigError {
                key: "--http1-engine / SIDECAR_HTTP1_ENGINE".into(),
                value: args.http1_engine.clone(),
                problem: "expected native or hyper".to_owned(),
            });
        }
        let http = match (
            header_timeout,
            max_header_bytes,
            h2_max_concurrent_streams,
            h2_keepalive,
            h2_idle_timeout,
            park_idle_after,
        ) {
            (
                Some(header_timeout),
                Some(max_header_bytes),
                Some(streams),
                Some(h2_keepalive),
                Some(h2_idle_timeout),
                Some(park_idle_after),
            ) => Some(HttpLimits {
                header_timeout,
                max_header_bytes,
                h2_max_concurrent_streams: u32::try_from(streams).unwrap_or(u32::MAX),
                h2_keepalive,
                h2_idle_timeout,
                http1_engine: http1_engine.unwrap_or_default(),
                park_idle_after: Some(park_idle_after).filter(|d| !d.is_zero()),
            }),
            _ => None,
        };

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

        let log_format = match LogFormat::parse(&args.log_format.to_ascii_lowercase()) {
            Ok(format) => Some(format),
            Err(problem) => {
                errors.push(ConfigError {
                    key: "--log-format / SIDECAR_LOG_FORMAT".into(),
                    value: args.log_format.clone(),
                    problem,
                });
                None
            }
        };

        let lifecycle = LifecycleSettings::from_args(args, &mut errors);

        let (filter_key, log_filter) = cli::log_filter(&env);
        if let Err(problem) = cli::check_filter(&log_filter) {
            errors.push(ConfigError {
                key: filter_key.into(),
                value: log_filter.clone(),
                problem,
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
            http,
            max_connections,
            inbound_max_connections,
        ) {
            (
                Some(policy),
                Some(detect_timeout),
                Some(pool_idle_timeout),
                Some(drain_timeout),
                Some(workers),
                Some(log_format),
                Some(lifecycle),
                Some(http),
                Some(max_connections),
                Some(inbound_max_connections),
            ) if errors.is_empty() => Ok(Settings {
                proxy: ProxyConfig {
                    listen,
                    inbound,
                    target,
                    service_name,
                    policy,
                    detect_timeout,
                    pool_idle_timeout,
                    http,
                    max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
                    inbound_max_connections: usize::try_from(inbound_max_connections)
                        .unwrap_or(usize::MAX),
                    refuse_if_captured: true,
                    // Loaded by `run` (it registers metrics).
                    identity: None,
                },
                workers,
                drain_timeout,
                log_format,
                log_filter,
                lifecycle,
                logs,
                policy_source,
                policy_text,
                identity_dir: args
                    .identity_dir
                    .clone()
                    .filter(|p| !p.as_os_str().is_empty()),
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
fn policy_config(
    args: &RunArgs,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) -> (PolicySource, Option<String>, Option<PolicyConfig>) {
    let flag = |path: &'static str, name: &'static str, value: &Option<String>| {
        let value = value.clone().filter(|v| !v.trim().is_empty());
        // clap reads the variable when the flag is absent: the same value there means it came
        // from the environment (or from both, which says the same).
        let var = name.rsplit(" / ").next().unwrap_or_default();
        let source = if value.is_some() && env(var) == value {
            "environment"
        } else {
            "flag"
        };
        OwnedFlag {
            path,
            name,
            value,
            source,
        }
    };
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
        flag(
            "inbound.probe_paths",
            "--probe-paths / SIDECAR_PROBE_PATHS",
            &args.probe_paths,
        ),
    ];
    let source = PolicySource {
        file: args.config.clone().filter(|p| !p.as_os_str().is_empty()),
        flags: flags.into(),
    };
    let loaded = source.load();
    let config = match loaded.result {
        Ok(config) => Some(config),
        Err(problems) => {
            errors.extend(problems.into_iter().map(|e| ConfigError {
                key: e.key.into(),
                value: e.value,
                problem: e.problem,
            }));
            None
        }
    };
    (source, loaded.text.and_then(Result::ok), config)
}

#[cfg(test)]
mod tests;
