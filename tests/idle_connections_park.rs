//! Idle kept-alive connections are parked (`--park-idle-after`): an app's connection that goes
//! quiet between requests gives up its task in the proxy, stays open, and its next request is
//! answered as before; closing it while parked ends it. The app is Python's asyncio (non-blocking
//! sockets: under `--msg-redirect` its connection goes socket to socket, and a parked socket is
//! then one in the redirect's map).
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout};
use std::time::Duration;

use sidecar_tests::{env, metrics, poll_until, Pod};

/// Three requests on one connection, each after a line on stdin (the first at once); each
/// answer's status line and body printed.
const CLIENT: &str = r#"
import asyncio, sys
async def main():
    r, w = await asyncio.open_connection('10.200.0.1', 8080)
    loop = asyncio.get_running_loop()
    for i in range(3):
        if i:
            await loop.run_in_executor(None, sys.stdin.readline)
        w.write(b'GET /n%d HTTP/1.1\r\nHost: alpha\r\nX-Mixed-Case: Kept\r\n\r\n' % i)
        await w.drain()
        head = await r.readuntil(b'\r\n\r\n')
        lines = head.decode().split('\r\n')
        n = [int(l.split(':')[1]) for l in lines if l.lower().startswith('content-length:')][0]
        body = await r.readexactly(n)
        print(lines[0], body.decode().strip(), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    w.close()
    await w.wait_closed()
asyncio.run(main())
"#;

struct App {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl App {
    fn answer(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("the client's output");
        line.trim().to_owned()
    }

    fn go_on(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("piped");
        stdin.write_all(b"go\n").expect("the client's stdin");
    }
}

fn outbound(pod: &Pod, series: &str) -> f64 {
    metrics::value(pod, &format!("{series}{{direction=\"outbound\"}}"))
}

/// Waits until the pod's outbound connections are `active`, `parked` of them parked.
fn wait_for(pod: &Pod, active: f64, parked: f64) {
    let seen = poll_until(Duration::from_secs(20), || {
        let now = (
            outbound(pod, "sidecar_tcp_connections_active"),
            outbound(pod, "sidecar_tcp_connections_parked"),
        );
        (now == (active, parked)).then_some(now)
    });
    assert!(
        seen.is_some(),
        "outbound connections never came to {active} open, {parked} parked: now {} open, {} parked",
        outbound(pod, "sidecar_tcp_connections_active"),
        outbound(pod, "sidecar_tcp_connections_parked"),
    );
}

#[test]
fn a_quiet_app_connection_is_parked_and_its_next_request_answered() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    pod.init(&[]);
    pod.start_proxy(&["--park-idle-after", "200ms"]);
    let before = pod.counters();

    let mut child = pod.app_spawn("python3", &["-c", CLIENT]);
    let out = BufReader::new(child.stdout.take().expect("piped"));
    let mut app = App { child, out };
    assert_eq!(app.answer(), "HTTP/1.1 200 OK hello from alpha");
    wait_for(&pod, 1.0, 1.0);
    for _ in 0..2 {
        app.go_on();
        assert_eq!(app.answer(), "HTTP/1.1 200 OK hello from alpha");
        wait_for(&pod, 1.0, 1.0);
    }
    // Closed while parked: the proxy sees it and the connection ends.
    app.go_on();
    let status = app.child.wait().expect("the client exits");
    assert!(status.success(), "the client: {status}");
    wait_for(&pod, 0.0, 0.0);

    if env::msg_redirect_everywhere() {
        // The parked socket was one of the redirect's: its requests went socket to socket.
        let moved = pod.counters().since(&before);
        assert!(moved.get("msg_redirected") >= 6, "{:?}", moved.nonzero());
        assert_eq!(moved.get("msg_back_to_tcp"), 0, "{:?}", moved.nonzero());
    }
    let seen = alpha.requests();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/n0", "/n1", "/n2"], "each request once, in order");
    for r in &seen {
        assert_eq!(r.header_all("x-mixed-case"), ["Kept"], "{r:#?}");
    }
    assert_eq!(
        metrics::value(
            &pod,
            "sidecar_proxy_errors_total{direction=\"outbound\",reason=\"downstream-header-timeout\"}"
        ),
        0.0
    );
}
