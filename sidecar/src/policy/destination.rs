//! The runtime state of one destination: its policy, circuit breaker and retry budget, and the
//! policy metrics (breaker state and transitions, retries, budget refusals).
use std::sync::{Arc, LazyLock};

use http::StatusCode;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tokio::time::Instant;
use tracing::{info, warn};

use super::breaker::{Breaker, Outcome, Permit, Rejected, State, Transition};
use super::model::DestinationPolicy;
use super::retry::{Budget, FailureSet};
use crate::error::{FailureKind, ProxyError};

/// The policy metric families. One set per process, registered in the default registry, shared
/// by every proxy the process runs (tests start several).
pub(super) struct PolicyMetrics {
    state: IntGaugeVec,
    transitions: IntCounterVec,
    retries: IntCounterVec,
    budget_exhausted: IntCounter,
}

pub(super) static METRICS: LazyLock<PolicyMetrics> = LazyLock::new(|| {
    let registry = prometheus::default_registry();
    // Names and label sets are constants: creating the families cannot fail.
    let state = IntGaugeVec::new(
        Opts::new(
            "sidecar_breaker_state",
            "Circuit breaker state per destination: 0 closed, 1 open, 2 half-open",
        ),
        &["destination"],
    );
    let transitions = IntCounterVec::new(
        Opts::new(
            "sidecar_breaker_transitions_total",
            "Circuit breaker state changes, by the state entered",
        ),
        &["destination", "to"],
    );
    let retries = IntCounterVec::new(
        Opts::new(
            "sidecar_retries_total",
            "Requests sent again after a failed attempt",
        ),
        &["destination"],
    );
    let budget_exhausted = IntCounter::new(
        "sidecar_retry_budget_exhausted_total",
        "Retries not made because the destination's retry budget was spent",
    );
    match (state, transitions, retries, budget_exhausted) {
        (Ok(state), Ok(transitions), Ok(retries), Ok(budget_exhausted)) => {
            for (collector, what) in [
                (
                    Box::new(state.clone()) as Box<dyn prometheus::core::Collector>,
                    "sidecar_breaker_state",
                ),
                (
                    Box::new(transitions.clone()),
                    "sidecar_breaker_transitions_total",
                ),
                (Box::new(retries.clone()), "sidecar_retries_total"),
                (
                    Box::new(budget_exhausted.clone()),
                    "sidecar_retry_budget_exhausted_total",
                ),
            ] {
                crate::metrics::register(registry, collector, what);
            }
            PolicyMetrics {
                state,
                transitions,
                retries,
                budget_exhausted,
            }
        }
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
            unreachable!("policy metric definitions are constant: {e}")
        }
    }
});

/// One destination's metric handles, resolved once.
struct Stats {
    /// `None` for the overflow label: one gauge cannot show the state of many breakers.
    state: Option<IntGauge>,
    to_closed: IntCounter,
    to_open: IntCounter,
    to_half_open: IntCounter,
    retries: IntCounter,
}

impl Stats {
    fn new(label: &str) -> Option<Stats> {
        let m = &*METRICS;
        let to = |state: State| {
            m.transitions
                .get_metric_with_label_values(&[label, state.as_str()])
                .ok()
        };
        let state = (label != crate::metrics::OVERFLOW_DESTINATION)
            .then(|| m.state.get_metric_with_label_values(&[label]).ok())
            .flatten();
        Some(Stats {
            state,
            to_closed: to(State::Closed)?,
            to_open: to(State::Open)?,
            to_half_open: to(State::HalfOpen)?,
            retries: m.retries.get_metric_with_label_values(&[label]).ok()?,
        })
    }
}

/// The runtime state of one destination: its policy, breaker and retry budget.
pub struct Destination {
    name: Arc<str>,
    policy: Arc<DestinationPolicy>,
    breaker: Breaker,
    budget: Budget,
    stats: Option<Stats>,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("breaker", &self.breaker.state(Instant::now()))
            .finish_non_exhaustive()
    }
}

