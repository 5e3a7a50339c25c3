//! One timely worker of the processor, stage by stage:
//! 1. **read**: its partitions of `meterflow.samples`, each batch decoded, deduplicated by
//!    (agent, sequence), its samples judged against their agent's watermark and this machine's
//!    clock, and fed to the dataflow ([`Worker::read_input`], [`Worker::feed_batch`]);
//! 2. **emit**: each epoch's changed usage, live values, roll-ups, fleet records, costs and
//!    period costs to `meterflow.usage` ([`Worker::emit`]);
//! 3. **bill**: the ledger's due charges and adjustments to `meterflow.billing`, and budget
//!    alerts, once every worker has caught up ([`Worker::bill`], [`Worker::raise_alerts`]);
//! 4. **acknowledge**: at most every `checkpoint_interval`, waits for the broker to have
//!    every record sent so far, and tells every worker the epoch that covers
//!    ([`Worker::acknowledge`]);
//! 5. **checkpoint**: offsets, changed state and the ledger, written once every worker's
//!    records up to the epoch they were taken at are acknowledged ([`Worker::checkpoint`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use differential_dataflow::input::InputSession;
use meterflow_schemas::{Record, SampleBatch, topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::agents::AgentState;
use crate::billing::{Ledger, partition_key};
use crate::budgets::month_start_ms;
use crate::checkpoint::{Checkpoint, NamedStore, Store};
use crate::dataflow::{ClusterProgress, Costing, Installed, Progress, Time, install};
use crate::metrics::{METRICS, Stage, StageClock, USAGE_RECORD_KINDS};
use crate::model::{Summary, observe_ref};
use crate::names::{Names, TenantId};
use crate::runner::{
    Deliveries, Inputs, OutputProducer, ProcessorConfig, ProcessorError, Shared, dead_letter,
    emit_costs, emit_fleet, emit_live, emit_periods, emit_rollups, emit_usage, kafka,
    latest_values, restore_partition, send, topic_partitions,
};
use crate::series::{Feeder, Rules};
use crate::windows::{OpenTotals, Sifted, TotalChanges};

/// A worker's Kafka clients.
struct Clients {
    consumer: BaseConsumer,
    /// Usage updates, alerts and dead letters.
    producer: OutputProducer,
    billing: OutputProducer,
}

impl Clients {
    fn connect(brokers: &str) -> Result<Self, ProcessorError> {
        let consumer = ClientConfig::from_iter(meterflow_schemas::kafka::follower_properties())
            .set("bootstrap.servers", brokers)
            // Partitions are assigned by worker index, not by the group protocol; the id only
            // names this client to the broker.
            .set("group.id", "meterflow-processor")
            // Offsets are never committed to Kafka: they live in the checkpoint, with the state
            // they produced.
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(kafka("create consumer"))?;
        let producer = ClientConfig::from_iter(meterflow_schemas::kafka::properties())
            .set("bootstrap.servers", brokers)
            // A retried send must not duplicate a record.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create_with_context(Deliveries::default())
            .map_err(kafka("create producer"))?;
        let billing = ClientConfig::from_iter(meterflow_schemas::kafka::properties())
            .set("bootstrap.servers", brokers)
            // Billing records are never retried by the client: a send that fails stops this run,
            // and the next one reads back what landed (`read_back_billing`) before billing again.
            // Broker-side idempotence is not relied on: the embedded broker's was seen to append a
            // retried batch twice.
            .set("enable.idempotence", "false")
            .set("retries", "0")
            // One request at a time keeps each key's revisions in order even when one fails.
            .set("max.in.flight.requests.per.connection", "1")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create_with_context(Deliveries::default())
            .map_err(kafka("create billing producer"))?;
        Ok(Self {
            consumer,
            producer,
            billing,
        })
    }

    /// An error if the broker refused an output record since the last look.
    fn refused(&self) -> Result<(), ProcessorError> {
        let failed = self.producer.context().failed.swap(0, Ordering::SeqCst)
            + self.billing.context().failed.swap(0, Ordering::SeqCst);
        if failed > 0 {
            return Err(ProcessorError::Delivery(failed));
        }
        Ok(())
    }

    /// Waits until everything sent so far is acknowledged.
    fn flush(&self) -> Result<(), ProcessorError> {
        for p in [&self.producer, &self.billing] {
            p.flush(Duration::from_secs(30))
                .map_err(kafka("flush outputs"))?;
        }
        self.refused()
    }

    /// Whether the broker has acknowledged (or refused) every record sent so far, asked without
    /// waiting.
    fn all_acknowledged(&self) -> bool {
        self.producer.in_flight_count() == 0 && self.billing.in_flight_count() == 0
    }
}

/// When the worker last took a checkpoint, and what is waiting to be written.
///
/// A checkpoint must not cover input whose records another worker has not had acknowledged:
/// a restart does not send the state it restores, so such a record would be lost for good (a
/// lease's usage staying at an older value). A checkpoint is therefore taken at an epoch and
/// written once every worker of every process has said (through the dataflow's progress
/// records) that the broker acknowledged everything it sent up to that epoch.
struct Checkpoints {
    /// When the last checkpoint was taken, or its write last failed.
    last: Instant,
    /// Whether input was fed or records billed since the last checkpoint was taken.
    changed: bool,
    /// The checkpoint taken and not written yet: waiting for acknowledgements or, after a
    /// failed write (a full disk), to be tried again. Oldest first.
    unwritten: Vec<Checkpoint>,
    /// The epoch the unwritten checkpoint was taken at: every worker's records up to it (the
    /// costs of totals brought back that epoch, sent with the next, included) must be
    /// acknowledged before it is written.
    taken_at: Time,
    /// Whether writing the unwritten checkpoint failed.
    failed: bool,
    /// The epoch through which the broker has acknowledged this worker's records.
    acked: Time,
    /// When this worker last waited for the broker's acknowledgements.
    flushed: Instant,
    /// The horizon idle series were last retired before.
    retired_through_ms: i64,
}

/// The most samples a worker feeds in one epoch, whatever the message counts allow: each
/// sample's changes wait in memory until the epoch ends, and one message may carry thousands
/// of samples (10,000 catch-up messages of a node with 50 containers and 8 GPUs would be
/// millions).
const EPOCH_SAMPLES: usize = 1_000_000;

/// The longest a stopping worker waits for the other workers' acknowledgements before it
/// leaves its last checkpoint unwritten.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// What one worker keeps between epochs.
struct Worker<'a> {
    index: usize,
    config: &'a ProcessorConfig,
    store: Option<&'a Store>,
    names: &'a Names,
    shared: &'a Shared,
    feeder: Feeder,
    /// The totals this worker's dataflow holds; with a store, closed ones leave it.
    open: OpenTotals,
    agents: HashMap<String, (i32, AgentState)>,
    dirty_agents: HashSet<String>,
    inputs: Inputs,
    /// Whether this worker has said it caught up with its partitions.
    caught_up: bool,
    /// The latest watermark of this worker's agents.
    watermark_ms: i64,
    /// The billing frontier samples are judged by for closed periods: the restored one until
    /// every worker has caught up (a partition read ahead of another must not close a period
    /// for the other's backlog), then the cluster's.
    closing_ms: i64,
    /// The start of the first billing period still open by `closing_ms` (a calendar month
    /// closes `--period-grace` after its end): samples and billing changes before it are set
    /// aside.
    closed_before_ms: i64,
    /// A series silent for this long behind the worker's newest data leaves memory.
    idle_ms: i64,
    ledger: Ledger,
    /// A tenant's spend per month, for the budgets; and those changed since they were judged.
    spent: HashMap<(TenantId, i64), i64>,
    unchecked: HashSet<(TenantId, i64)>,
    /// Per billing partition, the offset below which every record is in the store.
    billing_reflected: BTreeMap<i32, i64>,
    checkpoints: Checkpoints,
    /// Where the worker's time goes, stage by stage.
    clock: StageClock,
}

