//! Processor throughput on one machine, the same simulated input in every mode:
//!
//! - **decode only**: the batches' Avro decoded, nothing else (the baseline of this run);
//! - **dataflow only**: decoded, validated and fed to the differential dataflow without Kafka,
//!   one epoch per fleet tick, with 1 and 2 workers; the state it holds per series is measured
//!   here, where no broker shares the process's memory;
//! - **backlog**: the real processor (`meterflow_processor::run`) reads the whole input from
//!   the embedded broker, produces usage and billing and writes RocksDB checkpoints, with 1
//!   and 2 workers, until it has caught up; then again with 1 worker feeding no more per epoch
//!   than live (`--max-catch-up-batch` = `--max-batch`), the baseline of the catch-up epochs;
//! - **live**: one worker keeps up as the fleet reports, one tick at a time (every node's batch
//!   of a tick published, then the next once the processor has taken it in), checkpointing at
//!   every epoch as at a real 15-s pace. Its samples/s divide by the worker's busy time (every
//!   stage but waiting for input or for the broker's acknowledgements; the in-process broker's
//!   own CPU is not in it), and its share of one core is that busy time per tick over
//!   the 15 s a tick lasts.
//!
//! Each Kafka mode runs against a fresh embedded broker (memory storage) in this process. The
//! processor's time per stage comes from its own `meterflow_processor_stage_seconds_total`.
//!
//! `cargo bench --bench processor_throughput -- [NODES] [TICKS] [none|all] [RUN_MINUTES] [--json]`
//! (defaults 1,000 nodes, 60 ticks of 15 s, the first hour billed within them, with the hour, day and month roll-ups; `none`
//! leaves them out; RUN_MINUTES makes every container run between that many minutes and twice
//! as long instead of the simulator's 20 s to 5 min, as long-lived leases do). With `--json`
//! the last line is one JSON object of the figures. With `--state-only` it stops after the
//! dataflow-only runs: what a heap profiler (`heaptrack`) then sees is the state per series;
//! with `--live-only` it runs the live mode alone (for a profiler). With `--retire-windows` the
//! dataflow-only runs take closed windows' totals out as the processor does (10 minutes of
//! lateness behind each tick; the retired values are dropped, not stored, and nothing late
//! comes to bring one back); run it beside a run without, each in a process of its own, for
//! what the retirement saves.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use meterflow_ingest::{Fleet, FleetConfig};
use meterflow_processor::dataflow::{
    CostIdx, Costing, Installed, LevelIdx, Measured, Resolution, install,
};
use meterflow_processor::metrics::{self, METRICS, Stage};

/// The allocator the `meterflow` binary runs the processor with (see `src/main.rs`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use meterflow_processor::model::observe_ref;
use meterflow_processor::names::BillingIdx;
use meterflow_processor::names::Names;
use meterflow_processor::series::{Feeder, Rules};
use meterflow_processor::windows::{OpenTotals, RetiredTotals, TotalChanges};
use meterflow_processor::{PriceBook, ProcessorConfig, run};
use meterflow_schemas::{Record, SampleBatch, topics as names};
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod common;
use common::{T0, resident_bytes};

const TICK_MS: i64 = 15_000;
const PARTITIONS: i32 = 4;
/// The fleet's first tick is 4 minutes before an hour ends, so that the default 60 ticks
/// (15 min) carry the watermark past that hour's end and its 10 minutes of lateness: the hour
/// is billed within the run.
const START: i64 = T0 - 4 * 60_000 - TICK_MS;

/// The simulated input: per tick, each node's batch (its key and its bytes).
struct Input {
    ticks: Vec<Vec<(String, Vec<u8>)>>,
    samples: usize,
    bytes: usize,
}

impl Input {
    fn simulate(nodes: usize, ticks: i64, run_ms: (i64, i64)) -> Self {
        let mut fleet = Fleet::new(
            FleetConfig {
                nodes,
                seed: 42,
                run_ms,
                ..FleetConfig::default()
            },
            START,
        );
        let ticks: Vec<Vec<(String, Vec<u8>)>> = (1..=ticks)
            .map(|t| {
                fleet
                    .tick(START + t * TICK_MS)
                    .iter()
                    .map(|b| {
                        let bytes = b.encode().expect("simulated batches encode");
                        (b.node.clone(), bytes)
                    })
                    .collect()
            })
            .collect();
        let samples = ticks
            .iter()
            .flatten()
            .map(|(_, b)| SampleBatch::decode(b).expect("decodes").samples.len())
            .sum();
        let bytes = ticks.iter().flatten().map(|(_, b)| b.len()).sum();
        Self {
            ticks,
            samples,
            bytes,
        }
    }

