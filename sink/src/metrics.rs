//! The sink's own Prometheus metrics, named `meterflow_sink_<thing>_<unit>`.

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every metric the sink exports, registered in one registry served at `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Records written to the view store, by topic.
    pub applied: IntCounterVec,
    /// Records or messages that could not be used, by reason.
    pub errors: IntCounterVec,
    /// HTTP requests answered, by route and status code.
    pub requests: IntCounterVec,
    /// Latest window end stored, in seconds since the epoch.
    pub watermark_seconds: Gauge,
    /// 1 once the consumer is assigned and reading.
    pub ready: IntGauge,
    /// Time to answer, by route (the route's template, not the path asked for).
    pub request_seconds: HistogramVec,
    /// Time to write one batch of consumed updates to the store.
    pub apply_seconds: Histogram,
    /// Updates per store write.
    pub apply_batch_records: Histogram,
    /// Requests refused with 429, by limit (`requests`, `series`).
    pub limited: IntCounterVec,
    /// Server-Sent Events feeds open, by kind (`tenant`, `lease`).
    pub feeds_open: IntGaugeVec,
    /// Events sent on feeds, by kind.
    pub feed_events: IntCounterVec,
    /// Records on the usage topic not yet stored (-1 until measured).
    pub consumer_lag: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        meterflow_schemas::process_metrics::register(&registry, "sink");
        let applied = IntCounterVec::new(
            Opts::new(
                "meterflow_sink_updates_applied_total",
                "Records written to the view store, by topic (usage updates, billing records)",
            ),
            &["topic"],
        )
        .expect("static metric definition");
        // Both topics from the start, at 0: a dashboard finds the series before any record.
        for topic in [
            meterflow_schemas::topics::USAGE,
            meterflow_schemas::topics::BILLING,
        ] {
            applied.with_label_values(&[topic]);
        }
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
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "meterflow_sink_http_request_duration_seconds",
                "Time to answer an HTTP request, by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["route"],
        )
        .expect("static metric definition");
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "meterflow_sink_apply_duration_seconds",
                "Time to write one batch of consumed updates to the view store",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14).expect("static buckets")),
        )
        .expect("static metric definition");
        let apply_batch_records = Histogram::with_opts(
            HistogramOpts::new(
                "meterflow_sink_apply_batch_records",
                "Records per view-store write",
            )
            .buckets(vec![1.0, 10.0, 100.0, 500.0, 1000.0]),
        )
        .expect("static metric definition");
        let limited = IntCounterVec::new(
            Opts::new(
                "meterflow_sink_limited_total",
                "Requests refused with 429, by limit (requests, series)",
            ),
            &["limit"],
        )
        .expect("static metric definition");
        let feeds_open = IntGaugeVec::new(
            Opts::new(
                "meterflow_sink_feeds_open",
                "Server-Sent Events feeds open, by kind (tenant, lease)",
            ),
            &["kind"],
        )
        .expect("static metric definition");
        let feed_events = IntCounterVec::new(
            Opts::new(
                "meterflow_sink_feed_events_total",
                "Events sent on Server-Sent Events feeds, by kind",
            ),
            &["kind"],
        )
        .expect("static metric definition");
        let consumer_lag = IntGauge::new(
            "meterflow_sink_consumer_lag_records",
            "Records on meterflow.usage not yet stored (-1 until measured)",
        )
        .expect("static metric definition");
        consumer_lag.set(-1);
        for c in [
            Box::new(applied.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(requests.clone()),
            Box::new(watermark_seconds.clone()),
            Box::new(ready.clone()),
            Box::new(request_seconds.clone()),
            Box::new(apply_seconds.clone()),
            Box::new(apply_batch_records.clone()),
            Box::new(limited.clone()),
            Box::new(feeds_open.clone()),
            Box::new(feed_events.clone()),
            Box::new(consumer_lag.clone()),
        ] {
            registry.register(c).expect("names are unique");
        }
        // Every label value known in advance is exported from the start, at zero, so that
        // dashboards and alerts see the series before the first event.
        errors.with_label_values(&["kafka"]);
        for limit in ["requests", "series"] {
            limited.with_label_values(&[limit]);
        }
        for kind in ["tenant", "lease"] {
            feeds_open.with_label_values(&[kind]);
            feed_events.with_label_values(&[kind]);
        }
        Self {
            registry,
            applied,
            errors,
            requests,
            watermark_seconds,
            ready,
            request_seconds,
            apply_seconds,
            apply_batch_records,
            limited,
            feeds_open,
            feed_events,
            consumer_lag,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
