//! What a proxy is started with: listeners, mode (interception or `--target`), policies,
//! detection and pool timeouts, where destinations come from, and where it records.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::Uri;
use tokio::net::TcpStream;

use crate::metrics::ProxyMetrics;
pub use crate::net::ListenAddr;
use crate::policy::PolicyConfig;

/// HTTP/1: a request head must be complete this long after the connection started waiting for
/// it (the first request, and each next one on a kept-alive connection, so this is also the
/// keep-alive idle timeout). hyper's own default; Go servers are often set to 10-30 s, nginx's
/// `client_header_timeout` is 60 s.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/1: the largest request head (start line and headers); larger gets 431. nginx's default
/// allows 4 x 8 KiB header lines; Envoy's `max_request_headers_kb` is 60.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// HTTP/2: streams one client connection may have open at once (nginx 128; Envoy's hardening
/// guide 100).
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2: a connection quiet for this long is pinged; no answer within as long again closes it.
pub const DEFAULT_H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// HTTP/2: a connection with no stream open for this long is closed (GOAWAY): nginx closes idle
/// HTTP/2 connections after 75 s, Go after its IdleTimeout; clients reconnect when they need to.
pub const DEFAULT_H2_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// HTTP/1 (native engine, plain sockets): a kept-alive client connection that has said nothing
/// for this long gives up its task, its reactor registration and its buffers until it speaks
/// again (`proxy/park.rs`), like nginx's idle keep-alive connections. Parking and waking cost
/// a few system calls, so a connection busier than once a second never pays them.
pub const DEFAULT_PARK_IDLE_AFTER: Duration = Duration::from_secs(1);
/// Downstream connections per direction (outbound, inbound or `--target`); past it new ones
/// are refused at accept (reset and counted) rather than everyone slowing down.
pub const DEFAULT_MAX_DOWNSTREAM_CONNECTIONS: usize = 10_000;

/// Connections to the app (inbound) at most; more requests queue for one. Higher than the
/// per-destination default of outbound (128): every inbound client shares this one destination,
/// and a few slow clients must not make everyone else wait (Envoy's cluster default is 1024).
pub const DEFAULT_INBOUND_MAX_CONNECTIONS: usize = 1024;

/// The limits of the proxy's HTTP servers (both directions and `--target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// See [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// See [`DEFAULT_MAX_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// See [`DEFAULT_H2_MAX_CONCURRENT_STREAMS`].
    pub h2_max_concurrent_streams: u32,
    /// See [`DEFAULT_H2_KEEPALIVE`].
    pub h2_keepalive: Duration,
    /// See [`DEFAULT_H2_IDLE_TIMEOUT`].
    pub h2_idle_timeout: Duration,
    /// `--http1-engine`: who serves HTTP/1 clients.
    pub http1_engine: Http1Engine,
    /// See [`DEFAULT_PARK_IDLE_AFTER`]; `None`: never.
    pub park_idle_after: Option<Duration>,
}

/// Who serves HTTP/1 clients (`--http1-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http1Engine {
    /// The native engine (`proxy/h1.rs`): heads kept as their bytes (header case and order),
    /// one task per connection driving both sockets, strict framing.
    #[default]
    Native,
    /// hyper's HTTP/1 server and client (the engine before the native one).
    Hyper,
}

impl Http1Engine {
    pub fn parse(text: &str) -> Option<Http1Engine> {
        match text {
            "native" => Some(Http1Engine::Native),
            "hyper" => Some(Http1Engine::Hyper),
            _ => None,
        }
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            h2_keepalive: DEFAULT_H2_KEEPALIVE,
            h2_idle_timeout: DEFAULT_H2_IDLE_TIMEOUT,
            http1_engine: Http1Engine::Native,
            park_idle_after: Some(DEFAULT_PARK_IDLE_AFTER),
        }
    }
}

/// How long a partial client preface ("GE") may take to become decidable. Real clients send a
/// request line in one segment, so this only matters for slow or odd peers.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle pooled upstream connections are closed after this; shorter than the common server-side
/// keep-alive timeouts (nginx 75 s, Go 90 s) so that we usually close first and rarely pick a
/// connection the server is just closing.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A `--target` URL: plain `http://host[:port][/prefix]`.
#[derive(Debug, Clone)]
pub struct Target {
    url: String,
    pub(crate) authority: Authority,
    pub(crate) prefix: Option<Arc<str>>,
}

