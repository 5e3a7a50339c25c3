//! `compare`: Meterflow and Prometheus side by side on one fleet scenario with known ground
//! truth and injected faults (see `scenario.rs`).
//!
//! `cargo run --release --bin compare -- [--quick] [--nodes N] [--hours H] [--seed S]
//! [--results FILE|-]`
//!
//! The same simulated fleet goes to Meterflow (agent spool and producer → embedded broker →
//! processor → sink, each its own process, read back over the HTTP API) and to Prometheus
//! three times, all real processes on loopback: a server that scrapes the nodes (through its
//! remote-write receiver, as its scrape loop would have stored it: what runs at each scrape
//! instant, staleness markers for what is gone or not scraped); as its best operators run it,
//! an agent per node with its write-ahead log remote-writing to a server that is down for a
//! while (every reading arrives, retried); and a server scraping kube-state-metrics (the
//! containers' requests and start and exit times as the API server holds them). Each server
//! evaluates the recording rules of a chargeback operator (backfilled by promtool). It reads per tenant and hour GPU-hours by
//! class, billed GPU-hours with MIG fractions, energy, CPU core-hours, memory GiB-hours and
//! per node and hour the most GPUs allocated, and compares each system with the physical truth
//! and with the bound its way of reading the nodes allows. Then throughput, CPU-seconds per
//! million samples, freshness, a 30-day query's latency and resident memory. It prints the
//! tables and writes them to `benches/RESULTS.md` with the machine, the input size and the
//! commit. Exits 1 if Meterflow's GPU-hours or energy are further from the truth than what the
//! node's sources cannot show (the scenario's bounds: whole-second kubelet times, runs the
//! kubelet never listed, a board's energy before its holder's first reading and after its
//! last); `--json` writes every system's scores and bounds for the test that checks them all.

mod meter;
mod proc;
mod prom;
mod scenario;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::meter::Meterflow;
use crate::prom::{Collector, Prometheus, class_of, promql};
use crate::scenario::{HOUR_MS, Scenario};

#[derive(Parser)]
#[command(
    name = "compare",
    about = "Meterflow side by side with Prometheus: accuracy under faults, throughput, freshness, query speed"
)]
struct Args {
    /// The check-sized run (8 nodes, 3 hours; under two minutes once built).
    #[arg(long)]
    quick: bool,
    /// Simulated nodes (default 8 with --quick, else 48).
    #[arg(long)]
    nodes: Option<usize>,
    /// Simulated hours (default 3 with --quick, else 6).
    #[arg(long)]
    hours: Option<i64>,
    /// Seed of the fleet and of the faults.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where to write the results table; `-` for nowhere.
    #[arg(long, default_value = "benches/RESULTS.md")]
    results: PathBuf,
    /// The Prometheus server binary; by default `prometheus` on PATH, installed with apt-get
    /// (Debian's package) when missing.
    #[arg(long)]
    prometheus: Option<PathBuf>,
    /// Live probes for the freshness figures.
    #[arg(long, default_value_t = 50)]
    probes: usize,
    /// Repetitions of the 30-day query.
    #[arg(long, default_value_t = 50)]
    queries: usize,
    /// Also write each quantity's scores as JSON here (for tests and scripts).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("compare: {e:#}");
            std::process::exit(2);
        }
    }
}

/// The `meterflow` binary built beside this one (built now when missing).
fn meterflow_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("meterflow");
    if !bin.exists() {
        let release = exe
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("building the meterflow binary ({cargo} build --bin meterflow)...");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bin", "meterflow"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().context("running cargo")?;
        if !status.success() || !bin.exists() {
            bail!(
                "no meterflow binary at {}: run `cargo build --release --bins` first",
                bin.display()
            );
        }
    }
    Ok(bin)
}

/// `prometheus` on PATH, installed from Debian's package when missing.
fn prometheus_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("prometheus"))
                .find(|p| p.is_file())
        })
    };
    if let Some(p) = on_path() {
        return Ok(p);
    }
    eprintln!("Prometheus is not installed: installing Debian's `prometheus` package...");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let sudo = if root { vec![] } else { vec!["sudo"] };
    for args in [
        vec!["apt-get", "update", "-qq"],
        vec![
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "prometheus",
        ],
    ] {
        let all: Vec<&str> = sudo.iter().copied().chain(args).collect();
        let status = Command::new(all[0])
            .args(&all[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("running {}", all.join(" ")))?;
        if !status.success() {
            bail!(
                "`{}` failed: install Prometheus 2.x yourself and pass --prometheus PATH",
                all.join(" ")
            );
        }
    }
    on_path().context("the prometheus package installed no `prometheus` on PATH")
}

fn now_ms() -> i64 {
    meterflow_ingest::agent::now_ms()
}

/// The `q`-quantile of `values` (nearest rank).
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Per quantity, each system's cells: key → value in the quantity's exact unit.
type Cells = BTreeMap<String, f64>;

/// The systems side by side, in the order of [`Quantity::sides`].
const SYSTEMS: [&str; 4] = [
    "Meterflow",
    "Prometheus server, scraping",
    "Prometheus agent, WAL + remote write",
    "Prometheus server, kube-state-metrics",
];
const MF: usize = 0;
const SERVER: usize = 1;
const AGENT: usize = 2;
/// GPU time from the API server's container times and requests; no energy, CPU or memory.
const KSM: usize = 3;

struct Quantity {
    name: String,
    unit: &'static str,
    /// From the exact unit to the displayed one.
    scale: f64,
    truth: Cells,
    /// Each system's cells, as [`SYSTEMS`].
    sides: [Cells; 4],
    /// How far each system's summed error may be from the truth (in the exact unit), from
    /// what its way of reading the nodes cannot show; none where no bound is stated.
    bounds: [Option<f64>; 4],
    /// Whether each system reads the quantity at all (kube-state-metrics has no usage).
    read: [bool; 4],
}

impl Quantity {
    /// The systems that read this quantity, with their indices.
    fn systems(&self) -> impl Iterator<Item = (usize, &'static str)> + '_ {
        SYSTEMS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.read[*i])
            .map(|(i, s)| (i, *s))
    }
}

/// How one system did on one quantity.
struct Score {
    sum: f64,
    /// The sum of the cells' absolute errors.
    abs_error: f64,
    /// Cells equal to the truth to its unit.
    exact: usize,
    cells: usize,
    /// Over the cells the truth has: mean and worst |error| / truth.
    mean_rel: f64,
    worst_rel: f64,
    /// Cells where the truth has nothing and the system something.
    spurious: usize,
}

fn score(truth: &Cells, got: &Cells) -> Score {
    let keys: BTreeSet<&String> = truth.keys().chain(got.keys()).collect();
    let mut s = Score {
        sum: 0.0,
        abs_error: 0.0,
        exact: 0,
        cells: keys.len(),
        mean_rel: 0.0,
        worst_rel: 0.0,
        spurious: 0,
    };
    let mut rel = Vec::new();
    for k in &keys {
        let (t, g) = (
            truth.get(*k).copied().unwrap_or(0.0),
            got.get(*k).copied().unwrap_or(0.0),
        );
        s.sum += g;
        s.abs_error += (g - t).abs();
        // Equal to the unit the truth is kept in (a millisecond, a millijoule, a microsecond),
        // or for byte-milliseconds of memory (past 2^53) to the precision of a JSON number.
        let equal = (g - t).abs() < 0.5_f64.max(t.abs() * 1e-12);
        if equal {
            s.exact += 1;
        }
        if t != 0.0 {
            rel.push(if equal { 0.0 } else { (g - t).abs() / t.abs() });
        } else if !equal {
            s.spurious += 1;
        }
    }
    if !rel.is_empty() {
        s.mean_rel = rel.iter().sum::<f64>() / rel.len() as f64;
        s.worst_rel = rel.iter().copied().fold(0.0, f64::max);
    }
    s
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("{model}, {cores} cores, {mem_gib:.0} GiB")
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or("unknown".into(), |s| s.trim().to_string())
}

