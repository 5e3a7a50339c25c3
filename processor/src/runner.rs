//! Timely workers fed from Kafka, their checkpoints, and the producers of the output topics.
//!
//! Each worker owns the `meterflow.samples` partitions whose number is its index modulo the
//! worker count, so one node's batches (keyed by node) always reach the same worker, which
//! drops repeats of an (agent, sequence) it has already fed and samples older than the allowed
//! lateness behind their agent's watermark. A worker polls a bounded number of messages, feeds
//! them at the next epoch, steps the dataflow until that epoch is complete, and then:
//! - sends one [`UsageUpdate`] per aggregate that changed, keyed by its stable id;
//! - sends the [`meterflow_schemas::BillingRecord`]s its [`Ledger`] says are due;
//! - at most every `checkpoint_interval`, takes a [`Checkpoint`] of its input offsets and
//!   changed state, and writes it once every worker has had the broker acknowledge what it
//!   sent up to then.
//!
//! Exactly once without Kafka transactions: on start, the billing records written after the
//! last checkpoint are read back from `meterflow.billing` into the store ([`read_back_billing`]);
//! each worker restores its partitions' state, resumes from their offsets, and bills nothing
//! until every worker has caught up with what its partitions held at start-up. Recomputed totals
//! that equal what was billed produce nothing; a difference produces the next revision.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meterflow_schemas::id::{StableId, StrongId};
use meterflow_schemas::{Alert, BillingRecord, DeadLetter, Record, UsageUpdate, topics};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agents::AgentState;
use crate::billing::Billed;
use crate::budgets::{Budgets, next_month_start_ms};
use crate::checkpoint::{Store, StoreError};
use crate::dataflow::{CostIdx, FleetIdx, Measured, Resolution, RollupIdx, Time};
use crate::metrics::METRICS;
use crate::model::{BillingKey, Kind, Owner, UsageKey};
use crate::names::{Names, TenantId, UsageIdx};
use crate::prices::PriceBook;
use crate::series::{Feeder, HOUR_MS, LiveValue};

/// Configuration of the processor.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Timely worker threads in this process.
    pub workers: usize,
    /// This process's index and the addresses (`host:port`) of every process of the timely
    /// cluster, this one's included; `None` for a single process.
    pub cluster: Option<(usize, Vec<String>)>,
    /// Length of the base window, in milliseconds (SPEC: 1 minute).
    pub window_ms: i64,
    /// Length of a billing window, in milliseconds (a multiple of the base window).
    pub billing_window_ms: i64,
    /// How far behind its agent's watermark a sample is still accepted, in milliseconds.
    pub allowed_lateness_ms: i64,
    /// How far ahead of this machine's clock a sample or a batch may be stamped, in
    /// milliseconds: further ones are dead letters `far_future` and move no watermark, so an
    /// agent whose clock runs fast cannot close other tenants' billing windows early by more.
    pub max_future_ms: i64,
    /// How long after a calendar month's end (by the billing frontier: the newest agent
    /// watermark, never ahead of this machine's clock, less the lateness) its billing period
    /// stays open, in milliseconds: a sample of a closed period, from any agent (a new one
    /// included), is a dead letter `closed_period`, never a new charge or adjustment.
    pub period_grace_ms: i64,
    /// The longest gap across which a gauge reading is held, in milliseconds (SPEC:
    /// `max_staleness`, 2 × the collection interval).
    pub max_staleness_ms: i64,
    /// Most messages a worker feeds in one epoch (an epoch also ends once a million samples
    /// are in).
    pub max_batch: usize,
    /// Most messages a worker feeds in one epoch while it reads a backlog (its partitions up
    /// to where they ended when it started), if more than `max_batch`: a larger epoch carries
    /// fewer intermediate values of each aggregate to the outputs, and nobody waits on them.
    pub max_catch_up_batch: usize,
    /// Most new series one tenant may open per hour of its samples' time on one worker; a
    /// sample that would open more goes to the dead-letter topic as `series_limit`.
    pub max_new_series_per_tenant_hour: usize,
    /// How long a series stays in memory after its last sample (behind its worker's newest);
    /// `None`: the allowed lateness plus the longest gap (an hour).
    pub retire_idle_after_ms: Option<i64>,
    /// Directory of the RocksDB checkpoint; `None` keeps state in memory and replays the
    /// input from the beginning at every start.
    pub state_dir: Option<PathBuf>,
    /// Least time between two checkpoints of a worker.
    pub checkpoint_interval: Duration,
    /// Prices of the billing records.
    pub prices: PriceBook,
    /// How long the billing topic's ends must hold still at start-up before the processor
    /// trusts that a killed predecessor's last records have all landed.
    pub restart_grace: Duration,
    /// Stop (with a checkpoint) once every worker has read its partitions up to where they
    /// ended at start-up: a replay or catch-up run rather than a service.
    pub exit_when_caught_up: bool,
    /// Budgets per tenant; their thresholds raise alerts on `meterflow.alerts`.
    pub budgets: Budgets,
    /// The roll-ups of base windows to keep (each costs about as much as the base windows).
    pub rollups: Vec<Resolution>,
    /// Where to start reading a partition of the samples topic that the checkpoint has no
    /// offset for (a replay from offsets); absent partitions start at their beginning.
    pub start_offsets: BTreeMap<i32, i64>,
}

