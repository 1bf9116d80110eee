//! Plain-std clients and their JSON-able results: what the probe app (`sidecar-probe`) runs inside
//! the pod, and what a test thread runs when it plays a process outside the pod cgroup. Blocking
//! std sockets on purpose: an app that knows nothing about the mesh.
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bounds every connect so that a redirect into nowhere fails the test instead of hanging it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds every read and write for the same reason.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the app saw of one HTTP exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HttpReply {
    pub status: u16,
    /// Response headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// getpeername() of the app's socket right after connect.
    pub peer: String,
    /// getsockname() of the app's socket right after connect.
    pub local: String,
}

impl HttpReply {
    /// First value of a response header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the app saw of one echo exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EchoReply {
    /// True when every byte sent came back, in order.
    pub ok: bool,
    pub sent: usize,
    pub received: usize,
    /// Offset of the first byte that came back different, if any.
    pub first_difference: Option<usize>,
    /// Why reading stopped early, if it did.
    pub error: Option<String>,
    pub peer: String,
    pub local: String,
}

/// What the app saw of a server-speaks-first exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GreetingReply {
    /// The first line the server sent, without the line ending.
    pub line: String,
    pub peer: String,
    pub local: String,
}

fn connect(addr: SocketAddr) -> Result<(TcpStream, String, String), String> {
    // std picks the socket family from the address: [::ffff:a.b.c.d] gives an AF_INET6 socket
    // connecting to an IPv4-mapped address, which is a case the interception must handle.
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername after connecting to {addr}: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("getsockname after connecting to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("set socket timeouts: {e}"))?;
    Ok((stream, peer.to_string(), local.to_string()))
}

/// GET `path` from `addr` over HTTP/1.1 with `Connection: close`; `host` defaults to `addr`.
pub fn http_get(addr: SocketAddr, path: &str, host: Option<&str>) -> Result<HttpReply, String> {
    http_request(
        addr,
        &HttpRequest {
            path,
            host,
            ..HttpRequest::default()
        },
    )
}

/// An HTTP/1.1 request as the probe sends it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Defaults to the address connected to.
    pub host: Option<&'a str>,
    /// Extra headers, `Name: value` each.
    pub headers: &'a [&'a str],
    /// Sent with a `Content-Length` when not empty (or when the method usually has a body).
    pub body: &'a str,
}

impl Default for HttpRequest<'_> {
    fn default() -> Self {
        HttpRequest {
            method: "GET",
            path: "/",
            host: None,
            headers: &[],
            body: "",
        }
    }
}

