//! The processor through Kafka, as it runs in production: the embedded broker on loopback, the
//! real `meterflow_processor::run` with a RocksDB checkpoint, and two runs.
//!
//! 1. One hour of a simulated fleet (15 s ticks) is published to `meterflow.samples` and the
//!    processor reads it from the beginning until it has caught up, then stops with a
//!    checkpoint. Reported: its throughput, and the checkpoint's bytes per active series.
//! 2. A second hour is published while no processor runs (an hour of backlog); a new processor
//!    restores the checkpoint and reads until caught up. Reported: the time to catch up.
//!
//! `cargo bench --bench processor_restart -- [NODES] [WORKERS]` (defaults 100 nodes, 1 worker).

use std::path::Path;
use std::time::{Duration, Instant};

use meterflow_ingest::{Fleet, FleetConfig};
use meterflow_processor::checkpoint::Store;
use meterflow_processor::{ProcessorConfig, run};
use meterflow_schemas::{Record, topics as names};
use tokio_util::sync::CancellationToken;

mod common;
use common::T0;

const TICK_MS: i64 = 15_000;
const TICKS_PER_HOUR: i64 = 3_600_000 / TICK_MS;
const PARTITIONS: i32 = 4;

/// Publishes ticks `from..to` of the fleet; returns (batches, samples).
fn publish(brokers: &str, fleet: &mut Fleet, from: i64, to: i64) -> (usize, usize) {
    let producer = common::producer(brokers);
    let (mut batches, mut samples) = (0, 0);
    for t in from..to {
        for batch in fleet.tick(T0 + t * TICK_MS) {
            let bytes = batch.encode().expect("simulated batches encode");
            samples += batch.samples.len();
            batches += 1;
            common::send(&producer, names::SAMPLES, &batch.node, &bytes);
        }
    }
    common::flush(&producer);
    (batches, samples)
}

/// Runs a processor until it has caught up with the input; returns the wall time.
fn process(brokers: &str, state_dir: &Path, workers: usize) -> Duration {
    let config = ProcessorConfig {
        workers,
        state_dir: Some(state_dir.to_path_buf()),
        exit_when_caught_up: true,
        ..ProcessorConfig::new(brokers)
    };
    let start = Instant::now();
    run(config, CancellationToken::new()).expect("processor run");
    start.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let nodes: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100);
    let workers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);

    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let (broker, brokers) = common::broker_with_topics(&runtime, PARTITIONS);
    let state = tempfile::tempdir().expect("state dir");
    let mut fleet = Fleet::new(
        FleetConfig {
            nodes,
            seed: 42,
            ..FleetConfig::default()
        },
        T0,
    );

    let start = Instant::now();
    let (batches, samples) = publish(&brokers, &mut fleet, 1, TICKS_PER_HOUR + 1);
    println!(
        "hour 1: {nodes} nodes x {TICKS_PER_HOUR} ticks = {batches} batches, {samples} samples, published in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let took = process(&brokers, state.path(), workers);
    println!(
        "hour 1, from the beginning, {workers} worker(s): {:.1} s, {:.0} samples/s (Kafka fetch, decode, dataflow, usage and billing produce, checkpoints)",
        took.as_secs_f64(),
        samples as f64 / took.as_secs_f64()
    );

    // State: every series the checkpoint holds, and the bytes of the RocksDB directory after
    // the store compacts (the processor has stopped, so the directory is ours).
    {
        let store = Store::open(state.path()).expect("open the checkpoint");
        let (mut series, mut windows) = (0usize, 0usize);
        for p in 0..PARTITIONS {
            let s = store.load_partition(p).expect("partition state");
            series += s.allocations.len() + s.readings.len();
            windows += s.windows.len();
        }
        store.compact();
        drop(store);
        let bytes = common::dir_bytes(state.path());
        println!(
            "checkpoint after hour 1: {series} series, {windows} series-windows, {bytes} bytes on disk = {:.0} bytes per series (every series seen in the hour, with its windows)",
            bytes as f64 / series.max(1) as f64
        );
    }

    let start = Instant::now();
    let (batches, samples) = publish(
        &brokers,
        &mut fleet,
        TICKS_PER_HOUR + 1,
        2 * TICKS_PER_HOUR + 1,
    );
    println!(
        "hour 2 (the backlog): {batches} batches, {samples} samples, published in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let took = process(&brokers, state.path(), workers);
    println!(
        "catch-up after a restart with 1 h of backlog, {workers} worker(s): {:.1} s ({:.0} samples/s, including the checkpoint restore and the 1 s restart grace)",
        took.as_secs_f64(),
        samples as f64 / took.as_secs_f64()
    );
    broker.stop();
}
