//! Mock servers run by the test process itself in one of the fixture's network namespaces: the
//! upstreams of outbound tests live in the "remote" namespace, the app's servers of inbound tests
//! in the pod's. A thread joins the namespace and binds there (the listening socket stays in that
//! namespace), then serves on a current-thread tokio runtime until the `Upstream` is dropped. They
//! record what arrived so that tests assert on what the destination really saw.
//!
//! Besides well-behaved servers there are faulty ones, for the proxy's policies: one that refuses
//! (closed port), resets (RST after reading the request), hangs (reads, never answers),
//! blackholes (SYNs dropped: connects time out), answers a fixed 5xx, or fails until told to
//! recover; and protocol ones: gRPC over h2c, WebSocket.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::netns;

/// The line a server-speaks-first upstream sends as soon as it accepts (SMTP/FTP style).
pub const GREETING: &str = "220 greeting";

/// One HTTP request as the upstream received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-cased, in arrival order, repeated names kept.
    pub headers: Vec<(String, String)>,
    /// The address the connection came from (the proxy's socket, or the app's if not intercepted).
    pub peer: SocketAddr,
}

impl SeenRequest {
    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    /// Every value of a header, in order (a proxy loop would show up as repeats).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Http,
    Echo,
    Greeting,
    /// HTTP answering this status to everything.
    Status(u16),
    /// HTTP answering 503 until [`Upstream::recover`], then 200.
    Recovering,
    /// Reads the request head, then closes with RST (SO_LINGER 0).
    Resetting,
    /// Reads the request head, never answers, keeps the connection open.
    Hanging,
    /// Listens with a full accept queue and never accepts: further SYNs are dropped.
    Blackhole,
    /// gRPC over h2c: echoes a unary call's message, status in trailers.
    Grpc,
    /// WebSocket: completes the handshake, echoes frames.
    WebSocket,
}

#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<SeenRequest>>,
    connections: Mutex<Vec<SocketAddr>>,
    /// For `Recovering`: answer 200 from now on.
    healthy: AtomicBool,
}

