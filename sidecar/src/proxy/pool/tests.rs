use super::*;
use crate::policy::{PolicyConfig, PolicyStore};
use crate::proxy::connect::{Source, Stash};
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpListener;

fn pool() -> Arc<Pool> {
    let connector = Connector {
        stash: Arc::new(Stash::default()),
        policies: Arc::new(PolicyStore::new(&PolicyConfig::default())),
        source: Source::Any,
        mesh: crate::proxy::connect::Mesh::disabled(),
    };
    let metrics = PoolMetrics {
        open: IntGauge::new("open", "test").unwrap(),
        waits: IntCounter::new("waits", "test").unwrap(),
    };
    Pool::new(connector, Duration::from_secs(30), metrics)
}

fn counts(host: &Host) -> (usize, usize, usize) {
    let state = lock(&host.state);
    (state.open, state.idle.len(), state.waiters.len())
}

#[tokio::test]
async fn a_grant_the_waiter_never_took_goes_back_to_the_pool() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accept and hold connections; no request is sent in this test.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let pool = pool();
    let host = pool.host(
        &Authority::try_from(addr.to_string()).unwrap(),
        1,
        Plan::Plain,
    );
    let mut first = pool.checkout(&host).await.expect("dialled");
    assert_eq!(counts(&host), (1, 0, 0));

    // A second request queues behind the limit...
    let mut second = Box::pin(pool.checkout(&host));
    tokio::select! {
        biased;
        _ = &mut second => panic!("served past the limit"),
        () = std::future::ready(()) => {}
    }
    assert_eq!(counts(&host), (1, 0, 1));
    // ...is handed the first connection when it is returned, and gives up before taking it.
    first.done = true;
    drop(first);
    assert_eq!(counts(&host), (1, 0, 0));
    drop(second);
    // The connection went back to the pool instead of being lost with the slot.
    assert_eq!(counts(&host), (1, 1, 0));
    let third = pool.checkout(&host).await.expect("the idle connection");
    assert_eq!(counts(&host), (1, 0, 0));

    // Same for a slot: the lease closes, its slot is granted to a waiter that gives up.
    let mut fourth = Box::pin(pool.checkout(&host));
    tokio::select! {
        biased;
        _ = &mut fourth => panic!("served past the limit"),
        () = std::future::ready(()) => {}
    }
    drop(third);
    drop(fourth);
    assert_eq!(counts(&host), (0, 0, 0), "the slot was freed, not leaked");
}
