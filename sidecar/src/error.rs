//! The bottom of the data path: every failure the proxy answers or acts on itself, as a value
//! that says **who failed** ([`Culprit`]), **what kind of failure** it was for the policies
//! ([`FailureKind`]) and **whether a retry is safe** (the request certainly never reached the
//! upstream). Callers decide from these fields, never from strings: the retry loop and the circuit
//! breaker ([`crate::policy::exchange`]), the error metrics and the access log
//! ([`crate::metrics::access`]), and the local HTTP answer ([`local_response`]), which carries
//! the error as a response extension so that nobody has to parse the `x-sidecar-error` header back.
//!
//! Pingora's error type is the model (an error knows its source and its retry type). This module
//! imports nothing from the crate: every layer above may use it.
//!
//! Size: about 640 lines, most of them the per-variant tables (code, status, culprit, message),
//! one `match` each, so that every error is described the same way in one place.
use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The header of every answer the proxy makes itself: `<who>-<why>` ([`ProxyError::code`]).
pub static X_SIDECAR_ERROR: HeaderName = HeaderName::from_static("x-sidecar-error");

/// Why dialling an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection to {0} refused")]
    Refused(SocketAddr),
    #[error("{0} is unreachable: {1}")]
    Unreachable(SocketAddr, io::Error),
    #[error("connecting to {0} timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, io::Error),
    #[error("connecting to {0} failed: {1}")]
    Other(SocketAddr, io::Error),
    /// The proxy itself ran out of something (file descriptors, local ports, buffers): not the
    /// upstream's fault.
    #[error("cannot connect to {0}: out of local resources: {1}")]
    LocalResources(SocketAddr, io::Error),
    /// Mesh TLS to the destination failed (and may not fall back to plaintext). The reason is
    /// the `result` label of `sidecar_mtls_handshakes_total`.
    #[error("mesh TLS to {0} failed ({1}): {2}")]
    Mesh(SocketAddr, &'static str, String),
    /// The destination requires mesh TLS and this proxy has no identity to present.
    #[error("mesh TLS to {0} is required, but this proxy has no workload identity: {1}")]
    NoIdentity(SocketAddr, String),
}

impl ConnectError {
    pub fn from_io(addr: SocketAddr, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnectError::Refused(addr),
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => ConnectError::Unreachable(addr, err),
            // Out of descriptors, memory or buffers; EADDRNOTAVAIL (and EAGAIN) on connect: no
            // free local port for an ephemeral bind.
            Some(
                libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EADDRNOTAVAIL
                | libc::EAGAIN,
            ) => ConnectError::LocalResources(addr, err),
            _ if err.kind() == io::ErrorKind::ConnectionRefused => ConnectError::Refused(addr),
            _ => ConnectError::Other(addr, err),
        }
    }
}

