//! One request under its destination's policies: the retry loop, the circuit breaker's
//! accounting and the request timeout. The proxy hands over a request head, its body and a way to
//! make one attempt ([`exchange`]); what it gets back is a response head to relay, or a
//! [`Failed`] to answer locally ([`answer`]).
//!
//! Step by step: ask the breaker (open: 503 at once, nothing sent); keep the body for replay if
//! the request may be sent again (retries on, body empty or known to be small); send; report the
//! outcome to the breaker (only upstream failures count, see [`ProxyError::failure_kind`]); on a
//! failure in `retry.on` (connect error, reset, 503 by default), send again while attempts, the
//! deadline and the budget allow, after a jittered pause. Idempotent requests are retried on any
//! such failure; others only when the error says the request never reached the upstream
//! ([`ProxyError::retry_safe`]: a failed connect). Nothing is retried once a response is being
//! relayed: the decision is made on the response head, before any byte goes downstream.
use std::borrow::Cow;
use std::future::Future;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::breaker::{Rejected, State};
use super::destination::Destination;
use super::headers::{X_REQUEST_ID, X_SIDECAR_ATTEMPT};
use super::retry::{backoff, is_idempotent, Replay, UpstreamBody};
use crate::error::{local_response, Failed, ProxyError};

impl From<Rejected> for Failed {
    fn from(r: Rejected) -> Self {
        Failed {
            err: ProxyError::UpstreamBreakerOpen,
            detail: Cow::Borrowed(match r.state {
                State::HalfOpen => "circuit breaker half-open, probe in flight",
                _ => "circuit breaker open",
            }),
            retry_after: Some(r.retry_after),
        }
    }
}

