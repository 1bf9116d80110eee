//! Shipping: POST each batch until the collector takes it (or refuses it for good), then make its
//! positions durable. Retries use exponential backoff with full jitter and honour `Retry-After`.
use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::checkpoint::{self, Checkpoint, Entry};
use super::metrics::metrics;
use super::record::Sealed;

/// A `Retry-After` longer than this is not believed (a misbehaving collector must not be able to
/// park the forwarder for hours).
pub(crate) const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);
/// How much of a response body is read (and thrown away) so the connection can be reused.
const RESPONSE_BODY_LIMIT: usize = 64 * 1024;

/// What one POST came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// 2xx.
    Accepted,
    /// Worth another try: connection error, timeout, 5xx, 408, 429.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Any other status: this batch will never be taken.
    Rejected { status: u16 },
}

/// Classifies a response status (and its `Retry-After`, seconds form).
pub(crate) fn classify(status: StatusCode, retry_after: Option<&str>) -> Outcome {
    if status.is_success() {
        return Outcome::Accepted;
    }
    let retryable = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    if retryable {
        Outcome::Retry {
            reason: format!("HTTP {}", status.as_u16()),
            retry_after: retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(RETRY_AFTER_CAP)),
        }
    } else {
        Outcome::Rejected {
            status: status.as_u16(),
        }
    }
}

/// Sends one body. A trait so the retry loop can be tested against a scripted collector with
/// paused time.
pub(crate) trait Transport: Send + Sync + 'static {
    fn post(&self, body: Bytes) -> impl Future<Output = Outcome> + Send;
}

/// The real collector: hyper-util's pooled client over plain TCP.
pub(crate) struct HttpTransport {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    gzip: bool,
    timeout: Duration,
}

impl HttpTransport {
    pub(crate) fn new(uri: Uri, gzip: bool, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            // Shorter than common server keep-alive timeouts, so we rarely reuse a connection the
            // collector is closing.
            .pool_idle_timeout(Duration::from_secs(15))
            .build(connector);
        HttpTransport {
            client,
            uri,
            gzip,
            timeout,
        }
    }
}

impl Transport for HttpTransport {
    async fn post(&self, body: Bytes) -> Outcome {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("sidecar-logs/", env!("CARGO_PKG_VERSION")),
            );
        if self.gzip {
            req = req.header(CONTENT_ENCODING, "gzip");
        }
        let req = match req.body(Full::new(body)) {
            Ok(r) => r,
            // The URI was validated at start-up; treat the impossible as a permanent refusal.
            Err(e) => {
                error!(error = %e, "cannot build the request");
                return Outcome::Rejected { status: 0 };
            }
        };
        let response = match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => {
                return Outcome::Retry {
                    reason: format!("no response within {:?}", self.timeout),
                    retry_after: None,
                }
            }
            Ok(Err(e)) => {
                return Outcome::Retry {
                    reason: error_chain(&e),
                    retry_after: None,
                }
            }
            Ok(Ok(r)) => r,
        };
        let (parts, body) = response.into_parts();
        let retry_after = parts
            .headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Drain (bounded, timed) so the pooled connection can be reused; its content is unused.
        let _ = tokio::time::timeout(
            self.timeout,
            Limited::new(body, RESPONSE_BODY_LIMIT).collect(),
        )
        .await;
        classify(parts.status, retry_after.as_deref())
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Exponential backoff with full jitter (AWS architecture blog): attempt n waits a uniformly
/// random time in [0, min(max, initial * 2^n)], which spreads a fleet of sidecars out after a
/// collector outage instead of having them retry in lockstep.
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        // RandomState is randomly keyed per process: a seed without a rand crate.
        let mut h = RandomState::new().build_hasher();
        h.write_u64(u64::from(std::process::id()));
        Self::with_seed(initial, max, h.finish())
    }

    pub(crate) fn with_seed(initial: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            initial,
            max,
            rng: seed | 1,
        }
    }

    /// The ceiling for attempt `n` (0-based).
    pub(crate) fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    pub(crate) fn delay(&mut self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        // xorshift64*: plenty for jitter.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(unit)
    }
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivery {
    Acked {
        attempts: u32,
    },
    Rejected {
        status: u16,
    },
    /// The shutdown deadline came first: not acknowledged, will be resent on the next start.
    Abandoned,
}

