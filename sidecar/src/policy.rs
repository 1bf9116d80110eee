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
mod destination;
pub mod exchange;
pub mod headers;
pub mod idle;
mod model;
pub mod retry;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use breaker::BreakerConfig;
pub use breaker::{
    DEFAULT_BREAKER_CONSECUTIVE_FAILURES, DEFAULT_BREAKER_FAILURE_RATE_MIN_REQUESTS,
    DEFAULT_BREAKER_FAILURE_RATE_WINDOW, DEFAULT_BREAKER_HALF_OPEN_PROBES,
    DEFAULT_BREAKER_MAX_OPEN_TIME, DEFAULT_BREAKER_OPEN_TIME,
};
pub use destination::Destination;
use destination::METRICS;
pub use model::{
    DestinationPolicy, DestinationRule, Match, PolicyConfig, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_DESTINATION, DEFAULT_REQUEST_TIMEOUT,
};
pub use retry::{
    FailureSet, RetryConfig, DEFAULT_MAX_RETRIES, DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_BUDGET_MIN_PER_SECOND, DEFAULT_RETRY_BUDGET_RATIO, DEFAULT_RETRY_BUDGET_WINDOW,
    DEFAULT_RETRY_MAX_BODY_BYTES,
};

/// Learned destinations are kept in this many independently locked maps (less contention on a
/// multi-threaded runtime)...
const SHARDS: usize = 16;
/// ...of up to this many entries each, beyond which destinations that hold nothing worth keeping
/// (breaker closed and clean, not in use) are forgotten...
const SHARD_SOFT_CAP: usize = 1024;
/// ...and past this many, every destination not in use, whatever its breaker holds: an app
/// calling ever new failing addresses cannot grow the proxy's memory without bound (32,768
/// destinations in all; a forgotten open breaker starts closed when its destination comes back).
const SHARD_HARD_CAP: usize = 2 * SHARD_SOFT_CAP;

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

/// All destinations of one proxy, under one configuration (one generation). Replaced whole on
/// reload ([`PolicyStore`]); see [`Policies::reloaded`] for what carries over.
pub struct Policies {
    generation: u64,
    config: PolicyConfig,
    defaults: Arc<DestinationPolicy>,
    inbound: Arc<Destination>,
    by_addr: HashMap<SocketAddr, Arc<Destination>>,
    /// Host -> (port, destination) rules; hosts lower-case.
    by_name: HashMap<Box<str>, Vec<(u16, Arc<Destination>)>>,
    learned: [Mutex<HashMap<SocketAddr, Arc<Destination>>>; SHARDS],
    /// `--target` mode's destination when no rule names the target (one per proxy).
    target: OnceLock<Arc<Destination>>,
    /// Shared by every generation: a destination keeps its label across reloads.
    labels: Arc<LabelCap>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("generation", &self.generation)
            .field("defaults", &self.defaults)
            .field("rules", &(self.by_addr.len() + self.by_name.len()))
            .finish_non_exhaustive()
    }
}

/// What a reload changed, for the log and `/config`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Rules whose destination (breaker, budget) carried over unchanged.
    pub kept: usize,
    /// Rules that are new or changed (they start with a closed breaker and a fresh budget).
    pub replaced: usize,
    /// Rules of the old configuration that are gone.
    pub removed: usize,
    /// `[defaults]` changed: learned destinations start afresh under the new defaults.
    pub defaults_changed: bool,
}

/// The policies in force: a pointer swapped whole on reload. Each request loads the current
/// [`Policies`] once (no lock); a request already running keeps the generation it started with.
pub struct PolicyStore {
    current: ArcSwap<Policies>,
    /// Serialises reloads (readers never take it).
    reload: Mutex<()>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PolicyStore").field(&*self.load()).finish()
    }
}

impl PolicyStore {
    pub fn new(config: &PolicyConfig) -> PolicyStore {
        PolicyStore {
            current: ArcSwap::from_pointee(Policies::new(config)),
            reload: Mutex::new(()),
        }
    }

    /// The policies in force now (cheap: no lock, no reference count on the fast path).
    pub fn load(&self) -> arc_swap::Guard<Arc<Policies>> {
        self.current.load()
    }

    #[cfg(test)]
    fn load_full_for_test(&self) -> Arc<Policies> {
        self.current.load_full()
    }

    /// Puts `config` in force: destinations whose rule did not change keep their breaker and
    /// budget (see [`Policies::reloaded`]).
    pub fn replace(&self, config: &PolicyConfig) -> Changes {
        let _one_at_a_time = self.reload.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.current.load_full();
        let (next, changes) = old.reloaded(config);
        self.current.store(Arc::new(next));
        changes
    }
}

impl Policies {
    pub fn new(config: &PolicyConfig) -> Self {
        // Registered now, so that the families (and the unlabelled budget counter at 0) are
        // exported before the first request, as dashboards expect.
        LazyLock::force(&METRICS);
        Policies::build(config, 0, Arc::new(LabelCap::default()), None).0
    }