    fn batches(&self) -> usize {
        self.ticks.iter().map(Vec::len).sum()
    }
}

fn main() {
    let json_wanted = std::env::args().any(|a| a == "--json");
    let state_only = std::env::args().any(|a| a == "--state-only");
    let live_only = std::env::args().any(|a| a == "--live-only");
    let retire = std::env::args().any(|a| a == "--retire-windows");
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let nodes: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let ticks: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(60);
    // Third argument `none`: without the hour, day and month roll-ups.
    let rollups: Vec<Resolution> = match args.get(2).map(String::as_str) {
        Some("none") => Vec::new(),
        _ => Resolution::ALL.to_vec(),
    };
    println!("roll-ups: {rollups:?}");
    let run_ms = match args.get(3).and_then(|a| a.parse::<i64>().ok()) {
        Some(minutes) => (minutes * 60_000, 2 * minutes * 60_000),
        None => FleetConfig::default().run_ms,
    };
    println!(
        "containers run {} to {} s",
        run_ms.0 / 1000,
        run_ms.1 / 1000
    );

    let input = Arc::new(Input::simulate(nodes, ticks, run_ms));
    println!(
        "input: {nodes} nodes x {ticks} ticks = {} batches, {} samples, {} bytes",
        input.batches(),
        input.samples,
        input.bytes
    );

    let decode = decode_only(&input);
    println!("baseline decode only       : {decode:>10.0} samples/s");

    let mut dataflow = Vec::new();
    for workers in [1usize, 2].into_iter().filter(|_| !live_only) {
        let r = dataflow_only(input.clone(), workers, &rollups, retire);
        println!(
            "dataflow only, {workers} worker(s)  : {:>10.0} samples/s ({:.3} s, {} output changes = {:.2} per sample)",
            r.samples_per_s,
            r.secs,
            r.changes,
            r.changes as f64 / input.samples as f64
        );
        println!(
            "  state: {} series; resident memory grew {} bytes = {:.0} bytes per active series (feeder, interner and arrangements, {}); {} totals held at the end",
            r.series,
            r.resident_growth,
            r.bytes_per_series,
            if retire {
                "closed windows retired"
            } else {
                "all windows kept"
            },
            r.held
        );
        dataflow.push(r);
    }
    if state_only {
        return;
    }

    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    if live_only {
        let live = through_kafka(&runtime, &input, 1, &rollups, Mode::Live);
        live.print("live, 1 worker             ", &input);
        return;
    }
    let mut backlog = Vec::new();
    for workers in [1usize, 2] {
        let r = through_kafka(&runtime, &input, workers, &rollups, Mode::Backlog);
        r.print(&format!("backlog, {workers} worker(s)       "), &input);
        backlog.push(r);
    }
    let small = through_kafka(&runtime, &input, 1, &rollups, Mode::BacklogSmallEpochs);
    small.print(
        "backlog, 1 worker, epochs of --max-batch (the baseline)",
        &input,
    );
    let live = through_kafka(&runtime, &input, 1, &rollups, Mode::Live);
    live.print("live, 1 worker             ", &input);
    let busy_per_tick = live.busy_secs() / ticks as f64;
    let core_share = busy_per_tick / (TICK_MS as f64 / 1000.0);
    println!(
        "  live: {:.3} s busy per tick of {nodes} nodes = {:.1} % of one core at the agents' 15-s pace",
        busy_per_tick,
        100.0 * core_share
    );

    if json_wanted {
        let figures = json!({
            "nodes": nodes,
            "ticks": ticks,
            "samples": input.samples,
            "rollups": rollups.iter().map(|r| r.name()).collect::<Vec<_>>(),
            "decode_samples_per_s": decode.round(),
            "dataflow_samples_per_s_1w": dataflow[0].samples_per_s.round(),
            "dataflow_samples_per_s_2w": dataflow[1].samples_per_s.round(),
            "backlog_samples_per_s_1w": backlog[0].samples_per_s(&input).round(),
            "backlog_samples_per_s_2w": backlog[1].samples_per_s(&input).round(),
            "live_samples_per_s_1w": live.busy_samples_per_s(&input).round(),
            "live_core_share_at_15s": (core_share * 1000.0).round() / 1000.0,
            "state_bytes_per_series": dataflow[0].bytes_per_series.round(),
            "output_records_per_sample": ((backlog[0].outputs() as f64 / input.samples as f64) * 1000.0).round() / 1000.0,
            "backlog_small_epochs_samples_per_s_1w": small.samples_per_s(&input).round(),
            "backlog_small_epochs_output_records_per_sample": ((small.outputs() as f64 / input.samples as f64) * 1000.0).round() / 1000.0,
            "live_output_records_per_sample": ((live.outputs() as f64 / input.samples as f64) * 1000.0).round() / 1000.0,
            "usage_records_by_kind": {
                "backlog_1w": backlog[0].kinds_json(),
                "live_1w": live.kinds_json(),
            },
            "stage_seconds": {
                "backlog_1w": backlog[0].stages_json(),
                "backlog_2w": backlog[1].stages_json(),
                "live_1w": live.stages_json(),
            },
        });
        println!("{figures}");
    }
}