async fn run(args: Args) -> Result<bool> {
    let (nodes, hours) = match args.quick {
        true => (args.nodes.unwrap_or(8), args.hours.unwrap_or(3)),
        false => (args.nodes.unwrap_or(48), args.hours.unwrap_or(6)),
    };
    let started = Instant::now();
    let bin = meterflow_binary()?;
    let prometheus_bin = prometheus_binary(args.prometheus.clone())?;
    let dir = tempfile::Builder::new()
        .prefix("meterflow-compare")
        .tempdir()?;

    // The scenario ends an hour before now: every timestamp is in the past for both systems.
    let t0 = (now_ms().div_euclid(HOUR_MS) - hours - 1) * HOUR_MS;
    let mut scenario = Scenario::generate(nodes, hours, args.seed, t0);
    let server_requests = prom::requests(&scenario, Collector::Server, 0, prom::SHARDS);
    // A Prometheus agent forwards only what it appends after it started (its WAL watcher
    // skips older samples): its readings are shifted whole hours into the future, and read
    // back at the same shifted instants.
    let agent_shift_ms = (hours + 2) * HOUR_MS;
    // One shard: see `Prometheus::start_agent`.
    let agent_requests = prom::requests(&scenario, Collector::Agent, agent_shift_ms, 1);
    let ksm_requests = prom::ksm_requests(&scenario);
    println!(
        "scenario: {nodes} nodes, {hours} h from {}, {} tenants, {} containers ({} shorter than a scrape interval), {} samples; Prometheus: {} samples in {} remote writes scraped by the server, {} by node agents",
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(t0 as u64)),
        scenario.tenants.len(),
        scenario.containers,
        scenario.short_containers,
        scenario.samples,
        server_requests.samples,
        server_requests.bodies.len(),
        agent_requests.samples,
    );
    for f in &scenario.faults {
        println!("  fault: {f}");
    }

    // Meterflow, live: the processor and the sink run while every node's agent publishes
    // through its spool (the whole scenario faster than real time), so the faults meet them as
    // they would in production: a partition heals after the hour before it was billed.
    let mut mf = Meterflow::start_broker(&bin, dir.path()).await?;
    mf.start_pipeline().await?;
    let t = Instant::now();
    let messages = mf.publish(&mut scenario).await?;
    let publish_s = t.elapsed().as_secs_f64();
    println!(
        "meterflow: {messages} batches published in {publish_s:.1} s ({:.0} samples/s through the agent's spool and producer) to a running processor",
        scenario.samples as f64 / publish_s
    );
    loop {
        mf.check_alive()?;
        if mf.processor_input().await.is_some_and(|n| n >= messages) {
            break;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("the processor did not read the samples in 30 min");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let read_s = t.elapsed().as_secs_f64();
    // Then until the API's answers stop changing.
    while !mf.ready().await {
        mf.check_alive()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (usage, settled_at) = {
        let mut last = None;
        loop {
            mf.check_alive()?;
            let usage = mf.usage(&scenario).await?;
            let digest: Vec<(i64, i64, i64)> = usage
                .values()
                .map(|c| (c.gpu_ms.values().sum(), c.energy_mj, c.cpu_us))
                .collect();
            if last.as_ref() == Some(&digest) {
                break (usage, Instant::now());
            }
            last = Some(digest);
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    };
    println!(
        "meterflow: the processor had read every batch {read_s:.1} s after the first was published; the API settled {:.1} s after that",
        (settled_at - t).as_secs_f64() - read_s
    );
    let fleet = mf.fleet(&scenario).await?;
    let processor = mf.processor.as_ref().context("processor")?;
    let sink = mf.sink.as_ref().context("sink")?;
    let mf_cpu = (
        processor.cpu_seconds(),
        sink.cpu_seconds(),
        mf.broker.cpu_seconds(),
    );
    let mf_mem = (
        processor.memory_mib(),
        sink.memory_mib(),
        mf.broker.memory_mib(),
    );

    // Prometheus as a server scraping the nodes: the same fleet through its remote-write receiver.
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir)?;
    let mut prom = Prometheus::start(&prometheus_bin, &prom_dir, proc::free_port()?).await?;
    let prom_cpu_idle = prom.child.cpu_seconds();
    let prom_samples = server_requests.samples;
    let t = Instant::now();
    for r in server_requests.bodies {
        prom.write_shards(r).await?;
    }
    let write_s = t.elapsed().as_secs_f64();
    let mut prom_cpu = prom.child.cpu_seconds() - prom_cpu_idle;
    println!(
        "prometheus server: {prom_samples} samples written in {write_s:.1} s ({:.0} samples/s)",
        prom_samples as f64 / write_s
    );
    // Prometheus as its best operators run it: an agent per node, its WAL, remote write.
    let agent_bodies = agent_requests.bodies.into_iter().flatten().collect();
    let mut agent = through_agent(&prometheus_bin, dir.path(), agent_bodies).await?;
    println!(
        "prometheus agent: {} samples; its server was down for the first {} of {} remote writes, {:.0} samples were retried from the WAL; all sent {:.1} s after the first write",
        agent_requests.samples,
        agent.writes_while_down,
        agent.writes,
        agent.retried,
        agent.delivered_s
    );

    // Prometheus with kube-state-metrics: the API server's container times and GPU requests,
    // scraped by a server of its own (its cost apart from the other two).
    let ksm_dir = dir.path().join("prometheus-ksm");
    std::fs::create_dir_all(&ksm_dir)?;
    let mut ksm = Prometheus::start(&prometheus_bin, &ksm_dir, proc::free_port()?).await?;
    let ksm_cpu_idle = ksm.child.cpu_seconds();
    for r in ksm_requests.bodies {
        ksm.write_shards(r).await?;
    }
    let mut ksm_cpu = ksm.child.cpu_seconds() - ksm_cpu_idle;
    println!(
        "prometheus server with kube-state-metrics: {} samples written",
        ksm_requests.samples
    );

    // The recording rules, evaluated on each server over the scenario's steps (the agent's
    // server holds its readings shifted); each server is started again to load them, so its
    // resident memory is also taken before (the larger peak is reported). The servers' CPU
    // includes the evaluation.
    let rules = promql::recording_rules();
    // The last scrape's evaluation comes after it, within the interval.
    let (start, end) = (scenario.t0, scenario.end_ms() + scenario::INTERVAL_MS);
    let mem_before = (
        prom.child.memory_mib(),
        agent.server.child.memory_mib(),
        ksm.child.memory_mib(),
    );
    prom_cpu += prom.backfill_rules(&rules, start, end).await?;
    agent.cpu.1 += agent
        .server
        .backfill_rules(&rules, start + agent_shift_ms, end + agent_shift_ms)
        .await?;
    ksm_cpu += ksm.backfill_rules(&rules, start, end).await?;
    let peak = |before: (f64, f64), after: (f64, f64)| (after.0, before.1.max(after.1));
    println!("prometheus: the recording rules were evaluated over the scenario on each server");

    // Each quantity, per tenant and hour (per node and hour for the GPU maxima).
    let bounds = &scenario.truth.bounds;
    let kind_ms = |m: &BTreeMap<(String, String), i64>, class: &str, profile: &str| {
        m.get(&(class.to_string(), profile.to_string()))
            .copied()
            .unwrap_or(0) as f64
    };
    let side_bounds = |class: &str, profile: &str| {
        let sampled = kind_ms(&bounds.sampled_gpu_ms, class, profile);
        [
            kind_ms(&bounds.gpu_ms, class, profile),
            sampled + kind_ms(&server_requests.hidden_gpu_ms, class, profile),
            sampled + kind_ms(&agent_requests.hidden_gpu_ms, class, profile),
            kind_ms(&ksm_requests.hidden_gpu_ms, class, profile),
        ]
    };
    let mut quantities: Vec<Quantity> = Vec::new();
    let new_q = |name: &str, unit: &'static str, scale: f64, bounds: [Option<f64>; 4]| Quantity {
        name: name.to_string(),
        unit,
        scale,
        truth: Cells::new(),
        sides: Default::default(),
        // kube-state-metrics reads GPU time alone: its bound says it reads the quantity.
        read: [true, true, true, bounds[KSM].is_some()],
        bounds,
    };
    let mut billed_bounds = [0.0; 4];
    for (class, profile, name) in GPU_KINDS {
        let b = side_bounds(class, profile);
        for (total, b) in billed_bounds.iter_mut().zip(b) {
            *total += billed(profile, b);
        }
        quantities.push(new_q(name, "GPU-h", 1.0 / 3.6e6, b.map(Some)));
    }
    quantities.push(new_q(
        "billed GPU-hours (MIG fractions)",
        "GPU-h",
        1.0 / 3.6e6,
        billed_bounds.map(Some),
    ));
    quantities.push(new_q(
        "energy",
        "kWh",
        1.0 / 3.6e9,
        [Some(bounds.energy_mj as f64), None, None, None],
    ));
    quantities.push(new_q("CPU core-hours", "core-h", 1.0 / 3.6e9, [None; 4]));
    quantities.push(new_q(
        "memory GiB-hours",
        "GiB-h",
        1.0 / (3.6e6 * 1_073_741_824.0),
        [None; 4],
    ));
    let mut max_gpus = new_q(
        "max GPUs allocated, summed over node-hours",
        "GPUs",
        1.0,
        [None; 4],
    );
    max_gpus.read[KSM] = true;
    quantities.push(max_gpus);
    for ((tenant, hour), c) in &scenario.truth.tenants {
        let amounts = (c.energy_mj, c.cpu_us, c.memory_byte_ms as f64);
        put(
            &mut quantities,
            None,
            cell_key(tenant, *hour),
            &c.gpu_ms,
            amounts,
        );
    }
    for ((tenant, hour), c) in &usage {
        let amounts = (c.energy_mj, c.cpu_us, c.memory_byte_ms);
        put(
            &mut quantities,
            Some(MF),
            cell_key(tenant, *hour),
            &c.gpu_ms,
            amounts,
        );
    }
    let max_q = &mut quantities[Q_MAX_GPUS];
    for ((node, hour), most) in &scenario.truth.node_max_gpus {
        max_q.truth.insert(cell_key(node, *hour), *most as f64);
    }
    for ((node, hour), most) in &fleet {
        if *most > 0 || max_q.truth.contains_key(&cell_key(node, *hour)) {
            max_q.sides[MF].insert(cell_key(node, *hour), *most as f64);
        }
    }
    let t = Instant::now();
    let server_rules = read_prometheus(&prom, &scenario, 0, SERVER, &mut quantities).await?;
    let prom_eval_s = t.elapsed().as_secs_f64();
    let agent_rules = read_prometheus(
        &agent.server,
        &scenario,
        agent_shift_ms,
        AGENT,
        &mut quantities,
    )
    .await?;
    let ksm_rules = read_ksm(&ksm, &scenario, &mut quantities).await?;
    let ksm_mem = peak(mem_before.2, ksm.child.memory_mib());

    // A tenant's 30 days, hour by hour: the busiest tenant.
    let busiest = scenario
        .truth
        .tenants
        .iter()
        .fold(BTreeMap::<&String, i64>::new(), |mut m, ((t, _), c)| {
            *m.entry(t).or_default() += c.gpu_ms.values().sum::<i64>();
            m
        })
        .into_iter()
        .max_by_key(|(_, ms)| *ms)
        .map(|(t, _)| t.clone())
        .context("a tenant")?;
    let latency = thirty_days(&mf, &prom, &busiest, args.queries).await?;

    // Freshness: live samples at the wall clock's now, one at a time.
    let mf_fresh = mf.freshness(args.probes).await?;
    let prom_fresh = prom_freshness(&prom, &prom, args.probes, 0).await?;
    // Through the agent, each probe waits for its remote write's batch (5 s by default):
    // fewer of them.
    let agent_probes = args.probes.min(AGENT_PROBES);
    let agent_fresh =
        prom_freshness(&agent.agent, &agent.server, agent_probes, agent_shift_ms).await?;
    let prom_mem = peak(mem_before.0, prom.child.memory_mib());
    // Meterflow's billed GPU-hours are what its billing stream charged (the probes' newer
    // samples closed the scenario's billing windows), not its GPU-hours times a fraction here.
    let charged: Vec<(String, i64)> = scenario
        .truth
        .tenants
        .iter()
        .filter(|(_, c)| c.gpu_ms.values().any(|ms| *ms > 0))
        .map(|(key, _)| key.clone())
        .collect();
    let billing = mf.billed_gpu(&scenario, &charged).await?;
    let billed_q = &mut quantities[Q_BILLED];
    billed_q.sides[MF] = billing
        .gpu_ms
        .iter()
        .map(|((tenant, hour), ms)| (cell_key(tenant, *hour), *ms))
        .collect();
    billed_q.bounds[MF] = billed_q.bounds[MF].map(|b| b + billing.rounding_ms);
    println!(
        "meterflow: {} GPU billing records read from meterflow.billing, {} of them adjustments",
        billing.records, billing.adjustments
    );
    let agent_mem = (
        agent.agent.child.memory_mib(),
        peak(mem_before.1, agent.server.child.memory_mib()),
    );

    // The processor's throughput: a second one reads every batch again as a backlog.
    let (process_s, processor_cpu) = mf.backlog_run(messages).await?;
    println!(
        "meterflow: a second processor read the {} samples again as a backlog in {process_s:.2} s ({:.0} samples/s, one worker)",
        scenario.samples,
        scenario.samples as f64 / process_s
    );

    // The report.
    let within = |q: &Quantity, side: usize| {
        q.bounds[side].is_none_or(|bound| score(&q.truth, &q.sides[side]).abs_error <= bound + 0.5)
    };
    let exact_ok = quantities.iter().all(|q| within(q, MF));
    let table = accuracy_table(&quantities)?;
    let costs = Costs {
        samples: scenario.samples,
        prom_samples,
        agent_samples: agent_requests.samples,
        backlog: (process_s, processor_cpu),
        publish_s,
        write_s,
        mf_cpu,
        mf_mem,
        prom_cpu,
        prom_mem,
        agent_mem,
        ksm: (ksm_requests.samples, ksm_cpu, ksm_mem),
        fresh: (mf_fresh, prom_fresh, agent_fresh),
        latency,
        probes: args.probes,
    };
    let perf = cost_table(&costs, &agent)?;
    println!("\n{table}\n{perf}");
    println!(
        "The Prometheus server answered the hourly PromQL (and its check against subqueries) in {prom_eval_s:.2} s; the whole run took {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    if args.results.as_os_str() != "-" {
        let doc = results_doc(
            &args,
            &scenario,
            &costs,
            &agent,
            &quantities,
            (&table, &perf),
            &prometheus_version(&prometheus_bin),
        )?;
        std::fs::write(&args.results, doc)
            .with_context(|| format!("writing {}", args.results.display()))?;
        println!("wrote {}", args.results.display());
    }
    if let Some(path) = &args.json {
        let rules = [&server_rules, &agent_rules, &ksm_rules];
        write_scores(path, &quantities, &billing, &agent, &scenario, rules)?;
    }
    // Where a system is further from the truth than its bound, say so; where Meterflow differs
    // from the truth, the first few cells of each quantity.
    for q in &quantities {
        for (i, system) in q.systems() {
            if !within(q, i) {
                eprintln!(
                    "  {}: {system} is further from the truth than its bound",
                    q.name
                );
            }
        }
        let differ = q.truth.iter().filter_map(|(key, t)| {
            let m = q.sides[MF].get(key).copied().unwrap_or(0.0);
            ((m - t).abs() >= 0.5_f64.max(t.abs() * 1e-12)).then_some((key, t, m))
        });
        for (key, t, m) in differ.take(5) {
            eprintln!(
                "  {}: {key}: truth {t}, Meterflow {m} ({:+})",
                q.name,
                m - t
            );
        }
    }
    if !exact_ok {
        eprintln!(
            "Meterflow's GPU-hours or energy are further from the truth than the sources' bound: see the table"
        );
    }
    Ok(exact_ok)
}

/// The GPU kinds compared: (class, MIG profile, quantity name); quantities 0..3.
const GPU_KINDS: [(&str, &str, &str); 3] = [
    ("h100", "", "GPU-hours h100"),
    ("a100", "", "GPU-hours a100 (whole)"),
    ("a100", "1g.10gb", "GPU-hours a100 1g.10gb MIG"),
];
const Q_BILLED: usize = 3;
const Q_ENERGY: usize = 4;
const Q_CPU: usize = 5;
const Q_MEMORY: usize = 6;
const Q_MAX_GPUS: usize = 7;

/// GPU time billed as whole GPUs: a MIG profile's share of one, as the scenario bills it.
fn billed(mig_profile: &str, ms: f64) -> f64 {
    scenario::billed_fraction(mig_profile) * ms
}

fn cell_key(tenant: &str, hour: i64) -> String {
    format!(
        "{tenant} {}",
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(hour as u64)
        )
    )
}

