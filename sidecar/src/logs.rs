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
mod settings;
mod ship;
mod tail;

#[cfg(test)]
mod tests;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::cli::{self, LogFormat};

pub use checkpoint::Checkpoint;
/// The record encoders, for the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub use record::{encode_line, encode_truncated};
pub use settings::*;

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