/// Poisoning only means another test thread panicked; the records are still worth reading.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running upstream server; stops (and its thread ends) on drop.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    seen: Arc<Seen>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// HTTP/1 server that records each request and answers 200 with body `hello from <name>\n`
    /// and header `x-upstream: <name>`.
    pub fn http(netns: &str, addr: &str, name: &str) -> Upstream {
        Self::start(netns, addr, name, Kind::Http)
    }

    /// TCP echo server.
    pub fn echo(netns: &str, addr: &str, name: &str) -> Upstream {
        Self::start(netns, addr, name, Kind::Echo)
    }

    /// Server that speaks first: sends "220 greeting\r\n" on accept, then echoes.
    pub fn greeting(netns: &str, addr: &str, name: &str) -> Upstream {
        Self::start(netns, addr, name, Kind::Greeting)
    }

    /// HTTP/1 server that records each request and answers `status` (e.g. 500) to all of them.
    pub fn status(netns: &str, addr: &str, name: &str, status: u16) -> Upstream {
        Self::start(netns, addr, name, Kind::Status(status))
    }

    /// HTTP/1 server that answers 503 until [`Upstream::recover`] is called, then 200.
    pub fn recovering(netns: &str, addr: &str, name: &str) -> Upstream {
        Self::start(netns, addr, name, Kind::Recovering)
    }

    /// Accepts, reads (and records) the request head, then resets the connection.
    pub fn resetting(netns: &str, addr: &str, name: &str) -> Upstream {
        Self::start(netns, addr, name, Kind::Resetting)
    }

    /// Accepts, reads (and records) the request head, and never answers.
    pub fn hanging(netns: &str, addr: &str, name: &str) -> Upstream {
        Self::start(netns, addr, name, Kind::Hanging)
    }

    /// A listener whose accept queue is full (it filled it itself) and that never accepts: the
    /// kernel drops new SYNs, so connecting times out (a host that stopped answering).
    pub fn blackhole(netns: &str, addr: &str, name: &str) -> Upstream {
        Self::start(netns, addr, name, Kind::Blackhole)
    }

    /// A closed port: nothing listens at `addr`, so connecting is refused (RST). No thread.
    pub fn refusing(addr: &str, name: &str) -> Upstream {
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("upstream address {addr:?}: {e}"));
        Upstream {
            addr,
            name: name.to_string(),
            seen: Arc::default(),
            stop: None,
            thread: None,
        }
    }

    /// gRPC over h2c (prior knowledge): answers every unary call with its own message, header
    /// `x-upstream: <name>`, and trailers `grpc-status: 0`, `grpc-message: ok`.
    pub fn grpc(netns: &str, addr: &str, name: &str) -> Upstream {
        Self::start(netns, addr, name, Kind::Grpc)
    }

    /// WebSocket server: answers the handshake with 101 and the right `Sec-WebSocket-Accept`,
    /// then echoes every text or binary frame (unmasked, as servers send them).
    pub fn websocket(netns: &str, addr: &str, name: &str) -> Upstream {
        Self::start(netns, addr, name, Kind::WebSocket)
    }

    /// A `recovering` upstream answers 200 from now on.
    pub fn recover(&self) {
        self.seen.healthy.store(true, Ordering::SeqCst);
    }

    fn start(netns_name: &str, addr: &str, name: &str, kind: Kind) -> Upstream {
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("upstream address {addr:?}: {e}"));
        let name_value = HeaderValue::from_str(name)
            .unwrap_or_else(|e| panic!("upstream name {name:?} must be a valid header value: {e}"));
        let ns = netns::open_netns(netns_name)
            .unwrap_or_else(|e| panic!("open netns {netns_name}: {e}"));
        let seen = Arc::new(Seen::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let seen_in_thread = seen.clone();
        let body_name = name.to_string();
        let ns_name = netns_name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("upstream-{name}"))
            .spawn(move || {
                let bound = netns::enter(&ns)
                    .map_err(|e| format!("setns into {ns_name}: {e}"))
                    .and_then(|()| {
                        // A blackhole's accept queue holds one connection (backlog 0); the
                        // others use the usual backlog.
                        let backlog = if matches!(kind, Kind::Blackhole) {
                            0
                        } else {
                            1024
                        };
                        listen(addr, backlog)
                    });
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("tokio runtime: {e}"));
                let (listener, runtime) = match (bound, runtime) {
                    (Ok(l), Ok(r)) => (l, r),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = bound_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = bound_tx.send(Err(format!("register listener: {e}")));
                            return;
                        }
                    };
                    if matches!(kind, Kind::Blackhole) {
                        // Fill the one-slot accept queue ourselves; never accept.
                        let filler = tokio::net::TcpStream::connect(addr).await;
                        if let Err(e) = &filler {
                            let _ = bound_tx.send(Err(format!("fill the accept queue: {e}")));
                            return;
                        }
                        let _ = bound_tx.send(Ok(()));
                        let _ = stop_rx.await;
                        drop((filler, listener));
                        return;
                    }
                    let _ = bound_tx.send(Ok(()));
                    serve(
                        listener,
                        kind,
                        body_name,
                        name_value,
                        seen_in_thread,
                        stop_rx,
                    )
                    .await;
                });
            })
            .unwrap_or_else(|e| panic!("spawn upstream thread: {e}"));
        match bound_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("upstream {name} on {addr} in {netns_name}: {e}"),
            Err(_) => panic!("upstream {name} thread ended before binding"),
        }
        Upstream {
            addr,
            name: name.to_string(),
            seen,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Every HTTP request received so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.seen.requests).clone()
    }

    /// The single HTTP request received; panics (listing what did arrive) unless exactly one did.
    pub fn only_request(&self) -> SeenRequest {
        let requests = self.requests();
        match requests.as_slice() {
            [one] => one.clone(),
            other => panic!(
                "upstream {} ({}) expected exactly one request, got {}: {:#?}",
                self.name,
                self.addr,
                other.len(),
                other
            ),
        }
    }

    /// Peer address of every connection accepted so far.
    pub fn connections(&self) -> Vec<SocketAddr> {
        lock(&self.seen.connections).clone()
    }

    /// The single connection accepted; panics unless exactly one was.
    pub fn only_connection(&self) -> SocketAddr {
        let conns = self.connections();
        match conns.as_slice() {
            [one] => *one,
            other => panic!(
                "upstream {} ({}) expected exactly one connection, got {other:?}",
                self.name, self.addr
            ),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    kind: Kind,
    name: String,
    name_value: HeaderValue,
    seen: Arc<Seen>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        eprintln!("upstream {name}: accept: {e}");
                        continue;
                    }
                };
                lock(&seen.connections).push(peer);
                let seen = seen.clone();
                let name = name.clone();
                let name_value = name_value.clone();
                tokio::spawn(async move {
                    let result = match kind {
                        Kind::Http | Kind::Status(_) | Kind::Recovering => {
                            serve_http(socket, peer, name, name_value, seen, kind).await
                        }
                        Kind::Echo => echo(socket, None).await,
                        Kind::Greeting => echo(socket, Some(GREETING)).await,
                        Kind::Resetting => reset_after_request(socket, peer, seen).await,
                        Kind::Hanging => hang(socket, peer, seen).await,
                        Kind::Grpc => serve_grpc(socket, peer, name_value, seen).await,
                        Kind::WebSocket => serve_websocket(socket, peer, seen).await,
                        // Never accepts (see `Upstream::start`).
                        Kind::Blackhole => Ok(()),
                    };
                    if let Err(e) = result {
                        eprintln!("upstream connection from {peer}: {e}");
                    }
                });
            }
        }
    }
}

