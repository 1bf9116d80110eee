//! The proxy's Prometheus metrics: HTTP requests, TCP connections and bytes, errors the proxy
//! answered itself, the process, and the kernel's interception counters. `sidecar run` registers
//! them in `prometheus::default_registry()`, which the admin port serves on `/metrics`.
//!
//! The request path only touches pre-resolved handles, so that recording a request neither locks
//! nor allocates: a connection resolves its [`DestinationMetrics`] once (one read lock per
//! connection, not per request), and each destination keeps a small lock-free cache of
//! (method, status) children. Label cardinality is bounded: at most `max_destinations` distinct
//! destinations, then `destination="other"`; methods outside the standard set are `other`.
//!
//! Size: about 630 lines: the families are declared, registered and resolved in one
//! constructor, so that a family cannot be declared and left unregistered.
pub mod access;
pub mod conn;
pub mod ebpf;
pub mod process;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use http::{Method, StatusCode};

use crate::error::ProxyError;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Distinct `destination` label values before new destinations are counted as `other`: enough for
/// a service's real dependencies, small enough that a client scanning addresses cannot blow up
/// the scrape (every destination costs a few series per method and status).
pub const DEFAULT_MAX_DESTINATIONS: usize = 100;
/// The `destination` of everything past the cap.
pub const OVERFLOW_DESTINATION: &str = "other";
/// The `method` of requests whose method is not one of the nine standard ones.
pub const OTHER_METHOD: &str = "other";

/// Request duration buckets (seconds): a sidecar hop is usually well under a millisecond, and the
/// upper end covers the default 30 s request timeout.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// (method, status) children cached per destination; past this, recording falls back to the
/// registry's own (hashing, read-locked) lookup, still allocation-free for existing series.
const SLOTS: usize = 32;

/// Which way traffic goes, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From the network to the app (and `--target` mode, which fronts one service).
    Inbound,
    /// From the app to the network.
    Outbound,
}

impl Dir {
    pub const ALL: [Dir; 2] = [Dir::Inbound, Dir::Outbound];

    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Inbound => "inbound",
            Dir::Outbound => "outbound",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Dir::Inbound => 0,
            Dir::Outbound => 1,
        }
    }
}

/// Connection and byte counters of one direction (downstream side: the connections the proxy
/// accepted, and the bytes it read from and wrote to them).
#[derive(Clone)]
pub struct ConnMetrics {
    pub opened: IntCounter,
    pub closed: IntCounter,
    pub active: IntGauge,
    /// Idle kept-alive connections parked (also in `active`).
    pub parked: IntGauge,
    pub received: IntCounter,
    pub sent: IntCounter,
    /// Upstream HTTP/1 connections open in the pool (idle, in use or being dialled).
    pub upstream_open: IntGauge,
    /// Requests that waited for a connection: their destination was at its connection limit.
    pub upstream_waits: IntCounter,
    /// Connections refused at accept: the direction had its maximum open.
    pub refused: IntCounter,
    /// Silent clients not dialled through at once: enough silent ones were already (inbound).
    pub silent_dials_deferred: IntCounter,
}

/// What an upstream connection pool records (the gauges and counters of one direction).
#[derive(Clone)]
pub struct PoolMetrics {
    /// Upstream connections open (idle, in use or being dialled).
    pub open: IntGauge,
    /// Requests that waited because their destination was at its connection limit.
    pub waits: IntCounter,
}

/// How a connection crossed the network: the `mode` of `sidecar_mtls_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshMode {
    Mtls,
    Plaintext,
    /// The app's own TLS, relayed untouched (inbound).
    Passthrough,
}

impl MeshMode {
    pub const ALL: [MeshMode; 3] = [MeshMode::Mtls, MeshMode::Plaintext, MeshMode::Passthrough];

    pub fn as_str(self) -> &'static str {
        match self {
            MeshMode::Mtls => "mtls",
            MeshMode::Plaintext => "plaintext",
            MeshMode::Passthrough => "passthrough",
        }
    }
}

/// Mesh TLS: handshakes, the mode of each connection, fallbacks to plaintext.
#[derive(Clone)]
pub struct MtlsMetrics {
    handshakes: IntCounterVec,
    /// By direction, then [`MeshMode`]: resolved once (counted on every connection).
    connections: [[IntCounter; 3]; 2],
    pub fallbacks: IntCounter,
}

