//! The processor: turns sample batches into exact, incremental usage aggregates.
//!
//! Input: [`meterflow_schemas::SampleBatch`] from `meterflow.samples`. Output: one
//! [`meterflow_schemas::UsageUpdate`] per changed (lease, service, metric, GPU class, MIG
//! profile, window) on `meterflow.usage`; input it cannot use goes to `meterflow.deadletter`.
//!
//! - [`model`]: the dataflow's records and the validation of a sample into one (pure).
//! - [`dataflow`]: the differential dataflow, one named step per SPEC step (pure, tested on
//!   small collections): allocation intervals → GPU-milliseconds per window; counter readings
//!   → deltas with resets → CPU core-microseconds per window; sums per window.
//! - [`runner`]: timely workers fed from Kafka through rdkafka, deduplication by
//!   (agent, sequence), and the producers of the output topics.

pub mod dataflow;
pub mod model;
pub mod runner;

pub use runner::{ProcessorConfig, ProcessorError, run};
