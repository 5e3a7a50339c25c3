//! The sink's own Prometheus metrics, named `meterflow_sink_<thing>_<unit>`.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric the sink exports, registered in one registry served at `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Usage updates written to the view store.
    pub applied: IntCounter,
    /// Records or messages that could not be used, by reason.
    pub errors: IntCounterVec,
    /// HTTP requests answered, by route and status code.
    pub requests: IntCounterVec,
    /// Latest window end stored, in seconds since the epoch.
    pub watermark_seconds: Gauge,
    /// 1 once the consumer is assigned and reading.
    pub ready: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let applied = IntCounter::new(
            "meterflow_sink_updates_applied_total",
            "Usage updates written to the view store",
        )
        .expect("static metric definition");
        let errors = IntCounterVec::new(
            Opts::new(
                "meterflow_sink_errors_total",
                "Records or messages the sink could not use, by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        let requests = IntCounterVec::new(
            Opts::new(
                "meterflow_sink_http_requests_total",
                "HTTP requests answered, by route and status",
            ),
            &["route", "status"],
        )
        .expect("static metric definition");
        let watermark_seconds = Gauge::new(
            "meterflow_sink_watermark_seconds",
            "Latest usage window end stored, in seconds since the Unix epoch",
        )
        .expect("static metric definition");
        let ready = IntGauge::new(
            "meterflow_sink_ready",
            "1 once the sink is consuming its input topic",
        )
        .expect("static metric definition");
        for c in [
            Box::new(applied.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(requests.clone()),
            Box::new(watermark_seconds.clone()),
            Box::new(ready.clone()),
        ] {
            registry.register(c).expect("names are unique");
        }
        Self {
            registry,
            applied,
            errors,
            requests,
            watermark_seconds,
            ready,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