/// Runs one worker until `shutdown`, or until every worker has caught up when the
/// configuration says to stop then.
pub(crate) fn run_worker(
    worker: &mut timely::worker::Worker,
    config: &ProcessorConfig,
    store: Option<&Store>,
    billing_reflected: BTreeMap<i32, i64>,
    (shared, names): (&Shared, &Arc<Names>),
    shutdown: &CancellationToken,
) -> Result<(), ProcessorError> {
    let index = worker.index();
    let peers = worker.peers();
    let costing = Costing {
        names: names.clone(),
        prices: Arc::new(config.prices.clone()),
    };
    let Installed {
        mut input,
        names: mut names_in,
        mut progress_in,
        progress,
        probe,
        usage,
        billing,
        rollups,
        costs,
        periods,
    } = install(
        worker,
        config.window_ms,
        config.billing_window_ms,
        costing.clone(),
        &config.rollups,
    );
    let clients = Clients::connect(&config.brokers)?;
    let mut w = Worker::start(
        (index, peers),
        config,
        store,
        (shared, names, &costing),
        billing_reflected,
        (&clients.consumer, &clients.producer),
        shutdown,
    )?;

    // What this worker tells the others of its progress; the first record is sent with the
    // restored state.
    let mut told = Progress {
        watermark_ms: w.watermark_ms,
        caught_up: w.inputs.catching_up.is_empty(),
        acked: w.checkpoints.acked,
    };
    progress_in.insert((index, told));

    // The restored state is the dataflow's first epoch. Its usage updates were sent before the
    // checkpoint was written; its billing totals go to the ledger.
    let mut epoch: Time = 1;
    let mut advance =
        |epoch: Time,
         worker: &mut timely::worker::Worker,
         (input, feeder): (&mut InputSession<Time, Summary, isize>, &mut Feeder),
         progress_in: &mut InputSession<Time, (usize, Progress), isize>| {
            for name in names.take_fresh() {
                names_in.send(name);
            }
            feeder.advance(input, epoch);
            names_in.advance_to(epoch);
            progress_in.advance_to(epoch);
            input.flush();
            progress_in.flush();
            worker.step_while(|| probe.less_than(input.time()));
        };
    advance(epoch, worker, (&mut input, &mut w.feeder), &mut progress_in);
    w.close_through(w.frontier_ms(*progress.borrow()));
    let restored_billing = w.open.restored((
        usage.borrow_mut().drain(..).collect(),
        rollups.borrow_mut().drain(..).collect(),
        costs.borrow_mut().drain(..).collect(),
        billing.borrow_mut().drain(..).collect(),
    ));
    w.take_billing_totals(restored_billing)?;
    // The node aggregates restored were sent before the checkpoint.
    w.feeder.take_fleet();
    // The restored spend per month is what the alerts are checked against.
    w.note_spent(latest_values(periods.borrow_mut().drain(..).collect()));
    w.clock.lap(Stage::Dataflow);

    let mut stopped_at: Option<Instant> = None;
    loop {
        let stopping = shutdown.is_cancelled()
            || (config.exit_when_caught_up && progress.borrow().caught_up >= peers);
        let fed = if stopping { 0 } else { w.read_input(&clients)? };
        w.checkpoints.changed |= fed > 0;
        // A run that stops once caught up also waits for an epoch that found nothing more: a
        // broker can report an end short of its last message (tansu does, by one), and the
        // message past it would otherwise be left for the next run.
        if !w.caught_up
            && w.inputs.catching_up.is_empty()
            && (fed == 0 || !config.exit_when_caught_up)
        {
            w.caught_up = true;
            info!(worker = index, "caught up with the input");
        }
        let now = Progress {
            watermark_ms: w.watermark_ms,
            caught_up: w.caught_up,
            acked: w.checkpoints.acked,
        };
        if now != told {
            progress_in.remove((index, told));
            progress_in.insert((index, now));
            told = now;
        }

        epoch += 1;
        advance(epoch, worker, (&mut input, &mut w.feeder), &mut progress_in);
        let cluster = *progress.borrow();
        if cluster.caught_up >= peers {
            w.close_through(w.frontier_ms(cluster));
        }
        w.tell_metrics(cluster);
        w.clock.lap(Stage::Dataflow);

        let (usage, rollups, costs, billing) = w.sift(
            (
                usage.borrow_mut().drain(..).collect(),
                rollups.borrow_mut().drain(..).collect(),
                costs.borrow_mut().drain(..).collect(),
                billing.borrow_mut().drain(..).collect(),
            ),
            &mut input,
        )?;
        let sent = w.emit(
            &clients.producer,
            (usage, rollups, costs),
            periods.borrow_mut().drain(..).collect(),
        );
        w.retire_windows(cluster, &mut input);
        w.clock.lap(Stage::Emit);
        w.take_billing_totals(billing)?;
        let billed = if cluster.caught_up >= peers {
            // Alerts, like billing, wait until the backlog is read: a threshold is judged on
            // the whole of what was spent.
            w.raise_alerts(&clients.producer);
            w.bill(&clients, cluster)
        } else {
            0
        };
        if sent + billed > 0 || fed > 0 {
            debug!(worker = index, epoch, fed, sent, billed, "epoch done");
        }
        w.checkpoints.changed |= billed > 0;
        w.clock.lap(Stage::Bill);
        clients.refused()?;
        w.acknowledge(&clients, epoch, stopping)?;
        w.checkpoint(&clients, stopping, cluster, epoch)?;
        w.clock.lap(Stage::Checkpoint);
        w.clock.publish();
        if stopping {
            // A total brought back this epoch is sent with the next: one more epoch, reading
            // nothing, before stopping (a restart would not send it: see
            // `OpenTotals::settled`). The last checkpoint waits for every worker's
            // acknowledgements; a worker that failed sends none, and a restart then starts from
            // the checkpoint before.
            let since = *stopped_at.get_or_insert_with(Instant::now);
            let unwritten = !w.checkpoints.unwritten.is_empty();
            if w.open.settled() && !unwritten {
                break;
            }
            if shared.failed.load(Ordering::SeqCst) {
                // Its records may be lost: a checkpoint covering what it had not had
                // acknowledged must not be written.
                warn!(
                    worker = index,
                    unwritten,
                    "another worker failed; stopping without writing the last checkpoint taken"
                );
                break;
            }
            if since.elapsed() >= STOP_WAIT {
                warn!(
                    worker = index,
                    unwritten,
                    "stopping without waiting any longer for the other workers' acknowledgements; a restart reads again from the checkpoint before"
                );
                break;
            }
        }
    }
    // This worker sends nothing more: the others' checkpoints need not wait for it.
    progress_in.remove((index, told));
    progress_in.insert((
        index,
        Progress {
            acked: Time::MAX,
            ..told
        },
    ));
    progress_in.flush();
    info!(
        worker = index,
        unbilled = w.ledger.pending(),
        "processor worker stopped"
    );
    Ok(())
}