impl Target {
    /// Parses a target URL; the error says what to write instead.
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("not a URL ({e}); expected http://HOST[:PORT][/PATH]"))?;
        match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => {}
            Some(s) if *s == Scheme::HTTPS => {
                return Err(
                    "https targets are not supported (the proxy speaks plain HTTP to \
                            its target; TLS origination is out of scope): use http://"
                        .to_owned(),
                )
            }
            _ => return Err("expected http://HOST[:PORT][/PATH]".to_owned()),
        }
        let Some(authority) = uri.authority() else {
            return Err("missing host; expected http://HOST[:PORT][/PATH]".to_owned());
        };
        if authority.as_str().contains('@') {
            return Err("user information in the target URL is not supported".to_owned());
        }
        if uri.query().is_some() {
            return Err("a query string in the target URL is not supported".to_owned());
        }
        let authority = match authority.port_u16() {
            Some(_) => authority.clone(),
            // Pool keys and Host fallbacks carry an explicit port.
            None => Authority::from_maybe_shared(Bytes::from(format!("{}:80", authority.host())))
                .map_err(|e| format!("bad host: {e}"))?,
        };
        let path = uri.path().trim_end_matches('/');
        Ok(Target {
            url: url.to_owned(),
            authority,
            prefix: (!path.is_empty()).then(|| Arc::from(path)),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.url
    }
}

/// Everything the proxy needs; `sidecar run` builds it from flags and environment.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Outbound listeners (redirected connections of the app), or the `--target` listeners.
    pub listen: Vec<ListenAddr>,
    /// Inbound listeners (connections to the app, steered by sk_lookup); unused with `--target`.
    pub inbound: Vec<ListenAddr>,
    /// `Some`: reverse-proxy mode, every request goes there. `None`: interception mode.
    pub target: Option<Target>,
    pub service_name: Option<String>,
    /// Connect and request timeouts, circuit breakers, retries: defaults and per destination.
    pub policy: PolicyConfig,
    pub detect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// Limits and timers of the HTTP servers.
    pub http: HttpLimits,
    /// Downstream connections per direction; see [`DEFAULT_MAX_DOWNSTREAM_CONNECTIONS`].
    pub max_connections: usize,
    /// Upstream connections to the app; see [`DEFAULT_INBOUND_MAX_CONNECTIONS`].
    pub inbound_max_connections: usize,
    /// Interception mode: refuse to start when the proxy's own connections would be captured
    /// (it would loop on itself): a self-test against the kernel once the listeners are bound
    /// ([`crate::net::own_connections_captured`]). `sidecar run` sets it.
    pub refuse_if_captured: bool,
    /// The workload identity for mesh TLS (`--identity-dir`); `None`: no mesh TLS at all.
    pub identity: Option<Arc<crate::identity::IdentityStore>>,
}

impl ProxyConfig {
    /// Interception mode on `listen` (all required, outbound only) with default timeouts.
    pub fn new(listen: impl IntoIterator<Item = SocketAddr>) -> Self {
        ProxyConfig {
            listen: listen
                .into_iter()
                .map(|addr| ListenAddr {
                    addr,
                    required: true,
                })
                .collect(),
            inbound: Vec::new(),
            target: None,
            service_name: None,
            policy: PolicyConfig::default(),
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            http: HttpLimits::default(),
            max_connections: DEFAULT_MAX_DOWNSTREAM_CONNECTIONS,
            inbound_max_connections: DEFAULT_INBOUND_MAX_CONNECTIONS,
            refuse_if_captured: false,
            identity: None,
        }
    }
}

/// Finds where a captured connection was going. The real ones are
/// [`crate::orig_dst::original_dst`] (outbound) and the local address (inbound); tests pass
/// their own.
pub type Resolver = Arc<dyn Fn(&TcpStream) -> io::Result<SocketAddr> + Send + Sync>;

/// The kernel's answer to `SO_ORIGINAL_DST`.
pub fn original_dst_resolver() -> Resolver {
    Arc::new(crate::orig_dst::original_dst)
}

/// Inbound: sk_lookup hands the SYN to our listener unchanged, so the connection's own local
/// address is where the client was going.
pub fn local_addr_resolver() -> Resolver {
    Arc::new(|stream: &TcpStream| stream.local_addr().map(crate::net::with_link_scope))
}

/// Destination lookups for both directions.
#[derive(Clone)]
pub struct Resolvers {
    pub outbound: Resolver,
    pub inbound: Resolver,
}

impl Resolvers {
    /// What the kernel says: `SO_ORIGINAL_DST` outbound, the local address inbound.
    pub fn kernel() -> Self {
        Resolvers {
            outbound: original_dst_resolver(),
            inbound: local_addr_resolver(),
        }
    }
}

/// What the proxy records: metrics (registered by the caller, or nowhere) and the access log.
#[derive(Clone)]
pub struct Telemetry {
    pub metrics: Arc<ProxyMetrics>,
    /// One `access` log line per request.
    pub access_log: bool,
}

impl Default for Telemetry {
    /// Metrics counted but exported nowhere; no access log.
    fn default() -> Self {
        Telemetry {
            metrics: ProxyMetrics::unregistered(),
            access_log: false,
        }
    }
}
