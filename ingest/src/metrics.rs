//! The agent's own Prometheus metrics (`meterflow_agent_*`) and its health answer: each
//! source's state, the spool's depth and the send lag (issue 3: robustness).

use std::sync::LazyLock;

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric the agent exports.
pub struct AgentMetrics {
    pub registry: Registry,
    /// Batches held by the spool (made, not yet acknowledged).
    pub spool_batches: IntGauge,
    /// Bytes of batches held by the spool.
    pub spool_bytes: IntGauge,
    /// Batches made but not yet stored: the spool cannot write (a full disk).
    pub spool_unstored: IntGauge,
    /// Batches the spool dropped at its size limit.
    pub spool_dropped: IntCounter,
    /// Batches the broker acknowledged.
    pub sent: IntCounter,
    /// Sends that failed (each retried in order later).
    pub send_failures: IntCounter,
    /// Age of the oldest batch not yet acknowledged; 0 when all are.
    pub send_lag_seconds: Gauge,
    /// 1 while a source yields readings, 0 while it fails, by source.
    pub source_up: IntGaugeVec,
    /// Failed reads, by source (each retried at the next tick).
    pub source_errors: IntCounterVec,
    /// Readings no container of the node could be found for (dropped, never billed to an
    /// empty tenant), by source.
    pub unattributed: IntCounterVec,
    /// Pods with a started container whose tenant or lease does not resolve (each warned of
    /// once, with the template field that did not resolve).
    pub unattributed_pods: IntGauge,
    /// Containers whose placeholder alternatives disagreed (e.g. a namespace label and an env
    /// value), by identity field; the first alternative was used.
    pub attribution_conflicts: IntCounterVec,
    /// Board energy no single tenant held the board for between two readings (idle, changing
    /// hands, or split into MIG instances): the operator's, never billed to a tenant.
    pub unheld_energy_joules: Gauge,
}

fn build() -> AgentMetrics {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("static metric");
    let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("static metric");
    let m = AgentMetrics {
        spool_batches: gauge("meterflow_agent_spool_batches", "Batches held by the spool"),
        spool_bytes: gauge(
            "meterflow_agent_spool_bytes",
            "Bytes of batches held by the spool",
        ),
        spool_unstored: gauge(
            "meterflow_agent_spool_unstored_batches",
            "Batches held in memory because the spool cannot write (a full disk)",
        ),
        spool_dropped: counter(
            "meterflow_agent_spool_dropped_total",
            "Batches the spool dropped at its size limit",
        ),
        sent: counter(
            "meterflow_agent_batches_sent_total",
            "Batches the broker acknowledged",
        ),
        send_failures: counter(
            "meterflow_agent_send_failures_total",
            "Sends that failed and will be retried in order",
        ),
        send_lag_seconds: Gauge::new(
            "meterflow_agent_send_lag_seconds",
            "Age of the oldest batch not yet acknowledged (0 when all are)",
        )
        .expect("static metric"),
        source_up: IntGaugeVec::new(
            Opts::new(
                "meterflow_agent_source_up",
                "1 while a source yields readings, 0 while it fails",
            ),
            &["source"],
        )
        .expect("static metric"),
        source_errors: IntCounterVec::new(
            Opts::new(
                "meterflow_agent_source_errors_total",
                "Failed reads by source (each retried at the next tick)",
            ),
            &["source"],
        )
        .expect("static metric"),
        unattributed: IntCounterVec::new(
            Opts::new(
                "meterflow_agent_unattributed_readings_total",
                "Readings no container of the node could be found for, dropped",
            ),
            &["source"],
        )
        .expect("static metric"),
        unattributed_pods: gauge(
            "meterflow_agent_unattributed_pods",
            "Pods with a started container whose tenant or lease does not resolve",
        ),
        attribution_conflicts: IntCounterVec::new(
            Opts::new(
                "meterflow_agent_attribution_conflicts_total",
                "Containers whose placeholder alternatives disagreed, by field (the first was used)",
            ),
            &["field"],
        )
        .expect("static metric"),
        unheld_energy_joules: Gauge::new(
            "meterflow_agent_unheld_energy_joules_total",
            "GPU board energy while no single tenant held the board (the operator's, not billed)",
        )
        .expect("static metric"),
        registry,
    };
    for c in [
        Box::new(m.spool_batches.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(m.spool_bytes.clone()),
        Box::new(m.spool_unstored.clone()),
        Box::new(m.spool_dropped.clone()),
        Box::new(m.sent.clone()),
        Box::new(m.send_failures.clone()),
        Box::new(m.send_lag_seconds.clone()),
        Box::new(m.source_up.clone()),
        Box::new(m.source_errors.clone()),
        Box::new(m.unattributed.clone()),
        Box::new(m.unattributed_pods.clone()),
        Box::new(m.attribution_conflicts.clone()),
        Box::new(m.unheld_energy_joules.clone()),
    ] {
        m.registry.register(c).expect("names are unique");
    }
    meterflow_schemas::process_metrics::register(&m.registry, "agent");
    m
}

/// The agent's metrics (one agent per process).
pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(build);

/// The Prometheus text exposition of [`METRICS`].
pub fn render() -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&METRICS.registry.gather())
        .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
}

