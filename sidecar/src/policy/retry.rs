//! Retries: which requests may be sent again, on which failures, and the budget that keeps
//! retries from multiplying an outage (linkerd's and Finagle's retry budget: a retry costs one
//! token; every request deposits `ratio` tokens; `min_per_second` tokens are always available so
//! that a quiet destination can still retry; deposits and withdrawals expire after `window`).
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

/// Retries per request (the first attempt is not counted): two more chances, bounded by the budget.
pub const DEFAULT_MAX_RETRIES: u32 = 2;
/// linkerd's retry budget: retries may add at most 20 % load...
pub const DEFAULT_RETRY_BUDGET_RATIO: f64 = 0.2;
/// ...plus 10 retries per second, so that low-traffic destinations can retry at all...
pub const DEFAULT_RETRY_BUDGET_MIN_PER_SECOND: u32 = 10;
/// ...counted over 10 s.
pub const DEFAULT_RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Request bodies kept for replay (linkerd's bound): larger bodies stream and are not retried.
pub const DEFAULT_RETRY_MAX_BODY_BYTES: usize = 64 * 1024;
/// Envoy's base retry interval; the pause is jittered and grows per retry.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Buckets of the budget window: it slides in steps of 1/10 of its length.
const BUDGET_BUCKETS: usize = 10;
/// Fixed-point scale of the budget ratio (parts per million): exact integer arithmetic, so that
/// "20 % of 5 requests" is exactly one retry.
const PPM: u64 = 1_000_000;

/// Retry settings of one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Retries per request at most (0 turns retries off).
    pub max_retries: u32,
    /// Which failures are retried.
    pub on: RetryOn,
    pub budget: BudgetConfig,
    /// Request bodies up to this size (with a known length) are kept for replay; larger or
    /// unknown-length bodies stream through and their requests are not retried.
    pub max_body_bytes: usize,
    /// Base of the jittered exponential pause between attempts.
    pub backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: DEFAULT_MAX_RETRIES,
            on: RetryOn::default(),
            budget: BudgetConfig::default(),
            max_body_bytes: DEFAULT_RETRY_MAX_BODY_BYTES,
            backoff: DEFAULT_RETRY_BACKOFF,
        }
    }
}

impl RetryConfig {
    pub fn disabled() -> Self {
        RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        }
    }
}

/// The retry budget's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per request, as a fraction (0.2 = 20 %).
    pub ratio: f64,
    /// Retries always allowed per second of the window, whatever the request count.
    pub min_per_second: u32,
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: DEFAULT_RETRY_BUDGET_RATIO,
            min_per_second: DEFAULT_RETRY_BUDGET_MIN_PER_SECOND,
            window: DEFAULT_RETRY_BUDGET_WINDOW,
        }
    }
}

/// A set of failure kinds: connect errors, resets (the upstream closed or reset the connection
/// before a response head), timeouts, and response statuses 500-599. The same type says what
/// the breaker counts as a failure and what retries are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureSet {
    pub connect: bool,
    pub reset: bool,
    pub timeout: bool,
    /// Bit `n` is status `500 + n`.
    statuses: u128,
}

/// What retries are for.
pub type RetryOn = FailureSet;

impl FailureSet {
    pub const fn empty() -> Self {
        FailureSet {
            connect: false,
            reset: false,
            timeout: false,
            statuses: 0,
        }
    }

    /// The breaker's default: connect errors, resets, timeouts, and 5xx except 501 (Not
    /// Implemented) and 505 (HTTP Version Not Supported), which say the request was wrong, not
    /// that the upstream is unhealthy.
    pub fn breaker_default() -> Self {
        let mut set = FailureSet {
            connect: true,
            reset: true,
            timeout: true,
            statuses: 0,
        };
        set.add_all_5xx();
        set.statuses &= !(1 << 1 | 1 << 5);
        set
    }

    /// `500..=599`, every one of them.
    pub fn add_all_5xx(&mut self) {
        self.statuses = (1u128 << 100) - 1;
    }

    /// Adds one status; false unless it is in 500..=599.
    pub fn add_status(&mut self, status: u16) -> bool {
        if !(500..=599).contains(&status) {
            return false;
        }
        self.statuses |= 1 << (status - 500);
        true
    }

