//! The processor's own counters, in the Prometheus text format (`meterflow processor
//! --metrics-listen ADDR` serves them at `/metrics`).
//!
//! One registry per process: the workers of a process add to the same counters.

use std::sync::LazyLock;

use prometheus::{
    CounterVec, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// A stage of a worker's loop, as `meterflow_processor_stage_seconds_total` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for and taking messages from the consumer (idle time included: a worker that
    /// keeps up spends most of its time here).
    Poll,
    /// Decoding sample batches.
    Decode,
    /// Deduplicating batches, judging samples and feeding the series to the dataflow.
    Feed,
    /// Running the dataflow through an epoch.
    Dataflow,
    /// Sending the epoch's usage, live values, roll-ups, fleet records and costs.
    Emit,
    /// Billing totals to the ledger, due charges and adjustments, budget alerts.
    Bill,
    /// Waiting for the broker to acknowledge every output sent, before a checkpoint (the
    /// broker's time more than the processor's).
    Ack,
    /// Writing the checkpoint (the changed state, offsets and ledger) and retiring idle series.
    Checkpoint,
}

impl Stage {
    /// Every stage, in the loop's order.
    pub const ALL: [Stage; 8] = [
        Stage::Poll,
        Stage::Decode,
        Stage::Feed,
        Stage::Dataflow,
        Stage::Emit,
        Stage::Bill,
        Stage::Ack,
        Stage::Checkpoint,
    ];

    /// Whether the worker waits in this stage (for input, or for the broker) rather than works.
    pub fn waiting(self) -> bool {
        matches!(self, Stage::Poll | Stage::Ack)
    }

    /// The `stage` label.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Poll => "poll",
            Stage::Decode => "decode",
            Stage::Feed => "feed",
            Stage::Dataflow => "dataflow",
            Stage::Emit => "emit",
            Stage::Bill => "bill",
            Stage::Ack => "ack",
            Stage::Checkpoint => "checkpoint",
        }
    }
}

