//! Traffic policies on the request path, per destination: circuit breaker ([`breaker`]),
//! timeouts, retries with a budget ([`retry`]), and the headers the proxy adds ([`headers`]).
//! Settings come from flags / environment (the defaults) and from a config file with
//! per-destination overrides ([`config_file`]).
//!
//! A destination is the original destination address of an outbound connection, or, when the
//! config file has a rule for a name (`api.example:443`), the request's authority: all requests
//! matching one rule share one breaker and one retry budget (as Envoy clusters do). In `--target`
//! mode it is the target. Inbound requests (to the app) get the timeouts and headers but no
//! breaker and no retries: the app is local, and refusing its clients because it failed a few
//! times would turn a partial outage into a total one.
//!
//! The hot path: a connection resolves its [`Destination`] once (a hash lookup under a sharded
//! mutex); each request then takes the breaker's mutex twice (ask, report) and the budget's once,
//! never across an await, and allocates nothing for policy unless it is retried.
pub mod breaker;
pub mod config_file;
pub mod exchange;
pub mod headers;
pub mod idle;
pub mod retry;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use http::StatusCode;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::error::{FailureKind, ProxyError};
use breaker::{Breaker, BreakerConfig, Outcome, Permit, Rejected, State, Transition};
use retry::Budget;
pub use retry::{FailureSet, RetryConfig};

/// Connect timeout: an upstream that has not completed a handshake in 1 s on a cluster network is
/// almost certainly gone; failing fast lets the caller retry elsewhere.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time for the response head; 30 s as in the seed proxy. Bodies may stream for longer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent upstream connections per destination (and direction) unless configured (flag, or
/// `max_connections` in the config file's `[defaults]` or a `[[destination]]`): enough
/// for a busy service's fan-in to one dependency; past it, requests queue for a connection
/// instead of opening more (each costs the upstream a socket and the proxy ~30 KiB).
pub const DEFAULT_MAX_CONNECTIONS_PER_DESTINATION: usize = 128;
/// The seed proxy's breaker: 5 failures in a row open it...
pub const DEFAULT_BREAKER_CONSECUTIVE_FAILURES: u32 = 5;
/// ...for 10 s.
pub const DEFAULT_BREAKER_OPEN_TIME: Duration = Duration::from_secs(10);
/// Repeated trips double the open time up to this (Envoy's default maximum ejection time): a
/// destination that stays down is probed every 5 minutes, not every 10 s.
pub const DEFAULT_BREAKER_MAX_OPEN_TIME: Duration = Duration::from_secs(300);
/// One probe at a time while half-open (Hystrix): the least load on a recovering upstream.
pub const DEFAULT_BREAKER_HALF_OPEN_PROBES: u32 = 1;
/// Failure-rate trigger (off unless a rate is set): Hystrix's rolling window and volume threshold.
pub const DEFAULT_BREAKER_FAILURE_RATE_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_BREAKER_FAILURE_RATE_MIN_REQUESTS: u32 = 20;
/// Idle opaque TCP connections (and upgraded ones, like WebSockets) are closed after this
/// (Envoy's TCP proxy default): long enough for a database pool's quiet hours, short enough to
/// reclaim connections whose peer vanished without a FIN.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Retries per request (the first attempt is not counted): two more chances, bounded by the budget.
pub const DEFAULT_MAX_RETRIES: u32 = 2;
/// linkerd's retry budget: retries may add at most 20 % load...
pub const DEFAULT_RETRY_BUDGET_RATIO: f64 = 0.2;
/// ...plus 10 retries per second, so that low-traffic destinations can retry at all...
pub const DEFAULT_RETRY_BUDGET_MIN_PER_SECOND: u32 = 10;
/// ...counted over 10 s.
pub const DEFAULT_RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Request bodies kept for replay (linkerd's bound): larger bodies stream and are not retried.
pub const DEFAULT_RETRY_MAX_BODY_BYTES: usize = 64 * 1024;
/// Envoy's base retry interval; the pause is jittered and grows per retry.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Learned destinations are kept in this many independently locked maps (less contention on a
/// multi-threaded runtime)...
const SHARDS: usize = 16;
/// ...of up to this many entries each, beyond which destinations that hold nothing worth keeping
/// (breaker closed and clean, not in use) are forgotten.
const SHARD_SOFT_CAP: usize = 1024;

/// Everything that applies to one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationPolicy {
    pub connect_timeout: Duration,
    /// From the request head to the response head, retries included (answers 504).
    pub request_timeout: Duration,
    /// Opaque TCP and upgraded connections with no bytes either way for this long are closed.
    pub idle_timeout: Duration,
    pub breaker: BreakerConfig,
    /// What the breaker counts as a failure.
    pub failure_on: FailureSet,
    pub retry: RetryConfig,
    /// Upstream HTTP/1 connections to this destination at most; more requests queue for one.
    pub max_connections: usize,
}