    pub fn has_status(&self, status: StatusCode) -> bool {
        let s = status.as_u16();
        (500..=599).contains(&s) && self.statuses & (1 << (s - 500)) != 0
    }

    /// The set as configuration text (`connect`, `reset`, `timeout`, `5xx` or single codes).
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for (on, name) in [
            (self.connect, "connect"),
            (self.reset, "reset"),
            (self.timeout, "timeout"),
        ] {
            if on {
                parts.push(name.to_owned());
            }
        }
        if self.statuses == (1u128 << 100) - 1 {
            parts.push("5xx".to_owned());
        } else {
            parts.extend(
                (0..100u16)
                    .filter(|n| self.statuses & (1 << n) != 0)
                    .map(|n| (500 + n).to_string()),
            );
        }
        parts.join(",")
    }
}

impl Default for FailureSet {
    /// Retries' default: connect errors, resets and 503 (the upstream says "not now").
    fn default() -> Self {
        let mut set = FailureSet {
            connect: true,
            reset: true,
            timeout: false,
            statuses: 0,
        };
        set.add_status(503);
        set
    }
}

/// Methods that RFC 9110 9.2.2 defines as idempotent: sending one twice has the effect of once.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    requests: u64,
    retries: u64,
}

/// The retry budget of one destination.
#[derive(Debug)]
pub struct Budget {
    ratio_ppm: u64,
    /// Tokens always available per window, scaled by [`PPM`].
    floor_ppm: u64,
    bucket_nanos: u128,
    created: Instant,
    buckets: Mutex<[Bucket; BUDGET_BUCKETS]>,
}

impl Budget {
    pub fn new(config: &BudgetConfig, now: Instant) -> Self {
        let ratio_ppm = (config.ratio.clamp(0.0, 1000.0) * PPM as f64).round() as u64;
        let window_ms = u64::try_from(config.window.as_millis()).unwrap_or(u64::MAX);
        // min_per_second * window seconds, in PPM: * 1000 (ms -> s scale folded into PPM).
        let floor_ppm = u64::from(config.min_per_second)
            .saturating_mul(window_ms)
            .saturating_mul(PPM / 1000);
        Budget {
            ratio_ppm,
            floor_ppm,
            bucket_nanos: (config.window.as_nanos() / BUDGET_BUCKETS as u128).max(1),
            created: now,
            buckets: Mutex::new([Bucket::default(); BUDGET_BUCKETS]),
        }
    }

    fn current<'a>(
        &self,
        buckets: &'a mut [Bucket; BUDGET_BUCKETS],
        now: Instant,
    ) -> (u64, &'a mut Bucket) {
        let since = now.saturating_duration_since(self.created).as_nanos();
        let epoch = u64::try_from(since / self.bucket_nanos).unwrap_or(u64::MAX);
        let bucket = &mut buckets[(epoch % BUDGET_BUCKETS as u64) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                requests: 0,
                retries: 0,
            };
        }
        (epoch, bucket)
    }

    /// A request started (its first attempt): deposits `ratio` tokens.
    pub fn deposit(&self, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (_, bucket) = self.current(&mut buckets, now);
        bucket.requests += 1;
    }

    /// Takes one token for a retry; false when the budget is spent.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (epoch, _) = self.current(&mut buckets, now);
        let oldest = epoch.saturating_sub(BUDGET_BUCKETS as u64 - 1);
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in buckets
            .iter()
            .filter(|b| b.epoch >= oldest && b.epoch <= epoch)
        {
            requests += b.requests;
            retries += b.retries;
        }
        let allowed = self
            .floor_ppm
            .saturating_add(requests.saturating_mul(self.ratio_ppm));
        if (retries + 1).saturating_mul(PPM) > allowed {
            return false;
        }
        let (_, bucket) = self.current(&mut buckets, now);
        bucket.retries += 1;
        true
    }
}

/// A request body kept in memory so that it can be sent again (with its trailers, if any).
#[derive(Debug, Clone, Default)]
pub struct Replay {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replay {
    pub fn new(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Replay { data, trailers }
    }

