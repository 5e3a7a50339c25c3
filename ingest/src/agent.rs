//! The agent's run loop: tick a collector (the simulated fleet, or this node's sources) every
//! interval and publish what it yields, in order.
//!
//! With a spool ([`crate::spool`]) every batch is stored before it is sent and removed once the
//! broker acknowledged it; a batch not acknowledged stays at the head and is sent again before
//! anything newer, across broker outages and agent restarts. Without one (the demo), the same
//! order is kept in memory while the process lives.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meterflow_schemas::{Record, SampleBatch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::metrics::{self, METRICS};
use crate::node::NodeCollector;
use crate::publisher::{PublishError, Publisher};
use crate::simulator::{Fleet, FleetConfig};
use crate::sources::BoxFuture;
use crate::spool::Spool;

/// What the run loop ticks: makes the batches of one tick.
pub trait Collect: Send {
    fn tick(&mut self, now_ms: i64) -> BoxFuture<'_, Vec<SampleBatch>>;
}

impl Collect for Fleet {
    fn tick(&mut self, now_ms: i64) -> BoxFuture<'_, Vec<SampleBatch>> {
        // Each simulated node's collector marks its source, `simulator`, up.
        let batches = Fleet::tick(self, now_ms);
        Box::pin(async move { batches })
    }
}

impl Collect for NodeCollector {
    fn tick(&mut self, now_ms: i64) -> BoxFuture<'_, Vec<SampleBatch>> {
        Box::pin(async move {
            let batch = NodeCollector::tick(self, now_ms).await;
            METRICS.unattributed_pods.set(self.unattributed_pods());
            vec![batch]
        })
    }
}

/// How the run loop delivers.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Time between two ticks.
    pub interval: Duration,
    /// The durable spool, when there is one.
    pub spool: Option<SpoolConfig>,
}

/// Configuration of an agent whose source is the simulated fleet.
#[derive(Debug, Clone)]
pub struct SimulatedAgentConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The fleet to simulate.
    pub fleet: FleetConfig,
    /// Time between two ticks.
    pub interval: Duration,
    /// The durable spool, when there is one.
    pub spool: Option<SpoolConfig>,
}

/// Where the spool lives and how much it may hold.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: std::path::PathBuf,
    pub max_bytes: u64,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Batches made while the spool could not store them, oldest first, held in memory up to the
/// spool's own limit. Their encoded size is measured only once the spool fails, so the usual
/// path (stored at once) encodes each batch once.
#[derive(Default)]
struct Unstored {
    batches: VecDeque<(SampleBatch, Option<u64>)>,
    /// The measured sizes, summed.
    bytes: u64,
    /// Dropped at the limit since the spool last stored everything.
    dropped: u64,
}

impl Unstored {
    fn extend(&mut self, batches: Vec<SampleBatch>) {
        self.batches.extend(batches.into_iter().map(|b| (b, None)));
    }