/// One tenant-hour of the truth (`side` none) or of a system's answer into every quantity's
/// cells but the GPU maxima.
fn put(
    quantities: &mut [Quantity],
    side: Option<usize>,
    key: String,
    gpu_ms: &BTreeMap<(String, String), i64>,
    (energy_mj, cpu_us, memory_byte_ms): (i64, i64, f64),
) {
    let billed_ms = gpu_ms
        .iter()
        .map(|((_, mig), ms)| billed(mig, *ms as f64))
        .sum();
    let mut values: Vec<(usize, f64)> = GPU_KINDS
        .iter()
        .enumerate()
        .map(|(i, (class, profile, _))| {
            let ms = gpu_ms.get(&(class.to_string(), profile.to_string()));
            (i, ms.copied().unwrap_or(0) as f64)
        })
        .collect();
    values.extend([
        (Q_BILLED, billed_ms),
        (Q_ENERGY, energy_mj as f64),
        (Q_CPU, cpu_us as f64),
        (Q_MEMORY, memory_byte_ms),
    ]);
    for (q, value) in values {
        let cells = match side {
            None => &mut quantities[q].truth,
            Some(i) => &mut quantities[q].sides[i],
        };
        cells.insert(key.clone(), value);
    }
}

/// The proof that a server's hourly GPU-hours came from its recorded rule: the cells read, and
/// how many differ from the rule's expression evaluated as a subquery at the same steps.
#[derive(Debug, Default)]
struct RuleCheck {
    cells: usize,
    differing: usize,
}

