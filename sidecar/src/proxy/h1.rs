//! The native HTTP/1 engine (`--http1-engine native`, the default): one task per client
//! connection owns the client socket and, for each exchange, the upstream connection it
//! borrows from the pool, and drives both. Heads are parsed into offsets of the connection's
//! buffer ([`wire`]) and forwarded as their original bytes (name case and order kept), without
//! the hop-by-hop lines and with the policy headers appended, in one write; bodies are relayed
//! as they are framed, re-framed strictly ([`relay`], [`chunked`]). Buffers come from a
//! per-thread pool and go back when the connection goes idle.
//!
//! Everything around the bytes is the hyper engine's: admission (strict mTLS ports,
//! authorization), the destination and its policies ([`Retrying`]: breaker, request timeout,
//! retries of idempotent requests with the body kept when small), the local answers and their
//! error header, the request metrics and access log ([`record`]), and the drain.
//!
//! On a transcoded gRPC port, a REST call's body is read whole and handed to the transcoder,
//! whose answer is written here (the last section); any other request is forwarded as usual.
//!
//! Size: about 1,750 lines. The exchange is one state machine over two sockets; split further,
//! its steps would pass the same ten values back and forth (and a file below this one could not
//! use them: the layering forbids a child importing its parent).
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::debug;

use super::authorize::{self, Caller};
use super::forward::ProxyBody;
use super::h2::H2Upstream;
use super::mesh::Conn;
use super::pool::{Host, Lease, Pool, Pooled};
use super::route::Route;
use super::shared::Shared;
use super::transcode::{self, Handled};
use crate::error::{local_response, Failed, ProxyError};
use crate::metrics::access::{record, Answer, Head as LogHead, Observer, Peer};
use crate::metrics::{method_label, Dir, MethodLabel};
use crate::policy::exchange::{answer as failed_answer, Retrying};
use crate::policy::headers::{
    fresh_request_id, fresh_request_id_bytes, fresh_traceparent_bytes, is_valid_traceparent,
};
use crate::policy::retry::is_idempotent;
use crate::transcode::Transcoder;

mod chunked;
#[doc(hidden)]
pub mod fuzzing;
mod relay;
mod timer;
pub(crate) mod wire;

use relay::{Body, Fault, Inbuf, Sink, Source};
use timer::Timer;
use wire::{Framing, Head, LineCopy, Refusal, Role};

/// The largest response head read from an upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How often a request whose connection turned out closed before anything was written goes
/// to another one (nothing was sent: safe for any method).
const RESEND_UNSENT: u32 = 3;

/// The native engine keeps the connection itself: nothing runs for it while it is idle, so
/// whether the peer closed it is asked of the socket (a peek that never blocks).
impl Pooled for Conn {
    /// No task watches an idle connection: the reaper's look (no syscall unless the socket
    /// became readable) frees the slot of one the upstream closed within a second.
    const REAP_EVERY: Duration = Duration::from_secs(1);

    fn alive(&mut self) -> bool {
        // Asked of the socket only if the reactor saw it become readable since our last read
        // (tokio clears readiness after a read that drained the socket): usually no syscall.
        let fd = self.tcp().as_raw_fd();
        let peeked = self.tcp().try_io(tokio::io::Interest::READABLE, || {
            let mut byte = 0u8;
            // SAFETY: a one-byte buffer we own; MSG_PEEK leaves the byte in the socket.
            let n = unsafe {
                libc::recv(
                    fd,
                    std::ptr::addr_of_mut!(byte).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match peeked {
            // Closed by the peer.
            Ok(0) => false,
            // Bytes nobody asked for: a plaintext server talking out of turn (its next answer
            // would be read as ours); over mesh TLS, records such as session tickets are normal.
            Ok(_) => self.is_mesh(),
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        }
    }

    fn returned(&mut self) -> bool {
        // Just read to the end of its answer: it is checked when next checked out.
        true
    }

    async fn ready(&mut self) -> bool {
        // Checked when it was taken from the idle list; a new one is ready.
        true
    }

    async fn establish(stream: Conn, _host: &Arc<Host<Self>>) -> Result<Self, Failed> {
        Ok(stream)
    }
}

/// One client connection, as the engine serves it.
pub(crate) struct Client {
    pub(crate) shared: Arc<Shared>,
    pub(crate) route: Arc<Route>,
    pub(crate) observer: Arc<Observer>,
    /// The client, for the access log.
    pub(crate) peer: Peer,
    pub(crate) pool: Arc<Pool<Conn>>,
    pub(crate) host: Arc<Host<Conn>>,
    /// A strict mesh TLS port reached in plaintext: only probe paths are served.
    pub(crate) strict: bool,
    pub(crate) dir: Dir,
    /// What only captured inbound connections have. Boxed: 48 bytes less in every
    /// connection's future (see `a_captured_connection_task_holds_one_phase_at_a_time`), and
    /// none at all for outbound ones.
    pub(crate) inbound: Option<Box<Inbound>>,
}

/// What only captured inbound connections have (see [`Client::inbound`]).
pub(crate) struct Inbound {
    /// Who is calling, for authorization.
    pub(crate) caller: Caller,
    /// A transcoded gRPC port: its REST calls go to the transcoder ([`rest_answer`]).
    pub(crate) transcode: Option<Transcoding>,
}

impl Client {
    /// The drain of the connection's direction.
    fn stop(&self) -> &CancellationToken {
        self.shared.stop_token(self.dir)
    }

    fn caller(&self) -> Option<&Caller> {
        self.inbound.as_ref().map(|i| &i.caller)
    }

    fn transcoding(&self) -> Option<&Transcoding> {
        self.inbound.as_ref()?.transcode.as_ref()
    }
}

/// Serves `io` until the client closes, breaks the protocol, or the drain ends it.
///
/// A block rather than an `async fn`, which would keep `c` and `io` twice in the future every
/// connection's task holds (see `transparent::serve`).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in its future"
)]
pub(crate) fn serve<D>(
    c: Client,
    mut io: D,
    how: Serve,
) -> impl Future<Output = Option<Idle<D>>> + Send
where
    D: AsyncRead + AsyncWrite + Unpin + Send,
{
    async move {
        let mut inbuf = Inbuf::default();
        // One timer for the connection: the header timeout, then each exchange's deadline; and
        // one registration with the drain. A resumed connection is past its first request, and
        // its head is due by the deadline its wait began with (on the timer).
        let (timer, mut wait) = match how {
            Serve::Resumed(deadline) => (Timer::at(deadline), Wait::Resumed),
            _ => (
                Timer::after(c.shared.config.http.header_timeout),
                Wait::First,
            ),
        };
        // Not `how` itself: its deadline would stay in every connection's future.
        let parkable = matches!(how, Serve::Parkable | Serve::Resumed(_));
        tokio::pin!(timer);
        let stopped = c.stop().clone().cancelled_owned();
        tokio::pin!(stopped);
        // A head that could not be read, answered after the loop: awaiting the answer inside
        // the `match` would keep the matched `Got` (a whole head) alive across that await, and
        // so in every connection's future, idle ones included.
        let mut refused = None;
        loop {
            // The matched `Got` ends with this statement, before the exchange is awaited.
            let head = match read_head(
                &c,
                &mut io,
                &mut inbuf,
                wait,
                timer.as_mut(),
                stopped.as_mut(),
            )
            .await
            {
                Got::Head(head) => head,
                Got::Closed => break,
                Got::Park(deadline) => {
                    return Some(Idle {
                        client: c,
                        io,
                        deadline,
                    })
                }
                Got::TimedOut => {
                    c.shared
                        .telemetry
                        .metrics
                        .error(c.dir, ProxyError::DownstreamHeaderTimeout);
                    break;
                }
                Got::Refused(err, why) => {
                    // Counted, not recorded as a request: there was no request to speak of.
                    debug!(peer = %c.peer, reason = why, "request refused");
                    c.shared.telemetry.metrics.error(c.dir, err);
                    refused = Some(err);
                    break;
                }
            };
            wait = if parkable { Wait::Parkable } else { Wait::Next };
            // Boxed: an idle connection's task holds only the loop above, not an exchange's state.
            let keep = Box::pin(exchange(&c, &mut io, &mut inbuf, head, timer.as_mut())).await;
            if !keep || c.stop().is_cancelled() {
                break;
            }
            inbuf.release();
        }
        if let Some(err) = refused {
            // Boxed: the answer's state is only paid for by the connections refused.
            Box::pin(refuse(&mut io, err)).await;
        }
        let _ = io.shutdown().await;
        None
    }
}

/// How [`serve`] takes a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Serve {
    /// From its first request; never parked (a mesh TLS session: its state is not the socket's).
    Whole,
    /// From its first request; handed back as [`Idle`] once it has waited `--park-idle-after`
    /// for its next one (a plain socket, which [`super::park`] can hold).
    Parkable,
    /// Woken from the parked set: its next request began to arrive (or the peer closed, or the
    /// drain began). The head must be complete by this deadline, the one its wait began with;
    /// parkable again after that request.
    Resumed(Instant),
}

/// A kept-alive connection that said nothing for `--park-idle-after`, handed back by [`serve`]
/// (nothing of its own is held but the client's state and the socket): its next request must
/// be complete by `deadline`.
pub(crate) struct Idle<D> {
    pub(crate) client: Client,
    pub(crate) io: D,
    pub(crate) deadline: Instant,
}

/// Which head [`read_head`] waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The connection's first.
    First,
    /// A next one.
    Next,
    /// A next one, parked (it returns [`Got::Park`]) after `--park-idle-after` of silence.
    Parkable,
    /// A next one, on a connection woken from the parked set: due by the timer's deadline.
    Resumed,
}