    /// The policies of `config`, carrying over from `self` what did not change:
    /// - a rule with the same match and the same settings keeps its destination (open breaker,
    ///   spent retry budget, metrics); a changed rule starts afresh;
    /// - with unchanged `[defaults]`, learned destinations and the inbound and `--target`
    ///   destinations carry over too; changed defaults start them afresh.
    ///
    /// Connection pools are the proxy's, by address: a reload never closes a connection.
    pub fn reloaded(&self, config: &PolicyConfig) -> (Policies, Changes) {
        Policies::build(
            config,
            self.generation + 1,
            Arc::clone(&self.labels),
            Some(self),
        )
    }

    fn build(
        config: &PolicyConfig,
        generation: u64,
        labels: Arc<LabelCap>,
        old: Option<&Policies>,
    ) -> (Policies, Changes) {
        let mut changes = Changes::default();
        let same_defaults = old.filter(|o| *o.defaults == config.defaults);
        changes.defaults_changed = old.is_some() && same_defaults.is_none();
        let mut by_addr = HashMap::new();
        let mut by_name: HashMap<Box<str>, Vec<(u16, Arc<Destination>)>> = HashMap::new();
        for rule in &config.destinations {
            let kept = old
                .and_then(|o| o.rule(&rule.matcher))
                .filter(|d| *d.policy() == rule.policy);
            let dest = match kept {
                Some(d) => {
                    changes.kept += 1;
                    d
                }
                None => {
                    changes.replaced += 1;
                    let name: Arc<str> = rule.matcher.to_string().into();
                    let label = labels.label(&name);
                    Arc::new(Destination::new(
                        name,
                        Arc::new(rule.policy.clone()),
                        Some(&label),
                    ))
                }
            };
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
        if let Some(old) = old {
            changes.removed = old
                .config
                .destinations
                .iter()
                .filter(|r| !config.destinations.iter().any(|n| n.matcher == r.matcher))
                .count();
        }
        let inbound = match same_defaults {
            Some(o) => Arc::clone(&o.inbound),
            None => {
                let inbound_policy = DestinationPolicy {
                    breaker: BreakerConfig::disabled(),
                    retry: RetryConfig::disabled(),
                    ..config.defaults.clone()
                };
                Arc::new(Destination::new(
                    "inbound".into(),
                    Arc::new(inbound_policy),
                    None,
                ))
            }
        };
        let learned: [Mutex<HashMap<SocketAddr, Arc<Destination>>>; SHARDS] =
            std::array::from_fn(|i| {
                let carried = same_defaults
                    .map(|o| {
                        let map = o.learned[i].lock().unwrap_or_else(PoisonError::into_inner);
                        map.iter()
                            .filter(|(addr, _)| !by_addr.contains_key(*addr))
                            .map(|(addr, d)| (*addr, Arc::clone(d)))
                            .collect()
                    })
                    .unwrap_or_default();
                Mutex::new(carried)
            });
        let target = OnceLock::new();
        if let Some(d) = same_defaults.and_then(|o| o.target.get()) {
            let _ = target.set(Arc::clone(d));
        }
        let policies = Policies {
            generation,
            config: config.clone(),
            defaults: Arc::new(config.defaults.clone()),
            inbound,
            by_addr,
            by_name,
            learned,
            target,
            labels,
        };
        (policies, changes)
    }

    /// The destination of the rule with exactly this match, if any.
    fn rule(&self, matcher: &Match) -> Option<Arc<Destination>> {
        match matcher {
            Match::Addr(addr) => self.by_addr.get(addr).cloned(),
            Match::Authority { host, port } => self
                .by_name
                .get(host)?
                .iter()
                .find(|(p, _)| p == port)
                .map(|(_, d)| Arc::clone(d)),
        }
    }

    /// Which configuration this is: 0 at start, one more on each applied reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The configuration these policies run.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
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
            map.retain(|_, d| Arc::strong_count(d) > 1 || !d.is_pristine());
        }
        if map.len() >= SHARD_HARD_CAP {
            map.retain(|_, d| Arc::strong_count(d) > 1);
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

    /// The destination of `--target` mode: its rule, else the defaults without a breaker (made
    /// once: a proxy has one target).
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
        let dest = self.target.get_or_init(|| {
            let name: Arc<str> = authority.into();
            let label = match label {
                Some(f) => f(),
                None => self.labels.label(&name),
            };
            // The one service behind a reverse proxy: remote clients can provoke its 5xx at
            // will, and an open breaker would then refuse everyone (as for inbound). A rule
            // naming the target turns one on deliberately.
            let policy = DestinationPolicy {
                breaker: BreakerConfig::disabled(),
                ..(*self.defaults).clone()
            };
            Arc::new(Destination::new(name, Arc::new(policy), Some(&label)))
        });
        Arc::clone(dest)
    }

