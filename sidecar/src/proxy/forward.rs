//! HTTP forwarding: turns a downstream request into an upstream one (hop-by-hop headers out;
//! the policy headers in, see [`crate::policy::headers::apply`]; authority kept), hands it to
//! the policies' [`exchange`] (breaker, request timeout, retries within the budget) with a way to
//! make one attempt (the HTTP/1 pool, or the connection's upstream h2 connection), and relays the
//! answer, or the local one that says who failed.
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::h2::H2Upstream;
use super::pool::PooledBody;
use super::route::Route;
use super::shared::{Egress, Shared};
use crate::error::{local_response, Chain, Failed, ProxyError};
use crate::policy::exchange::{self, exchange};
use crate::policy::headers;
use crate::policy::idle::{self, Relayed};
use crate::policy::Destination;
use crate::transcode::stream::Streamed;

/// The body we answer with: the upstream's, streamed through (or a gRPC stream transcoded to
/// JSON lines as it arrives), or a short local one.
pub type ProxyBody = Either<Either<PooledBody, Box<Streamed>>, Full<Bytes>>;

// Statics built at compile time; cloning one is a pointer copy (static `Bytes`), so the hot path
// neither validates nor allocates header names.
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A local answer for `err` (see [`crate::error::local_response`]).
pub fn error_response(err: ProxyError) -> Response<ProxyBody> {
    local_response(err).map(Either::Right)
}

fn fail(err: ProxyError, dst: &dyn fmt::Display, cause: &dyn fmt::Display) -> Response<ProxyBody> {
    warn!(%dst, error = %cause, code = err.code(), status = err.status().as_u16(), "request failed");
    error_response(err)
}

/// The local answer for a request that failed at `dest` (see [`exchange::answer`]).
fn failed(f: Failed, dest: &Destination, request_id: &HeaderValue) -> Response<ProxyBody> {
    exchange::answer(f, dest, request_id).map(Either::Right)
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1): `Connection` and every header it lists,
/// `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`. Returns true if this is
/// an upgrade we pass on (then `Upgrade` stays and `Connection: upgrade` is set again).
/// `Proxy-Authorization` is kept on purpose: under interception the next hop may be the explicit
/// proxy the application meant to talk to.
pub(crate) fn strip_hop_by_hop(
    headers: &mut HeaderMap,
    allow_upgrade: bool,
    keep_te_trailers: bool,
) -> bool {
    // Most messages carry none of them (or only `Connection`): one pass over the names, then
    // lookups only for what is there.
    let mut present = 0u8;
    for name in headers.keys() {
        present |= hop_by_hop_bit(name);
    }
    if present == 0 {
        return false;
    }
    let mut upgrade_token = false;
    // Stays unallocated unless Connection lists extension headers, which is rare.
    let mut listed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for token in value.split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("upgrade") {
                upgrade_token = true;
            } else if token.is_empty()
                || token.eq_ignore_ascii_case("keep-alive")
                || token.eq_ignore_ascii_case("close")
            {
                // Removed below anyway, or not a header name.
            } else if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                listed.push(name);
            }
        }
    }
    let upgrade = allow_upgrade && upgrade_token && present & HOP_UPGRADE != 0;
    for name in listed {
        headers.remove(name);
    }
    if present & HOP_CONNECTION != 0 {
        headers.remove(CONNECTION);
    }
    if present & HOP_KEEP_ALIVE != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if present & HOP_PROXY_CONNECTION != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if present & HOP_TRANSFER_ENCODING != 0 {
        headers.remove(TRANSFER_ENCODING);
        // RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and an intermediary must
        // remove the received Content-Length before forwarding (else the next hop frames the
        // decoded body by a length that does not match it: truncation, or smuggling).
        headers.remove(CONTENT_LENGTH);
    }
    if present & HOP_TE != 0 {
        // gRPC needs `te: trailers` end to end on HTTP/2; every other TE use is per hop.
        let te_is_trailers = keep_te_trailers
            && headers
                .get(TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        if !te_is_trailers {
            headers.remove(TE);
        }
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & HOP_UPGRADE != 0 {
        headers.remove(UPGRADE);
    }
    upgrade
}

const HOP_CONNECTION: u8 = 1;
const HOP_KEEP_ALIVE: u8 = 2;
const HOP_PROXY_CONNECTION: u8 = 4;
const HOP_TRANSFER_ENCODING: u8 = 8;
const HOP_TE: u8 = 16;
const HOP_UPGRADE: u8 = 32;

/// Which hop-by-hop header `name` is (a bit of the above), or 0. Standard names compare as
/// small integers; only the two non-standard ones compare bytes.
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    if name == CONNECTION {
        HOP_CONNECTION
    } else if name == TRANSFER_ENCODING {
        HOP_TRANSFER_ENCODING
    } else if name == TE {
        HOP_TE
    } else if name == UPGRADE {
        HOP_UPGRADE
    } else if name == KEEP_ALIVE {
        HOP_KEEP_ALIVE
    } else if name == PROXY_CONNECTION {
        HOP_PROXY_CONNECTION
    } else {
        0
    }
}