/// The processor's counters.
pub struct Metrics {
    pub registry: Registry,
    /// Input sent to `meterflow.deadletter`, by reason.
    pub dead_letters: IntCounterVec,
    /// Dead letters the broker refused or that could not be enqueued (the input stays
    /// refused; billing goes on).
    pub dead_letters_undelivered: IntCounter,
    /// Times this process resumed from its last checkpoint because outputs were not
    /// acknowledged.
    pub resumes: IntCounter,
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
    /// Checkpoint writes that failed (each retried with the next).
    pub checkpoint_failures: IntCounter,
    /// Idle series whose state left memory (kept in the store).
    pub series_retired: IntCounter,
    /// Retired series that reported again and were brought back from the store.
    pub series_revived: IntCounter,
    /// Totals of closed windows taken out of the dataflow (kept in the store).
    pub totals_retired: IntCounter,
    /// Retired totals a late change reached, brought back into the dataflow.
    pub totals_revived: IntCounter,
    /// 1 for each GPU class with GPU time and no price in the price book (billed at 0).
    pub unpriced_gpu_classes: IntGaugeVec,
    /// The newest agent watermark of the cluster, in event time (Unix seconds).
    pub watermark_seconds: Gauge,
    /// The billing frontier (Unix seconds): billing windows ending by then are charged.
    pub billing_frontier_seconds: Gauge,
    /// Records on `meterflow.samples` this process's workers have not read yet.
    pub input_lag_records: IntGauge,
    /// Seconds the workers spent per [`Stage`], summed over workers.
    pub stage_seconds: CounterVec,
    /// Records sent to `meterflow.usage`, by kind: `usage` (base windows), `live`, `rollup`,
    /// `fleet`, `cost`, `period`.
    pub usage_records: IntCounterVec,
    /// What the workers hold in memory, by worker and kind (see [`set_state`]).
    pub state_entries: IntGaugeVec,
    /// GPU allocation pieces that reached a node's hour after it closed: not in its maximum.
    pub fleet_late_pieces: IntCounter,
    /// What the checkpoint store (RocksDB) holds in memory, by kind.
    pub store_memory_bytes: IntGaugeVec,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("a valid gauge");
    registry
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge");
    registry
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
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
    let unpriced_gpu_classes = gauge_vec(
        &registry,
        "meterflow_processor_unpriced_gpu_class",
        "1 for a GPU class with GPU time and no price in the price book: billed at 0",
        &["gpu_class"],
    );
    meterflow_schemas::process_metrics::register(&registry, "processor");
    let input_lag_records =
        IntGauge::new(
            "meterflow_processor_input_lag_records",
            "Records on meterflow.samples this process's workers have not read yet (their partitions' ends less their next offsets, measured every 2 s; -1 until first measured)",
        )
        .expect("a valid gauge");
    input_lag_records.set(-1);
    registry
        .register(Box::new(input_lag_records.clone()))
        .expect("registered once");
    let stage_seconds = CounterVec::new(
        Opts::new(
            "meterflow_processor_stage_seconds_total",
            "Seconds the workers spent per stage of their loop, summed over workers (poll includes waiting for input; ack is waiting for the broker)",
        ),
        &["stage"],
    )
    .expect("a valid counter");
    registry
        .register(Box::new(stage_seconds.clone()))
        .expect("registered once");
    let usage_records = IntCounterVec::new(
        Opts::new(
            "meterflow_processor_usage_records_total",
            "Records sent to meterflow.usage, by kind: usage (base windows), live, rollup, fleet, cost, period",
        ),
        &["kind"],
    )
    .expect("a valid counter");
    registry
        .register(Box::new(usage_records.clone()))
        .expect("registered once");
    let state_entries = gauge_vec(
        &registry,
        "meterflow_processor_state_entries",
        "What each worker holds in memory, by kind: allocation_series and reading_series (series in memory), node_hours (open hours a node was active in, in the feeder), gpu_pieces (GPU allocation pieces of the hours still open on their node), open_totals, open_costs and open_billing_totals (totals of windows not retired), ledger_keys (billing keys whose billed amount is in memory); names (interned names, shared by the process's workers: worker=\"process\")",
        &["worker", "kind"],
    );
    let store_memory_bytes = gauge_vec(
        &registry,
        "meterflow_processor_store_memory_bytes",
        "What the checkpoint store (RocksDB) holds in memory, by kind: memtables, block_cache, table_readers (indexes and filters)",
        &["kind"],
    );
    Metrics {
        store_memory_bytes,
        stage_seconds,
        usage_records,
        state_entries,
        fleet_late_pieces: counter(
            &registry,
            "meterflow_processor_fleet_late_pieces_total",
            "GPU allocation pieces that reached a node's hour after it closed (its end --lateness behind the node's newest sample): not in the node's max_gpus_allocated for it (billed as always)",
        ),
        watermark_seconds: gauge(
            &registry,
            "meterflow_processor_watermark_seconds",
            "The newest agent watermark of the cluster, in event time (Unix seconds)",
        ),
        billing_frontier_seconds: gauge(
            &registry,
            "meterflow_processor_billing_frontier_seconds",
            "Billing windows ending by this time (Unix seconds) are charged: the newest watermark, never ahead of this machine's clock, less the lateness",
        ),
        input_lag_records,
        unpriced_gpu_classes,
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
        dead_letters_undelivered: counter(
            &registry,
            "meterflow_processor_dead_letters_undelivered_total",
            "Dead letters the broker refused or that could not be enqueued; the input they describe stays refused",
        ),
        resumes: counter(
            &registry,
            "meterflow_processor_resumes_total",
            "Times the process resumed from its last checkpoint because outputs were not acknowledged",
        ),
        checkpoint_failures: counter(
            &registry,
            "meterflow_processor_checkpoint_failures_total",
            "Checkpoint writes that failed (a full disk?); each is retried with the next",
        ),
        series_retired: counter(
            &registry,
            "meterflow_processor_series_retired_total",
            "Idle series whose state left memory (the store keeps it)",
        ),
        series_revived: counter(
            &registry,
            "meterflow_processor_series_revived_total",
            "Retired series that reported again, brought back from the store",
        ),
        totals_retired: counter(
            &registry,
            "meterflow_processor_totals_retired_total",
            "Totals of closed windows (base, roll-ups, costs) taken out of the dataflow; the store keeps them",
        ),
        totals_revived: counter(
            &registry,
            "meterflow_processor_totals_revived_total",
            "Retired totals a late change reached (a replayed spool, a gap), brought back into the dataflow",
        ),
        dead_letters,
        registry,
    }
});

