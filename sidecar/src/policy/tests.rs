use super::*;
use crate::error::ProxyError;
use breaker::Outcome;
use http::StatusCode;

fn rule(m: &str, f: impl FnOnce(&mut DestinationPolicy)) -> DestinationRule {
    let mut policy = DestinationPolicy::default();
    f(&mut policy);
    DestinationRule {
        matcher: Match::parse(m).unwrap(),
        policy,
    }
}

#[test]
fn matches_parse() {
    assert_eq!(
        Match::parse("10.0.0.7:80"),
        Ok(Match::Addr("10.0.0.7:80".parse().unwrap()))
    );
    assert_eq!(
        Match::parse("[fd00::7]:443"),
        Ok(Match::Addr("[fd00::7]:443".parse().unwrap()))
    );
    assert_eq!(
        Match::parse("API.example:443"),
        Ok(Match::Authority {
            host: "api.example".into(),
            port: 443
        })
    );
    assert!(Match::parse("api.example")
        .unwrap_err()
        .contains("missing port"));
    assert!(Match::parse("api.example:http").is_err());
    assert!(Match::parse("10.0.0.7").is_err());
    assert!(Match::parse("a b:80").is_err());
    assert!(Match::parse(":80").is_err());
}

#[test]
fn authorities_split() {
    assert_eq!(split_authority("a.example", 80), Some(("a.example", 80)));
    assert_eq!(
        split_authority("a.example:8080", 80),
        Some(("a.example", 8080))
    );
    assert_eq!(split_authority("[::1]", 80), Some(("[::1]", 80)));
    assert_eq!(split_authority("[::1]:81", 80), Some(("[::1]", 81)));
    assert_eq!(split_authority("a:b", 80), None);
    assert_eq!(split_authority("", 80), None);
}

#[tokio::test]
async fn rules_are_found_by_address_and_by_name() {
    let config = PolicyConfig {
        defaults: DestinationPolicy::default(),
        destinations: vec![
            rule("10.0.0.7:80", |p| {
                p.request_timeout = Duration::from_secs(2);
            }),
            rule("api.example:443", |p| {
                p.connect_timeout = Duration::from_secs(3);
            }),
        ],
        ..PolicyConfig::default()
    };
    let p = Policies::new(&config);
    let by_addr = p.outbound("10.0.0.7:80".parse().unwrap(), None);
    assert_eq!(by_addr.policy().request_timeout, Duration::from_secs(2));
    assert_eq!(by_addr.name(), "10.0.0.7:80");
    let learned = p.outbound("10.0.0.8:80".parse().unwrap(), None);
    assert_eq!(learned.policy(), &DestinationPolicy::default());
    let again = p.outbound("10.0.0.8:80".parse().unwrap(), None);
    assert!(Arc::ptr_eq(&learned, &again), "one breaker per destination");

    assert!(p.has_name_rules());
    let named = p
        .by_authority("API.Example:443", 80)
        .expect("case-insensitive");
    assert_eq!(named.name(), "api.example:443");
    assert!(
        p.by_authority("api.example", 443).is_some(),
        "port from the connection"
    );
    assert!(p.by_authority("api.example", 80).is_none());
    assert_eq!(
        p.connect_timeout("api.example", 443),
        Duration::from_secs(3)
    );
    assert_eq!(
        p.connect_timeout("10.0.0.7", 80),
        DestinationPolicy::default().connect_timeout
    );

    let inbound = p.inbound();
    assert!(inbound.policy().breaker.is_disabled());
    assert_eq!(inbound.policy().retry.max_retries, 0);
}

/// A reload keeps the state of what it did not change: an open breaker of an unchanged rule,
/// learned destinations under unchanged defaults; a changed rule starts afresh.
#[tokio::test]
async fn reload_keeps_what_did_not_change() {
    let a = "10.0.0.7:80";
    let config = PolicyConfig {
        defaults: DestinationPolicy::default(),
        destinations: vec![
            rule(a, |p| p.breaker.consecutive_failures = 1),
            rule("api.example:443", |p| {
                p.request_timeout = Duration::from_secs(2);
            }),
        ],
        ..PolicyConfig::default()
    };
    let store = PolicyStore::new(&config);
    let first = store.load_full_for_test();
    let dest_a = first.outbound(a.parse().unwrap(), None);
    let permit = dest_a.admit().expect("closed");
    dest_a.report(permit, Outcome::Failure);
    assert!(dest_a.is_open(), "one failure opens it");
    let learned = first.outbound("10.0.0.9:80".parse().unwrap(), None);

    // Change only the name rule.
    let mut next = config.clone();
    next.destinations[1].policy.request_timeout = Duration::from_millis(300);
    let changes = store.replace(&next);
    assert_eq!(
        changes,
        Changes {
            kept: 1,
            replaced: 1,
            removed: 0,
            defaults_changed: false
        }
    );
    let second = store.load_full_for_test();
    assert_eq!(second.generation(), 1);
    let again = second.outbound(a.parse().unwrap(), None);
    assert!(
        Arc::ptr_eq(&dest_a, &again) && again.is_open(),
        "breaker kept"
    );
    assert!(Arc::ptr_eq(
        &learned,
        &second.outbound("10.0.0.9:80".parse().unwrap(), None)
    ));
    let named = second.by_authority("api.example:443", 80).unwrap();
    assert_eq!(named.policy().request_timeout, Duration::from_millis(300));
    // The old generation still answers with the old rule (a request that began under it).
    let old_named = first.by_authority("api.example:443", 80).unwrap();
    assert_eq!(old_named.policy().request_timeout, Duration::from_secs(2));

    // Changed defaults: learned destinations start afresh; the unchanged rule's stays.
    let mut third = next.clone();
    third.defaults.connect_timeout = Duration::from_millis(250);
    third.destinations.pop();
    let changes = store.replace(&third);
    assert!(changes.defaults_changed);
    assert_eq!((changes.kept, changes.removed), (1, 1));
    let now = store.load_full_for_test();
    let relearned = now.outbound("10.0.0.9:80".parse().unwrap(), None);
    assert!(!Arc::ptr_eq(&learned, &relearned));
    assert_eq!(
        relearned.policy().connect_timeout,
        Duration::from_millis(250)
    );
    assert!(now.by_authority("api.example:443", 80).is_none());
    assert!(now.outbound(a.parse().unwrap(), None).is_open());
}