/// Sends one request over HTTP/1.1 with `Connection: close` and reads the response.
pub fn http_request(addr: SocketAddr, req: &HttpRequest<'_>) -> Result<HttpReply, String> {
    let (mut stream, peer, local) = connect(addr)?;
    let host = req.host.map_or_else(|| addr.to_string(), str::to_string);
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sidecar-probe\r\nAccept: */*\r\nConnection: close\r\n",
        req.method, req.path
    );
    for h in req.headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    if !req.body.is_empty() || matches!(req.method, "POST" | "PUT" | "PATCH") {
        request.push_str(&format!("Content-Length: {}\r\n", req.body.len()));
    }
    request.push_str("\r\n");
    request.push_str(req.body);
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send request to {addr}: {e}"))?;
    let (status, headers, body) =
        read_response(&stream).map_err(|e| format!("read response from {addr}: {e}"))?;
    Ok(HttpReply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        peer,
        local,
    })
}

type Response = (u16, Vec<(String, String)>, Vec<u8>);

/// Reads one HTTP/1.x response, framed by Content-Length, chunked encoding, or end of stream; does
/// not rely on the server closing when the length is known.
fn read_response(stream: &TcpStream) -> io::Result<Response> {
    let mut reader = BufReader::new(stream);
    let status_line = read_line(&mut reader)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(&mut reader)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let size_line = read_line(&mut reader)?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| invalid(format!("bad chunk size line {size_line:?}")))?;
            if size == 0 {
                // Trailers (if any) up to the empty line.
                while !read_line(&mut reader)?.is_empty() {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            read_line(&mut reader)?;
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| invalid(format!("bad content-length {len:?}")))?;
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if status != 204 && status != 304 {
        reader.read_to_end(&mut body)?;
    }
    Ok((status, headers, body))
}

fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-response",
        ));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// `n` deterministic pseudo-random bytes that are not HTTP (the first byte is 0x00), not UTF-8
/// (lone continuation bytes), and full of CR LF sequences that a line-based proxy would mangle.
pub fn opaque_payload(n: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(n);
    const MARKERS: [&[u8]; 4] = [b"\x00\xff\xfe\x80", b"\r\n", b"\r\n\r\n", b"\xc3\x28\n\r"];
    let mut i = 0usize;
    while out.len() < n {
        if i % 97 == 0 {
            out.extend_from_slice(MARKERS[(i / 97) % MARKERS.len()]);
        } else {
            // xorshift64*: cheap and reproducible, no dependency.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.push((state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8);
        }
        i += 1;
    }
    out.truncate(n);
    out
}

/// Sends `n` opaque bytes to an echo server and reads `n` bytes back (writing on another thread so
/// that neither side's buffers can deadlock the exchange).
pub fn tcp_echo(addr: SocketAddr, n: usize) -> Result<EchoReply, String> {
    let (stream, peer, local) = connect(addr)?;
    let payload = opaque_payload(n);
    let mut writer = stream
        .try_clone()
        .map_err(|e| format!("clone socket: {e}"))?;
    let to_send = payload.clone();
    let sender = std::thread::spawn(move || writer.write_all(&to_send));

    let mut received = Vec::with_capacity(n);
    let mut error = None;
    let mut buf = vec![0u8; 16 * 1024];
    let mut reader = &stream;
    while received.len() < n {
        match reader.read(&mut buf) {
            Ok(0) => {
                error = Some("connection closed before all bytes came back".to_string());
                break;
            }
            Ok(k) => received.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(format!("read: {e}"));
                break;
            }
        }
    }
    // Unblocks the writer if reading stopped early.
    let _ = stream.shutdown(Shutdown::Both);
    match sender.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            error.get_or_insert(format!("write: {e}"));
        }
        Err(_) => {
            error.get_or_insert("writer thread panicked".to_string());
        }
    }
    let first_difference = payload
        .iter()
        .zip(&received)
        .position(|(a, b)| a != b)
        .or_else(|| (received.len() > n).then_some(n));
    Ok(EchoReply {
        ok: received == payload,
        sent: n,
        received: received.len(),
        first_difference,
        error,
        peer,
        local,
    })
}

/// What the app saw of a WebSocket exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebSocketReply {
    /// The status of the handshake response (101 when upgraded).
    pub status: u16,
    /// `Sec-WebSocket-Accept` matched the key sent.
    pub accept_ok: bool,
    /// The text of the frame that came back.
    pub echoed: String,
    pub peer: String,
}

/// Opens a WebSocket (the RFC 6455 handshake over HTTP/1.1), sends one masked text frame and
/// reads one frame back.
pub fn websocket(addr: SocketAddr, message: &str) -> Result<WebSocketReply, String> {
    let (mut stream, peer, _) = connect(addr)?;
    let key = crate::wire::base64(b"sidecar-probe-16");
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send handshake to {addr}: {e}"))?;
    let mut reader = BufReader::new(&stream);
    let status_line = read_line(&mut reader).map_err(|e| format!("read handshake: {e}"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut accept = None;
    loop {
        let line = read_line(&mut reader).map_err(|e| format!("read handshake: {e}"))?;
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("sec-websocket-accept") {
                accept = Some(value.trim().to_string());
            }
        }
    }
    if status != 101 {
        return Ok(WebSocketReply {
            status,
            accept_ok: false,
            echoed: String::new(),
            peer,
        });
    }
    let accept_ok = accept.as_deref() == Some(crate::wire::websocket_accept(&key).as_str());
    let frame = crate::wire::ws_frame(1, message.as_bytes(), Some([0x37, 0xfa, 0x21, 0x3d]));
    // The reader may have buffered nothing past the handshake: the server sends no frame first.
    let mut writer = &stream;
    writer
        .write_all(&frame)
        .map_err(|e| format!("send frame: {e}"))?;
    let (opcode, payload) =
        crate::wire::read_ws_frame(&mut reader).map_err(|e| format!("read frame: {e}"))?;
    if opcode != 1 {
        return Err(format!("expected a text frame back, got opcode {opcode}"));
    }
    Ok(WebSocketReply {
        status,
        accept_ok,
        echoed: String::from_utf8_lossy(&payload).into_owned(),
        peer,
    })
}

/// What the app saw of a unary gRPC call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrpcReply {
    /// The HTTP/2 `:status`.
    pub status: u16,
    /// The `grpc-status` trailer (None if it did not arrive as a trailer).
    pub grpc_status: Option<String>,
    pub grpc_message: Option<String>,
    /// The message of the single response frame.
    pub message: String,
    /// Response headers and trailers, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub trailers: Vec<(String, String)>,
}

/// One unary gRPC call over h2c with prior knowledge (what gRPC clients do in a mesh): POST
/// `/sidecar.test.Echo/Unary`, `te: trailers`, one framed message; the status comes in trailers.
pub fn grpc_unary(addr: SocketAddr, message: &str) -> Result<GrpcReply, String> {
    use http_body_util::BodyExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async move {
        let call = async {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .map_err(|e| format!("h2 handshake with {addr}: {e}"))?;
            tokio::spawn(conn);
            let body = http_body_util::Full::new(bytes::Bytes::from(crate::wire::grpc_frame(
                message.as_bytes(),
            )));
            let req = hyper::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}/sidecar.test.Echo/Unary"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(body)
                .map_err(|e| format!("build request: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("gRPC call to {addr}: {e}"))?;
            let (head, body) = resp.into_parts();
            let collected = body
                .collect()
                .await
                .map_err(|e| format!("read gRPC response body: {e}"))?;
            let pairs = |h: &hyper::HeaderMap| -> Vec<(String, String)> {
                h.iter()
                    .map(|(n, v)| {
                        (
                            n.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect()
            };
            let trailers = collected.trailers().map(pairs).unwrap_or_default();
            let bytes = collected.to_bytes();
            let find = |name: &str| {
                trailers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
            };
            Ok(GrpcReply {
                status: head.status.as_u16(),
                grpc_status: find("grpc-status"),
                grpc_message: find("grpc-message"),
                message: crate::wire::grpc_unframe(&bytes)
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_default(),
                headers: pairs(&head.headers),
                trailers: trailers.clone(),
            })
        };
        match tokio::time::timeout(IO_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "gRPC call to {addr} took longer than {IO_TIMEOUT:?}"
            )),
        }
    })
}

/// What the app saw of a connection it left idle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdleReply {
    /// The first message came back (the relay worked before going idle).
    pub echoed: bool,
    /// How the connection ended: `eof`, `reset`, or `open` (still open at the timeout).
    pub ended: String,
    /// Milliseconds from the echo to the end (or to the timeout).
    pub after_ms: u64,
}

/// Sends "ping" to an echo server, reads it back, then sends nothing and waits up to `timeout`
/// for the connection to be closed by someone else.
pub fn tcp_idle(addr: SocketAddr, timeout: Duration) -> Result<IdleReply, String> {
    let (mut stream, _, _) = connect(addr)?;
    stream
        .write_all(b"ping")
        .map_err(|e| format!("send: {e}"))?;
    let mut got = [0u8; 4];
    let echoed = stream.read_exact(&mut got).is_ok() && &got == b"ping";
    let start = std::time::Instant::now();
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("set read timeout: {e}"))?;
    let mut byte = [0u8; 1];
    let ended = match stream.read(&mut byte) {
        Ok(0) => "eof",
        Ok(_) => return Err("unexpected bytes on an idle connection".to_string()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            "open"
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset",
        Err(e) => return Err(format!("read: {e}")),
    };
    Ok(IdleReply {
        echoed,
        ended: ended.to_string(),
        after_ms: start.elapsed().as_millis() as u64,
    })
}

/// Connects, sends nothing, and waits up to `timeout` for the server's first line.
pub fn greeting(addr: SocketAddr, timeout: Duration) -> Result<GreetingReply, String> {
    let (stream, peer, local) = connect(addr)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("set read timeout: {e}"))?;
    let mut reader = BufReader::new(&stream);
    let mut line = Vec::new();
    match reader.read_until(b'\n', &mut line) {
        Ok(0) => Err(format!(
            "connection to {addr} closed before the server sent a greeting"
        )),
        Ok(_) => {
            while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                line.pop();
            }
            Ok(GreetingReply {
                line: String::from_utf8_lossy(&line).into_owned(),
                peer,
                local,
            })
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!(
                "no greeting from {addr} within {} ms (got {:?} so far): the server speaks first, \
                 so something in between held its bytes back",
                timeout.as_millis(),
                String::from_utf8_lossy(&line)
            ))
        }
        Err(e) => Err(format!("read greeting from {addr}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_payload_is_deterministic_binary_and_not_http() {
        let a = opaque_payload(65536);
        assert_eq!(a, opaque_payload(65536));
        assert_eq!(a.len(), 65536);
        assert_eq!(a[0], 0);
        assert!(std::str::from_utf8(&a).is_err());
        assert!(a.windows(2).filter(|w| w == b"\r\n").count() > 100);
    }
}
