//! The sink under query load, from a second process on loopback.
//!
//! 1. A view store is filled through `Store::apply` (the consumer's own write path) with 30 days
//!    of hourly usage for LEASES leases spread over TENANTS tenants: per lease and hour,
//!    `gpu_seconds`, `cpu_core_seconds` and `cost`. Reported: records applied per second.
//! 2. The real sink (`meterflow_sink::start`) serves that store on 127.0.0.1, next to the
//!    embedded broker it consumes from (idle here).
//! 3. This binary runs again as a client process: CONCURRENCY connections ask, for a random
//!    tenant each time, for its usage over the 30 days at hourly resolution, for SECONDS
//!    seconds: summed over the tenant (`group_by=none`) over one connection, then over
//!    CONCURRENCY, then per lease (`group_by=lease`), the same as series (`format=series`,
//!    `lease_series`); then, for a random lease each time, its
//!    30 days through `/v1/leases/{lease}/metrics` (Meterflow's series, 1-hour steps) and
//!    through AEP-43's `/lease/{dseq}/{gseq}/{oseq}/metrics` (`metric=all`, 1-hour steps);
//!    then the same two routes for a lease of MINUTE_LEASES more (tenant `minutes`, default 10,
//!    `--minute-leases=N`), whose 30 days are stored in one-minute windows as the processor
//!    writes them by default: 43,200 windows per metric (`v1lease_minutes` in 1-hour steps,
//!    `aep_minutes` at AEP-43's default step for 30 days, 15 minutes).
//!    Reported: requests per second and latency percentiles.
//!
//! `cargo bench --bench sink_load -- [LEASES] [TENANTS] [CONCURRENCY] [SECONDS] [--minute-leases=N] [--json]`
//! (defaults 10000 100 8 20). Both processes share the machine's cores. Also printed: the
//! store's disk and the sink process's resident memory per lease-hour, and the size of each
//! answer. With `--json` the last line is one JSON object with `apply_records_per_s`,
//! `none_rps_1`, `none_p99_ms_1`, `none_rps_8`, `none_p99_ms_8`, `lease_rps_8`,
//! `lease_p99_ms_8`, `lease_series_rps_8`, `lease_series_p99_ms_8`, `v1lease_rps_8`, `v1lease_p99_ms_8`, `aep_rps_8`, `aep_p99_ms_8`, `v1lease_minutes_*` and `aep_minutes_*` likewise (the 8
//! standing for CONCURRENCY), `disk_bytes_per_lease_hour`,
//! `resident_bytes_per_lease_hour` and the answers' bytes.

use std::time::{Duration, Instant};

mod common;

use meterflow::broker::{self, BrokerConfig};
use meterflow::topics::{self, TopicsConfig};
use meterflow_schemas::UsageUpdate;
use meterflow_sink::auth::{Auth, Claims, SigningKey, mint, now_s};
use meterflow_sink::store::{Consumed, Store};
use meterflow_sink::{SinkConfig, limits::Limits};
use tokio_util::sync::CancellationToken;

/// The allocator the `meterflow` binary runs the sink with (see `src/main.rs`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const HOUR_MS: i64 = 3_600_000;
const DAYS: i64 = 30;
/// 2026-10-01T00:00:00Z.
const T0: i64 = 1_790_812_800_000;
const SECRET: &[u8] = b"meterflow sink load bench secret, 32+ bytes";

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .nth(i)
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("argument {i}: {a} is not a number"))
        })
        .unwrap_or(default)
}

fn record(
    tenant: &str,
    lease: &str,
    metric: &str,
    (start, len): (i64, i64),
    amount: i64,
    scale: i32,
) -> UsageUpdate {
    UsageUpdate {
        id: format!("{tenant}/{lease}/{metric}/{start}"),
        tenant: tenant.into(),
        lease: lease.into(),
        service: "web".into(),
        node: String::new(),
        metric: metric.into(),
        gpu_class: if metric == "gpu_seconds" {
            "h100".into()
        } else {
            String::new()
        },
        mig_profile: String::new(),
        window_start_ms: start,
        window_end_ms: start + len,
        resolution: String::new(),
        amount,
        scale,
        coverage_ms: len,
        present_ms: len,
    }
}

