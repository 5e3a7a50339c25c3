//! The processor: turns sample batches into exact, incremental usage and billing aggregates.
//!
//! Input: [`meterflow_schemas::SampleBatch`] from `meterflow.samples`. Outputs: one
//! [`meterflow_schemas::UsageUpdate`] per changed (lease, service, metric, GPU class, MIG
//! profile, base window) on `meterflow.usage`; [`meterflow_schemas::BillingRecord`]s (a charge
//! per lease, item and closed billing window, then adjustments) on `meterflow.billing`; input it
//! cannot use goes to `meterflow.deadletter`. State: a RocksDB checkpoint (`--state-dir`).
//!
//! - [`model`]: the dataflow's records and the validation of a sample into one (pure).
//! - [`agents`]: per-agent deduplication by sequence and event-time watermark (pure).
//! - [`names`]: owners, leases and items interned to integers for the dataflow.
//! - [`series`]: per-series state that samples reduce to before the dataflow (pure).
//! - [`dataflow`]: the differential dataflow, one named step per SPEC step (pure, tested on
//!   small collections): allocation intervals → GPU-milliseconds per window; counter and
//!   gauge usage per window (gauges with observed and present time, for coverage); totals per
//!   base window and per billing window.
//! - [`windows`]: closed windows' totals taken out of the dataflow, and brought back if a late
//!   change reaches them.
//! - [`billing`]: the ledger of what was billed, charges and adjustments (pure).
//! - [`prices`]: the versioned price book (TOML) and costs on integers (pure).
//! - [`budgets`]: budgets per tenant (TOML), the alerts they raise, calendar months (pure).
//! - [`checkpoint`]: input offsets and state written together to RocksDB.
//! - [`metrics`]: the processor's counters (dead letters by reason, batches, duplicates, ...).
//! - [`runner`]: the processor's runs (timely workers fed from Kafka through rdkafka), the
//!   producers of the output topics, exactly-once billing without Kafka transactions.
//! - `worker`: one timely worker, stage by stage: read and feed, emit, bill, checkpoint.

pub mod agents;
pub mod billing;
pub mod budgets;
pub mod checkpoint;
pub mod dataflow;
pub mod metrics;
pub mod model;
pub mod names;
pub mod prices;
pub mod runner;
pub mod series;
pub mod windows;
mod worker;

pub use prices::PriceBook;
pub use runner::{ProcessorConfig, ProcessorError, run};

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
