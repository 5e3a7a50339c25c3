//! The embedded broker stays bounded: on SQLite storage, the topics `--retention` creates
//! drop records older than it at each maintenance, and the compacted usage topic keeps one
//! record per key. (Its memory storage keeps every record; `--retention` there is refused.)
//! `meterflow demo` runs its broker this way.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::common::{KillOnDrop, read_all};

/// Sends `records` to `topic`, each stamped `age` before now (its CreateTime, which
/// retention goes by).
fn produce(brokers: &str, topic: &str, records: &[(&str, String)], age: Duration) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    let stamp = (now - age).as_millis() as i64;
    for (key, payload) in records {
        producer
            .send(
                BaseRecord::to(topic)
                    .key(*key)
                    .payload(payload)
                    .timestamp(stamp),
            )
            .expect("queued");
    }
    producer.flush(Duration::from_secs(10)).expect("delivered");
}

#[test]
fn the_embedded_broker_drops_records_past_retention_and_compacts_usage() {
    use meterflow_schemas::topics::{SAMPLES, USAGE};
    let dir = tempfile::tempdir().expect("broker dir");
    let brokers = crate::common::free_addr().to_string();
    let _broker = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args(["broker", "--listen", &brokers])
            .args(["--storage", "sqlite://broker.db?maintenance_interval=1s"])
            .args(["--partitions", "1", "--retention", "1h"])
            .current_dir(dir.path())
            .env("MF_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the broker starts"),
    );
    let client = |group: &str| {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &brokers).set("group.id", group);
        c
    };
    let watermarks = |topic: &str| {
        let consumer: BaseConsumer = client("meterflow-test-retention").create().expect("client");
        consumer
            .fetch_watermarks(topic, 0, Duration::from_secs(5))
            .expect("watermarks")
    };
    // The broker is up once it answers with the topics it created.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::panic::catch_unwind(|| watermarks(SAMPLES)).is_err() {
        assert!(Instant::now() < deadline, "the broker never answered");
        std::thread::sleep(Duration::from_millis(200));
    }

    // 50 records stamped two hours ago, 10 stamped now, and a usage key written twice.
    let old: Vec<(&str, String)> = (0..50).map(|i| ("node-a", format!("old {i}"))).collect();
    let new: Vec<(&str, String)> = (0..10).map(|i| ("node-a", format!("new {i}"))).collect();
    produce(&brokers, SAMPLES, &old, Duration::from_secs(7200));
    produce(&brokers, SAMPLES, &new, Duration::ZERO);
    let usage = [("a", "a1".into()), ("b", "b1".into()), ("a", "a2".into())];
    produce(&brokers, USAGE, &usage, Duration::ZERO);

    // Within a few maintenances, the old records are gone and the new ones are all there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let kept = loop {
        let kept: Vec<String> = read_all(client("meterflow-test-read"), SAMPLES, 1)
            .into_iter()
            .map(|(_, _, payload)| String::from_utf8(payload).expect("text"))
            .collect();
        if !kept.iter().any(|p| p.starts_with("old")) || Instant::now() > deadline {
            break kept;
        }
    };
    let expected: Vec<String> = new.iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(
        kept, expected,
        "records past retention are dropped, newer ones kept"
    );
    // All 60 were written (the log's end), the first 50 are gone (its start).
    assert_eq!(
        watermarks(SAMPLES),
        (50, 60),
        "offsets go on from where they were"
    );
    // The usage topic is compacted, not expired: the latest value of each key, and only it.
    let usage: Vec<(Vec<u8>, Vec<u8>)> = read_all(client("meterflow-test-read"), USAGE, 1)
        .into_iter()
        .map(|(_, key, payload)| (key.expect("keyed"), payload))
        .collect();
    assert_eq!(
        usage,
        vec![
            (b"b".to_vec(), b"b1".to_vec()),
            (b"a".to_vec(), b"a2".to_vec())
        ]
    );
}

/// `meterflow ARGS` fails, saying `why`.
fn refused(args: &[&str], why: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args(args)
        .output()
        .expect("meterflow runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(why),
        "{args:?}: {err}"
    );
}

#[test]
fn retention_on_memory_storage_is_refused_saying_why() {
    refused(
        &["broker", "--listen", "127.0.0.1:0", "--retention", "1h"],
        "--retention needs --storage sqlite://FILE",
    );
    // tansu would open an absolute path under its working directory.
    refused(
        &[
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            "sqlite:///var/lib/broker.db",
        ],
        "relative to its working directory",
    );
}