impl RuleCheck {
    /// One hour's answers: from the recorded rule, and from the subquery.
    fn compare(
        &mut self,
        recorded: &[(BTreeMap<String, String>, f64)],
        computed: Vec<(BTreeMap<String, String>, f64)>,
    ) {
        let computed: BTreeMap<_, f64> = computed.into_iter().collect();
        self.cells += recorded.len();
        self.differing += recorded
            .iter()
            .filter(|(labels, v)| computed.get(labels).is_none_or(|c| (c - v).abs() > 1e-9))
            .count()
            + computed.len().saturating_sub(recorded.len());
    }
}

/// Each hour's PromQL at its end (shifted by `shift_ms` where the samples were) into `side`.
async fn read_prometheus(
    prom: &Prometheus,
    scenario: &Scenario,
    shift_ms: i64,
    side: usize,
    quantities: &mut [Quantity],
) -> Result<RuleCheck> {
    let mut check = RuleCheck::default();
    for (hour, at) in prom::hours(scenario) {
        let at = at + shift_ms;
        let rules_at = at + prom::RULES_AFTER_MS;
        let recorded = prom.query(&promql::gpu_hours(), rules_at).await?;
        let computed = prom.query(&promql::gpu_hours_subquery(), rules_at).await?;
        check.compare(&recorded, computed);
        for (labels, v) in recorded {
            let class = class_of(labels.get("modelName").map_or("", String::as_str));
            let profile = labels.get("GPU_I_PROFILE").cloned().unwrap_or_default();
            let key = cell_key(labels.get("namespace").map_or("", String::as_str), hour);
            let ms = v * 3.6e6;
            for (i, (c, p, _)) in GPU_KINDS.iter().enumerate() {
                if *c == class && *p == profile {
                    *quantities[i].sides[side].entry(key.clone()).or_default() += ms;
                }
            }
            *quantities[Q_BILLED].sides[side].entry(key).or_default() += billed(&profile, ms);
        }
        // Counters' increases at the hour's end; the recorded memory after it.
        for (q, at, factor, target) in [
            (promql::energy_joules(), at, 1e3, Q_ENERGY),
            (promql::cpu_core_hours(), at, 3.6e9, Q_CPU),
            (
                promql::memory_gib_hours(),
                rules_at,
                3.6e6 * 1_073_741_824.0,
                Q_MEMORY,
            ),
        ] {
            for (labels, v) in prom.query(&q, at).await? {
                let key = cell_key(labels.get("namespace").map_or("", String::as_str), hour);
                *quantities[target].sides[side].entry(key).or_default() += v * factor;
            }
        }
        for (labels, v) in prom.query(&promql::node_max_gpus(), rules_at).await? {
            let key = cell_key(labels.get("Hostname").map_or("", String::as_str), hour);
            quantities[Q_MAX_GPUS].sides[side].insert(key, v);
        }
    }
    Ok(check)
}

/// Each hour's kube-state-metrics PromQL at its end into [`KSM`].
async fn read_ksm(
    prom: &Prometheus,
    scenario: &Scenario,
    quantities: &mut [Quantity],
) -> Result<RuleCheck> {
    let mut check = RuleCheck::default();
    for (hour, at) in prom::hours(scenario) {
        let at = at + prom::RULES_AFTER_MS;
        let recorded = prom.query(&promql::ksm_gpu_hours(), at).await?;
        let computed = prom.query(&promql::ksm_gpu_hours_subquery(), at).await?;
        check.compare(&recorded, computed);
        for (labels, v) in recorded {
            let get = |name: &str| labels.get(name).map_or("", String::as_str);
            let class = class_of(get("label_nvidia_com_gpu_product"));
            // The device plugin's resource as KSM writes it: `nvidia_com_mig_1g_10gb`.
            let profile = get("resource")
                .strip_prefix("nvidia_com_mig_")
                .map(|p| p.replace('_', "."))
                .unwrap_or_default();
            let key = cell_key(get("namespace"), hour);
            let ms = v * 3.6e6;
            for (i, (c, p, _)) in GPU_KINDS.iter().enumerate() {
                if *c == class && *p == profile {
                    *quantities[i].sides[KSM].entry(key.clone()).or_default() += ms;
                }
            }
            *quantities[Q_BILLED].sides[KSM].entry(key).or_default() += billed(&profile, ms);
        }
        for (labels, v) in prom.query(&promql::ksm_node_max_gpus(), at).await? {
            let key = cell_key(labels.get("node").map_or("", String::as_str), hour);
            quantities[Q_MAX_GPUS].sides[KSM].insert(key, v);
        }
    }
    Ok(check)
}

