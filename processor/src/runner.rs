//! Timely workers fed from Kafka, and the producers of the output topics.
//!
//! Each worker owns the `meterflow.samples` partitions whose number is its index modulo the
//! worker count, so one node's batches (keyed by node) always reach the same worker, which
//! drops repeats of an (agent, sequence) it has already fed. A worker polls a bounded number of
//! messages, feeds their observations at the next epoch, steps the dataflow until that epoch is
//! complete, and sends one [`UsageUpdate`] per aggregate that changed, keyed by its stable id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use meterflow_schemas::id::StableId;
use meterflow_schemas::{DeadLetter, Record, SampleBatch, UsageUpdate, topics};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dataflow::{Feeder, Installed, Time, install};
use crate::model::{UsageKey, observe};

/// Configuration of the processor.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Timely worker threads in this process.
    pub workers: usize,
    /// Length of the base window, in milliseconds (SPEC: 1 minute).
    pub window_ms: i64,
    /// Most messages a worker feeds in one epoch.
    pub max_batch: usize,
}

impl ProcessorConfig {
    /// Defaults for everything but the brokers.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            workers: 1,
            window_ms: 60_000,
            max_batch: 1_000,
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
    #[error("timely dataflow: {0}")]
    Timely(String),
}

fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> ProcessorError {
    move |source| ProcessorError::Kafka { context, source }
}

/// Runs the processor's workers until `shutdown` is cancelled.
pub fn run(config: ProcessorConfig, shutdown: CancellationToken) -> Result<(), ProcessorError> {
    let workers = config.workers.max(1);
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        run_worker(worker, &config, &shutdown)
    })
    .map_err(ProcessorError::Timely)?;
    for result in guards.join() {
        result.map_err(ProcessorError::Timely)??;
    }
    Ok(())
}

/// The sequence numbers seen from one agent: everything up to `floor`, plus those above it.
#[derive(Debug, Default)]
struct SeenSequences {
    floor: i64,
    above: BTreeSet<i64>,
}

impl SeenSequences {
    /// Whether `seq` is new; records it. An agent sends in order on one partition, so the
    /// first sequence seen sets the floor and anything below it is a resend.
    fn insert(&mut self, seq: i64) -> bool {
        if self.floor == 0 && self.above.is_empty() {
            self.floor = seq - 1;
        }
        if seq <= self.floor || !self.above.insert(seq) {
            return false;
        }
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        true
    }
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    config: &ProcessorConfig,
    shutdown: &CancellationToken,
) -> Result<(), ProcessorError> {
    let index = worker.index();
    let peers = worker.peers();
    let window_ms = config.window_ms;

    let Installed {
        mut input,
        probe,
        changes,
    } = install(worker, window_ms);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        // Partitions are assigned by worker index, not by the group protocol; the id only
        // names this client to the broker.
        .set("group.id", "meterflow-processor")
        // Offsets are not committed to Kafka: the input is replayed from the start until
        // checkpoints (state and offsets together in RocksDB) exist.
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(kafka("create consumer"))?;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        // A retried send must not duplicate an update.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .map_err(kafka("create producer"))?;

    let partitions = samples_partitions(&consumer, shutdown)?;
    let mut assignment = TopicPartitionList::new();
    for p in (0..partitions).filter(|p| *p as usize % peers == index) {
        assignment
            .add_partition_offset(topics::SAMPLES, p, Offset::Beginning)
            .map_err(kafka("assign"))?;
    }
    consumer.assign(&assignment).map_err(kafka("assign"))?;
    info!(
        worker = index,
        partitions = assignment.count(),
        "processor worker started"
    );

    let mut seen: HashMap<String, SeenSequences> = HashMap::new();
    let mut feeder = Feeder::default();
    let mut epoch: Time = 0;
    while !shutdown.is_cancelled() {
        let mut fed = 0usize;
        let mut timeout = Duration::from_millis(50);
        while fed < config.max_batch {
            let Some(message) = consumer.poll(timeout) else {
                break;
            };
            timeout = Duration::ZERO;
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    warn!(worker = index, error = %e, "consumer error; continuing");
                    break;
                }
            };
            fed += 1;
            let payload = message.payload().unwrap_or_default();
            let batch = match SampleBatch::decode(payload) {
                Ok(b) => b,
                Err(e) => {
                    dead_letter(
                        &producer,
                        e.reason(),
                        e.to_string(),
                        (message.partition(), message.offset()),
                        payload.to_vec(),
                    );
                    continue;
                }
            };
            if !seen
                .entry(batch.agent_id.clone())
                .or_default()
                .insert(batch.sequence)
            {
                debug!(agent = %batch.agent_id, sequence = batch.sequence, "duplicate batch dropped");
                continue;
            }
            for sample in &batch.samples {
                match observe(sample) {
                    Ok(Some(o)) => feeder.feed(&mut input, o),
                    Ok(None) => {}
                    Err(rejection) => {
                        let single = SampleBatch {
                            samples: vec![sample.clone()],
                            ..batch.clone()
                        };
                        dead_letter(
                            &producer,
                            rejection.reason,
                            rejection.detail,
                            (message.partition(), message.offset()),
                            single.encode().unwrap_or_default(),
                        );
                    }
                }
            }
        }
        epoch += 1;
        input.advance_to(epoch);
        input.flush();
        worker.step_while(|| probe.less_than(input.time()));

        let drained: Vec<_> = changes.borrow_mut().drain(..).collect();
        if !drained.is_empty() {
            let sent = emit_usage(&producer, drained, window_ms);
            producer
                .flush(Duration::from_secs(30))
                .map_err(kafka("flush usage"))?;
            debug!(worker = index, epoch, sent, "usage updates sent");
        }
    }
    info!(worker = index, "processor worker stopped");
    Ok(())
}

