//! Parked idle connections (`park.rs`, `parked.rs`) on a real proxy: a kept-alive connection
//! that goes quiet leaves its task and comes back for its next request, in both modes and in
//! numbers past one look at the set; it keeps its header deadline, closes when its peer does,
//! and the drain closes it.
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::tests::{guard, until};
use super::*;
use crate::error::ProxyError;
use crate::metrics::ProxyMetrics;

const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// An upstream that answers every request head on a connection with [`ANSWER`], keeping it
/// open.
async fn keep_alive_upstream() -> SocketAddr {
    h1_tests::scripted_upstream(ANSWER).await.0
}

/// A proxy in front of `upstream` (interception, or `--target` mode) that parks idle
/// connections after 50 ms, its configuration adjusted by `configure`.
async fn parking_proxy(
    upstream: SocketAddr,
    target: bool,
    configure: impl FnOnce(&mut ProxyConfig),
) -> (Proxy, SocketAddr, Arc<ProxyMetrics>) {
    proxy_in_front(upstream, target, false, |config| {
        config.http.park_idle_after = Some(Duration::from_millis(50));
        config.http.header_timeout = Duration::from_secs(600);
        configure(config);
    })
    .await
}

/// A proxy in front of `upstream` (interception, or `--target` mode), its access log on or off
/// and its configuration adjusted by `configure`.
async fn proxy_in_front(
    upstream: SocketAddr,
    target: bool,
    access_log: bool,
    configure: impl FnOnce(&mut ProxyConfig),
) -> (Proxy, SocketAddr, Arc<ProxyMetrics>) {
    let metrics = ProxyMetrics::unregistered();
    let mut config = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
    if target {
        config.target = Some(Target::parse(&format!("http://{upstream}")).unwrap());
    }
    configure(&mut config);
    let telemetry = Telemetry {
        metrics: Arc::clone(&metrics),
        access_log,
    };
    let resolvers = Resolvers {
        outbound: tests::fixed(upstream),
        inbound: tests::fixed(upstream),
    };
    let proxy = start_observed(config, resolvers, telemetry).await.unwrap();
    let addr = proxy.local_addrs()[0];
    (proxy, addr, metrics)
}

/// Sends one request on `c` and reads its answer.
async fn exchange(c: &mut TcpStream, path: &str) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nX-Case: Kept\r\n\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    read_answer(c).await;
}

/// Reads one [`ANSWER`] from `c`.
async fn read_answer(c: &mut TcpStream) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.ends_with(b"ok") {
        let n = c.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{got:?}");
}

async fn read_to_close(c: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest).await;
    rest
}

fn dir_of(target: bool) -> Dir {
    if target {
        Dir::Inbound
    } else {
        Dir::Outbound
    }
}

/// A quiet connection is parked (still open and counted active) and its next request is
/// served as if it had never left; it parks again, and closing it while parked ends it.
#[tokio::test]
async fn a_quiet_connection_parks_and_its_next_request_is_served() {
    for target in [false, true] {
        let upstream = keep_alive_upstream().await;
        let (proxy, addr, metrics) = parking_proxy(upstream, target, |_| {}).await;
        let conns = metrics.conns(dir_of(target)).clone();
        guard(async {
            let mut c = TcpStream::connect(addr).await.unwrap();
            exchange(&mut c, "/one").await;
            until(|| conns.parked.get() == 1).await;
            assert_eq!(conns.active.get(), 1, "a parked connection is open");
            for path in ["/two", "/three"] {
                exchange(&mut c, path).await;
                until(|| conns.parked.get() == 1).await;
            }
            drop(c);
            until(|| conns.active.get() == 0).await;
            assert_eq!(conns.parked.get(), 0, "target={target}");
            assert_eq!(
                metrics.error_count(dir_of(target), ProxyError::DownstreamHeaderTimeout),
                0
            );
        })
        .await;
        proxy.stop_all();
    }
}

/// More connections than one look at the set takes (64) park and all come back at once.
#[tokio::test]
async fn hundreds_of_parked_connections_wake_together() {
    let upstream = keep_alive_upstream().await;
    let (proxy, addr, metrics) = parking_proxy(upstream, false, |_| {}).await;
    let conns = metrics.conns(Dir::Outbound).clone();
    const N: usize = 200;
    guard(async {
        let mut clients = Vec::new();
        for i in 0..N {
            let mut c = TcpStream::connect(addr).await.unwrap();
            exchange(&mut c, &format!("/first/{i}")).await;
            clients.push(c);
        }
        until(|| conns.parked.get() == N as i64).await;
        // Every client speaks before any answer is read: they wake together.
        for c in &mut clients {
            c.write_all(b"GET /again HTTP/1.1\r\nHost: app.test\r\n\r\n")
                .await
                .unwrap();
        }
        for c in &mut clients {
            read_answer(c).await;
        }
        until(|| conns.parked.get() == N as i64).await;
        assert_eq!(conns.active.get(), N as i64);
    })
    .await;
    proxy.stop_all();
}