    /// The connect timeout for dialling `host:port` (an address rule, a name rule, or the default).
    pub fn connect_timeout(&self, host: &str, port: u16) -> Duration {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            if let Some(d) = self.by_addr.get(&SocketAddr::new(ip, port)) {
                return d.policy().connect_timeout;
            }
        } else if let Some(d) = self.by_authority(host, port) {
            return d.policy().connect_timeout;
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
    use crate::error::ProxyError;
    use breaker::Outcome;
    use http::StatusCode;

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
                    p.request_timeout = Duration::from_secs(2);
                }),
                rule("api.example:443", |p| {
                    p.connect_timeout = Duration::from_secs(3);
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

    /// A reload keeps the state of what it did not change: an open breaker of an unchanged rule,
    /// learned destinations under unchanged defaults; a changed rule starts afresh.
    #[tokio::test]
    async fn reload_keeps_what_did_not_change() {
        let a = "10.0.0.7:80";
        let config = PolicyConfig {
            defaults: DestinationPolicy::default(),
            destinations: vec![
                rule(a, |p| p.breaker.consecutive_failures = 1),
                rule("api.example:443", |p| {
                    p.request_timeout = Duration::from_secs(2);
                }),
            ],
        };
        let store = PolicyStore::new(&config);
        let first = store.load_full_for_test();
        let dest_a = first.outbound(a.parse().unwrap(), None);
        let permit = dest_a.admit().expect("closed");
        dest_a.report(permit, Outcome::Failure);
        assert!(dest_a.is_open(), "one failure opens it");
        let learned = first.outbound("10.0.0.9:80".parse().unwrap(), None);

        // Change only the name rule.
        let mut next = config.clone();
        next.destinations[1].policy.request_timeout = Duration::from_millis(300);
        let changes = store.replace(&next);
        assert_eq!(
            changes,
            Changes {
                kept: 1,
                replaced: 1,
                removed: 0,
                defaults_changed: false
            }
        );
        let second = store.load_full_for_test();
        assert_eq!(second.generation(), 1);
        let again = second.outbound(a.parse().unwrap(), None);
        assert!(
            Arc::ptr_eq(&dest_a, &again) && again.is_open(),
            "breaker kept"
        );
        assert!(Arc::ptr_eq(
            &learned,
            &second.outbound("10.0.0.9:80".parse().unwrap(), None)
        ));
        let named = second.by_authority("api.example:443", 80).unwrap();
        assert_eq!(named.policy().request_timeout, Duration::from_millis(300));
        // The old generation still answers with the old rule (a request that began under it).
        let old_named = first.by_authority("api.example:443", 80).unwrap();
        assert_eq!(old_named.policy().request_timeout, Duration::from_secs(2));

        // Changed defaults: learned destinations start afresh; the unchanged rule's stays.
        let mut third = next.clone();
        third.defaults.connect_timeout = Duration::from_millis(250);
        third.destinations.pop();
        let changes = store.replace(&third);
        assert!(changes.defaults_changed);
        assert_eq!((changes.kept, changes.removed), (1, 1));
        let now = store.load_full_for_test();
        let relearned = now.outbound("10.0.0.9:80".parse().unwrap(), None);
        assert!(!Arc::ptr_eq(&learned, &relearned));
        assert_eq!(
            relearned.policy().connect_timeout,
            Duration::from_millis(250)
        );
        assert!(now.by_authority("api.example:443", 80).is_none());
        assert!(now.outbound(a.parse().unwrap(), None).is_open());
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

    /// Destinations whose breakers have counted failures are kept past the soft cap, but not
    /// without bound: the state of ever new failing addresses plateaus.
    #[tokio::test]
    async fn failing_destinations_are_bounded_too() {
        let p = Policies::new(&PolicyConfig::default());
        let shard = shard_of("10.2.0.0:80".parse().unwrap());
        let same_shard = (0u32..)
            .map(|i| {
                let ip =
                    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 2, 0, 0)) + i);
                SocketAddr::from((ip, 80))
            })
            .filter(|a| shard_of(*a) == shard);
        let mut most = 0;
        for addr in same_shard.take(3 * SHARD_HARD_CAP) {
            let d = p.outbound(addr, None);
            let permit = d.admit().expect("closed");
            d.report(permit, Outcome::Failure);
            most = most.max(p.learned[shard].lock().unwrap().len());
        }
        assert!(most <= SHARD_HARD_CAP, "at most the hard cap: {most}");
    }

    /// An app calling 45,000 distinct failing destinations: the proxy's destination state
    /// plateaus at the caps, whatever the addresses.
    #[tokio::test]
    async fn forty_five_thousand_failing_destinations_plateau() {
        let p = Policies::new(&PolicyConfig::default());
        let total =
            |p: &Policies| -> usize { p.learned.iter().map(|s| s.lock().unwrap().len()).sum() };
        let mut most = 0;
        for i in 0..45_000u32 {
            let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 3, 0, 0)) + i);
            let d = p.outbound(SocketAddr::from((ip, 443)), None);
            let permit = d.admit().expect("closed");
            d.report(permit, Outcome::Failure);
            if i % 500 == 0 {
                most = most.max(total(&p));
            }
        }
        most = most.max(total(&p));
        assert!(most <= SHARDS * SHARD_HARD_CAP, "{most} destinations kept");
        assert!(most < 45_000);
    }
}
