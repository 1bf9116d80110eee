//! HTTP forwarding: turns a downstream request into an upstream one (hop-by-hop headers out;
//! `X-Forwarded-By`, `x-request-id`, `traceparent` and, from other hosts, `x-forwarded-for` in;
//! authority kept), sends it under the destination's policies (circuit breaker, request timeout,
//! retries within the budget), and relays the answer or answers locally with a status and an
//! `x-sidecar-error` header that says who failed.
//!
//! One request, step by step ([`exchange`]): ask the breaker (open: 503 at once, nothing sent);
//! keep the body for replay if the request may be retried (idempotent method, body known to be
//! small); send; report the outcome to the breaker; on a retryable failure (connect error, reset,
//! 503 by default) and while attempts, the deadline and the budget allow, pause (jittered) and
//! send again. Nothing is retried once a response is being relayed: the decision is made on the
//! response head, before any byte goes downstream.
use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::connect::{dial, Predial, Source};
use super::error::ProxyError;
use super::pool::{Host, PooledBody};
use super::{Egress, Shared};
use crate::policy::breaker::Rejected;
use crate::policy::headers::{self, ForwardedClient, X_REQUEST_ID};
use crate::policy::idle::{self, Relayed};
use crate::policy::retry::{backoff, is_idempotent, Replay, UpstreamBody};
use crate::policy::Destination;

/// The body we answer with: the upstream's, streamed through, or a short local one.
pub type ProxyBody = Either<PooledBody, Full<Bytes>>;

// Statics built at compile time; cloning one is a pointer copy (static `Bytes`), so the hot path
// neither validates nor allocates header names.
pub static X_FORWARDED_BY: HeaderName = HeaderName::from_static("x-forwarded-by");
pub static X_SIDECAR_ERROR: HeaderName = HeaderName::from_static("x-sidecar-error");
/// On retried attempts only: which attempt this is (2, 3, ...), so the upstream can tell.
pub static X_SIDECAR_ATTEMPT: HeaderName = HeaderName::from_static("x-sidecar-attempt");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static FORWARDED_BY_VALUE: HeaderValue = HeaderValue::from_static("sidecar");

/// Where requests of one downstream connection go: the original destination (interception) or
/// the `--target` URL, and under which policies.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    /// Pool key and dial address: an IP literal in interception mode.
    pub(crate) authority: Authority,
    /// Path prefix of a `--target` URL with a path (`http://svc:8080/api`), else `None`.
    pub(crate) prefix: Option<Arc<str>>,
    /// The policies and their state (breaker, budget) for this connection's destination; a
    /// config rule for the request's authority overrides it per request (see `by_name`).
    pub(crate) dest: Arc<Destination>,
    /// Look up name rules by the request's `Host` (outbound and `--target` with name rules).
    pub(crate) by_name: bool,
    /// The port of an authority without one (the connection's destination port).
    pub(crate) default_port: u16,
    /// Requests from other hosts (inbound, `--target`): the client, for `x-forwarded-for`.
    pub(crate) forwarded_for: Option<ForwardedClient>,
    /// HTTP/1: the pool's entry for `authority`, looked up once per connection.
    pub(crate) upstream: Option<Arc<Host>>,
}

impl Route {
    /// The same route for requests of the client at `peer` (adds the forwarding headers).
    pub(crate) fn for_client(&self, peer: SocketAddr) -> Route {
        Route {
            forwarded_for: Some(ForwardedClient::new(peer.ip())),
            ..self.clone()
        }
    }

    /// The destination of one request: a name rule for its authority, else the connection's.
    fn destination(&self, shared: &Shared, authority: Option<&str>) -> Option<Arc<Destination>> {
        if !self.by_name {
            return None;
        }
        shared.policies.by_authority(authority?, self.default_port)
    }
}

/// Why a request got no upstream response: the error (status and header), what to log, and
/// for an open breaker, when to come back.
pub(crate) struct Failed {
    pub(super) err: ProxyError,
    detail: Cow<'static, str>,
    retry_after: Option<Duration>,
}