/// Fills the store; returns the records applied.
fn fill(store: &Store, leases: u64, tenants: u64) -> u64 {
    let mut batch = Vec::with_capacity(1_000);
    let mut offset = 0i64;
    for lease in 0..leases {
        let tenant = format!("tenant-{}", lease % tenants);
        let lease_id = format!("{}.1.1", 100_000 + lease);
        for h in 0..DAYS * 24 {
            let hour = T0 + h * HOUR_MS;
            // A GPU busy 45 of every 60 minutes, 2 cores, $2.50 per GPU-hour.
            for (metric, amount, scale) in [
                ("gpu_seconds", 2_700_000, 3),
                ("cpu_core_seconds", 7_200_000, 3),
                ("cost", 1_875_000, 6),
            ] {
                batch.push(Consumed {
                    topic: "meterflow.usage".into(),
                    partition: (lease % 4) as i32,
                    offset,
                    update: record(&tenant, &lease_id, metric, (hour, HOUR_MS), amount, scale),
                });
                offset += 1;
                if batch.len() == 1_000 {
                    store.apply(&batch).expect("store applies");
                    batch.clear();
                    if offset % 2_000_000 == 0 {
                        eprintln!("fill: {offset} records");
                    }
                }
            }
        }
    }
    store.apply(&batch).expect("store applies");
    offset as u64
}

/// The tenant whose leases report in the processor's default base windows of a minute.
const MINUTE_TENANT: &str = "minutes";
/// Its leases' first id (`900000.1.1`, `900001.1.1`, ...).
const MINUTE_LEASE0: u64 = 900_000;

/// Fills `leases` more leases of [`MINUTE_TENANT`] with 30 days of one-minute windows, the
/// same three metrics at the same rates as [`fill`]'s: a lease's month is 43,200 windows per
/// metric, as the processor writes them by default. Returns the records applied.
fn fill_minutes(store: &Store, leases: u64) -> u64 {
    const MINUTE_MS: i64 = 60_000;
    let mut batch = Vec::with_capacity(1_000);
    let mut offset = 0i64;
    for lease in 0..leases {
        let lease_id = format!("{}.1.1", MINUTE_LEASE0 + lease);
        for m in 0..DAYS * 24 * 60 {
            let minute = T0 + m * MINUTE_MS;
            for (metric, amount, scale) in [
                ("gpu_seconds", 45_000, 3),
                ("cpu_core_seconds", 120_000, 3),
                ("cost", 31_250, 6),
            ] {
                batch.push(Consumed {
                    topic: "meterflow.usage".into(),
                    partition: 4,
                    offset,
                    update: record(
                        MINUTE_TENANT,
                        &lease_id,
                        metric,
                        (minute, MINUTE_MS),
                        amount,
                        scale,
                    ),
                });
                offset += 1;
                if batch.len() == 1_000 {
                    store.apply(&batch).expect("store applies");
                    batch.clear();
                }
            }
        }
    }
    store.apply(&batch).expect("store applies");
    offset as u64
}