/// Why each quantity comes out as it does, in the order of the quantities.
const WHY: [&str; 8] = [
    "Meterflow bills the container runtime's start and finish times (off by the kubelet's whole seconds); Prometheus counts the GPUs each scrape shows × 15 s (off by up to an interval per run and hour), and the server also loses every failed scrape; kube-state-metrics' rule counts the kubelet's start and exit times as the API server holds them (whole seconds), and while a node's updates are late or cut off the API server's stale view of its pods, up to 15 s a scrape",
    "as for H100",
    "as for H100",
    "Meterflow's figure is its billing stream, adjustments included; the others apply the MIG fraction to their GPU-hours",
    "Prometheus's `increase` extrapolates each board's counter over the hour; Meterflow bills a holder only the energy between two readings inside its run and leaves the board's energy before the first and after the last to the operator, so it is short by up to an interval at each end of a run (its bound)",
    "Meterflow differences cgroup counters between readings and has none at a container's exit, so each run's last interval is missing; `increase` extrapolates it",
    "both hold each reading until the next and have none at a container's exit; the scraping server also loses failed scrapes",
    "each counts the GPUs held at once: Meterflow from the runtime's intervals, Prometheus from each scrape's series (kube-state-metrics: the requests of the containers running at each scrape)",
];

/// In plain words, per quantity: the systems from closest to furthest, and why.
fn verdict(quantities: &[Quantity]) -> Result<String> {
    let mut out = String::new();
    for (q, why) in quantities.iter().zip(WHY) {
        let truth = score(&q.truth, &q.truth).sum;
        let mut ranked: Vec<(f64, &str)> = q
            .systems()
            .map(|(i, system)| (score(&q.truth, &q.sides[i]).abs_error, system))
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        let order: Vec<String> = ranked
            .iter()
            .map(|(err, system)| {
                let pct = if truth > 0.0 {
                    100.0 * err / truth
                } else {
                    0.0
                };
                format!("{system} {pct:.2} %")
            })
            .collect();
        writeln!(
            out,
            "- **{}**: {}. Why: {why}.",
            q.name,
            order.join(", then ")
        )?;
    }
    Ok(out)
}

/// The accuracy table: per quantity, the truth, then each system's figure, error and bound.
fn accuracy_table(quantities: &[Quantity]) -> Result<String> {
    let mut table = String::new();
    writeln!(
        table,
        "| quantity | ground truth | system | figure | error, summed over cells | per cell: mean / worst error | cells exact | bound |"
    )?;
    writeln!(table, "|---|---:|---|---:|---:|---:|---:|---:|")?;
    for q in quantities {
        let truth = score(&q.truth, &q.truth).sum;
        for (i, system) in q.systems() {
            let s = score(&q.truth, &q.sides[i]);
            let pct = if truth > 0.0 {
                100.0 * s.abs_error / truth
            } else {
                0.0
            };
            let spurious = match s.spurious {
                0 => String::new(),
                n => format!(" (+{n} the truth has not)"),
            };
            let bound = q.bounds[i].map_or("—".to_string(), |b| {
                let mark = if s.abs_error <= b + 0.5 { "✓" } else { "✗" };
                format!("{:.4} {mark}", b * q.scale)
            });
            let (name, truth_cell) = match i {
                0 => (
                    format!("{} ({})", q.name, q.unit),
                    format!("{:.4}", truth * q.scale),
                ),
                _ => (String::new(), String::new()),
            };
            writeln!(
                table,
                "| {name} | {truth_cell} | {system} | {:.4} | {:.4} ({pct:.2} %) | {:.2} % / {:.2} % | {}/{}{spurious} | {bound} |",
                s.sum * q.scale,
                s.abs_error * q.scale,
                100.0 * s.mean_rel,
                100.0 * s.worst_rel,
                s.exact,
                s.cells,
            )?;
        }
    }
    Ok(table)
}

/// Prometheus as a node agent: its readings go into an agent (WAL, remote write), which
/// forwards them to a server.
struct AgentRun {
    agent: Prometheus,
    server: Prometheus,
    writes: usize,
    /// Writes taken by the agent before its server was up.
    writes_while_down: usize,
    /// Samples the agent had to send again (its own counter).
    retried: f64,
    /// Seconds of the agent's receiver taking every write.
    write_s: f64,
    /// From the first write until the server had everything.
    delivered_s: f64,
    /// CPU-seconds of the agent and of the server, from the first write to the last sample sent.
    cpu: (f64, f64),
}

/// Freshness probes through the Prometheus agent at most (each waits up to 5 s).
const AGENT_PROBES: usize = 10;

/// The agent's server is down while the agent takes this many ticks of readings (20 min).
const SERVER_DOWN_WRITES: usize = 80;

