//! The upstream HTTP/2 connection of h2c clients and of transcoded gRPC calls: one hyper h2
//! client connection, dialled on first use (with the connection dialled during detection when
//! there is one) and again when it has closed.
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::connect::{dial_conn, Mesh, Predial, Source};
use super::route::Route;
use crate::error::{Chain, Failed, ProxyError};
use crate::policy::retry::UpstreamBody;

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
    mesh: Arc<Mesh>,
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
        mesh: Arc<Mesh>,
    ) -> Self {
        H2Upstream {
            dst,
            route,
            source,
            mesh,
            state: tokio::sync::Mutex::new(H2State {
                predial,
                sender: None,
            }),
        }
    }

    /// The original destination it dials.
    pub(crate) fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// The route it was made for: its policies, the authority used when a request has none.
    pub(crate) fn route(&self) -> &Route {
        &self.route
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
        let connect_failed = |e: crate::error::ConnectError| Failed::connect(&e);
        let predialled = match state.predial.take() {
            Some(predial) => predial.into_stream(true).await.map_err(connect_failed)?,
            None => None,
        };
        let stream = match predialled {
            Some(stream) => stream,
            None => dial_conn(
                self.dst,
                timeout,
                self.source,
                self.route.plan.clone(),
                Arc::clone(&self.mesh),
            )
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

    /// One request over the connection (made or made again first if need be).
    pub(crate) async fn send(
        &self,
        req: http::Request<UpstreamBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, Failed> {
        let mut sender = self.sender().await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| Failed::from_error(&e))
    }

    /// Hands over a connection dialled during detection, if none is open or waiting; else it
    /// is dropped (closed).
    pub(crate) async fn offer(&self, predial: Predial) {
        self.state.lock().await.keep(predial);
    }

    /// [`H2Upstream::offer`] without waiting: dropped if a call holds the state (it is dialling
    /// its own connection then).
    pub(crate) fn offer_now(&self, predial: Predial) {
        if let Ok(mut state) = self.state.try_lock() {
            state.keep(predial);
        }
    }
}

impl H2State {
    fn keep(&mut self, predial: Predial) {
        let open = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        if !open && self.predial.is_none() {
            self.predial = Some(predial);
        }
    }
}
