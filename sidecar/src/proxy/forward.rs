//! HTTP forwarding: turns a downstream request into an upstream one (hop-by-hop headers out,
//! `X-Forwarded-By` in, authority kept), sends it, and relays the answer or answers locally with
//! a status and an `x-sidecar-error` header that says who failed.
use std::error::Error as StdError;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{debug, warn};

use super::connect::{dial, Predial, Source};
use super::error::ProxyError;
use super::{Egress, Shared};

/// The body we answer with: the upstream's, streamed through, or a short local one.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

// Statics built at compile time; cloning one is a pointer copy (static `Bytes`), so the hot path
// neither validates nor allocates header names.
pub static X_FORWARDED_BY: HeaderName = HeaderName::from_static("x-forwarded-by");
pub static X_SIDECAR_ERROR: HeaderName = HeaderName::from_static("x-sidecar-error");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static FORWARDED_BY_VALUE: HeaderValue = HeaderValue::from_static("sidecar");

/// Where requests of one downstream connection go: the original destination (interception) or
/// the `--target` URL.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    /// Pool key and dial address: an IP literal in interception mode.
    pub(crate) authority: Authority,
    /// Path prefix of a `--target` URL with a path (`http://svc:8080/api`), else `None`.
    pub(crate) prefix: Option<Arc<str>>,
}

/// A local answer for `err`.
pub fn error_response(err: ProxyError) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        err.message().as_bytes(),
    ))));
    *resp.status_mut() = err.status();
    let headers = resp.headers_mut();
    headers.insert(
        X_SIDECAR_ERROR.clone(),
        HeaderValue::from_static(err.code()),
    );
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn fail(err: ProxyError, dst: &dyn fmt::Display, cause: &dyn fmt::Display) -> Response<ProxyBody> {
    warn!(%dst, error = %cause, code = err.code(), status = err.status().as_u16(), "request failed");
    error_response(err)
}

/// Displays an error with its whole source chain ("a: b: c"): hyper's top-level messages alone
/// ("client error (Connect)") do not say what happened.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
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
    let upgrade = allow_upgrade && upgrade_token && headers.contains_key(UPGRADE);
    for name in listed {
        headers.remove(name);
    }
    headers.remove(CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(TRANSFER_ENCODING);
    // gRPC needs `te: trailers` end to end on HTTP/2; every other TE use is per hop.
    let te_is_trailers = keep_te_trailers
        && headers
            .get(TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_is_trailers {
        headers.remove(TE);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
    upgrade
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
    let is_h1 = req.version() < Version::HTTP_2;
    let upgrade = strip_hop_by_hop(req.headers_mut(), is_h1, false);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut head, body) = req.into_parts();
    let mut parts = std::mem::take(&mut head.uri).into_parts();
    let original_authority = parts.authority.replace(route.authority.clone());
    parts.scheme = Some(Scheme::HTTP);
    let path = parts
        .path_and_query
        .take()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.path_and_query = Some(match &route.prefix {
        None => path,
        Some(prefix) => match PathAndQuery::try_from(format!("{prefix}{path}")) {
            Ok(p) => p,
            Err(e) => return fail(ProxyError::ProxyBadRequest, &route.authority, &e),
        },
    });
    head.uri = match Uri::from_parts(parts) {
        Ok(uri) => uri,
        Err(e) => return fail(ProxyError::ProxyBadRequest, &route.authority, &e),
    };
    // HTTP/2 clients carry the authority in `:authority`, not `Host`: keep it for the upstream.
    if !head.headers.contains_key(HOST) {
        if let Some(value) = original_authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            head.headers.insert(HOST, value);
        }
    }
    if head.version == Version::HTTP_2 {
        head.version = Version::HTTP_11;
    }
    head.headers
        .insert(X_FORWARDED_BY.clone(), FORWARDED_BY_VALUE.clone());
    let req = Request::from_parts(head, body);

    let sent = tokio::time::timeout(shared.config.request_timeout, egress.client.request(req));
    let mut resp = match sent.await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return fail(ProxyError::classify(&e), &route.authority, &Chain(&e)),
        Err(_) => {
            return fail(
                ProxyError::UpstreamTimeout,
                &route.authority,
                &"no response within the request timeout",
            )
        }
    };
    match downstream_upgrade {
        Some(downstream) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let upstream = hyper::upgrade::on(&mut resp);
            shared.tracker.spawn(tunnel(downstream, upstream));
            strip_hop_by_hop(resp.headers_mut(), true, false);
        }
        _ => {
            strip_hop_by_hop(resp.headers_mut(), false, false);
        }
    }
    resp.map(Either::Left)
}