/// Answers a request that could not be read (a malformed or oversized head) with `err`'s
/// status; the connection then closes.
async fn refuse<D>(io: &mut D, err: ProxyError)
where
    D: AsyncWrite + Unpin + Send,
{
    let unknown = Request {
        method: Method::GET,
        version: 1,
        keep_alive: false,
        framing: Framing::Empty,
        upgrade: false,
        expect_continue: false,
    };
    write_error(io, err, None, &unknown, true).await;
}

enum Got {
    Head(Head),
    Closed,
    TimedOut,
    /// Idle for `--park-idle-after` with nothing read: to be parked, its head due by then.
    Park(Instant),
    Refused(ProxyError, &'static str),
}

/// Reads the next request head: within the header timeout (an idle kept-alive connection too),
/// at most `max_header_bytes`. Once the drain begins, a connection that has not sent a byte of
/// a new request is closed, except that its first request gets `limit` to arrive.
///
/// A block rather than an `async fn`, like [`serve`]: an idle connection's future holds this
/// one, and an `async fn` would hold its arguments twice.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in its future"
)]
fn read_head<'a, D>(
    c: &'a Client,
    io: &'a mut D,
    inbuf: &'a mut Inbuf,
    wait: Wait,
    mut timeout: Pin<&'a mut Timer>,
    mut stopped: Pin<&'a mut WaitForCancellationFutureOwned>,
) -> impl Future<Output = Got> + 'a
where
    D: AsyncRead + Unpin,
{
    async move {
        let first = wait == Wait::First;
        // Read from the config where used, not held in a local: this future is in every idle
        // connection's.
        let now = Instant::now();
        let header_deadline = if wait == Wait::Resumed {
            timeout.deadline()
        } else {
            now + c.shared.config.http.header_timeout
        };
        // A kept-alive connection with nothing read is parked once it has waited this long: the
        // timer runs to then first (and `parking` says so).
        let park_at = match &c.shared.parker {
            Some(parker) if wait == Wait::Parkable && inbuf.is_empty() => {
                Some(now + parker.after()).filter(|at| *at < header_deadline)
            }
            _ => None,
        };
        let mut parking = park_at.is_some();
        timeout.as_mut().set(park_at.unwrap_or(header_deadline));
        // When the drain began, the connection's timer runs to whichever comes first of the header
        // deadline and the drain's (no second timer in every idle connection): a timer that
        // fires before the header deadline is the drain's (`drain_first`, decided when it is set:
        // the timer's deadline is kept to the millisecond).
        let mut draining = false;
        let mut drain_first = false;
        loop {
            if !inbuf.is_empty() {
                match wire::parse_request(inbuf.data()) {
                    Ok(Some(head)) => return Got::Head(head),
                    Ok(None) => {}
                    Err(Refusal::TooManyHeaders) => {
                        return Got::Refused(ProxyError::DownstreamHeadTooLarge, "too many headers")
                    }
                    Err(r) => return Got::Refused(ProxyError::DownstreamProtocol, r.reason()),
                }
                let max = c.shared.config.http.max_header_bytes;
                if inbuf.len() >= max || (inbuf.is_full() && !inbuf.grow(max)) {
                    return Got::Refused(ProxyError::DownstreamHeadTooLarge, "head too large");
                }
            }
            if !draining && c.stop().is_cancelled() {
                if inbuf.is_empty() && !first {
                    return Got::Closed;
                }
                // A request under way when the drain begins (or a connection's first) gets the
                // detection limit to arrive.
                let at = Instant::now() + c.shared.config.detect_timeout;
                draining = true;
                parking = false;
                drain_first = at < header_deadline;
                timeout.as_mut().set(at.min(header_deadline));
            }
            let read = std::future::poll_fn(|cx| inbuf.poll_fill(cx, io));
            tokio::select! {
                biased;
                r = read => match r {
                    Ok(0) | Err(_) => return Got::Closed,
                    // The next request is arriving. The timer may still run to the parking
                    // time (the exchange sets its own deadline; a head still incomplete then
                    // gets the rest of its time below): no second reset per request.
                    Ok(_) => {}
                },
                () = timeout.as_mut() => {
                    if parking {
                        if inbuf.is_empty() {
                            return Got::Park(header_deadline);
                        }
                        parking = false;
                        timeout.as_mut().set(header_deadline);
                        continue;
                    }
                    return if drain_first { Got::Closed } else { Got::TimedOut };
                }
                () = stopped.as_mut(), if !draining => {}
            }
        }
    }
}

/// `fut` until `deadline`, on the connection's timer (`Err` when it passes first). A future of
/// its own rather than an `async fn`, which would hold `fut` twice (as its argument and as what
/// it awaits).
fn within<F: Future>(mut timer: Pin<&mut Timer>, deadline: Instant, fut: F) -> Within<'_, F> {
    timer.as_mut().set(deadline);
    Within { timer, fut }
}

pin_project_lite::pin_project! {
    /// See [`within`].
    struct Within<'t, F> {
        timer: Pin<&'t mut Timer>,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        this.timer.as_mut().poll(cx).map(|()| Err(()))
    }
}

/// What a request is, for the exchange and its records.
struct Request {
    method: Method,
    version: u8,
    keep_alive: bool,
    framing: Framing,
    upgrade: bool,
    expect_continue: bool,
}

/// One request and its answer; true if the client connection can carry another.
///
/// Not an `async fn`: the head is read and consumed before the first poll, so the future (boxed
/// per request) holds only what the exchange needs afterwards: the chosen work and its record.
fn exchange<'a, D>(
    c: &'a Client,
    io: &'a mut D,
    inbuf: &'a mut Inbuf,
    head: Head,
    timer: Pin<&'a mut Timer>,
) -> impl Future<Output = bool> + Send + 'a
where
    D: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let label = method_label(&head.method);
    let log = c
        .observer
        .access_log
        .then(|| log_head(inbuf.data(), &head, c.peer));
    let (req, admitted) = admit(c, inbuf, head);
    // The work is chosen here and handed over whole: an `async` block that matched `admitted`
    // itself would keep it (and what it moved out of it) for its whole life.
    let work = match admitted {
        Ok(mut ready) => match ready.rest.take() {
            // Boxed: only a transcoded port's REST calls pay for the transcoding's state.
            Some(call) => Either::Left(Either::Left(Box::pin(rest_answer(
                c, io, inbuf, req, ready, call, started, timer,
            )))),
            None => Either::Left(Either::Right(forward(
                c, io, inbuf, req, ready, started, timer,
            ))),
        },
        Err(early) => Either::Right(early_answer(io, req, early, started)),
    };
    Recorded {
        work,
        observer: &c.observer,
        label,
        log,
    }
}

