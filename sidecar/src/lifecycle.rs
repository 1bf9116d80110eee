//! Readiness, shutdown triggers and the drain: when the sidecar says it is ready, what makes it
//! stop, and the order in which it lets go of the app's traffic.
//!
//! Readiness is a set of latches (linkerd's idea): the listeners are bound, the pod's interception
//! is in place (`--pin-dir`), the app answers its probe (`--app-probe`); ready when all that are
//! configured hold and no drain has started.
//!
//! The drain (SIGTERM, `POST /shutdown`, the app exiting, the shutdown file):
//! 1. `/ready` turns false;
//! 2. inbound listeners close (the backlog is accepted first, so no connection the kernel already
//!    accepted is reset); in-flight inbound requests finish, kept-alive connections close;
//! 3. outbound keeps working until every inbound connection is done, `--drain-min` has passed,
//!    the app has no outbound connection open (and, with `--exit-with-app`, has exited);
//! 4. outbound stops; what is still open may finish; exit 0.
//!
//! Everything after step 1 is bounded by `--drain-timeout`; a second SIGTERM/SIGINT ends at once.
//!
//! In Kubernetes:
//! - **Start order.** As a native sidecar (what `sidecar inject` writes) the proxy's startup
//!   probe on `/live` holds the app's containers until the listeners are bound. `/ready` also
//!   covers the interception when the proxy container mounts the node's pin root read-only
//!   (bpffs `/sys/fs/bpf`, `subPath: sidecar`, at `/host/sys/fs/bpf/sidecar`: not the whole bpffs,
//!   which systemd mounts mode 700) and gets
//!   `SIDECAR_PIN_DIR=/host/sys/fs/bpf/sidecar/$(POD_UID)` (`POD_UID` from `metadata.uid`). As a
//!   classic sidecar container, start the app with `sidecar wait-ready --timeout 60s && exec app`,
//!   or put `sidecar wait-ready` in the proxy container's `postStart` hook (the kubelet starts the
//!   next container only once it returns).
//! - **Jobs.** Native sidecars need nothing: once the Job's containers have exited the kubelet
//!   sends SIGTERM, and the proxy, with no app connection left, exits at once. With a classic
//!   sidecar container, end the app's command with one of: `sidecar shutdown` (or
//!   `curl -X POST http://127.0.0.1:15090/shutdown`); `touch /var/run/sidecar/done` with
//!   `--shutdown-file /var/run/sidecar/done` and an `emptyDir` mounted in both containers; or,
//!   with `shareProcessNamespace: true`, `--exit-with-app /var/run/sidecar/app.pid` and the app
//!   writing its PID there (`echo $$ > /var/run/sidecar/app.pid; exec app`).
//! - **Rollouts.** The kubelet sends SIGTERM and takes the pod out of the endpoints at the same
//!   time; requests already accepted are answered, later ones are refused by the kernel and
//!   retried elsewhere by the client. Keep `--drain-timeout` below the pod's
//!   `terminationGracePeriodSeconds`. Classic sidecars, whose app gets SIGTERM at the same moment,
//!   should set `--drain-min` (a few seconds) so that the app can still call out while it stops.
pub mod client;
pub mod gauges;
mod watch;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::metrics::conn::ActiveConns;
use crate::metrics::Dir;
use crate::pins::{self, REQUIRED_LINKS};

pub use watch::{watch_app, watch_shutdown_file, AppTarget};

/// Default poll interval of the app probe and the interception check: as Kubernetes' shortest
/// probe period, so readiness follows the app within a second without measurable cost.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe that has not answered in this long has failed (Kubernetes' default probe timeout).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the sidecar started to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    Signal(&'static str),
    /// `POST /shutdown` from this loopback peer.
    Admin(SocketAddr),
    /// The `--exit-with-app` process exited.
    AppExited(u32),
    /// The `--shutdown-file` appeared.
    ShutdownFile(PathBuf),
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Signal(name) => write!(f, "{name}"),
            Trigger::Admin(peer) => write!(f, "POST /shutdown from {peer}"),
            Trigger::AppExited(pid) => write!(f, "the app (pid {pid}) exited"),
            Trigger::ShutdownFile(path) => write!(f, "{} appeared", path.display()),
        }
    }
}

/// One readiness condition: `None` while it holds, else why not.
struct Condition {
    required: bool,
    problem: Mutex<Option<String>>,
}

impl Condition {
    fn new(required: bool, initially: &str) -> Self {
        Condition {
            required,
            problem: Mutex::new(required.then(|| initially.to_owned())),
        }
    }