/// A failure the proxy answers (HTTP) or acts on (TCP: a reset, a close) itself, instead of
/// relaying what the upstream said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    UpstreamConnectRefused,
    UpstreamConnectUnreachable,
    UpstreamConnectTimeout,
    UpstreamConnectFailed,
    /// No response head within the request timeout.
    UpstreamTimeout,
    /// The upstream closed the connection before a complete response head.
    UpstreamClosed,
    /// The upstream reset the connection (RST) before a complete response head.
    UpstreamReset,
    /// The destination's circuit breaker is open: the request was not sent.
    UpstreamBreakerOpen,
    /// The upstream answered with something that is not valid HTTP.
    UpstreamProtocol,
    /// The upstream failed in a way we could not classify.
    Upstream,
    /// The downstream request body broke off while we were forwarding it.
    DownstreamBody,
    /// The downstream request body did not arrive within the request timeout (it was being
    /// read in full so that the request could be retried).
    DownstreamTimeout,
    /// Connection level: the client did not send a complete request head within the header
    /// timeout (a stalled or slowloris client, or an idle kept-alive connection); closed.
    DownstreamHeaderTimeout,
    /// Connection level: the client's request head was over the size limit; answered 431.
    DownstreamHeadTooLarge,
    /// Connection level: the client's request could not be parsed (bad or ambiguous framing);
    /// answered 400 by the HTTP server.
    DownstreamProtocol,
    /// The request cannot be forwarded as given (for example CONNECT inside an HTTP connection).
    ProxyUnsupported,
    /// The request could not be turned into an upstream request.
    ProxyBadRequest,
    /// The proxy ran out of a local resource (file descriptors, ports, memory) making the
    /// request: the upstream is not to blame.
    ProxyLocalResources,
    /// Connection level: someone dialled the outbound listener directly (no original
    /// destination to forward to). Closed.
    ProxyNotRedirected,
    /// Connection level: the original destination could not be read. Closed.
    ProxyNoOriginalDestination,
    /// Connection level: the original destination is the proxy itself. Closed.
    ProxyLoop,
    /// Mesh TLS to the upstream failed (its certificate was refused, or it is not a sidecar and
    /// the destination requires mesh TLS). Nothing of the request was sent.
    UpstreamMtls,
    /// The destination requires mesh TLS and the proxy has no valid identity.
    ProxyNoIdentity,
    /// A strict inbound port got a plaintext request (HTTP 403) or connection (reset).
    InboundMtlsRequired,
    /// Inbound authorization denied the request (HTTP 403, gRPC status 7) or connection (reset).
    InboundAuthzDenied,
    /// A REST request to a transcoded gRPC port could not become the method's message (a bad
    /// path variable, query parameter or JSON body): HTTP 400 naming the field.
    TranscodeBadRequest,
    /// A REST request body over the `[[transcode]]` section's `max_body_bytes`: HTTP 413.
    TranscodeTooLarge,
    /// A REST request to a transcoded gRPC port that matches no route: HTTP 404.
    TranscodeNoRoute,
}

/// Who failed, for logs, metrics labels and the error header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Culprit {
    Upstream,
    Downstream,
    Proxy,
}

/// What kind of upstream failure an error is, for the policies' failure sets
/// (`failure_on` of the breaker, `retry.on` of retries). Only upstream failures have one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The connection could not be made (refused, unreachable, connect timeout).
    Connect,
    /// The connection broke (closed, reset, garbage) before a response head.
    Reset,
    /// No response head within the request timeout.
    Timeout,
}