/// Waits for `meterflow.samples` to exist and returns its partition count.
fn samples_partitions(
    consumer: &BaseConsumer,
    shutdown: &CancellationToken,
) -> Result<i32, ProcessorError> {
    for _ in 0..60 {
        if shutdown.is_cancelled() {
            break;
        }
        let metadata = consumer
            .fetch_metadata(Some(topics::SAMPLES), Duration::from_secs(5))
            .map_err(kafka("fetch metadata"))?;
        if let Some(t) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topics::SAMPLES)
            && !t.partitions().is_empty()
        {
            return Ok(t.partitions().len() as i32);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(ProcessorError::MissingTopic(topics::SAMPLES.into()))
}

/// Turns one epoch's changes into the latest value per key (zero where a value was retracted
/// without a replacement) and sends them; returns how many were sent.
fn emit_usage(
    producer: &ThreadedProducer<DefaultProducerContext>,
    changes: Vec<((UsageKey, isize), Time, isize)>,
    window_ms: i64,
) -> usize {
    let mut latest: BTreeMap<UsageKey, i64> = BTreeMap::new();
    for ((key, amount), _time, diff) in changes {
        if diff > 0 {
            latest.insert(key, amount as i64);
        } else {
            latest.entry(key).or_insert(0);
        }
    }
    let sent = latest.len();
    for (key, amount) in latest {
        let update = usage_update(&key, amount, window_ms);
        match update.encode() {
            Ok(bytes) => send(producer, topics::USAGE, Some(&update.id), &bytes),
            Err(e) => warn!(error = %e, "usage update not encodable"),
        }
    }
    sent
}

/// The wire record of one aggregate's value.
pub fn usage_update(key: &UsageKey, amount: i64, window_ms: i64) -> UsageUpdate {
    let id = StableId::new("usage")
        .str(&key.owner.tenant)
        .str(&key.owner.lease)
        .str(&key.owner.service)
        .str(key.metric.name())
        .str(&key.gpu_class)
        .str(&key.mig_profile)
        .int(key.window_start_ms)
        .hex();
    UsageUpdate {
        id,
        tenant: key.owner.tenant.clone(),
        lease: key.owner.lease.clone(),
        service: key.owner.service.clone(),
        metric: key.metric.name().to_string(),
        gpu_class: key.gpu_class.clone(),
        mig_profile: key.mig_profile.clone(),
        window_start_ms: key.window_start_ms,
        window_end_ms: key.window_start_ms + window_ms,
        amount,
        scale: key.metric.scale(),
        coverage_ms: window_ms,
    }
}

fn dead_letter(
    producer: &ThreadedProducer<DefaultProducerContext>,
    reason: &str,
    detail: String,
    (partition, offset): (i32, i64),
    payload: Vec<u8>,
) {
    warn!(reason, %detail, partition, offset, "input sent to the dead-letter topic");
    let record = DeadLetter {
        reason: reason.to_string(),
        detail,
        source_topic: topics::SAMPLES.to_string(),
        source_partition: partition,
        source_offset: offset,
        payload,
    };
    match record.encode() {
        Ok(bytes) => send(producer, topics::DEADLETTER, None, &bytes),
        Err(e) => warn!(error = %e, "dead letter not encodable"),
    }
}

/// Enqueues a record, waiting for room when the producer's queue is full.
fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: Option<&str>,
    payload: &[u8],
) {
    let record = BaseRecord::<str, [u8]>::to(topic).payload(payload);
    let mut record = match key {
        Some(k) => record.key(k),
        None => record,
    };
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
            Err((e, _)) => {
                warn!(topic, error = %e, "record could not be enqueued");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SeenSequences;

    #[test]
    fn sequences_are_seen_once() {
        let mut s = SeenSequences::default();
        assert!(s.insert(5));
        assert!(!s.insert(5));
        assert!(s.insert(7));
        assert!(s.insert(6));
        assert!(!s.insert(7));
        assert!(!s.insert(3), "below the first sequence seen: a resend");
        assert_eq!(
            (s.floor, s.above.len()),
            (7, 0),
            "contiguous sequences compact"
        );
    }
}