/// Decodes every batch once: the rate the processor could reach if decoding were all it did.
fn decode_only(input: &Input) -> f64 {
    let start = Instant::now();
    let mut decoded = 0usize;
    for (_, b) in input.ticks.iter().flatten() {
        decoded += SampleBatch::decode(b).expect("decodes").samples.len();
    }
    decoded as f64 / start.elapsed().as_secs_f64()
}

/// A dataflow-only run's figures.
struct DataflowRun {
    /// Totals held by the retirement's bookkeeping at the end (0 when nothing retires).
    held: usize,
    samples_per_s: f64,
    secs: f64,
    changes: usize,
    series: usize,
    resident_growth: u64,
    bytes_per_series: f64,
}

/// Nowhere: the bench drops what it retires, and nothing late comes to bring it back.
struct Dropped;

impl RetiredTotals for Dropped {
    type Error = std::convert::Infallible;
    fn total(&self, _: &LevelIdx) -> Result<Option<Measured>, Self::Error> {
        Ok(None)
    }
    fn cost(&self, _: &CostIdx) -> Result<Option<i64>, Self::Error> {
        Ok(None)
    }
    fn billed(&self, _: &BillingIdx) -> Result<Option<i64>, Self::Error> {
        Ok(None)
    }
}

/// Decodes, validates and feeds the input to the dataflow in this process, one epoch per
/// tick, as the processor's workers do but without Kafka, outputs or checkpoints; with
/// `retire`, closed windows' totals leave the dataflow as in the processor.
fn dataflow_only(
    data: Arc<Input>,
    workers: usize,
    rollups: &[Resolution],
    retire: bool,
) -> DataflowRun {
    let rollups = rollups.to_vec();
    let samples = data.samples;
    // One interner for the process, as in the processor.
    let names = Arc::new(Names::default());
    let costing = Costing {
        names: names.clone(),
        prices: Arc::new(PriceBook::default()),
    };
    let before = resident_bytes();
    // All workers hold their state until worker 0 has measured it.
    let barrier = Arc::new(Barrier::new(workers));
    let start = Instant::now();
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let Installed {
            mut input,
            probe,
            usage,
            billing,
            rollups: rolled,
            costs,
            periods,
            // The names and progress inputs are closed: one process needs neither.
            ..
        } = install(worker, 60_000, 3_600_000, costing.clone(), &rollups);
        let mut open = OpenTotals::new(60_000, 3_600_000, &costing);
        // As the processor: a node's hour closes 10 minutes of lateness behind its newest sample.
        let mut feeder =
            Feeder::new(Rules::new(60_000), names.clone(), index).closing_node_hours(600_000);
        let mut changes = 0usize;
        for (epoch, batches) in data.ticks.iter().enumerate() {
            let tick_ms = START + (epoch as i64 + 1) * TICK_MS;
            for (_, bytes) in batches.iter().skip(index).step_by(peers) {
                let batch = SampleBatch::decode(bytes).expect("decodes");
                for s in &batch.samples {
                    if let Ok(Some(o)) = observe_ref(s) {
                        // As the processor: readings older than 10 minutes of lateness
                        // behind the tick are folded away.
                        feeder
                            .feed(0, o, tick_ms - 600_000)
                            .expect("no series limit");
                    }
                }
            }
            feeder.advance(&mut input, epoch as u64 + 1);
            input.flush();
            worker.step_while(|| probe.less_than(input.time()));
            let totals: TotalChanges = (
                usage.borrow_mut().drain(..).collect(),
                rolled.borrow_mut().drain(..).collect(),
                costs.borrow_mut().drain(..).collect(),
                billing.borrow_mut().drain(..).collect(),
            );
            changes += totals.0.len() + totals.1.len() + totals.2.len() + totals.3.len();
            changes += feeder.take_fleet().len();
            changes += periods.borrow_mut().drain(..).count();
            if retire {
                let Ok(_) = open.sift(totals, &mut input, &Dropped);
                open.retire(tick_ms - 600_000, &mut input);
                open.take_unwritten();
                open.written();
            }
        }
        let held = open.held();
        let elapsed = start.elapsed();
        let (allocations, readings) = feeder.series();
        barrier.wait();
        let resident = (worker.index() == 0).then(resident_bytes);
        barrier.wait();
        (changes, allocations + readings, resident, elapsed, held)
    })
    .expect("timely starts");
    let results: Vec<_> = guards
        .join()
        .into_iter()
        .map(|r| r.expect("worker"))
        .collect();
    let changes: usize = results.iter().map(|r| r.0).sum();
    let series: usize = results.iter().map(|r| r.1).sum();
    let resident = results.iter().find_map(|r| r.2).unwrap_or(0);
    let secs = results
        .iter()
        .map(|r| r.3.as_secs_f64())
        .fold(0.0, f64::max);
    let resident_growth = resident.saturating_sub(before);
    DataflowRun {
        held: results.iter().map(|r| r.4).sum(),
        samples_per_s: samples as f64 / secs,
        secs,
        changes,
        series,
        resident_growth,
        bytes_per_series: resident_growth as f64 / series.max(1) as f64,
    }
}

