//! The forwarder's metrics, registered once in `prometheus::default_registry()` (which the admin
//! endpoint serves). Label-free: one forwarder per process.
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{Gauge, IntCounter, IntGauge};
use tracing::warn;

pub(crate) struct Metrics {
    pub lines_read: IntCounter,
    pub lines_sent: IntCounter,
    pub lines_retried: IntCounter,
    pub batches_failed: IntCounter,
    pub lines_truncated: IntCounter,
    pub lag_bytes: IntGauge,
    pub last_success: Gauge,
}

impl Metrics {
    pub(crate) fn mark_success(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_success.set(now);
    }

    /// Nothing is behind once the forwarder has stopped reading (the gauge would otherwise keep
    /// its last value in a process that goes on, e.g. the proxy).
    pub(crate) fn flush_lag(&self) {
        self.lag_bytes.set(0);
    }
}

fn counter(name: &str, help: &str) -> IntCounter {
    let c = match IntCounter::new(name, help) {
        Ok(c) => c,
        // Only a malformed name fails, and the names are constants checked by the tests.
        Err(e) => unreachable!("metric {name}: {e}"),
    };
    register(Box::new(c.clone()), name);
    c
}

fn register(metric: Box<dyn prometheus::core::Collector>, name: &str) {
    if let Err(e) = prometheus::default_registry().register(metric) {
        // Someone registered the same name: keep counting, it just is not exported twice.
        warn!(metric = name, error = %e, "metric not registered");
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let lag_bytes = match IntGauge::new(
        "sidecar_logs_lag_bytes",
        "Bytes in the tracked log files not yet acknowledged by the collector",
    ) {
        Ok(g) => g,
        Err(e) => unreachable!("sidecar_logs_lag_bytes: {e}"),
    };
    register(Box::new(lag_bytes.clone()), "sidecar_logs_lag_bytes");
    let last_success = match Gauge::new(
        "sidecar_logs_last_success_timestamp_seconds",
        "Unix time of the last batch the collector acknowledged",
    ) {
        Ok(g) => g,
        Err(e) => unreachable!("sidecar_logs_last_success_timestamp_seconds: {e}"),
    };
    register(
        Box::new(last_success.clone()),
        "sidecar_logs_last_success_timestamp_seconds",
    );
    Metrics {
        lines_read: counter(
            "sidecar_logs_lines_read_total",
            "Log records read from the file into a batch",
        ),
        lines_sent: counter(
            "sidecar_logs_lines_sent_total",
            "Log records acknowledged by the collector",
        ),
        lines_retried: counter(
            "sidecar_logs_lines_retried_total",
            "Log records in batches that had to be sent again",
        ),
        batches_failed: counter(
            "sidecar_logs_batches_failed_total",
            "Batches the collector refused for good (4xx other than 408/429); they are dropped",
        ),
        lines_truncated: counter(
            "sidecar_logs_lines_truncated_total",
            "Log records cut at the line size limit",
        ),
        lag_bytes,
        last_success,
    }
});

pub(crate) fn metrics() -> &'static Metrics {
    &METRICS
}