impl Default for DestinationPolicy {
    fn default() -> Self {
        DestinationPolicy {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            breaker: BreakerConfig::default(),
            failure_on: FailureSet::breaker_default(),
            retry: RetryConfig::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS_PER_DESTINATION,
        }
    }
}

/// Which requests a `[[destination]]` rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// An original destination address (`10.0.0.7:80`, `[fd00::7]:443`).
    Addr(SocketAddr),
    /// A request authority, host lower-cased (`api.example`, 443). A request without a port in
    /// its authority is matched with its connection's destination port.
    Authority { host: Box<str>, port: u16 },
}

impl Match {
    /// Parses `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`.
    pub fn parse(text: &str) -> Result<Match, String> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Match::Addr(addr));
        }
        let hint =
            "expected IP:PORT, [IPv6]:PORT or HOST:PORT, e.g. 10.0.0.7:80 or api.example:443";
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("missing port; {hint}"));
        };
        let port: u16 = match port.parse() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{port:?} is not a port; {hint}")),
        };
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            && host.parse::<IpAddr>().is_err();
        if !valid_host {
            return Err(format!("{host:?} is not a host name; {hint}"));
        }
        Ok(Match::Authority {
            host: host.to_ascii_lowercase().into(),
            port,
        })
    }
}

impl std::fmt::Display for Match {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Match::Addr(a) => write!(f, "{a}"),
            Match::Authority { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// One `[[destination]]` rule, resolved (the defaults with its overrides applied).
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationRule {
    pub matcher: Match,
    pub policy: DestinationPolicy,
}

/// The policy configuration of a proxy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyConfig {
    /// For every destination without a rule.
    pub defaults: DestinationPolicy,
    /// In file order; the first rule matching a destination applies.
    pub destinations: Vec<DestinationRule>,
}

/// The policy metric families. One set per process, registered in the default registry, shared
/// by every proxy the process runs (tests start several).
struct PolicyMetrics {
    state: IntGaugeVec,
    transitions: IntCounterVec,
    retries: IntCounterVec,
    budget_exhausted: IntCounter,
}

static METRICS: LazyLock<PolicyMetrics> = LazyLock::new(|| {
    let registry = prometheus::default_registry();
    // Names and label sets are constants: creating the families cannot fail.
    let state = IntGaugeVec::new(
        Opts::new(
            "sidecar_breaker_state",
            "Circuit breaker state per destination: 0 closed, 1 open, 2 half-open",
        ),
        &["destination"],
    );
    let transitions = IntCounterVec::new(
        Opts::new(
            "sidecar_breaker_transitions_total",
            "Circuit breaker state changes, by the state entered",
        ),
        &["destination", "to"],
    );
    let retries = IntCounterVec::new(
        Opts::new(
            "sidecar_retries_total",
            "Requests sent again after a failed attempt",
        ),
        &["destination"],
    );
    let budget_exhausted = IntCounter::new(
        "sidecar_retry_budget_exhausted_total",
        "Retries not made because the destination's retry budget was spent",
    );
    match (state, transitions, retries, budget_exhausted) {
        (Ok(state), Ok(transitions), Ok(retries), Ok(budget_exhausted)) => {
            for (collector, what) in [
                (
                    Box::new(state.clone()) as Box<dyn prometheus::core::Collector>,
                    "sidecar_breaker_state",
                ),
                (
                    Box::new(transitions.clone()),
                    "sidecar_breaker_transitions_total",
                ),
                (Box::new(retries.clone()), "sidecar_retries_total"),
                (
                    Box::new(budget_exhausted.clone()),
                    "sidecar_retry_budget_exhausted_total",
                ),
            ] {
                crate::metrics::register(registry, collector, what);
            }
            PolicyMetrics {
                state,
                transitions,
                retries,
                budget_exhausted,
            }
        }
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
            unreachable!("policy metric definitions are constant: {e}")
        }
    }
});