/// The local answer for a request that failed at `dest`, logged, with the request id (and, for
/// an open breaker, `Retry-After`).
pub fn answer(f: Failed, dest: &Destination, request_id: &HeaderValue) -> Response<Full<Bytes>> {
    if f.err == ProxyError::UpstreamBreakerOpen {
        // The state change was logged when it happened; one line per refused request would
        // flood the log exactly when it matters.
        debug!(destination = dest.name(), reason = %f.detail, "request refused");
    } else {
        warn!(
            destination = dest.name(),
            error = %f.detail,
            code = f.err.code(),
            status = f.err.status().as_u16(),
            "request failed"
        );
    }
    let mut resp = local_response(f.err);
    let headers = resp.headers_mut();
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    if let Some(after) = f.retry_after {
        // Whole seconds, rounded up, at least 1 (RFC 9110 10.2.3).
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

/// A request body, ready to be sent once or several times.
enum Prepared {
    Stream(Incoming),
    Replay(Replay),
}

/// Keeps the body in memory if it is empty or has a known length within `max`; else leaves it
/// streaming (the request will not be retried).
async fn prepare_replay(
    body: Incoming,
    headers: &HeaderMap,
    max: usize,
    deadline: Instant,
) -> Result<Prepared, Failed> {
    if body.is_end_stream() {
        return Ok(Prepared::Replay(Replay::default()));
    }
    let length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match length {
        Some(n) if n <= max as u64 => {}
        _ => return Ok(Prepared::Stream(body)),
    }
    match tokio::time::timeout_at(deadline, Limited::new(body, max).collect()).await {
        Ok(Ok(collected)) => {
            let trailers = collected.trailers().cloned();
            Ok(Prepared::Replay(Replay::new(
                collected.to_bytes(),
                trailers,
            )))
        }
        Ok(Err(e)) => Err(Failed::new(
            ProxyError::DownstreamBody,
            format!("reading the request body: {e}"),
        )),
        Err(_) => Err(Failed::new(
            ProxyError::DownstreamTimeout,
            "the request body did not arrive within the request timeout",
        )),
    }
}

/// A copy of a request head (extensions are not copied: nothing upstream reads them).
fn clone_head(head: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    req.into_parts().0
}

/// What an attempt's result was, for the breaker and the retry decision.
fn summary<B>(result: &Result<Response<B>, Failed>) -> Result<StatusCode, ProxyError> {
    match result {
        Ok(resp) => Ok(resp.status()),
        Err(f) => Err(f.err),
    }
}

async fn attempt<B, S, F>(
    send: &mut S,
    req: Request<UpstreamBody>,
    deadline: Instant,
) -> Result<Response<B>, Failed>
where
    S: FnMut(Request<UpstreamBody>) -> F,
    F: Future<Output = Result<Response<B>, Failed>>,
{
    match tokio::time::timeout_at(deadline, send(req)).await {
        Ok(result) => result,
        Err(_) => Err(Failed::timeout()),
    }
}

/// True if a request that got `outcome` may be sent again: the failure is one retries are for,
/// and sending twice is harmless (an idempotent method, or the first one never arrived).
fn may_resend(
    dest: &Destination,
    idempotent: bool,
    outcome: Result<StatusCode, ProxyError>,
) -> bool {
    dest.is_retryable(outcome) && (idempotent || outcome.is_err_and(ProxyError::retry_safe))
}

/// Sends one request to `dest` under its policies (see the module documentation); `send` makes
/// one attempt.
pub async fn exchange<B, S, F>(
    dest: &Destination,
    head: Parts,
    body: Incoming,
    send: S,
) -> Result<Response<B>, Failed>
where
    S: FnMut(Request<UpstreamBody>) -> F,
    F: Future<Output = Result<Response<B>, Failed>>,
{
    exchange_with(dest, head, Prepared::Stream(body), send).await
}

/// [`exchange`] of a body the proxy made itself (a transcoded gRPC message): already in
/// memory, so it can always be sent again.
pub async fn exchange_buffered<B, S, F>(
    dest: &Destination,
    head: Parts,
    body: Replay,
    send: S,
) -> Result<Response<B>, Failed>
where
    S: FnMut(Request<UpstreamBody>) -> F,
    F: Future<Output = Result<Response<B>, Failed>>,
{
    exchange_with(dest, head, Prepared::Replay(body), send).await
}

async fn exchange_with<B, S, F>(
    dest: &Destination,
    head: Parts,
    body: Prepared,
    mut send: S,
) -> Result<Response<B>, Failed>
where
    S: FnMut(Request<UpstreamBody>) -> F,
    F: Future<Output = Result<Response<B>, Failed>>,
{
    let idempotent = is_idempotent(&head.method);
    let now = Instant::now();
    let deadline = now + dest.policy().request_timeout;
    let mut retrying = Retrying::begin(dest, idempotent, now)?;
    let prepared = match body {
        // A failure here is the client's: the permit is dropped unreported (ignored).
        Prepared::Stream(body) if retrying.may_replay() => {
            let max = dest.policy().retry.max_body_bytes;
            prepare_replay(body, &head.headers, max, deadline).await?
        }
        prepared => prepared,
    };
    let replay = match prepared {
        Prepared::Stream(body) => {
            let req = Request::from_parts(head, UpstreamBody::Streaming(body));
            let result = attempt(&mut send, req, deadline).await;
            retrying.last(summary(&result));
            return result;
        }
        Prepared::Replay(replay) => replay,
    };
    loop {
        let mut parts = clone_head(&head);
        if retrying.number() > 1 {
            parts.headers.insert(
                X_SIDECAR_ATTEMPT.clone(),
                HeaderValue::from(retrying.number()),
            );
        }
        let req = Request::from_parts(parts, UpstreamBody::Replay(replay.body()));
        let result = attempt(&mut send, req, deadline).await;
        if !retrying.again(summary(&result), deadline).await {
            return result;
        }
    }
}

/// One request's attempts under its destination's policies, for callers that make the
/// attempts themselves (both HTTP/1 engines): the breaker's permit and accounting, the retry
/// decision, the pause and the budget.
///
/// ```text
/// let mut r = Retrying::begin(dest, idempotent, now)?;   // breaker open: Err, nothing sent
/// loop {
///     let result = /* attempt r.number() */;
///     if !r.again(outcome(&result), deadline).await { return result; }
/// }
/// ```
pub struct Retrying<'a> {
    dest: &'a Destination,
    permit: Option<super::breaker::Permit<'a>>,
    idempotent: bool,
    number: u32,
}

impl<'a> Retrying<'a> {
    /// Asks the breaker for the first attempt (open: the answer to give, nothing to send).
    /// `now` is when the request started (the caller has it: one clock read fewer).
    pub fn begin(dest: &'a Destination, idempotent: bool, now: Instant) -> Result<Self, Failed> {
        let permit = dest.admit_at(now)?;
        // Only requests that are sent pay into the retry budget: an outage refused by the
        // breaker must not save up retries for the moment it ends.
        dest.count_request(now);
        Ok(Retrying {
            dest,
            permit: Some(permit),
            idempotent,
            number: 1,
        })
    }

    /// Whether a request may be sent more than once (retries on): then its body is worth
    /// keeping for a replay, if small.
    pub fn may_replay(&self) -> bool {
        self.dest.policy().retry.max_retries > 0
    }

    /// The attempt about to be made: 1, 2, ...
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Reports the outcome of an attempt that cannot be repeated (its body was streamed).
    pub fn last(mut self, outcome: Result<StatusCode, ProxyError>) {
        if let Some(permit) = self.permit.take() {
            self.dest.report(permit, self.dest.outcome(outcome));
        }
    }

    /// Reports the outcome of the attempt just made; true (after the pause, with a new permit)
    /// if another attempt is to be made, false if this outcome is the answer.
    pub async fn again(
        &mut self,
        outcome: Result<StatusCode, ProxyError>,
        deadline: Instant,
    ) -> bool {
        let dest = self.dest;
        if let Some(permit) = self.permit.take() {
            dest.report(permit, dest.outcome(outcome));
        }
        let retry = &dest.policy().retry;
        if self.number > retry.max_retries || !may_resend(dest, self.idempotent, outcome) {
            return false;
        }
        let pause = backoff(retry.backoff, self.number);
        if Instant::now() + pause >= deadline {
            return false;
        }
        if !dest.take_retry() {
            debug!(
                destination = dest.name(),
                "retry budget exhausted; not retrying"
            );
            return false;
        }
        tokio::time::sleep(pause).await;
        match dest.admit() {
            Ok(p) => self.permit = Some(p),
            // This very failure may have opened the breaker: answer with what we got.
            Err(_) => return false,
        }
        let cause = match outcome {
            Ok(status) => Cow::Owned(status.as_u16().to_string()),
            Err(e) => Cow::Borrowed(e.code()),
        };
        self.number += 1;
        debug!(destination = dest.name(), attempt = self.number, %cause, "retrying");
        true
    }
}
