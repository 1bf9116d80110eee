//! Mesh TLS on the connection path: which outbound connections are mesh TLS ([`Mesh::plan`]),
//! the handshake with its opportunistic fallback ([`Mesh::handshake`]), the upstream connection
//! as the rest of the proxy sees it ([`Conn`]), and the inbound side's terminated stream
//! ([`MeshServerStream`]) behind the same [`Downstream`] interface as a plain socket.
//!
//! Outbound: a destination inside `[mtls] mesh_networks` is dialled with mesh TLS when the proxy
//! has an identity and the destination's `mtls` is not `off`. In `opportunistic` mode a peer that
//! turns out not to be a sidecar (it did not answer as TLS, refused our ALPN, or presented a
//! certificate from outside our bundle, all before any app byte was sent) is dialled again in
//! plaintext and remembered for `[mtls] fallback_ttl`; `require` never falls back. A peer whose
//! certificate chains to our bundle but is refused (expired, another trust domain, not a pinned
//! identity) is a mesh peer with a problem: that is an error, never a downgrade.
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::ConnectError;
use crate::identity::verify::{failure_label, is_not_mesh, peer_id};
use crate::identity::{IdentityStore, SpiffeId, MESH_ALPN};
use crate::metrics::{Dir, MtlsMetrics};
use crate::policy::{DestinationPolicy, MeshConfig, MtlsMode};

/// Destinations remembered as "not a sidecar" at most (a bound against a scan of the mesh
/// networks; past it, a new one is simply tried again next time).
const MAX_REMEMBERED: usize = 4096;

/// How an outbound connection is made.
#[derive(Clone, Debug)]
pub(crate) enum Plan {
    Plain,
    Tls(Arc<TlsPlan>),
    /// `require`, and no identity to present: the dial fails (why is in the string).
    NoIdentity(Arc<str>),
}

impl std::fmt::Debug for TlsPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPlan")
            .field("require", &self.require)
            .field("pins", &self.pins)
            .finish()
    }
}

impl Plan {
    pub(crate) fn is_tls(&self) -> bool {
        !matches!(self, Plan::Plain)
    }
}

pub(crate) struct TlsPlan {
    config: Arc<rustls::ClientConfig>,
    require: bool,
    pins: Vec<SpiffeId>,
    fallback_ttl: Duration,
}

/// Mesh state shared by every connection: the identity, and the peers found not to be sidecars.
pub(crate) struct Mesh {
    identity: Option<Arc<IdentityStore>>,
    plaintext: Mutex<HashMap<SocketAddr, Instant>>,
    metrics: MtlsMetrics,
}

/// Why an outbound handshake did not give a mesh connection.
enum Refused {
    /// Not a sidecar, and the plan allows plaintext: dial again in plaintext.
    Fallback,
    Failed(ConnectError),
}