/// One destination's metric handles, resolved once.
struct Stats {
    /// `None` for the overflow label: one gauge cannot show the state of many breakers.
    state: Option<IntGauge>,
    to_closed: IntCounter,
    to_open: IntCounter,
    to_half_open: IntCounter,
    retries: IntCounter,
}

impl Stats {
    fn new(label: &str) -> Option<Stats> {
        let m = &*METRICS;
        let to = |state: State| {
            m.transitions
                .get_metric_with_label_values(&[label, state.as_str()])
                .ok()
        };
        let state = (label != crate::metrics::OVERFLOW_DESTINATION)
            .then(|| m.state.get_metric_with_label_values(&[label]).ok())
            .flatten();
        Some(Stats {
            state,
            to_closed: to(State::Closed)?,
            to_open: to(State::Open)?,
            to_half_open: to(State::HalfOpen)?,
            retries: m.retries.get_metric_with_label_values(&[label]).ok()?,
        })
    }
}

/// The runtime state of one destination: its policy, breaker and retry budget.
pub struct Destination {
    name: Arc<str>,
    policy: Arc<DestinationPolicy>,
    breaker: Breaker,
    budget: Budget,
    stats: Option<Stats>,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("breaker", &self.breaker.state(Instant::now()))
            .finish_non_exhaustive()
    }
}

impl Destination {
    fn new(name: Arc<str>, policy: Arc<DestinationPolicy>, label: Option<&str>) -> Self {
        let now = Instant::now();
        Destination {
            breaker: Breaker::new(policy.breaker.clone(), now),
            budget: Budget::new(&policy.retry.budget, now),
            stats: label.and_then(Stats::new),
            name,
            policy,
        }
    }

    /// The destination as written in logs (an address, a rule's match, or the target).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn policy(&self) -> &DestinationPolicy {
        &self.policy
    }

    /// Breaker state now.
    pub fn breaker_state(&self) -> State {
        self.breaker.state(Instant::now())
    }

    /// True while the breaker would reject a request: then not even a connection is opened.
    pub fn is_open(&self) -> bool {
        self.breaker.is_open(Instant::now())
    }

    /// Asks the breaker to let one attempt through.
    pub fn admit(&self) -> Result<Permit<'_>, Rejected> {
        let (permit, transition) = self.breaker.acquire(Instant::now());
        if let Some(t) = transition {
            self.transitioned(&t);
        }
        permit
    }

    /// Reports how an attempt went.
    pub fn report(&self, permit: Permit<'_>, outcome: Outcome) {
        if let Some(t) = permit.record(outcome, Instant::now()) {
            self.transitioned(&t);
        }
    }

    /// What an attempt's result means to the breaker.
    pub fn outcome(&self, result: Result<StatusCode, ProxyError>) -> Outcome {
        let failed = match result {
            Ok(status) => self.policy.failure_on.has_status(status),
            // Only the upstream's own failures count: the client's broken body or the proxy's
            // refusal say nothing about the destination's health.
            Err(err) => match err.failure_kind() {
                Some(kind) => kind_in(kind, &self.policy.failure_on),
                None => return Outcome::Ignored,
            },
        };
        if failed {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// True if this attempt's result is one that retries are for.
    pub fn is_retryable(&self, result: Result<StatusCode, ProxyError>) -> bool {
        match result {
            Ok(status) => self.policy.retry.on.has_status(status),
            Err(err) => err
                .failure_kind()
                .is_some_and(|k| kind_in(k, &self.policy.retry.on)),
        }
    }

    /// A request started: it pays into the retry budget.
    pub fn count_request(&self) {
        if self.policy.retry.max_retries > 0 {
            self.budget.deposit(Instant::now());
        }
    }

    /// Takes a retry from the budget (counting it, or the refusal, in the metrics).
    pub fn take_retry(&self) -> bool {
        if self.budget.try_withdraw(Instant::now()) {
            if let Some(s) = &self.stats {
                s.retries.inc();
            }
            true
        } else {
            METRICS.budget_exhausted.inc();
            false
        }
    }

    fn transitioned(&self, t: &Transition) {
        if let Some(s) = &self.stats {
            if let Some(g) = &s.state {
                g.set(t.to.gauge());
            }
            match t.to {
                State::Closed => s.to_closed.inc(),
                State::Open => s.to_open.inc(),
                State::HalfOpen => s.to_half_open.inc(),
            }
        }
        match t.to {
            State::Open => warn!(
                destination = %self.name,
                from = t.from.as_str(),
                open_for = ?t.open_for.unwrap_or_default(),
                reason = t.reason,
                "circuit breaker opened"
            ),
            State::HalfOpen => {
                info!(destination = %self.name, reason = t.reason, "circuit breaker half-open")
            }
            State::Closed => {
                info!(destination = %self.name, reason = t.reason, "circuit breaker closed")
            }
        }
    }
}

/// Whether an error's kind is in `set` (a policy's `failure_on` or `retry.on`).
fn kind_in(kind: FailureKind, set: &FailureSet) -> bool {
    match kind {
        FailureKind::Connect => set.connect,
        FailureKind::Reset => set.reset,
        FailureKind::Timeout => set.timeout,
    }
}

/// The first 100 distinct destinations get a label of their own, the rest share `other`. Used
/// when no request-metrics label is at hand (the same rule as [`crate::metrics`]).
#[derive(Default)]
struct LabelCap {
    seen: Mutex<std::collections::HashSet<Arc<str>>>,
}

impl LabelCap {
    fn label(&self, name: &Arc<str>) -> Arc<str> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(name) {
            return Arc::clone(name);
        }
        if seen.len() >= crate::metrics::DEFAULT_MAX_DESTINATIONS {
            return Arc::from(crate::metrics::OVERFLOW_DESTINATION);
        }
        seen.insert(Arc::clone(name));
        Arc::clone(name)
    }
}

