//! `--target` mode: a reverse proxy in front of one service. HTTP/1 and h2c (told apart by the
//! first bytes), every request to the target URL, under its destination's policies.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::config::Http1Engine;
use super::detect::{client_bytes, wait_until, H2_PREFACE};
use super::forward::{error_response, forward_h1};
use super::h1::{self, Serve};
use super::parked;
use super::route::RouteKey;
use super::serve::{serve_http, Protocol};
use super::shared::Shared;
use crate::error::{Chain, ProxyError};
use crate::metrics::conn::{ConnGuard, CountedIo};

/// Serves one `--target` connection. (A block rather than an `async fn`: see
/// `transparent::serve`.)
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in its future"
)]
pub(crate) fn serve(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    conn: ConnGuard,
) -> impl Future<Output = ()> + Send {
    async move {
        if let Err(e) = client.set_nodelay(true) {
            debug!(%peer, error = %e, "cannot set TCP_NODELAY downstream");
        }
        let stop = &shared.inbound_cancel;
        let limit = shared.config.detect_timeout;
        // Boxed: the sniff's state (its timer) is freed once it has decided, instead of
        // sizing the future every connection holds for its whole life.
        let Some(h2) = Box::pin(sniff_h2(&client, stop, limit)).await else {
            return;
        };
        let observer = shared.target_observer();
        // A reverse proxy in front of one service: its requests come from other hosts.
        let route = shared.target_route.as_ref().map(|r| {
            let key = RouteKey::Target(peer.ip());
            shared.routes.share(key, |_| true, || r.for_client(peer))
        });
        if !h2 && shared.config.http.http1_engine == Http1Engine::Native {
            if let Some(route) = route {
                let egress = &shared.outbound;
                let host = egress.raw.host(
                    &route.authority,
                    route.dest.policy().max_connections,
                    route.plan.clone(),
                );
                let engine = h1::Client {
                    pool: Arc::clone(&egress.raw),
                    host,
                    route,
                    observer,
                    peer: peer.into(),
                    strict: false,
                    inbound: None,
                    dir: crate::metrics::Dir::Inbound,
                    shared: Arc::clone(&shared),
                };
                let io = CountedIo::new(client, conn);
                if let Some(idle) = h1::serve(engine, io, Serve::Parkable).await {
                    parked::park(idle, None);
                }
            }
            return;
        }
        let svc_shared = Arc::clone(&shared);
        let forward = move |req| {
            let shared = Arc::clone(&svc_shared);
            let route = route.clone();
            async move {
                match &route {
                    Some(route) => forward_h1(&shared, &shared.outbound, route, req).await,
                    // Not reached: target connections only exist in `--target` mode.
                    None => error_response(ProxyError::ProxyBadRequest),
                }
            }
        };
        let protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
        let client = CountedIo::new(client, conn);
        // Boxed: hyper's server state is only paid for by the connections that use it (the
        // native engine's connections keep this future small).
        let result = Box::pin(serve_http(
            client,
            protocol,
            &shared.config.http,
            stop,
            limit,
            observer,
            peer,
            forward,
        ))
        .await;
        if let Err(e) = result {
            debug!(%peer, error = %Chain(&e), "connection ended with an error");
            if let Some(err) = ProxyError::of_downstream(&e) {
                shared
                    .telemetry
                    .metrics
                    .error(crate::metrics::Dir::Inbound, err);
            }
        }
    }
}

/// Waits for a `--target` client's first bytes: `Some(true)` for the HTTP/2 prior-knowledge
/// preface, `Some(false)` for anything else (HTTP/1; hyper answers garbage with 400), `None`
/// if the client closed, or said nothing until `limit` after a drain began. A partial preface
/// gets `limit` to complete. (hyper-util's auto builder does the same, but carries both
/// protocols' connection state in every connection.)
async fn sniff_h2(client: &TcpStream, stop: &CancellationToken, limit: Duration) -> Option<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut seen = 0;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled(), if deadline.is_none() && seen == 0 => {
                deadline = Some(tokio::time::Instant::now() + limit);
            }
            n = client_bytes(client, &mut buf, seen) => match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    seen = n;
                    if !H2_PREFACE.starts_with(&buf[..n]) {
                        return Some(false);
                    }
                    if n == H2_PREFACE.len() {
                        return Some(true);
                    }
                    deadline.get_or_insert(tokio::time::Instant::now() + limit);
                }
            },
            _ = wait_until(deadline) => return (seen > 0).then_some(false),
        }
    }
}