/// Sends one batch until it is taken, refused, or `hard_stop` fires.
pub(crate) async fn deliver<T: Transport>(
    transport: &T,
    backoff: &mut Backoff,
    batch: &Sealed,
    hard_stop: &CancellationToken,
) -> Delivery {
    let m = metrics();
    let mut attempt: u32 = 0;
    loop {
        let outcome = tokio::select! {
            biased;
            () = hard_stop.cancelled() => return Delivery::Abandoned,
            o = transport.post(batch.body.clone()) => o,
        };
        match outcome {
            Outcome::Accepted => {
                return Delivery::Acked {
                    attempts: attempt + 1,
                }
            }
            Outcome::Rejected { status } => return Delivery::Rejected { status },
            Outcome::Retry {
                reason,
                retry_after,
            } => {
                m.lines_retried.inc_by(batch.lines);
                let delay = retry_after.unwrap_or_else(|| backoff.delay(attempt));
                // Every attempt at first, then only every 10th: an outage of hours should not
                // fill the sidecar's own log.
                if attempt < 5 || attempt % 10 == 0 {
                    warn!(attempt = attempt + 1, lines = batch.lines, %reason, ?delay, "the collector did not take the batch; will retry");
                }
                tokio::select! {
                    biased;
                    () = hard_stop.cancelled() => return Delivery::Abandoned,
                    () = tokio::time::sleep(delay) => {}
                }
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// The shipping task: takes sealed batches in order, delivers each, records positions.
pub(crate) struct Shipper<T: Transport> {
    pub transport: T,
    pub backoff: Backoff,
    pub checkpoint: PathBuf,
    pub source: PathBuf,
    /// The latest acknowledged positions (for the lag gauge).
    pub acked: Arc<Mutex<Vec<Entry>>>,
    pub hard_stop: CancellationToken,
}

impl<T: Transport> Shipper<T> {
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Sealed>) -> anyhow::Result<()> {
        let m = metrics();
        loop {
            let batch = tokio::select! {
                biased;
                b = rx.recv() => match b {
                    Some(b) => b,
                    None => return Ok(()),
                },
                () = self.hard_stop.cancelled() => return Ok(()),
            };
            match deliver(&self.transport, &mut self.backoff, &batch, &self.hard_stop).await {
                Delivery::Acked { attempts } => {
                    m.lines_sent.inc_by(batch.lines);
                    m.mark_success();
                    debug!(lines = batch.lines, attempts, "batch acknowledged");
                }
                Delivery::Rejected { status } => {
                    m.batches_failed.inc();
                    error!(
                        status,
                        lines = batch.lines,
                        "the collector refused the batch for good; DROPPING it so it cannot block \
                         the lines after it (check the collector's logs and the endpoint URL)"
                    );
                }
                Delivery::Abandoned => {
                    rx.close();
                    let mut left = batch.lines;
                    while let Ok(b) = rx.try_recv() {
                        left += b.lines;
                    }
                    warn!(
                        lines = left,
                        "shutdown deadline reached before the collector acknowledged these lines; \
                         they will be sent again on the next start"
                    );
                    return Ok(());
                }
            }
            self.commit(batch.positions).await;
        }
    }

    /// Makes the positions durable. A failure is logged and shipping goes on: the older
    /// checkpoint on disk only means more lines resent after a restart, never fewer.
    async fn commit(&self, positions: Vec<Entry>) {
        *self.acked.lock().unwrap_or_else(|e| e.into_inner()) = positions.clone();
        let path = self.checkpoint.clone();
        let c = Checkpoint::new(self.source.clone(), positions);
        let stored = tokio::task::spawn_blocking(move || checkpoint::store(&path, &c)).await;
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(checkpoint = %self.checkpoint.display(), error = %e, "cannot write the checkpoint; a restart will resend more lines than needed");
            }
            Err(e) => error!(error = %e, "checkpoint task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use tokio::time::Instant;

    /// A collector that answers from a script, and records when it was asked.
    struct Scripted {
        answers: Mutex<VecDeque<Outcome>>,
        calls: Mutex<Vec<Instant>>,
    }

    impl Scripted {
        fn new(answers: Vec<Outcome>) -> Self {
            Scripted {
                answers: Mutex::new(answers.into()),
                calls: Mutex::new(Vec::new()),
            }
        }
        fn calls(&self) -> Vec<Instant> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    impl Transport for Arc<Scripted> {
        async fn post(&self, _body: Bytes) -> Outcome {
            if let Ok(mut c) = self.calls.lock() {
                c.push(Instant::now());
            }
            self.answers
                .lock()
                .ok()
                .and_then(|mut a| a.pop_front())
                .unwrap_or(Outcome::Accepted)
        }
    }

    fn retry() -> Outcome {
        Outcome::Retry {
            reason: "test".into(),
            retry_after: None,
        }
    }

    fn batch() -> Sealed {
        Sealed {
            body: Bytes::from_static(b"{}"),
            lines: 3,
            positions: Vec::new(),
        }
    }

    #[test]
    fn statuses_are_classified_like_the_docs_say() {
        assert_eq!(classify(StatusCode::OK, None), Outcome::Accepted);
        assert_eq!(classify(StatusCode::NO_CONTENT, None), Outcome::Accepted);
        for s in [500, 502, 503, 504, 408, 429] {
            let s = StatusCode::from_u16(s).unwrap_or(StatusCode::OK);
            assert!(matches!(classify(s, None), Outcome::Retry { .. }), "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422, 301] {
            let s = StatusCode::from_u16(s).unwrap_or(StatusCode::OK);
            assert_eq!(classify(s, None), Outcome::Rejected { status: s.as_u16() });
        }
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, Some(" 7 ")),
            Outcome::Retry {
                reason: "HTTP 429".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE, Some("999999")),
            Outcome::Retry {
                reason: "HTTP 503".into(),
                retry_after: Some(RETRY_AFTER_CAP)
            }
        );
        // The HTTP-date form is not understood: plain backoff applies.
        assert!(matches!(
            classify(
                StatusCode::SERVICE_UNAVAILABLE,
                Some("Wed, 21 Oct 2015 07:28:00 GMT")
            ),
            Outcome::Retry {
                retry_after: None,
                ..
            }
        ));
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_capped_ceiling() {
        let mut b = Backoff::with_seed(Duration::from_millis(100), Duration::from_secs(30), 42);
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(9), Duration::from_secs(30));
        assert_eq!(b.ceiling(1000), Duration::from_secs(30));
        let mut seen_low = false;
        let mut seen_high = false;
        for attempt in 0..2000 {
            let n = attempt % 12;
            let d = b.delay(n);
            assert!(d <= b.ceiling(n), "{d:?} > {:?}", b.ceiling(n));
            if n == 11 {
                seen_low |= d < Duration::from_secs(5);
                seen_high |= d > Duration::from_secs(25);
            }
        }
        assert!(seen_low && seen_high, "delays spread over the whole range");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_until_accepted() {
        let _turn = crate::logs::tests::METRICS_LOCK.lock().await;
        let t = Arc::new(Scripted::new(vec![retry(), retry(), retry(), retry()]));
        let mut b = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(30), 7);
        let mut expected = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(30), 7);
        let start = Instant::now();
        let d = deliver(&t, &mut b, &batch(), &CancellationToken::new()).await;
        assert_eq!(d, Delivery::Acked { attempts: 5 });
        let calls = t.calls();
        assert_eq!(calls.len(), 5);
        // Each pause is the jittered delay for that attempt (tokio's timer rounds up to the
        // millisecond).
        assert_eq!(calls[0], start);
        for n in 1..calls.len() {
            let pause = calls[n] - calls[n - 1];
            let want = expected.delay(n as u32 - 1);
            assert!(
                pause >= want && pause <= want + Duration::from_millis(1),
                "attempt {n}: paused {pause:?}, expected {want:?}"
            );
            assert!(want <= expected.ceiling(n as u32 - 1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let _turn = crate::logs::tests::METRICS_LOCK.lock().await;
        let t = Arc::new(Scripted::new(vec![Outcome::Retry {
            reason: "429".into(),
            retry_after: Some(Duration::from_secs(12)),
        }]));
        let mut b = Backoff::with_seed(Duration::from_millis(1), Duration::from_millis(2), 7);
        let start = Instant::now();
        let d = deliver(&t, &mut b, &batch(), &CancellationToken::new()).await;
        assert_eq!(d, Delivery::Acked { attempts: 2 });
        assert_eq!(t.calls()[1] - start, Duration::from_secs(12));
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_are_not_retried() {
        let _turn = crate::logs::tests::METRICS_LOCK.lock().await;
        let t = Arc::new(Scripted::new(vec![Outcome::Rejected { status: 400 }]));
        let mut b = Backoff::with_seed(Duration::from_millis(1), Duration::from_millis(2), 7);
        let d = deliver(&t, &mut b, &batch(), &CancellationToken::new()).await;
        assert_eq!(d, Delivery::Rejected { status: 400 });
        assert_eq!(t.calls().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_shutdown_deadline_abandons_an_endless_retry() {
        let _turn = crate::logs::tests::METRICS_LOCK.lock().await;
        let t = Arc::new(Scripted::new(vec![retry(); 10_000]));
        let mut b = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(30), 7);
        let stop = CancellationToken::new();
        let stopper = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(100)).await;
                stop.cancel();
            })
        };
        let start = Instant::now();
        let d = deliver(&t, &mut b, &batch(), &stop).await;
        assert_eq!(d, Delivery::Abandoned);
        assert_eq!(Instant::now() - start, Duration::from_secs(100));
        let _ = stopper.await;
    }
}
