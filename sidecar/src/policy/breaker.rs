//! The circuit breaker of one destination: closed / open / half-open.
//!
//! - **Closed**: everything goes through. It trips (opens) on `consecutive_failures` failures in
//!   a row, or, when configured, when the failure rate over a sliding window reaches a threshold
//!   with at least `min_requests` outcomes in that window.
//! - **Open**: nothing goes through (the caller answers 503 at once) for `open_time`, doubled on
//!   each re-trip without a close in between, up to `max_open_time`.
//! - **Half-open**: entered lazily by the first request after the open time; admits up to
//!   `half_open_probes` requests at once. The first probe that succeeds closes the breaker; a probe
//!   that fails opens it again (with backoff).
//!
//! Outcomes of requests admitted before the last state change are ignored (a generation counter),
//! so that slow requests of an earlier period cannot trip or close the breaker by arriving late.
//! The state sits behind one short mutex: each request takes it once to ask and once to report,
//! never across an await. Time is passed in (tokio's `Instant`) so that tests use paused time.
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The seed proxy's breaker: 5 failures in a row open it...
pub const DEFAULT_BREAKER_CONSECUTIVE_FAILURES: u32 = 5;
/// ...for 10 s.
pub const DEFAULT_BREAKER_OPEN_TIME: Duration = Duration::from_secs(10);
/// Repeated trips double the open time up to this (Envoy's default maximum ejection time): a
/// destination that stays down is probed every 5 minutes, not every 10 s.
pub const DEFAULT_BREAKER_MAX_OPEN_TIME: Duration = Duration::from_secs(300);
/// One probe at a time while half-open (Hystrix): the least load on a recovering upstream.
pub const DEFAULT_BREAKER_HALF_OPEN_PROBES: u32 = 1;
/// Failure-rate trigger (off unless a rate is set): Hystrix's rolling window and volume threshold.
pub const DEFAULT_BREAKER_FAILURE_RATE_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_BREAKER_FAILURE_RATE_MIN_REQUESTS: u32 = 20;

/// Number of buckets of the failure-rate window: the window slides in steps of 1/10 of its length.
const RATE_BUCKETS: usize = 10;

/// Breaker settings of one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Trip after this many failures in a row; 0 turns this trigger off.
    pub consecutive_failures: u32,
    /// Trip when this fraction (0 < rate <= 1) of the outcomes in the window are failures;
    /// `None` turns this trigger off.
    pub failure_rate: Option<f64>,
    /// The sliding window the failure rate is computed over.
    pub failure_rate_window: Duration,
    /// Below this many outcomes in the window, the rate is not trusted.
    pub failure_rate_min_requests: u32,
    /// How long the first trip keeps the breaker open.
    pub open_time: Duration,
    /// The ceiling of the doubling on repeated trips.
    pub max_open_time: Duration,
    /// Requests admitted at once while half-open.
    pub half_open_probes: u32,
}

impl BreakerConfig {
    /// True when neither trigger can ever trip the breaker.
    pub fn is_disabled(&self) -> bool {
        self.consecutive_failures == 0 && self.failure_rate.is_none()
    }

    /// A breaker that never opens (inbound traffic, tests).
    pub fn disabled() -> Self {
        BreakerConfig {
            consecutive_failures: 0,
            failure_rate: None,
            ..BreakerConfig::default()
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: DEFAULT_BREAKER_CONSECUTIVE_FAILURES,
            failure_rate: None,
            failure_rate_window: DEFAULT_BREAKER_FAILURE_RATE_WINDOW,
            failure_rate_min_requests: DEFAULT_BREAKER_FAILURE_RATE_MIN_REQUESTS,
            open_time: DEFAULT_BREAKER_OPEN_TIME,
            max_open_time: DEFAULT_BREAKER_MAX_OPEN_TIME,
            half_open_probes: DEFAULT_BREAKER_HALF_OPEN_PROBES,
        }
    }
}

/// The externally visible state (also the `sidecar_breaker_state` gauge value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }

    /// 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

/// What a finished request means to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Says nothing about the upstream (the client went away, the request was refused locally).
    Ignored,
}

