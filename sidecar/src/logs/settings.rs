//! The forwarder's keys: the argument structs (`sidecar logs`, and `sidecar run --logs-*`), their
//! defaults, and checking them into [`Settings`] (every bad key reported at once).
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::config_errors::{ConfigError, ConfigErrors};
use crate::units::{parse_duration, parse_size};

/// Defaults, one place; the module table says why each is what it is.
pub const DEFAULT_POLL_INTERVAL: &str = "250ms";
pub const DEFAULT_BATCH_LINES: &str = "500";
pub const DEFAULT_BATCH_BYTES: &str = "1MiB";
pub const DEFAULT_BATCH_WAIT: &str = "1s";
pub const DEFAULT_MAX_LINE_BYTES: &str = "64KiB";
pub const DEFAULT_REQUEST_TIMEOUT: &str = "10s";
pub const DEFAULT_RETRY_INITIAL: &str = "100ms";
pub const DEFAULT_RETRY_MAX: &str = "30s";
pub const DEFAULT_ROTATE_WAIT: &str = "5s";
pub const DEFAULT_SHUTDOWN_TIMEOUT: &str = "5s";

/// Both argument structs have the same fields and environment variables; only the flag names
/// differ (`--file` for `sidecar logs`, `--logs-file` when flattened into `sidecar run`). The
/// clap ids carry the prefix too, or `--logs-request-timeout` would clash with `sidecar run`'s
/// own `request_timeout` (clap refuses duplicate ids when the structs are flattened together).
/// Values are kept as strings and checked by [`LogsConfig::settings`] so that every bad key is
/// reported at once.
macro_rules! logs_args {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct $name {
            /// Log file to forward
            #[arg(long = concat!($prefix, "file"), id = concat!($prefix, "file"), env = "SIDECAR_LOGS_FILE", value_name = "PATH")]
            pub file: Option<PathBuf>,

            /// Collector URL (http://) the batches are POSTed to
            #[arg(long = concat!($prefix, "endpoint"), id = concat!($prefix, "endpoint"), env = "SIDECAR_LOGS_ENDPOINT", value_name = "URL")]
            pub endpoint: Option<String>,

            /// Service name put in every batch (also read from SIDECAR_SERVICE_NAME, SERVICE_NAME)
            #[arg(long = concat!($prefix, "service"), id = concat!($prefix, "service"), env = "SIDECAR_LOGS_SERVICE", value_name = "NAME")]
            pub service: Option<String>,

            /// Checkpoint file [default: <dir of file>/.<file name>.sidecar-checkpoint]
            #[arg(long = concat!($prefix, "checkpoint"), id = concat!($prefix, "checkpoint"), env = "SIDECAR_LOGS_CHECKPOINT", value_name = "PATH")]
            pub checkpoint: Option<PathBuf>,

            /// Where to start without a checkpoint: beginning or end
            #[arg(long = concat!($prefix, "read-from"), id = concat!($prefix, "read-from"), env = "SIDECAR_LOGS_READ_FROM", value_name = "WHERE", default_value = "beginning")]
            pub read_from: String,

            /// How often the file is checked for new data and rotation
            #[arg(long = concat!($prefix, "poll-interval"), id = concat!($prefix, "poll-interval"), env = "SIDECAR_LOGS_POLL_INTERVAL", value_name = "DURATION", default_value = DEFAULT_POLL_INTERVAL)]
            pub poll_interval: String,

            /// Send a batch when it has this many records
            #[arg(long = concat!($prefix, "batch-lines"), id = concat!($prefix, "batch-lines"), env = "SIDECAR_LOGS_BATCH_LINES", value_name = "N", default_value = DEFAULT_BATCH_LINES)]
            pub batch_lines: String,

            /// Send a batch when its body reaches this size (before gzip)
            #[arg(long = concat!($prefix, "batch-bytes"), id = concat!($prefix, "batch-bytes"), env = "SIDECAR_LOGS_BATCH_BYTES", value_name = "SIZE", default_value = DEFAULT_BATCH_BYTES)]
            pub batch_bytes: String,

            /// Send a batch when its first record is this old
            #[arg(long = concat!($prefix, "batch-wait"), id = concat!($prefix, "batch-wait"), env = "SIDECAR_LOGS_BATCH_WAIT", value_name = "DURATION", default_value = DEFAULT_BATCH_WAIT)]
            pub batch_wait: String,

            /// Longer lines are truncated to this and marked "truncated": true
            #[arg(long = concat!($prefix, "max-line-bytes"), id = concat!($prefix, "max-line-bytes"), env = "SIDECAR_LOGS_MAX_LINE_BYTES", value_name = "SIZE", default_value = DEFAULT_MAX_LINE_BYTES)]
            pub max_line_bytes: String,

            /// Gzip request bodies (Content-Encoding: gzip)
            #[arg(long = concat!($prefix, "gzip"), id = concat!($prefix, "gzip"), env = "SIDECAR_LOGS_GZIP", value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true")]
            pub gzip: String,

            /// Time allowed for one POST (connect, send, response head)
            #[arg(long = concat!($prefix, "request-timeout"), id = concat!($prefix, "request-timeout"), env = "SIDECAR_LOGS_REQUEST_TIMEOUT", value_name = "DURATION", default_value = DEFAULT_REQUEST_TIMEOUT)]
            pub request_timeout: String,

            /// First retry backoff ceiling (doubles per attempt, full jitter)
            #[arg(long = concat!($prefix, "retry-initial"), id = concat!($prefix, "retry-initial"), env = "SIDECAR_LOGS_RETRY_INITIAL", value_name = "DURATION", default_value = DEFAULT_RETRY_INITIAL)]
            pub retry_initial: String,

            /// Largest retry backoff ceiling
            #[arg(long = concat!($prefix, "retry-max"), id = concat!($prefix, "retry-max"), env = "SIDECAR_LOGS_RETRY_MAX", value_name = "DURATION", default_value = DEFAULT_RETRY_MAX)]
            pub retry_max: String,

            /// Keep reading a rotated file until it has been quiet this long
            #[arg(long = concat!($prefix, "rotate-wait"), id = concat!($prefix, "rotate-wait"), env = "SIDECAR_LOGS_ROTATE_WAIT", value_name = "DURATION", default_value = DEFAULT_ROTATE_WAIT)]
            pub rotate_wait: String,

            /// On shutdown, how long sending what was read may take
            #[arg(long = concat!($prefix, "shutdown-timeout"), id = concat!($prefix, "shutdown-timeout"), env = "SIDECAR_LOGS_SHUTDOWN_TIMEOUT", value_name = "DURATION", default_value = DEFAULT_SHUTDOWN_TIMEOUT)]
            pub shutdown_timeout: String,
        }
    };
}