impl ProcessorConfig {
    /// Defaults for everything but the brokers.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            workers: 1,
            cluster: None,
            window_ms: 60_000,
            billing_window_ms: 3_600_000,
            allowed_lateness_ms: 10 * 60_000,
            max_future_ms: 5 * 60_000,
            period_grace_ms: 3 * 86_400_000,
            max_staleness_ms: 30_000,
            max_batch: 1_000,
            max_catch_up_batch: 10_000,
            max_new_series_per_tenant_hour: 100_000,
            retire_idle_after_ms: None,
            state_dir: None,
            checkpoint_interval: Duration::from_secs(1),
            prices: PriceBook::default(),
            restart_grace: Duration::from_secs(1),
            exit_when_caught_up: false,
            budgets: Budgets::default(),
            rollups: Resolution::ALL.to_vec(),
            start_offsets: BTreeMap::new(),
        }
    }
}

/// Why the processor stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("Kafka client error ({context}): {source}")]
    Kafka {
        context: &'static str,
        source: KafkaError,
    },
    #[error(
        "topic {0} does not exist on the brokers; create it first (meterflow creates its topics at start-up)"
    )]
    MissingTopic(String),
    /// Asked to stop before it had started (not a failure; `run` returns `Ok`).
    #[error("stopped while starting")]
    StoppedWhileStarting,
    #[error(
        "{0} output records were not acknowledged by the broker; stopping so that a restart re-emits them from the last checkpoint"
    )]
    Delivery(u64),
    #[error(
        "billing window {billing_ms} ms is not a positive multiple of the base window {window_ms} ms"
    )]
    Windows { window_ms: i64, billing_ms: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("timely dataflow: {0}")]
    Timely(String),
}

pub(crate) fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> ProcessorError {
    move |source| ProcessorError::Kafka { context, source }
}

/// What the workers of one process share.
pub(crate) struct Shared {
    /// Ids of the alerts on the alerts topic or sent since start-up.
    pub(crate) raised: std::sync::Mutex<HashSet<String>>,
    /// Whether a worker of this process stopped with an error: the others then stop without
    /// waiting for its acknowledgements, and leave their last checkpoint unwritten.
    pub(crate) failed: std::sync::atomic::AtomicBool,
}

/// Counts the output records the broker did not acknowledge, and notes the offset of the last
/// billing record acknowledged per partition.
#[derive(Default)]
pub(crate) struct Deliveries {
    pub(crate) failed: AtomicU64,
    /// Partitions of `meterflow.usage` (see [`usage_partition`]); set when the worker starts.
    pub(crate) usage_partitions: std::sync::atomic::AtomicI32,
    pub(crate) billing_offsets: std::sync::Mutex<BTreeMap<i32, i64>>,
}

impl ClientContext for Deliveries {}

/// The context of the read-back consumers: the end of a partition is what they read up to, not
/// an error to log (librdkafka reports it as one when `enable.partition.eof` is on).
#[derive(Default)]
struct ReadToEnd;

impl ClientContext for ReadToEnd {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            debug!(%reason, "end of partition");
        } else {
            warn!(%error, %reason, "Kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReadToEnd {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) if m.topic() == topics::BILLING => {
                let mut offsets = self
                    .billing_offsets
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let last = offsets.entry(m.partition()).or_insert(m.offset());
                *last = (*last).max(m.offset());
            }
            Ok(_) => {}
            // A dead letter is a diagnosis, not an output: one the broker refuses is counted
            // and said, and billing goes on (stopping would re-read the message that caused it,
            // and stop again, for ever).
            Err((e, m)) if m.topic() == topics::DEADLETTER => {
                METRICS.dead_letters_undelivered.inc();
                warn!(error = %e, "dead letter not delivered; the input it describes stays refused");
            }
            Err((e, m)) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                warn!(topic = m.topic(), error = %e, "output record not delivered");
            }
        }
    }
}

pub(crate) type OutputProducer = ThreadedProducer<Deliveries>;