/// One epoch's usage, roll-ups and costs to send (see [`Sifted`]).
type UsageSent = (
    BTreeMap<crate::names::UsageIdx, Option<crate::dataflow::Measured>>,
    BTreeMap<crate::dataflow::RollupIdx, Option<crate::dataflow::Measured>>,
    BTreeMap<crate::dataflow::CostIdx, Option<isize>>,
);

/// One epoch's changes of the period costs.
type PeriodChanges = Vec<(((TenantId, i64), isize), Time, isize)>;

impl<'a> Worker<'a> {
    /// Restores the worker's partitions from the checkpoint into the dataflow's first epoch
    /// and assigns them to `consumer` from their next offsets.
    #[allow(clippy::too_many_arguments)]
    fn start(
        (index, peers): (usize, usize),
        config: &'a ProcessorConfig,
        store: Option<&'a Store>,
        (shared, names, costing): (&'a Shared, &'a Arc<Names>, &Costing),
        billing_reflected: BTreeMap<i32, i64>,
        (consumer, producer): (&BaseConsumer, &OutputProducer),
        shutdown: &CancellationToken,
    ) -> Result<Self, ProcessorError> {
        let partitions = topic_partitions(consumer, topics::SAMPLES, shutdown)?;
        let usage_partitions = topic_partitions(consumer, topics::USAGE, shutdown)?;
        producer
            .context()
            .usage_partitions
            .store(usage_partitions, Ordering::Relaxed);
        let rules = Rules {
            max_staleness_ms: config.max_staleness_ms,
            ..Rules::new(config.window_ms)
        };
        let mut feeder = Feeder::new(rules, names.clone(), index)
            .with_series_limit(config.max_new_series_per_tenant_hour)
            .closing_node_hours(config.allowed_lateness_ms);
        // A series silent for this long behind its worker's newest data leaves memory after
        // the next checkpoint (the store keeps it, and brings it back if it reports again). The
        // default makes that rare: past the lateness no reading lands before its last, and past
        // the longest gap a gauge's next reading does not pair with it.
        let idle_ms = config
            .retire_idle_after_ms
            .unwrap_or_else(|| config.allowed_lateness_ms.saturating_add(rules.max_gap_ms));
        let mut agents: HashMap<String, (i32, AgentState)> = HashMap::new();
        let mut inputs = Inputs {
            next: BTreeMap::new(),
            catching_up: BTreeMap::new(),
        };
        let mut assignment = TopicPartitionList::new();
        for p in (0..partitions).filter(|p| *p as usize % peers == index) {
            let restored = match store {
                Some(s) => restore_partition(s, p, &mut feeder, &mut agents, idle_ms)?,
                None => None,
            };
            let (low, high) = consumer
                .fetch_watermarks(topics::SAMPLES, p, Duration::from_secs(10))
                .map_err(kafka("input offsets"))?;
            let first = config.start_offsets.get(&p).copied().unwrap_or(low);
            let next = restored.unwrap_or(first).max(low);
            inputs.next.insert(p, next);
            if next < high {
                inputs.catching_up.insert(p, high);
            }
            assignment
                .add_partition_offset(
                    topics::SAMPLES,
                    p,
                    Offset::Offset(topics::resume_from(next, low)),
                )
                .map_err(kafka("assign"))?;
        }
        consumer.assign(&assignment).map_err(kafka("assign"))?;
        let (series_a, series_c) = feeder.series();
        info!(
            worker = index,
            partitions = assignment.count(),
            restored_allocation_series = series_a,
            restored_counter_series = series_c,
            "processor worker started"
        );
        let watermark_ms = agents
            .values()
            .map(|(_, a)| a.watermark_ms)
            .max()
            .unwrap_or(i64::MIN);
        Ok(Self {
            index,
            config,
            store,
            names,
            shared,
            feeder,
            open: OpenTotals::new(config.window_ms, config.billing_window_ms, costing),
            agents,
            dirty_agents: HashSet::new(),
            inputs,
            caught_up: false,
            watermark_ms,
            closing_ms: i64::MIN,
            closed_before_ms: i64::MIN,
            idle_ms,
            ledger: Ledger::new(config.billing_window_ms),
            spent: HashMap::new(),
            unchecked: HashSet::new(),
            billing_reflected,
            checkpoints: Checkpoints {
                last: Instant::now(),
                changed: false,
                unwritten: Vec::new(),
                taken_at: 0,
                failed: false,
                acked: 0,
                flushed: Instant::now(),
                retired_through_ms: i64::MIN,
            },
            clock: StageClock::new(),
        })
    }