/// Each source seen and its state (`up`, `down`, `off`), in the order they reported.
static SOURCES: std::sync::Mutex<Vec<(String, &'static str)>> = std::sync::Mutex::new(Vec::new());

fn set_state(source: &str, state: &'static str) {
    METRICS
        .source_up
        .with_label_values(&[source])
        .set(i64::from(state == "up"));
    let mut sources = SOURCES.lock().unwrap_or_else(|p| p.into_inner());
    match sources.iter_mut().find(|(s, _)| s == source) {
        Some((_, st)) => *st = state,
        None => sources.push((source.to_string(), state)),
    }
}

/// Records whether `source` yields readings now.
pub fn set_source(source: &str, up: bool) {
    set_state(source, if up { "up" } else { "down" });
}

/// Records that `source` cannot run on this node (no NVML library) and is off for good.
pub fn set_source_off(source: &str) {
    set_state(source, "off");
}

/// Why no broker takes the agent's batches or topics now, while none does.
static BROKER_ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Records that the brokers cannot be reached or refuse (`Some(why)`), or answer again.
pub fn set_broker_error(error: Option<String>) {
    *BROKER_ERROR.lock().unwrap_or_else(|p| p.into_inner()) = error;
}

/// Why the spool cannot store batches now (a full disk), while it cannot.
static SPOOL_ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Records that the spool cannot store batches (`Some(why)`) or can again (`None`).
pub fn set_spool_error(error: Option<String>) {
    *SPOOL_ERROR.lock().unwrap_or_else(|p| p.into_inner()) = error;
}

/// Why the spool cannot store batches now, if it cannot.
pub fn spool_error() -> Option<String> {
    SPOOL_ERROR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// The health answer (JSON): each source's state, the spool's depth, its error while it
/// cannot store batches (then `healthy` is false), the send lag, the pods whose readings
/// cannot be attributed, and why no broker takes the batches while none does (the spool holds
/// them meanwhile).
pub fn health() -> String {
    let m = &*METRICS;
    let spool_error = spool_error();
    let sources: Vec<String> = SOURCES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(source, state)| format!("{source:?}: {state:?}"))
        .collect();
    format!(
        "{{\"healthy\": {}, \"sources\": {{{}}}, \"spool_batches\": {}, \"spool_bytes\": {}, \"spool_unstored_batches\": {}, \"spool_dropped\": {}, \"spool_error\": {}, \"send_lag_seconds\": {}, \"unattributed_pods\": {}, \"broker_error\": {}}}\n",
        spool_error.is_none(),
        sources.join(", "),
        m.spool_batches.get(),
        m.spool_bytes.get(),
        m.spool_unstored.get(),
        m.spool_dropped.get(),
        serde_json::Value::from(spool_error),
        m.send_lag_seconds.get(),
        m.unattributed_pods.get(),
        serde_json::Value::from(
            BROKER_ERROR
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        ),
    )
}
