//! Errors that know who failed (upstream, downstream or the proxy itself) and whether retrying is
//! safe; they become the HTTP status and the `x-sidecar-error` header of locally made answers.
use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

/// Why dialling an upstream failed. Carried through hyper-util's client as the connector error.
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
}

impl ConnectError {
    pub(crate) fn from_io(addr: SocketAddr, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnectError::Refused(addr),
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EADDRNOTAVAIL) => {
                ConnectError::Unreachable(addr, err)
            }
            _ if err.kind() == io::ErrorKind::ConnectionRefused => ConnectError::Refused(addr),
            _ => ConnectError::Other(addr, err),
        }
    }
}

/// A failure the proxy answers for itself instead of relaying an upstream response.
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
    /// The request cannot be forwarded as given (for example CONNECT inside an HTTP connection).
    ProxyUnsupported,
    /// The request could not be turned into an upstream request.
    ProxyBadRequest,
}

/// Who failed, for logs, metrics labels and the error header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Culprit {
    Upstream,
    Downstream,
    Proxy,
}

impl ProxyError {
    /// The `x-sidecar-error` header value: `<who>-<why>`, stable, for dashboards and tests.
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
            ProxyError::ProxyUnsupported => "proxy-unsupported-request",
            ProxyError::ProxyBadRequest => "proxy-bad-request",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::UpstreamConnectTimeout | ProxyError::UpstreamTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::UpstreamBreakerOpen => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::DownstreamBody | ProxyError::ProxyBadRequest => StatusCode::BAD_REQUEST,
            ProxyError::DownstreamTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ProxyUnsupported => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn culprit(self) -> Culprit {
        match self {
            ProxyError::DownstreamBody | ProxyError::DownstreamTimeout => Culprit::Downstream,
            ProxyError::ProxyUnsupported | ProxyError::ProxyBadRequest => Culprit::Proxy,
            _ => Culprit::Upstream,
        }
    }

    /// Whether the request certainly never reached the upstream, so a retry cannot duplicate it.
    pub fn retry_safe(self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnectRefused
                | ProxyError::UpstreamConnectUnreachable
                | ProxyError::UpstreamConnectTimeout
                | ProxyError::UpstreamConnectFailed
                | ProxyError::UpstreamBreakerOpen
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
            ProxyError::ProxyUnsupported => "sidecar: this request cannot be proxied here\n",
            ProxyError::ProxyBadRequest => "sidecar: the request cannot be forwarded\n",
        }
    }

    /// Classifies an error from the upstream HTTP client by walking its source chain.
    pub fn classify(err: &(dyn StdError + 'static)) -> ProxyError {
        let mut next: Option<&(dyn StdError + 'static)> = Some(err);
        let mut saw_connect = false;
        while let Some(e) = next {
            if let Some(c) = e.downcast_ref::<ConnectError>() {
                return ProxyError::from(c);
            }
            if let Some(legacy) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
                saw_connect |= legacy.is_connect();
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
                if h.is_body_write_aborted() || h.is_user() {
                    // Our body is the downstream request body: it failed, not the upstream.
                    if is_body_error(h) {
                        return ProxyError::DownstreamBody;
                    }
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
                    _ if saw_connect => ProxyError::UpstreamConnectFailed,
                    _ => ProxyError::Upstream,
                };
            }
            next = e.source();
        }
        if saw_connect {
            ProxyError::UpstreamConnectFailed
        } else {
            ProxyError::Upstream
        }
    }
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
        }
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
}