pin_project_lite::pin_project! {
    /// An exchange's work, then its record (count, duration, access log line) once it is done.
    /// A future of its own rather than an `async` block, which would hold `work` twice (as what
    /// it captured and as what it awaits).
    struct Recorded<'a, W> {
        #[pin]
        work: W,
        observer: &'a Observer,
        label: MethodLabel,
        log: Option<LogHead>,
    }
}

impl<W> Future for Recorded<'_, W>
where
    W: Future<Output = (Option<Answer>, Duration, bool)>,
{
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<bool> {
        let this = self.project();
        let Poll::Ready((answer, elapsed, keep)) = this.work.poll(cx) else {
            return Poll::Pending;
        };
        if let Some(answer) = answer {
            record(
                this.observer,
                *this.label,
                this.log.take(),
                &answer,
                elapsed,
            );
        }
        Poll::Ready(keep)
    }
}

/// Answers a request stopped before anything went upstream.
async fn early_answer<D>(
    io: &mut D,
    req: Request,
    early: Early,
    started: Instant,
) -> (Option<Answer>, Duration, bool)
where
    D: AsyncWrite + Unpin + Send,
{
    let (answer, keep) = early.write(io, &req).await;
    (Some(answer), started.elapsed(), keep)
}

/// The size of one request's exchange future, which every request allocates (for the test that
/// holds it).
#[cfg(test)]
pub(super) async fn exchange_size(c: &Client) -> usize {
    let (mut io, mut app) = tokio::io::duplex(256);
    app.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut inbuf = Inbuf::default();
    std::future::poll_fn(|cx| inbuf.poll_fill(cx, &mut io))
        .await
        .unwrap();
    let head = wire::parse_request(inbuf.data()).unwrap().unwrap();
    let timer = Timer::after(Duration::from_secs(1));
    tokio::pin!(timer);
    let exchange = exchange(c, &mut io, &mut inbuf, head, timer);
    size_of_val(&exchange)
}

/// The access log's view of a request.
fn log_head(buf: &[u8], head: &Head, peer: Peer) -> LogHead {
    let target = head.target.of(buf);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (authority, path) = if target.first() == Some(&b'/') || target == b"*" {
        let path = target.split(|b| *b == b'#').next().unwrap_or(target);
        let host = head.value(buf, Role::Host).map(text);
        (host, text(path))
    } else {
        match http::Uri::try_from(target) {
            Ok(uri) => (
                uri.authority()
                    .map(|a| a.as_str().to_owned())
                    .or_else(|| head.value(buf, Role::Host).map(text)),
                uri.path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            ),
            Err(_) => (None, text(target)),
        }
    };
    LogHead {
        method: head.method.clone(),
        authority: authority.unwrap_or_else(|| "-".to_owned()),
        path,
        peer,
    }
}

/// A local answer's record.
fn local(err: ProxyError) -> Answer {
    Answer {
        status: err.status(),
        local_error: Some(err),
        authz: None,
        grpc: None,
    }
}

/// A request stopped before anything went upstream: its local answer, and whether a request
/// body is left unread (then the connection closes after it).
enum Early {
    Error(ProxyError, bool),
    /// Authorization's refusal.
    Response(Box<http::Response<ProxyBody>>, bool),
}

impl Early {
    fn write<'a, D>(self, io: &'a mut D, req: &'a Request) -> Local<'a, (Answer, bool)>
    where
        D: AsyncWrite + Unpin + Send,
    {
        match self {
            Early::Error(err, unread_body) => write_response(
                io,
                local_response(err).map(http_body_util::Either::Right),
                req,
                unread_body,
            ),
            Early::Response(resp, unread_body) => write_response(io, *resp, req, unread_body),
        }
    }
}

/// A request admitted: its upstream head, destination and authorization.
struct Ready {
    built: Built,
    dest: Arc<crate::policy::Destination>,
    /// The `x-sidecar-authz-rule` line for the answer, if any.
    extra: Vec<u8>,
    authz: Option<Arc<str>>,
    /// A REST call of a transcoded port (else the request is forwarded as it is).
    rest: Option<Box<RestCall>>,
}

/// Takes from the head all that the exchange needs (then its bytes are consumed, whatever the
/// answer, a local one included, so the connection's next request starts at the front) and
/// decides admission: a strict port's plaintext refusal, authorization, then the request's own
/// validity.
fn admit(c: &Client, inbuf: &mut Inbuf, head: Head) -> (Request, Result<Ready, Early>) {
    let req = Request {
        method: head.method.clone(),
        version: head.version,
        keep_alive: head.keep_alive,
        framing: head.framing,
        upgrade: head.upgrade,
        expect_continue: head.expect_continue,
    };
    let admission =
        (c.strict || c.caller().is_some()).then(|| admission_request(inbuf.data(), &head));
    let hosts = head.count(Role::Host);
    let rest = c
        .transcoding()
        .and_then(|t| rest_call(c, t, inbuf.data(), &head))
        .map(Box::new);
    let built = build_head(inbuf.data(), &head, &c.route);
    let dest = c.shared.destination(&c.route, || {
        Some(request_authority(inbuf.data(), &head, &c.route))
    });
    inbuf.consume(head.len);
    drop(head);
    let ready =
        check(c, &req, admission.as_ref(), hosts, built, dest).map(|ready| Ready { rest, ..ready });
    (req, ready)
}

/// The admission decisions of [`admit`], once the head's bytes are gone.
fn check(
    c: &Client,
    req: &Request,
    admission: Option<&http::Request<()>>,
    hosts: usize,
    built: Result<Built, &'static str>,
    dest: Arc<crate::policy::Destination>,
) -> Result<Ready, Early> {
    // A local answer leaves the connection usable only if no request body is left unread.
    let unread = req.framing != Framing::Empty;
    let mut allowed = None;
    if let Some(probe_req) = admission {
        if c.strict && !authorize::is_probe(&c.shared, probe_req) {
            return Err(Early::Error(ProxyError::InboundMtlsRequired, unread));
        }
        if let Some(caller) = c.caller() {
            match authorize::request(&c.shared, caller, probe_req) {
                Ok(a) => allowed = a,
                Err(resp) => return Err(Early::Response(resp, unread)),
            }
        }
    }
    if hosts > 1 {
        // RFC 9112 3.2: a request with more than one Host is invalid; which one a server would
        // use is anybody's guess (a classic way around host-based routing).
        debug!(destination = %c.route.authority, "more than one Host header");
        return Err(Early::Error(ProxyError::ProxyBadRequest, unread));
    }
    if req.method == Method::CONNECT {
        // A CONNECT at the start of a connection was passed through opaquely by detection; one
        // in the middle of an HTTP connection cannot be (the bytes before it are gone).
        debug!(destination = %c.route.authority, "CONNECT inside an HTTP connection");
        return Err(Early::Error(ProxyError::ProxyUnsupported, true));
    }
    let built = built.map_err(|why| {
        debug!(destination = %c.route.authority, error = why, "request cannot be forwarded");
        Early::Error(ProxyError::ProxyBadRequest, unread)
    })?;
    Ok(Ready {
        built,
        dest,
        extra: authz_lines(allowed.as_ref()),
        authz: allowed.as_ref().map(|a| Arc::clone(a.rule())),
        rest: None,
    })
}

