//! Hostile clients against the real interception path (clients in the remote network namespace,
//! sk_lookup, the proxy in the pod): stalled request heads, slowloris and 5,000 silent
//! connections.
//! The proxy's memory and descriptors stay bounded, every such connection is closed within its
//! documented bound, and meanwhile other clients' inbound requests and the app's own outbound
//! requests keep answering 200. The numbers (peak RSS growth, time to close) are printed.
#[path = "lifecycle_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sidecar_tests::{netns, Pod};
use support::{wait_for, Sidecar, SlowApp};

const APP: &str = "10.200.0.2:8080";
/// Short bounds so the test is quick; the defaults are 30 s and 1 h.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Slack on "closed within the bound": a loaded debug build on 2 cores.
const SLACK: Duration = Duration::from_secs(10);

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Samples the proxy's RSS every 20 ms until stopped; the peak.
struct RssPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssPeak {
    fn start(pid: u32) -> RssPeak {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                p.fetch_max(rss_kib(pid), Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssPeak {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Acquire)
    }
}

/// Runs `f` in a thread inside the remote network namespace.
fn remote<T: Send + 'static>(
    pod: &Pod,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = netns::open_netns(pod.remote_netns()).unwrap_or_else(|e| panic!("open netns: {e}"));
    std::thread::spawn(move || {
        netns::enter(&ns).unwrap_or_else(|e| panic!("enter netns: {e}"));
        f()
    })
}

/// One connection to the app's address (from the remote namespace).
fn connect_app(addr: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Another client's inbound GET and the app's own outbound GET both answer 200 (`while`: what
/// is going on meanwhile).
fn others_answered(pod: &Pod, while_: &str) {
    assert_eq!(inbound_get(pod), 200, "another client, {while_}");
    assert_eq!(
        pod.app_http("10.200.0.1:9000").status,
        200,
        "the app's outbound, {while_}"
    );
}

/// One inbound GET from the remote namespace, as another client would.
fn inbound_get(pod: &Pod) -> u16 {
    pod.remote_http(APP).status
}

/// Waits until the peer closes `s` (EOF or reset); how long that took from `since`.
fn until_closed(mut s: TcpStream, since: Instant) -> Duration {
    s.set_read_timeout(Some(SLACK + IDLE_TIMEOUT + HEADER_TIMEOUT))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("still open after {:?}", since.elapsed())
            }
            Err(_) => return since.elapsed(),
        }
    }
}

