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
pub mod authz;
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
pub use authz::PathPattern;
use breaker::BreakerConfig;
pub use breaker::{
    DEFAULT_BREAKER_CONSECUTIVE_FAILURES, DEFAULT_BREAKER_FAILURE_RATE_MIN_REQUESTS,
    DEFAULT_BREAKER_FAILURE_RATE_WINDOW, DEFAULT_BREAKER_HALF_OPEN_PROBES,
    DEFAULT_BREAKER_MAX_OPEN_TIME, DEFAULT_BREAKER_OPEN_TIME,
};
pub use destination::Destination;
use destination::METRICS;
pub use model::{
    DestinationPolicy, DestinationRule, InboundConfig, InboundMtls, Match, MeshConfig, MtlsMode,
    PolicyConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS_PER_DESTINATION, DEFAULT_REQUEST_TIMEOUT,
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
mod tests;