/// All destinations of one proxy.
pub struct Policies {
    defaults: Arc<DestinationPolicy>,
    inbound: Arc<Destination>,
    by_addr: HashMap<SocketAddr, Arc<Destination>>,
    /// Host -> (port, destination) rules; hosts lower-case.
    by_name: HashMap<Box<str>, Vec<(u16, Arc<Destination>)>>,
    learned: [Mutex<HashMap<SocketAddr, Arc<Destination>>>; SHARDS],
    labels: LabelCap,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("defaults", &self.defaults)
            .field("rules", &(self.by_addr.len() + self.by_name.len()))
            .finish_non_exhaustive()
    }
}

impl Policies {
    pub fn new(config: &PolicyConfig) -> Self {
        // Registered now, so that the families (and the unlabelled budget counter at 0) are
        // exported before the first request, as dashboards expect.
        LazyLock::force(&METRICS);
        let labels = LabelCap::default();
        let mut by_addr = HashMap::new();
        let mut by_name: HashMap<Box<str>, Vec<(u16, Arc<Destination>)>> = HashMap::new();
        for rule in &config.destinations {
            let name: Arc<str> = rule.matcher.to_string().into();
            let label = labels.label(&name);
            let dest = Arc::new(Destination::new(
                name,
                Arc::new(rule.policy.clone()),
                Some(&label),
            ));
            match &rule.matcher {
                Match::Addr(addr) => {
                    // The first rule for an address wins (the file loader rejects duplicates).
                    by_addr.entry(*addr).or_insert(dest);
                }
                Match::Authority { host, port } => {
                    let ports = by_name.entry(host.clone()).or_default();
                    if !ports.iter().any(|(p, _)| p == port) {
                        ports.push((*port, dest));
                    }
                }
            }
        }
        let inbound_policy = DestinationPolicy {
            breaker: BreakerConfig::disabled(),
            retry: RetryConfig::disabled(),
            ..config.defaults.clone()
        };
        Policies {
            defaults: Arc::new(config.defaults.clone()),
            inbound: Arc::new(Destination::new(
                "inbound".into(),
                Arc::new(inbound_policy),
                None,
            )),
            by_addr,
            by_name,
            learned: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            labels,
        }
    }

    /// The proxy-wide defaults.
    pub fn defaults(&self) -> &DestinationPolicy {
        &self.defaults
    }

    /// Requests to the app (inbound): timeouts, no breaker, no retries.
    pub fn inbound(&self) -> Arc<Destination> {
        Arc::clone(&self.inbound)
    }

    /// The destination of an outbound connection to `addr`: its rule, or a learned destination
    /// with the defaults. `label` names it in metrics (called only when it is first seen; `None`:
    /// the proxy's own cap of 100 destinations, then `other`).
    pub fn outbound(
        &self,
        addr: SocketAddr,
        label: Option<&dyn Fn() -> Arc<str>>,
    ) -> Arc<Destination> {
        if let Some(d) = self.by_addr.get(&addr) {
            return Arc::clone(d);
        }
        let shard = &self.learned[shard_of(addr)];
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = map.get(&addr) {
            return Arc::clone(d);
        }
        if map.len() >= SHARD_SOFT_CAP {
            map.retain(|_, d| Arc::strong_count(d) > 1 || !d.breaker.is_pristine());
        }
        let name: Arc<str> = addr.to_string().into();
        let label = match label {
            Some(f) => f(),
            None => self.labels.label(&name),
        };
        let dest = Arc::new(Destination::new(
            name,
            Arc::clone(&self.defaults),
            Some(&label),
        ));
        map.insert(addr, Arc::clone(&dest));
        dest
    }