/// Sends an admitted request upstream (under the destination's breaker, timeout and retries)
/// and relays the answer: (its record, none if the client went away first; the time to the
/// response head; keep the connection).
///
/// A block rather than an `async fn`, which would keep `ready` twice in its future.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in its future"
)]
fn forward<'a, D>(
    c: &'a Client,
    io: &'a mut D,
    inbuf: &'a mut Inbuf,
    req: Request,
    ready: Ready,
    started: Instant,
    mut timer: Pin<&'a mut Timer>,
) -> impl Future<Output = (Option<Answer>, Duration, bool)> + Send + 'a
where
    D: AsyncRead + AsyncWrite + Unpin + Send,
{
    async move {
        let req = &req;
        let dest = &*ready.dest;
        let built = &ready.built;
        let bodiless = req.framing == Framing::Empty;
        let mut retrying = match Retrying::begin(dest, is_idempotent(&req.method), started) {
            Ok(r) => r,
            Err(f) => {
                let (answer, keep) =
                    write_failed(io, f, dest, &built.request_id(), req, !bodiless).await;
                return (Some(answer), started.elapsed(), keep);
            }
        };
        let deadline = started + dest.policy().request_timeout;
        if !send_continue(io, req).await {
            return (
                Some(local(ProxyError::DownstreamBody)),
                started.elapsed(),
                false,
            );
        }
        let max = dest.policy().retry.max_body_bytes;
        let replayable = retrying.may_replay();
        let plan = match plan(io, inbuf, req, replayable, max, timer.as_mut(), deadline).await {
            Ok(plan) => plan,
            Err(f) => {
                // The client's failure: the permit goes unreported.
                let (answer, _) = write_failed(io, f, dest, &built.request_id(), req, true).await;
                return (Some(answer), started.elapsed(), false);
            }
        };
        let (result, body_sent) = match plan {
            Plan::Replay(body, framing) => {
                let framing = framing.as_deref().unwrap_or_default();
                let attempts = async {
                    loop {
                        let attempt = retrying.number();
                        let result = within(
                            timer.as_mut(),
                            deadline,
                            send_replay(c, built, framing, attempt, &body, &req.method),
                        )
                        .await
                        .unwrap_or_else(|()| Err(Failed::timeout()));
                        let outcome = result.as_ref().map(|r| r.status()).map_err(|f| f.err);
                        if !retrying.again(outcome, deadline).await {
                            break result;
                        }
                    }
                };
                // A client that goes away gives the exchange up: its upstream connection closes
                // (as hyper's server drops the request's future).
                // The client first: gone, it gets no answer even if one has just arrived.
                tokio::select! {
                    biased;
                    () = client_gone(io, inbuf) => {
                        // Not recorded: nobody got an answer (as when hyper drops the request).
                        debug!(destination = %c.route.authority, "the client closed before the answer");
                        return (None, started.elapsed(), false);
                    }
                    result = attempts => (result, true),
                }
            }
            Plan::Stream(body, framing) => {
                let (mut sent, mut gone) = (false, false);
                // Boxed: a streamed body's state is paid for only by the requests that have one.
                let result = within(
                    timer.as_mut(),
                    deadline,
                    Box::pin(send_streaming(
                        c,
                        io,
                        inbuf,
                        built,
                        framing,
                        body,
                        &req.method,
                        &mut sent,
                        &mut gone,
                    )),
                )
                .await
                .unwrap_or_else(|()| Err(Failed::timeout()));
                if gone {
                    // Given up, as below: not an answer, not an outcome.
                    debug!(destination = %c.route.authority, "the client closed before the answer");
                    return (None, started.elapsed(), false);
                }
                retrying.last(result.as_ref().map(|r| r.status()).map_err(|f| f.err));
                (result, sent)
            }
        };
        let elapsed = started.elapsed();
        let reply = match result {
            Ok(reply) => reply,
            Err(f) => {
                let (answer, keep) =
                    write_failed(io, f, dest, &built.request_id(), req, !body_sent).await;
                return (Some(answer), elapsed, keep);
            }
        };
        let answer = Answer {
            status: reply.status(),
            local_error: None,
            authz: ready.authz.clone(),
            grpc: None,
        };
        let keep = relay_reply(c, io, inbuf, reply, req, body_sent, &ready.extra, dest).await;
        (Some(answer), elapsed, keep)
    }
}

/// How the request body goes (see [`Plan`]): kept whole (then it can be sent again) when it
/// is empty, sized and small with retries on, or chunked and ending within the same limit
/// (then it is checked whole before anything is sent, and goes as `content-length`); otherwise
/// relayed as it arrives. `replayable`: retries are on; `max`: their body limit. `Err`: the
/// body broke off or did not arrive by `deadline` (the client's failure; its answer leaves the
/// connection closing, the rest of the body unread).
async fn plan<D>(
    io: &mut D,
    inbuf: &mut Inbuf,
    req: &Request,
    replayable: bool,
    max: usize,
    timer: Pin<&mut Timer>,
    deadline: Instant,
) -> Result<Plan, Failed>
where
    D: AsyncRead + Unpin,
{
    let read = match req.framing {
        // An upgrade is one attempt, its body (rare) relayed before the tunnel.
        Framing::Length(n) if req.upgrade => Ok(Ok(Plan::Stream(
            Some(Body::new(Source::Length(n), Sink::Same)),
            &[][..],
        ))),
        Framing::Chunked if req.upgrade => Ok(Ok(Plan::Stream(
            Some(Body::new(
                Source::Chunked(Default::default()),
                Sink::Chunked,
            )),
            b"transfer-encoding: chunked\r\n",
        ))),
        _ if req.upgrade => Ok(Ok(Plan::Stream(None, &[][..]))),
        Framing::Empty | Framing::UntilClose => Ok(Ok(Plan::Replay(Vec::new(), None))),
        Framing::Length(n) if replayable && n <= max as u64 => {
            within(timer, deadline, read_body(io, inbuf, n))
                .await
                .map(|r| r.map(|body| Plan::Replay(body, None)))
        }
        Framing::Length(n) => Ok(Ok(Plan::Stream(
            Some(Body::new(Source::Length(n), Sink::Same)),
            &[][..],
        ))),
        Framing::Chunked => within(timer, deadline, read_chunked(io, inbuf, max)).await,
    };
    match read {
        Ok(Ok(plan)) => Ok(plan),
        Ok(Err(e)) => {
            debug!(error = %e, "reading the request body failed");
            Err(Failed::new(
                ProxyError::DownstreamBody,
                format!("reading the request body: {e}"),
            ))
        }
        Err(()) => Err(Failed::new(
            ProxyError::DownstreamTimeout,
            "the request body did not arrive within the request timeout",
        )),
    }
}

/// `100 Continue` to a client that waits for it before sending its body, as hyper's server
/// does when the body is first read; false if the client is gone.
async fn send_continue<D: AsyncWrite + Unpin>(io: &mut D, req: &Request) -> bool {
    let waits = req.expect_continue && req.framing != Framing::Empty;
    !waits || io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_ok()
}

/// The parts of a request admission looks at (method, path, content type), as an
/// `http::Request` for the code both engines share.
fn admission_request(buf: &[u8], head: &Head) -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.method_mut() = head.method.clone();
    // Any form of target: an absolute-form request is decided on its own path (the one the
    // app gets), never on a default.
    let target = head.target.of(buf);
    if let Ok(uri) = http::Uri::try_from(target) {
        *req.uri_mut() = uri;
    }
    if let Some(ct) = head
        .lines
        .iter()
        .find(|l| name_is(l.line.of(buf), b"content-type"))
    {
        if let Ok(v) = HeaderValue::from_bytes(ct.value.of(buf)) {
            req.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
    }
    req
}

/// True if a header line's name is `name` (ASCII case-insensitive).
fn name_is(line: &[u8], name: &[u8]) -> bool {
    line.len() > name.len()
        && line[name.len()] == b':'
        && line[..name.len()].eq_ignore_ascii_case(name)
}