impl Failed {
    pub(super) fn new(err: ProxyError, detail: impl Into<Cow<'static, str>>) -> Self {
        Failed {
            err,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// From an error of the upstream HTTP client (hyper, hyper-util, our connector).
    pub(super) fn from_error(e: &(dyn StdError + 'static)) -> Self {
        Failed::new(ProxyError::classify(e), Chain(e).to_string())
    }

    fn rejected(r: Rejected) -> Self {
        Failed {
            err: ProxyError::UpstreamBreakerOpen,
            detail: Cow::Borrowed(match r.state {
                crate::policy::breaker::State::HalfOpen => {
                    "circuit breaker half-open, probe in flight"
                }
                _ => "circuit breaker open",
            }),
            retry_after: Some(r.retry_after),
        }
    }

    fn timeout() -> Self {
        Failed::new(
            ProxyError::UpstreamTimeout,
            "no response within the request timeout",
        )
    }
}

/// The local answer for a request that failed at `dest`, logged, with the request id.
fn failed(f: Failed, dest: &Destination, request_id: &HeaderValue) -> Response<ProxyBody> {
    if f.err == ProxyError::UpstreamBreakerOpen {
        // The state change was logged when it happened; one line per refused request would
        // flood the log exactly when it matters.
        debug!(destination = dest.name(), reason = %f.detail, "request refused");
    } else {
        warn!(
            destination = dest.name(),
            error = %f.detail,
            code = f.err.code(),
            status = f.err.status().as_u16(),
            "request failed"
        );
    }
    let mut resp = error_response(f.err);
    let headers = resp.headers_mut();
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    if let Some(after) = f.retry_after {
        // Whole seconds, rounded up, at least 1 (RFC 9110 10.2.3).
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

/// The request headers every forwarded request gets from the policies; returns the request id.
fn policy_headers(headers: &mut HeaderMap, forwarded_for: Option<&ForwardedClient>) -> HeaderValue {
    headers.insert(X_FORWARDED_BY.clone(), FORWARDED_BY_VALUE.clone());
    let id = headers::ensure_request_id(headers);
    headers::ensure_traceparent(headers);
    if let Some(client) = forwarded_for {
        headers::add_forwarded_client(headers, client);
    }
    id
}

/// A request body, ready to be sent once or several times.
enum Prepared {
    Stream(Incoming),
    Replay(Replay),
}

/// Keeps the body in memory if it is empty or has a known length within `max`; else leaves it
/// streaming (the request will not be retried).
async fn prepare_replay(
    body: Incoming,
    headers: &HeaderMap,
    max: usize,
    deadline: Instant,
) -> Result<Prepared, Failed> {
    if body.is_end_stream() {
        return Ok(Prepared::Replay(Replay::default()));
    }
    let length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match length {
        Some(n) if n <= max as u64 => {}
        _ => return Ok(Prepared::Stream(body)),
    }
    match tokio::time::timeout_at(deadline, Limited::new(body, max).collect()).await {
        Ok(Ok(collected)) => {
            let trailers = collected.trailers().cloned();
            Ok(Prepared::Replay(Replay::new(
                collected.to_bytes(),
                trailers,
            )))
        }
        Ok(Err(e)) => Err(Failed::new(
            ProxyError::DownstreamBody,
            format!("reading the request body: {e}"),
        )),
        Err(_) => Err(Failed::new(
            ProxyError::DownstreamTimeout,
            "the request body did not arrive within the request timeout",
        )),
    }
}

/// A copy of a request head (extensions are not copied: nothing upstream reads them).
fn clone_head(head: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    req.into_parts().0
}

/// What an attempt's result was, for the breaker and the retry decision.
fn summary<B>(result: &Result<Response<B>, Failed>) -> Result<StatusCode, ProxyError> {
    match result {
        Ok(resp) => Ok(resp.status()),
        Err(f) => Err(f.err),
    }
}

async fn attempt<B, S, F>(
    send: &mut S,
    req: Request<UpstreamBody>,
    deadline: Instant,
) -> Result<Response<B>, Failed>
where
    S: FnMut(Request<UpstreamBody>) -> F,
    F: Future<Output = Result<Response<B>, Failed>>,
{
    match tokio::time::timeout_at(deadline, send(req)).await {
        Ok(result) => result,
        Err(_) => Err(Failed::timeout()),
    }
}

/// Sends one request to `dest` under its policies (see the module documentation); `send` makes
/// one attempt.
async fn exchange<B, S, F>(
    dest: &Destination,
    head: Parts,
    body: Incoming,
    mut send: S,
) -> Result<Response<B>, Failed>
where
    S: FnMut(Request<UpstreamBody>) -> F,
    F: Future<Output = Result<Response<B>, Failed>>,
{
    let policy = dest.policy();
    let deadline = Instant::now() + policy.request_timeout;
    let mut permit = dest.admit().map_err(Failed::rejected)?;
    // Only requests that are sent pay into the retry budget: an outage refused by the breaker
    // must not save up retries for the moment it ends.
    dest.count_request();
    let retry = &policy.retry;
    let prepared = if retry.max_retries > 0 && is_idempotent(&head.method) {
        // A failure here is the client's: the permit is dropped unreported (ignored).
        prepare_replay(body, &head.headers, retry.max_body_bytes, deadline).await?
    } else {
        Prepared::Stream(body)
    };
    let replay = match prepared {
        Prepared::Stream(body) => {
            let req = Request::from_parts(head, UpstreamBody::Streaming(body));
            let result = attempt(&mut send, req, deadline).await;
            dest.report(permit, dest.outcome(summary(&result)));
            return result;
        }
        Prepared::Replay(replay) => replay,
    };
    let mut number = 1u32;
    loop {
        let mut parts = clone_head(&head);
        if number > 1 {
            parts
                .headers
                .insert(X_SIDECAR_ATTEMPT.clone(), HeaderValue::from(number));
        }
        let req = Request::from_parts(parts, UpstreamBody::Replay(replay.body()));
        let result = attempt(&mut send, req, deadline).await;
        let outcome = summary(&result);
        dest.report(permit, dest.outcome(outcome));
        if number > retry.max_retries || !dest.is_retryable(outcome) {
            return result;
        }
        let pause = backoff(retry.backoff, number);
        if Instant::now() + pause >= deadline {
            return result;
        }
        if !dest.take_retry() {
            debug!(
                destination = dest.name(),
                "retry budget exhausted; not retrying"
            );
            return result;
        }
        tokio::time::sleep(pause).await;
        permit = match dest.admit() {
            Ok(p) => p,
            // This very failure may have opened the breaker: answer with what we got.
            Err(_) => return result,
        };
        let cause = match outcome {
            Ok(status) => Cow::Owned(status.as_u16().to_string()),
            Err(e) => Cow::Borrowed(e.code()),
        };
        number += 1;
        debug!(destination = dest.name(), attempt = number, %cause, "retrying");
    }
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
    let request_id = policy_headers(&mut head.headers, route.forwarded_for.as_ref());
    let host = head.headers.get(HOST).and_then(|h| h.to_str().ok());
    let named = route.destination(shared, host);
    let dest = named.as_deref().unwrap_or(&route.dest);

    let looked_up;
    let pool_host = match &route.upstream {
        Some(host) => host,
        None => {
            looked_up = egress
                .pool
                .host(&route.authority, route.dest.policy().max_connections);
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
    resp.map(Either::Left)
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

/// The upstream HTTP/2 connection of one downstream h2c connection.
///
/// HTTP/2 is not pooled across downstream connections: the upstream `:authority` must be the one
/// the client sent, while a pool keyed by original destination would rewrite it. One upstream
/// connection per downstream connection keeps both right, and h2 multiplexes anyway.
pub(crate) struct H2Upstream {
    dst: SocketAddr,
    /// Policies of the connection's destination (and the dial's connect timeout).
    route: Route,
    source: Source,
    state: tokio::sync::Mutex<H2State>,
}

struct H2State {
    predial: Option<Predial>,
    sender: Option<SendRequest<UpstreamBody>>,
}

impl H2Upstream {
    /// `route.authority` is the `:authority` used when the client sent none.
    pub(crate) fn new(
        dst: SocketAddr,
        route: Route,
        source: Source,
        predial: Option<Predial>,
    ) -> Self {
        H2Upstream {
            dst,
            route,
            source,
            state: tokio::sync::Mutex::new(H2State {
                predial,
                sender: None,
            }),
        }
    }

    /// The live sender, (re)connecting if there is none: first with the connection dialled
    /// during detection, later by dialling again.
    async fn sender(&self) -> Result<SendRequest<UpstreamBody>, Failed> {
        let mut state = self.state.lock().await;
        if let Some(sender) = &state.sender {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        state.sender = None;
        let timeout = self.route.dest.policy().connect_timeout;
        let connect_failed = |e: super::error::ConnectError| Failed {
            err: ProxyError::from(&e),
            detail: Cow::Owned(e.to_string()),
            retry_after: None,
        };
        let predialled = match state.predial.take() {
            Some(predial) => predial.into_stream(true).await.map_err(connect_failed)?,
            None => None,
        };
        let stream = match predialled {
            Some(stream) => stream,
            None => dial(self.dst, timeout, self.source)
                .await
                .map_err(connect_failed)?,
        };
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                Failed::new(
                    ProxyError::UpstreamProtocol,
                    format!("h2 handshake failed: {}", Chain(&e)),
                )
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
            .unwrap_or_else(|| upstream.route.authority.clone());
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
    let route = &upstream.route;
    let request_id = policy_headers(req.headers_mut(), route.forwarded_for.as_ref());
    let named = route.destination(shared, req.uri().authority().map(Authority::as_str));
    let dest = named.as_deref().unwrap_or(&route.dest);

    let (head, body) = req.into_parts();
    let result = exchange(dest, head, body, |req| async move {
        let mut sender = upstream.sender().await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| Failed::from_error(&e))
    })
    .await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(f) => return failed(f, dest, &request_id),
    };
    strip_hop_by_hop(resp.headers_mut(), false, false);
    resp.map(|body| Either::Left(PooledBody::unpooled(body)))
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