    fn set(&self, result: Result<(), String>) {
        // A poisoned lock only means a panic elsewhere while holding it; the value is a string.
        *self.problem.lock().unwrap_or_else(PoisonError::into_inner) = result.err();
    }

    fn problem(&self) -> Option<String> {
        if !self.required {
            return None;
        }
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The readiness latches. Checked by `/ready` (rarely), so plain locks are fine.
pub struct Readiness {
    listeners: Condition,
    interception: Condition,
    app: Condition,
    /// Inbound at its connection limit: new clients are being refused, send them elsewhere.
    load: Condition,
    /// A strict mTLS port and no valid workload identity (or one about to expire).
    identity: Condition,
    draining: AtomicBool,
}

impl Readiness {
    /// `interception`/`app`: whether those conditions are checked at all.
    pub fn new(interception: bool, app: bool) -> Readiness {
        Readiness {
            listeners: Condition::new(true, "listeners not bound yet"),
            interception: Condition::new(interception, "interception not checked yet"),
            app: Condition::new(app, "app not probed yet"),
            load: Condition {
                required: true,
                problem: Mutex::new(None),
            },
            identity: Condition {
                required: false,
                problem: Mutex::new(None),
            },
            draining: AtomicBool::new(false),
        }
    }

    /// Checks the workload identity too (`--identity-dir`).
    pub fn with_identity(mut self) -> Readiness {
        self.identity.required = true;
        self
    }

    /// `Err` while a strict mTLS port has no valid identity, or it expires within the margin.
    pub fn set_identity(&self, result: Result<(), String>) {
        self.identity.set(result);
    }

    pub fn set_listening(&self) {
        self.listeners.set(Ok(()));
    }

    pub fn set_interception(&self, result: Result<(), String>) {
        self.interception.set(result);
    }

    pub fn set_app(&self, result: Result<(), String>) {
        self.app.set(result);
    }

    /// `Err` while inbound is at its connection limit (`--max-downstream-connections`).
    pub fn set_load(&self, result: Result<(), String>) {
        self.load.set(result);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// True once the listeners are bound (what `/live` reports).
    pub fn is_listening(&self) -> bool {
        self.listeners.problem().is_none()
    }

    /// Every checked condition and whether it holds now (`draining` holds while not draining);
    /// conditions that are not checked (no `--pin-dir`, no `--app-probe`) are left out.
    pub fn conditions(&self) -> Vec<(&'static str, bool)> {
        let mut all = vec![("draining", !self.is_draining())];
        for (name, c) in [
            ("listeners", &self.listeners),
            ("interception", &self.interception),
            ("app", &self.app),
            ("load", &self.load),
            ("identity", &self.identity),
        ] {
            if c.required {
                all.push((name, c.problem().is_none()));
            }
        }
        all
    }

    /// `Ok` when ready, else every unmet condition.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.is_draining() {
            problems.push("draining (shutting down)".to_owned());
        }
        for (name, c) in [
            ("listeners", &self.listeners),
            ("interception", &self.interception),
            ("app", &self.app),
            ("load", &self.load),
            ("identity", &self.identity),
        ] {
            if let Some(p) = c.problem() {
                problems.push(format!("{name}: {p}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// `--app-probe`: how to tell that the app is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppProbe {
    /// GET `path` from `authority` (host:port); 200-399 is ready, as Kubernetes' httpGet.
    Http { authority: String, path: String },
    /// A TCP connect to `authority` succeeds.
    Tcp { authority: String },
}

impl AppProbe {
    /// `http://HOST:PORT/PATH` or `tcp://HOST:PORT`.
    pub fn parse(value: &str) -> Result<AppProbe, String> {
        let hint =
            "expected http://HOST:PORT/PATH or tcp://HOST:PORT, e.g. http://127.0.0.1:8080/healthz";
        let value = value.trim();
        let (scheme, rest) = value.split_once("://").ok_or_else(|| hint.to_owned())?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let port_ok = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            return Err(format!("{authority:?} needs a host and a port; {hint}"));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "http" => {
                if path
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                {
                    return Err(format!(
                        "the path {path:?} has spaces or control characters"
                    ));
                }
                Ok(AppProbe::Http {
                    authority: authority.to_owned(),
                    path: path.to_owned(),
                })
            }
            "tcp" if path == "/" => Ok(AppProbe::Tcp {
                authority: authority.to_owned(),
            }),
            "tcp" => Err(format!("a tcp probe has no path; {hint}")),
            _ => Err(hint.to_owned()),
        }
    }

    /// One probe; `Err` says why the app is not ready.
    pub async fn probe(&self) -> Result<(), String> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.probe_inner()).await {
            Ok(result) => result,
            Err(_) => Err(format!("{self}: no answer within {PROBE_TIMEOUT:?}")),
        }
    }

    async fn probe_inner(&self) -> Result<(), String> {
        let authority = match self {
            AppProbe::Http { authority, .. } | AppProbe::Tcp { authority } => authority,
        };
        let mut stream = TcpStream::connect(authority.as_str())
            .await
            .map_err(|e| format!("{self}: {e}"))?;
        let AppProbe::Http { path, .. } = self else {
            return Ok(());
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: sidecar-probe\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{self}: {e}"))?;
        let status = read_status(&mut stream)
            .await
            .map_err(|e| format!("{self}: {e}"))?;
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("{self}: status {status}"))
        }
    }
}

impl fmt::Display for AppProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppProbe::Http { authority, path } => write!(f, "http://{authority}{path}"),
            AppProbe::Tcp { authority } => write!(f, "tcp://{authority}"),
        }
    }
}

