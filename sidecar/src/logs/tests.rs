//! In-process tests of the whole forwarder against a real HTTP collector on 127.0.0.1: metrics,
//! gzip, the checkpoint, and configuration errors. (The binary is tested by tests/logs_*.rs.)
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::units::parse_size;

/// A directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "sidecar-logs-unit-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!("create {}: {e}", path.display());
        }
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Seen {
    /// Decoded bodies of the requests answered 200.
    bodies: Mutex<Vec<serde_json::Value>>,
    encodings: Mutex<Vec<Option<String>>>,
    /// Status to answer with (200 unless set).
    status: AtomicU16,
}

async fn collector() -> (SocketAddr, Arc<Seen>) {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("bind: {e}"),
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => panic!("local_addr: {e}"),
    };
    let seen = Arc::new(Seen::default());
    seen.status.store(200, Ordering::SeqCst);
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let s = s.clone();
                    async move {
                        let enc = req
                            .headers()
                            .get("content-encoding")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let status = s.status.load(Ordering::SeqCst);
                        if status == 200 {
                            let text = if enc.as_deref() == Some("gzip") {
                                let mut t = Vec::new();
                                let _ = flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut t);
                                t
                            } else {
                                body.to_vec()
                            };
                            let v = serde_json::from_slice(&text).unwrap_or_default();
                            if let Ok(mut b) = s.bodies.lock() {
                                b.push(v);
                            }
                            if let Ok(mut e) = s.encodings.lock() {
                                e.push(enc);
                            }
                        }
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() =
                            hyper::StatusCode::from_u16(status).unwrap_or_default();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn records(seen: &Seen) -> Vec<serde_json::Value> {
    seen.bodies
        .lock()
        .map(|b| {
            b.iter()
                .flat_map(|v| v["logs"].as_array().cloned().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn config(dir: &Path, addr: SocketAddr, extra: &[(&str, &str)]) -> LogsConfig {
    let mut c = LogsConfig {
        file: Some(dir.join("app.log")),
        endpoint: Some(format!("http://{addr}/ingest")),
        service: Some("unit".into()),
        checkpoint: None,
        read_from: "beginning".into(),
        poll_interval: "20ms".into(),
        batch_lines: "500".into(),
        batch_bytes: DEFAULT_BATCH_BYTES.into(),
        batch_wait: "50ms".into(),
        max_line_bytes: DEFAULT_MAX_LINE_BYTES.into(),
        gzip: "false".into(),
        request_timeout: "2s".into(),
        retry_initial: "10ms".into(),
        retry_max: "50ms".into(),
        rotate_wait: "100ms".into(),
        shutdown_timeout: "2s".into(),
    };
    for (k, v) in extra {
        match *k {
            "gzip" => c.gzip = v.to_string(),
            "batch_lines" => c.batch_lines = v.to_string(),
            "batch_wait" => c.batch_wait = v.to_string(),
            _ => panic!("unknown key {k}"),
        }
    }
    c
}

fn append(path: &Path, text: &str) {
    let mut f = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => panic!("open {}: {e}", path.display()),
    };
    if let Err(e) = f.write_all(text.as_bytes()) {
        panic!("write: {e}");
    }
}

/// Tests that move the process-wide metrics (anything that reads lines or delivers batches)
/// take turns, so that counts can be asserted exactly.
pub(crate) static METRICS_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_gzipped_batches_counts_metrics_and_checkpoints() {
    let _turn = METRICS_LOCK.lock().await;
    let dir = TempDir::new("e2e");
    let (addr, seen) = collector().await;
    let m = metrics::metrics();
    let (read0, sent0, retried0, failed0) = (
        m.lines_read.get(),
        m.lines_sent.get(),
        m.lines_retried.get(),
        m.batches_failed.get(),
    );
    let log = dir.path().join("app.log");
    let text: String = (0..20).map(|i| format!("{{\"seq\":{i}}}\n")).collect();
    append(&log, &text);

    let shutdown = CancellationToken::new();
    let cfg = config(dir.path(), addr, &[("gzip", "true"), ("batch_lines", "7")]);
    let task = tokio::spawn(run_forwarder(cfg, shutdown.clone()));
    wait_for("20 records", || records(&seen).len() >= 20).await;
    assert!(seen
        .encodings
        .lock()
        .map(|e| e.iter().all(|e| e.as_deref() == Some("gzip")))
        .unwrap_or(false));
    let body = seen.bodies.lock().map(|b| b[0].clone()).unwrap_or_default();
    assert_eq!(body["service"], "unit");
    assert!(body["timestamp"]
        .as_str()
        .is_some_and(|t| t.len() == 24 && t.ends_with('Z')));
    assert_eq!(
        body["logs"].as_array().map(Vec::len),
        Some(7),
        "batch-lines"
    );

    // 503 then 400: the first batch is retried, then (once 400) dropped and counted.
    seen.status.store(503, Ordering::SeqCst);
    append(&log, "{\"seq\":20}\n");
    wait_for("a retry", || m.lines_retried.get() > retried0).await;
    seen.status.store(400, Ordering::SeqCst);
    wait_for("a failed batch", || m.batches_failed.get() > failed0).await;
    seen.status.store(200, Ordering::SeqCst);
    append(&log, "{\"seq\":21}\n");
    wait_for("seq 21", || records(&seen).iter().any(|r| r["seq"] == 21)).await;
    // The collector has the body before the forwarder has read the 200 and counted the lines.
    wait_for("seq 21 counted as sent", || {
        m.lines_sent.get() - sent0 >= 21
    })
    .await;

    assert_eq!(m.lines_read.get() - read0, 22);
    assert_eq!(
        m.lines_sent.get() - sent0,
        21,
        "the refused line is not counted as sent"
    );
    wait_for("lag 0", || m.lag_bytes.get() == 0).await;
    assert!(m.last_success.get() > 1.0e9);

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&prometheus::default_registry().gather())
        .unwrap_or_default();
    for name in [
        "sidecar_logs_lines_read_total",
        "sidecar_logs_lines_sent_total",
        "sidecar_logs_lines_retried_total",
        "sidecar_logs_batches_failed_total",
        "sidecar_logs_lines_truncated_total",
        "sidecar_logs_lag_bytes",
        "sidecar_logs_last_success_timestamp_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }

    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("forwarder did not stop cleanly: {other:?}"),
    }
    let ckpt = std::fs::read_to_string(default_checkpoint(&log)).unwrap_or_default();
    let ckpt: Checkpoint = match serde_json::from_str(&ckpt) {
        Ok(c) => c,
        Err(e) => panic!("checkpoint: {e}: {ckpt}"),
    };
    let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    assert_eq!(ckpt.files.len(), 1);
    assert_eq!(ckpt.files[0].offset, size, "everything acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_a_batch_that_is_not_due_yet() {
    let _turn = METRICS_LOCK.lock().await;
    let read0 = metrics::metrics().lines_read.get();
    let dir = TempDir::new("flush");
    let (addr, seen) = collector().await;
    let log = dir.path().join("app.log");
    append(&log, "a\nb\nc\n");
    let shutdown = CancellationToken::new();
    let cfg = config(dir.path(), addr, &[("batch_wait", "1h")]);
    let task = tokio::spawn(forward(
        match cfg.settings("", &|_| None) {
            Ok(Some(s)) => s,
            other => panic!("{other:?}"),
        },
        shutdown.clone(),
    ));
    // Wait until the lines have been read into the batch, then stop.
    wait_for("lines read", || {
        metrics::metrics().lines_read.get() - read0 >= 3
    })
    .await;
    assert!(records(&seen).is_empty(), "not due for an hour");
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("forwarder did not stop cleanly: {other:?}"),
    }
    let messages: Vec<_> = records(&seen)
        .iter()
        .map(|r| r["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(messages, ["a", "b", "c"]);
}

#[test]
fn every_bad_key_is_reported_at_once() {
    let dir = TempDir::new("config");
    let cfg = LogsConfig {
        file: Some(dir.path().join("app.log")),
        endpoint: Some("https://collector/logs".into()),
        service: None,
        checkpoint: Some(PathBuf::from("/nonexistent-dir/ckpt")),
        read_from: "middle".into(),
        poll_interval: "0ms".into(),
        batch_lines: "0".into(),
        batch_bytes: "12XB".into(),
        batch_wait: "1s".into(),
        max_line_bytes: "64KiB".into(),
        gzip: "maybe".into(),
        request_timeout: "10".into(),
        retry_initial: "1m".into(),
        retry_max: "30s".into(),
        rotate_wait: "5s".into(),
        shutdown_timeout: "5s".into(),
    };
    let errors = match cfg.settings("", &|_| None) {
        Err(e) => e,
        Ok(s) => panic!("accepted: {s:?}"),
    };
    let keys: Vec<_> = errors
        .errors
        .iter()
        .map(|e| e.key.split(' ').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        keys,
        [
            "--endpoint",
            "--service",
            "--checkpoint",
            "--read-from",
            "--poll-interval",
            "--request-timeout",
            "--batch-lines",
            "--batch-bytes",
            "--gzip",
            "--retry-initial",
        ],
        "{errors}"
    );
    let text = errors.to_string();
    assert!(text.contains("https is not supported"), "{text}");
}

#[test]
fn the_run_flavour_is_off_without_a_file_and_uses_prefixed_keys() {
    let off = LogsConfig::default();
    assert!(matches!(off.settings("logs-", &|_| None), Ok(None)));
    let half = LogsConfig {
        endpoint: Some("http://c/".into()),
        ..LogsConfig::default()
    };
    match half.settings("logs-", &|_| None) {
        Err(e) => assert_eq!(e.errors[0].key, "--logs-file / SIDECAR_LOGS_FILE"),
        Ok(s) => panic!("{s:?}"),
    }
}

#[test]
fn service_falls_back_to_the_sidecar_and_seed_names() {
    let dir = TempDir::new("service");
    let mut cfg = config(dir.path(), SocketAddr::from(([127, 0, 0, 1], 9)), &[]);
    cfg.service = None;
    let s = cfg
        .settings("", &|k| (k == "SERVICE_NAME").then(|| "seed".to_owned()))
        .ok()
        .flatten();
    assert_eq!(s.map(|s| s.service).as_deref(), Some("seed"));
}

#[test]
fn clap_accepts_both_flag_spellings_and_a_bare_gzip() {
    use clap::Parser;
    #[derive(Parser)]
    struct Standalone {
        #[command(flatten)]
        args: LogsArgs,
    }
    #[derive(Parser)]
    struct Run {
        #[command(flatten)]
        logs: LogsConfig,
    }
    let a = Standalone::try_parse_from(["x", "--file", "/f", "--endpoint", "http://c", "--gzip"]);
    let a = match a {
        Ok(a) => a.args,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(a.file.as_deref(), Some(Path::new("/f")));
    assert_eq!(a.gzip, "true");
    let r = Run::try_parse_from(["x", "--logs-file", "/f", "--logs-gzip=false"]);
    let r = match r {
        Ok(r) => r.logs,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(r.file.as_deref(), Some(Path::new("/f")));
    assert_eq!(r.gzip, "false");
    assert_eq!(r.batch_lines, DEFAULT_BATCH_LINES);
}

#[test]
fn sizes_parse_with_binary_units() {
    assert_eq!(parse_size("1MiB"), Ok(1 << 20));
    assert_eq!(parse_size("64KiB"), Ok(64 << 10));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("1.5MiB").is_err());
    assert!(parse_size("MiB").is_err());
}

#[test]
fn the_default_checkpoint_is_a_hidden_file_next_to_the_log() {
    assert_eq!(
        default_checkpoint(Path::new("/var/log/app/app.log")),
        Path::new("/var/log/app/.app.log.sidecar-checkpoint")
    );
}