#[test]
fn stalled_heads_slowloris_and_silent_connections_stay_bounded() {
    let mut pod = Pod::new();
    let _app = SlowApp::start(&pod, "0.0.0.0:8080", Duration::ZERO);
    let _up = pod.http_upstream("10.200.0.1:9000", "up");
    pod.init_with_netns(&[]);
    let before = pod.counters().get("inbound_listener_seen");
    let header = format!("{}s", HEADER_TIMEOUT.as_secs());
    let idle = format!("{}s", IDLE_TIMEOUT.as_secs());
    let mut sidecar = Sidecar::start(
        &pod,
        "proxy",
        &["--header-timeout", &header, "--idle-timeout", &idle],
    );
    sidecar.wait_inbound_registered(&mut pod, before);
    let pid = sidecar.pid();
    others_answered(&pod, "before anything");
    let rss_before = rss_kib(pid);
    let fds_before = open_fds(pid);

    // 1. 1,000 connections that each send 300 KB of a request head that never ends.
    let peak = RssPeak::start(pid);
    let started = Instant::now();
    let stalled = remote(&pod, || {
        let addr: SocketAddr = APP.parse().unwrap_or_else(|e| panic!("{e}"));
        let chunk = {
            let mut c = b"GET / HTTP/1.1\r\nhost: app\r\n".to_vec();
            c.extend(std::iter::repeat_n(b'x', 300 * 1024 - c.len()));
            c
        };
        (0..1_000)
            .map(|_| {
                let mut s = connect_app(addr);
                s.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
                // As much as the socket takes without blocking: the proxy stops reading at the
                // head limit and answers 431.
                let _ = s.write(&chunk);
                s.set_nonblocking(false).unwrap_or_else(|e| panic!("{e}"));
                s
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap_or_else(|_| panic!("client thread"));
    // Meanwhile: other clients inbound, and the app outbound.
    others_answered(&pod, "while 1,000 heads stall");
    let closed: Vec<Duration> = stalled
        .into_iter()
        .map(|s| until_closed(s, started))
        .collect();
    let slowest = closed.iter().max().copied().unwrap_or_default();
    let peak_kib = peak.stop();
    eprintln!(
        "1,000 stalled 300 KB heads: RSS {} -> peak {} KiB (+{} KiB); all closed within {slowest:?}",
        rss_before,
        peak_kib,
        peak_kib.saturating_sub(rss_before)
    );
    assert!(
        peak_kib.saturating_sub(rss_before) < 50 * 1024,
        "RSS grew by {} KiB",
        peak_kib - rss_before
    );
    assert!(slowest < HEADER_TIMEOUT + SLACK, "{slowest:?}");

    // 1b. 1,000 heads of 16 KiB, under the head limit: held until the header timeout.
    let rss_before = rss_kib(pid);
    let peak = RssPeak::start(pid);
    let started = Instant::now();
    let held = remote(&pod, || {
        let addr: SocketAddr = APP.parse().unwrap_or_else(|e| panic!("{e}"));
        let mut chunk = b"GET / HTTP/1.1\r\nhost: app\r\nx-pad: ".to_vec();
        chunk.extend(std::iter::repeat_n(b'x', 16 * 1024));
        (0..1_000)
            .map(|_| {
                let mut s = connect_app(addr);
                s.write_all(&chunk).unwrap_or_else(|e| panic!("write: {e}"));
                s
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap_or_else(|_| panic!("client thread"));
    others_answered(&pod, "while 1,000 heads are held");
    let closed: Vec<Duration> = held.into_iter().map(|s| until_closed(s, started)).collect();
    let slowest = closed.iter().max().copied().unwrap_or_default();
    let fastest = closed.iter().min().copied().unwrap_or_default();
    let peak_kib = peak.stop();
    eprintln!(
        "1,000 held 16 KiB heads: RSS {rss_before} -> peak {peak_kib} KiB (+{} KiB); closed between \
         {fastest:?} and {slowest:?}",
        peak_kib.saturating_sub(rss_before)
    );
    assert!(
        peak_kib.saturating_sub(rss_before) < 50 * 1024,
        "RSS grew by {} KiB",
        peak_kib - rss_before
    );
    assert!(
        fastest >= HEADER_TIMEOUT,
        "held until the header timeout: {fastest:?}"
    );
    assert!(slowest < HEADER_TIMEOUT + SLACK, "{slowest:?}");

    // 2. 200 slowloris connections (one header byte every second) and 5,000 silent ones.
    let started = Instant::now();
    let slowloris = remote(&pod, || {
        let addr: SocketAddr = APP.parse().unwrap_or_else(|e| panic!("{e}"));
        let conns: Vec<TcpStream> = (0..200)
            .map(|_| {
                let mut s = connect_app(addr);
                let _ = s.write_all(b"GET / HTTP/1.1\r\nx-a: ");
                s
            })
            .collect();
        // Drip bytes until the proxy closes them (the header timeout is a total, not per byte).
        let deadline = Instant::now() + HEADER_TIMEOUT + SLACK;
        let mut open: Vec<TcpStream> = conns;
        while !open.is_empty() && Instant::now() < deadline {
            open.retain_mut(|s| s.write_all(b"a").is_ok());
            std::thread::sleep(Duration::from_secs(1));
        }
        (open.len(), Instant::now())
    });
    let silent = remote(&pod, || {
        let addr: SocketAddr = APP.parse().unwrap_or_else(|e| panic!("{e}"));
        (0..5_000).map(|_| connect_app(addr)).collect::<Vec<_>>()
    })
    .join()
    .unwrap_or_else(|_| panic!("client thread"));
    others_answered(&pod, "among 5,000 silent connections");
    let silent_closed: Vec<Duration> = silent
        .into_iter()
        .map(|s| until_closed(s, started))
        .collect();
    let (still_open, _) = slowloris
        .join()
        .unwrap_or_else(|_| panic!("slowloris thread"));
    let slowest = silent_closed.iter().max().copied().unwrap_or_default();
    eprintln!(
        "200 slowloris: {still_open} still open at the deadline; 5,000 silent: all closed within {slowest:?}"
    );
    assert_eq!(
        still_open, 0,
        "slowloris connections are closed at the header timeout"
    );
    assert!(slowest < IDLE_TIMEOUT + SLACK, "{slowest:?}");
    wait_for(
        Duration::from_secs(20),
        "descriptors back to their level",
        || open_fds(pid) <= fds_before + 16,
    );
    others_answered(&pod, "afterwards");
    assert!(sidecar.try_status().is_none(), "the proxy is still running");
}