logs_args!(
    /// Arguments of `sidecar logs`.
    LogsArgs,
    ""
);

logs_args!(
    /// The forwarder's settings as `sidecar run` flags (`--logs-file` ...), to be flattened into
    /// `RunArgs`; the forwarder is off unless `--logs-file` / `SIDECAR_LOGS_FILE` is set.
    LogsConfig,
    "logs-"
);

impl From<LogsArgs> for LogsConfig {
    fn from(a: LogsArgs) -> Self {
        LogsConfig {
            file: a.file,
            endpoint: a.endpoint,
            service: a.service,
            checkpoint: a.checkpoint,
            read_from: a.read_from,
            poll_interval: a.poll_interval,
            batch_lines: a.batch_lines,
            batch_bytes: a.batch_bytes,
            batch_wait: a.batch_wait,
            max_line_bytes: a.max_line_bytes,
            gzip: a.gzip,
            request_timeout: a.request_timeout,
            retry_initial: a.retry_initial,
            retry_max: a.retry_max,
            rotate_wait: a.rotate_wait,
            shutdown_timeout: a.shutdown_timeout,
        }
    }
}

/// Where to start reading a file for which there is no checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    Beginning,
    End,
}

/// Validated forwarder settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub file: PathBuf,
    pub endpoint: http::Uri,
    pub service: String,
    pub checkpoint: PathBuf,
    pub read_from: ReadFrom,
    pub poll_interval: Duration,
    pub batch_lines: usize,
    pub batch_bytes: usize,
    pub batch_wait: Duration,
    pub max_line_bytes: usize,
    pub gzip: bool,
    pub request_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub rotate_wait: Duration,
    pub shutdown_timeout: Duration,
}