#[tokio::test]
async fn outcomes_follow_the_failure_set() {
    let p = Policies::new(&PolicyConfig::default());
    let d = p.outbound("10.0.0.9:80".parse().unwrap(), None);
    assert_eq!(d.outcome(Ok(StatusCode::OK)), Outcome::Success);
    assert_eq!(d.outcome(Ok(StatusCode::NOT_FOUND)), Outcome::Success);
    assert_eq!(
        d.outcome(Ok(StatusCode::INTERNAL_SERVER_ERROR)),
        Outcome::Failure
    );
    assert_eq!(d.outcome(Ok(StatusCode::NOT_IMPLEMENTED)), Outcome::Success);
    assert_eq!(
        d.outcome(Err(ProxyError::UpstreamConnectRefused)),
        Outcome::Failure
    );
    assert_eq!(d.outcome(Err(ProxyError::UpstreamReset)), Outcome::Failure);
    assert_eq!(
        d.outcome(Err(ProxyError::UpstreamTimeout)),
        Outcome::Failure
    );
    assert_eq!(d.outcome(Err(ProxyError::DownstreamBody)), Outcome::Ignored);

    assert!(d.is_retryable(Ok(StatusCode::SERVICE_UNAVAILABLE)));
    assert!(!d.is_retryable(Ok(StatusCode::INTERNAL_SERVER_ERROR)));
    assert!(d.is_retryable(Err(ProxyError::UpstreamConnectRefused)));
    assert!(d.is_retryable(Err(ProxyError::UpstreamReset)));
    assert!(!d.is_retryable(Err(ProxyError::UpstreamTimeout)));
}

#[tokio::test]
async fn unused_clean_destinations_are_forgotten_past_the_cap() {
    let p = Policies::new(&PolicyConfig::default());
    let shard = shard_of("10.1.0.0:80".parse().unwrap());
    let mut same_shard = (0u32..)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 1, 0, 0)) + i);
            SocketAddr::from((ip, 80))
        })
        .filter(|a| shard_of(*a) == shard);
    let held = p.outbound(same_shard.next().unwrap(), None);
    for addr in same_shard.by_ref().take(SHARD_SOFT_CAP) {
        p.outbound(addr, None);
    }
    let len = p.learned[shard].lock().unwrap().len();
    assert!(len <= 2, "unused entries were dropped, {len} left");
    let again = p.outbound(held.name().parse().unwrap(), None);
    assert!(Arc::ptr_eq(&held, &again), "an entry in use is kept");
}

/// Destinations whose breakers have counted failures are kept past the soft cap, but not
/// without bound: the state of ever new failing addresses plateaus.
#[tokio::test]
async fn failing_destinations_are_bounded_too() {
    let p = Policies::new(&PolicyConfig::default());
    let shard = shard_of("10.2.0.0:80".parse().unwrap());
    let same_shard = (0u32..)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 2, 0, 0)) + i);
            SocketAddr::from((ip, 80))
        })
        .filter(|a| shard_of(*a) == shard);
    let mut most = 0;
    for addr in same_shard.take(3 * SHARD_HARD_CAP) {
        let d = p.outbound(addr, None);
        let permit = d.admit().expect("closed");
        d.report(permit, Outcome::Failure);
        most = most.max(p.learned[shard].lock().unwrap().len());
    }
    assert!(most <= SHARD_HARD_CAP, "at most the hard cap: {most}");
}

/// An app calling 45,000 distinct failing destinations: the proxy's destination state
/// plateaus at the caps, whatever the addresses.
#[tokio::test]
async fn forty_five_thousand_failing_destinations_plateau() {
    let p = Policies::new(&PolicyConfig::default());
    let total = |p: &Policies| -> usize { p.learned.iter().map(|s| s.lock().unwrap().len()).sum() };
    let mut most = 0;
    for i in 0..45_000u32 {
        let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 3, 0, 0)) + i);
        let d = p.outbound(SocketAddr::from((ip, 443)), None);
        let permit = d.admit().expect("closed");
        d.report(permit, Outcome::Failure);
        if i % 500 == 0 {
            most = most.max(total(&p));
        }
    }
    most = most.max(total(&p));
    assert!(most <= SHARDS * SHARD_HARD_CAP, "{most} destinations kept");
    assert!(most < 45_000);
}
