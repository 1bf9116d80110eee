//! The drain (`crate::lifecycle::drain`) on a real proxy: what a connection accepted just
//! before it gets, and the order in which the directions stop.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::*;
use crate::lifecycle::{drain, DrainOutcome, DrainPlan, Readiness};

/// An upstream that answers every request `200 ok` (one per connection).
async fn ok_upstream() -> SocketAddr {
    tests::answering_upstream(tests::OK_THEN_CLOSE).await.0
}

/// A client whose connection and request are already queued in the kernel when the drain
/// starts, before the proxy ran at all (a current-thread runtime runs the proxy's tasks only
/// when the test yields). It must get its answer: accepted from the backlog, detected, and
/// served by hyper before the connection is shut down.
async fn queued_request_is_answered(proxy: &Proxy, addr: SocketAddr) {
    use std::io::{Read, Write};
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    client
        .write_all(b"GET /queued HTTP/1.1\r\nhost: a.test\r\n\r\n")
        .unwrap();
    proxy.stop_inbound();
    let answer = tokio::task::spawn_blocking(move || {
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut raw = String::new();
        let _ = client.read_to_string(&mut raw);
        raw
    });
    let raw = answer.await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200 OK"), "{raw:?}");
    assert!(raw.ends_with("ok"), "{raw:?}");
    tokio::time::timeout(
        Duration::from_secs(20),
        proxy.active(Dir::Inbound).wait_idle(),
    )
    .await
    .expect("inbound drained");
}

#[tokio::test]
async fn drain_answers_inbound_requests_queued_before_it() {
    let upstream = ok_upstream().await;
    let mut config = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
    config.inbound = vec![ListenAddr {
        addr: "127.0.0.1:0".parse().unwrap(),
        required: true,
    }];
    let fixed: Resolver = Arc::new(move |_: &TcpStream| Ok(upstream));
    let proxy = start_with_resolvers(
        config,
        Resolvers {
            outbound: fixed.clone(),
            inbound: fixed,
        },
    )
    .await
    .unwrap();
    let addr = proxy.inbound_addrs()[0];
    queued_request_is_answered(&proxy, addr).await;
    // Inbound is closed now; outbound still accepts.
    assert!(TcpStream::connect(addr).await.is_err());
    assert!(TcpStream::connect(proxy.local_addrs()[0]).await.is_ok());
}

#[tokio::test]
async fn drain_answers_target_requests_queued_before_it() {
    let upstream = ok_upstream().await;
    let mut config = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
    config.target = Some(Target::parse(&format!("http://{upstream}")).unwrap());
    let proxy = start(config, original_dst_resolver()).await.unwrap();
    let addr = proxy.local_addrs()[0];
    queued_request_is_answered(&proxy, addr).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn drain_waits_for_outbound_then_stops() {
    let upstream = ok_upstream().await;
    let fixed: Resolver = Arc::new(move |_: &TcpStream| Ok(upstream));
    let proxy = start(ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]), fixed)
        .await
        .unwrap();
    let addr = proxy.local_addrs()[0];
    // The app's open outbound connection (it has not sent anything yet).
    let app_conn = TcpStream::connect(addr).await.unwrap();
    let readiness = Readiness::new(false, false);
    readiness.set_listening();
    let plan = DrainPlan {
        deadline: Duration::from_secs(30),
        min: Duration::ZERO,
    };
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = drain(
        &proxy,
        &readiness,
        &plan,
        std::future::pending(),
        false,
        std::future::pending(),
    );
    tokio::pin!(drain);
    // Draining: not ready, and outbound still takes new connections.
    tokio::select! {
        _ = &mut drain => panic!("the drain must wait for the app's connection"),
        _ = async {
            while proxy.active(Dir::Outbound).get() < 1 {
                tokio::task::yield_now().await;
            }
            assert!(readiness.check().is_err());
            let extra = TcpStream::connect(addr).await.unwrap();
            drop(extra);
            drop(app_conn);
            let _ = closed_tx.send(());
        } => {}
    }
    let _ = closed_rx.await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), drain)
        .await
        .expect("the drain ends once the app's connections are gone");
    assert_eq!(outcome, DrainOutcome::Drained);
    assert!(TcpStream::connect(addr).await.is_err());
}
