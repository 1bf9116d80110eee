//! Mock servers run by the test process itself in one of the fixture's network namespaces: the
//! upstreams of outbound tests live in the "remote" namespace, the app's servers of inbound tests
//! in the pod's. A thread joins the namespace and binds there (the listening socket stays in that
//! namespace), then serves on a current-thread tokio runtime until the `Upstream` is dropped. They
//! record what arrived so that tests assert on what the destination really saw.
use std::convert::Infallible;
use std::net::SocketAddr;
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
}

#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<SeenRequest>>,
    connections: Mutex<Vec<SocketAddr>>,
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
                        std::net::TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))
                    })
                    .and_then(|l| {
                        l.set_nonblocking(true)
                            .map(|()| l)
                            .map_err(|e| format!("set_nonblocking: {e}"))
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
                        Kind::Http => serve_http(socket, peer, name, name_value, seen).await,
                        Kind::Echo => echo(socket, None).await,
                        Kind::Greeting => echo(socket, Some(GREETING)).await,
                    };
                    if let Err(e) = result {
                        eprintln!("upstream connection from {peer}: {e}");
                    }
                });
            }
        }
    }
}

async fn serve_http(
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    name: String,
    name_value: HeaderValue,
    seen: Arc<Seen>,
) -> Result<(), String> {
    let service = service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        let name = name.clone();
        let name_value = name_value.clone();
        async move {
            let headers = req
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            lock(&seen.requests).push(SeenRequest {
                method: req.method().to_string(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_string(), |p| p.to_string()),
                headers,
                peer,
            });
            // Drain the request body so the connection can be reused.
            let _ = req.into_body().collect().await;
            let mut response =
                Response::new(Full::new(Bytes::from(format!("hello from {name}\n"))));
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