/// The client process: asks, prints one line `requests errors seconds p50 p90 p99 max` (ms)
/// and the mean answer's bytes. `mode`: a `group_by` of the tenant usage route (a random one of
/// `of` tenants), or `v1lease` / `aep` for a lease's series (a random one of `of` leases).
async fn client(
    base: String,
    token: String,
    of: u64,
    concurrency: u64,
    seconds: u64,
    mode: String,
) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (http, base, token, mode) = (http.clone(), base.clone(), token.clone(), mode.clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors, mut bytes) = (Vec::new(), 0u64, 0u64);
            let mut n = worker;
            while Instant::now() < deadline {
                n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let pick = (n >> 33) % of;
                let end = T0 + DAYS * 24 * HOUR_MS;
                let url = match mode.as_str() {
                    "v1lease" => format!(
                        "{base}/v1/leases/{}.1.1/metrics?start={T0}&end={end}&step=1h",
                        100_000 + pick
                    ),
                    "aep" => format!(
                        "{base}/lease/{}/1/1/metrics?metric=all&start={}&end={}&step=1h&aggregation=sum",
                        100_000 + pick,
                        T0 / 1_000,
                        end / 1_000
                    ),
                    // A minute lease's month at AEP-43's default step for 30 days (15 m).
                    "aep_minutes" => format!(
                        "{base}/lease/{}/1/1/metrics?metric=all&start={}&end={}&aggregation=sum",
                        MINUTE_LEASE0 + pick,
                        T0 / 1_000,
                        end / 1_000
                    ),
                    "v1lease_minutes" => format!(
                        "{base}/v1/leases/{}.1.1/metrics?start={T0}&end={end}&step=1h",
                        MINUTE_LEASE0 + pick
                    ),
                    "lease_series" => format!(
                        "{base}/v1/tenants/tenant-{pick}/usage?from={T0}&to={end}&window=hour&group_by=lease&format=series"
                    ),
                    group_by => format!(
                        "{base}/v1/tenants/tenant-{pick}/usage?from={T0}&to={end}&window=hour&group_by={group_by}"
                    ),
                };
                let started = Instant::now();
                let body = match http.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.ok(),
                    _ => None,
                };
                match body {
                    Some(body) => {
                        latencies.push(started.elapsed());
                        bytes += body.len() as u64;
                    }
                    None => errors += 1,
                }
            }
            (latencies, errors, bytes)
        }));
    }
    let (mut all, mut errors, mut bytes) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, e, b) = t.await.expect("client task");
        all.extend(l);
        errors += e;
        bytes += b;
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "{} {} {} {:.3} {:.3} {:.3} {:.3} {}",
        all.len(),
        errors,
        seconds,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
        bytes / (all.len() as u64).max(1)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Some(at) = args.iter().position(|a| a == "--client") {
        let a = &args[at + 1..];
        let num = |i: usize| a[i].parse::<u64>().expect("client argument");
        runtime.block_on(client(
            a[0].clone(),
            a[1].clone(),
            num(2),
            num(3),
            num(4),
            a[5].clone(),
        ));
        return;
    }
    let (leases, tenants, concurrency, seconds) =
        (arg(0, 10_000), arg(1, 100), arg(2, 8), arg(3, 20));
    let tenants = tenants.clamp(1, leases.max(1));
    let dir = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let store = Store::open(&dir.path().join("sink")).expect("store opens");
    let records = fill(&store, leases, tenants);
    let fill_s = started.elapsed().as_secs_f64();
    let apply_records_per_s = records as f64 / fill_s;
    println!(
        "fill: {records} records ({leases} leases x {tenants} tenants x {DAYS} days hourly x 3 metrics) in {fill_s:.1} s: {apply_records_per_s:.0} records/s through Store::apply"
    );
    let minute_leases: u64 = std::env::args()
        .find_map(|a| a.strip_prefix("--minute-leases=").map(str::to_string))
        .map_or(10, |n| n.parse().expect("--minute-leases=N: a number"));
    let started = Instant::now();
    let minute_records = fill_minutes(&store, minute_leases);
    println!(
        "fill: {minute_records} records more ({minute_leases} leases of tenant {MINUTE_TENANT} x {DAYS} days in one-minute windows x 3 metrics, the processor's default) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The queries meet the store settled, as a sink that has held its data a while: RocksDB
    // done flushing and compacting what the fill wrote (its compaction would otherwise share
    // the two cores with them, by how far it fell behind the fill).
    let settling = Instant::now();
    while store.background_work().expect("store properties") {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(store);
    println!(
        "settled: RocksDB finished its flushes and compactions {:.1} s after the fill",
        settling.elapsed().as_secs_f64()
    );
    let lease_hours = ((leases + minute_leases) * DAYS as u64 * 24).max(1);

    let shutdown = CancellationToken::new();
    let (broker, sink) = runtime.block_on(async {
        let broker = broker::start(BrokerConfig {
            listen: "127.0.0.1:0".parse().expect("literal"),
            storage: "memory".into(),
        })
        .await
        .expect("embedded broker starts");
        // The sink consumes an idle topic, as it would between the processor's writes.
        topics::ensure(&broker.bootstrap(), &TopicsConfig::default())
            .await
            .expect("topics created");
        let sink = meterflow_sink::start(
            SinkConfig {
                brokers: broker.bootstrap(),
                listen: "127.0.0.1:0".parse().expect("literal"),
                data_dir: dir.path().join("sink"),
                auth: Auth::new(vec![Auth::hs256(SECRET)]),
                // The load is the point: limits out of the way.
                limits: Limits {
                    requests_per_s: 1e9,
                    burst: 1e9,
                    series_per_s: 1e12,
                    series_burst: 1e12,
                    max_series_per_query: usize::MAX,
                    max_open_feeds: usize::MAX,
                },
                keep_alive: Duration::from_secs(15),
                provider: String::new(),
            },
            shutdown.clone(),
        )
        .await
        .expect("sink starts");
        (broker, sink)
    });
    let token = mint(
        &SigningKey::Hs256(SECRET.to_vec()),
        &Claims {
            sub: "bench".into(),
            tenant: String::new(),
            scope: "operator".into(),
            exp: now_s() + 3_600,
            ..Claims::default()
        },
    )
    .expect("token");
    let base = format!("http://{}", sink.addr);
    let exe = std::env::current_exe().expect("this binary");
    let mut json = serde_json::Map::new();
    json.insert(
        "apply_records_per_s".into(),
        apply_records_per_s.round().into(),
    );
    // One connection: latency unloaded; then CONCURRENCY connections: throughput.
    for (group_by, concurrency) in [
        ("none", 1),
        ("none", concurrency),
        ("lease", concurrency),
        ("lease_series", concurrency),
        ("v1lease", concurrency),
        ("aep", concurrency),
        ("v1lease_minutes", concurrency),
        ("aep_minutes", concurrency),
    ] {
        let of = match group_by {
            "v1lease" | "aep" => leases,
            "v1lease_minutes" | "aep_minutes" => minute_leases,
            _ => tenants,
        };
        if of == 0 {
            continue;
        }
        let out = std::process::Command::new(&exe)
            .args(["--client", &base, &token])
            .args([of, concurrency, seconds].map(|n| n.to_string()))
            .arg(group_by)
            .output()
            .expect("client process runs");
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(f64::NAN))
            .collect();
        let [requests, errors, secs, p50, p90, p99, max, answer_bytes] = f[..] else {
            panic!("client printed {line:?}");
        };
        let what = match group_by {
            "v1lease" => {
                "a lease's series (/v1/leases/{lease}/metrics), 30 days hourly".to_string()
            }
            "aep" => {
                "a lease's AEP-43 metrics (/lease/{dseq}/{gseq}/{oseq}/metrics), 30 days hourly"
                    .to_string()
            }
            "v1lease_minutes" => format!(
                "a lease's series (/v1/leases/{{lease}}/metrics), {DAYS} days in 1-hour steps of one-minute windows"
            ),
            "aep_minutes" => format!(
                "a lease's AEP-43 metrics, {DAYS} days at the default step (15 m) of one-minute windows"
            ),
            "lease_series" => format!(
                "tenant usage, {DAYS} days hourly, group_by=lease&format=series ({} leases per tenant)",
                leases / tenants
            ),
            _ => format!(
                "tenant usage, {DAYS} days hourly, group_by={group_by} ({} leases per tenant)",
                leases / tenants
            ),
        };
        println!(
            "{what}: {:.0} requests/s, latency p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max {max:.2} ms ({requests} requests, {errors} errors, {concurrency} connections, {secs} s; {answer_bytes:.0} bytes an answer)",
            requests / secs,
        );
        assert_eq!(errors, 0.0, "every request answered");
        json.insert(
            format!("{group_by}_rps_{concurrency}"),
            (requests / secs).round().into(),
        );
        json.insert(format!("{group_by}_p99_ms_{concurrency}"), p99.into());
        json.insert(format!("{group_by}_answer_bytes"), answer_bytes.into());
    }
    let disk = common::dir_bytes(&dir.path().join("sink"));
    let resident = common::resident_bytes();
    println!(
        "store on disk: {:.1} MiB, {:.1} bytes per record, {:.1} per lease-hour (the minute leases' records counted as the hours they fill); this process (fill, then the sink) resident: {:.1} MiB, {:.1} bytes per lease-hour",
        disk as f64 / 1048576.0,
        disk as f64 / (records + minute_records).max(1) as f64,
        disk as f64 / lease_hours as f64,
        resident as f64 / 1048576.0,
        resident as f64 / lease_hours as f64
    );
    json.insert(
        "disk_bytes_per_lease_hour".into(),
        (disk as f64 / lease_hours as f64).into(),
    );
    json.insert(
        "resident_bytes_per_lease_hour".into(),
        (resident as f64 / lease_hours as f64).into(),
    );
    if std::env::args().any(|a| a == "--json") {
        println!("{}", serde_json::Value::Object(json));
    }
    shutdown.cancel();
    runtime
        .block_on(sink.task)
        .expect("sink task")
        .expect("sink stopped cleanly");
    broker.stop();
}