impl Mesh {
    pub(crate) fn new(identity: Option<Arc<IdentityStore>>, metrics: MtlsMetrics) -> Mesh {
        Mesh {
            identity,
            plaintext: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// No identity: every plan is plaintext (tests).
    #[cfg(test)]
    pub(crate) fn disabled() -> Arc<Mesh> {
        let metrics = crate::metrics::ProxyMetrics::unregistered();
        Arc::new(Mesh::new(None, metrics.mtls.clone()))
    }

    /// The identity for an inbound handshake, if any.
    pub(crate) fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        Some(Arc::clone(&self.identity.as_ref()?.current()?.server))
    }

    /// This proxy's own SPIFFE ID (the `By=` of `x-forwarded-client-cert`).
    pub(crate) fn own_id(&self) -> Option<SpiffeId> {
        Some(self.identity.as_ref()?.current()?.id.clone())
    }

    /// How to dial `dst` (outbound) under `policy` and the `[mtls]` section.
    pub(crate) fn plan(
        &self,
        dst: SocketAddr,
        policy: &DestinationPolicy,
        mesh: &MeshConfig,
    ) -> Plan {
        let Some(store) = &self.identity else {
            return Plan::Plain;
        };
        if policy.mtls == MtlsMode::Off || !mesh.in_mesh(dst.ip()) {
            return Plan::Plain;
        }
        let require = policy.mtls == MtlsMode::Require;
        if !require && self.remembered_plaintext(dst) {
            return Plan::Plain;
        }
        match store.current() {
            Some(identity) => Plan::Tls(Arc::new(TlsPlan {
                config: Arc::clone(&identity.client),
                require,
                pins: policy.server_identities.clone(),
                fallback_ttl: mesh.fallback_ttl,
            })),
            None if require => Plan::NoIdentity(
                store
                    .ready_problem(Duration::ZERO)
                    .unwrap_or_else(|| "no identity".into())
                    .into(),
            ),
            None => Plan::Plain,
        }
    }

    fn remembered_plaintext(&self, dst: SocketAddr) -> bool {
        let mut map = self
            .plaintext
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match map.get(&dst) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                map.remove(&dst);
                false
            }
            None => false,
        }
    }

    fn remember_plaintext(&self, dst: SocketAddr, ttl: Duration) {
        let mut map = self
            .plaintext
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_REMEMBERED {
            let now = Instant::now();
            map.retain(|_, until| *until > now);
        }
        if map.len() < MAX_REMEMBERED {
            map.insert(dst, Instant::now() + ttl);
        }
    }

    /// Makes `tcp` (just connected to `dst`) a mesh TLS connection per `plan`; `redial` gives a
    /// fresh connection for a fallback to plaintext.
    pub(crate) async fn connect<F, Fut>(
        &self,
        tcp: TcpStream,
        dst: SocketAddr,
        plan: &Plan,
        timeout: Duration,
        redial: F,
    ) -> Result<Conn, ConnectError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<TcpStream, ConnectError>>,
    {
        let tls = match plan {
            Plan::Plain => return Ok(Conn::Plain(tcp)),
            Plan::NoIdentity(why) => {
                self.metrics.handshake(Dir::Outbound, "no_identity");
                return Err(ConnectError::NoIdentity(dst, why.to_string()));
            }
            Plan::Tls(tls) => tls,
        };
        match self.handshake(tcp, dst, tls, timeout).await {
            Ok(conn) => Ok(conn),
            Err(Refused::Failed(e)) => Err(e),
            Err(Refused::Fallback) => {
                self.metrics.fallbacks.inc();
                self.remember_plaintext(dst, tls.fallback_ttl);
                debug!(%dst, "not a sidecar: plaintext (remembered)");
                redial().await.map(Conn::Plain)
            }
        }
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        dst: SocketAddr,
        plan: &TlsPlan,
        timeout: Duration,
    ) -> Result<Conn, Refused> {
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&plan.config));
        let name = ServerName::IpAddress(dst.ip().into());
        let result = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no mesh TLS handshake within {timeout:?}"),
            )),
        };
        let fail = |label: &'static str, detail: String| {
            self.metrics.handshake(Dir::Outbound, label);
            if plan.require || !matches!(label, "not_mesh" | "unknown_ca" | "timeout") {
                warn!(%dst, result = label, "mesh TLS failed: {detail}");
                Err(Refused::Failed(ConnectError::Mesh(dst, label, detail)))
            } else {
                Err(Refused::Fallback)
            }
        };
        let tls = match result {
            Ok(tls) => tls,
            Err(e) => {
                let label = if is_not_mesh(&e) {
                    match failure_label(&e) {
                        "unknown_ca" => "unknown_ca",
                        _ => "not_mesh",
                    }
                } else {
                    failure_label(&e)
                };
                return fail(label, e.to_string());
            }
        };
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(MESH_ALPN) {
            // A TLS server with a mesh certificate that does not speak our protocol: the app's
            // own TLS, not a sidecar.
            return fail("not_mesh", "the server did not select the mesh ALPN".into());
        }
        let Some(peer) = peer_id(session.peer_certificates()) else {
            return fail(
                "no_spiffe_id",
                "the server certificate has no SPIFFE ID".into(),
            );
        };
        if !plan.pins.is_empty() && !plan.pins.contains(&peer) {
            return fail(
                "identity_mismatch",
                format!("the server is {peer}, not one of the pinned server_identities"),
            );
        }
        self.metrics.handshake(Dir::Outbound, "ok");
        debug!(%dst, %peer, "mesh TLS");
        Ok(Conn::Mesh(Box::new(MeshClientStream {
            tls,
            ahead: Vec::new(),
        })))
    }

    /// Terminates inbound mesh TLS on `tcp` (its ClientHello offered our ALPN): client
    /// certificate required and verified. `None` (counted, logged) if it fails.
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Option<MeshServerStream> {
        let Some(config) = self.server_config() else {
            self.metrics.handshake(Dir::Inbound, "no_identity");
            warn!(%peer, "mesh TLS from a sidecar, but this proxy has no identity; reset");
            reset(&tcp);
            return None;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let result = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(r) => r,
            Err(_) => {
                self.metrics.handshake(Dir::Inbound, "timeout");
                debug!(%peer, "mesh TLS handshake timed out");
                return None;
            }
        };
        match result {
            Ok(tls) => {
                let Some(id) = peer_id(tls.get_ref().1.peer_certificates()) else {
                    self.metrics.handshake(Dir::Inbound, "no_spiffe_id");
                    return None;
                };
                self.metrics.handshake(Dir::Inbound, "ok");
                Some(MeshServerStream {
                    tls,
                    peer: id,
                    ahead: Vec::new(),
                })
            }
            Err(e) => {
                let label = failure_label(&e);
                self.metrics.handshake(Dir::Inbound, label);
                warn!(%peer, result = label, "inbound mesh TLS refused: {e}");
                None
            }
        }
    }
}