/// Reads an HTTP/1 status line (bounded) and returns its code.
pub(crate) async fn read_status(stream: &mut TcpStream) -> io::Result<u16> {
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status(&head).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&head[..head.len().min(40)])
            ),
        )
    })
}

/// The code of `HTTP/1.x NNN ...`.
pub(crate) fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// `Ok` when the pod's interception is in place: the outbound link pins exist in `pin_dir`, and
/// (with `inbound_listeners` > 0) the kernel has that many of the proxy's inbound listeners
/// registered: its counters say how many it registered and how many of those closed. A re-run
/// of `init` that could not keep the listener map, for one, leaves none registered.
pub fn check_interception(pin_dir: &Path, inbound_listeners: usize) -> Result<(), String> {
    check_links(pin_dir)?;
    if inbound_listeners == 0 {
        return Ok(());
    }
    // Unreadable counters (a kernel before 6.5): not known, so not held against readiness.
    let Ok(totals) =
        crate::metrics::ebpf::read_stats(&pins::map(pin_dir, sidecar_common::maps::STATS))
    else {
        return Ok(());
    };
    let seen = totals[sidecar_common::stats::INBOUND_LISTENER_SEEN as usize];
    let gone = totals[sidecar_common::stats::INBOUND_LISTENER_GONE as usize];
    let registered = seen.saturating_sub(gone);
    if registered >= inbound_listeners as u64 {
        Ok(())
    } else {
        Err(format!(
            "inbound capture: {registered} of the proxy's {inbound_listeners} inbound listeners are registered with the kernel (was `sidecar init` re-run without keeping its maps? restart the proxy)"
        ))
    }
}

/// The outbound link pins exist in `pin_dir`.
fn check_links(pin_dir: &Path) -> Result<(), String> {
    let mut missing = Vec::new();
    for prog in REQUIRED_LINKS {
        let pin = pins::link(pin_dir, prog);
        match std::fs::metadata(&pin) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(prog),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(format!(
                    "cannot look into {}: {e} (the pin directories must be searchable by the \
                     proxy's user: mode 0755)",
                    pin_dir.display()
                ))
            }
            Err(e) => return Err(format!("cannot check {}: {e}", pin.display())),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else if missing.len() == REQUIRED_LINKS.len() {
        Err(format!(
            "nothing attached: no link pins in {} (has `sidecar init` run for this pod?)",
            pin_dir.display()
        ))
    } else {
        Err(format!(
            "incomplete: {} missing in {}",
            missing.join(", "),
            pin_dir.display()
        ))
    }
}

/// Keeps the interception, app and load conditions up to date, every `interval`, until the
/// drain. `load` says whether inbound is at its connection limit (the proxy's answer).
pub async fn keep_checking(
    readiness: &Readiness,
    pin_dir: Option<PathBuf>,
    inbound_listeners: usize,
    probe: Option<AppProbe>,
    interval: Duration,
    load: impl Fn() -> Result<(), String>,
    identity: impl Fn() -> Result<(), String>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ready = None;
    loop {
        ticks.tick().await;
        if readiness.is_draining() {
            return;
        }
        if let Some(dir) = &pin_dir {
            readiness.set_interception(check_interception(dir, inbound_listeners));
        }
        if let Some(probe) = &probe {
            readiness.set_app(probe.probe().await);
        }
        readiness.set_load(load());
        readiness.set_identity(identity());
        let now = readiness.check();
        if was_ready.as_ref() != Some(&now.is_ok()) {
            match &now {
                Ok(()) => tracing::info!("ready"),
                Err(problems) => tracing::info!(problems = %problems.join("; "), "not ready"),
            }
            was_ready = Some(now.is_ok());
        }
    }
}