/// Runs the processor's workers until `shutdown` is cancelled.
pub fn run(config: ProcessorConfig, shutdown: CancellationToken) -> Result<(), ProcessorError> {
    if config.billing_window_ms <= 0
        || config.window_ms <= 0
        || config.billing_window_ms % config.window_ms != 0
    {
        return Err(ProcessorError::Windows {
            window_ms: config.window_ms,
            billing_ms: config.billing_window_ms,
        });
    }
    let store = match &config.state_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.clone(),
                source,
            })?;
            Some(Arc::new(Store::open(dir)?))
        }
        None => None,
    };
    watch_input_lag(&config.brokers, &shutdown);
    loop {
        match run_once(&config, store.clone(), &shutdown) {
            // Outputs the broker did not take: start again from the checkpoint, as after a
            // crash, rather than ask an operator to restart the process.
            // Processes of a cluster restart together (their supervisor restarts each), so only a
            // single process restarts itself.
            Err(ProcessorError::Delivery(n))
                if !shutdown.is_cancelled() && config.cluster.is_none() =>
            {
                warn!(
                    records = n,
                    "output records not acknowledged; resuming from the last checkpoint"
                );
                METRICS.resumes.inc();
                crate::metrics::set_resuming(Some(format!(
                    "resumed from the last checkpoint: {n} output records were not acknowledged; nothing new is billed until a checkpoint is written (is the broker refusing writes?)"
                )));
                std::thread::sleep(Duration::from_secs(1));
            }
            // A stop asked for while waiting for the topics is a clean stop, not a missing topic.
            Err(ProcessorError::StoppedWhileStarting) => return Ok(()),
            result => return result,
        }
    }
}