/// Closes with RST (once the caller drops it), so that the client sees a failure as it would have
/// without us.
pub(crate) fn reset(tcp: &TcpStream) {
    if let Err(e) = tcp.set_zero_linger() {
        debug!(error = %e, "cannot set SO_LINGER 0");
    }
}

/// [`reset`] for a client of `dir`. An app's outbound connection whose blocking reader a reset
/// may not reach (its end went through the in-pod redirect, see
/// `orig_dst::reset_may_not_reach_app`) gets a FIN instead, after what it sent and we did not
/// read is discarded (unread data would turn the close into a reset again). Only outbound
/// connections are asked about: the redirect never holds an inbound one.
pub(crate) fn reset_client(tcp: &TcpStream, dir: Dir) {
    if dir != Dir::Outbound || !crate::orig_dst::reset_may_not_reach_app(tcp) {
        return reset(tcp);
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(tcp);
    let mut sink = [0u8; 4096];
    // Bounded: what is queued now, at most 256 KiB. A plain non-blocking recv: tokio's try_read
    // would not even try without a readiness event it has not seen.
    for _ in 0..64 {
        // SAFETY: `sink` is a live, writable buffer of the length passed.
        let n = unsafe { libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            break;
        }
    }
    // SAFETY: a plain syscall on a socket we own.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } != 0 {
        debug!(error = %io::Error::last_os_error(), "cannot shut down for writing");
    }
}

/// Reads what the peer sent into `ahead` (at most `want` bytes in all) without losing it.
/// Cancel-safe: bytes land in `ahead` only once a read has completed.
async fn read_ahead<S: AsyncRead + Unpin>(
    stream: &mut S,
    ahead: &mut Vec<u8>,
    want: usize,
) -> io::Result<usize> {
    if ahead.len() >= want {
        return Ok(ahead.len());
    }
    let mut chunk = [0u8; MAX_AHEAD];
    let room = (want - ahead.len()).min(MAX_AHEAD);
    let n = stream.read(&mut chunk[..room]).await?;
    ahead.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// The most read ahead at once (detection looks at 64 bytes).
const MAX_AHEAD: usize = 64;

/// Serves `ahead` before the stream itself.
fn poll_read_ahead<S: AsyncRead + Unpin>(
    stream: &mut S,
    ahead: &mut Vec<u8>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    if !ahead.is_empty() {
        let n = ahead.len().min(buf.remaining());
        buf.put_slice(&ahead[..n]);
        ahead.drain(..n);
        return Poll::Ready(Ok(()));
    }
    Pin::new(stream).poll_read(cx, buf)
}

/// A mesh TLS connection we originated, with the server's verified identity.
pub(crate) struct MeshClientStream {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    /// Decrypted bytes read while waiting to see whether the server speaks first.
    ahead: Vec<u8>,
}

/// An upstream connection: plaintext, or mesh TLS.
pub(crate) enum Conn {
    Plain(TcpStream),
    Mesh(Box<MeshClientStream>),
}

impl Conn {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Mesh(m) => m.tls.get_ref().0,
        }
    }

    pub(crate) fn is_mesh(&self) -> bool {
        matches!(self, Conn::Mesh(_))
    }

    /// Waits until the server has sent something (data, EOF or an error).
    pub(crate) async fn spoke(&mut self) {
        match self {
            Conn::Plain(s) => {
                let mut byte = [0u8; 1];
                let _ = s.peek(&mut byte).await;
            }
            Conn::Mesh(m) => {
                let _ = read_ahead(&mut m.tls, &mut m.ahead, 1).await;
            }
        }
    }

    /// The server's first bytes already here (up to 9: an HTTP/2 frame header), without
    /// consuming them.
    pub(crate) fn first_bytes(&mut self) -> Vec<u8> {
        match self {
            Conn::Plain(s) => {
                let mut head = [0u8; 9];
                let n = s.peek_now(&mut head);
                head[..n].to_vec()
            }
            Conn::Mesh(m) => m.ahead.iter().take(9).copied().collect(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Mesh(m) => {
                let m = &mut **m;
                poll_read_ahead(&mut m.tls, &mut m.ahead, cx, buf)
            }
        }
    }
}