    /// Reads up to `max_batch` messages of the worker's partitions (`max_catch_up_batch` while
    /// it reads a backlog) and no more once [`EPOCH_SAMPLES`] samples are in, waiting a little
    /// for the first, and feeds them; returns how many were read.
    fn read_input(&mut self, clients: &Clients) -> Result<usize, ProcessorError> {
        let (mut fed, mut samples) = (0usize, 0usize);
        let mut timeout = Duration::from_millis(50);
        let most = if self.inputs.catching_up.is_empty() {
            self.config.max_batch
        } else {
            self.config.max_catch_up_batch.max(self.config.max_batch)
        };
        while fed < most && samples < EPOCH_SAMPLES {
            let polled = clients.consumer.poll(timeout);
            self.clock.lap(Stage::Poll);
            let Some(message) = polled else {
                break;
            };
            timeout = Duration::ZERO;
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    warn!(worker = self.index, error = %e, "consumer error; continuing");
                    break;
                }
            };
            let partition = message.partition();
            let offset = message.offset();
            if self
                .inputs
                .next
                .get(&partition)
                .is_some_and(|next| offset < *next)
            {
                // Fetched again on resuming (see `topics::RESUME_REWIND`): already in the state.
                continue;
            }
            fed += 1;
            METRICS.input_messages.inc();
            self.inputs.next.insert(partition, offset + 1);
            if self
                .inputs
                .catching_up
                .get(&partition)
                .is_some_and(|end| offset + 1 >= *end)
            {
                self.inputs.catching_up.remove(&partition);
            }
            let payload = message.payload().unwrap_or_default();
            let decoded = SampleBatch::decode(payload);
            self.clock.lap(Stage::Decode);
            match decoded {
                Ok(batch) => {
                    samples += batch.samples.len();
                    self.feed_batch(&clients.producer, (partition, offset), batch)?
                }
                Err(e) => dead_letter(
                    &clients.producer,
                    e.reason(),
                    e.to_string(),
                    (partition, offset),
                    payload,
                ),
            }
            self.clock.lap(Stage::Feed);
        }
        Ok(fed)
    }

    /// Feeds one batch read at `(partition, offset)`: dropped if its (agent, sequence) was fed
    /// before; each sample judged against its agent's watermark and this machine's clock, and
    /// dead-lettered with its reason if refused.
    fn feed_batch(
        &mut self,
        producer: &OutputProducer,
        (partition, offset): (i32, i64),
        batch: SampleBatch,
    ) -> Result<(), ProcessorError> {
        let config = self.config;
        let (_, agent) = self
            .agents
            .entry(batch.agent_id.clone())
            .or_insert_with(|| (partition, AgentState::new()));
        if !agent.first_time(batch.sequence) {
            debug!(agent = %batch.agent_id, sequence = batch.sequence, "duplicate batch dropped");
            METRICS.duplicates.inc();
            return Ok(());
        }
        self.dirty_agents.insert(batch.agent_id.clone());
        METRICS.batches.inc();
        let lateness_ms = config.allowed_lateness_ms;
        let horizon_ms = agent.horizon_ms(lateness_ms);
        let latest_ms = crate::now_ms().saturating_add(config.max_future_ms);
        let mut watermark_ms = agent.watermark_ms;
        if batch.collected_at_ms <= latest_ms {
            watermark_ms = watermark_ms.max(batch.collected_at_ms);
        } else {
            // The batch's stamp alone (its samples are judged one by one below): a clock
            // running fast must be seen, not only kept from the watermark.
            let header = batch.clone_header();
            dead_letter(
                producer,
                "far_future",
                format!(
                    "agent {}'s batch {} was collected at {} ms, more than {} ms ahead of this processor's clock (--max-clock-skew): it moves no watermark; is the node's clock synchronised?",
                    batch.agent_id, batch.sequence, batch.collected_at_ms, config.max_future_ms
                ),
                (partition, offset),
                &header.encode().unwrap_or_default(),
            );
        }
        for sample in &batch.samples {
            let refused = if sample.timestamp_ms > latest_ms {
                Some((
                    "far_future",
                    format!(
                        "timestamp {} ms of agent {} is more than {} ms ahead of this processor's clock (--max-clock-skew)",
                        sample.timestamp_ms, batch.agent_id, config.max_future_ms
                    ),
                ))
            } else if sample.timestamp_ms < horizon_ms {
                Some((
                    "too_late",
                    format!(
                        "timestamp {} ms is more than the allowed lateness ({} ms) behind agent {}'s watermark",
                        sample.timestamp_ms, lateness_ms, batch.agent_id
                    ),
                ))
            } else {
                match self.feed_sample(partition, (&batch.agent_id, sample), horizon_ms)? {
                    Ok(fed) => {
                        if fed {
                            watermark_ms = watermark_ms.max(sample.timestamp_ms);
                        }
                        None
                    }
                    Err(refused) => Some(refused),
                }
            };
            if let Some((reason, detail)) = refused {
                // The batch's header with this one sample: cloning the whole batch for each
                // refused sample made a hostile batch cost quadratic work.
                let single = SampleBatch {
                    samples: vec![sample.clone()],
                    ..batch.clone_header()
                };
                dead_letter(
                    producer,
                    reason,
                    detail,
                    (partition, offset),
                    &single.encode().unwrap_or_default(),
                );
            }
        }
        if let Some((_, agent)) = self.agents.get_mut(&batch.agent_id) {
            agent.watermark_ms = watermark_ms;
        }
        self.watermark_ms = self.watermark_ms.max(watermark_ms);
        Ok(())
    }

    /// Feeds one sample of `agent` that is neither too late nor too far ahead: `Ok(true)` when
    /// it became an observation, `Ok(false)` when it carries none, or the reason and detail of
    /// its refusal.
    fn feed_sample(
        &mut self,
        partition: i32,
        (agent, sample): (&str, &meterflow_schemas::Sample),
        horizon_ms: i64,
    ) -> Result<Result<bool, (&'static str, String)>, ProcessorError> {
        let observation = match observe_ref(sample) {
            Ok(Some(o)) => o,
            Ok(None) => return Ok(Ok(false)),
            Err(rejection) => return Ok(Err((rejection.reason, rejection.detail))),
        };
        if sample.timestamp_ms < self.closed_before_ms {
            return Ok(Err((
                "closed_period",
                format!(
                    "timestamp {} ms of agent {agent} is in the billing period {}, closed {} ms after its end (--period-grace): this sample is kept here and billed to no one; bill it by hand if it is owed",
                    sample.timestamp_ms,
                    meterflow_schemas::time::month_name(sample.timestamp_ms),
                    self.config.period_grace_ms,
                ),
            )));
        }
        let fed = match self.store {
            Some(s) => self
                .feeder
                .feed_from(partition, observation, horizon_ms, s)?,
            None => self.feeder.feed(partition, observation, horizon_ms),
        };
        Ok(match fed {
            Ok(()) => Ok(true),
            Err(refused) => Err((refused.reason(), refused.to_string())),
        })
    }

    /// Takes the restored or changed spend per tenant and month, to judge the budgets by.
    fn note_spent(&mut self, changes: BTreeMap<(TenantId, i64), Option<isize>>) {
        for (key, value) in changes {
            self.spent.insert(key, value.unwrap_or(0) as i64);
            self.unchecked.insert(key);
        }
    }

    /// One epoch's changed totals → what to send of them and give the ledger. With a store, a
    /// retired total's retraction is left out, and one a late change reached is brought back
    /// (fed to `input`) and sent the next epoch (see [`crate::windows`]).
    fn sift(
        &mut self,
        totals: TotalChanges,
        input: &mut InputSession<Time, Summary, isize>,
    ) -> Result<Sifted, ProcessorError> {
        Ok(match self.store {
            Some(store) => {
                let names = self.names;
                self.open
                    .sift(totals, input, &NamedStore { store, names })?
            }
            None => (
                latest_values(totals.0),
                latest_values(totals.1),
                latest_values(totals.2),
                latest_values(totals.3),
            ),
        })
    }

    /// Sends one epoch's usage outputs and live values; returns how many records were sent.
    fn emit(
        &mut self,
        producer: &OutputProducer,
        (usage, rollups, costs): UsageSent,
        periods: PeriodChanges,
    ) -> usize {
        let (names, window_ms) = (self.names, self.config.window_ms);
        let live = self.feeder.take_live();
        let fleet = self.feeder.take_fleet();
        let periods = latest_values(periods);
        // In the order of `USAGE_RECORD_KINDS`.
        let sent = [
            emit_live(producer, names, &live),
            emit_usage(producer, names, usage, window_ms),
            emit_rollups(producer, names, rollups),
            emit_fleet(producer, names, fleet),
            emit_costs(producer, names, costs, window_ms),
            emit_periods(producer, names, &periods, &self.config.budgets),
        ];
        self.note_spent(periods);
        for (kind, n) in USAGE_RECORD_KINDS.iter().zip(sent) {
            METRICS
                .usage_records
                .with_label_values(&[kind])
                .inc_by(n as u64);
        }
        sent.iter().sum()
    }

    /// With a store, takes the totals of windows the closing frontier has passed out of the
    /// dataflow (see [`crate::windows`]).
    fn retire_windows(
        &mut self,
        cluster: ClusterProgress,
        input: &mut InputSession<Time, Summary, isize>,
    ) {
        if self.store.is_none() || cluster.watermark_ms == i64::MIN {
            return;
        }
        self.open.retire(self.frontier_ms(cluster), input);
        let (retired, revived) = self.open.take_counts();
        METRICS.totals_retired.inc_by(retired);
        METRICS.totals_revived.inc_by(revived);
    }

    /// Gives the ledger one epoch's changed billing totals, with what the store says was
    /// billed of each key it has not seen yet.
    fn take_billing_totals(
        &mut self,
        changes: BTreeMap<crate::names::BillingIdx, Option<isize>>,
    ) -> Result<(), ProcessorError> {
        for (key, total) in changes {
            let total = total.unwrap_or(0) as i64;
            let key = self.names.billing_key(&key);
            let known = if self.ledger.knows(&key) {
                None
            } else {
                match self.store {
                    Some(s) => s.billed(&key)?,
                    None => None,
                }
            };
            self.ledger.set_total(key, total, |_| known);
        }
        Ok(())
    }

    /// Raises the budget alerts the changed spend crosses, each once per tenant, threshold and
    /// month.
    fn raise_alerts(&mut self, producer: &OutputProducer) {
        if self.unchecked.is_empty() {
            return;
        }
        let config = self.config;
        let mut raised = self
            .shared
            .raised
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for key in self.unchecked.drain() {
            let tenant = self.names.tenant_name(key.0);
            let total = self.spent.get(&key).copied().unwrap_or(0);
            for alert in config.budgets.alerts(
                &tenant,
                key.1,
                total,
                &raised,
                crate::now_ms(),
                &config.prices.currency,
            ) {
                info!(tenant = %alert.tenant, period = %alert.period, threshold = alert.threshold_percent, "budget alert raised");
                match alert.encode() {
                    Ok(bytes) => send(producer, topics::ALERTS, Some(&alert.tenant), &bytes),
                    Err(e) => warn!(error = %e, "alert not encodable"),
                }
                raised.insert(alert.id);
                METRICS.alerts.inc();
            }
        }
    }

    /// The billing frontier: a window closes once it has passed the window's end. It is the
    /// newest agent watermark of the cluster, never ahead of this machine's clock, less the
    /// lateness: an agent stamping its batches up to `--max-clock-skew` ahead (more is
    /// refused) cannot close any tenant's windows early, while a replay of past data closes
    /// them as fast as it is read.
    fn frontier_ms(&self, cluster: ClusterProgress) -> i64 {
        cluster
            .watermark_ms
            .min(crate::now_ms())
            .saturating_sub(self.config.allowed_lateness_ms)
    }

    /// Where this worker is, for `/metrics`: its partitions' next offsets (the input lag is
    /// measured from them), the cluster's watermark and the billing frontier.
    fn tell_metrics(&mut self, cluster: ClusterProgress) {
        crate::metrics::set_next_offsets(&self.inputs.next);
        METRICS
            .fleet_late_pieces
            .inc_by(self.feeder.take_late_gpu_pieces());
        let worker = self.index.to_string();
        let held = self.feeder.sizes().into_iter().chain(self.open.count());
        for (kind, entries) in held.chain([("ledger_keys", self.ledger.known() as i64)]) {
            crate::metrics::set_state(&worker, kind, entries);
        }
        if self.index == 0 {
            crate::metrics::set_state("process", "names", self.names.count() as i64);
            for (kind, bytes) in self.store.map(Store::memory).unwrap_or_default() {
                METRICS
                    .store_memory_bytes
                    .with_label_values(&[kind])
                    .set(bytes);
            }
        }
        if cluster.watermark_ms > i64::MIN {
            METRICS
                .watermark_seconds
                .set(cluster.watermark_ms as f64 / 1000.0);
            METRICS
                .billing_frontier_seconds
                .set(self.frontier_ms(cluster) as f64 / 1000.0);
        }
    }

    /// Moves the closing frontier forward to `frontier_ms` (never back), and with it the start
    /// of the first billing period still open.
    fn close_through(&mut self, frontier_ms: i64) {
        if frontier_ms > self.closing_ms {
            self.closing_ms = frontier_ms;
            // Nothing before 1970 is fed (`before_epoch`): no period of it needs closing.
            let open_from = frontier_ms.saturating_sub(self.config.period_grace_ms);
            if open_from > 0 {
                self.closed_before_ms = month_start_ms(open_from);
            }
        }
    }

    /// Sends the charges and adjustments of the billing windows the frontier has closed;
    /// returns how many. A change to a window of a closed billing period (an allocation first
    /// seen after its period closed, running since before) is billed to no one: it goes to
    /// the dead-letter topic as `closed_period`, with the record it would have been.
    fn bill(&mut self, clients: &Clients, cluster: ClusterProgress) -> usize {
        let config = self.config;
        for due in self.ledger.set_aside(self.closed_before_ms) {
            let record = due.record(config.billing_window_ms, &config.prices);
            let detail = format!(
                "a change of {} (scale {}) to tenant {}'s lease {} item {} in the billing window from {} ms, in the billing period {} closed {} ms after its end (--period-grace), is billed to no one; the payload is the record it would have been: bill it by hand if it is owed",
                record.quantity,
                record.scale,
                record.tenant,
                record.lease,
                record.item,
                record.window_start_ms,
                meterflow_schemas::time::month_name(record.window_start_ms),
                config.period_grace_ms,
            );
            warn!(%detail, "billing change set aside");
            METRICS
                .dead_letters
                .with_label_values(&["closed_period"])
                .inc();
            let letter = meterflow_schemas::DeadLetter {
                reason: "closed_period".into(),
                detail,
                source_topic: topics::BILLING.into(),
                source_partition: -1,
                source_offset: -1,
                payload: record.encode().unwrap_or_default(),
            };
            match letter.encode() {
                Ok(bytes) => send(&clients.producer, topics::DEADLETTER, None, &bytes),
                Err(e) => warn!(error = %e, "dead letter not encodable"),
            }
        }
        let frontier_ms = self.frontier_ms(cluster);
        let mut billed = 0;
        for due in self.ledger.due(frontier_ms) {
            let record = due.record(config.billing_window_ms, &config.prices);
            match record.encode() {
                Ok(bytes) => send(
                    &clients.billing,
                    topics::BILLING,
                    Some(&partition_key(&due.key)),
                    &bytes,
                ),
                Err(e) => warn!(error = %e, "billing record not encodable"),
            }
            billed += 1;
            METRICS.billing_records.inc();
        }
        billed
    }

    /// At most every `checkpoint_interval` (every epoch while stopping), waits until the broker
    /// has acknowledged every record this worker sent, which covers the epochs before `epoch`;
    /// without waiting when nothing is in flight.
    fn acknowledge(
        &mut self,
        clients: &Clients,
        epoch: Time,
        stopping: bool,
    ) -> Result<(), ProcessorError> {
        // The records of the epochs before `epoch` are all sent by now.
        let through = epoch - 1;
        if self.checkpoints.acked >= through {
            return Ok(());
        }
        if clients.all_acknowledged() {
            clients.refused()?;
            self.checkpoints.acked = through;
        } else if stopping
            || (self.store.is_some()
                && self.checkpoints.flushed.elapsed() >= self.config.checkpoint_interval)
        {
            self.clock.lap(Stage::Bill);
            clients.flush()?;
            self.clock.lap(Stage::Ack);
            self.checkpoints.flushed = Instant::now();
            self.checkpoints.acked = through;
        }
        Ok(())
    }

    /// Writes the checkpoint taken earlier once every worker's records up to the epoch it was
    /// taken at are acknowledged (the cluster's `acked`), then lets idle series and long-billed
    /// windows leave memory; takes the next, of `epoch`, when one is due: something changed,
    /// and the interval passed or the worker stops.
    fn checkpoint(
        &mut self,
        clients: &Clients,
        stopping: bool,
        cluster: ClusterProgress,
        epoch: Time,
    ) -> Result<(), ProcessorError> {
        let Some(store) = self.store else {
            return Ok(());
        };
        let interval = self.config.checkpoint_interval;
        let c = &self.checkpoints;
        if !c.unwritten.is_empty()
            && cluster.acked >= c.taken_at
            && (!c.failed || stopping || c.last.elapsed() >= interval)
        {
            self.write(store, stopping, cluster)?;
        }
        let c = &self.checkpoints;
        if c.changed && c.unwritten.is_empty() && (stopping || c.last.elapsed() >= interval) {
            self.take(clients, epoch);
        }
        Ok(())
    }

    /// Takes the checkpoint of `epoch`: offsets, changed state and the ledger.
    fn take(&mut self, clients: &Clients, epoch: Time) {
        // Every record this worker sent is in its ledger, so none of its later records can land
        // below the offset after its last acknowledged one; one sent and not acknowledged yet
        // lands at or above it, where a restart reads it back. (Asking the broker for the
        // partitions' ends instead would queue behind the consumer's long-polling fetch.)
        for (p, last) in clients
            .billing
            .context()
            .billing_offsets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
        {
            let floor = self.billing_reflected.entry(*p).or_insert(0);
            *floor = (*floor).max(last + 1);
        }
        let billing_offsets = self
            .billing_reflected
            .iter()
            .map(|(p, o)| (*p, *o))
            .collect();
        let agents = self
            .dirty_agents
            .drain()
            .filter_map(|a| {
                let (p, state) = self.agents.get(&a)?.clone();
                Some((p, a, state))
            })
            .collect();
        let retired = self.retired_named();
        let c = &mut self.checkpoints;
        c.unwritten.push(Checkpoint {
            worker: self.index as u32,
            offsets: self.inputs.next.iter().map(|(p, o)| (*p, *o)).collect(),
            agents,
            series: self.feeder.take_dirty(),
            billed: self.ledger.take_dirty(),
            billing_offsets,
            ..retired
        });
        c.taken_at = epoch;
        c.changed = false;
        c.last = Instant::now();
    }

    /// Writes the checkpoint taken; on a full disk, says so and keeps it to try again.
    fn write(
        &mut self,
        store: &Store,
        stopping: bool,
        cluster: ClusterProgress,
    ) -> Result<(), ProcessorError> {
        match store.write(&self.checkpoints.unwritten) {
            Ok(()) => {
                if self.checkpoints.failed {
                    info!(worker = self.index, "checkpoints are written again");
                }
                self.checkpoints.unwritten.clear();
                self.checkpoints.failed = false;
                self.open.written();
                METRICS.checkpoints.inc();
                crate::metrics::set_checkpoint_error(self.index, None);
                crate::metrics::set_resuming(None);
                debug!(worker = self.index, "checkpoint written");
                self.retire_idle(cluster);
                Ok(())
            }
            // A full disk: processing goes on (its outputs are acknowledged; a restart would
            // resume from the last checkpoint written), health says so, and the write is tried
            // again every interval; the changes since wait for the next checkpoint.
            Err(e) if !stopping => {
                if !self.checkpoints.failed {
                    error!(worker = self.index, error = %e, state_dir = ?self.config.state_dir, "checkpoint failed; retried every --checkpoint-interval, and health says unhealthy until one is written (is the disk full?)");
                }
                self.checkpoints.failed = true;
                self.checkpoints.last = Instant::now();
                METRICS.checkpoint_failures.inc();
                crate::metrics::set_checkpoint_error(self.index, Some(e.to_string()));
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The totals retired since the last checkpoint, named for the store.
    fn retired_named(&mut self) -> Checkpoint {
        let retired = self.open.take_unwritten();
        Checkpoint {
            retired_billing: retired
                .billing
                .into_iter()
                .map(|(k, q)| (self.names.billing_key(&k), q))
                .collect(),
            retired_totals: retired
                .totals
                .into_iter()
                .map(|((k, level), m)| ((self.names.usage_key(&k), level), m))
                .collect(),
            retired_costs: retired
                .costs
                .into_iter()
                .map(|((owner, _, start), c)| ((self.names.owner_named(owner), start), c))
                .collect(),
            ..Checkpoint::default()
        }
    }

    /// Right after a checkpoint (everything is in the store): idle series and long-billed
    /// windows leave memory. Looked for once the horizon has moved a base window, not at every
    /// checkpoint (each look scans every series).
    fn retire_idle(&mut self, cluster: ClusterProgress) {
        let horizon_ms = self.watermark_ms.saturating_sub(self.idle_ms);
        if horizon_ms
            >= self
                .checkpoints
                .retired_through_ms
                .saturating_add(self.config.window_ms)
        {
            self.checkpoints.retired_through_ms = horizon_ms;
            let (allocations, readings) = self.feeder.retire(horizon_ms);
            self.ledger.retire(
                cluster
                    .watermark_ms
                    .saturating_sub(self.config.allowed_lateness_ms)
                    .saturating_sub(self.idle_ms),
            );
            METRICS
                .series_retired
                .inc_by((allocations + readings) as u64);
        }
        METRICS.series_revived.inc_by(self.feeder.take_revived());
    }
}
