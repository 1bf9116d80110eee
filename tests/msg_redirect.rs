//! `sidecar init --msg-redirect`: the in-pod leg of outbound connections goes socket to socket
//! (sk_msg) instead of through loopback TCP, with the same answers, and a receiver that does not
//! read bounds what a sender can park in it, as TCP would.
use sidecar_tests::Pod;

#[test]
fn app_http_goes_through_the_proxy_socket_to_socket() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    let out = pod.init(&["--msg-redirect"]);
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(summary.contains("attached 11 programs"), "{summary}");
    pod.start_proxy(&[]);
    let before = pod.counters();

    // curl's sockets are non-blocking: they join.
    for _ in 0..3 {
        let out = pod.app_command(
            "curl",
            &["-sS", "--max-time", "10", "http://10.200.0.1:8080/"],
        );
        assert!(out.status.success(), "curl: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from alpha\n");
    }
    let moved = pod.counters().since(&before);
    // Both ends of each of the three connections, and at least a request and an answer each.
    assert_eq!(moved.get("msg_socket_added"), 6, "{:?}", moved.nonzero());
    assert!(moved.get("msg_redirected") >= 6, "{:?}", moved.nonzero());
    assert_eq!(moved.get("msg_peer_missing"), 0, "{:?}", moved.nonzero());
    assert_eq!(moved.get("msg_back_to_tcp"), 0, "{:?}", moved.nonzero());

    // A blocking client stays on TCP, and is answered the same: one blocking from the start,
    // never added; one that connects with a timeout (non-blocking until connected, as Rust's
    // connect_timeout and Java's Socket.connect(addr, timeout) do), added, then out again
    // after its first send, before anything was redirected.
    let before = pod.counters();
    let out = pod.app_command(
        "python3",
        &[
            "-c",
            "import socket\ns = socket.create_connection(('10.200.0.1', 8080))\n\
             s.sendall(b'GET / HTTP/1.1\\r\\nHost: alpha\\r\\nConnection: close\\r\\n\\r\\n')\n\
             d = b''\nwhile True:\n    c = s.recv(65536)\n    if not c: break\n    d += c\n\
             print(d.decode().split('\\r\\n')[0])\n",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "HTTP/1.1 200 OK"
    );
    let moved = pod.counters().since(&before);
    assert_eq!(moved.get("msg_skip_blocking"), 1, "{:?}", moved.nonzero());
    assert_eq!(moved.get("msg_socket_added"), 0, "{:?}", moved.nonzero());

    let before = pod.counters();
    let reply = pod.app_http("10.200.0.1:8080");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hello from alpha\n");
    let moved = pod.counters().since(&before);
    assert_eq!(moved.get("msg_skip_blocking"), 1, "{:?}", moved.nonzero());
    assert_eq!(moved.get("msg_socket_added"), 2, "{:?}", moved.nonzero());
    assert_eq!(moved.get("msg_left"), 1, "{:?}", moved.nonzero());
    assert_eq!(moved.get("msg_redirected"), 0, "{:?}", moved.nonzero());
    assert_eq!(alpha.requests().len(), 5);

    let status = pod.status_table();
    assert!(status.contains("sk_msg (sockhash)"), "{status}");
    assert!(status.contains("msg_redirect"), "{status}");
}

/// Writes the stream pattern (byte i is i % 256) without blocking until `cap` bytes or until the
/// socket has had no room for 3 s (the receiving side is full), and returns how much it took; and
/// reads a stream to its end, checking the pattern (order and loss).
const STREAM: &str = r#"
import select, socket, sys
CAP = 64 << 20
def connect(addr):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(addr)
    if not select.select([], [s], [], 10)[1]:
        sys.exit("connect timed out")
    return s
def fill(s):
    s.setblocking(False)
    chunk, sent = bytes(range(256)) * 256, 0
    p = select.poll()
    p.register(s, select.POLLOUT)
    while sent < CAP:
        try:
            sent += s.send(chunk[sent % 256:])
        except BlockingIOError:
            if not p.poll(3000):
                break
    return sent