impl MtlsMetrics {
    /// One handshake: `result` is `ok` or why it failed (see `identity::verify::failure_label`).
    pub fn handshake(&self, dir: Dir, result: &str) {
        self.handshakes
            .with_label_values(&[dir.as_str(), result])
            .inc();
    }

    /// One connection, by how it crossed the network.
    pub fn connection(&self, dir: Dir, mode: MeshMode) {
        self.connections[dir.index()][mode as usize].inc();
    }
}

/// What a destination is known by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DestKey {
    /// Interception mode: the original destination.
    Addr(SocketAddr),
    /// `--target` mode: the target's authority.
    Name(Box<str>),
}

/// Every proxy metric family, plus the destination cache.
pub struct ProxyMetrics {
    service: Box<str>,
    requests: IntCounterVec,
    durations: HistogramVec,
    errors: IntCounterVec,
    conns: [ConnMetrics; 2],
    max_destinations: usize,
    destinations: RwLock<HashMap<(Dir, DestKey), Arc<DestinationMetrics>>>,
    overflow: [Arc<DestinationMetrics>; 2],
    pub mtls: MtlsMetrics,
    /// Inbound authorization decisions: `rule`, `action`, `result`.
    pub authz: IntCounterVec,
    /// REST requests transcoded to gRPC: `route` (`/package.Service/Method`), `code`.
    pub transcode: IntCounterVec,
}

