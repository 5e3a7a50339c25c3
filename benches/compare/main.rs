//! `compare`: Meterflow and Prometheus side by side on one fleet scenario with known ground
//! truth and injected faults (see `scenario.rs`).
//!
//! `cargo run --release --bin compare -- [--quick] [--nodes N] [--hours H] [--seed S]
//! [--results FILE|-]`
//!
//! The same simulated fleet goes to Meterflow (agent spool and producer → embedded broker →
//! processor → sink, each its own process, read back over the HTTP API) and to a real
//! Prometheus on loopback (through its remote-write receiver, as a scrape loop would have
//! stored it: what runs at each scrape instant, staleness markers for what is gone or not
//! scraped), then reads per tenant and hour GPU-hours by class, billed GPU-hours with MIG
//! fractions, energy, CPU core-hours, memory GiB-hours and per node and hour the most GPUs
//! allocated, and compares both with the truth. Then throughput, CPU-seconds per million
//! samples, freshness, a 30-day query's latency and resident memory. It prints one table and
//! writes it to `benches/RESULTS.md` with the machine, the input size and the commit. Exits 1
//! if Meterflow's GPU-hours or energy are further from the truth than what the node's sources
//! cannot show (the scenario's bounds: whole-second kubelet times, runs the kubelet never
//! listed, a board's energy before its holder's first reading and after its last).

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
use meterflow_processor::PriceBook;

use crate::meter::Meterflow;
use crate::prom::{Prometheus, class_of, promql};
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

struct Quantity {
    name: String,
    unit: &'static str,
    /// From the exact unit to the displayed one.
    scale: f64,
    truth: Cells,
    meterflow: Cells,
    prometheus: Cells,
    /// Meterflow's summed error must stay within this (the sources' bound, in the exact unit).
    bound: Option<f64>,
}

impl Quantity {
    /// The truth's cells, or Meterflow's.
    fn cells(&mut self, truth: bool) -> &mut Cells {
        if truth {
            &mut self.truth
        } else {
            &mut self.meterflow
        }
    }
}