/// After a `101 Switching Protocols`, both sides speak the new protocol: relay bytes.
async fn tunnel(downstream: OnUpgrade, upstream: OnUpgrade) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(e) => {
            debug!(error = %Chain(&e), "upgrade did not complete");
            return;
        }
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((up, down)) => debug!(
            bytes_up = up,
            bytes_down = down,
            "upgraded connection closed"
        ),
        Err(e) => debug!(error = %e, "upgraded connection failed"),
    }
}

/// The upstream HTTP/2 connection of one downstream h2c connection.
///
/// HTTP/2 is not pooled across downstream connections: the upstream `:authority` must be the one
/// the client sent, while a pool keyed by original destination would rewrite it. One upstream
/// connection per downstream connection keeps both right, and h2 multiplexes anyway.
pub(crate) struct H2Upstream {
    dst: SocketAddr,
    authority: Authority,
    source: Source,
    state: tokio::sync::Mutex<H2State>,
}

struct H2State {
    predial: Option<Predial>,
    sender: Option<SendRequest<Incoming>>,
}

impl H2Upstream {
    pub(crate) fn new(
        dst: SocketAddr,
        authority: Authority,
        source: Source,
        predial: Option<Predial>,
    ) -> Self {
        H2Upstream {
            dst,
            authority,
            source,
            state: tokio::sync::Mutex::new(H2State {
                predial,
                sender: None,
            }),
        }
    }

    /// The live sender, (re)connecting if there is none: first with the connection dialled
    /// during detection, later by dialling again.
    async fn sender(&self, shared: &Shared) -> Result<SendRequest<Incoming>, ProxyError> {
        let mut state = self.state.lock().await;
        if let Some(sender) = &state.sender {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        state.sender = None;
        let timeout = shared.config.connect_timeout;
        let predialled = match state.predial.take() {
            Some(predial) => predial.into_stream(true).await.map_err(|e| {
                warn!(dst = %self.dst, error = %e, "connect failed");
                ProxyError::from(&e)
            })?,
            None => None,
        };
        let stream = match predialled {
            Some(stream) => stream,
            None => dial(self.dst, timeout, self.source).await.map_err(|e| {
                warn!(dst = %self.dst, error = %e, "connect failed");
                ProxyError::from(&e)
            })?,
        };
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                warn!(dst = %self.dst, error = %Chain(&e), "h2 handshake failed");
                ProxyError::UpstreamProtocol
            })?;
        let dst = self.dst;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%dst, error = %Chain(&e), "upstream h2 connection ended");
            }
        });
        state.sender = Some(sender.clone());
        Ok(sender)
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
            .unwrap_or_else(|| upstream.authority.clone());
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        match Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return fail(ProxyError::ProxyBadRequest, &upstream.dst, &e),
        }
    }
    req.headers_mut()
        .insert(X_FORWARDED_BY.clone(), FORWARDED_BY_VALUE.clone());

    let exchange = async {
        let mut sender = upstream.sender(shared).await?;
        sender.send_request(req).await.map_err(|e| {
            let err = ProxyError::classify(&e);
            warn!(dst = %upstream.dst, error = %Chain(&e), code = err.code(), "request failed");
            err
        })
    };
    let mut resp = match tokio::time::timeout(shared.config.request_timeout, exchange).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(err)) => return error_response(err),
        Err(_) => {
            return fail(
                ProxyError::UpstreamTimeout,
                &upstream.dst,
                &"no response within the request timeout",
            )
        }
    };
    strip_hop_by_hop(resp.headers_mut(), false, false);
    resp.map(Either::Left)
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
        assert_eq!(resp.headers()[&X_SIDECAR_ERROR], "upstream-connect-refused");
    }
}