impl ProxyMetrics {
    /// Creates the families and registers them in `registry`. Fails if they are already there
    /// (one `ProxyMetrics` per registry).
    pub fn new(
        registry: &Registry,
        service: &str,
        max_destinations: usize,
    ) -> Result<Arc<ProxyMetrics>, prometheus::Error> {
        let labels = ["service", "method", "status", "direction", "destination"];
        let requests = IntCounterVec::new(
            Opts::new(
                "sidecar_requests_total",
                "HTTP requests proxied, by the answer the client got",
            ),
            &labels,
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "sidecar_request_duration_seconds",
                "Time from the request head to the response head, as the client sees it",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &labels,
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "sidecar_proxy_errors_total",
                "Failures the proxy answered or acted on itself, by reason (the x-sidecar-error \
                 code for HTTP)",
            ),
            &["direction", "reason"],
        )?;
        let dir_counter =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["direction"]);
        let opened = dir_counter(
            "sidecar_tcp_connections_opened_total",
            "Connections accepted from downstream (the app outbound, clients inbound)",
        )?;
        let closed = dir_counter(
            "sidecar_tcp_connections_closed_total",
            "Downstream connections that ended",
        )?;
        let active = IntGaugeVec::new(
            Opts::new(
                "sidecar_tcp_connections_active",
                "Downstream connections open now",
            ),
            &["direction"],
        )?;
        let parked = IntGaugeVec::new(
            Opts::new(
                "sidecar_tcp_connections_parked",
                "Idle kept-alive HTTP/1 connections parked: no task, buffer or reactor \
                 registration of their own until they speak (after --park-idle-after); also \
                 counted as active",
            ),
            &["direction"],
        )?;
        let received = dir_counter(
            "sidecar_tcp_received_bytes_total",
            "Bytes read from downstream connections",
        )?;
        let sent = dir_counter(
            "sidecar_tcp_sent_bytes_total",
            "Bytes written to downstream connections",
        )?;
        let refused = dir_counter(
            "sidecar_tcp_connections_refused_total",
            "Downstream connections reset at accept because the direction had \
             --max-downstream-connections open",
        )?;
        let silent_deferred = dir_counter(
            "sidecar_silent_dials_deferred_total",
            "Clients that had said nothing yet, not dialled through to the app at once because \
             256 such were already (inbound): dialled once they speak",
        )?;
        let upstream_open = IntGaugeVec::new(
            Opts::new(
                "sidecar_upstream_connections_open",
                "Pooled upstream HTTP/1 connections open now (idle, in use or being dialled)",
            ),
            &["direction"],
        )?;
        let upstream_waits = dir_counter(
            "sidecar_upstream_connection_waits_total",
            "Requests that queued for an upstream connection because their destination had \
             --max-connections-per-destination open",
        )?;
        let handshakes = IntCounterVec::new(
            Opts::new(
                "sidecar_mtls_handshakes_total",
                "Mesh TLS handshakes, by direction and result (ok, or why it failed: unknown_ca, \
                 expired, wrong_trust_domain, no_spiffe_id, bad_certificate, no_certificate, \
                 identity_mismatch, not_mesh, timeout, error)",
            ),
            &["direction", "result"],
        )?;
        let mtls_conns = IntCounterVec::new(
            Opts::new(
                "sidecar_mtls_connections_total",
                "Connections by mesh mode: mtls, plaintext, or passthrough (the app's own TLS, \
                 inbound)",
            ),
            &["direction", "mode"],
        )?;
        let fallbacks = IntCounter::new(
            "sidecar_mtls_fallbacks_total",
            "Opportunistic mesh TLS that found a peer without a sidecar and went plaintext",
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "sidecar_authz_decisions_total",
                "Inbound authorization decisions, by the deciding rule (default, probe, or a \
                 rule's name), its action and the result (allow, deny, dry_run_deny, \
                 dry_run_allow)",
            ),
            &["rule", "action", "result"],
        )?;
        let transcoded = IntCounterVec::new(
            Opts::new(
                "sidecar_transcode_requests_total",
                "REST/JSON requests transcoded to the app's gRPC methods, by route \
                 (/package.Service/Method) and outcome: the gRPC status name (OK, NOT_FOUND, ...) \
                 or a local refusal (bad_request, too_large; no_route with route=\"none\")",
            ),
            &["route", "code"],
        )?;
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(decisions.clone()),
            Box::new(transcoded.clone()),
            Box::new(handshakes.clone()),
            Box::new(mtls_conns.clone()),
            Box::new(fallbacks.clone()),
            Box::new(upstream_open.clone()),
            Box::new(upstream_waits.clone()),
            Box::new(durations.clone()),
            Box::new(errors.clone()),
            Box::new(opened.clone()),
            Box::new(closed.clone()),
            Box::new(active.clone()),
            Box::new(parked.clone()),
            Box::new(received.clone()),
            Box::new(sent.clone()),
            Box::new(refused.clone()),
            Box::new(silent_deferred.clone()),
        ] {
            registry.register(collector)?;
        }
        let conn = |dir: Dir| -> Result<ConnMetrics, prometheus::Error> {
            let l = [dir.as_str()];
            Ok(ConnMetrics {
                opened: opened.get_metric_with_label_values(&l)?,
                closed: closed.get_metric_with_label_values(&l)?,
                active: active.get_metric_with_label_values(&l)?,
                parked: parked.get_metric_with_label_values(&l)?,
                received: received.get_metric_with_label_values(&l)?,
                sent: sent.get_metric_with_label_values(&l)?,
                upstream_open: upstream_open.get_metric_with_label_values(&l)?,
                upstream_waits: upstream_waits.get_metric_with_label_values(&l)?,
                refused: refused.get_metric_with_label_values(&l)?,
                silent_dials_deferred: silent_deferred.get_metric_with_label_values(&l)?,
            })
        };
        let conns = [conn(Dir::Inbound)?, conn(Dir::Outbound)?];
        let service: Box<str> = service.into();
        let overflow = |dir: Dir| {
            Arc::new(DestinationMetrics::new(
                &service,
                dir,
                OVERFLOW_DESTINATION.into(),
                &requests,
                &durations,
            ))
        };
        let overflow = [overflow(Dir::Inbound), overflow(Dir::Outbound)];
        Ok(Arc::new(ProxyMetrics {
            service,
            requests,
            durations,
            errors,
            conns,
            max_destinations,
            destinations: RwLock::new(HashMap::new()),
            overflow,
            mtls: MtlsMetrics {
                handshakes,
                // Present from the start (at 0): "no mesh traffic yet" is not "no data".
                connections: [Dir::Inbound, Dir::Outbound].map(|dir| {
                    MeshMode::ALL
                        .map(|mode| mtls_conns.with_label_values(&[dir.as_str(), mode.as_str()]))
                }),
                fallbacks,
            },
            authz: decisions,
            transcode: transcoded,
        }))
    }

    /// Metrics that count but are exported nowhere (a registry of their own): for proxies
    /// started programmatically (tests, benchmarks), which may run several per process.
    pub fn unregistered() -> Arc<ProxyMetrics> {
        match ProxyMetrics::new(&Registry::new(), "", DEFAULT_MAX_DESTINATIONS) {
            Ok(m) => m,
            // Only a duplicate or malformed name fails, and a fresh registry has none.
            Err(e) => unreachable!("metrics in a fresh registry: {e}"),
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn max_destinations(&self) -> usize {
        self.max_destinations
    }

    /// The connection counters of `dir`.
    pub fn conns(&self, dir: Dir) -> &ConnMetrics {
        &self.conns[dir.index()]
    }

    /// What the upstream pool of `dir` records.
    pub fn pool(&self, dir: Dir) -> PoolMetrics {
        let c = self.conns(dir);
        PoolMetrics {
            open: c.upstream_open.clone(),
            waits: c.upstream_waits.clone(),
        }
    }

    /// The handles of one original destination (interception mode). Call once per connection.
    pub fn destination(&self, dir: Dir, dst: SocketAddr) -> Arc<DestinationMetrics> {
        self.lookup(dir, DestKey::Addr(dst), || dst.to_string())
    }

    /// The handles of a named destination (`--target` mode). Call once, at start-up.
    pub fn named_destination(&self, dir: Dir, name: &str) -> Arc<DestinationMetrics> {
        self.lookup(dir, DestKey::Name(name.into()), || name.to_owned())
    }

    fn lookup(
        &self,
        dir: Dir,
        key: DestKey,
        label: impl FnOnce() -> String,
    ) -> Arc<DestinationMetrics> {
        let key = (dir, key);
        {
            let map = self
                .destinations
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(d) = map.get(&key) {
                return Arc::clone(d);
            }
            if map.len() >= self.max_destinations {
                return Arc::clone(&self.overflow[dir.index()]);
            }
        }
        // A map of handles cannot be left inconsistent by a panic: poisoning is ignored.
        let mut map = self
            .destinations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = map.get(&key) {
            return Arc::clone(d);
        }
        if map.len() >= self.max_destinations {
            return Arc::clone(&self.overflow[dir.index()]);
        }
        let d = Arc::new(DestinationMetrics::new(
            &self.service,
            dir,
            label().into(),
            &self.requests,
            &self.durations,
        ));
        map.insert(key, Arc::clone(&d));
        d
    }

    /// Counts one failure the proxy answered or acted on itself. Not on the success path, so the
    /// registry's own lookup is fine here.
    pub fn error(&self, dir: Dir, err: ProxyError) {
        if let Ok(c) = self
            .errors
            .get_metric_with_label_values(&[dir.as_str(), err.code()])
        {
            c.inc();
        }
    }
}

impl ProxyMetrics {
    /// How many times `err` was counted for `dir` (for tests and diagnostics).
    pub fn error_count(&self, dir: Dir, err: ProxyError) -> u64 {
        self.errors
            .get_metric_with_label_values(&[dir.as_str(), err.code()])
            .map_or(0, |c| c.get())
    }
}

/// One (method, status) series pair of a destination.
struct Slot {
    key: u32,
    requests: IntCounter,
    duration: prometheus::Histogram,
}

/// The request metrics of one destination and direction.
pub struct DestinationMetrics {
    dir: Dir,
    label: Arc<str>,
    service: Box<str>,
    requests: IntCounterVec,
    durations: HistogramVec,
    slots: [OnceLock<Slot>; SLOTS],
}

impl DestinationMetrics {
    fn new(
        service: &str,
        dir: Dir,
        label: Arc<str>,
        requests: &IntCounterVec,
        durations: &HistogramVec,
    ) -> Self {
        DestinationMetrics {
            dir,
            label,
            service: service.into(),
            requests: requests.clone(),
            durations: durations.clone(),
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// The `destination` label value (the address, or `other` past the cap). Policy metrics use
    /// it so that all destination-labelled series agree.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    pub fn direction(&self) -> Dir {
        self.dir
    }

    fn labels<'a>(&'a self, method: &'a str, status: &'a str) -> [&'a str; 5] {
        [
            &self.service,
            method,
            status,
            self.dir.as_str(),
            &self.label,
        ]
    }

    /// Records one answered request: no lock, no allocation once its (method, status) was seen.
    pub fn record(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        self.record_as(method_label(method), status, elapsed);
    }

    /// [`Self::record`] with the method label already looked up.
    pub(crate) fn record_as(&self, method: MethodLabel, status: StatusCode, elapsed: Duration) {
        let MethodLabel(index, method_label) = method;
        let (code, status_label) = status_label(status);
        let key = (u32::from(index) << 16) | u32::from(code);
        let secs = elapsed.as_secs_f64();
        for slot in &self.slots {
            let slot = slot.get_or_init(|| {
                let labels = self.labels(method_label, status_label.as_str());
                match (
                    self.requests.get_metric_with_label_values(&labels),
                    self.durations.get_metric_with_label_values(&labels),
                ) {
                    (Ok(requests), Ok(duration)) => Slot {
                        key,
                        requests,
                        duration,
                    },
                    // Only a wrong number of labels fails, and there are always five.
                    (Err(e), _) | (_, Err(e)) => unreachable!("request metric labels: {e}"),
                }
            });
            if slot.key == key {
                slot.requests.inc();
                slot.duration.observe(secs);
                return;
            }
        }
        let labels = self.labels(method_label, status_label.as_str());
        if let Ok(c) = self.requests.get_metric_with_label_values(&labels) {
            c.inc();
        }
        if let Ok(h) = self.durations.get_metric_with_label_values(&labels) {
            h.observe(secs);
        }
    }
}

/// The `status` label of a status: the code itself when it is a registered one, else its class
/// (`5xx`): an upstream answering arbitrary codes (100-999) cannot multiply the series. Returns
/// the slot key's code (the class's is `c99`, which no registered code uses) and the label.
fn status_label(status: StatusCode) -> (u16, StatusLabel) {
    if status.canonical_reason().is_some() {
        (status.as_u16(), StatusLabel::Code(status))
    } else {
        let class = status.as_u16() / 100;
        (class * 100 + 99, StatusLabel::Class(class))
    }
}

enum StatusLabel {
    Code(StatusCode),
    Class(u16),
}

impl StatusLabel {
    fn as_str(&self) -> &str {
        const CLASSES: [&str; 10] = [
            "0xx", "1xx", "2xx", "3xx", "4xx", "5xx", "6xx", "7xx", "8xx", "9xx",
        ];
        match self {
            StatusLabel::Code(code) => code.as_str(),
            StatusLabel::Class(class) => CLASSES[usize::from(*class).min(9)],
        }
    }
}

/// A small index and the label of a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MethodLabel(u8, &'static str);

/// Extension methods share `other` (bounded labels).
pub(crate) fn method_label(method: &Method) -> MethodLabel {
    // `as_str` of a standard method is a static string: no allocation, a short compare.
    match method.as_str() {
        "GET" => MethodLabel(0, "GET"),
        "HEAD" => MethodLabel(1, "HEAD"),
        "POST" => MethodLabel(2, "POST"),
        "PUT" => MethodLabel(3, "PUT"),
        "DELETE" => MethodLabel(4, "DELETE"),
        "OPTIONS" => MethodLabel(5, "OPTIONS"),
        "PATCH" => MethodLabel(6, "PATCH"),
        "TRACE" => MethodLabel(7, "TRACE"),
        "CONNECT" => MethodLabel(8, "CONNECT"),
        _ => MethodLabel(9, OTHER_METHOD),
    }
}

/// Registers `collector` in `registry`, logging instead of failing when it is there already (a
/// second start in one process keeps counting; it is just not exported twice).
pub fn register(registry: &Registry, collector: Box<dyn prometheus::core::Collector>, what: &str) {
    if let Err(e) = registry.register(collector) {
        tracing::warn!(metrics = what, error = %e, "metrics not registered");
    }
}

/// The text exposition of everything in `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    out
}

#[cfg(test)]
mod tests;
