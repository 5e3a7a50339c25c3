//! Soak: the whole pipeline under a steady load for a long time, watching what must not grow.
//!
//! The embedded broker (memory storage), the processor and the sink run as their own processes
//! (the release `meterflow` binary); this process is the fleet's agents: NODES simulated nodes
//! publish a batch each every second of wall time, each advancing the fleet's clock by 15 s
//! (so a half-hour soak is 7.5 hours of data, every hour and billing window closing many
//! times). Every SAMPLE_EVERY seconds it prints, per process, resident memory and open file
//! descriptors, and how far the processor is behind; at the end, each one's first, peak and
//! last value and the rate sustained.
//!
//! `cargo bench --bench soak -- [MINUTES] [NODES] [RETENTION]` (defaults 30 minutes, 1,000
//! nodes: about 50,000 samples a second). Without RETENTION the broker keeps its records in
//! memory, every one of them; with it (e.g. `5m`), in SQLite, each topic keeping RETENTION
//! (the usage topic compacted), retention applied every minute.

// Shared with the comparison harness; the soak uses part of it.
#[allow(dead_code)]
#[path = "compare/proc.rs"]
mod proc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use meterflow_ingest::{Fleet, FleetConfig, Publisher};
use proc::{Child, free_port};

const TICK_MS: i64 = 15_000;
const SAMPLE_EVERY: Duration = Duration::from_secs(30);

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let minutes: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(30);
    let nodes: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let retention: Option<String> = args.get(2).cloned();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_meterflow"));
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();

    let broker_port = free_port().expect("port");
    let brokers = format!("127.0.0.1:{broker_port}");
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut broker_args = args(&["broker", "--listen", &brokers, "--partitions", "4"]);
    match &retention {
        Some(r) => {
            broker_args.extend(args(&[
                "--storage",
                "sqlite://broker.db?maintenance_interval=1m",
            ]));
            broker_args.extend(args(&["--retention", r]));
            println!("broker: SQLite, topics kept {r}, usage compacted");
        }
        None => println!("broker: memory storage (keeps every record)"),
    }
    let broker = Child::spawn("broker", bin, &broker_args, d).expect("broker");
    while !broker.log_text().contains("listening on") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics_port = free_port().expect("port");
    let processor = Child::spawn(
        "processor",
        bin,
        &args(&[
            "processor",
            "--brokers",
            &brokers,
            "--partitions",
            "4",
            "--state-dir",
            &d.join("state").display().to_string(),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ]),
        d,
    )
    .expect("processor");
    std::fs::write(d.join("secret"), "soak secret, at least thirty-two bytes").expect("secret");
    let sink_port = free_port().expect("port");
    let sink = Child::spawn(
        "sink",
        bin,
        &args(&[
            "sink",
            "--brokers",
            &brokers,
            "--partitions",
            "4",
            "--listen",
            &format!("127.0.0.1:{sink_port}"),
            "--data-dir",
            &d.join("sink").display().to_string(),
            "--jwt-secret-file",
            &d.join("secret").display().to_string(),
        ]),
        d,
    )
    .expect("sink");
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let http = reqwest::Client::new();

    // Data time starts a day back: seven and a half hours of it fit in a half-hour soak.
    let now_ms = meterflow_ingest::agent::now_ms();
    let t0 = (now_ms - 24 * 3_600_000).div_euclid(3_600_000) * 3_600_000;
    let mut fleet = Fleet::new(
        FleetConfig {
            nodes,
            seed: 3,
            tenants: 50,
            ..FleetConfig::default()
        },
        t0,
    );
    let publisher = Arc::new(Publisher::new(&brokers).expect("publisher"));
    let procs = [
        ("processor", &processor),
        ("sink", &sink),
        ("broker", &broker),
    ];
    println!(
        "soak: {nodes} nodes, a batch each per second ({} s of data), {minutes} min; machine: {} cores",
        TICK_MS / 1000,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "{:>6} {:>10} {:>10} {:>12} | {}",
        "min",
        "samples/s",
        "batches",
        "proc. behind",
        procs
            .iter()
            .map(|(n, _)| format!("{n} RSS MiB / fds"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let (mut batches, mut samples, mut tick) = (0u64, 0u64, 0i64);
    let mut next_report = started + SAMPLE_EVERY;
    let (mut window_samples, mut window_start) = (0u64, started);
    // (first, peak, last) RSS and fds per process.
    let mut seen: Vec<Option<[(f64, usize); 3]>> = vec![None; 3];
    // (minutes since start, RSS MiB) per process, for the slope after warm-up.
    let mut series: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 3];
    // (minutes since start, entries) per kind of what the processor holds.
    let mut state: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    let mut behind_last = 0u64;
    // Ctrl-C ends the soak early, with its summary, and stops the processes it started.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopper = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stopper.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    while Instant::now() < end && !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let second = Instant::now();
        tick += 1;
        let mut sends = tokio::task::JoinSet::new();
        for batch in fleet.tick(t0 + tick * TICK_MS) {
            samples += batch.samples.len() as u64;
            window_samples += batch.samples.len() as u64;
            let p = publisher.clone();
            sends.spawn(async move { p.publish(&batch).await.expect("published") });
            batches += 1;
        }
        sends.join_all().await;
        if Instant::now() >= next_report {
            let read = proc::processor_input(&http, &metrics_url)
                .await
                .unwrap_or(0);
            behind_last = batches.saturating_sub(read);
            let minute = started.elapsed().as_secs_f64() / 60.0;
            for (kind, entries) in proc::processor_state(&http, &metrics_url)
                .await
                .unwrap_or_default()
            {
                state.entry(kind).or_default().push((minute, entries));
            }
            let rate = window_samples as f64 / window_start.elapsed().as_secs_f64();
            (window_samples, window_start) = (0, Instant::now());
            let mut cells = Vec::new();
            for (i, (_, p)) in procs.iter().enumerate() {
                let (rss, _) = p.memory_mib();
                let f = fds(p.pid());
                let s = seen[i].get_or_insert([(rss, f); 3]);
                s[1] = (s[1].0.max(rss), s[1].1.max(f));
                s[2] = (rss, f);
                series[i].push((started.elapsed().as_secs_f64() / 60.0, rss));
                cells.push(format!("{rss:>8.0} / {f:<5}"));
            }
            println!(
                "{:>6.1} {rate:>10.0} {batches:>10} {behind_last:>12} | {}",
                started.elapsed().as_secs_f64() / 60.0,
                cells.join(" | ")
            );
            next_report += SAMPLE_EVERY;
        }
        if let Some(rest) = Duration::from_secs(1).checked_sub(second.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "\nsoak: {samples} samples in {batches} batches over {:.1} min: {:.0} samples/s offered; the processor was {behind_last} batches behind at the last sample",
        secs / 60.0,
        samples as f64 / secs
    );
    // Warm-up: the first third of the run, at least five minutes (the first hours of data
    // fill every open window before any closes).
    let warm_min = (secs / 60.0 / 3.0).max(5.0);
    println!(
        "process     RSS MiB first / peak / last     open fds first / peak / last     RSS slope after minute {warm_min:.0}"
    );
    for (i, (name, _)) in procs.iter().enumerate() {
        if let Some([(r0, f0), (rp, fp), (r1, f1)]) = seen[i] {
            let slope = slope(series[i].iter().filter(|(m, _)| *m >= warm_min))
                .map_or("too few samples".to_string(), |s| {
                    format!("{s:+.2} MiB/min")
                });
            println!(
                "{name:<10} {r0:>8.0} / {rp:>6.0} / {r1:>6.0}     {f0:>8} / {fp:>4} / {f1:>4}     {slope}"
            );
        }
    }
    // Which of the processor's state grows: entries at the first sample after warm-up and at
    // the end, and the slope in between.
    println!(
        "processor state          after warm-up / last       slope after minute {warm_min:.0}"
    );
    for (kind, points) in &state {
        let after: Vec<&(f64, f64)> = points.iter().filter(|(m, _)| *m >= warm_min).collect();
        if let (Some(first), Some(last)) = (after.first(), after.last()) {
            let slope = slope(after.iter().copied())
                .map_or("too few samples".to_string(), |s| format!("{s:+.0}/min"));
            println!(
                "{kind:<22} {:>14.0} / {:<12.0}     {slope}",
                first.1, last.1
            );
        }
    }
}

/// The least-squares slope of `(x, y)` points; `None` for fewer than three.
fn slope<'a>(points: impl Iterator<Item = &'a (f64, f64)>) -> Option<f64> {
    let points: Vec<(f64, f64)> = points.copied().collect();
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}