/// Until `shutdown`, every 2 s: the records on `meterflow.samples` this process's workers have
/// not read (each partition's end less its next offset) into
/// `meterflow_processor_input_lag_records`. A thread and a client of its own, so that asking
/// the broker never holds up a worker's fetches.
fn watch_input_lag(brokers: &str, shutdown: &CancellationToken) {
    let client: Result<BaseConsumer, _> =
        ClientConfig::from_iter(meterflow_schemas::kafka::properties())
            .set("bootstrap.servers", brokers)
            .set("group.id", "meterflow-processor-lag")
            .set("enable.auto.commit", "false")
            .create();
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot measure the input lag");
            return;
        }
    };
    let shutdown = shutdown.clone();
    std::thread::spawn(move || {
        while !shutdown.is_cancelled() {
            let mut lag = 0;
            let offsets = crate::metrics::next_offsets();
            // Nothing to say before a worker has told where it reads from.
            let mut known = !offsets.is_empty();
            for (p, next) in offsets {
                match client.fetch_watermarks(topics::SAMPLES, p, Duration::from_secs(2)) {
                    Ok((_, high)) => lag += (high - next).max(0),
                    Err(e) => {
                        debug!(error = %e, partition = p, "partition end not known");
                        known = false;
                    }
                }
            }
            if known {
                METRICS.input_lag_records.set(lag);
            }
            let next = Instant::now() + Duration::from_secs(2);
            while Instant::now() < next && !shutdown.is_cancelled() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
}

/// One run of the workers, from the checkpoint until `shutdown` or a worker's error.
fn run_once(
    config: &ProcessorConfig,
    store: Option<Arc<Store>>,
    shutdown: &CancellationToken,
) -> Result<(), ProcessorError> {
    let reflected = match &store {
        Some(s) => {
            // The restore feeds every window again; what a previous run retired is stale (see
            // `Store::clear_retired`).
            s.clear_retired()?;
            read_back_billing(&config.brokers, s, config.restart_grace, shutdown)?
        }
        None => BTreeMap::new(),
    };
    let raised = if config.budgets.tenants.is_empty() {
        HashSet::new()
    } else {
        read_alert_ids(&config.brokers, shutdown)?
    };
    let shared = Arc::new(Shared {
        raised: std::sync::Mutex::new(raised),
        failed: std::sync::atomic::AtomicBool::new(false),
    });
    let names = Arc::new(Names::default());
    // A worker that fails stops the others.
    let stop = shutdown.child_token();
    let config = config.clone();
    let timely_config = match &config.cluster {
        None => timely::Config::process(config.workers.max(1)),
        Some((process, addresses)) => timely::Config {
            communication: timely::CommunicationConfig::Cluster {
                threads: config.workers.max(1),
                process: *process,
                addresses: addresses.clone(),
                report: false,
                zerocopy: false,
            },
            worker: timely::WorkerConfig::default(),
        },
    };
    let guards = timely::execute(timely_config, move |worker| {
        let result = crate::worker::run_worker(
            worker,
            &config,
            store.as_deref(),
            reflected.clone(),
            (&shared, &names),
            &stop,
        );
        if result.is_err() {
            shared.failed.store(true, Ordering::SeqCst);
            stop.cancel();
        }
        result
    })
    .map_err(ProcessorError::Timely)?;
    let mut first_error = None;
    for result in guards.join() {
        if let Err(e) = result.map_err(ProcessorError::Timely).and_then(|r| r) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Errors a consumer recovers from by itself: the brokers out of reach for a while.
fn transient(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        e.rdkafka_error_code(),
        Some(
            Code::AllBrokersDown
                | Code::BrokerTransportFailure
                | Code::NetworkException
                | Code::RequestTimedOut
                | Code::OperationTimedOut
                | Code::LeaderNotAvailable
                | Code::NotLeaderForPartition
        )
    )
}

/// Reads the billing records written after the last checkpoint back into the store, so that
/// what was billed before a crash is billed once. Returns each billing partition's end: every
/// record below it is now reflected in the store.
///
/// A killed processor's last produce requests may still be appended by the broker after it
/// died, so the partitions' ends are taken again after `grace`, and reading goes on until they
/// hold still for that long.
fn read_back_billing(
    brokers: &str,
    store: &Store,
    grace: Duration,
    shutdown: &CancellationToken,
) -> Result<BTreeMap<i32, i64>, ProcessorError> {
    let client = || {
        ClientConfig::from_iter(meterflow_schemas::kafka::properties())
            .set("bootstrap.servers", brokers)
            // Assigned by hand; the id only names this client to the broker.
            .set("group.id", "meterflow-processor-billing-readback")
            .set("enable.auto.commit", "false")
            // The read-back ends where the fetches say each partition ends.
            .set("enable.partition.eof", "true")
            .create_with_context::<_, BaseConsumer<ReadToEnd>>(ReadToEnd)
            .map_err(kafka("create billing reader"))
    };
    // Ends are asked of a client without an assignment: a request queued behind the reader's
    // long-polling fetch would wait for it.
    let (reader, watcher) = (client()?, client()?);
    let billing_partitions = topic_partitions(&watcher, topics::BILLING, shutdown)?;
    let usage_partitions = topic_partitions(&watcher, topics::USAGE, shutdown)?;
    let ends = |topic: &'static str| -> Result<BTreeMap<i32, (i64, i64)>, ProcessorError> {
        let partitions = if topic == topics::USAGE {
            usage_partitions
        } else {
            billing_partitions
        };
        (0..partitions)
            .map(|p| {
                watcher
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map(|w| (p, w))
                    .map_err(kafka("output topic offsets"))
            })
            .collect()
    };
    // The usage topic is only written by processors: while it still grows, a killed
    // predecessor's queued requests are still being appended, billing ones among them.
    let quiet =
        || -> Result<_, ProcessorError> { Ok((ends(topics::BILLING)?, ends(topics::USAGE)?)) };
    let from = store.billing_offsets()?;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    let mut snapshot = quiet()?;
    for (p, (low, _)) in &snapshot.0 {
        let start = from.get(p).copied().unwrap_or(*low).max(*low);
        next.insert(*p, start);
        // Records below `start` are read again too: applying one twice changes nothing.
        assignment
            .add_partition_offset(
                topics::BILLING,
                *p,
                Offset::Offset(topics::resume_from(start, *low)),
            )
            .map_err(kafka("assign billing"))?;
    }
    reader
        .assign(&assignment)
        .map_err(kafka("assign billing"))?;
    let mut read = 0usize;
    // Until every partition reported its end (from the fetch responses: the brokers' offset
    // listing can fall short of the log's end), then until nothing arrives for `grace`.
    let mut at_end: BTreeSet<i32> = BTreeSet::new();
    let mut quiet_since = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            // Stopped before the end: only the checkpoint's offsets are known to hold.
            return Ok(from);
        }
        if at_end.len() >= billing_partitions as usize && quiet_since.elapsed() >= grace {
            let later = quiet()?;
            if later == snapshot {
                break;
            }
            snapshot = later;
            quiet_since = Instant::now();
        }
        let message = match reader.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
                continue;
            }
            // librdkafka reconnects by itself; a broker unreachable for a moment must not stop
            // the processor (a fault test cutting connections found it did).
            Some(Err(e)) if transient(&e) => {
                warn!(error = %e, "billing read-back: Kafka unreachable for now; retrying");
                continue;
            }
            Some(Err(e)) => return Err(kafka("read billing")(e)),
            Some(Ok(m)) => m,
        };
        quiet_since = Instant::now();
        let seen = next.entry(message.partition()).or_insert(0);
        *seen = (*seen).max(message.offset() + 1);
        let Ok(record) = BillingRecord::decode(message.payload().unwrap_or_default()) else {
            warn!(
                partition = message.partition(),
                offset = message.offset(),
                "undecodable billing record skipped"
            );
            continue;
        };
        let Some(key) = BillingKey::from_record(&record) else {
            warn!(item = %record.item, "billing record of an unknown item skipped");
            continue;
        };
        if let Some(billed) = Billed::apply(store.billed(&key)?, &record) {
            store.put_billed(&key, billed)?;
        }
        read += 1;
    }
    info!(
        records = read,
        from = ?from,
        to = ?next,
        "billing records read back since the last checkpoint"
    );
    Ok(next)
}

/// One worker's view of its input partitions.
pub(crate) struct Inputs {
    /// Next offset to read, per owned partition.
    pub(crate) next: BTreeMap<i32, i64>,
    /// The end of each partition at start-up; removed once reached.
    pub(crate) catching_up: BTreeMap<i32, i64>,
}