    fn len(&self) -> usize {
        self.batches.len()
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Drops the oldest while more than `max_bytes` are held (the spool's own policy).
    fn cap(&mut self, max_bytes: u64) {
        for (batch, size) in self.batches.iter_mut().filter(|(_, s)| s.is_none()) {
            let measured = batch.encode().map_or(0, |b| b.len() as u64);
            *size = Some(measured);
            self.bytes += measured;
        }
        while self.bytes > max_bytes && self.batches.len() > 1 {
            let Some((_, size)) = self.batches.pop_front() else {
                break;
            };
            self.bytes -= size.unwrap_or(0);
            self.dropped += 1;
            METRICS.spool_dropped.inc();
        }
    }
}

/// Logs a spool failure and shows it in the health answer.
fn report_spool_error(e: &crate::spool::SpoolError) {
    if crate::metrics::spool_error().is_none() {
        error!(error = %e, "the spool cannot write; batches are held in memory up to its limit, and health says unhealthy until it can");
    }
    crate::metrics::set_spool_error(Some(e.to_string()));
}

/// Stores the unstored batches in order, reopening the spool first if a write failed before.
/// What cannot be stored stays in memory (up to the spool's limit) for the next tick.
fn store(spool: &mut Spool, unstored: &mut Unstored) {
    if spool.is_broken() {
        if let Err(e) = spool.reopen() {
            report_spool_error(&e);
            unstored.cap(spool.max_bytes());
            return;
        }
        info!(held = spool.len(), "spool reopened");
    }
    while let Some((batch, size)) = unstored.batches.front_mut() {
        // The spool numbers the batch: sequences keep rising across restarts.
        let dropped = spool.dropped();
        if let Err(e) = spool.push(batch) {
            report_spool_error(&e);
            unstored.cap(spool.max_bytes());
            return;
        }
        METRICS.spool_dropped.inc_by(spool.dropped() - dropped);
        unstored.bytes -= size.unwrap_or(0);
        unstored.batches.pop_front();
    }
    if crate::metrics::spool_error().is_some() && !spool.is_broken() {
        info!(
            dropped_while_failing = unstored.dropped,
            "the spool writes again"
        );
        unstored.dropped = 0;
        crate::metrics::set_spool_error(None);
    }
}

/// Runs the simulated fleet in real time until `shutdown` is cancelled.
pub async fn run_simulated(
    config: SimulatedAgentConfig,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    info!(
        nodes = config.fleet.nodes,
        seed = config.fleet.seed,
        "simulated agent started"
    );
    let fleet = Fleet::new(config.fleet.clone(), now_ms());
    let run = RunConfig {
        brokers: config.brokers,
        interval: config.interval,
        spool: config.spool,
    };
    self::run(run, fleet, shutdown).await
}

/// Ticks `collector` every interval until `shutdown` is cancelled, delivering every batch in
/// order through the spool.
pub async fn run(
    config: RunConfig,
    mut collector: impl Collect,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let publisher = Publisher::new(&config.brokers)?;
    let mut spool = match &config.spool {
        Some(s) => {
            let spool = Spool::open(&s.dir, s.max_bytes)?;
            info!(dir = %s.dir.display(), held = spool.len(), "spool opened; held batches go first");
            Some(spool)
        }
        None => None,
    };
    let mut queue: VecDeque<SampleBatch> = VecDeque::new();
    // Batches the spool could not store yet (a full disk), oldest first.
    let mut unstored = Unstored::default();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Collecting never waits for the broker: each tick's batches go into the spool whatever the
    // send in flight is doing (a broker that is away holds a send for up to its timeout). One
    // batch is in flight at a time, the oldest held; after a failure the next try waits for
    // the next tick.
    let publisher = std::sync::Arc::new(publisher);
    type Sending = tokio::task::JoinHandle<Result<(i32, i64), PublishError>>;
    let mut inflight: Option<(u64, SampleBatch, Sending)> = None;
    let mut paused = false;
    loop {
        if inflight.is_none() && !paused {
            let next = match spool.as_ref() {
                Some(spool) => spool.front().unwrap_or_else(|e| {
                    // Reopened on the next tick; nothing goes out until then.
                    warn!(error = %e, "the spool cannot be read");
                    None
                }),
                None => queue.front().cloned().map(|b| (0, b)),
            };
            match next {
                Some((position, batch)) => {
                    METRICS
                        .send_lag_seconds
                        .set((now_ms() - batch.collected_at_ms).max(0) as f64 / 1000.0);
                    if let Some(spool) = spool.as_mut() {
                        spool.pin(Some(position));
                    }
                    let (publisher, sent) = (publisher.clone(), batch.clone());
                    let sending = tokio::spawn(async move { publisher.publish(&sent).await });
                    inflight = Some((position, batch, sending));
                }
                None => METRICS.send_lag_seconds.set(0.0),
            }
        }
        let delivered = async {
            match inflight.as_mut() {
                Some((_, _, sending)) => Some(sending.await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                paused = false;
                let batches = collector.tick(now_ms()).await;
                match spool.as_mut() {
                    Some(spool) => {
                        unstored.extend(batches);
                        store(spool, &mut unstored);
                    }
                    None => queue.extend(batches),
                }
            }
            Some(sent) = delivered => {
                let Some((position, batch, _)) = inflight.take() else { continue };
                if let Some(spool) = spool.as_mut() {
                    spool.pin(None);
                }
                match sent {
                    Ok(Ok((partition, offset))) => {
                        debug!(node = %batch.node, sequence = batch.sequence, partition, offset, "batch delivered");
                        METRICS.sent.inc();
                        metrics::set_broker_error(None);
                        match spool.as_mut() {
                            Some(spool) => {
                                if let Err(e) = spool.remove(position) {
                                    report_spool_error(&e);
                                }
                            }
                            None => {
                                queue.pop_front();
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        METRICS.send_failures.inc();
                        metrics::set_broker_error(Some(e.to_string()));
                        let held = spool.as_ref().map_or(queue.len(), Spool::len);
                        warn!(error = %e, held, "delivery failed; will retry in order");
                        paused = true;
                    }
                    Err(e) => {
                        METRICS.send_failures.inc();
                        warn!(error = %e, "the send task failed; will retry in order");
                        paused = true;
                    }
                }
            }
        }
        let (batches, bytes) = spool
            .as_ref()
            .map_or((queue.len(), 0), |s| (s.len(), s.bytes()));
        METRICS.spool_batches.set(batches as i64);
        METRICS.spool_bytes.set(bytes as i64);
        METRICS.spool_unstored.set(unstored.len() as i64);
        if let Some((_, batch, _)) = &inflight {
            // The oldest batch not acknowledged is the one in flight: its age grows through an
            // outage, not only when the next send starts.
            METRICS
                .send_lag_seconds
                .set((now_ms() - batch.collected_at_ms).max(0) as f64 / 1000.0);
        }
    }
    if let Some((_, _, sending)) = inflight {
        // Delivered or not, the batch stays in the spool until acknowledged.
        sending.abort();
    }
    if !unstored.is_empty() {
        error!(
            lost = unstored.len(),
            "agent stopped with batches the spool could not store (a full disk?); they are lost"
        );
    }
    let unsent = spool.as_ref().map_or(queue.len(), Spool::len);
    info!(unsent, "agent stopped");
    Ok(())
}