impl Destination {
    pub(super) fn new(name: Arc<str>, policy: Arc<DestinationPolicy>, label: Option<&str>) -> Self {
        let now = Instant::now();
        Destination {
            breaker: Breaker::new(policy.breaker.clone(), now),
            budget: Budget::new(&policy.retry.budget, now),
            stats: label.and_then(Stats::new),
            name,
            policy,
        }
    }

    /// The destination as written in logs (an address, a rule's match, or the target).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn policy(&self) -> &DestinationPolicy {
        &self.policy
    }

    /// True when forgetting this destination loses nothing: its breaker is closed and has
    /// counted nothing.
    pub(super) fn is_pristine(&self) -> bool {
        self.breaker.is_pristine()
    }

    /// Breaker state now.
    pub fn breaker_state(&self) -> State {
        self.breaker.state(Instant::now())
    }

    /// True while the breaker would reject a request: then not even a connection is opened.
    pub fn is_open(&self) -> bool {
        self.breaker.is_open(Instant::now())
    }

    /// Asks the breaker to let one attempt through.
    pub fn admit(&self) -> Result<Permit<'_>, Rejected> {
        self.admit_at(Instant::now())
    }

    /// [`Destination::admit`] at `now`.
    pub fn admit_at(&self, now: Instant) -> Result<Permit<'_>, Rejected> {
        let (permit, transition) = self.breaker.acquire(now);
        if let Some(t) = transition {
            self.transitioned(&t);
        }
        permit
    }

    /// Reports how an attempt went.
    pub fn report(&self, permit: Permit<'_>, outcome: Outcome) {
        if let Some(t) = permit.record(outcome, Instant::now()) {
            self.transitioned(&t);
        }
    }

    /// What an attempt's result means to the breaker.
    pub fn outcome(&self, result: Result<StatusCode, ProxyError>) -> Outcome {
        let failed = match result {
            Ok(status) => self.policy.failure_on.has_status(status),
            // Only the upstream's own failures count: the client's broken body or the proxy's
            // refusal say nothing about the destination's health.
            Err(err) => match err.failure_kind() {
                Some(kind) => kind_in(kind, &self.policy.failure_on),
                None => return Outcome::Ignored,
            },
        };
        if failed {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// True if this attempt's result is one that retries are for.
    pub fn is_retryable(&self, result: Result<StatusCode, ProxyError>) -> bool {
        match result {
            Ok(status) => self.policy.retry.on.has_status(status),
            Err(err) => err
                .failure_kind()
                .is_some_and(|k| kind_in(k, &self.policy.retry.on)),
        }
    }

    /// A request started at `now`: it pays into the retry budget.
    pub fn count_request(&self, now: Instant) {
        if self.policy.retry.max_retries > 0 {
            self.budget.deposit(now);
        }
    }

    /// Takes a retry from the budget (counting it, or the refusal, in the metrics).
    pub fn take_retry(&self) -> bool {
        if self.budget.try_withdraw(Instant::now()) {
            if let Some(s) = &self.stats {
                s.retries.inc();
            }
            true
        } else {
            METRICS.budget_exhausted.inc();
            false
        }
    }

    fn transitioned(&self, t: &Transition) {
        if let Some(s) = &self.stats {
            if let Some(g) = &s.state {
                g.set(t.to.gauge());
            }
            match t.to {
                State::Closed => s.to_closed.inc(),
                State::Open => s.to_open.inc(),
                State::HalfOpen => s.to_half_open.inc(),
            }
        }
        match t.to {
            State::Open => warn!(
                destination = %self.name,
                from = t.from.as_str(),
                open_for = ?t.open_for.unwrap_or_default(),
                reason = t.reason,
                "circuit breaker opened"
            ),
            State::HalfOpen => {
                info!(destination = %self.name, reason = t.reason, "circuit breaker half-open");
            }
            State::Closed => {
                info!(destination = %self.name, reason = t.reason, "circuit breaker closed");
            }
        }
    }
}

/// Whether an error's kind is in `set` (a policy's `failure_on` or `retry.on`).
fn kind_in(kind: FailureKind, set: &FailureSet) -> bool {
    match kind {
        FailureKind::Connect => set.connect,
        FailureKind::Reset => set.reset,
        FailureKind::Timeout => set.timeout,
    }
}
