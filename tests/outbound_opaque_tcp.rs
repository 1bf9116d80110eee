//! Non-HTTP TCP goes through the proxy untouched: binary bytes come back byte-exact, and a
//! server-speaks-first protocol's greeting reaches the client even though the client never sends
//! anything for the proxy to detect.
use std::net::SocketAddr;
use std::time::Duration;

use sidecar_tests::Pod;

/// The app's socket, as getsockname() showed it, is not the socket the upstream saw: something
/// (the proxy) opened a second connection. A direct connection would show the same address on
/// both ends, whatever getpeername() says.
fn assert_relayed(app_local: &str, upstream_peer: SocketAddr) {
    assert_ne!(
        app_local,
        upstream_peer.to_string(),
        "the upstream saw the app's own socket: the connection was not redirected to the proxy"
    );
}

#[test]
fn binary_stream_passes_through_byte_exact() {
    let mut pod = Pod::new();
    let echo = pod.echo_upstream("10.200.0.1:7000", "echo");
    pod.init(&[]);
    pod.start_proxy(&[]);

    let reply = pod.app_echo("10.200.0.1:7000", 64 * 1024);

    assert!(
        reply.ok,
        "64 KiB of binary data must come back unchanged: {reply:?}"
    );
    assert_eq!(reply.received, 64 * 1024);
    assert_relayed(&reply.local, echo.only_connection());
}

#[test]
fn server_speaks_first_greeting_reaches_the_client_without_waiting_for_detection() {
    let mut pod = Pod::new();
    let smtp = pod.greeting_upstream("10.200.0.1:2525", "greeter");
    pod.init(&[]);
    // A proxy that holds the connection until protocol detection gives up would sit on the
    // greeting for 60 s; the app below gives up after 5 s. Not a speed assertion: any proxy that
    // relays server bytes while detecting passes with a wide margin.
    pod.start_proxy(&["--detect-timeout", "60s"]);

    let reply = pod.app_greeting("10.200.0.1:2525", Duration::from_secs(5));

    assert_eq!(reply.line, "220 greeting", "{reply:?}");
    assert_relayed(&reply.local, smtp.only_connection());
}
