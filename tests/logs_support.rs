//! Shared by the `logs_*` tests (included with `#[path]`, not a test of its own): a real HTTP
//! collector on 127.0.0.1 that can be told to fail, reset or go away, the `sidecar logs` process,
//! a log writer that numbers its lines, and the bookkeeping that finds gaps and duplicates.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sidecar_tests::env::{sidecar_bin, NAME_PREFIX};
use sidecar_tests::{eventually, poll_until};
use tokio::sync::oneshot;

/// Generous: debug binaries on two shared cores.
pub const WAIT: Duration = Duration::from_secs(60);

/// Fast settings so each test takes seconds: polling, batching and retry ceilings are short.
pub const FAST: &[&str] = &[
    "--poll-interval",
    "20ms",
    "--batch-wait",
    "100ms",
    "--retry-initial",
    "20ms",
    "--retry-max",
    "200ms",
    "--rotate-wait",
    "300ms",
    "--request-timeout",
    "2s",
];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A scratch directory named like the harness's (`sidecar-test-<pid>-<n>`), so its sweep removes
/// what a crashed run leaves; removed on drop. Logs go in `logs/`, the forwarder's stderr next to
/// it (never in the log directory, which the forwarder searches for rotated files).
pub struct Scratch {
    root: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(900);
        let root = std::env::temp_dir().join(format!(
            "{NAME_PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        if let Err(e) = fs::create_dir_all(root.join("logs")) {
            panic!("create {}: {e}", root.display());
        }
        Scratch { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn log(&self) -> PathBuf {
        self.log_dir().join("app.log")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// How the collector answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200, and the records are kept.
    Accept,
    /// This status (with `Retry-After: <secs>` when given); nothing is kept.
    Fail(u16, Option<u64>),
    /// Every connection is closed without an answer (a crashing collector).
    Reset,
}

struct State {
    mode: Mutex<Mode>,
    /// Bodies of the requests answered 200, parsed and as sent.
    bodies: Mutex<Vec<Value>>,
    raw: Mutex<Vec<String>>,
    /// Sequence numbers seen, kept as bodies arrive (recounting 100k records per poll is slow).
    tally: Mutex<Tally>,
    records: AtomicUsize,
    /// Every answer given: status and when.
    answers: Mutex<Vec<(u16, Instant)>>,
    resets: AtomicUsize,
}

struct Server {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// A log collector: hyper on its own thread and runtime, at a fixed address across restarts.
pub struct Collector {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: Option<Server>,
}

impl Collector {
    pub fn start() -> Self {
        let listener = match StdListener::bind("127.0.0.1:0") {
            Ok(l) => l,
            Err(e) => panic!("collector bind: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("collector addr: {e}"),
        };
        let state = Arc::new(State {
            mode: Mutex::new(Mode::Accept),
            bodies: Mutex::new(Vec::new()),
            raw: Mutex::new(Vec::new()),
            tally: Mutex::new(Tally::default()),
            records: AtomicUsize::new(0),
            answers: Mutex::new(Vec::new()),
            resets: AtomicUsize::new(0),
        });
        let server = Some(serve(listener, state.clone()));
        Collector {
            addr,
            state,
            server,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}/ingest", self.addr)
    }

    /// Down: the port is closed (connection refused) and open connections are dropped.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.stop.send(());
            let _ = server.thread.join();
        }
    }

    /// Up again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        // SO_REUSEADDR (std sets it) makes this immediate; the loop only covers a slow close.
        let listener = poll_until(Duration::from_secs(10), || {
            StdListener::bind(self.addr).ok()
        });
        match listener {
            Some(l) => self.server = Some(serve(l, self.state.clone())),
            None => panic!("cannot bind the collector again on {}", self.addr),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = mode;
    }

    /// The records received (answered 200), in arrival order; bodies of 1000 records or more
    /// are counted in the tally but not kept.
    pub fn records(&self) -> Vec<Value> {
        lock(&self.state.bodies)
            .iter()
            .flat_map(|b| b["logs"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    pub fn bodies(&self) -> Vec<Value> {
        lock(&self.state.bodies).clone()
    }

    /// The kept bodies exactly as they arrived.
    pub fn raw_bodies(&self) -> Vec<String> {
        lock(&self.state.raw).clone()
    }

    pub fn answers(&self) -> Vec<(u16, Instant)> {
        lock(&self.state.answers).clone()
    }

    pub fn count_answers(&self, status: u16) -> usize {
        lock(&self.state.answers)
            .iter()
            .filter(|(s, _)| *s == status)
            .count()
    }

    pub fn resets(&self) -> usize {
        self.state.resets.load(Ordering::SeqCst)
    }

    pub fn tally(&self) -> Tally {
        lock(&self.state.tally).clone()
    }

    pub fn has_all(&self, range: Range<u64>) -> bool {
        lock(&self.state.tally).has_all(range)
    }

    pub fn has(&self, n: u64) -> bool {
        lock(&self.state.tally).has(n)
    }

    /// How many records arrived (answered 200).
    pub fn record_count(&self) -> usize {
        self.state.records.load(Ordering::SeqCst)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(listener: StdListener, state: Arc<State>) -> Server {
    if let Err(e) = listener.set_nonblocking(true) {
        panic!("collector nonblocking: {e}");
    }
    let (stop, mut stopped) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("collector runtime: {e}"),
        };
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => panic!("collector listener: {e}"),
            };
            // Dropped (aborting every connection) when the collector stops.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let stream = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                if *lock(&state.mode) == Mode::Reset {
                    state.resets.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                    continue;
                }
                let state = state.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move { answer(req, &state).await }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    Server { stop, thread }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    state: &State,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mode = *lock(&state.mode);
    let status = match mode {
        // An error from the service makes hyper drop the connection without an answer.
        Mode::Reset => {
            state.resets.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::other("reset"));
        }
        Mode::Accept => {
            let v: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => panic!(
                    "the forwarder sent a body that is not JSON ({e}): {}",
                    String::from_utf8_lossy(&body[..body.len().min(500)])
                ),
            };
            let logs = v["logs"].as_array().cloned().unwrap_or_default();
            state.records.fetch_add(logs.len(), Ordering::SeqCst);
            lock(&state.tally).add(&logs);
            // Big bodies are only counted: keeping 100k records would slow the test down.
            if logs.len() < 1000 && lock(&state.bodies).len() < 10_000 {
                lock(&state.bodies).push(v);
                lock(&state.raw).push(String::from_utf8_lossy(&body).into_owned());
            }
            200
        }
        Mode::Fail(status, _) => status,
    };
    lock(&state.answers).push((status, Instant::now()));
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Mode::Fail(_, Some(secs)) = mode {
        if let Ok(v) = secs.to_string().parse() {
            resp.headers_mut().insert("retry-after", v);
        }
    }
    Ok(resp)
}

/// How often each sequence number arrived.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub counts: BTreeMap<u64, usize>,
}

/// The sequence number of a record: the `seq` field of a JSON line, or `seq=N` in a plain one.
pub fn seq_of(record: &Value) -> Option<u64> {
    if let Some(n) = record["seq"].as_u64() {
        return Some(n);
    }
    let msg = record["message"].as_str()?;
    let at = msg.find("seq=")? + 4;
    let digits: String = msg[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl Tally {
    pub fn of(records: &[Value]) -> Self {
        let mut t = Tally::default();
        t.add(records);
        t
    }

    pub fn add(&mut self, records: &[Value]) {
        for r in records {
            if let Some(n) = seq_of(r) {
                *self.counts.entry(n).or_insert(0) += 1;
            }
        }
    }

    pub fn missing(&self, range: Range<u64>) -> Vec<u64> {
        range.filter(|n| !self.counts.contains_key(n)).collect()
    }

    pub fn has_all(&self, range: Range<u64>) -> bool {
        range.clone().all(|n| self.counts.contains_key(&n))
    }

    pub fn has(&self, n: u64) -> bool {
        self.counts.contains_key(&n)
    }

    /// Records beyond the first for each number.
    pub fn duplicates(&self) -> usize {
        self.counts.values().map(|c| c - 1).sum()
    }

    pub fn duplicated(&self) -> Vec<u64> {
        self.counts
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Numbers outside `range` (would mean garbage or a line split in two).
    pub fn strays(&self, range: Range<u64>) -> Vec<u64> {
        self.counts
            .keys()
            .filter(|n| !range.contains(n))
            .copied()
            .collect()
    }
}

/// Short description of a list of numbers for failure messages: count and the first few.
pub fn summary(ns: &[u64]) -> String {
    let head: Vec<_> = ns.iter().take(20).collect();
    format!("{} (first: {head:?})", ns.len())
}

/// The app: appends numbered lines to the log, and rotates it the ways logrotate does.
pub struct Writer {
    path: PathBuf,
    file: File,
    pub next: u64,
}

fn open_append(path: &Path) -> File {
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => f,
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

impl Writer {
    pub fn create(path: &Path) -> Self {
        Writer {
            path: path.to_path_buf(),
            file: open_append(path),
            next: 0,
        }
    }

    /// `n` JSON lines with the next sequence numbers, in one write per 64 lines (as a buffered
    /// logger would); returns their numbers.
    pub fn write(&mut self, n: u64) -> Range<u64> {
        let first = self.next;
        let mut text = String::new();
        for seq in first..first + n {
            text.push_str(&format!(
                "{{\"seq\":{seq},\"level\":\"INFO\",\"msg\":\"line {seq} of the test, padded to a realistic length\"}}\n"
            ));
            if text.len() > 8000 {
                self.raw(text.as_bytes());
                text.clear();
            }
        }
        self.raw(text.as_bytes());
        self.next = first + n;
        first..self.next
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.file.write_all(bytes) {
            panic!("write {}: {e}", self.path.display());
        }
    }

    /// logrotate `create`: rename the file away; the app keeps writing to its open descriptor
    /// until [`Writer::reopen`].
    pub fn rename_to(&mut self, name: &str) {
        let to = self.path.with_file_name(name);
        if let Err(e) = fs::rename(&self.path, &to) {
            panic!("rename to {}: {e}", to.display());
        }
    }

    /// The app reopens its log (after SIGHUP): a new file at the path.
    pub fn reopen(&mut self) {
        self.file = open_append(&self.path);
    }

    /// logrotate `copytruncate`: copy the content away, truncate the file in place; the app's
    /// O_APPEND descriptor goes on at offset 0.
    pub fn copytruncate(&mut self, name: &str) {
        let to = self.path.with_file_name(name);
        if let Err(e) = fs::copy(&self.path, &to) {
            panic!("copy to {}: {e}", to.display());
        }
        if let Err(e) = self.file.set_len(0) {
            panic!("truncate {}: {e}", self.path.display());
        }
    }
}

/// A running `sidecar logs`.
pub struct Forwarder {
    child: Child,
    pub pid: u32,
    pub stderr: PathBuf,
}

impl Forwarder {
    /// Starts `sidecar logs --file <log> --endpoint <collector> --service test` + [`FAST`]
    /// overridden by `extra`, with a clean environment; stderr goes to `<scratch>/forwarder-<n>.stderr`.
    pub fn start(scratch: &Scratch, collector: &Collector, extra: &[&str]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let stderr = scratch.root().join(format!(
            "forwarder-{}.stderr",
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let err_file = match File::create(&stderr) {
            Ok(f) => f,
            Err(e) => panic!("create {}: {e}", stderr.display()),
        };
        let log = scratch.log();
        let endpoint = collector.endpoint();
        let mut args: Vec<&str> = vec![
            "logs",
            "--file",
            log.to_str().unwrap_or_default(),
            "--endpoint",
            &endpoint,
            "--service",
            "test",
        ];
        // FAST's flag/value pairs, except those `extra` sets itself (clap refuses repeats).
        for pair in FAST.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend_from_slice(pair);
            }
        }
        args.extend_from_slice(extra);
        let child = Command::new(sidecar_bin())
            .args(&args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("SIDECAR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => panic!("spawn sidecar logs: {e}"),
        };
        let pid = child.id();
        Forwarder { child, pid, stderr }
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Panics (with its stderr) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "sidecar logs exited early ({status}):\n{}",
                self.stderr_text()
            );
        }
    }

    pub fn kill9(&mut self) {
        // SAFETY: a signal to our own child, which has not been reaped yet (so the pid is its).
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (panics if it does not exit within `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        // SAFETY: as in kill9.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        match poll_until(timeout, || self.child.try_wait().ok().flatten()) {
            Some(s) => s,
            None => {
                self.kill9();
                panic!(
                    "sidecar logs did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.stderr_text()
                );
            }
        }
    }

    /// Bytes the process has read with read(2)/pread(2) so far (/proc/<pid>/io `rchar`).
    pub fn rchar(&self) -> u64 {
        proc_field(&format!("/proc/{}/io", self.pid), "rchar:")
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_field(&format!("/proc/{}/status", self.pid), "VmRSS:")
    }
}

fn proc_field(path: &str, key: &str) -> u64 {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {path}"))
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- sidecar logs stderr ({}) ---\n{}",
                self.stderr.display(),
                self.stderr_text()
            );
        }
    }
}

/// Waits until every number in `range` has arrived; on timeout panics with what is missing.
pub fn wait_for_all(collector: &Collector, range: Range<u64>, what: &str) {
    let ok = eventually(WAIT, || collector.has_all(range.clone()));
    if !ok {
        let t = collector.tally();
        panic!(
            "{what}: lines still missing after {WAIT:?}: {}",
            summary(&t.missing(range))
        );
    }
}

/// Waits until `n` has arrived.
pub fn wait_for_seq(collector: &Collector, n: u64, what: &str) {
    if !eventually(WAIT, || collector.has(n)) {
        panic!("{what}: line {n} did not arrive within {WAIT:?}");
    }
}