/// Forwards one request through `egress`'s pooled HTTP/1 client (intercepted HTTP/1 clients, and
/// every request in `--target` mode).
pub(crate) async fn forward_h1(
    shared: &Shared,
    egress: &Egress,
    route: &Route,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        // A CONNECT at the start of a connection was passed through opaquely by detection; one
        // in the middle of an HTTP/1 connection cannot be (the bytes before it are gone).
        return fail(
            ProxyError::ProxyUnsupported,
            &route.authority,
            &"CONNECT inside an HTTP connection",
        );
    }
    if req.headers().get_all(HOST).iter().nth(1).is_some() {
        // RFC 9112 3.2: a request with more than one Host is invalid; which one a server would
        // use is anybody's guess (a classic way around host-based routing).
        return fail(
            ProxyError::ProxyBadRequest,
            &route.authority,
            &"more than one Host header",
        );
    }
    let is_h1 = req.version() < Version::HTTP_2;
    let upgrade = strip_hop_by_hop(req.headers_mut(), is_h1, false);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut head, body) = req.into_parts();
    // The upstream gets origin-form (`/path?query`, under the target's prefix). Most requests
    // already are: then the URI is left as parsed.
    let mut original_authority = None;
    if route.prefix.is_some() || head.uri.scheme().is_some() || head.uri.authority().is_some() {
        let mut parts = std::mem::take(&mut head.uri).into_parts();
        original_authority = parts.authority.take();
        let path = parts
            .path_and_query
            .take()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let path = match &route.prefix {
            None => path,
            Some(prefix) => match PathAndQuery::try_from(format!("{prefix}{path}")) {
                Ok(p) => p,
                Err(e) => return fail(ProxyError::ProxyBadRequest, &route.authority, &e),
            },
        };
        head.uri = Uri::from(path);
    }
    // HTTP/2 clients carry the authority in `:authority`, not `Host`: keep it for the upstream;
    // a request with neither (HTTP/1.0) names the destination.
    if !head.headers.contains_key(HOST) {
        let authority = original_authority.as_ref().unwrap_or(&route.authority);
        if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
            head.headers.insert(HOST, value);
        }
    }
    if head.version == Version::HTTP_2 {
        head.version = Version::HTTP_11;
    }
    let request_id = headers::apply(&mut head.headers, route.forwarded_for.as_deref());
    let dest = shared.destination(route, || {
        let host = head.headers.get(HOST)?.to_str().ok()?;
        Some(Cow::Borrowed(host))
    });
    let dest = &*dest;

    let looked_up;
    let pool_host = match &route.upstream {
        Some(host) => host,
        None => {
            looked_up = egress.pool.host(
                &route.authority,
                route.dest.policy().max_connections,
                route.plan.clone(),
            );
            &looked_up
        }
    };
    let result = exchange(dest, head, body, |req| egress.pool.send(pool_host, req)).await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(f) => return failed(f, dest, &request_id),
    };
    match downstream_upgrade {
        Some(downstream) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let upstream = hyper::upgrade::on(&mut resp);
            let idle = dest.policy().idle_timeout;
            shared.tracker.spawn(tunnel(downstream, upstream, idle));
            strip_hop_by_hop(resp.headers_mut(), true, false);
        }
        _ => {
            strip_hop_by_hop(resp.headers_mut(), false, false);
        }
    }
    resp.map(|body| Either::Left(Either::Left(body)))
}

/// After a `101 Switching Protocols`, both sides speak the new protocol: relay bytes (until both
/// are done, or nothing moved for `idle`).
async fn tunnel(downstream: OnUpgrade, upstream: OnUpgrade, idle: Duration) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(e) => {
            debug!(error = %Chain(&e), "upgrade did not complete");
            return;
        }
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    match idle::copy_bidirectional(&mut downstream, &mut upstream, idle).await {
        Relayed::Done(Ok((up, down))) => debug!(
            bytes_up = up,
            bytes_down = down,
            "upgraded connection closed"
        ),
        Relayed::Done(Err(e)) => debug!(error = %e, "upgraded connection failed"),
        Relayed::Idle => debug!(?idle, "upgraded connection idle; closed"),
    }
}

/// Forwards one request of an h2c prior-knowledge client over the upstream h2 connection.
pub(crate) async fn forward_h2(
    shared: &Shared,
    upstream: &H2Upstream,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    strip_hop_by_hop(req.headers_mut(), false, true);
    if req.uri().authority().is_none() {
        // The client sent no `:authority`: use its Host header, else the original destination.
        let authority = req
            .headers()
            .get(HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| upstream.route().authority.clone());
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        match Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return fail(ProxyError::ProxyBadRequest, &upstream.dst(), &e),
        }
    }
    let route = upstream.route();
    let request_id = headers::apply(req.headers_mut(), route.forwarded_for.as_deref());
    let dest = shared.destination(route, || {
        req.uri().authority().map(|a| Cow::Borrowed(a.as_str()))
    });
    let dest = &*dest;

    let (head, body) = req.into_parts();
    let result = exchange(dest, head, body, |req| upstream.send(req)).await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(f) => return failed(f, dest, &request_id),
    };
    strip_hop_by_hop(resp.headers_mut(), false, false);
    resp.map(|body| Either::Left(Either::Left(PooledBody::unpooled(body))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_listed_headers() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-private", "1"),
            ("proxy-authorization", "Basic x"),
            ("host", "example.com"),
        ]);
        assert!(!strip_hop_by_hop(&mut h, true, false));
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["proxy-authorization", "host"]);
    }

    #[test]
    fn keeps_upgrade_when_allowed() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(strip_hop_by_hop(&mut h, true, false));
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "websocket");

        let mut h = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(!strip_hop_by_hop(&mut h, false, false));
        assert!(h.is_empty());
    }

    #[test]
    fn keeps_te_trailers_for_h2() {
        let mut h = headers(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false, true);
        assert_eq!(h[TE], "trailers");
        strip_hop_by_hop(&mut h, false, false);
        assert!(h.is_empty());
    }

    #[test]
    fn error_response_names_the_failure() {
        let resp = error_response(ProxyError::UpstreamConnectRefused);
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            resp.headers()[&crate::error::X_SIDECAR_ERROR],
            "upstream-connect-refused"
        );
    }
}