/// How the real processor meets the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// All of it published first, then read from the beginning until caught up.
    Backlog,
    /// [`Mode::Backlog`], feeding no more messages an epoch while catching up than live
    /// (`--max-catch-up-batch` equal to `--max-batch`): the baseline of the larger epochs.
    BacklogSmallEpochs,
    /// Published a tick at a time, each taken in before the next.
    Live,
}

/// A run of the real processor: its wall time, and what its counters moved by.
struct KafkaRun {
    wall: Duration,
    stages: Vec<(Stage, f64)>,
    usage_records: u64,
    /// Usage records by kind, as [`metrics::USAGE_RECORD_KINDS`] orders them.
    usage_by_kind: Vec<u64>,
    billing_records: u64,
    checkpoints: u64,
}

impl KafkaRun {
    /// Samples per second of the run's wall time, start-up and the last checkpoint included.
    fn samples_per_s(&self, input: &Input) -> f64 {
        input.samples as f64 / self.wall.as_secs_f64()
    }

    /// Seconds the workers spent on anything but waiting for input or for the broker's
    /// acknowledgements.
    fn busy_secs(&self) -> f64 {
        self.stages
            .iter()
            .filter(|(stage, _)| !stage.waiting())
            .map(|(_, secs)| secs)
            .sum()
    }

    /// Samples per second of the workers' busy time.
    fn busy_samples_per_s(&self, input: &Input) -> f64 {
        input.samples as f64 / self.busy_secs()
    }

    /// Records sent to the usage and billing topics.
    fn outputs(&self) -> u64 {
        self.usage_records + self.billing_records
    }