impl LogsConfig {
    /// True when the forwarder is configured at all (`--logs-file` / `SIDECAR_LOGS_FILE`).
    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Checks every value. `Ok(None)`: the forwarder is off (no file, nothing else set either).
    /// `prefix` is the flag prefix used in messages (`""` for `sidecar logs`, `"logs-"` for
    /// `sidecar run`); `env` reads the fallback variables so tests need not touch the process
    /// environment.
    pub fn settings(
        &self,
        prefix: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Settings>, ConfigErrors> {
        let mut errors = Vec::new();
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let key = |flag: &str, var: &str| format!("--{prefix}{flag} / {var}");
        let mut bad = |key: String, value: &str, problem: String| {
            errors.push(ConfigError {
                key: key.into(),
                value: value.to_owned(),
                problem,
            });
        };

        let file = self.file.clone().filter(|p| !p.as_os_str().is_empty());
        let Some(file) = file else {
            if prefix.is_empty() || self.endpoint.is_some() {
                bad(
                    key("file", "SIDECAR_LOGS_FILE"),
                    "",
                    "required: the log file to forward".to_owned(),
                );
                return Err(ConfigErrors {
                    command: "logs",
                    errors,
                });
            }
            return Ok(None);
        };

        let endpoint = match self.endpoint.as_deref().map(str::trim) {
            None | Some("") => {
                bad(
                    key("endpoint", "SIDECAR_LOGS_ENDPOINT"),
                    "",
                    "required: the collector URL, e.g. http://collector:8080/logs".to_owned(),
                );
                None
            }
            Some(url) => match parse_endpoint(url) {
                Ok(uri) => Some(uri),
                Err(problem) => {
                    bad(key("endpoint", "SIDECAR_LOGS_ENDPOINT"), url, problem);
                    None
                }
            },
        };

        let service = self
            .service
            .clone()
            .or_else(|| env("SIDECAR_SERVICE_NAME"))
            .or_else(|| env("SERVICE_NAME"))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        if service.is_none() {
            bad(
                key("service", "SIDECAR_LOGS_SERVICE"),
                "",
                "required (or set SIDECAR_SERVICE_NAME / SERVICE_NAME): names the service in every batch"
                    .to_owned(),
            );
        }

        let checkpoint = match &self.checkpoint {
            Some(p) if !p.as_os_str().is_empty() => p.clone(),
            _ => default_checkpoint(&file),
        };
        if let Err(problem) = check_writable_dir(&checkpoint) {
            let how = if self.checkpoint.is_some() {
                "choose a writable location"
            } else {
                "the default is next to the log file; pass a writable location"
            };
            bad(
                key("checkpoint", "SIDECAR_LOGS_CHECKPOINT"),
                &checkpoint.to_string_lossy(),
                format!("{problem}; {how}"),
            );
        }

        let read_from = match self.read_from.trim().to_ascii_lowercase().as_str() {
            "beginning" | "start" => Some(ReadFrom::Beginning),
            "end" => Some(ReadFrom::End),
            _ => {
                bad(
                    key("read-from", "SIDECAR_LOGS_READ_FROM"),
                    &self.read_from,
                    "expected beginning or end".to_owned(),
                );
                None
            }
        };

        let mut duration = |flag: &str, var: &str, value: &str| match parse_duration(value) {
            Ok(d) if d.is_zero() => {
                bad(
                    key(flag, var),
                    value,
                    "must be greater than zero".to_owned(),
                );
                None
            }
            Ok(d) => Some(d),
            Err(problem) => {
                bad(key(flag, var), value, problem);
                None
            }
        };
        let poll_interval = duration(
            "poll-interval",
            "SIDECAR_LOGS_POLL_INTERVAL",
            &self.poll_interval,
        );
        let batch_wait = duration("batch-wait", "SIDECAR_LOGS_BATCH_WAIT", &self.batch_wait);
        let request_timeout = duration(
            "request-timeout",
            "SIDECAR_LOGS_REQUEST_TIMEOUT",
            &self.request_timeout,
        );
        let retry_initial = duration(
            "retry-initial",
            "SIDECAR_LOGS_RETRY_INITIAL",
            &self.retry_initial,
        );
        let retry_max = duration("retry-max", "SIDECAR_LOGS_RETRY_MAX", &self.retry_max);
        let rotate_wait = duration("rotate-wait", "SIDECAR_LOGS_ROTATE_WAIT", &self.rotate_wait);
        let shutdown_timeout = duration(
            "shutdown-timeout",
            "SIDECAR_LOGS_SHUTDOWN_TIMEOUT",
            &self.shutdown_timeout,
        );

        let batch_lines = match self.batch_lines.trim().parse::<usize>() {
            Ok(n) if (1..=100_000).contains(&n) => Some(n),
            _ => {
                bad(
                    key("batch-lines", "SIDECAR_LOGS_BATCH_LINES"),
                    &self.batch_lines,
                    "expected a whole number from 1 to 100000".to_owned(),
                );
                None
            }
        };
        let mut size =
            |flag: &str, var: &str, value: &str, min: usize, max: usize| match parse_size(value) {
                Ok(n) if (min..=max).contains(&n) => Some(n),
                Ok(_) => {
                    bad(
                        key(flag, var),
                        value,
                        format!("must be from {min} to {max} bytes"),
                    );
                    None
                }
                Err(problem) => {
                    bad(key(flag, var), value, problem);
                    None
                }
            };
        let batch_bytes = size(
            "batch-bytes",
            "SIDECAR_LOGS_BATCH_BYTES",
            &self.batch_bytes,
            1024,
            64 << 20,
        );
        let max_line_bytes = size(
            "max-line-bytes",
            "SIDECAR_LOGS_MAX_LINE_BYTES",
            &self.max_line_bytes,
            16,
            16 << 20,
        );

        let gzip = match self.gzip.trim().to_ascii_lowercase().as_str() {
            "" | "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => {
                bad(
                    key("gzip", "SIDECAR_LOGS_GZIP"),
                    &self.gzip,
                    "expected true or false".to_owned(),
                );
                None
            }
        };

        if let (Some(initial), Some(max)) = (retry_initial, retry_max) {
            if initial > max {
                bad(
                    key("retry-initial", "SIDECAR_LOGS_RETRY_INITIAL"),
                    &self.retry_initial,
                    format!("must not exceed --{prefix}retry-max ({})", self.retry_max),
                );
            }
        }

        match (
            endpoint,
            service,
            read_from,
            poll_interval,
            batch_wait,
            request_timeout,
            retry_initial,
            retry_max,
            rotate_wait,
            shutdown_timeout,
            batch_lines,
            batch_bytes,
            max_line_bytes,
            gzip,
        ) {
            (
                Some(endpoint),
                Some(service),
                Some(read_from),
                Some(poll_interval),
                Some(batch_wait),
                Some(request_timeout),
                Some(retry_initial),
                Some(retry_max),
                Some(rotate_wait),
                Some(shutdown_timeout),
                Some(batch_lines),
                Some(batch_bytes),
                Some(max_line_bytes),
                Some(gzip),
            ) if errors.is_empty() => Ok(Some(Settings {
                file,
                endpoint,
                service,
                checkpoint,
                read_from,
                poll_interval,
                batch_lines,
                batch_bytes,
                batch_wait,
                max_line_bytes,
                gzip,
                request_timeout,
                retry_initial,
                retry_max,
                rotate_wait,
                shutdown_timeout,
            })),
            _ => Err(ConfigErrors {
                command: "logs",
                errors,
            }),
        }
    }
}

/// `<dir of file>/.<file name>.sidecar-checkpoint`: hidden, and not starting with the file's
/// name, so it is never mistaken for a rotated sibling.
pub fn default_checkpoint(file: &Path) -> PathBuf {
    let name = file.file_name().unwrap_or_default();
    let mut hidden = OsString::from(".");
    hidden.push(name);
    hidden.push(".sidecar-checkpoint");
    file.with_file_name(hidden)
}

fn check_writable_dir(checkpoint: &Path) -> Result<(), String> {
    if checkpoint.file_name().is_none() {
        return Err("not a file path".to_owned());
    }
    let dir = match checkpoint.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    nix::unistd::access(
        dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|e| format!("directory {} is not writable ({e})", dir.display()))
}

fn parse_endpoint(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}); e.g. http://collector:8080/logs"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https is not supported (the sidecar has no TLS stack): send to an \
                 in-cluster collector or a node agent over http://"
                    .to_owned(),
            )
        }
        _ => return Err("expected an http:// URL, e.g. http://collector:8080/logs".to_owned()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("no host in the URL".to_owned());
    }
    Ok(uri)
}
