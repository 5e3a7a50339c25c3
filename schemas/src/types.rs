//! Rust types of the `.avsc` records. Field docs live in the schema files; each type here
//! mirrors one schema exactly (a round-trip test checks every one).

use serde::{Deserialize, Serialize};

/// Who a series belongs to (SPEC: Identity). Empty strings where a field does not apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeriesId {
    pub tenant: String,
    pub lease: String,
    pub service: String,
    pub replica: String,
    pub node: String,
    pub provider: String,
    pub container_id: String,
    pub gpu_uuid: String,
    pub gpu_model: String,
    pub gpu_class: String,
    pub mig_profile: String,
}

/// The three kinds of sample (SPEC: The three kinds of sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SampleKind {
    /// Cumulative and monotonic; usage is the difference of two readings.
    Counter,
    /// A level, held until the next reading for at most `max_staleness`.
    Gauge,
    /// What a running container holds, with its start and finish times.
    Allocation,
    /// Never written: a kind added after this reader's schema (the enum's Avro default).
    /// The processor refuses such a sample (dead letter `unknown_kind`).
    Unknown,
}

/// One reading of one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub series: SeriesId,
    pub kind: SampleKind,
    pub metric: String,
    pub value: f64,
    pub timestamp_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
}

/// One agent tick on one node (topic `meterflow.samples`, key = node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleBatch {
    pub node: String,
    pub agent_id: String,
    pub sequence: i64,
    pub collected_at_ms: i64,
    /// Added in schema version 2; empty when read from a version-1 record.
    #[serde(default)]
    pub agent_version: String,
    pub samples: Vec<Sample>,
}

impl SampleBatch {
    /// The batch without its samples: who sent it, which one, when.
    pub fn clone_header(&self) -> Self {
        Self {
            node: self.node.clone(),
            agent_id: self.agent_id.clone(),
            sequence: self.sequence,
            collected_at_ms: self.collected_at_ms,
            agent_version: self.agent_version.clone(),
            samples: Vec::new(),
        }
    }
}

/// The current value of one aggregate in one window (topic `meterflow.usage`): a base window,
/// or a roll-up of them (`resolution` set), which the codec writes as a `UsageRollup` record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UsageUpdate {
    pub id: String,
    pub tenant: String,
    pub lease: String,
    pub service: String,
    /// For node and fleet aggregates: the node, or empty for the fleet; empty from schema
    /// version 1.
    #[serde(default)]
    pub node: String,
    pub metric: String,
    pub gpu_class: String,
    pub mig_profile: String,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    /// Empty for a base window; `hour`, `day` or `month` for a roll-up. Empty from schema
    /// version 1.
    #[serde(default)]
    pub resolution: String,
    /// value = amount / 10^scale.
    pub amount: i64,
    pub scale: i32,
    /// Observed milliseconds (see the schema); the window length for exact aggregates.
    pub coverage_ms: i64,
    /// Present milliseconds: coverage = `coverage_ms / present_ms`; 0 from schema version 1.
    #[serde(default)]
    pub present_ms: i64,
}

/// Whether a billing record is a first charge or a correction of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BillingKind {
    Charge,
    Adjustment,
    /// Never written: a kind added after this reader's schema (the enum's Avro default); the
    /// sink does not count it as billed.
    Unknown,
}

/// A charge or an adjustment (topic `meterflow.billing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingRecord {
    pub id: String,
    pub kind: BillingKind,
    pub tenant: String,
    pub lease: String,
    pub item: String,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub revision: i64,
    pub quantity: i64,
    pub scale: i32,
    pub price_book_version: String,
    pub cost_micros: i64,
    pub currency: String,
}

/// A budget threshold crossed (topic `meterflow.alerts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    pub tenant: String,
    pub kind: String,
    pub period: String,
    pub threshold_percent: i32,
    pub budget_micros: i64,
    pub spent_micros: i64,
    pub raised_at_ms: i64,
    pub message: String,
}

/// Input the pipeline could not use (topic `meterflow.deadletter`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub reason: String,
    pub detail: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    #[serde(with = "apache_avro::serde::bytes")]
    pub payload: Vec<u8>,
}