/// Gives a partition's checkpoint to the feeder, for the dataflow's first epoch; returns its
/// next offset.
pub(crate) fn restore_partition(
    store: &Store,
    partition: i32,
    feeder: &mut Feeder,
    agents: &mut HashMap<String, (i32, AgentState)>,
    idle_ms: i64,
) -> Result<Option<i64>, ProcessorError> {
    let state = store.load_partition(partition)?;
    // Series idle for longer than `idle_ms` behind the partition's newest data stay in the
    // store (their pieces and windows go into the dataflow all the same).
    let retire_before_ms = state
        .agents
        .iter()
        .map(|(_, s)| s.watermark_ms)
        .max()
        .unwrap_or(i64::MIN)
        .saturating_sub(idle_ms);
    for (agent, s) in state.agents {
        agents.insert(agent, (partition, s));
    }
    for (key, obs) in state.allocations {
        feeder.restore_allocation(partition, key, obs, retire_before_ms);
    }
    for (key, readings) in state.readings {
        feeder.restore_readings(partition, key, readings, retire_before_ms);
    }
    for (key, window, parts) in state.windows {
        feeder.restore_window(key, window, parts);
    }
    for (node, hour) in state.node_hours {
        feeder.restore_node_hour(partition, &node, hour);
    }
    Ok(state.offset)
}