    fn kinds_json(&self) -> serde_json::Value {
        metrics::USAGE_RECORD_KINDS
            .iter()
            .zip(&self.usage_by_kind)
            .map(|(kind, n)| (kind.to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    fn stages_json(&self) -> serde_json::Value {
        self.stages
            .iter()
            .map(|(stage, secs)| {
                (
                    stage.name().to_string(),
                    json!((secs * 1000.0).round() / 1000.0),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    fn print(&self, label: &str, input: &Input) {
        println!(
            "{label}: {:>10.0} samples/s of wall time ({:.3} s), {:.0} samples/s of busy time; {} usage + {} billing records = {:.2} per sample; {} checkpoints",
            self.samples_per_s(input),
            self.wall.as_secs_f64(),
            self.busy_samples_per_s(input),
            self.usage_records,
            self.billing_records,
            self.outputs() as f64 / input.samples as f64,
            self.checkpoints
        );
        let kinds: Vec<String> = metrics::USAGE_RECORD_KINDS
            .iter()
            .zip(&self.usage_by_kind)
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        println!("  usage records by kind: {}", kinds.join(", "));
        let stages: Vec<String> = self
            .stages
            .iter()
            .map(|(stage, secs)| format!("{} {secs:.3}", stage.name()))
            .collect();
        println!(
            "  seconds per stage, summed over workers: {}",
            stages.join(", ")
        );
    }
}

/// The process's counters the Kafka runs read, at one instant.
fn counters() -> (Vec<f64>, Vec<u64>, u64, u64, u64) {
    (
        Stage::ALL
            .iter()
            .map(|s| metrics::stage_seconds(*s))
            .collect(),
        metrics::USAGE_RECORD_KINDS
            .iter()
            .map(|kind| metrics::usage_records(kind))
            .collect(),
        METRICS.billing_records.get(),
        METRICS.checkpoints.get(),
        METRICS.batches.get(),
    )
}

/// Runs the real processor with `workers` workers over the input, against a fresh embedded
/// broker, in `mode`.
fn through_kafka(
    runtime: &tokio::runtime::Runtime,
    input: &Input,
    workers: usize,
    rollups: &[Resolution],
    mode: Mode,
) -> KafkaRun {
    let (broker, brokers) = common::broker_with_topics(runtime, PARTITIONS);
    let state = tempfile::tempdir().expect("state dir");
    let config = ProcessorConfig {
        workers,
        state_dir: Some(state.path().to_path_buf()),
        exit_when_caught_up: mode != Mode::Live,
        rollups: rollups.to_vec(),
        // Nothing was billed before: no predecessor's last records to wait for.
        restart_grace: Duration::ZERO,
        // Live, a checkpoint follows every epoch, as at the agents' 15-s pace.
        checkpoint_interval: match mode {
            Mode::Live => Duration::ZERO,
            _ => ProcessorConfig::new("").checkpoint_interval,
        },
        max_catch_up_batch: match mode {
            Mode::BacklogSmallEpochs => ProcessorConfig::new("").max_batch,
            _ => ProcessorConfig::new("").max_catch_up_batch,
        },
        ..ProcessorConfig::new(brokers.clone())
    };
    let producer = common::producer(&brokers);
    let before = counters();
    let run = match mode {
        Mode::Backlog | Mode::BacklogSmallEpochs => {
            for (key, bytes) in input.ticks.iter().flatten() {
                common::send(&producer, names::SAMPLES, key, bytes);
            }
            common::flush(&producer);
            let start = Instant::now();
            run(config, CancellationToken::new()).expect("processor run");
            start.elapsed()
        }
        Mode::Live => {
            // The gauge still holds an earlier run's watermark.
            METRICS.watermark_seconds.set(f64::MIN);
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            let processor = std::thread::spawn(move || run(config, stop));
            let start = Instant::now();
            for (t, batches) in input.ticks.iter().enumerate() {
                for (key, bytes) in batches {
                    common::send(&producer, names::SAMPLES, key, bytes);
                }
                common::flush(&producer);
                // Taken in: the epoch that fed this tick has moved the watermark to it.
                let tick_s = (START + (t as i64 + 1) * TICK_MS) as f64 / 1000.0;
                let deadline = Instant::now() + Duration::from_secs(120);
                while METRICS.watermark_seconds.get() < tick_s {
                    assert!(
                        Instant::now() < deadline,
                        "the processor took tick {t} in within 2 minutes"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            shutdown.cancel();
            processor
                .join()
                .expect("processor thread")
                .expect("processor run");
            start.elapsed()
        }
    };
    let after = counters();
    broker.stop();
    assert_eq!(
        (after.4 - before.4) as usize,
        input.batches(),
        "every batch published was fed"
    );
    KafkaRun {
        wall: run,
        stages: Stage::ALL
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, after.0[i] - before.0[i]))
            .collect(),
        usage_records: after.1.iter().sum::<u64>() - before.1.iter().sum::<u64>(),
        usage_by_kind: after.1.iter().zip(&before.1).map(|(a, b)| a - b).collect(),
        billing_records: after.2 - before.2,
        checkpoints: after.3 - before.3,
    }
}