impl ProxyError {
    /// The `x-sidecar-error` header value and metrics `reason`: `<who>-<why>`, stable, for
    /// dashboards and tests.
    pub fn code(self) -> &'static str {
        match self {
            ProxyError::UpstreamConnectRefused => "upstream-connect-refused",
            ProxyError::UpstreamConnectUnreachable => "upstream-connect-unreachable",
            ProxyError::UpstreamConnectTimeout => "upstream-connect-timeout",
            ProxyError::UpstreamConnectFailed => "upstream-connect-failed",
            ProxyError::UpstreamTimeout => "upstream-timeout",
            ProxyError::UpstreamClosed => "upstream-closed",
            ProxyError::UpstreamReset => "upstream-reset",
            ProxyError::UpstreamBreakerOpen => "upstream-breaker-open",
            ProxyError::UpstreamProtocol => "upstream-protocol-error",
            ProxyError::Upstream => "upstream-error",
            ProxyError::DownstreamBody => "downstream-body-error",
            ProxyError::DownstreamTimeout => "downstream-timeout",
            ProxyError::DownstreamHeaderTimeout => "downstream-header-timeout",
            ProxyError::DownstreamHeadTooLarge => "downstream-head-too-large",
            ProxyError::DownstreamProtocol => "downstream-protocol-error",
            ProxyError::ProxyUnsupported => "proxy-unsupported-request",
            ProxyError::ProxyBadRequest => "proxy-bad-request",
            ProxyError::ProxyLocalResources => "proxy-local-resources",
            ProxyError::ProxyNotRedirected => "proxy-not-redirected",
            ProxyError::ProxyNoOriginalDestination => "proxy-no-original-destination",
            ProxyError::ProxyLoop => "proxy-loop",
            ProxyError::UpstreamMtls => "upstream-mtls-failed",
            ProxyError::ProxyNoIdentity => "proxy-no-identity",
            ProxyError::InboundMtlsRequired => "inbound-mtls-required",
            ProxyError::InboundAuthzDenied => "inbound-authz-denied",
            ProxyError::TranscodeBadRequest => "transcode-bad-request",
            ProxyError::TranscodeTooLarge => "transcode-body-too-large",
            ProxyError::TranscodeNoRoute => "transcode-no-route",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::UpstreamConnectTimeout | ProxyError::UpstreamTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::UpstreamBreakerOpen
            | ProxyError::ProxyLocalResources
            | ProxyError::ProxyNoIdentity => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::InboundMtlsRequired | ProxyError::InboundAuthzDenied => {
                StatusCode::FORBIDDEN
            }
            ProxyError::DownstreamBody
            | ProxyError::ProxyBadRequest
            | ProxyError::TranscodeBadRequest => StatusCode::BAD_REQUEST,
            ProxyError::TranscodeTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::TranscodeNoRoute => StatusCode::NOT_FOUND,
            ProxyError::DownstreamTimeout | ProxyError::DownstreamHeaderTimeout => {
                StatusCode::REQUEST_TIMEOUT
            }
            ProxyError::DownstreamHeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::DownstreamProtocol => StatusCode::BAD_REQUEST,
            ProxyError::ProxyUnsupported => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Who failed. Only upstream failures count against a destination's circuit breaker.
    pub fn culprit(self) -> Culprit {
        match self {
            ProxyError::DownstreamBody
            | ProxyError::DownstreamTimeout
            | ProxyError::DownstreamHeaderTimeout
            | ProxyError::DownstreamHeadTooLarge
            | ProxyError::DownstreamProtocol
            | ProxyError::InboundMtlsRequired
            | ProxyError::InboundAuthzDenied
            | ProxyError::TranscodeBadRequest
            | ProxyError::TranscodeTooLarge
            | ProxyError::TranscodeNoRoute => Culprit::Downstream,
            ProxyError::ProxyUnsupported
            | ProxyError::ProxyNoIdentity
            | ProxyError::ProxyBadRequest
            | ProxyError::ProxyLocalResources
            | ProxyError::ProxyNotRedirected
            | ProxyError::ProxyNoOriginalDestination
            | ProxyError::ProxyLoop => Culprit::Proxy,
            _ => Culprit::Upstream,
        }
    }

    /// The kind of upstream failure, matched against the policies' failure sets. `None` for
    /// everything that says nothing about the upstream's health: the breaker refusing (nothing
    /// was sent), the client's or the proxy's own failures.
    pub fn failure_kind(self) -> Option<FailureKind> {
        if self.culprit() != Culprit::Upstream {
            return None;
        }
        match self {
            ProxyError::UpstreamConnectRefused
            | ProxyError::UpstreamConnectUnreachable
            | ProxyError::UpstreamConnectTimeout
            | ProxyError::UpstreamConnectFailed
            | ProxyError::UpstreamMtls => Some(FailureKind::Connect),
            ProxyError::UpstreamTimeout => Some(FailureKind::Timeout),
            ProxyError::UpstreamClosed
            | ProxyError::UpstreamReset
            | ProxyError::UpstreamProtocol
            | ProxyError::Upstream => Some(FailureKind::Reset),
            _ => None,
        }
    }

    /// Whether the request certainly never reached the upstream, so that sending it again
    /// cannot duplicate it, whatever its method.
    pub fn retry_safe(self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnectRefused
                | ProxyError::UpstreamConnectUnreachable
                | ProxyError::UpstreamConnectTimeout
                | ProxyError::UpstreamConnectFailed
                | ProxyError::UpstreamBreakerOpen
                | ProxyError::UpstreamMtls
        )
    }

