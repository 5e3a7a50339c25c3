//! Consumes `meterflow.usage`, `meterflow.billing` and `meterflow.alerts` into the [`Store`],
//! resuming from the offsets stored with the data.

use std::sync::Arc;
use std::time::Duration;

use meterflow_schemas::{Record, topics};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::store::{Consumed, Store, StoreError};

/// Why the consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("Kafka client error ({context}): {source}")]
    Kafka {
        context: &'static str,
        source: KafkaError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Most records applied in one RocksDB write.
const MAX_BATCH: usize = 1_000;

/// Reads usage updates, billing records and alerts and applies them until `shutdown` is
/// cancelled.
pub async fn consume(
    brokers: String,
    store: Arc<Store>,
    metrics: Metrics,
    updated: Arc<tokio::sync::watch::Sender<u64>>,
    shutdown: CancellationToken,
) -> Result<(), ConsumeError> {
    let usage = consume_topic(
        Topic {
            name: topics::USAGE,
            apply: Store::apply,
            watch_lag: true,
        },
        (&brokers, &store, &metrics, &updated),
        &shutdown,
    );
    // What was billed (`period.billed`) is read from the billing stream itself.
    let billing = consume_topic(
        Topic {
            name: topics::BILLING,
            apply: Store::apply_billing,
            watch_lag: false,
        },
        (&brokers, &store, &metrics, &updated),
        &shutdown,
    );
    // Budget alerts, for the tenant's routes, feed and dashboard.
    let alerts = consume_topic(
        Topic {
            name: topics::ALERTS,
            apply: Store::apply_alerts,
            watch_lag: false,
        },
        (&brokers, &store, &metrics, &updated),
        &shutdown,
    );
    let (usage, billing, alerts) = tokio::join!(usage, billing, alerts);
    usage.and(billing).and(alerts)
}

/// A topic the sink consumes: its records and how they are stored.
struct Topic<R> {
    name: &'static str,
    apply: fn(&Store, &[Consumed<R>]) -> Result<(), StoreError>,
    /// Whether its lag is `meterflow_sink_consumer_lag_records`.
    watch_lag: bool,
}

/// Consumes `topic` into the store from the offsets stored with the data, until `shutdown`.
async fn consume_topic<R: Record>(
    topic: Topic<R>,
    (brokers, store, metrics, updated): (
        &str,
        &Arc<Store>,
        &Metrics,
        &Arc<tokio::sync::watch::Sender<u64>>,
    ),
    shutdown: &CancellationToken,
) -> Result<(), ConsumeError> {
    let kafka =
        |context: &'static str| move |source: KafkaError| ConsumeError::Kafka { context, source };
    let consumer: StreamConsumer =
        ClientConfig::from_iter(meterflow_schemas::kafka::follower_properties())
            .set("bootstrap.servers", brokers)
            // Partitions are assigned explicitly; the group id only names the client.
            .set("group.id", "meterflow-sink")
            // Offsets live in RocksDB next to the data they produced, never in Kafka.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A resume position below the log's start (retention) means: from the start.
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(kafka("create consumer"))?;

    let partitions = loop {
        // The brokers may be away or slow to answer (starting, overloaded): keep serving the
        // views there are, not ready, and ask again.
        match consumer.fetch_metadata(Some(topic.name), Duration::from_secs(5)) {
            Ok(metadata) => match metadata.topics().iter().find(|t| t.name() == topic.name) {
                Some(t) if !t.partitions().is_empty() => break t.partitions().len() as i32,
                _ => {}
            },
            Err(e) => {
                metrics.errors.with_label_values(&["kafka"]).inc();
                warn!(topic = topic.name, error = %e, "cannot read the topics from the brokers yet; asking again");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    let stored = store.offsets(topic.name)?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        // Started early and skipped below (see `topics::RESUME_REWIND`).
        let offset = stored.get(&p).map_or(Offset::Beginning, |o| {
            Offset::Offset(topics::resume_from(*o, 0))
        });
        assignment
            .add_partition_offset(topic.name, p, offset)
            .map_err(kafka("assign"))?;
    }
    consumer.assign(&assignment).map_err(kafka("assign"))?;
    let lag = topic.watch_lag.then(|| {
        metrics.ready.set(1);
        let (brokers, store, metrics, shutdown) = (
            brokers.to_string(),
            store.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::task::spawn_blocking(move || {
            watch_lag(&brokers, partitions, &store, &metrics, &shutdown)
        })
    });
    info!(
        partitions,
        resumed = stored.len(),
        "sink consuming {}",
        topic.name
    );

    let mut batch: Vec<Consumed<R>> = Vec::with_capacity(MAX_BATCH);
    loop {
        // Wait for one message, then take whatever else is ready, up to a batch.
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        let mut next = Some(first);
        while let Some(received) = next.take() {
            match received {
                Ok(m)
                    if stored
                        .get(&m.partition())
                        .is_some_and(|next| m.offset() < *next) => {}
                Ok(m) => match R::decode(m.payload().unwrap_or_default()) {
                    Ok(update) => batch.push(Consumed {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        update,
                    }),
                    Err(e) => {
                        metrics.errors.with_label_values(&[e.reason()]).inc();
                        warn!(topic = topic.name, partition = m.partition(), offset = m.offset(), error = %e, "undecodable record skipped");
                    }
                },
                Err(e) => {
                    metrics.errors.with_label_values(&["kafka"]).inc();
                    warn!(error = %e, "consumer error");
                }
            }
            if batch.len() < MAX_BATCH {
                next = tokio::time::timeout(Duration::from_millis(5), consumer.recv())
                    .await
                    .ok();
            }
        }
        if !batch.is_empty() {
            let started = std::time::Instant::now();
            (topic.apply)(store, &batch)?;
            metrics
                .apply_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.apply_batch_records.observe(batch.len() as f64);
            metrics
                .applied
                .with_label_values(&[topic.name])
                .inc_by(batch.len() as u64);
            updated.send_modify(|n| *n += 1);
            if let Some(w) = store.watermark_ms()? {
                metrics.watermark_seconds.set(w as f64 / 1000.0);
            }
            debug!(records = batch.len(), topic = topic.name, "records applied");
            batch.clear();
        }
    }
    if let Some(lag) = lag {
        let _ = lag.await;
    }
    Ok(())
}

/// How often the consumer lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(2);

/// Until `shutdown`: every [`LAG_EVERY`], the records on `meterflow.usage` not yet stored (the
/// log end of each partition less the next offset the store holds), into
/// `meterflow_sink_consumer_lag_records`. Its own client, so the blocking calls never hold up
/// the consumer.
fn watch_lag(
    brokers: &str,
    partitions: i32,
    store: &Store,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let client: Result<BaseConsumer, _> =
        ClientConfig::from_iter(meterflow_schemas::kafka::properties())
            .set("bootstrap.servers", brokers)
            .set("group.id", "meterflow-sink-lag")
            .set("enable.auto.commit", "false")
            .create();
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot measure the consumer lag");
            return;
        }
    };
    while !shutdown.is_cancelled() {
        let stored = store.offsets(topics::USAGE).unwrap_or_default();
        let mut lag = 0;
        let mut known = true;
        for p in 0..partitions {
            match client.fetch_watermarks(topics::USAGE, p, Duration::from_secs(2)) {
                Ok((low, high)) => lag += (high - stored.get(&p).copied().unwrap_or(low)).max(0),
                Err(e) => {
                    debug!(error = %e, partition = p, "log end not known");
                    known = false;
                }
            }
        }
        if known {
            metrics.consumer_lag.set(lag);
        }
        let next = std::time::Instant::now() + LAG_EVERY;
        while std::time::Instant::now() < next && !shutdown.is_cancelled() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