/// Parked, a connection keeps the deadline its wait began with: silent, it is closed then and
/// counted as a header timeout; a head begun after it woke does not get a new one (a client
/// cannot stretch the header timeout by parking).
#[tokio::test]
async fn a_parked_connection_keeps_its_header_deadline() {
    let upstream = keep_alive_upstream().await;
    let timeout = Duration::from_millis(1500);
    let (proxy, addr, metrics) =
        parking_proxy(upstream, false, |c| c.http.header_timeout = timeout).await;
    let conns = metrics.conns(Dir::Outbound).clone();
    guard(async {
        // Silent.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        exchange(&mut silent, "/").await;
        let answered = Instant::now();
        until(|| conns.parked.get() == 1).await;
        assert!(read_to_close(&mut silent).await.is_empty());
        assert!(answered.elapsed() >= timeout - Duration::from_millis(100));
        let timeouts = || metrics.error_count(Dir::Outbound, ProxyError::DownstreamHeaderTimeout);
        until(|| timeouts() == 1).await;

        // A head begun late: woken with the header timeout nearly spent.
        let mut late = TcpStream::connect(addr).await.unwrap();
        exchange(&mut late, "/").await;
        let answered = Instant::now();
        until(|| conns.parked.get() == 1).await;
        tokio::time::sleep_until(answered + timeout * 2 / 3).await;
        late.write_all(b"GET /late HTTP/1.1\r\n").await.unwrap();
        until(|| conns.parked.get() == 0).await;
        let rest = read_to_close(&mut late).await;
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        // Closed at the first deadline, not one renewed when it woke (2/3 later).
        let took = answered.elapsed();
        assert!(
            took < timeout + timeout * 2 / 3 - Duration::from_millis(200),
            "closed {took:?} after its answer: the deadline was renewed"
        );
        until(|| timeouts() == 2).await;
        until(|| conns.active.get() == 0).await;
    })
    .await;
    proxy.stop_all();
}

/// The drain wakes parked connections and they close as idle connections do; the proxy's
/// shutdown finishes with them.
#[tokio::test]
async fn the_drain_closes_parked_connections() {
    let upstream = keep_alive_upstream().await;
    let (proxy, addr, metrics) = parking_proxy(upstream, false, |_| {}).await;
    let conns = metrics.conns(Dir::Outbound).clone();
    guard(async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        exchange(&mut c, "/").await;
        until(|| conns.parked.get() == 1).await;
        let closing = tokio::spawn(async move { read_to_close(&mut c).await });
        assert!(
            proxy.shutdown(Duration::from_secs(10)).await,
            "every connection ended within the drain"
        );
        assert!(closing.await.unwrap().is_empty(), "closed without a word");
        assert_eq!(conns.parked.get(), 0);
        assert_eq!(conns.active.get(), 0);
    })
    .await;
}

/// `--park-idle-after 0s`: idle connections keep their tasks (nothing is parked).
#[tokio::test]
async fn parking_can_be_turned_off() {
    let upstream = keep_alive_upstream().await;
    let (proxy, addr, metrics) =
        parking_proxy(upstream, false, |c| c.http.park_idle_after = None).await;
    let conns = metrics.conns(Dir::Outbound).clone();
    guard(async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        exchange(&mut c, "/").await;
        assert!(proxy.shared.parker.is_none(), "no parked set");
        // Idle long past when it would have parked: still served by its own task.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(conns.parked.get(), 0);
        exchange(&mut c, "/again").await;
    })
    .await;
    proxy.stop_all();
}

/// What a parked connection keeps is its slot in the set's vector (plus the kernel's epoll
/// entry, and its observer): its engine state, its socket, its books and its deadline. Its
/// route is shared with the other connections on it. The task (640 bytes) and readiness
/// registration (256) it had are freed.
#[test]
fn a_parked_connection_is_its_slot() {
    let size = park::slot_size::<parked::Dormant>();
    eprintln!("a parked connection's slot: {size} bytes");
    assert!(size <= 128, "a parked connection's slot is {size} bytes");
}

