//! Delivery of sample batches to Kafka with rdkafka's idempotent producer.

use std::time::Duration;

use meterflow_schemas::{EncodeError, Record, SampleBatch, topics};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Why a batch was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot create the Kafka producer for {brokers}: {source}")]
    Create { brokers: String, source: KafkaError },
    #[error("batch {sequence} of node {node} was not acknowledged by the broker: {source}")]
    Delivery {
        node: String,
        sequence: i64,
        source: KafkaError,
    },
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Sends [`SampleBatch`]es to `meterflow.samples`, keyed by node so that one node's batches
/// stay in order on one partition.
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
}

impl Publisher {
    /// Connects to `brokers` (a comma-separated `host:port` list).
    pub fn new(brokers: &str) -> Result<Self, PublishError> {
        let producer = ClientConfig::from_iter(meterflow_schemas::kafka::properties())
            .set("bootstrap.servers", brokers)
            // Retries after a lost acknowledgement must not write a batch twice.
            .set("enable.idempotence", "true")
            // A batch counts as sent only once every in-sync replica has it.
            .set("acks", "all")
            // Small batches: a tick is one message per node, latency matters more than size.
            .set("linger.ms", "5")
            // Give up on one attempt after 30 s; the agent keeps the batch and tries again.
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(|source| PublishError::Create {
                brokers: brokers.to_string(),
                source,
            })?;
        Ok(Self {
            producer,
            topic: topics::SAMPLES.to_string(),
        })
    }

    /// Encodes and sends one batch; returns once the broker has acknowledged it.
    pub async fn publish(&self, batch: &SampleBatch) -> Result<(i32, i64), PublishError> {
        let payload = batch.encode()?;
        let record = FutureRecord::to(&self.topic)
            .key(batch.node.as_bytes())
            .payload(&payload);
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((source, _)) => Err(PublishError::Delivery {
                node: batch.node.clone(),
                sequence: batch.sequence,
                source,
            }),
        }
    }
}
