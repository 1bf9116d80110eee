//! `sidecar logs`: forwards the application's log file to an HTTP collector, at least once.
//!
//! The job of a Fluent Bit or Vector "tail -> http" pipeline, built into the sidecar: tail one file
//! through rotations, turn each complete line into a JSON record, POST batches
//! `{"service", "timestamp", "logs": [...]}`, retry what the collector did not take, and remember
//! (durably, only once the collector said 2xx) how far it got.
//!
//! Runs standalone (`sidecar logs --file PATH --endpoint URL --service NAME`) or inside
//! `sidecar run` (the same settings with a `logs-` prefix, see [`LogsConfig`] and
//! [`run_forwarder`]), so one sidecar container can do both.
//!
//! # Configuration
//!
//! | `sidecar logs` flag | `sidecar run` flag | environment | default | why |
//! |---|---|---|---|---|
//! | `--file` | `--logs-file` | `SIDECAR_LOGS_FILE` | none (required; unset in `sidecar run` = forwarder off) | the file the app writes; it need not exist yet |
//! | `--endpoint` | `--logs-endpoint` | `SIDECAR_LOGS_ENDPOINT` | none (required) | `http://` URL the batches are POSTed to (no TLS stack in the sidecar: send to an in-cluster collector or node agent) |
//! | `--service` | `--logs-service` | `SIDECAR_LOGS_SERVICE`, else `SIDECAR_SERVICE_NAME`, else `SERVICE_NAME` | none (required) | the batch's `service` field |
//! | `--checkpoint` | `--logs-checkpoint` | `SIDECAR_LOGS_CHECKPOINT` | `<dir of file>/.<file name>.sidecar-checkpoint` | see "Checkpoint" below; its directory must be writable |
//! | `--read-from` | `--logs-read-from` | `SIDECAR_LOGS_READ_FROM` | `beginning` | where to start when there is no checkpoint (`beginning` loses nothing; `end` skips history) |
//! | `--poll-interval` | `--logs-poll-interval` | `SIDECAR_LOGS_POLL_INTERVAL` | `250ms` | how often the file is checked for new data and rotation (polling, not inotify: no extra crate, works on every filesystem incl. NFS and overlay, and a 250 ms delay is invisible next to batching) |
//! | `--batch-lines` | `--logs-batch-lines` | `SIDECAR_LOGS_BATCH_LINES` | `500` | a batch is sent when it has this many records... |
//! | `--batch-bytes` | `--logs-batch-bytes` | `SIDECAR_LOGS_BATCH_BYTES` | `1MiB` | ...or this many body bytes (before gzip; collectors commonly cap bodies at a few MiB)... |
//! | `--batch-wait` | `--logs-batch-wait` | `SIDECAR_LOGS_BATCH_WAIT` | `1s` | ...or when its first record is this old |
//! | `--max-line-bytes` | `--logs-max-line-bytes` | `SIDECAR_LOGS_MAX_LINE_BYTES` | `64KiB` | longer lines are truncated to this, marked `"truncated": true, "original_length": N` (Docker's and Fluent Bit's buffer sizes are of this order) |
//! | `--gzip` | `--logs-gzip` | `SIDECAR_LOGS_GZIP` | `false` | gzip bodies, `Content-Encoding: gzip` |
//! | `--request-timeout` | `--logs-request-timeout` | `SIDECAR_LOGS_REQUEST_TIMEOUT` | `10s` | connect + send + response head; a timeout is retried |
//! | `--retry-initial` | `--logs-retry-initial` | `SIDECAR_LOGS_RETRY_INITIAL` | `100ms` | first backoff ceiling; doubles per attempt (full jitter: a random delay from 0 to the ceiling) |
//! | `--retry-max` | `--logs-retry-max` | `SIDECAR_LOGS_RETRY_MAX` | `30s` | backoff ceiling cap, so recovery is noticed within 30 s |
//! | `--rotate-wait` | `--logs-rotate-wait` | `SIDECAR_LOGS_ROTATE_WAIT` | `5s` | a rotated file is kept open and read until it has been quiet this long (apps write to the old file until they reopen; Fluent Bit's `Rotate_Wait`) |
//! | `--shutdown-timeout` | `--logs-shutdown-timeout` | `SIDECAR_LOGS_SHUTDOWN_TIMEOUT` | `5s` | on SIGTERM, how long flushing may take |
//! | | | `SIDECAR_LOG` else `RUST_LOG`; `SIDECAR_LOG_FORMAT` | `info`; `plain` | the forwarder's own diagnostics (stderr; standalone only) |
//!
//! Sizes take `B`, `KiB`, `MiB` or no unit (bytes); durations `ms`, `s`, `m`, `h`. Every bad key is
//! reported at once; exit code 64.
//!
//! # Records
//!
//! | line | record |
//! |---|---|
//! | a JSON object | the object, byte for byte as written (keys, order, spacing inside kept) |
//! | anything else (plain text, malformed JSON, a JSON array or scalar, invalid UTF-8) | `{"message": line, "level": "INFO"}` (invalid UTF-8 replaced by U+FFFD) |
//! | longer than `max-line-bytes` | `{"message": first max-line-bytes bytes, "level": "INFO", "truncated": true, "original_length": N}` |
//! | empty or blanks only | skipped |
//!
//! A trailing `\r` is removed. Only complete lines (ending in `\n`) are sent: a partial last line
//! waits for its newline, except in a rotated file once it has been quiet for `rotate-wait`, or
//! at the end of a copytruncate copy, where it is sent as it is (no one will finish it).
//!
//! # Delivery
//!
//! | collector says | we do |
//! |---|---|
//! | 2xx | batch done; checkpoint advanced |
//! | connection error, timeout, 5xx, 408, 429 | retry the same batch forever with exponential backoff and full jitter (cap `retry-max`); `Retry-After: <seconds>` is honoured (up to 5 min) |
//! | any other status (4xx, 3xx) | the batch is dropped, counted in `batches_failed_total`, logged at error level, and the checkpoint advances: a poison batch cannot block the stream forever |
//!
//! Memory is bounded: one batch in flight plus one being filled. While the collector is down the
//! forwarder stops reading the file (the file is the buffer), so `lag_bytes` grows instead of RSS.
//!
//! # Checkpoint
//!
//! A small JSON file listing each file being read (the current one and rotated ones still being
//! drained): device + inode, a fingerprint (length + FNV-1a of the first up to 256 bytes, to tell
//! a truncated or replaced file, or a reused inode, from the one we read) and the offset after the
//! last line of the last **acknowledged** batch. It is written after every acknowledged batch,
//! atomically (temp file, fsync, rename, fsync of the directory). A crash or kill -9 therefore
//! resends at most the batches that were not acknowledged (at-least-once) and skips nothing.
//!
//! The default location is next to the log file, as a hidden file: it lives exactly as long as the
//! log it describes (a pod's log `emptyDir` and the checkpoint go away together), and the sidecar
//! can already reach that directory. If that directory is not writable, pass `--checkpoint`.
//! A checkpoint that cannot be parsed is renamed to `*.corrupt` and reading starts over from the
//! beginning (duplicates rather than loss). A checkpoint written for another `--file` is ignored.
//!
//! # Rotation
//!
//! | rotation | how it is seen | what happens |
//! |---|---|---|
//! | rename + create | the path's (dev, inode) changes | the old file stays open and is read to its end first, and kept for `rotate-wait` while it still grows; then the new file from offset 0 |
//! | copytruncate | same inode, size below our offset or first bytes changed | the rest of the old content (from our offset) is read from the copy (a sibling `<name>*` whose first bytes match), then the file from 0 |
//! | deleted | the path is gone | the open file is read to its end, and the new file is picked up when it appears |
//! | while stopped | checkpointed inode not at the path | the old file is looked up in the same directory by inode (rename) or by fingerprint (copy) and finished first |
//!
//! Limits (as in Fluent Bit and Vector): a file rotated away and rotated again (or deleted) before
//! the forwarder ever opened it is not seen, so rotations must be further apart than
//! `poll-interval` (and, while stopped, at most one rotation is recovered); rotated files are only
//! looked for in the log file's own directory; compressed rotations are never read.
//!
//! # Metrics (`prometheus::default_registry()`, served by the admin endpoint)
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `sidecar_logs_lines_read_total` | counter | records taken from the file into a batch |
//! | `sidecar_logs_lines_sent_total` | counter | records acknowledged (2xx) by the collector |
//! | `sidecar_logs_lines_retried_total` | counter | records in batches that had to be sent again |
//! | `sidecar_logs_batches_failed_total` | counter | batches the collector refused for good (dropped) |
//! | `sidecar_logs_lines_truncated_total` | counter | records cut at `max-line-bytes` |
//! | `sidecar_logs_lag_bytes` | gauge | bytes in the tracked files not yet acknowledged |
//! | `sidecar_logs_last_success_timestamp_seconds` | gauge | Unix time of the last acknowledged batch |
//!
//! # Signals (standalone)
//!
//! SIGTERM / SIGINT: stop reading, send the batch being filled (and the one in flight) within
//! `shutdown-timeout`, write the checkpoint, exit 0. What is not acknowledged by then is sent
//! again on the next start.
mod checkpoint;
mod metrics;
mod record;
mod ship;
mod tail;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::cli::{self, LogFormat};
use crate::units::{parse_duration, parse_size};