    pub fn body(&self) -> ReplayBody {
        ReplayBody {
            data: (!self.data.is_empty()).then(|| self.data.clone()),
            trailers: self.trailers.clone(),
        }
    }
}

/// One sending of a [`Replay`].
#[derive(Debug)]
pub struct ReplayBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

/// What goes upstream: the downstream body streamed through (no copy, no retry), or a replay.
#[derive(Debug)]
pub enum UpstreamBody {
    Streaming(Incoming),
    Replay(ReplayBody),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    // hyper's own error type, so that a failing downstream body is still recognised as such
    // (see `ProxyError::classify`).
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Streaming(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Replay(replay) => {
                if let Some(data) = replay.data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(replay.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streaming(body) => body.is_end_stream(),
            UpstreamBody::Replay(r) => r.data.is_none() && r.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streaming(body) => body.size_hint(),
            UpstreamBody::Replay(r) => {
                SizeHint::with_exact(r.data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The pause before retry number `retry` (1-based): uniformly random in
/// `[0, base * 2^(retry-1)]`, capped at ten times the base ("full jitter": retrying clients do
/// not fall into lockstep).
pub fn backoff(base: Duration, retry: u32) -> Duration {
    if base.is_zero() {
        return Duration::ZERO;
    }
    let ceiling = base
        .saturating_mul(
            1u32.checked_shl(retry.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(base.saturating_mul(10));
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::time::advance;

    fn budget(ratio: f64, min_per_second: u32, window_secs: u64) -> Budget {
        Budget::new(
            &BudgetConfig {
                ratio,
                min_per_second,
                window: Duration::from_secs(window_secs),
            },
            Instant::now(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_the_ratio_of_requests() {
        let b = budget(0.2, 0, 10);
        let mut granted = 0;
        for i in 1..=10 {
            b.deposit(Instant::now());
            if b.try_withdraw(Instant::now()) {
                granted += 1;
                assert!(i == 5 || i == 10, "retry granted after request {i}");
            }
        }
        assert_eq!(granted, 2, "20 % of 10 requests");
        assert!(!b.try_withdraw(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_floor_allows_retries_without_traffic() {
        let b = budget(0.0, 1, 10);
        for _ in 0..10 {
            assert!(b.try_withdraw(Instant::now()));
        }
        assert!(!b.try_withdraw(Instant::now()), "10 s x 1/s spent");
    }

    #[tokio::test(start_paused = true)]
    async fn budget_tokens_expire_with_the_window() {
        let b = budget(0.5, 0, 10);
        for _ in 0..4 {
            b.deposit(Instant::now());
        }
        assert!(b.try_withdraw(Instant::now()));
        assert!(b.try_withdraw(Instant::now()));
        assert!(!b.try_withdraw(Instant::now()));
        advance(Duration::from_secs(11)).await;
        // The old deposits and withdrawals are gone; nothing new was deposited.
        assert!(!b.try_withdraw(Instant::now()));
        b.deposit(Instant::now());
        b.deposit(Instant::now());
        assert!(b.try_withdraw(Instant::now()));
    }

    #[test]
    fn idempotent_methods() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }

    #[test]
    fn failure_sets() {
        let b = FailureSet::breaker_default();
        assert!(b.connect && b.reset && b.timeout);
        for s in [500, 502, 503, 504, 599] {
            assert!(b.has_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [200, 404, 501, 505] {
            assert!(!b.has_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        let r = RetryOn::default();
        assert!(r.has_status(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!r.has_status(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(r.describe(), "connect,reset,503");
        let mut all = FailureSet::empty();
        all.add_all_5xx();
        assert_eq!(all.describe(), "5xx");
        assert!(!all.add_status(404));
    }

    #[tokio::test]
    async fn replay_body_sends_the_same_bytes_and_trailers_each_time() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let replay = Replay::new(Bytes::from_static(b"payload"), Some(trailers));
        for _ in 0..2 {
            let body = UpstreamBody::Replay(replay.body());
            assert_eq!(body.size_hint().exact(), Some(7));
            let collected = body.collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
            assert_eq!(collected.to_bytes(), "payload");
        }
        let empty = UpstreamBody::Replay(Replay::default().body());
        assert!(empty.is_end_stream());
    }

    #[test]
    fn backoff_is_bounded() {
        let base = Duration::from_millis(25);
        for retry in 1..20 {
            let d = backoff(base, retry);
            assert!(d <= base * 10, "retry {retry}: {d:?}");
            let ceiling = base.saturating_mul(1 << (retry - 1).min(20));
            assert!(d <= ceiling, "retry {retry}: {d:?}");
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }
}