/// The kinds of record [`Metrics::usage_records`] counts, in the order a worker sends them.
pub const USAGE_RECORD_KINDS: [&str; 6] = ["live", "usage", "rollup", "fleet", "cost", "period"];

/// Records of `kind` this process sent to `meterflow.usage` since it started.
pub fn usage_records(kind: &str) -> u64 {
    METRICS.usage_records.with_label_values(&[kind]).get()
}

/// Seconds the workers of this process spent in `stage` since it started.
pub fn stage_seconds(stage: Stage) -> f64 {
    METRICS
        .stage_seconds
        .with_label_values(&[stage.name()])
        .get()
}

/// A worker's time per stage, added to [`Metrics::stage_seconds`] once per epoch rather than
/// at every message. Every moment since it started belongs to one stage: a lap gives the time
/// since the last lap to the stage that just ended.
#[derive(Debug)]
pub struct StageClock {
    since: std::time::Instant,
    spent: [std::time::Duration; Stage::ALL.len()],
}

impl Default for StageClock {
    fn default() -> Self {
        Self::new()
    }
}

impl StageClock {
    pub fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            spent: Default::default(),
        }
    }

    /// Gives the time since the last lap to `stage`.
    pub fn lap(&mut self, stage: Stage) {
        let now = std::time::Instant::now();
        self.spent[stage as usize] += now - self.since;
        self.since = now;
    }

    /// Adds what was timed to the process's counters and starts again.
    pub fn publish(&mut self) {
        for stage in Stage::ALL {
            let spent = std::mem::take(&mut self.spent[stage as usize]);
            if !spent.is_zero() {
                METRICS
                    .stage_seconds
                    .with_label_values(&[stage.name()])
                    .inc_by(spent.as_secs_f64());
            }
        }
    }
}

/// Per partition of `meterflow.samples` owned by a worker of this process, the next offset
/// it reads: what the input lag is measured from.
static NEXT_OFFSETS: std::sync::Mutex<std::collections::BTreeMap<i32, i64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Records the next offsets of a worker's partitions.
pub fn set_next_offsets(next: &std::collections::BTreeMap<i32, i64>) {
    NEXT_OFFSETS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(next.iter().map(|(p, o)| (*p, *o)));
}

/// The next offsets of every partition this process's workers read.
pub fn next_offsets() -> std::collections::BTreeMap<i32, i64> {
    NEXT_OFFSETS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Why the process resumed from its last checkpoint, until a checkpoint is written again: a
/// process that keeps resuming bills nothing new, and must not say it is ready.
static RESUMING: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Records that the process resumes from its last checkpoint (`Some(why)`), or that a
/// checkpoint was written since (`None`).
pub fn set_resuming(why: Option<String>) {
    *RESUMING.lock().unwrap_or_else(|p| p.into_inner()) = why;
}

/// Per worker, why its last checkpoint could not be written, while it could not.
static CHECKPOINT_ERRORS: std::sync::Mutex<std::collections::BTreeMap<usize, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Records that `worker`'s checkpoints fail (`Some(why)`) or are written again (`None`).
pub fn set_checkpoint_error(worker: usize, error: Option<String>) {
    let mut errors = CHECKPOINT_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    match error {
        Some(e) => errors.insert(worker, e),
        None => errors.remove(&worker),
    };
}

/// The health answer: `None` while every worker writes its checkpoints, else why one cannot,
/// or why the process resumed from its last checkpoint without writing one since.
pub fn unhealthy() -> Option<String> {
    let errors = CHECKPOINT_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    let failing = errors
        .iter()
        .next()
        .map(|(worker, e)| format!("worker {worker} cannot write its checkpoint: {e}"));
    failing.or_else(|| RESUMING.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

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

/// Sets what `worker` (or `"process"`) holds of `kind`.
pub fn set_state(worker: &str, kind: &str, entries: i64) {
    METRICS
        .state_entries
        .with_label_values(&[worker, kind])
        .set(entries);
}
