//! Creates Meterflow's topics with rdkafka's admin client; existing topics are left alone.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use meterflow_schemas::topics;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use tracing::info;

/// How to create the topics.
#[derive(Debug, Clone)]
pub struct TopicsConfig {
    /// Partitions of each topic; `meterflow.samples` partitions spread nodes over workers.
    pub partitions: i32,
    /// Replicas of each partition (1 for the embedded broker, 3 for a production cluster).
    pub replication: i32,
    /// How long the topics it creates keep a record (`retention.ms`, `cleanup.policy` delete),
    /// all but the usage topic, which is compacted; `None`: the cluster's default.
    pub retention: Option<Duration>,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            partitions: 4,
            replication: 1,
            retention: None,
        }
    }
}

/// Creates every topic in [`topics::ALL`] that does not exist yet.
pub async fn ensure(brokers: &str, config: &TopicsConfig) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::from_iter(meterflow_schemas::kafka::properties())
            .set("bootstrap.servers", brokers)
            .create()
            .with_context(|| format!("cannot create a Kafka admin client for {brokers}"))?;
    let retention_ms = config.retention.map(|r| r.as_millis().to_string());
    let new: Vec<NewTopic> = topics::ALL
        .iter()
        .map(|name| {
            let t = NewTopic::new(
                name,
                config.partitions,
                TopicReplication::Fixed(config.replication),
            );
            // The usage topic holds the latest value per aggregate id: compaction keeps it small.
            match (*name == topics::USAGE, &retention_ms) {
                (true, _) => t.set("cleanup.policy", "compact"),
                (false, Some(ms)) => t.set("cleanup.policy", "delete").set("retention.ms", ms),
                (false, None) => t,
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &options)
        .await
        .with_context(|| format!("cannot reach the Kafka brokers at {brokers} to create topics"))?;
    let mut not_allowed = Vec::new();
    for result in results {
        match result {
            Ok(name) => info!(topic = %name, partitions = config.partitions, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            // A cluster that keeps topic creation to its operators answers this even for a
            // topic that exists: whether it does is asked next.
            Err((
                name,
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::PolicyViolation,
            )) => not_allowed.push(name),
            Err((name, code)) => bail!("cannot create topic {name}: {code}"),
        }
    }
    if !not_allowed.is_empty() {
        let metadata = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .with_context(|| format!("cannot read the topics of {brokers}"))?;
        let missing: Vec<&String> = not_allowed
            .iter()
            .filter(|name| {
                !metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == name.as_str() && !t.partitions().is_empty())
            })
            .collect();
        if !missing.is_empty() {
            bail!(
                "topics {missing:?} do not exist and this client may not create them: create them on the cluster (docs/existing-kafka.md lists their settings) or grant CREATE"
            );
        }
    }
    Ok(())
}