    /// The short text body of the local answer (static: no allocation on the error path).
    pub fn message(self) -> &'static str {
        match self {
            ProxyError::UpstreamConnectRefused => "sidecar: upstream refused the connection\n",
            ProxyError::UpstreamConnectUnreachable => "sidecar: upstream is unreachable\n",
            ProxyError::UpstreamConnectTimeout => "sidecar: connecting to the upstream timed out\n",
            ProxyError::UpstreamConnectFailed => "sidecar: connecting to the upstream failed\n",
            ProxyError::UpstreamTimeout => "sidecar: the upstream did not answer in time\n",
            ProxyError::UpstreamClosed => "sidecar: the upstream closed the connection\n",
            ProxyError::UpstreamReset => "sidecar: the upstream reset the connection\n",
            ProxyError::UpstreamBreakerOpen => {
                "sidecar: circuit breaker open: the upstream failed repeatedly, not trying it now\n"
            }
            ProxyError::UpstreamProtocol => "sidecar: the upstream sent invalid HTTP\n",
            ProxyError::Upstream => "sidecar: the upstream request failed\n",
            ProxyError::DownstreamBody => "sidecar: the request body broke off\n",
            ProxyError::DownstreamTimeout => {
                "sidecar: the request body did not arrive within the request timeout\n"
            }
            ProxyError::DownstreamHeaderTimeout => {
                "sidecar: the request head did not arrive within the header timeout\n"
            }
            ProxyError::DownstreamHeadTooLarge => "sidecar: the request head is too large\n",
            ProxyError::DownstreamProtocol => "sidecar: the request is not valid HTTP\n",
            ProxyError::ProxyUnsupported => "sidecar: this request cannot be proxied here\n",
            ProxyError::ProxyLocalResources => {
                "sidecar: the proxy is out of local resources (file descriptors, ports)\n"
            }
            ProxyError::UpstreamMtls => "sidecar: mesh TLS to the upstream failed\n",
            ProxyError::ProxyNoIdentity => {
                "sidecar: mesh TLS is required and this proxy has no workload identity\n"
            }
            ProxyError::InboundMtlsRequired => {
                "sidecar: this port accepts mesh TLS only (the caller has no sidecar)\n"
            }
            ProxyError::InboundAuthzDenied => {
                "sidecar: denied by the inbound authorization policy\n"
            }
            ProxyError::TranscodeBadRequest => {
                "sidecar: the request does not fit the gRPC method's message\n"
            }
            ProxyError::TranscodeTooLarge => {
                "sidecar: the request body is over the transcoding limit (max_body_bytes)\n"
            }
            ProxyError::TranscodeNoRoute => {
                "sidecar: no REST route of this gRPC port matches the request\n"
            }
            ProxyError::ProxyBadRequest
            | ProxyError::ProxyNotRedirected
            | ProxyError::ProxyNoOriginalDestination
            | ProxyError::ProxyLoop => "sidecar: the request cannot be forwarded\n",
        }
    }

    /// Classifies an error of the upstream HTTP client (hyper, our connector) by walking its
    /// source chain.
    pub fn classify(err: &(dyn StdError + 'static)) -> ProxyError {
        let mut next: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = next {
            if let Some(c) = e.downcast_ref::<ConnectError>() {
                return ProxyError::from(c);
            }
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                if h.is_timeout() {
                    return ProxyError::UpstreamTimeout;
                }
                if h.is_parse() || h.is_parse_status() {
                    return ProxyError::UpstreamProtocol;
                }
                if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                    return if caused_by_reset(h) {
                        ProxyError::UpstreamReset
                    } else {
                        ProxyError::UpstreamClosed
                    };
                }
                if (h.is_body_write_aborted() || h.is_user()) && is_body_error(h) {
                    // Our body is the downstream request body: it failed, not the upstream.
                    return ProxyError::DownstreamBody;
                }
            }
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return match io.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                        ProxyError::UpstreamReset
                    }
                    io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof => {
                        ProxyError::UpstreamClosed
                    }
                    io::ErrorKind::TimedOut => ProxyError::UpstreamTimeout,
                    _ => ProxyError::Upstream,
                };
            }
            next = e.source();
        }
        ProxyError::Upstream
    }
}

