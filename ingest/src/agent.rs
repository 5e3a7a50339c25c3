//! The agent's run loop: tick a source every interval and publish what it yields, in order.
//!
//! A batch the broker did not acknowledge stays at the head of an in-memory queue and is sent
//! again before anything newer, so a broker hiccup delays batches but never reorders or drops
//! them while the process lives. (The durable RocksDB spool that survives restarts is the
//! agent's next step, SPEC: delivery guarantees.)

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meterflow_schemas::SampleBatch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::publisher::{PublishError, Publisher};
use crate::simulator::{Fleet, FleetConfig};

/// Configuration of an agent whose source is the simulated fleet.
#[derive(Debug, Clone)]
pub struct SimulatedAgentConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The fleet to simulate.
    pub fleet: FleetConfig,
    /// Time between two ticks.
    pub interval: Duration,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs the simulated fleet in real time until `shutdown` is cancelled.
pub async fn run_simulated(
    config: SimulatedAgentConfig,
    shutdown: CancellationToken,
) -> Result<(), PublishError> {
    let publisher = Publisher::new(&config.brokers)?;
    let mut fleet = Fleet::new(config.fleet.clone(), now_ms());
    let mut queue: VecDeque<SampleBatch> = VecDeque::new();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        nodes = config.fleet.nodes,
        seed = config.fleet.seed,
        "simulated agent started"
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        queue.extend(fleet.tick(now_ms()));
        while let Some(batch) = queue.front() {
            let sent = tokio::select! {
                _ = shutdown.cancelled() => break,
                sent = publisher.publish(batch) => sent,
            };
            match sent {
                Ok((partition, offset)) => {
                    debug!(node = %batch.node, sequence = batch.sequence, partition, offset, "batch delivered");
                    queue.pop_front();
                }
                Err(e) => {
                    warn!(error = %e, queued = queue.len(), "delivery failed; will retry in order");
                    break;
                }
            }
        }
    }
    info!(unsent = queue.len(), "simulated agent stopped");
    Ok(())
}
