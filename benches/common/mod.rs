//! What several benches share: publishing encoded batches to the embedded broker, and the
//! process's resident memory.

#![allow(dead_code)]

use std::time::Duration;

use meterflow::broker::{self, BrokerConfig, EmbeddedBroker};
use meterflow::topics::{self, TopicsConfig};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

/// Data time starts at 2026-01-01T00:00:00Z, so no sample is refused as too old or too new.
pub const T0: i64 = 1_767_225_600_000;

/// An embedded broker on loopback (memory storage) with Meterflow's topics of `partitions`
/// partitions; returns it and its bootstrap address.
pub fn broker_with_topics(
    runtime: &tokio::runtime::Runtime,
    partitions: i32,
) -> (EmbeddedBroker, String) {
    let broker = runtime
        .block_on(broker::start(BrokerConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            storage: "memory".into(),
        }))
        .expect("embedded broker");
    let brokers = broker.bootstrap();
    runtime
        .block_on(topics::ensure(
            &brokers,
            &TopicsConfig {
                partitions,
                replication: 1,
                retention: None,
            },
        ))
        .expect("topics");
    (broker, brokers)
}

/// A producer as an agent's: idempotent, batching for 20 ms.
pub fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create()
        .expect("producer")
}

/// Sends one record keyed by `key`, waiting while the producer's queue is full.
pub fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: &[u8],
) {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Waits until every record sent is acknowledged.
pub fn flush(producer: &ThreadedProducer<DefaultProducerContext>) {
    producer
        .flush(Duration::from_secs(300))
        .expect("every batch acknowledged");
}

/// This process's resident set size, from `/proc/self/status` (0 where there is none).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The bytes of the files under `dir`, its subdirectories included (a RocksDB directory).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
