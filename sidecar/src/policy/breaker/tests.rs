//! Unit tests of [`super`] (`policy/breaker.rs`).
use super::*;
use tokio::time::advance;

fn config(n: u32) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: n,
        failure_rate: None,
        failure_rate_window: Duration::from_secs(10),
        failure_rate_min_requests: 20,
        open_time: Duration::from_secs(10),
        max_open_time: Duration::from_secs(60),
        half_open_probes: 1,
    }
}

/// Sends one request through the breaker with the given outcome.
fn request(b: &Breaker, outcome: Outcome) -> Result<Option<Transition>, Rejected> {
    let (permit, _) = b.acquire(Instant::now());
    Ok(permit?.record(outcome, Instant::now()))
}

#[tokio::test(start_paused = true)]
async fn opens_after_exactly_n_consecutive_failures() {
    let b = Breaker::new(config(5), Instant::now());
    for i in 1..5 {
        assert_eq!(request(&b, Outcome::Failure), Ok(None), "failure {i}");
        assert_eq!(b.state(Instant::now()), State::Closed);
    }
    let t = request(&b, Outcome::Failure)
        .unwrap()
        .expect("fifth failure trips");
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    assert_eq!(t.open_for, Some(Duration::from_secs(10)));
    assert!(b.is_open(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_count() {
    let b = Breaker::new(config(3), Instant::now());
    request(&b, Outcome::Failure).unwrap();
    request(&b, Outcome::Failure).unwrap();
    request(&b, Outcome::Success).unwrap();
    request(&b, Outcome::Failure).unwrap();
    request(&b, Outcome::Failure).unwrap();
    assert_eq!(b.state(Instant::now()), State::Closed);
    assert!(request(&b, Outcome::Failure).unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_do_not_count() {
    let b = Breaker::new(config(2), Instant::now());
    request(&b, Outcome::Failure).unwrap();
    request(&b, Outcome::Ignored).unwrap();
    assert_eq!(b.state(Instant::now()), State::Closed);
    assert!(request(&b, Outcome::Failure).unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn open_rejects_until_the_open_time_then_half_opens() {
    let b = Breaker::new(config(1), Instant::now());
    request(&b, Outcome::Failure).unwrap();
    let rejected = request(&b, Outcome::Success).unwrap_err();
    assert_eq!(rejected.state, State::Open);
    assert_eq!(rejected.retry_after, Duration::from_secs(10));

    advance(Duration::from_millis(9_999)).await;
    assert!(
        request(&b, Outcome::Success).is_err(),
        "still open at 9.999 s"
    );

    advance(Duration::from_millis(1)).await;
    assert_eq!(b.state(Instant::now()), State::HalfOpen);
    let (permit, transition) = b.acquire(Instant::now());
    let permit = permit.expect("a probe is admitted");
    assert!(permit.is_probe());
    let t = transition.expect("open -> half-open");
    assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
    let t = permit
        .record(Outcome::Success, Instant::now())
        .expect("closes");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
    assert_eq!(b.state(Instant::now()), State::Closed);
    assert!(b.is_pristine());
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_a_bounded_number_of_probes() {
    let mut c = config(1);
    c.half_open_probes = 2;
    let b = Breaker::new(c, Instant::now());
    request(&b, Outcome::Failure).unwrap();
    advance(Duration::from_secs(10)).await;
    let (p1, _) = b.acquire(Instant::now());
    let (p2, _) = b.acquire(Instant::now());
    let (p3, _) = b.acquire(Instant::now());
    let (p1, p2) = (p1.unwrap(), p2.unwrap());
    let rejected = p3.unwrap_err();
    assert_eq!(rejected.state, State::HalfOpen);
    // An abandoned probe gives its slot back.
    drop(p1);
    let (p4, _) = b.acquire(Instant::now());
    assert!(p4.is_ok());
    drop(p2);
}

#[tokio::test(start_paused = true)]
async fn failed_probe_reopens_with_backoff_up_to_the_ceiling() {
    let b = Breaker::new(config(1), Instant::now());
    request(&b, Outcome::Failure).unwrap();
    let mut expected = [20, 40, 60, 60].into_iter();
    let mut open_for = Duration::from_secs(10);
    for _ in 0..4 {
        advance(open_for).await;
        let t = request(&b, Outcome::Failure)
            .expect("probe admitted")
            .expect("probe failure re-opens");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
        open_for = t.open_for.unwrap();
        assert_eq!(open_for, Duration::from_secs(expected.next().unwrap()));
    }
    // A success closes and forgets the backoff.
    advance(open_for).await;
    request(&b, Outcome::Success).unwrap();
    let t = request(&b, Outcome::Failure).unwrap().unwrap();
    assert_eq!(t.open_for, Some(Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn late_outcomes_of_an_earlier_period_are_ignored() {
    let b = Breaker::new(config(2), Instant::now());
    let (slow, _) = b.acquire(Instant::now());
    let slow = slow.unwrap();
    request(&b, Outcome::Failure).unwrap();
    request(&b, Outcome::Failure).unwrap();
    assert!(b.is_open(Instant::now()));
    // Started while closed, finished while open: neither closes nor counts.
    assert_eq!(slow.record(Outcome::Success, Instant::now()), None);
    assert!(b.is_open(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn failure_rate_trips_only_with_enough_requests() {
    let b = Breaker::new(
        BreakerConfig {
            consecutive_failures: 0,
            failure_rate: Some(0.5),
            failure_rate_window: Duration::from_secs(10),
            failure_rate_min_requests: 10,
            ..config(0)
        },
        Instant::now(),
    );
    // Alternating: 50 % failures, but never two in a row.
    for i in 0..9 {
        let outcome = if i % 2 == 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        assert_eq!(request(&b, outcome), Ok(None), "request {i}");
    }
    // 5 failures of 9: above the rate, below the minimum; the 10th (a success) does not trip.
    assert_eq!(request(&b, Outcome::Success), Ok(None));
    let t = request(&b, Outcome::Failure)
        .unwrap()
        .expect("6 of 11 trips");
    assert_eq!(t.reason, "failure rate");
}

#[tokio::test(start_paused = true)]
async fn failure_rate_window_slides() {
    let b = Breaker::new(
        BreakerConfig {
            consecutive_failures: 0,
            failure_rate: Some(0.5),
            failure_rate_window: Duration::from_secs(10),
            failure_rate_min_requests: 4,
            ..config(0)
        },
        Instant::now(),
    );
    for _ in 0..3 {
        request(&b, Outcome::Failure).unwrap();
    }
    // The three failures leave the window; three more are not enough on their own.
    advance(Duration::from_secs(11)).await;
    for _ in 0..3 {
        assert_eq!(request(&b, Outcome::Failure), Ok(None));
    }
    assert!(request(&b, Outcome::Failure).unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn disabled_breaker_never_opens() {
    let b = Breaker::new(BreakerConfig::disabled(), Instant::now());
    for _ in 0..100 {
        assert_eq!(request(&b, Outcome::Failure), Ok(None));
    }
    assert_eq!(b.state(Instant::now()), State::Closed);
}
