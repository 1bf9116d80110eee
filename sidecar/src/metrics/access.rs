//! Recording one proxied HTTP request: the request metrics, the proxy's own errors, and the
//! optional access log (one line per request under the tracing target `access`).
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use tokio::time::Instant;

use super::{method_label, DestinationMetrics, ProxyMetrics};
use crate::error::ProxyError;

/// The tracing target of access log lines (`SIDECAR_LOG=warn,access=info` keeps them alone).
pub const ACCESS_TARGET: &str = "access";

/// What the requests of downstream connections are recorded against: shared by the
/// connections to one destination (each connection's client is in its access log [`Head`]s).
#[derive(Clone)]
pub(crate) struct Observer {
    pub(crate) metrics: Arc<ProxyMetrics>,
    pub(crate) dest: Arc<DestinationMetrics>,
    pub(crate) access_log: bool,
    /// The client's verified SPIFFE ID (inbound mesh TLS), for the access log.
    pub(crate) peer_id: Option<Arc<str>>,
    /// Where requests go, for the access log.
    pub(crate) upstream: UpstreamName,
}

/// The inbound authorization rule that decided a request (a response extension, for the access
/// log).
#[derive(Debug, Clone)]
pub struct AuthzRule(pub Arc<str>);

/// The gRPC method a REST request was transcoded to (a response extension, for the access
/// log's `grpc` field).
#[derive(Debug, Clone)]
pub struct Transcoded(pub Arc<str>);

/// A connection's client, for the access log: 18 bytes where a `SocketAddr` takes 32, in every
/// connection's task (an IPv4 address is kept mapped, and printed as IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Peer {
    ip: [u8; 16],
    port: u16,
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Peer {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        Peer {
            ip: ip.octets(),
            port: addr.port(),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ip = std::net::Ipv6Addr::from(self.ip).to_canonical();
        SocketAddr::new(ip, self.port).fmt(f)
    }
}

/// The original destination (no allocation per connection), or the `--target` authority.
#[derive(Debug, Clone)]
pub(crate) enum UpstreamName {
    Addr(SocketAddr),
    Name(Arc<str>),
}

impl std::fmt::Display for UpstreamName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamName::Addr(a) => write!(f, "{a}"),
            UpstreamName::Name(n) => f.write_str(n),
        }
    }
}

/// A client-controlled value in the access log: as it is when it is plain visible ASCII, else
/// quoted with escapes, so that a `Host: a status=200` cannot forge fields of a plain-text line.
struct Field<'a>(&'a str);

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plain = !self.0.is_empty()
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if plain {
            f.write_str(self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

/// The request fields the access log prints, taken before the request is forwarded (only when
/// the access log is on: they cost a clone), and the client that sent it.
pub(crate) struct Head {
    pub(crate) method: http::Method,
    pub(crate) authority: String,
    pub(crate) path: String,
    pub(crate) peer: Peer,
}

impl Head {
    fn of<B>(req: &Request<B>, peer: Peer) -> Head {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "-".to_owned());
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        Head {
            method: req.method().clone(),
            authority,
            path,
            peer,
        }
    }
}

/// Forwards `req` (from the client at `peer`) with `forward` and records the outcome: counts,
/// duration to the response head, the reason of a locally made answer, and the access log line.
pub(crate) async fn observe<B, R, F, Fut>(
    obs: &Observer,
    peer: Peer,
    req: Request<B>,
    forward: F,
) -> Response<R>
where
    F: FnOnce(Request<B>) -> Fut,
    Fut: Future<Output = Response<R>>,
{
    let start = Instant::now();
    let method = method_label(req.method());
    let head = obs.access_log.then(|| Head::of(&req, peer));
    let resp = forward(req).await;
    let elapsed = start.elapsed();
    // Only answers the proxy made itself carry the error (see `crate::error::local_response`):
    // an upstream sidecar's error header relayed through us is not our error.
    let answer = Answer {
        status: resp.status(),
        local_error: resp.extensions().get::<ProxyError>().copied(),
        authz: resp
            .extensions()
            .get::<AuthzRule>()
            .map(|r| Arc::clone(&r.0)),
        grpc: resp
            .extensions()
            .get::<Transcoded>()
            .map(|t| Arc::clone(&t.0)),
    };
    record(obs, method, head, &answer, elapsed);
    resp
}

/// How a request was answered, as far as the records go.
pub(crate) struct Answer {
    pub(crate) status: http::StatusCode,
    /// The proxy's own error, for an answer it made itself.
    pub(crate) local_error: Option<ProxyError>,
    pub(crate) authz: Option<Arc<str>>,
    pub(crate) grpc: Option<Arc<str>>,
}

/// Records one request: its count and duration (to the response head), the proxy's error if it
/// answered itself, and the access log line (`head`: present when the access log is on).
pub(crate) fn record(
    obs: &Observer,
    method: super::MethodLabel,
    head: Option<Head>,
    answer: &Answer,
    elapsed: std::time::Duration,
) {
    let status = answer.status;
    obs.dest.record_as(method, status, elapsed);
    let local_error = answer.local_error;
    if let Some(err) = local_error {
        obs.metrics.error(obs.dest.direction(), err);
    }
    if let Some(head) = head {
        tracing::info!(
            target: ACCESS_TARGET,
            direction = %obs.dest.direction().as_str(),
            method = %head.method,
            authority = %Field(&head.authority),
            path = %Field(&head.path),
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            upstream = %obs.upstream,
            peer = %head.peer,
            peer_id = %obs.peer_id.as_deref().unwrap_or("-"),
            authz = %answer.authz.as_deref().unwrap_or("-"),
            grpc = %answer.grpc.as_deref().unwrap_or("-"),
            error = %local_error.map_or("-", ProxyError::code),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Field, Peer};

    #[test]
    fn a_peer_prints_as_the_address_it_was() {
        for addr in ["10.1.2.3:40000", "[2001:db8::7]:443", "[::1]:1"] {
            let a: std::net::SocketAddr = addr.parse().unwrap();
            assert_eq!(Peer::from(a).to_string(), addr);
        }
    }

    #[test]
    fn client_values_cannot_forge_fields() {
        assert_eq!(Field("a.test:8080").to_string(), "a.test:8080");
        assert_eq!(Field("/p?a=b&c=d").to_string(), "/p?a=b&c=d");
        assert_eq!(
            Field("a.test status=200").to_string(),
            "\"a.test status=200\""
        );
        assert_eq!(Field("x\"y").to_string(), "\"x\\\"y\"");
        assert_eq!(Field("").to_string(), "\"\"");
    }
}