/// Tells a connection's drain when its first request has started. hyper's HTTP/1
/// `graceful_shutdown` closes at once a connection it has not read anything from, even when the
/// client's request is already waiting in the socket (protocol detection only peeked at it): a
/// connection accepted just before a drain would lose its request. So the drain lets the first
/// request start before it asks hyper to shut the connection down.
#[derive(Default)]
pub(crate) struct FirstRequest {
    seen: AtomicBool,
    notify: tokio::sync::Notify,
}

impl FirstRequest {
    /// Called by the service for every request: one relaxed load after the first.
    pub(crate) fn mark(&self) {
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Release);
            // Stores a permit if nobody waits yet, so `wait` cannot miss it.
            self.notify.notify_one();
        }
    }

    /// Returns once the first request has started, or after `limit` (a client that sent part
    /// of a request head and stalled).
    pub(crate) async fn wait(&self, limit: Duration) {
        if self.seen.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(limit, self.notify.notified()).await;
    }
}

/// Serves one HTTP connection (`conn`) until it ends; once `stop` fires, lets its first request
/// start (see [`FirstRequest`]), then asks it to shut down gracefully: the request in progress
/// is answered, and the connection closes instead of waiting for another.
pub(crate) async fn serve_until_drained<C: std::future::Future>(
    mut conn: std::pin::Pin<&mut C>,
    stop: &tokio_util::sync::CancellationToken,
    first: &FirstRequest,
    limit: Duration,
    graceful_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> C::Output {
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = stop.cancelled() => {}
    }
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = first.wait(limit) => {}
    }
    graceful_shutdown(conn.as_mut());
    conn.await
}

/// How the drain goes; see the module documentation.
#[derive(Debug, Clone)]
pub struct DrainPlan {
    /// Bound on everything after `/ready` turned false.
    pub deadline: Duration,
    /// Outbound stays open at least this long (for apps that get SIGTERM at the same time and
    /// still call out while they stop).
    pub min: Duration,
}

/// How the drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished.
    Drained,
    /// The deadline passed; `open` connections were still open (they are cut).
    DeadlineReached { inbound: usize, outbound: usize },
    /// A second signal.
    Forced(&'static str),
}

/// What the drain needs from the proxy. The proxy implements it: lifecycle is a layer the proxy
/// reports to (readiness, connection counts, [`serve_until_drained`]), never one that imports
/// the proxy back.
pub trait Drainable {
    /// Step 2: inbound listeners accept what is queued, then close; their HTTP connections
    /// finish the request in progress and close.
    fn stop_inbound(&self);
    /// Step 4: the same for every listener.
    fn stop_all(&self);
    /// Open downstream connections of `dir`.
    fn active(&self, dir: Dir) -> &ActiveConns;
    /// Resolves once every connection task has ended (after [`Drainable::stop_all`]).
    fn wait_all(&self) -> impl std::future::Future<Output = ()> + '_;
}

/// Runs the drain (steps 1-4 of the module documentation) on `proxy`. `app_done` resolves when
/// the app is known to have exited (pending forever when nobody watches it); `force` when a
/// second signal arrives.
pub async fn drain(
    proxy: &impl Drainable,
    readiness: &Readiness,
    plan: &DrainPlan,
    app_done: impl std::future::Future<Output = ()>,
    watching_app: bool,
    force: impl std::future::Future<Output = &'static str>,
) -> DrainOutcome {
    let started = Instant::now();
    readiness.set_draining();
    proxy.stop_inbound();
    let steps = async {
        proxy.active(Dir::Inbound).wait_idle().await;
        tracing::debug!("inbound drained");
        tokio::time::sleep_until(started + plan.min).await;
        if watching_app {
            app_done.await;
            tracing::debug!("the app has exited");
        }
        proxy.active(Dir::Outbound).wait_idle().await;
        tracing::debug!("the app has no outbound connection open; stopping outbound");
        proxy.stop_all();
        proxy.wait_all().await;
    };
    tokio::select! {
        biased;
        signal = force => DrainOutcome::Forced(signal),
        done = tokio::time::timeout_at(started + plan.deadline, steps) => match done {
            Ok(()) => DrainOutcome::Drained,
            Err(_) => DrainOutcome::DeadlineReached {
                inbound: proxy.active(Dir::Inbound).get(),
                outbound: proxy.active(Dir::Outbound).get(),
            },
        },
    }
}

#[cfg(test)]
mod tests;