/// A state change, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// Set when `to` is `Open`: for how long.
    pub open_for: Option<Duration>,
    /// Why, in words, for the log line.
    pub reason: &'static str,
}

/// The breaker said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub state: State,
    /// When a request may next be admitted (for `Retry-After`); zero while half-open probes run.
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32 },
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which slice of time (in bucket lengths since the breaker was made) the counts belong to.
    epoch: u64,
    successes: u32,
    failures: u32,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    generation: u64,
    consecutive: u32,
    /// Trips since the last close: the backoff exponent.
    trips: u32,
    buckets: [Bucket; RATE_BUCKETS],
}

/// One destination's breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    /// Origin of the rate window's bucket epochs.
    created: Instant,
    inner: Mutex<Inner>,
}

/// Admission of one request; report its outcome with [`Permit::record`]. Dropping it unreported
/// counts as [`Outcome::Ignored`] (a half-open probe slot is given back).
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    generation: u64,
    probe: bool,
    done: bool,
}

impl Breaker {
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        Breaker {
            config,
            created: now,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                generation: 0,
                consecutive: 0,
                trips: 0,
                buckets: [Bucket::default(); RATE_BUCKETS],
            }),
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the state consistent before anything could panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state as of `now` (an expired open period reads as half-open, which is what the next
    /// request will find).
    pub fn state(&self, now: Instant) -> State {
        if self.config.is_disabled() {
            return State::Closed;
        }
        match self.lock().phase {
            Phase::Closed => State::Closed,
            Phase::Open { until } if now < until => State::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// True while open and not yet due for a probe: a request would be rejected.
    pub fn is_open(&self, now: Instant) -> bool {
        self.state(now) == State::Open
    }

    /// True when forgetting this breaker loses nothing: closed, no failures counted, no trips.
    pub fn is_pristine(&self) -> bool {
        let inner = self.lock();
        matches!(inner.phase, Phase::Closed)
            && inner.consecutive == 0
            && inner.trips == 0
            && inner.buckets.iter().all(|b| b.failures == 0)
    }

    /// Asks to send one request. The transition, if any, is the open -> half-open move that this
    /// very request caused.
    pub fn acquire(&self, now: Instant) -> (Result<Permit<'_>, Rejected>, Option<Transition>) {
        if self.config.is_disabled() {
            return (Ok(self.permit(0, false)), None);
        }
        let mut inner = self.lock();
        let mut transition = None;
        if let Phase::Open { until } = inner.phase {
            if now < until {
                let rejected = Rejected {
                    state: State::Open,
                    retry_after: until - now,
                };
                return (Err(rejected), None);
            }
            inner.phase = Phase::HalfOpen { in_flight: 0 };
            inner.generation += 1;
            transition = Some(Transition {
                from: State::Open,
                to: State::HalfOpen,
                open_for: None,
                reason: "open time elapsed; probing",
            });
        }
        let generation = inner.generation;
        let result = match &mut inner.phase {
            Phase::Closed => Ok(self.permit(generation, false)),
            Phase::HalfOpen { in_flight } if *in_flight < self.config.half_open_probes.max(1) => {
                *in_flight += 1;
                Ok(self.permit(generation, true))
            }
            Phase::HalfOpen { .. } | Phase::Open { .. } => Err(Rejected {
                state: State::HalfOpen,
                retry_after: Duration::ZERO,
            }),
        };
        (result, transition)
    }

    fn permit(&self, generation: u64, probe: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            generation,
            probe,
            done: false,
        }
    }

    fn record(
        &self,
        generation: u64,
        probe: bool,
        outcome: Outcome,
        now: Instant,
    ) -> Option<Transition> {
        if self.config.is_disabled() {
            return None;
        }
        let mut inner = self.lock();
        if inner.generation != generation {
            // Admitted before the last state change: says nothing about the current period.
            return None;
        }
        match inner.phase {
            Phase::Closed => {
                match outcome {
                    Outcome::Ignored => return None,
                    Outcome::Success => inner.consecutive = 0,
                    Outcome::Failure => inner.consecutive += 1,
                }
                self.count(&mut inner, outcome == Outcome::Failure, now);
                let by_count = self.config.consecutive_failures > 0
                    && inner.consecutive >= self.config.consecutive_failures;
                if by_count {
                    return Some(self.trip(&mut inner, State::Closed, now, "consecutive failures"));
                }
                if outcome == Outcome::Failure && self.rate_tripped(&inner, now) {
                    return Some(self.trip(&mut inner, State::Closed, now, "failure rate"));
                }
                None
            }
            Phase::HalfOpen { ref mut in_flight } if probe => {
                *in_flight = in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Ignored => None,
                    Outcome::Success => {
                        inner.phase = Phase::Closed;
                        inner.generation += 1;
                        inner.consecutive = 0;
                        inner.trips = 0;
                        inner.buckets = [Bucket::default(); RATE_BUCKETS];
                        Some(Transition {
                            from: State::HalfOpen,
                            to: State::Closed,
                            open_for: None,
                            reason: "probe succeeded",
                        })
                    }
                    Outcome::Failure => {
                        Some(self.trip(&mut inner, State::HalfOpen, now, "probe failed"))
                    }
                }
            }
            Phase::HalfOpen { .. } | Phase::Open { .. } => None,
        }
    }

    fn trip(
        &self,
        inner: &mut Inner,
        from: State,
        now: Instant,
        reason: &'static str,
    ) -> Transition {
        let factor = 1u32.checked_shl(inner.trips).unwrap_or(u32::MAX);
        let open_for = self
            .config
            .open_time
            .saturating_mul(factor)
            .min(self.config.max_open_time.max(self.config.open_time));
        inner.trips = inner.trips.saturating_add(1);
        inner.phase = Phase::Open {
            until: now + open_for,
        };
        inner.generation += 1;
        inner.consecutive = 0;
        inner.buckets = [Bucket::default(); RATE_BUCKETS];
        Transition {
            from,
            to: State::Open,
            open_for: Some(open_for),
            reason,
        }
    }

    /// Bucket length in nanoseconds (at least 1).
    fn bucket_nanos(&self) -> Option<u128> {
        self.config.failure_rate?;
        Some((self.config.failure_rate_window.as_nanos() / RATE_BUCKETS as u128).max(1))
    }

    fn epoch(&self, now: Instant) -> Option<u64> {
        let len = self.bucket_nanos()?;
        let since = now.saturating_duration_since(self.created).as_nanos();
        Some(u64::try_from(since / len).unwrap_or(u64::MAX))
    }

    fn count(&self, inner: &mut Inner, failure: bool, now: Instant) {
        let Some(epoch) = self.epoch(now) else {
            return;
        };
        let bucket = &mut inner.buckets[(epoch % RATE_BUCKETS as u64) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                successes: 0,
                failures: 0,
            };
        }
        if failure {
            bucket.failures = bucket.failures.saturating_add(1);
        } else {
            bucket.successes = bucket.successes.saturating_add(1);
        }
    }

    fn rate_tripped(&self, inner: &Inner, now: Instant) -> bool {
        let (Some(rate), Some(epoch)) = (self.config.failure_rate, self.epoch(now)) else {
            return false;
        };
        let oldest = epoch.saturating_sub(RATE_BUCKETS as u64 - 1);
        let (mut ok, mut failed) = (0u64, 0u64);
        for b in inner
            .buckets
            .iter()
            .filter(|b| b.epoch >= oldest && b.epoch <= epoch)
        {
            ok += u64::from(b.successes);
            failed += u64::from(b.failures);
        }
        let total = ok + failed;
        total > 0
            && total >= u64::from(self.config.failure_rate_min_requests)
            && failed as f64 >= rate * total as f64
    }
}

impl Permit<'_> {
    /// Reports how the request went; returns the state change it caused, if any.
    pub fn record(mut self, outcome: Outcome, now: Instant) -> Option<Transition> {
        self.done = true;
        self.breaker
            .record(self.generation, self.probe, outcome, now)
    }

    /// True if this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done && self.probe {
            // A probe whose request was abandoned must give its slot back, or the breaker would
            // stay half-open with no probe ever finishing.
            self.breaker
                .record(self.generation, true, Outcome::Ignored, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests;
