//! Serving one downstream HTTP connection with hyper: the one place where a connection becomes
//! hyper's HTTP/1 (with upgrades) or HTTP/2 server, every request is recorded
//! ([`crate::metrics::access::observe`]), and the drain reaches the connection
//! ([`serve_until_drained`]). Interception mode (both directions) and `--target` mode use it.
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::config::HttpLimits;
use super::forward::ProxyBody;
use crate::lifecycle::{serve_until_drained, FirstRequest};
use crate::metrics::access::{observe, Observer};
use crate::metrics::conn::CountedIo;

/// Which HTTP server a connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// HTTP/1.x, upgrades (WebSocket) passed on.
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// Serves `client` until it closes, or until `stop` fires and the request in progress (or the
/// first one, given up to `limit` to arrive) is answered. Each request is recorded against
/// `observer` and handed to `forward`. `limits` bound what one client can make the server hold:
/// the time and size of a request head, HTTP/2 streams, and dead HTTP/2 peers.
// The connection's pieces are passed as they are: bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_http<F, Fut>(
    client: CountedIo<TcpStream>,
    protocol: Protocol,
    limits: &HttpLimits,
    stop: &CancellationToken,
    limit: Duration,
    observer: Arc<Observer>,
    forward: F,
) -> Result<(), hyper::Error>
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let first = Arc::new(FirstRequest::default());
    let svc_first = Arc::clone(&first);
    let forward = Arc::new(forward);
    let service = service_fn(move |req: Request<Incoming>| {
        svc_first.mark();
        let observer = Arc::clone(&observer);
        let forward = Arc::clone(&forward);
        async move { Ok::<_, Infallible>(observe(&observer, req, |req| forward(req)).await) }
    });
    let io = TokioIo::new(client);
    match protocol {
        Protocol::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_header_size(limits.max_header_bytes)
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            serve_until_drained(conn.as_mut(), stop, &first, limit, |c| {
                c.graceful_shutdown();
            })
            .await
        }
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.h2_max_concurrent_streams)
                .keep_alive_interval(limits.h2_keepalive)
                .keep_alive_timeout(limits.h2_keepalive)
                // Rapid reset (CVE-2023-44487): streams a client opens and resets before we
                // answer count against this; past it the connection ends with GOAWAY.
                .max_pending_accept_reset_streams(Some(20))
                .max_header_list_size(limits.max_header_bytes.try_into().unwrap_or(u32::MAX))
                .serve_connection(io, service);
            tokio::pin!(conn);
            serve_until_drained(conn.as_mut(), stop, &first, limit, |c| {
                c.graceful_shutdown();
            })
            .await
        }
    }
}
