//! Processor throughput on one machine, without Kafka: simulated sample batches are encoded
//! as on the wire, then decoded, validated and fed to the differential dataflow, one epoch
//! per fleet tick, with 1 and 2 timely workers. A decode-only pass over the same bytes runs
//! first in the same process as the baseline.
//!
//! `cargo bench --bench processor_throughput -- [NODES] [TICKS] [none|all] [RUN_MINUTES]`
//! (defaults 200 nodes, 40 ticks of 15 s, with the hour, day and month roll-ups; `none` leaves
//! them out; RUN_MINUTES makes every container run between that many minutes and twice as
//! long instead of the simulator's 20 s to 5 min, as long-lived leases do).

use std::sync::{Arc, Barrier};
use std::time::Instant;

use meterflow_ingest::{Fleet, FleetConfig};
use meterflow_processor::PriceBook;
use meterflow_processor::dataflow::{Costing, Installed, Resolution, install};
use meterflow_processor::model::observe;
use meterflow_processor::names::Names;
use meterflow_processor::series::{Feeder, Rules};
use meterflow_schemas::{Record, SampleBatch};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let nodes: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(200);
    let ticks: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(40);
    // Third argument `none`: without the hour, day and month roll-ups.
    let rollups_wanted: Vec<Resolution> = match args.get(2).map(String::as_str) {
        Some("none") => Vec::new(),
        _ => Resolution::ALL.to_vec(),
    };
    println!("roll-ups: {rollups_wanted:?}");
    let run_ms = match args.get(3).and_then(|a| a.parse::<i64>().ok()) {
        Some(minutes) => (minutes * 60_000, 2 * minutes * 60_000),
        None => FleetConfig::default().run_ms,
    };
    println!(
        "containers run {} to {} s",
        run_ms.0 / 1000,
        run_ms.1 / 1000
    );

    let mut fleet = Fleet::new(
        FleetConfig {
            nodes,
            seed: 42,
            run_ms,
            ..FleetConfig::default()
        },
        0,
    );
    let ticks: Vec<Vec<Vec<u8>>> = (1..=ticks)
        .map(|t| {
            fleet
                .tick(t * 15_000)
                .iter()
                .map(|b| b.encode().expect("simulated batches encode"))
                .collect()
        })
        .collect();
    let samples: usize = ticks
        .iter()
        .flatten()
        .map(|b| SampleBatch::decode(b).expect("decodes").samples.len())
        .sum();
    let bytes: usize = ticks.iter().flatten().map(Vec::len).sum();
    println!(
        "input: {nodes} nodes x {} ticks = {} batches, {samples} samples, {bytes} bytes",
        ticks.len(),
        ticks.len() * nodes
    );

    let start = Instant::now();
    let mut decoded = 0usize;
    for b in ticks.iter().flatten() {
        decoded += SampleBatch::decode(b).expect("decodes").samples.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "baseline decode only      : {:>10.0} samples/s ({secs:.3} s)",
        decoded as f64 / secs
    );

    let ticks = Arc::new(ticks);
    for workers in [1usize, 2] {
        let data = ticks.clone();
        let rollups_wanted = rollups_wanted.clone();
        // One interner for the process, as in the processor.
        let names = Arc::new(Names::default());
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
                fleet,
                rollups,
                costs,
                periods,
                // The names and progress inputs are closed: one process needs neither.
                ..
            } = install(
                worker,
                60_000,
                3_600_000,
                Costing {
                    names: names.clone(),
                    prices: Arc::new(PriceBook::default()),
                },
                &rollups_wanted,
            );
            let mut feeder = Feeder::new(Rules::new(60_000), names.clone(), index);
            let mut updates = 0usize;
            for (epoch, batches) in data.iter().enumerate() {
                for bytes in batches.iter().skip(index).step_by(peers) {
                    let batch = SampleBatch::decode(bytes).expect("decodes");
                    for s in &batch.samples {
                        if let Ok(Some(o)) = observe(s) {
                            // As the processor: readings older than 10 minutes of lateness
                            // behind the tick are folded away.
                            feeder
                                .feed(&mut input, 0, o, (epoch as i64 + 1) * 15_000 - 600_000)
                                .expect("no series limit");
                        }
                    }
                }
                input.advance_to(epoch as u64 + 1);
                input.flush();
                worker.step_while(|| probe.less_than(input.time()));
                updates += usage.borrow_mut().drain(..).count();
                updates += billing.borrow_mut().drain(..).count();
                updates += fleet.borrow_mut().drain(..).count();
                updates += rollups.borrow_mut().drain(..).count();
                updates += costs.borrow_mut().drain(..).count();
                updates += periods.borrow_mut().drain(..).count();
            }
            let elapsed = start.elapsed();
            let (allocations, readings) = feeder.series();
            barrier.wait();
            let resident = (worker.index() == 0).then(resident_bytes);
            barrier.wait();
            (updates, allocations + readings, resident, elapsed)
        })
        .expect("timely starts");
        let results: Vec<_> = guards
            .join()
            .into_iter()
            .map(|r| r.expect("worker"))
            .collect();
        let updates: usize = results.iter().map(|r| r.0).sum();
        let series: usize = results.iter().map(|r| r.1).sum();
        let resident = results.iter().find_map(|r| r.2).unwrap_or(0);
        let secs = results
            .iter()
            .map(|r| r.3.as_secs_f64())
            .fold(0.0, f64::max);
        println!(
            "dataflow, {workers} worker(s)      : {:>10.0} samples/s ({secs:.3} s, {updates} output changes)",
            samples as f64 / secs
        );
        println!(
            "  state: {series} series; resident memory grew {} bytes = {:.0} bytes per active series (feeder, interner and arrangements, all windows kept)",
            resident.saturating_sub(before),
            resident.saturating_sub(before) as f64 / series.max(1) as f64
        );
    }
}

/// This process's resident set size, from `/proc/self/status` (0 where there is none).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