    /// True if some rule matches request authorities (else requests need no per-request lookup).
    pub fn has_name_rules(&self) -> bool {
        !self.by_name.is_empty()
    }

    /// The rule for a request authority (`host[:port]`; `default_port` when it has none).
    pub fn by_authority(&self, authority: &str, default_port: u16) -> Option<Arc<Destination>> {
        if self.by_name.is_empty() {
            return None;
        }
        let (host, port) = split_authority(authority, default_port)?;
        let ports = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_name.get(host.to_ascii_lowercase().as_str())?
        } else {
            self.by_name.get(host)?
        };
        ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, d)| Arc::clone(d))
    }

    /// The destination of `--target` mode: its name rule, else one with the defaults.
    pub fn target(
        &self,
        authority: &str,
        label: Option<&dyn Fn() -> Arc<str>>,
    ) -> Arc<Destination> {
        if let Some(d) = self.by_authority(authority, 80) {
            return d;
        }
        if let Some(d) = authority
            .parse::<SocketAddr>()
            .ok()
            .and_then(|a| self.by_addr.get(&a))
        {
            return Arc::clone(d);
        }
        let name: Arc<str> = authority.into();
        let label = match label {
            Some(f) => f(),
            None => self.labels.label(&name),
        };
        Arc::new(Destination::new(
            name,
            Arc::clone(&self.defaults),
            Some(&label),
        ))
    }

    /// The connect timeout for dialling `host:port` (an address rule, a name rule, or the default).
    pub fn connect_timeout(&self, host: &str, port: u16) -> Duration {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            if let Some(d) = self.by_addr.get(&SocketAddr::new(ip, port)) {
                return d.policy.connect_timeout;
            }
        } else if let Some(d) = self.by_authority(host, port) {
            return d.policy.connect_timeout;
        }
        self.defaults.connect_timeout
    }
}

