//! The processor's own counters, in the Prometheus text format (`meterflow processor
//! --metrics-listen ADDR` serves them at `/metrics`).
//!
//! One registry per process: the workers of a process add to the same counters.

use std::sync::LazyLock;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

/// The processor's counters.
pub struct Metrics {
    pub registry: Registry,
    /// Input sent to `meterflow.deadletter`, by reason.
    pub dead_letters: IntCounterVec,
    /// Messages read from the samples topic (batches, duplicates and undecodable alike).
    pub input_messages: IntCounter,
    /// Sample batches fed to the dataflow (duplicates not counted).
    pub batches: IntCounter,
    /// Batches dropped as a repeat of an (agent, sequence) already seen.
    pub duplicates: IntCounter,
    /// Billing records sent.
    pub billing_records: IntCounter,
    /// Budget alerts raised.
    pub alerts: IntCounter,
    /// Checkpoints written.
    pub checkpoints: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("a valid counter");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

/// The process's counters.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let dead_letters = IntCounterVec::new(
        Opts::new(
            "meterflow_processor_dead_letters_total",
            "Input sent to meterflow.deadletter, by reason",
        ),
        &["reason"],
    )
    .expect("a valid counter");
    registry
        .register(Box::new(dead_letters.clone()))
        .expect("registered once");
    Metrics {
        input_messages: counter(
            &registry,
            "meterflow_processor_input_messages_total",
            "Messages read from meterflow.samples",
        ),
        batches: counter(
            &registry,
            "meterflow_processor_batches_total",
            "Sample batches fed to the dataflow",
        ),
        duplicates: counter(
            &registry,
            "meterflow_processor_duplicate_batches_total",
            "Batches dropped as a repeat of an (agent, sequence) already seen",
        ),
        billing_records: counter(
            &registry,
            "meterflow_processor_billing_records_total",
            "Billing records sent",
        ),
        alerts: counter(
            &registry,
            "meterflow_processor_alerts_total",
            "Budget alerts raised",
        ),
        checkpoints: counter(
            &registry,
            "meterflow_processor_checkpoints_total",
            "Checkpoints written",
        ),
        dead_letters,
        registry,
    }
});

/// Every counter in the Prometheus text format.
pub fn render() -> String {
    TextEncoder::new()
        .encode_to_string(&METRICS.registry.gather())
        .unwrap_or_default()
}

/// Dead letters sent since start-up, every reason together.
pub fn dead_letters_total() -> u64 {
    use prometheus::core::Collector;
    METRICS
        .dead_letters
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}