/// The `x-sidecar-authz-rule` line of an allowed request, when rules are exposed.
fn authz_lines(allowed: Option<&authorize::Allowed>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(a) = allowed {
        if a.exposed() && HeaderValue::from_str(a.rule()).is_ok() {
            out.extend_from_slice(b"x-sidecar-authz-rule: ");
            out.extend_from_slice(a.rule().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// The upstream request head, built once: `base` (request line and every line but the
/// client's `x-sidecar-attempt`), then the attempt lines, then the final CRLF.
struct Built {
    base: relay::Scratch,
    /// The client's own `x-sidecar-attempt` lines (sent on the first attempt only; retries
    /// say which attempt they are instead).
    client_attempt: Vec<u8>,
    /// The request's `x-request-id` as the client sent it, or the one added (the local answer
    /// to a failed request carries it).
    client_id: Option<HeaderValue>,
    fresh_id: [u8; 36],
}

impl Built {
    fn request_id(&self) -> HeaderValue {
        self.client_id.clone().unwrap_or_else(|| {
            HeaderValue::from_bytes(&self.fresh_id).unwrap_or_else(|_| fresh_request_id())
        })
    }
}

/// Inlined: most names (and some values) are constants, copied as such rather than by call.
#[inline(always)]
fn push_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Builds the upstream head: the request line in origin-form (under the route's prefix), the
/// client's lines as they came minus the hop-by-hop ones, `Host` if there was none, the policy
/// headers (see `crate::policy::headers::apply`, which the hyper engine uses) and the framing.
fn build_head(buf: &[u8], head: &Head, route: &Route) -> Result<Built, &'static str> {
    let mut out = relay::scratch();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = head.target.of(buf);
    let mut authority: Option<String> = None;
    let origin: &[u8];
    let owned;
    if target.first() == Some(&b'/') || target == b"*" {
        origin = target.split(|b| *b == b'#').next().unwrap_or(target);
    } else {
        let uri = http::Uri::try_from(target).map_err(|_| "invalid request target")?;
        authority = uri.authority().map(|a| a.as_str().to_owned());
        owned = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        origin = owned.as_bytes();
    }
    if let Some(prefix) = &route.prefix {
        if origin != b"*" {
            out.extend_from_slice(prefix.as_bytes());
        }
    }
    out.extend_from_slice(origin);
    out.extend_from_slice(b" HTTP/1.1\r\n");

    let forwarded = route.forwarded_for.as_deref();
    let mut request_id = None;
    let first_id_empty = head
        .lines
        .iter()
        .find(|l| l.role == Role::RequestId)
        .map(|l| l.value.of(buf).is_empty());
    let traceparents = head.count(Role::Traceparent);
    let trace_ok = traceparents == 1
        && head
            .value(buf, Role::Traceparent)
            .is_some_and(is_valid_traceparent);
    let mut earlier_xff: Vec<&[u8]> = Vec::new();
    let mut has_proto = false;
    let mut host = None;
    let mut client_attempt = Vec::new();
    let mut copy = LineCopy::default();
    for line in &head.lines {
        let keep = match line.role {
            Role::Plain | Role::ContentLength => true,
            Role::HopByHop => false,
            Role::Upgrade => head.upgrade,
            Role::Host => {
                host.get_or_insert(line.value.of(buf));
                true
            }
            Role::Expect => true,
            Role::RequestId => {
                if first_id_empty == Some(false) {
                    request_id.get_or_insert(line.value.of(buf));
                    true
                } else {
                    false
                }
            }
            Role::Traceparent | Role::Tracestate => trace_ok,
            Role::ForwardedBy => false,
            Role::ForwardedFor => {
                if forwarded.is_some() {
                    let v = trim_ows(line.value.of(buf));
                    if !v.is_empty() {
                        earlier_xff.push(v);
                    }
                    false
                } else {
                    true
                }
            }
            Role::ForwardedProto => {
                has_proto = true;
                true
            }
            Role::ClientCert => forwarded.is_none(),
            Role::Attempt => {
                client_attempt.extend_from_slice(line.line.of(buf));
                client_attempt.extend_from_slice(b"\r\n");
                false
            }
        };
        if keep {
            copy.push(&mut out, buf, line);
        }
    }
    copy.flush(&mut out, buf);
    if host.is_none() {
        // HTTP/1.0 requests without Host: the authority names it.
        let a = authority.as_deref().unwrap_or(route.authority.as_str());
        push_line(&mut out, b"host", a.as_bytes());
    }
    out.extend_from_slice(b"x-forwarded-by: sidecar\r\n");
    let fresh_id = fresh_request_id_bytes();
    let client_id = match request_id {
        Some(id) => Some(HeaderValue::from_bytes(id).unwrap_or_else(|_| fresh_request_id())),
        None => {
            push_line(&mut out, b"x-request-id", &fresh_id);
            None
        }
    };
    if !trace_ok {
        push_line(&mut out, b"traceparent", &fresh_traceparent_bytes());
    }
    if let Some(client) = forwarded {
        if let Some(cert) = client.client_cert() {
            push_line(&mut out, b"x-forwarded-client-cert", cert.as_bytes());
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        for earlier in &earlier_xff {
            out.extend_from_slice(earlier);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client.addr().as_bytes());
        out.extend_from_slice(b"\r\n");
        push_line(&mut out, b"forwarded", client.element().as_bytes());
        if !has_proto {
            push_line(&mut out, b"x-forwarded-proto", b"http");
        }
    }
    if head.upgrade {
        push_line(&mut out, b"connection", b"upgrade");
    }
    Ok(Built {
        base: out,
        client_attempt,
        client_id,
        fresh_id,
    })
}

/// The request's authority, for the destination's name rules: `Host`, an absolute-form
/// target's, else the route's (as the hyper engine's `Host` insertion makes it).
fn request_authority<'a>(
    buf: &'a [u8],
    head: &Head,
    route: &'a Route,
) -> std::borrow::Cow<'a, str> {
    if let Some(host) = head
        .value(buf, Role::Host)
        .and_then(|h| std::str::from_utf8(h).ok())
    {
        return std::borrow::Cow::Borrowed(host);
    }
    let target = head.target.of(buf);
    if target.first() != Some(&b'/') && target != b"*" {
        if let Some(a) = http::Uri::try_from(target)
            .ok()
            .and_then(|u| u.authority().cloned())
        {
            return std::borrow::Cow::Owned(a.as_str().to_owned());
        }
    }
    std::borrow::Cow::Borrowed(route.authority.as_str())
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// Resolves when the client closes its side (or fails) while its request is in flight; what it
/// sends meanwhile (a pipelined request) is kept for later. Never resolves once the buffer is
/// full.
async fn client_gone<D: AsyncRead + Unpin>(io: &mut D, inbuf: &mut Inbuf) {
    std::future::poll_fn(|cx| loop {
        if inbuf.is_full() {
            return Poll::Pending;
        }
        match std::task::ready!(inbuf.poll_fill(cx, io)) {
            Ok(0) | Err(_) => return Poll::Ready(()),
            Ok(_) => {}
        }
    })
    .await;
}

/// How a request body goes upstream.
enum Plan {
    /// Read whole: sent with each attempt, after this framing line (none: the client's own).
    Replay(Vec<u8>, Option<Vec<u8>>),
    /// Relayed as it arrives (if there is one), after this framing line.
    Stream(Option<Body>, &'static [u8]),
}

/// Reads a chunked request body whole if it ends within `max` bytes of data: then it is sent
/// with `content-length`. A longer one is relayed, re-chunked, from where the reading stopped.
async fn read_chunked<D>(io: &mut D, inbuf: &mut Inbuf, max: usize) -> io::Result<Plan>
where
    D: AsyncRead + Unpin,
{
    let mut decoder = chunked::Decoder::default();
    let mut decoded = Vec::new();
    loop {
        let data = inbuf.data();
        let used = decoder
            .decode(data, |e| {
                if let chunked::Event::Data(s, e) = e {
                    decoded.extend_from_slice(&data[s..e]);
                }
            })
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))?;
        inbuf.consume(used);
        if decoder.is_done() {
            let line = format!("content-length: {}\r\n", decoded.len()).into_bytes();
            return Ok(Plan::Replay(decoded, Some(line)));
        }
        if decoded.len() > max {
            let body = Body::resumed(decoder, &decoded);
            return Ok(Plan::Stream(Some(body), b"transfer-encoding: chunked\r\n"));
        }
        if std::future::poll_fn(|cx| inbuf.poll_fill(cx, io)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Reads a sized request body whole (to send it again if need be).
async fn read_body<D>(io: &mut D, inbuf: &mut Inbuf, n: u64) -> io::Result<Vec<u8>>
where
    D: AsyncRead + Unpin,
{
    let n = n as usize;
    let mut body = Vec::with_capacity(n);
    loop {
        let take = (n - body.len()).min(inbuf.len());
        body.extend_from_slice(&inbuf.data()[..take]);
        inbuf.consume(take);
        if body.len() == n {
            return Ok(body);
        }
        let got = std::future::poll_fn(|cx| inbuf.poll_fill(cx, io)).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// An upstream's answer: its head, the connection it came on, and what was read past the head.
struct Reply {
    lease: Lease<Conn>,
    ubuf: Inbuf,
    head: Head,
}

impl Reply {
    fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.head.status).unwrap_or(StatusCode::BAD_GATEWAY)
    }
}

/// One attempt with the whole request in memory: head and body in one write, then the answer's
/// head. A connection found closed before anything was written is replaced (up to
/// [`RESEND_UNSENT`] times).
async fn send_replay(
    c: &Client,
    built: &Built,
    framing: &[u8],
    attempt: u32,
    body: &[u8],
    method: &Method,
) -> Result<Reply, Failed> {
    let number;
    let attempt_line: &[u8] = if attempt > 1 {
        number = format!("x-sidecar-attempt: {attempt}\r\n");
        number.as_bytes()
    } else {
        &built.client_attempt
    };
    let mut tries = 0;
    loop {
        tries += 1;
        let mut lease = c.pool.checkout(&c.host).await?;
        let mut parts = [
            IoSlice::new(&built.base),
            IoSlice::new(framing),
            IoSlice::new(attempt_line),
            IoSlice::new(b"\r\n"),
            IoSlice::new(body),
        ];
        match write_vectored_all(lease.conn(), &mut parts).await {
            Ok(()) => {}
            Err((e, 0)) if tries < RESEND_UNSENT => {
                debug!(destination = %c.route.authority, error = %e, "connection closed before the request was written; sending on another");
                continue;
            }
            Err((e, _)) => return Err(Failed::from_error(&e)),
        }
        let mut ubuf = Inbuf::default();
        let head =
            std::future::poll_fn(|cx| poll_reply_head(cx, &mut ubuf, lease.conn(), method)).await?;
        return Ok(Reply { lease, ubuf, head });
    }
}

/// One attempt whose request body (if any) is relayed from the client as it arrives, while the
/// answer's head is awaited (an upstream may answer before the body is complete). `sent` says
/// whether the whole body went out; `gone`, that the client closed while waiting.
#[allow(clippy::too_many_arguments)]
async fn send_streaming<D>(
    c: &Client,
    io: &mut D,
    inbuf: &mut Inbuf,
    built: &Built,
    framing: &[u8],
    mut body: Option<Body>,
    method: &Method,
    sent: &mut bool,
    gone: &mut bool,
) -> Result<Reply, Failed>
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let mut lease = c.pool.checkout(&c.host).await?;
    let mut parts = [
        IoSlice::new(&built.base),
        IoSlice::new(framing),
        IoSlice::new(&built.client_attempt),
        IoSlice::new(b"\r\n"),
    ];
    write_vectored_all(lease.conn(), &mut parts)
        .await
        .map_err(|(e, _)| Failed::from_error(&e))?;
    *sent = body.is_none();
    let mut upstream_gone = false;
    let mut ubuf = Inbuf::default();
    let up = lease.conn();
    let head = std::future::poll_fn(|cx| {
        if let Some(b) = body.as_mut().filter(|_| !*sent && !upstream_gone) {
            match b.poll_relay(cx, inbuf, io, up) {
                Poll::Ready(Ok(())) => *sent = true,
                // The upstream stopped reading: it may have answered already.
                Poll::Ready(Err(Fault::Write(e))) => {
                    debug!(error = %e, "the upstream stopped reading the request body");
                    upstream_gone = true;
                }
                Poll::Ready(Err(Fault::Read(e))) => {
                    return Poll::Ready(Err(Failed::new(
                        ProxyError::DownstreamBody,
                        format!("reading the request body: {e}"),
                    )))
                }
                Poll::Ready(Err(Fault::Framing(why))) => {
                    return Poll::Ready(Err(Failed::new(ProxyError::DownstreamBody, why)))
                }
                Poll::Pending => {}
            }
        }
        while *sent && !inbuf.is_full() {
            // The client going away gives the exchange up (see `client_gone`).
            match inbuf.poll_fill(cx, io) {
                Poll::Ready(Ok(0) | Err(_)) => {
                    *gone = true;
                    return Poll::Ready(Err(Failed::new(
                        ProxyError::DownstreamBody,
                        "the client closed before the answer",
                    )));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => break,
            }
        }
        poll_reply_head(cx, &mut ubuf, up, method)
    })
    .await?;
    drop(body);
    Ok(Reply { lease, ubuf, head })
}

/// Reads an answer's head (interim 1xx answers other than 101 are read and dropped, as
/// hyper's client does).
fn poll_reply_head(
    cx: &mut std::task::Context<'_>,
    ubuf: &mut Inbuf,
    up: &mut Conn,
    method: &Method,
) -> Poll<Result<Head, Failed>> {
    loop {
        if !ubuf.is_empty() {
            match wire::parse_response(ubuf.data(), method) {
                Ok(Some(head)) if head.status < 200 && head.status != 101 => {
                    ubuf.consume(head.len);
                    continue;
                }
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
                Err(r) => {
                    return Poll::Ready(Err(Failed::new(ProxyError::UpstreamProtocol, r.reason())))
                }
            }
            if ubuf.is_full() && !ubuf.grow(MAX_RESPONSE_HEAD) {
                return Poll::Ready(Err(Failed::new(
                    ProxyError::UpstreamProtocol,
                    "response head too large",
                )));
            }
        }
        match std::task::ready!(ubuf.poll_fill(cx, up)) {
            Ok(0) => {
                return Poll::Ready(Err(Failed::new(
                    ProxyError::UpstreamClosed,
                    "connection closed before a complete response head",
                )))
            }
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(Failed::from_error(&e))),
        }
    }
}

/// Writes all of `parts`; on failure, the error and how many bytes had gone out.
async fn write_vectored_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut parts: &mut [IoSlice<'_>],
) -> Result<(), (io::Error, usize)> {
    let mut written = 0;
    while !parts.is_empty() {
        if parts[0].is_empty() {
            parts = &mut parts[1..];
            continue;
        }
        match w.write_vectored(parts).await {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), written)),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut parts, n);
            }
            Err(e) => return Err((e, written)),
        }
    }
    w.flush().await.map_err(|e| (e, written))
}

