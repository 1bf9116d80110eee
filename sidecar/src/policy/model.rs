//! The policy model: what applies to one destination ([`DestinationPolicy`]), which requests a
//! rule applies to ([`Match`]), and a proxy's whole policy configuration ([`PolicyConfig`]), with
//! the defaults. Pure data: [`super::config_file`] builds it, [`super::Policies`] runs it.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::breaker::BreakerConfig;
use super::retry::{FailureSet, RetryConfig};

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
/// Idle opaque TCP connections (and upgraded ones, like WebSockets) are closed after this
/// (Envoy's TCP proxy default): long enough for a database pool's quiet hours, short enough to
/// reclaim connections whose peer vanished without a FIN.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
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