/// Connections on one destination (interception) or from one client (`--target`) share one
/// route and one observer, parked or not; a connection begun after a reload gets a route of the
/// new policies, and both go with the last connection on them.
#[tokio::test]
async fn connections_on_one_destination_share_their_route() {
    for target in [false, true] {
        let upstream = keep_alive_upstream().await;
        let (proxy, addr, metrics) = parking_proxy(upstream, target, |_| {}).await;
        let conns = metrics.conns(dir_of(target)).clone();
        let routes = &proxy.shared.routes;
        guard(async {
            let mut clients = Vec::new();
            for _ in 0..20 {
                let mut c = TcpStream::connect(addr).await.unwrap();
                exchange(&mut c, "/").await;
                clients.push(c);
            }
            until(|| conns.parked.get() == 20).await;
            let live = routes.live();
            assert_eq!(live.len(), 1, "target={target}");
            let first = Arc::clone(&live[0]);
            drop(live);
            // The 20 parked connections' references, and this one.
            assert_eq!(Arc::strong_count(&first), 21, "target={target}");
            let observers = proxy.shared.observers.live();
            assert_eq!(observers.len(), 1, "target={target}");
            assert_eq!(Arc::strong_count(&observers[0]), 21, "target={target}");
            drop(observers);
            if !target {
                let mut changed = crate::policy::PolicyConfig::default();
                changed.defaults.request_timeout = Duration::from_secs(7);
                proxy.policies().replace(&changed);
                let mut c = TcpStream::connect(addr).await.unwrap();
                exchange(&mut c, "/").await;
                until(|| conns.parked.get() == 21).await;
                let live = routes.live();
                assert_eq!(live.len(), 1);
                assert!(
                    !Arc::ptr_eq(&live[0], &first),
                    "the new connection got a route of the old policies"
                );
                assert_eq!((first.generation, live[0].generation), (0, 1));
                assert_eq!(
                    Arc::strong_count(&first),
                    21,
                    "the old connections keep theirs"
                );
                clients.push(c);
            }
            drop(first);
            drop(clients);
            until(|| conns.active.get() == 0).await;
            assert!(routes.live().is_empty(), "target={target}");
            assert!(proxy.shared.observers.live().is_empty(), "target={target}");
        })
        .await;
        proxy.stop_all();
    }
}

/// A client that comes from ever new addresses (here 300 loopback ones, one connection each,
/// closed after its answer) leaves no route behind, and the shared map no more entries than
/// its sweep allows: it cannot grow the proxy's memory by changing addresses.
#[tokio::test]
async fn clients_from_ever_new_addresses_leave_the_shared_routes_bounded() {
    let upstream = keep_alive_upstream().await;
    let (proxy, addr, metrics) = parking_proxy(upstream, true, |_| {}).await;
    let conns = metrics.conns(Dir::Inbound).clone();
    guard(async {
        for i in 0..300u32 {
            let from = std::net::Ipv4Addr::from(0x7f01_0000 + i);
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((from, 0))).unwrap();
            let mut c = socket.connect(addr).await.unwrap();
            exchange(&mut c, "/").await;
            drop(c);
            until(|| conns.active.get() == 0).await;
        }
        let routes = &proxy.shared.routes;
        assert!(routes.live().is_empty());
        assert!(
            routes.entries() <= 2 + 64 + 1,
            "{} entries for no connection",
            routes.entries()
        );
    })
    .await;
    proxy.stop_all();
}

/// The access log names each request's own client, although the connections to one
/// destination share their observer: both engines, both modes.
#[tokio::test]
async fn the_access_log_names_each_connection_s_client() {
    let lines = Lines::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(lines.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    for (target, engine) in [
        (false, Http1Engine::Native),
        (true, Http1Engine::Native),
        (false, Http1Engine::Hyper),
    ] {
        let upstream = keep_alive_upstream().await;
        let (proxy, addr, _) = proxy_in_front(upstream, target, true, |config| {
            config.http.http1_engine = engine;
        })
        .await;
        guard(async {
            let mut a = TcpStream::connect(addr).await.unwrap();
            let mut b = TcpStream::connect(addr).await.unwrap();
            exchange(&mut a, "/from-a").await;
            exchange(&mut b, "/from-b").await;
            for (c, path) in [(&a, "/from-a"), (&b, "/from-b")] {
                let peer = c.local_addr().unwrap();
                let line = lines.with(path);
                assert!(
                    line.contains(&format!("peer={peer}")),
                    "target={target} {engine:?}: {line}"
                );
            }
        })
        .await;
        lines.clear();
        proxy.stop_all();
    }
}

/// What the tracing subscriber of a test writes.
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

impl Lines {
    /// The line that mentions `needle`.
    fn with(&self, needle: &str) -> String {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        let line = text.lines().find(|l| l.contains(needle));
        line.unwrap_or_else(|| panic!("no line with {needle}:\n{text}"))
            .to_owned()
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Lines;

    fn make_writer(&'a self) -> Lines {
        self.clone()
    }
}

/// A head begun before the parking time and finished after it is served: a connection with
/// bytes of a request read is never parked (they are in its buffer, not the socket's).
#[tokio::test]
async fn a_head_begun_before_the_parking_time_is_served() {
    let upstream = keep_alive_upstream().await;
    let (proxy, addr, metrics) = parking_proxy(upstream, false, |_| {}).await;
    let conns = metrics.conns(Dir::Outbound).clone();
    guard(async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        exchange(&mut c, "/").await;
        c.write_all(b"GET /slow HTTP/1.1\r\n").await.unwrap();
        // Past the parking time (50 ms) with half a head read.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(conns.parked.get(), 0, "parked with a head under way");
        c.write_all(b"Host: app.test\r\n\r\n").await.unwrap();
        read_answer(&mut c).await;
        // And then it parks as any quiet connection does.
        until(|| conns.parked.get() == 1).await;
    })
    .await;
    proxy.stop_all();
}