/// Relays the answer: its head (status line, the upstream's lines minus the hop-by-hop ones,
/// the framing the client gets) and its body; a `101` becomes a tunnel. True if the client
/// connection can carry another request.
#[allow(clippy::too_many_arguments)]
async fn relay_reply<D>(
    c: &Client,
    io: &mut D,
    inbuf: &mut Inbuf,
    reply: Reply,
    req: &Request,
    body_sent: bool,
    extra: &[u8],
    dest: &crate::policy::Destination,
) -> bool
where
    D: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Reply {
        mut lease,
        mut ubuf,
        head,
    } = reply;
    let client_11 = req.version == 1;
    if head.status == 101 {
        if !req.upgrade {
            // Not asked for: hyper's client refuses it too.
            let f = Failed::new(
                ProxyError::UpstreamProtocol,
                "101 without an upgrade request",
            );
            let id = fresh_request_id();
            let _ = write_failed(io, f, dest, &id, req, true).await;
            return false;
        }
        let mut out = Vec::with_capacity(256);
        status_line(&mut out, ubuf.data(), &head);
        let mut copy = LineCopy::default();
        for line in &head.lines {
            if !matches!(line.role, Role::HopByHop) {
                copy.push(&mut out, ubuf.data(), line);
            }
        }
        copy.flush(&mut out, ubuf.data());
        out.extend_from_slice(extra);
        out.extend_from_slice(b"connection: upgrade\r\n\r\n");
        ubuf.consume(head.len);
        if io.write_all(&out).await.is_err() {
            return false;
        }
        // Boxed: only upgraded connections pay for the tunnel's state.
        Box::pin(tunnel(
            io,
            inbuf,
            lease.conn(),
            &mut ubuf,
            dest.policy().idle_timeout,
        ))
        .await;
        return false;
    }
    // The client's framing: chunked where the upstream's was, or was close-delimited (an
    // HTTP/1.1 client keeps its connection); an HTTP/1.0 client gets the data close-delimited.
    let (source, sink) = match head.framing {
        Framing::Empty => (None, Sink::Same),
        Framing::Length(n) => (Some(Source::Length(n)), Sink::Same),
        Framing::Chunked if client_11 => (Some(Source::Chunked(Default::default())), Sink::Chunked),
        Framing::Chunked => (Some(Source::Chunked(Default::default())), Sink::Plain),
        Framing::UntilClose if client_11 => (Some(Source::UntilClose), Sink::Chunked),
        Framing::UntilClose => (Some(Source::UntilClose), Sink::Same),
    };
    let close_delimited =
        sink == Sink::Plain || (sink == Sink::Same && matches!(source, Some(Source::UntilClose)));
    let keep_client = req.keep_alive && body_sent && !close_delimited && !c.stop().is_cancelled();
    let mut out = relay::scratch();
    status_line(&mut out, ubuf.data(), &head);
    let mut copy = LineCopy::default();
    for line in &head.lines {
        if !matches!(line.role, Role::HopByHop | Role::Upgrade) {
            copy.push(&mut out, ubuf.data(), line);
        }
    }
    copy.flush(&mut out, ubuf.data());
    out.extend_from_slice(extra);
    if sink == Sink::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_client {
        out.extend_from_slice(b"connection: close\r\n");
    } else if !client_11 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let upstream_keep = head.keep_alive;
    ubuf.consume(head.len);
    let relayed = match source {
        None => io.write_all(&out).await.is_ok(),
        Some(source) => {
            // A whole sized body already here: head and body in one write.
            if let Source::Length(n) = source {
                if ubuf.len() as u64 >= n {
                    let n = n as usize;
                    let mut parts = [IoSlice::new(&out), IoSlice::new(&ubuf.data()[..n])];
                    let ok = write_vectored_all(io, &mut parts).await.is_ok();
                    ubuf.consume(n);
                    finish(&mut lease, &ubuf, upstream_keep && body_sent && ok);
                    return ok && keep_client;
                }
            }
            if io.write_all(&out).await.is_err() {
                return false;
            }
            let mut body = Body::new(source, sink);
            let up = lease.conn();
            match std::future::poll_fn(|cx| body.poll_relay(cx, &mut ubuf, up, io)).await {
                Ok(()) => true,
                Err(fault) => {
                    debug!(destination = %c.route.authority, ?fault, "response body relay ended early");
                    false
                }
            }
        }
    };
    finish(&mut lease, &ubuf, upstream_keep && body_sent && relayed);
    relayed && keep_client
}