/// Waits for `topic` to exist and returns its partition count.
pub(crate) fn topic_partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    shutdown: &CancellationToken,
) -> Result<i32, ProcessorError> {
    for _ in 0..60 {
        if shutdown.is_cancelled() {
            return Err(ProcessorError::StoppedWhileStarting);
        }
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(kafka("fetch metadata"))?;
        if let Some(t) = metadata.topics().iter().find(|t| t.name() == topic)
            && !t.partitions().is_empty()
        {
            return Ok(t.partitions().len() as i32);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(ProcessorError::MissingTopic(topic.into()))
}

/// The latest value per key in one epoch's changes (`None` where a value was retracted
/// without a replacement).
pub(crate) fn latest_values<K: Ord, V>(
    changes: Vec<((K, V), Time, isize)>,
) -> BTreeMap<K, Option<V>> {
    let mut latest: BTreeMap<K, Option<V>> = BTreeMap::new();
    for ((key, value), _time, diff) in changes {
        if diff > 0 {
            latest.insert(key, Some(value));
        } else {
            latest.entry(key).or_insert(None);
        }
    }
    latest
}

/// Sends the latest value of every usage aggregate that changed; returns how many were sent.
pub(crate) fn emit_usage(
    producer: &OutputProducer,
    names: &Names,
    latest: BTreeMap<UsageIdx, Option<Measured>>,
    window_ms: i64,
) -> usize {
    let sent = latest.len();
    for (key, value) in latest {
        // Retracted: nothing is left of it in the window. An exact aggregate still covers the
        // whole window (it is known to be zero); a gauge was not observed at all.
        let value = value.unwrap_or(match key.metric.kind() {
            Kind::Gauge => Measured {
                total: 0,
                observed_ms: 0,
                present_ms: 0,
            },
            _ => Measured {
                total: 0,
                observed_ms: window_ms,
                present_ms: window_ms,
            },
        });
        let update = usage_update(names.usage_key(&key), value, window_ms);
        match update.encode() {
            Ok(bytes) => send_usage(producer, &update, &bytes),
            Err(e) => warn!(error = %e, "usage update not encodable"),
        }
    }
    sent
}

/// Sends the live values of the groups with a new latest reading: per lease, service, node and
/// metric three records, `live.<metric>.gauge`, `.diff` and `.rate`, in the metric's units
/// (scale as for its readings). Their window starts at 0, so each id keeps one record in every
/// store (they are not usage of any window), and ends at the newest reading's time.
pub(crate) fn emit_live(producer: &OutputProducer, names: &Names, live: &[LiveValue]) -> usize {
    for v in live {
        let (owner, node, metric) = v.group;
        let owner = names.owner_named(owner);
        let node = names.node_name(node);
        for (kind, amount) in [("gauge", v.gauge), ("diff", v.diff), ("rate", v.rate_per_s)] {
            let name = format!("live.{}.{kind}", metric.sample_metric());
            let update = UsageUpdate {
                id: StableId::new("live")
                    .str(&owner.tenant)
                    .str(&owner.lease)
                    .str(&owner.service)
                    .str(&node)
                    .str(&name)
                    .hex(),
                tenant: owner.tenant.clone(),
                lease: owner.lease.clone(),
                service: owner.service.clone(),
                node: node.clone(),
                metric: name,
                gpu_class: String::new(),
                mig_profile: String::new(),
                window_start_ms: 0,
                window_end_ms: v.at_ms,
                resolution: String::new(),
                amount,
                scale: metric.reading_scale(),
                coverage_ms: 0,
                present_ms: 0,
            };
            match update.encode() {
                Ok(bytes) => send_usage(producer, &update, &bytes),
                Err(e) => warn!(error = %e, "live update not encodable"),
            }
        }
    }
    3 * live.len()
}

/// Sends the cost of every (owner, base window) that changed, as `cost` usage records in
/// micros (scale 6); returns how many.
pub(crate) fn emit_costs(
    producer: &OutputProducer,
    names: &Names,
    latest: BTreeMap<CostIdx, Option<isize>>,
    window_ms: i64,
) -> usize {
    let sent = latest.len();
    for ((owner, _, window_start_ms), value) in latest {
        let owner = names.owner_named(owner);
        let update = money_update(
            &owner,
            "cost",
            (window_start_ms, window_start_ms + window_ms),
            value.unwrap_or(0) as i64,
        );
        match update.encode() {
            Ok(bytes) => send_usage(producer, &update, &bytes),
            Err(e) => warn!(error = %e, "cost update not encodable"),
        }
    }
    sent
}

/// Sends each changed tenant's spend in a calendar month as a `period_cost` record (lease
/// empty) in micros, and beside it the tenant's monthly budget as a `budget` record where it
/// has one, so readers judge spend against the budget the alerts used; returns how many.
pub(crate) fn emit_periods(
    producer: &OutputProducer,
    names: &Names,
    changes: &BTreeMap<(TenantId, i64), Option<isize>>,
    budgets: &Budgets,
) -> usize {
    let mut sent = 0;
    for ((tenant, month), value) in changes {
        let owner = Owner {
            tenant: names.tenant_name(*tenant),
            lease: String::new(),
            service: String::new(),
        };
        let period = (*month, next_month_start_ms(*month));
        let budget = budgets
            .tenants
            .get(&owner.tenant)
            .map(|b| money_update(&owner, "budget", period, b.monthly_micros));
        let spent = money_update(&owner, "period_cost", period, value.unwrap_or(0) as i64);
        for update in std::iter::once(spent).chain(budget) {
            match update.encode() {
                Ok(bytes) => send_usage(producer, &update, &bytes),
                Err(e) => warn!(error = %e, "period cost update not encodable"),
            }
            sent += 1;
        }
    }
    sent
}

/// A usage record of an amount of money in micros of the price book's currency.
pub fn money_update(
    owner: &Owner,
    metric: &str,
    (start, end): (i64, i64),
    micros: i64,
) -> UsageUpdate {
    UsageUpdate {
        id: StableId::new("usage")
            .str(&owner.tenant)
            .str(&owner.lease)
            .str(&owner.service)
            .str(metric)
            .str("")
            .str("")
            .int(start)
            .hex(),
        tenant: owner.tenant.clone(),
        lease: owner.lease.clone(),
        service: owner.service.clone(),
        node: String::new(),
        metric: metric.to_string(),
        gpu_class: String::new(),
        mig_profile: String::new(),
        window_start_ms: start,
        window_end_ms: end,
        resolution: String::new(),
        amount: micros,
        scale: 6,
        coverage_ms: end - start,
        present_ms: end - start,
    }
}

/// The ids of every alert on the alerts topic, read to the end of each partition.
fn read_alert_ids(
    brokers: &str,
    shutdown: &CancellationToken,
) -> Result<HashSet<String>, ProcessorError> {
    let reader: BaseConsumer<ReadToEnd> =
        ClientConfig::from_iter(meterflow_schemas::kafka::properties())
            .set("bootstrap.servers", brokers)
            .set("group.id", "meterflow-processor-alerts-readback")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create_with_context(ReadToEnd)
            .map_err(kafka("create alerts reader"))?;
    let partitions = topic_partitions(&reader, topics::ALERTS, shutdown)?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topics::ALERTS, p, Offset::Beginning)
            .map_err(kafka("assign alerts"))?;
    }
    reader.assign(&assignment).map_err(kafka("assign alerts"))?;
    let mut at_end: BTreeSet<i32> = BTreeSet::new();
    let mut ids = HashSet::new();
    while at_end.len() < partitions as usize && !shutdown.is_cancelled() {
        match reader.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) if transient(&e) => {
                warn!(error = %e, "alerts read-back: Kafka unreachable for now; retrying");
            }
            Some(Err(e)) => return Err(kafka("read alerts")(e)),
            Some(Ok(m)) => match Alert::decode(m.payload().unwrap_or_default()) {
                Ok(alert) => {
                    // Also under the id this version gives it: an alert raised before the ids
                    // changed (16 hex digits then) is not raised again.
                    ids.insert(crate::budgets::alert_id(
                        &alert.tenant,
                        alert.budget_micros,
                        alert.threshold_percent,
                        &alert.period,
                    ));
                    ids.insert(alert.id);
                }
                Err(e) => warn!(error = %e, offset = m.offset(), "undecodable alert skipped"),
            },
        }
    }
    info!(alerts = ids.len(), "alerts already raised read back");
    Ok(ids)
}