/// Writes `bodies` into a Prometheus agent whose server is down for the first
/// [`SERVER_DOWN_WRITES`] of them (a delivery fault, as a network partition or a server
/// restart is), proves that the agent failed to send and retried, then starts the server and
/// waits until the agent has sent everything.
async fn through_agent(binary: &Path, dir: &Path, bodies: Vec<Vec<u8>>) -> Result<AgentRun> {
    let (agent_dir, server_dir) = (dir.join("prom-agent"), dir.join("prom-agent-server"));
    std::fs::create_dir_all(&agent_dir)?;
    std::fs::create_dir_all(&server_dir)?;
    let server_port = proc::free_port()?;
    let server_url = format!("http://127.0.0.1:{server_port}");
    let agent =
        Prometheus::start_agent(binary, &agent_dir, proc::free_port()?, &server_url).await?;
    let (writes, writes_while_down) = (bodies.len(), SERVER_DOWN_WRITES.min(bodies.len() / 2));
    let cpu_idle = agent.child.cpu_seconds();
    let started = Instant::now();
    let mut bodies = bodies.into_iter();
    let mut write_s = 0.0;
    for body in bodies.by_ref().take(writes_while_down) {
        let t = Instant::now();
        agent.write(body).await?;
        write_s += t.elapsed().as_secs_f64();
    }
    // The fault happened: the agent tried to send to the server that is down, and will again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent
        .own_metric("prometheus_remote_storage_samples_retried_total")
        .await?
        == 0.0
    {
        if Instant::now() > deadline {
            bail!(
                "the Prometheus agent retried nothing in 60 s while its server was down; its log: {}",
                agent.child.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server = Prometheus::start(binary, &server_dir, server_port).await?;
    let server_cpu_idle = server.child.cpu_seconds();
    for body in bodies {
        let t = Instant::now();
        agent.write(body).await?;
        write_s += t.elapsed().as_secs_f64();
    }
    // Until the agent has sent its newest sample and holds none back.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let newest = agent
            .own_metric("prometheus_remote_storage_highest_timestamp_in_seconds")
            .await?;
        let sent = agent
            .own_metric("prometheus_remote_storage_queue_highest_sent_timestamp_seconds")
            .await?;
        let pending = agent
            .own_metric("prometheus_remote_storage_samples_pending")
            .await?;
        if newest > 0.0 && sent >= newest && pending == 0.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the Prometheus agent had not sent everything in 10 min (newest {newest}, sent {sent}, pending {pending}); its log: {}",
                agent.child.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let delivered_s = started.elapsed().as_secs_f64();
    let retried = agent
        .own_metric("prometheus_remote_storage_samples_retried_total")
        .await?;
    let cpu = (
        agent.child.cpu_seconds() - cpu_idle,
        server.child.cpu_seconds() - server_cpu_idle,
    );
    Ok(AgentRun {
        agent,
        server,
        writes,
        writes_while_down,
        retried,
        write_s,
        delivered_s,
        cpu,
    })
}

/// Every system's scores and bounds per quantity, and the proofs that the faults landed, as
/// JSON at `path` (for the test that checks them).
fn write_scores(
    path: &Path,
    quantities: &[Quantity],
    billing: &meter::BilledGpu,
    agent: &AgentRun,
    scenario: &Scenario,
    rules: [&RuleCheck; 3],
) -> Result<()> {
    let side = |q: &Quantity, i: usize| {
        let s = score(&q.truth, &q.sides[i]);
        serde_json::json!({
            "sum": s.sum * q.scale,
            "abs_error": s.abs_error * q.scale,
            "bound": q.bounds[i].map(|b| b * q.scale),
            "cells_exact": s.exact,
            "cells": s.cells,
            "mean_relative_error": s.mean_rel,
            "worst_relative_error": s.worst_rel,
            "spurious_cells": s.spurious,
        })
    };
    let scores: Vec<serde_json::Value> = quantities
        .iter()
        .map(|q| {
            serde_json::json!({
                "quantity": q.name,
                "unit": q.unit,
                "truth": score(&q.truth, &q.truth).sum * q.scale,
                "meterflow": side(q, MF),
                "prometheus": side(q, SERVER),
                "prometheus_agent": side(q, AGENT),
                "prometheus_ksm": if q.read[KSM] { side(q, KSM) } else { serde_json::Value::Null },
            })
        })
        .collect();
    let recorded: serde_json::Map<String, serde_json::Value> =
        ["prometheus", "prometheus_agent", "prometheus_ksm"]
            .iter()
            .zip(rules)
            .map(|(server, r)| {
                let check = serde_json::json!({
                    "cells": r.cells,
                    "differing_from_subquery": r.differing,
                });
                (server.to_string(), check)
            })
            .collect();
    let doc = serde_json::json!({
        "quantities": scores,
        "meterflow_billing": {
            "gpu_records": billing.records,
            "adjustments": billing.adjustments,
        },
        "faults": {
            "board_counter_resets_seen": scenario.counter_resets_seen,
        },
        // Per server, the hourly GPU-hours read from its recorded rule, and how many differ
        // from the rule's expression as a subquery.
        "recording_rules": recorded,
        "agent": {
            "writes": agent.writes,
            "writes_while_server_down": agent.writes_while_down,
            "samples_retried": agent.retried,
        },
    });
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A tenant's 30 days hour by hour, asked `runs` times of each system: milliseconds per ask.
struct Latency {
    meterflow: Vec<f64>,
    prom_gpu: Vec<f64>,
    prom_energy: Vec<f64>,
    /// Meterflow's rows and Prometheus's points in one answer.
    rows: (usize, usize),
    runs: usize,
}

async fn thirty_days(
    mf: &Meterflow,
    prom: &Prometheus,
    tenant: &str,
    runs: usize,
) -> Result<Latency> {
    let now = now_ms();
    let mut l = Latency {
        meterflow: vec![],
        prom_gpu: vec![],
        prom_energy: vec![],
        rows: (0, 0),
        runs,
    };
    for _ in 0..runs {
        let t = Instant::now();
        l.rows.0 = mf.thirty_days(tenant, now).await?;
        l.meterflow.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        l.rows.1 = prom
            .query_range(
                &promql::tenant_gpu_hours(tenant),
                now - 30 * 24 * HOUR_MS,
                now,
                HOUR_MS,
            )
            .await?;
        l.prom_gpu.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        prom.query_range(
            &promql::tenant_energy(tenant),
            now - 30 * 24 * HOUR_MS,
            now,
            HOUR_MS,
        )
        .await?;
        l.prom_energy.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(l)
}

/// What each system cost and how fast it answered.
struct Costs {
    samples: u64,
    prom_samples: u64,
    agent_samples: u64,
    /// The processor reading the whole topic as a backlog: seconds and CPU-seconds.
    backlog: (f64, f64),
    publish_s: f64,
    /// The Prometheus server's remote writes.
    write_s: f64,
    /// Processor, sink and broker CPU-seconds, live.
    mf_cpu: (f64, f64, f64),
    /// Processor, sink and broker resident MiB, now and at the peak.
    mf_mem: ((f64, f64), (f64, f64), (f64, f64)),
    prom_cpu: f64,
    prom_mem: (f64, f64),
    /// The Prometheus agent's and its server's resident MiB.
    agent_mem: ((f64, f64), (f64, f64)),
    /// The kube-state-metrics server: samples, CPU-seconds taking them, resident MiB.
    ksm: (u64, f64, (f64, f64)),
    /// Milliseconds from a sample to the API showing it: Meterflow's, the Prometheus server's,
    /// through the Prometheus agent.
    fresh: (Vec<f64>, Vec<f64>, Vec<f64>),
    latency: Latency,
    probes: usize,
}

fn per_million(cpu: f64, samples: u64) -> f64 {
    cpu / (samples as f64 / 1e6)
}

impl Costs {
    /// Meterflow's CPU-seconds per million of its samples, live: processor, sink and broker.
    fn meterflow_per_million(&self) -> f64 {
        per_million(self.mf_cpu.0 + self.mf_cpu.1 + self.mf_cpu.2, self.samples)
    }
}

/// The cost and speed table.
fn cost_table(c: &Costs, agent: &AgentRun) -> Result<String> {
    let (mf_cpu, mf_mem, l) = (c.mf_cpu, c.mf_mem, &c.latency);
    let (mf_fresh, prom_fresh, agent_fresh) = (&c.fresh.0, &c.fresh.1, &c.fresh.2);
    let mut perf = String::new();
    writeln!(
        perf,
        "| figure | Meterflow | Prometheus server | Prometheus agent → server |"
    )?;
    writeln!(perf, "|---|---|---|---|")?;
    writeln!(
        perf,
        "| samples ingested | {} (every sample the agents collected) | {} (the four series families the PromQL reads, staleness markers included) | {} (the same families, every reading the agents took) |",
        c.samples, c.prom_samples, c.agent_samples
    )?;
    writeln!(
        perf,
        "| throughput | processor, one worker: {:.0} samples/s ({:.2} s for the backlog); agent spool + producer: {:.0} samples/s | remote-write receiver, {} shards at once: {:.0} samples/s ({:.1} s) | agent's receiver and WAL: {:.0} samples/s; forwarded to the server {:.1} s after the first write, its first {} writes while the server was down |",
        c.samples as f64 / c.backlog.0,
        c.backlog.0,
        c.samples as f64 / c.publish_s,
        prom::SHARDS,
        c.prom_samples as f64 / c.write_s,
        c.write_s,
        c.agent_samples as f64 / agent.write_s,
        agent.delivered_s,
        agent.writes_while_down
    )?;
    writeln!(
        perf,
        "| CPU-seconds per million samples | processor {:.2} live ({:.2} reading the backlog), sink {:.2}, broker {:.2} (publish and serve); all {:.2} | {:.2} | agent {:.2}, server {:.2}; both {:.2} |",
        per_million(mf_cpu.0, c.samples),
        per_million(c.backlog.1, c.samples),
        per_million(mf_cpu.1, c.samples),
        per_million(mf_cpu.2, c.samples),
        c.meterflow_per_million(),
        per_million(c.prom_cpu, c.prom_samples),
        per_million(agent.cpu.0, c.agent_samples),
        per_million(agent.cpu.1, c.agent_samples),
        per_million(agent.cpu.0 + agent.cpu.1, c.agent_samples),
    )?;
    writeln!(
        perf,
        "| freshness, sample → visible in the API ({} probes; {} through the agent) | p50 {:.1} ms, p99 {:.1} ms | p50 {:.1} ms, p99 {:.1} ms (raw series; a recording rule adds up to its 15 s interval, a scrape up to 15 s more) | p50 {:.1} ms, p99 {:.1} ms (the remote write's batch waits up to its 5-s deadline; a recording rule and a scrape add as for the server) |",
        c.probes,
        agent_fresh.len(),
        quantile(mf_fresh, 0.5),
        quantile(mf_fresh, 0.99),
        quantile(prom_fresh, 0.5),
        quantile(prom_fresh, 0.99),
        quantile(agent_fresh, 0.5),
        quantile(agent_fresh, 0.99)
    )?;
    writeln!(
        perf,
        "| a tenant's 30 days hourly ({} runs) | p50 {:.1} ms, p99 {:.1} ms (`/v1/tenants/{{tenant}}/usage?window=hour`, every metric, {} rows) | GPU-hours (its recorded rule): p50 {:.1} ms, p99 {:.1} ms; energy: p50 {:.1} ms, p99 {:.1} ms ({} points) | the same server |",
        l.runs,
        quantile(&l.meterflow, 0.5),
        quantile(&l.meterflow, 0.99),
        l.rows.0,
        quantile(&l.prom_gpu, 0.5),
        quantile(&l.prom_gpu, 0.99),
        quantile(&l.prom_energy, 0.5),
        quantile(&l.prom_energy, 0.99),
        l.rows.1
    )?;
    writeln!(
        perf,
        "| resident memory, now / peak | processor {:.0} / {:.0} MiB, sink {:.0} / {:.0} MiB, broker {:.0} / {:.0} MiB | {:.0} / {:.0} MiB | agent {:.0} / {:.0} MiB, server {:.0} / {:.0} MiB |",
        mf_mem.0.0,
        mf_mem.0.1,
        mf_mem.1.0,
        mf_mem.1.1,
        mf_mem.2.0,
        mf_mem.2.1,
        c.prom_mem.0,
        c.prom_mem.1,
        c.agent_mem.0.0,
        c.agent_mem.0.1,
        c.agent_mem.1.0,
        c.agent_mem.1.1
    )?;
    let (ksm_samples, ksm_cpu, ksm_mem) = c.ksm;
    writeln!(
        perf,
        "\nThe Prometheus server reading kube-state-metrics took {ksm_samples} samples ({:.2} CPU-seconds per million; {:.0} / {:.0} MiB resident now / at the peak).",
        per_million(ksm_cpu, ksm_samples),
        ksm_mem.0,
        ksm_mem.1
    )?;
    Ok(perf)
}

/// `benches/RESULTS.md`: what ran, the faults, the accuracy table and its plain words, the
/// cost and speed table, the method.
fn results_doc(
    args: &Args,
    scenario: &Scenario,
    costs: &Costs,
    agent: &AgentRun,
    quantities: &[Quantity],
    (table, perf): (&str, &str),
    prometheus: &str,
) -> Result<String> {
    let mut doc = String::new();
    writeln!(doc, "# Meterflow and Prometheus, side by side\n")?;
    writeln!(
        doc,
        "Written by `cargo run --release --bin compare{}` (seed {}) at commit `{}` on {}.\n",
        if args.quick { " -- --quick" } else { "" },
        args.seed,
        git_commit(),
        machine()
    )?;
    writeln!(
        doc,
        "Input: {} simulated nodes (H100 and A100, one A100 per odd node split into seven `1g.10gb` MIG slices) for {} hours at a 15 s collection interval: {} tenants, {} containers ({} of them shorter than a scrape interval), {} samples for Meterflow, {} for the Prometheus server, {} for the Prometheus agents, {} from kube-state-metrics. Prometheus {}. All read each node as its real sources show it (`ingest/src/sources/simulator.rs`): the Akash provider's pods, the kubelet's whole-second times and `lastState`, board energy counters since the driver loaded, cgroup readings at ticks and never at a container's exit; the truth is the simulator's physical record of each run.\n",
        scenario.nodes,
        scenario.hours,
        scenario.tenants.len(),
        scenario.containers,
        scenario.short_containers,
        scenario.samples,
        costs.prom_samples,
        costs.agent_samples,
        costs.ksm.0,
        prometheus
    )?;
    writeln!(doc, "Faults injected (the same for every system):\n")?;
    for f in &scenario.faults {
        writeln!(doc, "- {f}")?;
    }
    writeln!(
        doc,
        "- the Prometheus agents' server down while the first {} of {} remote writes (one per 15-s tick) reached the agents: {:.0} samples retried from the WAL (the agent's `prometheus_remote_storage_samples_retried_total`)",
        agent.writes_while_down, agent.writes, agent.retried
    )?;
    writeln!(
        doc,
        "\n## Accuracy per tenant and hour\n\nEach system's figure is its sum over the cells (tenant × hour, or node × hour for the GPU maxima); its error is the sum of the cells' absolute errors (so errors of opposite sign do not cancel), then per cell the mean and the worst relative error over the cells the truth has, how many cells equal the truth to its unit (a millisecond of GPU time, a millijoule, a microsecond of CPU) and how many the truth does not have. The bound is how far that system may be off from what its way of reading the nodes cannot show (below); ✓ where it is within it.\n"
    )?;
    writeln!(doc, "{table}")?;
    writeln!(
        doc,
        "## Where each wins and loses\n\nPer quantity, from closest to the truth to furthest (summed error over the cells):\n\n{}",
        verdict(quantities)?
    )?;
    writeln!(
        doc,
        "Cost: Meterflow takes {:.1} CPU-seconds per million of its samples live (processor, sink and broker; it reads every sample kind, {:.1} times as many samples as the Prometheus agents), the Prometheus agent and its server {:.1} per million of theirs, the scraping server alone {:.1}, the server reading kube-state-metrics {:.1}.\n",
        costs.meterflow_per_million(),
        scenario.samples as f64 / costs.agent_samples as f64,
        per_million(agent.cpu.0 + agent.cpu.1, costs.agent_samples),
        per_million(costs.prom_cpu, costs.prom_samples),
        per_million(costs.ksm.1, costs.ksm.0)
    )?;
    let l = &costs.latency;
    writeln!(
        doc,
        "Query: a tenant's 30 days hour by hour takes Meterflow p50 {:.1} ms, p99 {:.1} ms, and Prometheus, reading its recorded rule, p50 {:.1} ms, p99 {:.1} ms.\n",
        quantile(&l.meterflow, 0.5),
        quantile(&l.meterflow, 0.99),
        quantile(&l.prom_gpu, 0.5),
        quantile(&l.prom_gpu, 0.99)
    )?;
    writeln!(doc, "## Cost and speed\n\n{perf}")?;
    doc.push_str(METHOD);
    Ok(doc)
}

fn prometheus_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            // "prometheus, version 2.42.0+ds (branch: ...)" → "version 2.42.0+ds (branch: ...)"
            text.lines()
                .next()
                .map(|l| l.trim_start_matches("prometheus, ").to_string())
        })
        .unwrap_or_else(|| "(version unknown)".into())
}

/// Writes one new series at the wall clock's now (moved by `shift_ms`, where the readings
/// were) into `writer` and times each until a query of `reader` returns it (the same server,
/// or the server an agent forwards to).
async fn prom_freshness(
    writer: &Prometheus,
    reader: &Prometheus,
    probes: usize,
    shift_ms: i64,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(probes);
    for i in 0..probes {
        let now = now_ms() + shift_ms;
        let body = prom::probe(i, now);
        let sent = Instant::now();
        writer.write(body).await?;
        loop {
            if !reader
                .query(&format!("meterflow_compare_probe{{probe=\"{i}\"}}"), now)
                .await?
                .is_empty()
            {
                out.push(sent.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if sent.elapsed() > Duration::from_secs(60) {
                bail!("Prometheus probe {i} not visible after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(out)
}

const METHOD: &str = r#"
## How each side was fed and asked

- **Meterflow**: every node's batches go into a RocksDB spool (`meterflow_ingest::spool`, as
  `meterflow agent` keeps it) and out through the agent's idempotent producer to the embedded
  broker (`meterflow broker`, memory storage); a failed exchange leaves the batch in the spool
  for the next tick. The processor (`meterflow processor`, one worker, 1-minute windows,
  10-minute lateness) and the sink (`meterflow sink`) run while the agents publish (the six
  hours faster than real time), so a window is billed once the other agents' data has passed
  it, before a partitioned node's batches arrive; the
  figures are read from `GET /v1/tenants/{tenant}/usage?window=hour&group_by=gpu_class,mig_profile`
  and `GET /v1/fleet/hourly`. Its billed GPU-hours are read from its billing stream
  (`meterflow.billing`, every charge and adjustment of every GPU item), each record's cost
  turned back into whole-GPU time at the class's hourly price written out in the scenario
  (`scenario::gpu_hour_micros`), so a MIG slice counts at the fraction the processor priced it
  at; the truth and Prometheus apply the scenario's own fractions (`scenario::billed_fraction`,
  `1g.10gb` = 1/7). The bound adds half a micro of rounding per record.
- **Prometheus server, scraping**: a scrape of a node at each tick shows what runs at that
  instant, as dcgm-exporter (`DCGM_FI_DEV_GPU_UTIL`, `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`
  per GPU board with the pod's namespace and name) and cAdvisor
  (`container_cpu_usage_seconds_total`, `container_memory_working_set_bytes`) expose it; a
  failed scrape or a series gone gets a staleness marker, as the scrape loop writes. These
  samples go through the remote-write receiver, a tick at a time, its series spread over four
  requests sent at once as remote write's shards would (each series in order); a scrape
  across the partition fails.
- **Prometheus agent, WAL + remote write** (as its best operators run it on a fleet): a
  Prometheus in agent mode (`--enable-feature=agent`) per node scrapes its exporters locally,
  so a failed exchange with the central server is a failed delivery that its write-ahead log
  retries, not a lost scrape: every reading it took arrives, once and in order. Only the
  node's outage loses readings (the agent is down: no reading and no staleness marker, its
  series fade after the 5-min lookback). Here one real agent takes every node's readings
  through its receiver and remote-writes them to a second server with the default queue;
  that server is down while the first 20 minutes of readings arrive, and the agent's own
  `prometheus_remote_storage_samples_retried_total` shows it retried. Its queue keeps one
  shard, as a node's agent does at a few hundred samples every 15 s: with the default's many
  shards, this one agent taking every node's hours of readings in seconds let them drift
  more than the server's 1-h appendable window apart, and the server refused up to 11 % of
  the readings as out of bounds, an artefact of the replay's speed. The agent forwards only
  samples newer than its start (its WAL watcher skips older ones), so its readings are stamped
  whole hours ahead and read back at the same shifted instants.
- **Prometheus server, kube-state-metrics** (the chargeback tools' way, OpenCost's among
  them: GPU time from what the Kubernetes API says each container requested and when it ran,
  not from the exporters): a server of its own scrapes kube-state-metrics at each tick, which
  shows each GPU pod's container as the API server holds it, the kubelet's status in whole
  seconds: `kube_pod_container_status_running`, the running run's
  `kube_pod_container_state_started`, the last exited run's
  `kube_pod_container_status_last_terminated_timestamp`, its
  `kube_pod_container_resource_requests` of `nvidia_com_gpu` or `nvidia_com_mig_1g_10gb`, and
  the node's GPU product through `kube_node_labels` (GPU feature discovery's label). The API
  server hears from a node's kubelet over the node's link: a dropped exchange leaves it with
  the node's state of the tick before, the partition with the state from before it until it
  heals; the agent's outage leaves the kubelet running. Its rule counts, per container and
  scrape, the seconds of the 15-s interval before the scrape that its GPUs were held: the
  running run since its start (the interval at most) and a run that exited in the interval up
  to its exit, so an hour's sum is each run from its start to its exit to the kubelet's second,
  where a sampler counts 15 s per scrape that sees it. It reads no usage (energy, CPU, memory).
- **Recording rules, evaluated by Prometheus**: every server here keeps the rules a
  chargeback operator would (`promql::recording_rules` in `benches/compare/prom.rs`: GPUs held
  per tenant, model and MIG profile and per node, memory per tenant, the kube-state-metrics
  GPU-seconds per tenant, product and resource, GPUs requested by running containers per
  node), in one group evaluated every 15 s. The rule manager evaluates only at the present and
  the scenario is replayed in seconds, so promtool's backfiller (`promtool tsdb
  create-blocks-from rules`, which loads the file as the rule manager does, at the group's own
  offset into each interval) evaluates them over the scenario through each server's query API;
  its blocks join a snapshot of the server's TSDB and the server is started again on them.
  The hourly figures read the recorded series: GPU-hours
  `sum_over_time(namespace_model_profile:dcgm_gpus:count[59m59s999ms]) * 15 / 3600`, memory
  `sum_over_time(namespace:container_memory_working_set_bytes:sum[59m59s999ms]) * 15 / 3600`,
  per node `max_over_time(hostname:dcgm_gpus:count[59m59s999ms])`, and for
  kube-state-metrics `sum_over_time(namespace_resource_product:kube_gpu_seconds:step15s[59m59s999ms]) / 3600`
  and `max_over_time(node:kube_gpus_running:sum[59m59s999ms])`, each 15 s less a millisecond
  after the hour's end, so that its evaluations are those of the hour's scrapes whatever the
  group's offset; a range reaches back 59m59.999s because Prometheus 2's ranges include both
  ends. Energy `increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{namespace!=""}[1h])` (a
  board's series carries the holding pod's labels; an idle or MIG-split board's has none and
  is the node's) and CPU `increase(container_cpu_usage_seconds_total[1h])` are read at the
  hour's end. Each hour's GPU-hours are also asked as a subquery of the rule's expression at
  the scrapes' own steps (`scores.json`'s `recording_rules`): the server's and
  kube-state-metrics' are the same to the last digit; the agent's server differs in the cells
  of the agent's outage, where a series last written before it fades when the 5-min lookback
  passes its last sample, which the rule's offset moves by a step. The 30-day query latency
  reads the recorded rule, as a dashboard would.
- **Bounds**, each computed from the physical runs, never from a system's readings:
  Meterflow's is what the node's sources cannot show (below). A 15-s sampler's
  (`count` × 15 s) is one interval per GPU for each hour a run touches, plus one per
  reading not taken while the run was up or within the 5-min lookback after it (the
  outage); the server's adds 15 s per GPU series each failed scrape would have shown.
  kube-state-metrics' is, per GPU, 2 s per run (a start and an exit in whole seconds), 15 s
  for a run no scrape saw running (its start is never shown, and the interval of its exit is
  counted whole), and 15 s for each scrape at which the API server's view of the run's pod was
  stale and not what ran. No bound is stated for energy, CPU and memory of Prometheus
  (`increase` extrapolates).
- **Ground truth**: the simulator's physical record of each run (see
  `benches/compare/scenario.rs`), never either system's readings: GPU time is each run's
  overlap with the hour to the millisecond, energy 300 W per whole GPU held and CPU the
  container's cores over the same overlap, memory each 15-s reading held to the next or the
  exit. Both systems read the node as its real sources show it (kubelet times in whole
  seconds, board energy counters since the driver loaded, no reading at a container's exit),
  so neither can be exact: the "sources' bound" column is how far a collector of those
  sources may be off, run by run (1 s per start and exit shown, a run the kubelet never
  listed, a board's energy before its holder's first reading and after its last), and
  Meterflow must stay within it.
- **Throughput** is the processor's: the backlog of every batch, read again from the
  beginning by a second processor (one worker, a state of its own) once every answer was read
  and the sink stopped, from the first message to the last. The live processor's CPU is
  counted from its start until the API settled. CPU-seconds come from `/proc/PID/stat` of each process;
  Prometheus's are counted from its first write to its last, and the servers' evaluations of
  the recording rules are added.
- **Freshness**: one live batch (a new lease on a GPU) at a time, timed from the producer's
  send to the first `usage` answer that shows it; for Prometheus, one remote-written sample
  to the first instant query that returns it, written to the server itself or to the agent
  and read from the server it forwards to (10 probes at most: each waits for the remote
  write's batch).
"#;