fn shard_of(addr: SocketAddr) -> usize {
    // A cheap mix of address and port: shard choice needs spread, not collision resistance.
    let ip: u128 = match addr.ip() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let folded = (ip as u64) ^ ((ip >> 64) as u64) ^ u64::from(addr.port()).rotate_left(17);
    (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % SHARDS
}

/// `host[:port]` -> (host, port); IPv6 literals keep their brackets.
fn split_authority(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    let authority = authority.trim();
    if authority.is_empty() {
        return None;
    }
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        let host = &authority[..=end];
        return match &authority[end + 1..] {
            "" => Some((host, default_port)),
            rest => Some((host, rest.strip_prefix(':')?.parse().ok()?)),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((authority, default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(m: &str, f: impl FnOnce(&mut DestinationPolicy)) -> DestinationRule {
        let mut policy = DestinationPolicy::default();
        f(&mut policy);
        DestinationRule {
            matcher: Match::parse(m).unwrap(),
            policy,
        }
    }

    #[test]
    fn matches_parse() {
        assert_eq!(
            Match::parse("10.0.0.7:80"),
            Ok(Match::Addr("10.0.0.7:80".parse().unwrap()))
        );
        assert_eq!(
            Match::parse("[fd00::7]:443"),
            Ok(Match::Addr("[fd00::7]:443".parse().unwrap()))
        );
        assert_eq!(
            Match::parse("API.example:443"),
            Ok(Match::Authority {
                host: "api.example".into(),
                port: 443
            })
        );
        assert!(Match::parse("api.example")
            .unwrap_err()
            .contains("missing port"));
        assert!(Match::parse("api.example:http").is_err());
        assert!(Match::parse("10.0.0.7").is_err());
        assert!(Match::parse("a b:80").is_err());
        assert!(Match::parse(":80").is_err());
    }

    #[test]
    fn authorities_split() {
        assert_eq!(split_authority("a.example", 80), Some(("a.example", 80)));
        assert_eq!(
            split_authority("a.example:8080", 80),
            Some(("a.example", 8080))
        );
        assert_eq!(split_authority("[::1]", 80), Some(("[::1]", 80)));
        assert_eq!(split_authority("[::1]:81", 80), Some(("[::1]", 81)));
        assert_eq!(split_authority("a:b", 80), None);
        assert_eq!(split_authority("", 80), None);
    }

    #[tokio::test]
    async fn rules_are_found_by_address_and_by_name() {
        let config = PolicyConfig {
            defaults: DestinationPolicy::default(),
            destinations: vec![
                rule("10.0.0.7:80", |p| {
                    p.request_timeout = Duration::from_secs(2)
                }),
                rule("api.example:443", |p| {
                    p.connect_timeout = Duration::from_secs(3)
                }),
            ],
        };
        let p = Policies::new(&config);
        let by_addr = p.outbound("10.0.0.7:80".parse().unwrap(), None);
        assert_eq!(by_addr.policy().request_timeout, Duration::from_secs(2));
        assert_eq!(by_addr.name(), "10.0.0.7:80");
        let learned = p.outbound("10.0.0.8:80".parse().unwrap(), None);
        assert_eq!(learned.policy(), &DestinationPolicy::default());
        let again = p.outbound("10.0.0.8:80".parse().unwrap(), None);
        assert!(Arc::ptr_eq(&learned, &again), "one breaker per destination");

        assert!(p.has_name_rules());
        let named = p
            .by_authority("API.Example:443", 80)
            .expect("case-insensitive");
        assert_eq!(named.name(), "api.example:443");
        assert!(
            p.by_authority("api.example", 443).is_some(),
            "port from the connection"
        );
        assert!(p.by_authority("api.example", 80).is_none());
        assert_eq!(
            p.connect_timeout("api.example", 443),
            Duration::from_secs(3)
        );
        assert_eq!(
            p.connect_timeout("10.0.0.7", 80),
            DestinationPolicy::default().connect_timeout
        );

        let inbound = p.inbound();
        assert!(inbound.policy().breaker.is_disabled());
        assert_eq!(inbound.policy().retry.max_retries, 0);
    }

    #[tokio::test]
    async fn outcomes_follow_the_failure_set() {
        let p = Policies::new(&PolicyConfig::default());
        let d = p.outbound("10.0.0.9:80".parse().unwrap(), None);
        assert_eq!(d.outcome(Ok(StatusCode::OK)), Outcome::Success);
        assert_eq!(d.outcome(Ok(StatusCode::NOT_FOUND)), Outcome::Success);
        assert_eq!(
            d.outcome(Ok(StatusCode::INTERNAL_SERVER_ERROR)),
            Outcome::Failure
        );
        assert_eq!(d.outcome(Ok(StatusCode::NOT_IMPLEMENTED)), Outcome::Success);
        assert_eq!(
            d.outcome(Err(ProxyError::UpstreamConnectRefused)),
            Outcome::Failure
        );
        assert_eq!(d.outcome(Err(ProxyError::UpstreamReset)), Outcome::Failure);
        assert_eq!(
            d.outcome(Err(ProxyError::UpstreamTimeout)),
            Outcome::Failure
        );
        assert_eq!(d.outcome(Err(ProxyError::DownstreamBody)), Outcome::Ignored);

        assert!(d.is_retryable(Ok(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(!d.is_retryable(Ok(StatusCode::INTERNAL_SERVER_ERROR)));
        assert!(d.is_retryable(Err(ProxyError::UpstreamConnectRefused)));
        assert!(d.is_retryable(Err(ProxyError::UpstreamReset)));
        assert!(!d.is_retryable(Err(ProxyError::UpstreamTimeout)));
    }

    #[tokio::test]
    async fn unused_clean_destinations_are_forgotten_past_the_cap() {
        let p = Policies::new(&PolicyConfig::default());
        let shard = shard_of("10.1.0.0:80".parse().unwrap());
        let mut same_shard = (0u32..)
            .map(|i| {
                let ip =
                    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 1, 0, 0)) + i);
                SocketAddr::from((ip, 80))
            })
            .filter(|a| shard_of(*a) == shard);
        let held = p.outbound(same_shard.next().unwrap(), None);
        for addr in same_shard.by_ref().take(SHARD_SOFT_CAP) {
            p.outbound(addr, None);
        }
        let len = p.learned[shard].lock().unwrap().len();
        assert!(len <= 2, "unused entries were dropped, {len} left");
        let again = p.outbound(held.name().parse().unwrap(), None);
        assert!(Arc::ptr_eq(&held, &again), "an entry in use is kept");
    }
}
