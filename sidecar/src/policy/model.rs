//! The policy model: what applies to one destination ([`DestinationPolicy`]), which requests a
//! rule applies to ([`Match`]), and a proxy's whole policy configuration ([`PolicyConfig`]), with
//! the defaults. Pure data: [`super::config_file`] builds it, [`super::Policies`] runs it.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::authz::PathPattern;
use crate::identity::SpiffeId;
use crate::net::Cidr;
use crate::transcode::Transcoder;

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
    /// Mesh TLS to this destination (only inside the mesh networks, with an identity).
    pub mtls: MtlsMode,
    /// If not empty, the server must prove one of these SPIFFE IDs.
    pub server_identities: Vec<SpiffeId>,
}

/// Whether outbound connections to a destination are mesh TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MtlsMode {
    /// Plaintext, as the app sent it.
    Off,
    /// Mesh TLS; if the peer turns out not to be a sidecar, plaintext (remembered a while).
    #[default]
    Opportunistic,
    /// Mesh TLS or nothing (HTTP 502, TCP reset).
    Require,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Off => "off",
            MtlsMode::Opportunistic => "opportunistic",
            MtlsMode::Require => "require",
        }
    }
}

/// Whether an inbound port accepts plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboundMtls {
    /// Mesh TLS and plaintext both (the migration default).
    #[default]
    Permissive,
    /// Mesh TLS only; plaintext HTTP gets 403, anything else is reset (probe paths excepted).
    Strict,
}

impl InboundMtls {
    pub fn as_str(self) -> &'static str {
        match self {
            InboundMtls::Permissive => "permissive",
            InboundMtls::Strict => "strict",
        }
    }
}

/// Linkerd's default cluster networks: the private ranges.
pub const DEFAULT_MESH_NETWORKS: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fd00::/8",
];
/// How long a destination found not to be a sidecar is dialled in plaintext before mesh TLS is
/// tried again (it may have been meshed since).
pub const DEFAULT_FALLBACK_TTL: Duration = Duration::from_secs(300);
/// `/ready` fails when the workload certificate expires within this (the issuer is late).
pub const DEFAULT_EXPIRY_MARGIN: Duration = Duration::from_secs(300);

/// The `[mtls]` section: where mesh TLS is tried, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshConfig {
    /// Outbound destinations in these networks are mesh candidates.
    pub networks: Vec<Cidr>,
    pub fallback_ttl: Duration,
    pub expiry_margin: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            networks: DEFAULT_MESH_NETWORKS
                .iter()
                .filter_map(|c| Cidr::parse(c).ok())
                .collect(),
            fallback_ttl: DEFAULT_FALLBACK_TTL,
            expiry_margin: DEFAULT_EXPIRY_MARGIN,
        }
    }
}

impl MeshConfig {
    pub fn in_mesh(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|c| c.contains(ip))
    }
}

/// The `[inbound]` section: what the app's ports accept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboundConfig {
    /// Every port without an entry in `ports`.
    pub mtls: InboundMtls,
    /// Per app port (`[inbound.port.8080]`).
    pub ports: Vec<(u16, InboundMtls)>,
    /// Plaintext `GET`/`HEAD` requests to these paths pass on strict ports: the kubelet's
    /// probes (it has no mesh identity).
    pub probe_paths: Vec<PathPattern>,
    /// Who may call what (`default`, `[[inbound.rule]]`).
    pub authz: super::authz::AuthzConfig,
}

impl InboundConfig {
    pub fn mtls_for(&self, port: u16) -> InboundMtls {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(self.mtls, |(_, m)| *m)
    }

    /// True if any port is strict (then `/ready` needs an identity).
    pub fn any_strict(&self) -> bool {
        self.mtls == InboundMtls::Strict
            || self.ports.iter().any(|(_, m)| *m == InboundMtls::Strict)
    }

    /// A plaintext request the kubelet may make to a strict port.
    pub fn is_probe(&self, method: &http::Method, path: &str) -> bool {
        (method == http::Method::GET || method == http::Method::HEAD)
            && self.probe_paths.iter().any(|p| p.matches(path))
    }
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
            mtls: MtlsMode::default(),
            server_identities: Vec::new(),
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
    /// `[mtls]`.
    pub mesh: MeshConfig,
    /// `[inbound]`.
    pub inbound: InboundConfig,
    /// `[[transcode]]`: REST/JSON to the gRPC app, by inbound port (at most one per port).
    pub transcode: Vec<Arc<Transcoder>>,
}

impl PolicyConfig {
    /// The transcoder of an inbound port, if it has one.
    pub fn transcoder(&self, port: u16) -> Option<&Arc<Transcoder>> {
        self.transcode.iter().find(|t| t.settings().port == port)
    }
}