/// (sum, sum of absolute errors, cells equal to the truth, cells)
fn score(truth: &Cells, got: &Cells) -> (f64, f64, usize, usize) {
    let keys: BTreeSet<&String> = truth.keys().chain(got.keys()).collect();
    let (mut sum, mut err, mut equal) = (0.0, 0.0, 0);
    for k in &keys {
        let (t, g) = (
            truth.get(*k).copied().unwrap_or(0.0),
            got.get(*k).copied().unwrap_or(0.0),
        );
        sum += g;
        err += (g - t).abs();
        // Equal to the unit the truth is kept in (a millisecond, a millijoule, a microsecond),
        // or for byte-milliseconds of memory (past 2^53) to the precision of a JSON number.
        if (g - t).abs() < 0.5_f64.max(t.abs() * 1e-12) {
            equal += 1;
        }
    }
    (sum, err, equal, keys.len())
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
    let (requests, prom_samples) = prom::requests(&scenario);
    println!(
        "scenario: {nodes} nodes, {hours} h from {}, {} tenants, {} containers ({} shorter than a scrape interval), {} samples; {prom_samples} Prometheus samples in {} remote writes",
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(t0 as u64)),
        scenario.tenants.len(),
        scenario.containers,
        scenario.short_containers,
        scenario.samples,
        requests.len(),
    );
    for f in &scenario.faults {
        println!("  fault: {f}");
    }

    // Meterflow: publish everything through the agent's spool, then process it.
    let mut mf = Meterflow::start_broker(&bin, dir.path()).await?;
    let t = Instant::now();
    let messages = mf.publish(&mut scenario).await?;
    let publish_s = t.elapsed().as_secs_f64();
    println!(
        "meterflow: {messages} batches published in {publish_s:.1} s ({:.0} samples/s through the agent's spool and producer)",
        scenario.samples as f64 / publish_s
    );
    mf.start_pipeline().await?;
    let t = Instant::now();
    let mut first_read: Option<Instant> = None;
    let processed_at = loop {
        mf.check_alive()?;
        match mf.processor_input().await {
            Some(n) if n >= messages => break Instant::now(),
            Some(n) if n > 0 && first_read.is_none() => first_read = Some(Instant::now()),
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("the processor did not read the samples in 30 min");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let processor_cpu = mf.processor.as_ref().map_or(0.0, proc::Child::cpu_seconds);
    let process_s = (processed_at - first_read.unwrap_or(t))
        .as_secs_f64()
        .max(1e-3);
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
    println!(
        "meterflow: processor read {} samples in {process_s:.2} s ({:.0} samples/s, one worker); API settled {:.1} s after the processor started",
        scenario.samples,
        scenario.samples as f64 / process_s,
        (settled_at - t).as_secs_f64()
    );

    // Prometheus: the same fleet through its remote-write receiver.
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir)?;
    let prom = Prometheus::start(&prometheus_bin, &prom_dir, proc::free_port()?).await?;
    let prom_cpu_idle = prom.child.cpu_seconds();
    let t = Instant::now();
    for r in requests {
        prom.write(r).await?;
    }
    let write_s = t.elapsed().as_secs_f64();
    let prom_cpu = prom.child.cpu_seconds() - prom_cpu_idle;
    println!(
        "prometheus: {prom_samples} samples written in {write_s:.1} s ({:.0} samples/s)",
        prom_samples as f64 / write_s
    );

    // Each quantity, per tenant and hour (per node and hour for the GPU maxima).
    let book = PriceBook::default();
    // GPU time billed as whole GPUs: a MIG profile's share of one.
    let billed = |mig_profile: &str, ms: f64| {
        let (n, d) = book.fraction(mig_profile);
        ms * n as f64 / d as f64
    };
    let gpu_kinds = [
        ("h100", "", "GPU-hours h100"),
        ("a100", "", "GPU-hours a100 (whole)"),
        ("a100", "1g.10gb", "GPU-hours a100 1g.10gb MIG"),
    ];
    let mut quantities: Vec<Quantity> = Vec::new();
    let cell_key = |tenant: &str, hour: i64| {
        format!(
            "{tenant} {}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(hour as u64)
            )
        )
    };
    let new_q = |name: &str, unit: &'static str, scale: f64, bound: Option<f64>| Quantity {
        name: name.to_string(),
        unit,
        scale,
        truth: Cells::new(),
        meterflow: Cells::new(),
        prometheus: Cells::new(),
        bound,
    };
    let bounds = &scenario.truth.bounds;
    let gpu_bound = |class: &str, profile: &str| {
        bounds
            .gpu_ms
            .get(&(class.to_string(), profile.to_string()))
            .copied()
            .unwrap_or(0) as f64
    };
    let mut gpu_q: Vec<Quantity> = gpu_kinds
        .iter()
        .map(|(class, profile, name)| {
            new_q(name, "GPU-h", 1.0 / 3.6e6, Some(gpu_bound(class, profile)))
        })
        .collect();
    let billed_bound = gpu_kinds
        .iter()
        .map(|(class, profile, _)| billed(profile, gpu_bound(class, profile)))
        .sum();
    let mut billed_q = new_q(
        "billed GPU-hours (MIG fractions)",
        "GPU-h",
        1.0 / 3.6e6,
        Some(billed_bound),
    );
    let mut energy_q = new_q("energy", "kWh", 1.0 / 3.6e9, Some(bounds.energy_mj as f64));
    let mut cpu_q = new_q("CPU core-hours", "core-h", 1.0 / 3.6e9, None);
    let mut memory_q = new_q(
        "memory GiB-hours",
        "GiB-h",
        1.0 / (3.6e6 * 1_073_741_824.0),
        None,
    );
    let mut max_q = new_q(
        "max GPUs allocated, summed over node-hours",
        "GPUs",
        1.0,
        None,
    );
    // One tenant-hour of the truth or of Meterflow's answer into every quantity's cells.
    let mut put = |truth: bool,
                   key: String,
                   gpu_ms: &BTreeMap<(String, String), i64>,
                   (energy_mj, cpu_us, memory_byte_ms): (i64, i64, f64)| {
        for (i, (class, profile, _)) in gpu_kinds.iter().enumerate() {
            let ms = gpu_ms
                .get(&(class.to_string(), profile.to_string()))
                .copied()
                .unwrap_or(0);
            gpu_q[i].cells(truth).insert(key.clone(), ms as f64);
        }
        let billed_ms = gpu_ms
            .iter()
            .map(|((_, mig), ms)| billed(mig, *ms as f64))
            .sum();
        billed_q.cells(truth).insert(key.clone(), billed_ms);
        energy_q.cells(truth).insert(key.clone(), energy_mj as f64);
        cpu_q.cells(truth).insert(key.clone(), cpu_us as f64);
        memory_q.cells(truth).insert(key, memory_byte_ms);
    };
    for ((tenant, hour), c) in &scenario.truth.tenants {
        let amounts = (c.energy_mj, c.cpu_us, c.memory_byte_ms as f64);
        put(true, cell_key(tenant, *hour), &c.gpu_ms, amounts);
    }
    for ((tenant, hour), c) in &usage {
        let amounts = (c.energy_mj, c.cpu_us, c.memory_byte_ms);
        put(false, cell_key(tenant, *hour), &c.gpu_ms, amounts);
    }
    for ((node, hour), most) in &scenario.truth.node_max_gpus {
        max_q.truth.insert(cell_key(node, *hour), *most as f64);
    }
    for ((node, hour), most) in &fleet {
        if *most > 0 || max_q.truth.contains_key(&cell_key(node, *hour)) {
            max_q.meterflow.insert(cell_key(node, *hour), *most as f64);
        }
    }
    let t = Instant::now();
    for (hour, at) in prom::hours(&scenario) {
        for (labels, v) in prom.query(&promql::gpu_hours(), at).await? {
            let class = class_of(labels.get("modelName").map_or("", String::as_str));
            let profile = labels.get("GPU_I_PROFILE").cloned().unwrap_or_default();
            let key = cell_key(labels.get("namespace").map_or("", String::as_str), hour);
            let ms = v * 3.6e6;
            for (i, (c, p, _)) in gpu_kinds.iter().enumerate() {
                if *c == class && *p == profile {
                    *gpu_q[i].prometheus.entry(key.clone()).or_default() += ms;
                }
            }
            *billed_q.prometheus.entry(key).or_default() += billed(&profile, ms);
        }
        for (q, factor, target) in [
            (promql::energy_joules(), 1e3, &mut energy_q.prometheus),
            (promql::cpu_core_hours(), 3.6e9, &mut cpu_q.prometheus),
            (
                promql::memory_gib_hours(),
                3.6e6 * 1_073_741_824.0,
                &mut memory_q.prometheus,
            ),
        ] {
            for (labels, v) in prom.query(&q, at).await? {
                let key = cell_key(labels.get("namespace").map_or("", String::as_str), hour);
                *target.entry(key).or_default() += v * factor;
            }
        }
        for (labels, v) in prom.query(&promql::node_max_gpus(), at).await? {
            let key = cell_key(labels.get("Hostname").map_or("", String::as_str), hour);
            max_q.prometheus.insert(key, v);
        }
    }
    let prom_eval_s = t.elapsed().as_secs_f64();
    quantities.extend(gpu_q);
    quantities.push(billed_q);
    quantities.push(energy_q);
    quantities.push(cpu_q);
    quantities.push(memory_q);
    quantities.push(max_q);

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
    let now = now_ms();
    let (mut mf_query, mut prom_gpu_query, mut prom_energy_query) = (vec![], vec![], vec![]);
    let mut rows = (0, 0);
    for _ in 0..args.queries {
        let t = Instant::now();
        rows.0 = mf.thirty_days(&busiest, now).await?;
        mf_query.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        rows.1 = prom
            .query_range(
                &promql::tenant_gpu_hours(&busiest),
                now - 30 * 24 * HOUR_MS,
                now,
                HOUR_MS,
            )
            .await?;
        prom_gpu_query.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        prom.query_range(
            &promql::tenant_energy(&busiest),
            now - 30 * 24 * HOUR_MS,
            now,
            HOUR_MS,
        )
        .await?;
        prom_energy_query.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // Freshness: live samples at the wall clock's now, one at a time.
    let mf_fresh = mf.freshness(args.probes).await?;
    let prom_fresh = prom_freshness(&prom, args.probes).await?;
    let prom_mem = prom.child.memory_mib();

    // The report.
    let mut table = String::new();
    let within = |q: &Quantity| {
        q.bound.is_none_or(|bound| {
            let (_, err, _, _) = score(&q.truth, &q.meterflow);
            err <= bound + 0.5
        })
    };
    let exact_ok = quantities.iter().all(within);
    writeln!(
        table,
        "| quantity | ground truth | Meterflow | Meterflow error | the sources' bound | Prometheus | Prometheus error |"
    )?;
    writeln!(table, "|---|---:|---:|---:|---:|---:|---:|")?;
    for q in &quantities {
        let (truth, _, _, _) = score(&q.truth, &q.truth);
        let cell = |got: &Cells| {
            let (sum, err, equal, cells) = score(&q.truth, got);
            let pct = if truth > 0.0 {
                100.0 * err / truth
            } else {
                0.0
            };
            (
                format!("{:.4}", sum * q.scale),
                format!(
                    "{:.4} ({pct:.2} %), {equal}/{cells} cells exact",
                    err * q.scale
                ),
            )
        };
        let (m, me) = cell(&q.meterflow);
        let (p, pe) = cell(&q.prometheus);
        let bound = q
            .bound
            .map_or("—".to_string(), |b| format!("{:.4}", b * q.scale));
        writeln!(
            table,
            "| {} ({}) | {:.4} | {m} | {me} | {bound} | {p} | {pe} |",
            q.name,
            q.unit,
            truth * q.scale
        )?;
    }
    let per_million = |cpu: f64, samples: u64| cpu / (samples as f64 / 1e6);
    let mf_total_cpu = mf_cpu.0 + mf_cpu.1 + mf_cpu.2;
    let mut perf = String::new();
    writeln!(perf, "| figure | Meterflow | Prometheus |")?;
    writeln!(perf, "|---|---|---|")?;
    writeln!(
        perf,
        "| samples ingested | {} (every sample the agents collected) | {prom_samples} (the four series families the PromQL reads, staleness markers included) |",
        scenario.samples
    )?;
    writeln!(
        perf,
        "| throughput | processor, one worker: {:.0} samples/s ({:.2} s for the backlog); agent spool + producer: {:.0} samples/s | remote-write receiver: {:.0} samples/s ({write_s:.1} s) |",
        scenario.samples as f64 / process_s,
        process_s,
        scenario.samples as f64 / publish_s,
        prom_samples as f64 / write_s
    )?;
    writeln!(
        perf,
        "| CPU-seconds per million samples | processor {:.2}, sink {:.2}, broker {:.2} (publish and serve); all {:.2} | {:.2} |",
        per_million(processor_cpu, scenario.samples),
        per_million(mf_cpu.1, scenario.samples),
        per_million(mf_cpu.2, scenario.samples),
        per_million(mf_total_cpu, scenario.samples),
        per_million(prom_cpu, prom_samples)
    )?;
    writeln!(
        perf,
        "| freshness, sample → visible in the API ({} probes) | p50 {:.1} ms, p99 {:.1} ms | p50 {:.1} ms, p99 {:.1} ms (raw series; a recording rule adds up to its 15 s interval, a scrape up to 15 s more) |",
        args.probes,
        quantile(&mf_fresh, 0.5),
        quantile(&mf_fresh, 0.99),
        quantile(&prom_fresh, 0.5),
        quantile(&prom_fresh, 0.99)
    )?;
    writeln!(
        perf,
        "| a tenant's 30 days hourly ({} runs) | p50 {:.1} ms, p99 {:.1} ms (`/v1/tenants/{{tenant}}/usage?window=hour`, every metric, {} rows) | GPU-hours: p50 {:.1} ms, p99 {:.1} ms; energy: p50 {:.1} ms, p99 {:.1} ms ({} points) |",
        args.queries,
        quantile(&mf_query, 0.5),
        quantile(&mf_query, 0.99),
        rows.0,
        quantile(&prom_gpu_query, 0.5),
        quantile(&prom_gpu_query, 0.99),
        quantile(&prom_energy_query, 0.5),
        quantile(&prom_energy_query, 0.99),
        rows.1
    )?;
    writeln!(
        perf,
        "| resident memory, now / peak | processor {:.0} / {:.0} MiB, sink {:.0} / {:.0} MiB, broker {:.0} / {:.0} MiB | {:.0} / {:.0} MiB |",
        mf_mem.0.0,
        mf_mem.0.1,
        mf_mem.1.0,
        mf_mem.1.1,
        mf_mem.2.0,
        mf_mem.2.1,
        prom_mem.0,
        prom_mem.1
    )?;
    println!("\n{table}\n{perf}");
    println!(
        "Prometheus evaluated the hourly PromQL in {prom_eval_s:.2} s; the whole run took {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    if args.results.as_os_str() != "-" {
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
            "Input: {nodes} simulated nodes (H100 and A100, one A100 per odd node split into seven `1g.10gb` MIG slices) for {hours} hours at a 15 s collection interval: {} tenants, {} containers ({} of them shorter than a scrape interval), {} samples for Meterflow, {prom_samples} for Prometheus. Prometheus {}. Both read each node as its real sources show it (`ingest/src/sources/simulator.rs`): the Akash provider's pods, the kubelet's whole-second times and `lastState`, board energy counters since the driver loaded, cgroup readings at ticks and never at a container's exit; the truth is the simulator's physical record of each run.\n",
            scenario.tenants.len(),
            scenario.containers,
            scenario.short_containers,
            scenario.samples,
            prometheus_version(&prometheus_bin)
        )?;
        writeln!(doc, "Faults injected (the same for both systems):\n")?;
        for f in &scenario.faults {
            writeln!(doc, "- {f}")?;
        }
        writeln!(
            doc,
            "\n## Accuracy per tenant and hour\n\nEach system's figure is its sum over the cells (tenant × hour, or node × hour for the GPU maxima); its error is the sum of the cells' absolute errors (so errors of opposite sign do not cancel), and how many cells equal the truth to its unit (a millisecond of GPU time, a millijoule, a microsecond of CPU).\n"
        )?;
        writeln!(doc, "{table}")?;
        writeln!(doc, "## Cost and speed\n\n{perf}")?;
        doc.push_str(METHOD);
        std::fs::write(&args.results, doc)
            .with_context(|| format!("writing {}", args.results.display()))?;
        println!("wrote {}", args.results.display());
    }
    if let Some(path) = &args.json {
        let side = |q: &Quantity, got: &Cells| {
            let (sum, abs_error, equal, cells) = score(&q.truth, got);
            serde_json::json!({"sum": sum * q.scale, "abs_error": abs_error * q.scale, "cells_exact": equal, "cells": cells})
        };
        let scores: Vec<serde_json::Value> = quantities
            .iter()
            .map(|q| {
                serde_json::json!({
                    "quantity": q.name,
                    "unit": q.unit,
                    "bound": q.bound.map(|b| b * q.scale),
                    "truth": score(&q.truth, &q.truth).0 * q.scale,
                    "meterflow": side(q, &q.meterflow),
                    "prometheus": side(q, &q.prometheus),
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_vec_pretty(&scores)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // Where Meterflow differs from the truth, the first few cells of each quantity.
    for q in &quantities {
        let differ = q.truth.iter().filter_map(|(key, t)| {
            let m = q.meterflow.get(key).copied().unwrap_or(0.0);
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

/// Writes one new series at the wall clock's now and times each until a query returns it.
async fn prom_freshness(prom: &Prometheus, probes: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(probes);
    for i in 0..probes {
        let now = now_ms();
        let body = prom::probe(i, now);
        let sent = Instant::now();
        prom.write(body).await?;
        loop {
            if !prom
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
  10-minute lateness) then reads the backlog and the sink (`meterflow sink`) serves it; the
  figures are read from `GET /v1/tenants/{tenant}/usage?window=hour&group_by=gpu_class,mig_profile`
  and `GET /v1/fleet/hourly`; billed GPU-hours apply the price book's MIG fractions to the
  GPU-hours by profile.
- **Prometheus**: a scrape of a node at each tick shows what runs at that instant, as
  dcgm-exporter (`DCGM_FI_DEV_GPU_UTIL`, `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` per GPU board
  with the pod's namespace and name) and cAdvisor (`container_cpu_usage_seconds_total`,
  `container_memory_working_set_bytes`) expose it; a failed scrape or a series gone gets a
  staleness marker, as the scrape loop writes. These samples go through the remote-write
  receiver (late ones inside `out_of_order_time_window: 10m`). The hourly figures are the
  PromQL of the usual chargeback rules, evaluated at each hour's end: GPU-hours
  `sum_over_time((count by (namespace, modelName, GPU_I_PROFILE) (DCGM_FI_DEV_GPU_UTIL))[1h:15s]) * 15 / 3600`,
  energy `increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{namespace!=""}[1h])` (a board's
  series carries the holding pod's labels; an idle or MIG-split board's has none and is the
  node's), CPU
  `increase(container_cpu_usage_seconds_total[1h])`, memory
  `sum_over_time((sum by (namespace) (container_memory_working_set_bytes))[1h:15s]) * 15 / 3600`,
  per node `max_over_time((count by (Hostname) (DCGM_FI_DEV_GPU_UTIL))[1h:15s])`. A subquery
  `[1h:15s]` stands for a recording rule evaluated every 15 s (the rule manager evaluates at
  the same steps); for the 30-day query latency it makes Prometheus compute what a stored
  rule would have kept, so that figure is the worst case for Prometheus.
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
- **Throughput** is the processor's: the backlog of every batch, read with one worker from
  the first message to the last. CPU-seconds come from `/proc/PID/stat` of each process;
  Prometheus's are counted from its first write to its last.
- **Freshness**: one live batch (a new lease on a GPU) at a time, timed from the producer's
  send to the first `usage` answer that shows it; for Prometheus, one remote-written sample
  to the first instant query that returns it.
"#;