/// Hands the upstream connection back to the pool if its exchange ended exactly: both messages
/// framed and wholly transferred, nothing more sent by the upstream.
fn finish(lease: &mut Lease<Conn>, ubuf: &Inbuf, clean: bool) {
    if clean && ubuf.is_empty() {
        lease.finish();
    }
}

/// `HTTP/1.1 <status> <reason>`: the upstream's reason phrase, else the standard one.
fn status_line(out: &mut Vec<u8>, buf: &[u8], head: &Head) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(head.status).as_slice());
    out.push(b' ');
    let reason = head.reason.of(buf);
    if reason.is_empty() {
        let canonical = StatusCode::from_u16(head.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        out.extend_from_slice(canonical.as_bytes());
    } else {
        out.extend_from_slice(reason);
    }
    out.extend_from_slice(b"\r\n");
}

fn itoa3(n: u16) -> [u8; 3] {
    [
        b'0' + (n / 100 % 10) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// After a `101`: bytes both ways until both sides are done, or nothing moved for `idle`.
async fn tunnel<D>(io: &mut D, inbuf: &mut Inbuf, up: &mut Conn, ubuf: &mut Inbuf, idle: Duration)
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let mut to_up = Body::new(Source::Tunnel, Sink::Same);
    let mut to_client = Body::new(Source::Tunnel, Sink::Same);
    let (mut up_done, mut down_done) = (false, false);
    let mut moved = 0u64;
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let result = std::future::poll_fn(|cx| {
        if !up_done {
            match to_up.poll_relay(cx, inbuf, io, up) {
                Poll::Ready(Ok(())) => up_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if !down_done {
            match to_client.poll_relay(cx, ubuf, up, io) {
                Poll::Ready(Ok(())) => down_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if up_done && down_done {
            return Poll::Ready(Ok(()));
        }
        let now_moved = to_up.moved + to_client.moved;
        if now_moved != moved {
            moved = now_moved;
            sleep.as_mut().reset(Instant::now() + idle);
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Fault::Read(io::ErrorKind::TimedOut.into())));
        }
        Poll::Pending
    })
    .await;
    match result {
        Ok(()) => debug!(
            bytes_up = to_up.moved,
            bytes_down = to_client.moved,
            "upgraded connection closed"
        ),
        Err(e) => debug!(error = ?e, "upgraded connection ended"),
    }
}

/// A local answer being written, boxed: only the requests that get one pay for its state (an
/// exchange's future would otherwise hold the largest of them on every request).
type Local<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Writes a local answer for `err`; true if the connection can go on.
fn write_error<'a, D>(
    io: &'a mut D,
    err: ProxyError,
    request_id: Option<&HeaderValue>,
    req: &'a Request,
    unread_body: bool,
) -> Local<'a, bool>
where
    D: AsyncWrite + Unpin + Send,
{
    let mut resp = local_response(err);
    if let Some(id) = request_id {
        resp.headers_mut()
            .insert(crate::policy::headers::X_REQUEST_ID.clone(), id.clone());
    }
    let resp = resp.map(http_body_util::Either::Right);
    Box::pin(async move { respond(io, resp, req, unread_body).await.1 })
}

/// Writes the local answer to a failed request (see `crate::policy::exchange::answer`).
fn write_failed<'a, D>(
    io: &'a mut D,
    f: Failed,
    dest: &crate::policy::Destination,
    request_id: &HeaderValue,
    req: &'a Request,
    unread_body: bool,
) -> Local<'a, (Answer, bool)>
where
    D: AsyncWrite + Unpin + Send,
{
    let resp = failed_answer(f, dest, request_id);
    write_response(
        io,
        resp.map(http_body_util::Either::Right),
        req,
        unread_body,
    )
}

/// Writes an answer the proxy made (its body is in memory); its record, and true if the
/// connection can go on (the client keeps it alive and no request body is left unread).
fn write_response<'a, D>(
    io: &'a mut D,
    resp: http::Response<ProxyBody>,
    req: &'a Request,
    unread_body: bool,
) -> Local<'a, (Answer, bool)>
where
    D: AsyncWrite + Unpin + Send,
{
    Box::pin(respond(io, resp, req, unread_body))
}