/// Binds `addr` with `backlog` (SO_REUSEADDR, so a port freed by the previous test is usable).
fn listen(addr: SocketAddr, backlog: i32) -> Result<std::net::TcpListener, String> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket syscalls on a descriptor we own; `sockaddr` is a valid, sized address.
    unsafe {
        use std::os::fd::FromRawFd;
        let fd = libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let listener = std::net::TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let (storage, len) = sockaddr(addr);
        if libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) != 0 {
            return Err(format!("bind {addr}: {}", std::io::Error::last_os_error()));
        }
        if libc::listen(fd, backlog) != 0 {
            return Err(format!(
                "listen {addr}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(listener)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage; the casts below write within its size.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn header_pairs(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn seen_request<B>(req: &Request<B>, peer: SocketAddr) -> SeenRequest {
    SeenRequest {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string()),
        headers: header_pairs(req.headers()),
        peer,
    }
}

async fn serve_http(
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    name: String,
    name_value: HeaderValue,
    seen: Arc<Seen>,
    kind: Kind,
) -> Result<(), String> {
    let service = service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        let name = name.clone();
        let name_value = name_value.clone();
        async move {
            lock(&seen.requests).push(seen_request(&req, peer));
            // Drain the request body so the connection can be reused.
            let _ = req.into_body().collect().await;
            let status = match kind {
                Kind::Status(code) => code,
                Kind::Recovering if !seen.healthy.load(Ordering::SeqCst) => 503,
                _ => 200,
            };
            let mut response =
                Response::new(Full::new(Bytes::from(format!("{status} from {name}\n"))));
            if status == 200 {
                *response.body_mut() = Full::new(Bytes::from(format!("hello from {name}\n")));
            }
            *response.status_mut() =
                hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
            response
                .headers_mut()
                .insert(HeaderName::from_static("x-upstream"), name_value);
            Ok::<_, Infallible>(response)
        }
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(socket), service)
        .await
        .map_err(|e| format!("http: {e}"))
}