pub use checkpoint::Checkpoint;

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

pub use crate::config_errors::{ConfigError, ConfigErrors};

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
            })
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

/// Runs the forwarder until `shutdown` is cancelled, then flushes (bounded by the shutdown
/// timeout) and returns. Returns at once when the forwarder is not configured (no file). For
/// `sidecar run`: spawn it next to the proxy with the proxy's shutdown token; validate with
/// [`LogsConfig::settings`] first to report bad keys together with the proxy's.
pub async fn run_forwarder(cfg: LogsConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let settings = cfg.settings("logs-", &|name| std::env::var(name).ok())?;
    match settings {
        None => Ok(()),
        Some(settings) => forward(settings, shutdown).await,
    }
}

/// The forwarder proper: a tailer task (reads the file in the blocking pool, fills batches) and a
/// shipper task (POSTs them, writes the checkpoint on acknowledgement), joined by a one-slot
/// channel the tailer reserves *before* filling a batch: so at most one batch is in flight and one
/// being filled, and a stalled collector stops the reading.
pub async fn forward(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = metrics::metrics();
    let checkpoint_path = settings.checkpoint.clone();
    let file = settings.file.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        checkpoint::load_or_quarantine(&checkpoint_path, &file)
    })
    .await
    .context("checkpoint loader task")?;
    let tail_cfg = tail::TailConfig {
        path: settings.file.clone(),
        max_line_bytes: settings.max_line_bytes,
        rotate_wait: settings.rotate_wait,
        read_from: settings.read_from,
    };
    let tailer = tokio::task::spawn_blocking(move || tail::Tailer::new(tail_cfg, loaded))
        .await
        .context("tailer start task")?;
    info!(
        file = %settings.file.display(),
        endpoint = %settings.endpoint,
        service = %settings.service,
        checkpoint = %settings.checkpoint.display(),
        "forwarding logs"
    );

    let acked = Arc::new(Mutex::new(tailer.positions()));
    let (tx, rx) = mpsc::channel::<record::Sealed>(1);
    // Cancelled `shutdown_timeout` after `shutdown`: abandons what is still unacknowledged.
    let hard_stop = CancellationToken::new();
    let deadline = {
        let (shutdown, hard_stop, timeout) = (
            shutdown.clone(),
            hard_stop.clone(),
            settings.shutdown_timeout,
        );
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(timeout).await;
            hard_stop.cancel();
        })
    };

    let transport = ship::HttpTransport::new(
        settings.endpoint.clone(),
        settings.gzip,
        settings.request_timeout,
    );
    let shipper = ship::Shipper {
        transport,
        backoff: ship::Backoff::new(settings.retry_initial, settings.retry_max),
        checkpoint: settings.checkpoint.clone(),
        source: settings.file.clone(),
        acked: acked.clone(),
        hard_stop: hard_stop.clone(),
    };
    let shipping = tokio::spawn(shipper.run(rx));

    let filler = tail::Filler {
        tailer,
        limits: record::BatchLimits {
            lines: settings.batch_lines,
            bytes: settings.batch_bytes,
            wait: settings.batch_wait,
        },
        service: settings.service.clone(),
        gzip: settings.gzip,
        poll_interval: settings.poll_interval,
        acked,
    };
    let tailing = filler.run(tx, shutdown.clone()).await;
    let shipped = shipping.await;
    deadline.abort();
    metrics.flush_lag();
    tailing.context("tailer")?;
    shipped.context("shipper task")?.context("shipper")?;
    info!("log forwarder stopped");
    Ok(())
}

/// `sidecar logs`.
pub fn main(args: LogsArgs) -> ExitCode {
    let cfg = LogsConfig::from(args);
    let settings = match cfg.settings("", &|name| std::env::var(name).ok()) {
        Ok(Some(s)) => s,
        Ok(None) => return ExitCode::from(crate::EXIT_USAGE),
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    let json = std::env::var("SIDECAR_LOG_FORMAT").is_ok_and(|f| f.trim() == "json");
    let format = if json {
        LogFormat::Json
    } else {
        LogFormat::Plain
    };
    cli::init_logging(format, &cli::log_filter(&|name| std::env::var(name).ok()).1);
    let runtime = match cli::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let mut signals = match cli::Signals::new() {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        let forwarder = tokio::spawn(forward(settings, shutdown.clone()));
        let stopper = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let name = signals.next().await;
                info!(signal = name, "stopping: flushing what was read");
                shutdown.cancel();
            })
        };
        let result = forwarder.await;
        stopper.abort();
        match result {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                error!(error = format!("{e:#}"), "log forwarder failed");
                ExitCode::FAILURE
            }
            Err(e) => {
                error!(error = %e, "log forwarder task failed");
                ExitCode::FAILURE
            }
        }
    });
    runtime.shutdown_background();
    code
}