def drain(s):
    s.setblocking(False)
    p = select.poll()
    p.register(s, select.POLLIN)
    pattern, got = bytes(range(256)) * 4097, 0
    while True:
        if not p.poll(20000):
            sys.exit("nothing to read for 20 s")
        try:
            d = s.recv(1 << 20)
        except BlockingIOError:
            continue
        if not d:
            return got
        if d != pattern[got % 256:got % 256 + len(d)]:
            print("out of order at", got, flush=True)
            sys.exit(1)
        got += len(d)
def line():
    return sys.stdin.readline().strip()
def accepted(first):
    l = socket.create_server(('10.200.0.1', 7000))
    print('listening', flush=True)
    c, _ = l.accept()
    got = b''
    while len(got) < first:
        got += c.recv(first - len(got))
    return c
"#;

const CAP: u64 = 64 << 20;

/// A python process with piped stdin and stdout, talked to a line at a time.
struct Talker {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Talker {
    fn new(mut child: std::process::Child) -> Talker {
        let to = child.stdin.take().unwrap();
        let from = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        Talker { child, to, from }
    }
    fn say(&mut self, text: &str) {
        use std::io::Write;
        writeln!(self.to, "{text}").unwrap();
        self.to.flush().unwrap();
    }
    fn hear(&mut self) -> String {
        match self.from.next() {
            Some(Ok(line)) => line,
            other => panic!("the script ended ({other:?}): {:?}", self.finish()),
        }
    }
    fn number(&mut self) -> u64 {
        let line = self.hear();
        line.parse()
            .unwrap_or_else(|_| panic!("not a number: {line:?}"))
    }
    fn finish(&mut self) -> Option<std::process::ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Talker {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A pod initialised with `--msg-redirect`, its proxy running.
fn redirected_pod() -> Pod {
    let mut pod = Pod::new();
    pod.init(&["--msg-redirect"]);
    pod.start_proxy(&[]);
    pod
}

/// `STREAM` then `body` as a server in the remote namespace, once it has said it listens
/// (`accepted` says so).
fn remote_server(pod: &Pod, body: &str) -> Talker {
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", pod.remote_netns(), "python3", "-c"])
        .arg(format!("{STREAM}\n{body}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Talker::new(child);
    assert_eq!(server.hear(), "listening");
    server
}

/// `STREAM` then `body` as the app.
fn app_python(pod: &Pod, body: &str) -> Talker {
    Talker::new(pod.app_spawn("python3", &["-c", &format!("{STREAM}\n{body}")]))
}

/// The app writes into a connection whose far end never reads. Without a bound, every send
/// would be moved into the proxy's socket whatever it holds already (gigabytes, up to the node's
/// TCP memory limit); with it, the connection goes back to TCP once the proxy has a receive
/// buffer's worth unread, and TCP's flow control stops the app. Nothing is lost or reordered.
#[test]
fn an_app_that_outruns_the_proxy_is_held_back_as_over_tcp() {
    let mut pod = redirected_pod();
    let mut server = remote_server(&pod, "c = accepted(0)\nline()\nprint(drain(c), flush=True)");
    let before = pod.counters();
    let mut app = app_python(
        &pod,
        "s = connect(('10.200.0.1', 7000))\nprint(fill(s), flush=True)\n\
         line()\ns.shutdown(socket.SHUT_WR)\nprint('closed', drain(s), flush=True)",
    );
    let sent = app.number();
    let moved = pod.counters().since(&before);
    assert!(
        sent < CAP,
        "the app wrote {sent} bytes into a peer that never read: unbounded"
    );
    assert!(
        moved.get("msg_back_to_tcp") >= 1 && moved.get("msg_redirected") >= 1,
        "the connection started socket to socket, then went back to TCP: {:?}",
        moved.nonzero()
    );
    server.say("drain");
    app.say("close");
    assert_eq!(server.number(), sent, "the server got every byte, in order");
    assert_eq!(app.hear(), "closed 0");
}

/// The other way round: the far end writes, the app never reads. The proxy's sends into the app
/// go back to TCP once the app has a receive buffer's worth unread, so the app's slowness
/// reaches the server as it would without the redirect.
#[test]
fn a_slow_app_holds_back_the_server_as_over_tcp() {
    let mut pod = redirected_pod();
    let mut server = remote_server(
        &pod,
        "c = accepted(16)\nprint(fill(c), flush=True)\nline()\nc.shutdown(socket.SHUT_WR)\ndrain(c)",
    );
    let before = pod.counters();
    let mut app = app_python(
        &pod,
        "s = connect(('10.200.0.1', 7000))\ns.send(bytes(16))\nline()\nprint(drain(s), flush=True)",
    );
    let sent = server.number();
    let moved = pod.counters().since(&before);
    assert!(
        sent < CAP,
        "the server wrote {sent} bytes towards an app that never read: unbounded"
    );
    assert!(
        moved.get("msg_back_to_tcp") >= 1,
        "the proxy's sends into the app went back to TCP: {:?}",
        moved.nonzero()
    );
    app.say("drain");
    server.say("close");
    assert_eq!(app.number(), sent, "the app got every byte, in order");
}

/// The proxy resets the app's connection when its upstream refuses (opaque TCP). Every kind of
/// app sees its connection fail, never EAGAIN from a blocking read:
/// - an event-driven one (non-blocking, poll) sees ECONNRESET, as over TCP;
/// - a blocking one (never in the redirect) sees ECONNRESET;
/// - one that connected with a timeout and reads blocking from a second thread before its first
///   send (std's connect_timeout, as the probe does) may have a reader parked in the kernel's
///   redirect path, which a reset would wake to EAGAIN: the proxy asks the kernel and closes
///   that one with FIN, so it reads the end of the stream.
#[test]
fn every_kind_of_app_sees_a_refused_upstream_fail() {
    let mut pod = redirected_pod();
    // Nothing listens on 10.200.0.1:9000: the proxy's dial is refused.

    let before = pod.counters();
    let out = pod.app_command(
        "python3",
        &[
            "-c",
            &format!(
                "{STREAM}\ns = connect(('10.200.0.1', 9000))\ns.send(bytes(16))\n\
                 p = select.poll()\np.register(s, select.POLLIN)\np.poll(10000)\n\
                 try:\n    print('read', len(s.recv(100)))\nexcept OSError as e:\n    print(e.errno)\n"
            ),
        ],
    );
    let moved = pod.counters().since(&before);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ECONNRESET,
        "an event-driven app: {out:?} ({:?})",
        moved.nonzero()
    );
    assert_eq!(moved.get("msg_socket_added"), 2, "{:?}", moved.nonzero());

    let out = pod.app_command(
        "python3",
        &[
            "-c",
            "import socket\ns = socket.create_connection(('10.200.0.1', 9000))\ns.sendall(bytes(16))\n\
             try:\n    print('read', len(s.recv(100)))\nexcept OSError as e:\n    print(e.errno)\n",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ECONNRESET,
        "a blocking app: {out:?}"
    );

    let before = pod.counters();
    let tcp = pod.run_app_raw(&["tcp-echo", "--connect", "10.200.0.1:9000", "--bytes", "64"]);
    let moved = pod.counters().since(&before);
    assert!(
        tcp.stdout.contains("closed before all bytes came back")
            && !tcp.stdout.contains("(os error 11)"),
        "a connect-with-timeout app reading from another thread: {} ({:?})",
        tcp.stdout,
        moved.nonzero()
    );
}

/// What python prints as `e.errno` for a reset connection.
const ECONNRESET: &str = "104";

/// A re-run of `init` (same flags) replaces the programs under a live connection whose app has
/// not read what the proxy redirected to it yet: nothing is lost, and the connection goes on.
#[test]
fn a_re_init_under_a_live_connection_loses_nothing() {
    let mut pod = redirected_pod();
    let mut server = remote_server(
        &pod,
        "c = accepted(16)\nc.sendall((bytes(range(256)) * 256)[:65536])\nprint('sent', flush=True)\n\
         line()\nc.sendall((bytes(range(256)) * 256)[:1000])\nc.shutdown(socket.SHUT_WR)\ndrain(c)",
    );
    let mut app = app_python(
        &pod,
        "s = connect(('10.200.0.1', 7000))\ns.send(bytes(16))\nline()\nprint(drain(s), flush=True)",
    );
    assert_eq!(server.hear(), "sent");
    // The 64 KiB reach the app's socket (the proxy relays them); then init runs again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pod.counters().get("msg_redirected") < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            pod.counters().nonzero()
        );
        std::thread::yield_now();
    }
    pod.init(&["--msg-redirect"]);
    server.say("more");
    app.say("drain");
    assert_eq!(app.number(), 65536 + 1000, "every byte, in order");
}
