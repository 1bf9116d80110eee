//! Serving one downstream HTTP connection with hyper: the one place where a connection becomes
//! hyper's HTTP/1 (with upgrades) or HTTP/2 server, every request is recorded
//! ([`crate::metrics::access::observe`]), and the drain reaches the connection
//! ([`serve_until_drained`]). Interception mode (both directions) and `--target` mode use it.
//! The servers' limits are set here too: the HTTP/1 header timeout and head size, and for HTTP/2
//! the stream limit, keep-alive pings, the rapid-reset cap and the idle timeout (streams are
//! counted from request to the end of the response body; none open for the idle timeout closes
//! the connection with GOAWAY).
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::config::HttpLimits;
use super::forward::ProxyBody;
use crate::lifecycle::{serve_until_drained, FirstRequest};
use crate::metrics::access::{observe, Observer, Peer};
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
/// `observer` (as the client at `peer`'s) and handed to `forward`. `limits` bound what one client can make the server hold:
/// the time and size of a request head, HTTP/2 streams, and dead HTTP/2 peers.
// The connection's pieces are passed as they are: bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_http<I, F, Fut>(
    client: CountedIo<I>,
    protocol: Protocol,
    limits: &HttpLimits,
    stop: &CancellationToken,
    limit: Duration,
    observer: Arc<Observer>,
    peer: SocketAddr,
    forward: F,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let first = Arc::new(FirstRequest::default());
    let svc_first = Arc::clone(&first);
    let forward = Arc::new(forward);
    let peer = Peer::from(peer);
    let service = service_fn(move |req: Request<Incoming>| {
        svc_first.mark();
        let observer = Arc::clone(&observer);
        let forward = Arc::clone(&forward);
        async move {
            let resp = observe(&observer, peer, req, |req| forward(req)).await;
            Ok::<_, Infallible>(resp)
        }
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
            // Streams are counted so that a connection with none open for `h2_idle_timeout`
            // is closed (gracefully: GOAWAY, then whatever is in flight finishes).
            let streams = Arc::new(Streams::default());
            let svc_streams = Arc::clone(&streams);
            let service = service_fn(move |req: Request<Incoming>| {
                let guard = StreamGuard::open(&svc_streams);
                let call = service.call(req);
                async move {
                    let resp = call.await?;
                    Ok::<_, Infallible>(resp.map(|body| Tracked {
                        body,
                        _guard: guard,
                    }))
                }
            });
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
            let idle = streams.idle_for(limits.h2_idle_timeout);
            tokio::pin!(idle);
            tokio::select! {
                r = serve_until_drained(conn.as_mut(), stop, &first, limit, |c| {
                    c.graceful_shutdown();
                }) => return r,
                () = &mut idle => {}
            }
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// The streams of one HTTP/2 connection: how many are open, how many were ever started.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    started: AtomicU64,
    closed: Notify,
}

impl Streams {
    /// Resolves once no stream has been open, and none started, for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            loop {
                let closed = self.closed.notified();
                tokio::pin!(closed);
                // Registered before the check, so a close in between is not missed.
                closed.as_mut().enable();
                if self.open.load(Ordering::Acquire) == 0 {
                    break;
                }
                closed.await;
            }
            let started = self.started.load(Ordering::Acquire);
            tokio::time::sleep(idle).await;
            if self.open.load(Ordering::Acquire) == 0
                && self.started.load(Ordering::Acquire) == started
            {
                return;
            }
        }
    }
}

/// One open stream: from the request to the end of its response body (or its reset).
struct StreamGuard(Arc<Streams>);

impl StreamGuard {
    fn open(streams: &Arc<Streams>) -> StreamGuard {
        streams.started.fetch_add(1, Ordering::AcqRel);
        streams.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(Arc::clone(streams))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_one();
        }
    }
}

/// A response body that keeps its stream counted as open until it is done.
struct Tracked {
    body: ProxyBody,
    _guard: StreamGuard,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