/// Sends the latest value of every roll-up that changed; returns how many.
pub(crate) fn emit_rollups(
    producer: &OutputProducer,
    names: &Names,
    latest: BTreeMap<RollupIdx, Option<Measured>>,
) -> usize {
    let sent = latest.len();
    for ((key, resolution), value) in latest {
        let end = resolution.end(key.window_start_ms);
        let value = value.unwrap_or(Measured {
            total: 0,
            observed_ms: 0,
            present_ms: 0,
        });
        let update = usage_record(names.usage_key(&key), value, end, Some(resolution));
        match update.encode() {
            Ok(bytes) => send_usage(producer, &update, &bytes),
            Err(e) => warn!(error = %e, "roll-up not encodable"),
        }
    }
    sent
}

/// Sends the latest value of every node aggregate that changed; returns how many.
pub(crate) fn emit_fleet(
    producer: &OutputProducer,
    names: &Names,
    latest: Vec<(FleetIdx, i64)>,
) -> usize {
    let sent = latest.len();
    for (key, value) in latest {
        let update = fleet_update(names, key, value);
        match update.encode() {
            Ok(bytes) => send_usage(producer, &update, &bytes),
            Err(e) => warn!(error = %e, "fleet update not encodable"),
        }
    }
    sent
}

/// The wire record of one node aggregate per hour.
pub fn fleet_update(names: &Names, key: FleetIdx, amount: i64) -> UsageUpdate {
    let (node, metric, hour) = match key {
        FleetIdx::NodeActive(n, h) => (names.node_name(n), "node_active", h),
        FleetIdx::NodeMaxGpus(n, h) => (names.node_name(n), "max_gpus_allocated", h),
    };
    UsageUpdate {
        id: StableId::new("fleet")
            .str(&node)
            .str(metric)
            .int(hour)
            .hex(),
        tenant: String::new(),
        lease: String::new(),
        service: String::new(),
        node,
        metric: metric.to_string(),
        gpu_class: String::new(),
        mig_profile: String::new(),
        window_start_ms: hour,
        window_end_ms: hour + HOUR_MS,
        resolution: String::new(),
        amount,
        scale: 0,
        coverage_ms: HOUR_MS,
        present_ms: HOUR_MS,
    }
}

/// The wire record of one aggregate's value.
pub fn usage_update(key: UsageKey, value: Measured, window_ms: i64) -> UsageUpdate {
    let window_end_ms = key.window_start_ms + window_ms;
    usage_record(key, value, window_end_ms, None)
}

/// The wire record of one aggregate's value in a base window (`resolution` `None`) or a
/// roll-up ending at `window_end_ms`.
pub fn usage_record(
    key: UsageKey,
    value: Measured,
    window_end_ms: i64,
    resolution: Option<Resolution>,
) -> UsageUpdate {
    let mut id = StableId::new("usage")
        .str(&key.owner.tenant)
        .str(&key.owner.lease)
        .str(&key.owner.service)
        .str(key.metric.name())
        .str(&key.gpu_class)
        .str(&key.mig_profile)
        .int(key.window_start_ms);
    if let Some(r) = resolution {
        // A roll-up starts where its first base window does: the resolution tells them apart.
        id = id.str(r.name());
    }
    UsageUpdate {
        id: id.hex(),
        tenant: key.owner.tenant,
        lease: key.owner.lease,
        service: key.owner.service,
        node: String::new(),
        metric: key.metric.name().to_string(),
        gpu_class: key.gpu_class,
        mig_profile: key.mig_profile,
        window_start_ms: key.window_start_ms,
        window_end_ms,
        resolution: resolution.map_or_else(String::new, |r| r.name().to_string()),
        amount: value.total,
        scale: key.metric.scale(),
        coverage_ms: value.observed_ms,
        present_ms: value.present_ms,
    }
}

/// The most of a refused message's bytes a dead letter carries: a message near the broker's
/// size limit cannot be sent again whole inside a dead letter (the envelope makes it larger).
pub const DEAD_LETTER_PAYLOAD_BYTES: usize = 64 * 1024;
/// The most of a rejection's explanation a dead letter carries.
const DEAD_LETTER_DETAIL_BYTES: usize = 2 * 1024;

pub(crate) fn dead_letter(
    producer: &OutputProducer,
    reason: &str,
    detail: String,
    (partition, offset): (i32, i64),
    payload: &[u8],
) {
    let record = dead_letter_record(reason, detail, (partition, offset), payload);
    warn!(reason, detail = %record.detail, partition, offset, "input sent to the dead-letter topic");
    METRICS.dead_letters.with_label_values(&[reason]).inc();
    match record.encode() {
        Ok(bytes) => send(producer, topics::DEADLETTER, None, &bytes),
        Err(e) => warn!(error = %e, "dead letter not encodable"),
    }
}