macro_rules! delegate_write {
    ($ty:ty, $self:ident => $inner:expr) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                let $self = self.get_mut();
                $inner.poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                let $self = self.get_mut();
                $inner.poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                true
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let $self = self.get_mut();
                $inner.poll_flush(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let $self = self.get_mut();
                $inner.poll_shutdown(cx)
            }
        }
    };
}

/// The writable half of a [`Conn`], pinned.
fn conn_writer(conn: &mut Conn) -> Pin<&mut (dyn AsyncWrite + Unpin + Send)> {
    match conn {
        Conn::Plain(s) => Pin::new(s),
        Conn::Mesh(m) => Pin::new(&mut m.tls),
    }
}

delegate_write!(Conn, this => conn_writer(this));

/// A downstream connection as detection and serving see it: a plain socket, or an inbound
/// mesh TLS stream already terminated.
pub(crate) trait Downstream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn tcp(&self) -> &TcpStream;
    /// Copies the bytes waiting now into `buf` without consuming them.
    fn peek_now(&mut self, buf: &mut [u8]) -> usize;
    /// Waits until more than `seen` bytes are waiting (or the client closed: 0), and copies them
    /// into `buf` without consuming them.
    fn peek_more<'a>(
        &'a mut self,
        buf: &'a mut [u8],
        seen: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
    /// The verified SPIFFE ID of the client (mesh TLS only).
    fn peer_id(&self) -> Option<&SpiffeId> {
        None
    }
}

impl Downstream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn peek_now(&mut self, buf: &mut [u8]) -> usize {
        nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(self),
            buf,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .unwrap_or(0)
    }

    fn peek_more<'a>(
        &'a mut self,
        buf: &'a mut [u8],
        seen: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        super::detect::client_bytes(self, buf, seen)
    }
}

/// An inbound mesh TLS connection, terminated: the client's decrypted bytes and its identity.
pub(crate) struct MeshServerStream {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SpiffeId,
    ahead: Vec<u8>,
}

impl Downstream for MeshServerStream {
    fn tcp(&self) -> &TcpStream {
        self.tls.get_ref().0
    }

    fn peek_now(&mut self, buf: &mut [u8]) -> usize {
        let n = self.ahead.len().min(buf.len());
        buf[..n].copy_from_slice(&self.ahead[..n]);
        n
    }

    async fn peek_more(&mut self, buf: &mut [u8], seen: usize) -> io::Result<usize> {
        loop {
            if self.ahead.len() > seen {
                return Ok(self.peek_now(buf));
            }
            if self.ahead.len() >= buf.len() {
                // Nothing more can be shown: wait (detection's deadline decides).
                std::future::pending::<()>().await;
            }
            let want = buf.len();
            let n = read_ahead(&mut self.tls, &mut self.ahead, want).await?;
            if n == 0 {
                if self.ahead.is_empty() {
                    return Ok(0);
                }
                // Closed after a partial preface: nothing more comes.
                std::future::pending::<()>().await;
            }
        }
    }

    fn peer_id(&self) -> Option<&SpiffeId> {
        Some(&self.peer)
    }
}

impl AsyncRead for MeshServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_read_ahead(&mut this.tls, &mut this.ahead, cx, buf)
    }
}

delegate_write!(MeshServerStream, this => Pin::new(&mut this.tls));