/// Reads an HTTP/1 request head (up to the blank line) and parses what the tests look at.
async fn read_head(
    socket: &mut tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<SeenRequest, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read request: {e}"))?;
        if n == 0 {
            return Err("connection closed before a complete request head".to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            return Err("request head too large".to_string());
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(SeenRequest {
        method,
        path,
        headers,
        peer,
    })
}

async fn reset_after_request(
    mut socket: tokio::net::TcpStream,
    peer: SocketAddr,
    seen: Arc<Seen>,
) -> Result<(), String> {
    let request = read_head(&mut socket, peer).await?;
    lock(&seen.requests).push(request);
    socket
        .set_zero_linger()
        .map_err(|e| format!("SO_LINGER 0: {e}"))?;
    drop(socket);
    Ok(())
}

async fn hang(
    mut socket: tokio::net::TcpStream,
    peer: SocketAddr,
    seen: Arc<Seen>,
) -> Result<(), String> {
    let request = read_head(&mut socket, peer).await?;
    lock(&seen.requests).push(request);
    // Never answer; read (and drop) whatever comes until the peer gives up.
    let mut sink = [0u8; 1024];
    while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
    Ok(())
}

async fn serve_grpc(
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    name_value: HeaderValue,
    seen: Arc<Seen>,
) -> Result<(), String> {
    let service = service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        let name_value = name_value.clone();
        async move {
            lock(&seen.requests).push(seen_request(&req, peer));
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let message = crate::wire::grpc_unframe(&body)
                .unwrap_or_default()
                .to_vec();
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("grpc-message", HeaderValue::from_static("ok"));
            let body = Full::new(Bytes::from(crate::wire::grpc_frame(&message)))
                .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) });
            let mut response = Response::new(body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            response
                .headers_mut()
                .insert(HeaderName::from_static("x-upstream"), name_value);
            Ok::<_, Infallible>(response)
        }
    });
    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(TokioIo::new(socket), service)
        .await
        .map_err(|e| format!("h2: {e}"))
}

async fn serve_websocket(
    mut socket: tokio::net::TcpStream,
    peer: SocketAddr,
    seen: Arc<Seen>,
) -> Result<(), String> {
    let request = read_head(&mut socket, peer).await?;
    let key = request
        .header("sec-websocket-key")
        .map(str::to_string)
        .unwrap_or_default();
    let upgrade = request
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    lock(&seen.requests).push(request);
    if !upgrade {
        let _ = socket
            .write_all(
                b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return Ok(());
    }
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        crate::wire::websocket_accept(&key)
    );
    socket
        .write_all(answer.as_bytes())
        .await
        .map_err(|e| format!("send handshake: {e}"))?;
    loop {
        let mut head = [0u8; 2];
        if socket.read_exact(&mut head).await.is_err() {
            return Ok(());
        }
        let mut len = usize::from(head[1] & 0x7f);
        if len == 126 {
            let mut ext = [0u8; 2];
            socket
                .read_exact(&mut ext)
                .await
                .map_err(|e| e.to_string())?;
            len = usize::from(u16::from_be_bytes(ext));
        } else if len == 127 {
            return Err("64-bit frame lengths are not used by these tests".to_string());
        }
        let mut mask = [0u8; 4];
        if head[1] & 0x80 != 0 {
            socket
                .read_exact(&mut mask)
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut payload = vec![0u8; len];
        socket
            .read_exact(&mut payload)
            .await
            .map_err(|e| e.to_string())?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        match head[0] & 0x0f {
            1 | 2 => {
                let frame = crate::wire::ws_frame(head[0] & 0x0f, &payload, None);
                socket.write_all(&frame).await.map_err(|e| e.to_string())?;
            }
            // Close: answer with close and stop.
            8 => {
                let _ = socket
                    .write_all(&crate::wire::ws_frame(8, &payload, None))
                    .await;
                return Ok(());
            }
            _ => {}
        }
    }
}

async fn echo(mut socket: tokio::net::TcpStream, greeting: Option<&str>) -> Result<(), String> {
    if let Some(line) = greeting {
        socket
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .map_err(|e| format!("send greeting: {e}"))?;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = socket
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        socket
            .write_all(&buf[..n])
            .await
            .map_err(|e| format!("write: {e}"))?;
    }
}