impl ProxyError {
    /// What a downstream HTTP connection's end says about the client, if anything worth
    /// counting: a header timeout, an oversized head, unparseable framing. (The HTTP server has
    /// closed the connection, or answered 431 or 400, itself.)
    pub fn of_downstream(err: &hyper::Error) -> Option<ProxyError> {
        if err.is_timeout() {
            Some(ProxyError::DownstreamHeaderTimeout)
        } else if err.is_parse_too_large() {
            Some(ProxyError::DownstreamHeadTooLarge)
        } else if err.is_parse() || sent_goaway(err) {
            Some(ProxyError::DownstreamProtocol)
        } else {
            None
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// True if the HTTP/2 connection ended with a GOAWAY that we sent because the client broke the
/// protocol or its limits (rapid reset, a never-ending header block, a stream flood).
fn sent_goaway(err: &hyper::Error) -> bool {
    let mut next = err.source();
    while let Some(e) = next {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_library();
        }
        next = e.source();
    }
    false
}

/// True if an io error below `err` is a connection reset (the peer sent RST).
fn caused_by_reset(err: &(dyn StdError + 'static)) -> bool {
    let mut next = err.source();
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
            );
        }
        next = e.source();
    }
    false
}

/// hyper reports a failing request body as a user error whose source is the body's own error.
fn is_body_error(h: &hyper::Error) -> bool {
    h.source()
        .is_some_and(|s| s.downcast_ref::<hyper::Error>().is_some())
}

impl From<&ConnectError> for ProxyError {
    fn from(e: &ConnectError) -> Self {
        match e {
            ConnectError::Refused(_) => ProxyError::UpstreamConnectRefused,
            ConnectError::Unreachable(..) => ProxyError::UpstreamConnectUnreachable,
            ConnectError::Timeout(..) => ProxyError::UpstreamConnectTimeout,
            ConnectError::Resolve(..) | ConnectError::Other(..) => {
                ProxyError::UpstreamConnectFailed
            }
            ConnectError::LocalResources(..) => ProxyError::ProxyLocalResources,
            ConnectError::Mesh(..) => ProxyError::UpstreamMtls,
            ConnectError::NoIdentity(..) => ProxyError::ProxyNoIdentity,
        }
    }
}

/// Why one request got no upstream response: the error, what to log, and (an open breaker)
/// when to come back.
#[derive(Debug)]
pub struct Failed {
    pub err: ProxyError,
    pub detail: Cow<'static, str>,
    pub retry_after: Option<Duration>,
}

impl Failed {
    pub fn new(err: ProxyError, detail: impl Into<Cow<'static, str>>) -> Self {
        Failed {
            err,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// From an error of the upstream HTTP client (hyper, our connector).
    pub fn from_error(e: &(dyn StdError + 'static)) -> Self {
        Failed::new(ProxyError::classify(e), Chain(e).to_string())
    }

    /// A dial that failed.
    pub fn connect(e: &ConnectError) -> Self {
        Failed::new(ProxyError::from(e), e.to_string())
    }

    pub fn timeout() -> Self {
        Failed::new(
            ProxyError::UpstreamTimeout,
            "no response within the request timeout",
        )
    }
}

/// The answer the proxy makes itself for `err`: its status, a short text body, the
/// `x-sidecar-error` header, and `err` as a response extension (what the metrics and the access
/// log read: an upstream sidecar's error header relayed through us carries no extension, so it
/// is never counted as ours).
pub fn local_response(err: ProxyError) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(err.message().as_bytes())));
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
    resp.extensions_mut().insert(err);
    resp
}