/// A dead letter of bounded size: the payload whole up to [`DEAD_LETTER_PAYLOAD_BYTES`], else
/// its first bytes, with its size and SHA-256 and where the whole message lies said in the
/// detail (itself cut to [`DEAD_LETTER_DETAIL_BYTES`] at a character boundary).
pub fn dead_letter_record(
    reason: &str,
    mut detail: String,
    (partition, offset): (i32, i64),
    payload: &[u8],
) -> DeadLetter {
    if detail.len() > DEAD_LETTER_DETAIL_BYTES {
        let mut end = DEAD_LETTER_DETAIL_BYTES;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push('…');
    }
    let payload = if payload.len() > DEAD_LETTER_PAYLOAD_BYTES {
        use sha2::Digest;
        let digest: String = sha2::Sha256::digest(payload)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        detail.push_str(&format!(
            " (payload cut to its first {DEAD_LETTER_PAYLOAD_BYTES} of {} bytes, sha256 {digest}; the whole message is at {} partition {partition} offset {offset})",
            payload.len(),
            topics::SAMPLES
        ));
        payload[..DEAD_LETTER_PAYLOAD_BYTES].to_vec()
    } else {
        payload.to_vec()
    };
    DeadLetter {
        reason: reason.to_string(),
        detail,
        source_topic: topics::SAMPLES.to_string(),
        source_partition: partition,
        source_offset: offset,
        payload,
    }
}

/// The Kafka key of a usage update: its tenant and id under SHA-256, so that the topic's
/// compaction (the latest value per key) never lets one tenant's record replace another's,
/// whatever names the tenant chose (the 64-bit FNV-1a id alone could be aimed at).
pub fn usage_key(update: &UsageUpdate) -> String {
    StrongId::new("usage-key")
        .str(&update.tenant)
        .str(&update.id)
        .hex()
}

/// The partition of `meterflow.usage` a usage update goes to: the one librdkafka's default
/// partitioner (`consistent_random`: CRC-32 of the key) chose when the key was the id, so an
/// aggregate stays on the partition its records were on before the keys changed, and a reader
/// of the topic still sees its values in order.
pub fn usage_partition(update: &UsageUpdate, partitions: i32) -> i32 {
    (crc32fast::hash(update.id.as_bytes()) % partitions.max(1) as u32) as i32
}

/// Enqueues a usage update under [`usage_key`] on [`usage_partition`].
fn send_usage(producer: &OutputProducer, update: &UsageUpdate, payload: &[u8]) {
    let partitions = producer.context().usage_partitions.load(Ordering::Relaxed);
    let key = usage_key(update);
    let record = BaseRecord::<str, [u8]>::to(topics::USAGE)
        .key(&key)
        .partition(usage_partition(update, partitions))
        .payload(payload);
    enqueue(producer, topics::USAGE, record);
}

/// Enqueues a record, waiting for room when the producer's queue is full.
pub(crate) fn send(producer: &OutputProducer, topic: &str, key: Option<&str>, payload: &[u8]) {
    let record = BaseRecord::<str, [u8]>::to(topic).payload(payload);
    let record = match key {
        Some(k) => record.key(k),
        None => record,
    };
    enqueue(producer, topic, record);
}

fn enqueue<'a>(producer: &OutputProducer, topic: &str, mut record: BaseRecord<'a, str, [u8]>) {
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                r,
            )) => {
                record = r;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((e, _)) if topic == topics::DEADLETTER => {
                METRICS.dead_letters_undelivered.inc();
                warn!(error = %e, "dead letter could not be enqueued; the input it describes stays refused");
                return;
            }
            Err((e, _)) => {
                // Counted as a failed delivery: the epoch's flush turns it into a stop.
                producer.context().failed.fetch_add(1, Ordering::SeqCst);
                warn!(topic, error = %e, "record could not be enqueued");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_is_bounded_whatever_it_describes() {
        // Small: whole, the detail as given.
        let d = dead_letter_record("undecodable", "cut short".into(), (2, 7), b"abc");
        assert_eq!(
            (d.payload.as_slice(), d.detail.as_str()),
            (&b"abc"[..], "cut short")
        );
        // Large: the first 64 KiB, its size, digest and place said; the record fits in far
        // less than a producer's 1 MB default.
        let big = vec![7u8; 3 << 20];
        let d = dead_letter_record("undecodable", "é".repeat(5_000), (2, 7), &big);
        assert_eq!(d.payload.len(), DEAD_LETTER_PAYLOAD_BYTES);
        assert!(
            d.detail.starts_with(&"é".repeat(1_024)),
            "cut at a character"
        );
        assert!(
            d.detail.contains("of 3145728 bytes, sha256 ")
                && d.detail.contains("meterflow.samples partition 2 offset 7"),
            "{}",
            d.detail
        );
        let encoded = d.encode().expect("encodes");
        assert!(encoded.len() < 80 * 1024, "{} bytes", encoded.len());
    }
}