/// [`write_response`], unboxed.
async fn respond<D>(
    io: &mut D,
    resp: http::Response<ProxyBody>,
    req: &Request,
    unread_body: bool,
) -> (Answer, bool)
where
    D: AsyncWrite + Unpin,
{
    respond_with(io, resp, req, unread_body, &[]).await
}

/// Writes an answer the proxy made, with `extra` header lines: a body in memory with its
/// length, or a stream (a transcoded server stream's JSON lines) chunked as it arrives to an
/// HTTP/1.1 client, to the close to an HTTP/1.0 one. Its record, and true if the connection
/// can go on.
async fn respond_with<D>(
    io: &mut D,
    resp: http::Response<ProxyBody>,
    req: &Request,
    unread_body: bool,
    extra: &[u8],
) -> (Answer, bool)
where
    D: AsyncWrite + Unpin,
{
    use http_body_util::Either;
    let (parts, body) = resp.into_parts();
    let answer = Answer {
        status: parts.status,
        local_error: parts.extensions.get::<ProxyError>().copied(),
        authz: parts
            .extensions
            .get::<crate::metrics::access::AuthzRule>()
            .map(|r| Arc::clone(&r.0)),
        grpc: parts
            .extensions
            .get::<crate::metrics::access::Transcoded>()
            .map(|t| Arc::clone(&t.0)),
    };
    let (body, stream) = match body {
        Either::Right(full) => (
            full.collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default(),
            None,
        ),
        Either::Left(Either::Right(stream)) => (Bytes::new(), Some(stream)),
        Either::Left(Either::Left(_)) => (Bytes::new(), None),
    };
    let stream = stream.filter(|_| req.method != Method::HEAD);
    let chunked = stream.is_some() && req.version == 1;
    let keep = req.keep_alive && !unread_body && (stream.is_none() || chunked);
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(parts.status.as_u16()).as_slice());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        push_line(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(extra);
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if stream.is_none() {
        push_line(
            &mut out,
            b"content-length",
            body.len().to_string().as_bytes(),
        );
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if req.version == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if req.method != Method::HEAD {
        out.extend_from_slice(&body);
    }
    let mut ok = io.write_all(&out).await.is_ok();
    if let Some(mut stream) = stream {
        while ok {
            match stream.frame().await {
                None => {
                    if chunked {
                        ok = io.write_all(b"0\r\n\r\n").await.is_ok();
                    }
                    break;
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    ok = if chunked {
                        let size = format!("{:x}\r\n", data.len());
                        let mut parts = [
                            IoSlice::new(size.as_bytes()),
                            IoSlice::new(&data),
                            IoSlice::new(b"\r\n"),
                        ];
                        write_vectored_all(io, &mut parts).await.is_ok()
                    } else {
                        io.write_all(&data).await.is_ok()
                    };
                }
                // Broken off: the client sees the body end without its last chunk.
                Some(Err(e)) => {
                    debug!(error = %e, "a streamed answer broke off");
                    ok = false;
                }
            }
        }
    }
    let ok = ok && io.flush().await.is_ok();
    (answer, keep && ok)
}

// ---- A transcoded gRPC port's REST calls ----------------------------------------------------
//
// A transcoded gRPC port's REST calls on the native engine: the head is turned into the parts
// the transcoder reads, the body is read whole (up to the port's `max_body_bytes`, within the
// request timeout), and the transcoder makes the call over the port's shared HTTP/2
// connection ([`crate::proxy::transcode`], as for hyper's server); its answer is written here,
// a server stream chunked as its messages arrive.
//
// What is not a REST call of the port (native gRPC's content type, or a path no route matches
// on a port that passes those) is forwarded as any request: decided from the head alone, by
// the same function the transcoder uses ([`transcode::passes`]).

/// A transcoded port, as a connection's engine knows it.
pub(crate) struct Transcoding {
    /// The port's shared HTTP/2 connection to the app.
    pub(crate) upstream: Arc<H2Upstream>,
    /// The port (its transcoder is looked up per request: a reload may change or remove it).
    pub(crate) port: u16,
}

/// A REST call: its head as the transcoder reads it, the transcoder that decided it, and the
/// port's connection to the app.
struct RestCall {
    parts: http::request::Parts,
    transcoder: Arc<Transcoder>,
    upstream: Arc<H2Upstream>,
}

/// The REST call `head` is, if it is one (`None`: forward it as it is).
fn rest_call(c: &Client, t: &Transcoding, buf: &[u8], head: &Head) -> Option<RestCall> {
    if head.upgrade {
        return None;
    }
    let policies = c.shared.policies.load();
    let transcoder = policies.config().transcoder(t.port)?;
    // A target the URI parser refuses is the forwarding path's 400.
    let uri = http::Uri::try_from(head.target.of(buf)).ok()?;
    let content_type = head
        .lines
        .iter()
        .find(|l| name_is(l.line.of(buf), b"content-type"))
        .map(|l| l.value.of(buf));
    if transcode::passes(transcoder, &head.method, uri.path(), content_type) {
        return None;
    }
    let mut req = http::Request::new(());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = uri;
    if head.version == 0 {
        *req.version_mut() = http::Version::HTTP_10;
    }
    let headers = req.headers_mut();
    for line in &head.lines {
        // httparse has checked every name and value; both parse.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(line.name(buf)),
            HeaderValue::from_bytes(line.value.of(buf)),
        ) {
            headers.append(name, value);
        }
    }
    Some(RestCall {
        parts: req.into_parts().0,
        transcoder: Arc::clone(transcoder),
        upstream: Arc::clone(&t.upstream),
    })
}

/// Answers a REST call (see this section's opening comment): (its record; the time to the
/// answer's head; keep the connection).
#[allow(clippy::too_many_arguments)]
async fn rest_answer<D>(
    c: &Client,
    io: &mut D,
    inbuf: &mut Inbuf,
    req: Request,
    ready: Ready,
    call: Box<RestCall>,
    started: Instant,
    timer: Pin<&mut Timer>,
) -> (Option<Answer>, Duration, bool)
where
    D: AsyncRead + AsyncWrite + Unpin + Send,
{
    let req = &req;
    let RestCall {
        parts,
        transcoder,
        upstream,
    } = *call;
    let max = transcoder.settings().max_body_bytes;
    let deadline = started + ready.dest.policy().request_timeout;
    let declared_too_large = matches!(req.framing, Framing::Length(n) if n > max as u64);
    // A body declared too large is refused without asking for it.
    if !declared_too_large && !send_continue(io, req).await {
        return (
            Some(local(ProxyError::DownstreamBody)),
            started.elapsed(),
            false,
        );
    }
    let body = match plan(io, inbuf, req, true, max, timer, deadline).await {
        Ok(Plan::Replay(body, _)) => body,
        Ok(Plan::Stream(..)) => {
            // Over the limit: refused before anything reaches the app; the rest of the body is
            // not read, so the connection closes after the answer.
            let resp =
                transcode::too_large(&c.shared, &transcoder, &parts.method, parts.uri.path());
            let (answer, _) = write_response(io, resp, req, true).await;
            return (Some(answer), started.elapsed(), false);
        }
        Err(f) => {
            let id = ready.built.request_id();
            let (answer, _) = write_failed(io, f, &ready.dest, &id, req, true).await;
            return (Some(answer), started.elapsed(), false);
        }
    };
    let request = http::Request::from_parts(parts, http_body_util::Full::new(Bytes::from(body)));
    let resp = match transcode::handle(&c.shared, &transcoder, &c.route, &upstream, request).await {
        Handled::Answer(resp) => resp,
        // `passes` decided otherwise with the same transcoder and head: not reached.
        Handled::Pass(_) => {
            local_response(ProxyError::ProxyUnsupported).map(http_body_util::Either::Right)
        }
    };
    let elapsed = started.elapsed();
    let (mut answer, keep) = respond_with(io, resp, req, false, &ready.extra).await;
    answer.authz = answer.authz.or(ready.authz);
    (Some(answer), elapsed, keep)
}