/// Displays an error with its whole source chain ("a: b: c"): hyper's top-level messages alone
/// ("client error (Connect)") do not say what happened.
pub struct Chain<'a>(pub &'a (dyn StdError + 'static));

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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 80))
    }

    #[test]
    fn connect_errors_map_to_codes() {
        let refused =
            ConnectError::from_io(addr(), io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(
            ProxyError::classify(&refused),
            ProxyError::UpstreamConnectRefused
        );
        let unreach =
            ConnectError::from_io(addr(), io::Error::from_raw_os_error(libc::EHOSTUNREACH));
        assert_eq!(
            ProxyError::classify(&unreach),
            ProxyError::UpstreamConnectUnreachable
        );
        let timeout = ConnectError::Timeout(addr(), Duration::from_secs(1));
        let e = ProxyError::classify(&timeout);
        assert_eq!(e, ProxyError::UpstreamConnectTimeout);
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(e.retry_safe());
    }

    #[test]
    fn codes_name_the_culprit() {
        for e in [
            ProxyError::UpstreamConnectRefused,
            ProxyError::UpstreamTimeout,
            ProxyError::UpstreamClosed,
            ProxyError::UpstreamReset,
            ProxyError::UpstreamBreakerOpen,
            ProxyError::Upstream,
        ] {
            assert!(e.code().starts_with("upstream-"));
            assert_eq!(e.culprit(), Culprit::Upstream);
        }
        assert!(ProxyError::ProxyUnsupported.code().starts_with("proxy-"));
        let open = ProxyError::UpstreamBreakerOpen;
        assert_eq!(open.code(), "upstream-breaker-open");
        assert_eq!(open.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(open.retry_safe(), "nothing was sent");
        assert_eq!(ProxyError::UpstreamReset.code(), "upstream-reset");
        assert_eq!(
            ProxyError::DownstreamTimeout.status(),
            StatusCode::REQUEST_TIMEOUT
        );
        assert_eq!(ProxyError::DownstreamTimeout.culprit(), Culprit::Downstream);
        assert!(ProxyError::DownstreamBody.code().starts_with("downstream-"));
        assert_eq!(
            ProxyError::UpstreamConnectRefused.status(),
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn only_upstream_failures_have_a_kind() {
        use ProxyError::*;
        for (e, kind) in [
            (UpstreamConnectRefused, Some(FailureKind::Connect)),
            (UpstreamConnectTimeout, Some(FailureKind::Connect)),
            (UpstreamTimeout, Some(FailureKind::Timeout)),
            (UpstreamReset, Some(FailureKind::Reset)),
            (UpstreamClosed, Some(FailureKind::Reset)),
            (UpstreamProtocol, Some(FailureKind::Reset)),
            (UpstreamBreakerOpen, None),
            (DownstreamBody, None),
            (DownstreamTimeout, None),
            (ProxyBadRequest, None),
            (ProxyLoop, None),
        ] {
            assert_eq!(e.failure_kind(), kind, "{e}");
        }
        for e in [ProxyNotRedirected, ProxyNoOriginalDestination, ProxyLoop] {
            assert_eq!(e.culprit(), Culprit::Proxy);
            assert!(e.code().starts_with("proxy-"));
            assert!(!e.retry_safe());
        }
    }

    #[test]
    fn local_resource_errors_blame_the_proxy() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EADDRNOTAVAIL,
            libc::ENOBUFS,
        ] {
            let e = ConnectError::from_io(addr(), io::Error::from_raw_os_error(errno));
            let err = ProxyError::from(&e);
            assert_eq!(err, ProxyError::ProxyLocalResources, "errno {errno}");
            assert_eq!(err.culprit(), Culprit::Proxy);
            assert_eq!(
                err.failure_kind(),
                None,
                "never counted against a destination"
            );
            assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        let e = ConnectError::from_io(addr(), io::Error::from_raw_os_error(libc::ENETUNREACH));
        assert_eq!(ProxyError::from(&e), ProxyError::UpstreamConnectUnreachable);
    }

    #[test]
    fn local_answers_carry_the_error() {
        let resp = local_response(ProxyError::UpstreamConnectRefused);
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()[&X_SIDECAR_ERROR], "upstream-connect-refused");
        assert_eq!(
            resp.extensions().get::<ProxyError>(),
            Some(&ProxyError::UpstreamConnectRefused)
        );
    }
}
