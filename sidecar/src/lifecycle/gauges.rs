//! Readiness as metrics: `sidecar_ready` (what `/ready` answers, 1 or 0) and
//! `sidecar_ready_condition{condition}` (each checked condition, 1 while it holds), read from the
//! latches at scrape time, so that alerts can say which condition failed (interception not
//! registered, app down, overloaded, draining) without parsing `/ready`'s body.
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, IntGaugeVec, Opts};

use super::Readiness;

pub struct ReadinessCollector {
    readiness: Arc<Readiness>,
    ready: IntGauge,
    conditions: IntGaugeVec,
    descs: Vec<Desc>,
}

impl ReadinessCollector {
    pub fn new(readiness: Arc<Readiness>) -> ReadinessCollector {
        // Constant, valid definitions: creating them cannot fail.
        let ready = IntGauge::new("sidecar_ready", "1 when /ready answers 200, else 0")
            .unwrap_or_else(|e| unreachable!("{e}"));
        let conditions = IntGaugeVec::new(
            Opts::new(
                "sidecar_ready_condition",
                "Readiness conditions: 1 while the condition holds (draining: 1 while not draining)",
            ),
            &["condition"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let descs = ready
            .desc()
            .into_iter()
            .chain(conditions.desc())
            .cloned()
            .collect();
        ReadinessCollector {
            readiness,
            ready,
            conditions,
            descs,
        }
    }
}

impl Collector for ReadinessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.ready.set(i64::from(self.readiness.check().is_ok()));
        for (name, holds) in self.readiness.conditions() {
            self.conditions
                .with_label_values(&[name])
                .set(i64::from(holds));
        }
        let mut families = self.ready.collect();
        families.extend(self.conditions.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_follow_the_latches() {
        let readiness = Arc::new(Readiness::new(true, false));
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(ReadinessCollector::new(Arc::clone(&readiness))))
            .unwrap();
        let text = crate::metrics::render(&registry);
        assert!(text.contains("sidecar_ready 0"), "{text}");
        assert!(
            text.contains("sidecar_ready_condition{condition=\"listeners\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("condition=\"app\""),
            "app is not checked: {text}"
        );
        readiness.set_listening();
        readiness.set_interception(Ok(()));
        let text = crate::metrics::render(&registry);
        assert!(text.contains("sidecar_ready 1"), "{text}");
        assert!(
            text.contains("sidecar_ready_condition{condition=\"interception\"} 1"),
            "{text}"
        );
        readiness.set_interception(Err("gone".into()));
        let text = crate::metrics::render(&registry);
        assert!(text.contains("sidecar_ready 0"), "{text}");
        assert!(
            text.contains("sidecar_ready_condition{condition=\"interception\"} 0"),
            "{text}"
        );
    }
}
