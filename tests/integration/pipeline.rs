//! A scenario whose GPU-seconds are known by construction, through the whole pipeline:
//! batches published with the agent's producer → embedded broker over TCP → processor (two
//! timely workers) → `meterflow.usage` → sink (RocksDB) → HTTP.

use std::time::Duration;

use meterflow_ingest::Publisher;
use meterflow_schemas::{
    Alert, BillingKind, BillingRecord, DeadLetter, Record, Sample, SampleBatch, SampleKind,
    SeriesId, UsageUpdate, topics,
};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

use crate::common::{Pipeline, get_as, get_text, poll_json, read_topic, token};

/// 2026-11-23T00:00:00Z, on a minute boundary.
const T0: i64 = 1_795_392_000_000;

fn series(
    tenant: &str,
    lease: &str,
    container: &str,
    gpu: &str,
    class: &str,
    mig: &str,
) -> SeriesId {
    SeriesId {
        tenant: tenant.into(),
        lease: lease.into(),
        service: "svc".into(),
        replica: "0".into(),
        node: "node-a".into(),
        provider: "prov".into(),
        container_id: container.into(),
        gpu_uuid: gpu.into(),
        gpu_model: String::new(),
        gpu_class: class.into(),
        mig_profile: mig.into(),
    }
}

fn gpu(s: SeriesId, at: i64, started: i64, finished: Option<i64>) -> Sample {
    Sample {
        series: s,
        kind: SampleKind::Allocation,
        metric: "gpu".into(),
        value: 1.0,
        timestamp_ms: T0 + at,
        started_at_ms: Some(T0 + started),
        finished_at_ms: finished.map(|f| T0 + f),
    }
}

fn cpu(s: SeriesId, at: i64, seconds: f64) -> Sample {
    Sample {
        series: SeriesId {
            gpu_uuid: String::new(),
            gpu_class: String::new(),
            mig_profile: String::new(),
            ..s
        },
        kind: SampleKind::Counter,
        metric: "cpu_usage_seconds_total".into(),
        value: seconds,
        timestamp_ms: T0 + at,
        started_at_ms: None,
        finished_at_ms: None,
    }
}

fn memory(s: SeriesId, at: i64, bytes: f64) -> Sample {
    Sample {
        kind: SampleKind::Gauge,
        metric: "memory_working_set_bytes".into(),
        value: bytes,
        ..cpu(s, at, 0.0)
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// The scenario, as the agent on `node-a` would send it: four ticks, 60 s apart.
///
/// - acme / 100.1.1: container c1 holds two H100s from 5 s to 125.5 s (finished):
///   2 × 120.5 s = 241 GPU-s (minute 0: 110, minute 1: 120, minute 2: 11). Its CPU counter
///   reads 10, 70, then 5 (a reset): 10 + 60 + 5 = 75 core-seconds. Its memory reads 1 GiB at
///   15 s, 2 GiB at 35 s (held 20 s: 20 GiB-s), then 75 s and 130 s: gaps over the 30 s
///   max_staleness, not observed: coverage 20 s of 115 s present.
/// - acme / 100.1.2: one 1g.10gb MIG slice, container c2 from 30 s, last seen at 90 s, then
///   restarted as c3 at 100 s (the 10 s between is pending, not billed), last seen at 160 s:
///   60 + 60 = 120 GPU-s.
/// - globex / 200.1.1: an A100 container that lived 2.5 s between two ticks (61 s → 63.5 s).
pub(crate) fn batches() -> Vec<SampleBatch> {
    let c1 = |g: &str| series("acme", "100.1.1", "c1", g, "h100", "");
    let mig = |c: &str| series("acme", "100.1.2", c, "MIG-1", "a100", "1g.10gb");
    let short = series("globex", "200.1.1", "c9", "GPU-9", "a100", "");
    let ticks = vec![
        vec![
            gpu(c1("GPU-1"), 15_000, 5_000, None),
            gpu(c1("GPU-2"), 15_000, 5_000, None),
            cpu(c1(""), 15_000, 10.0),
            memory(c1(""), 15_000, GIB),
            memory(c1(""), 35_000, 2.0 * GIB),
        ],
        vec![
            gpu(c1("GPU-1"), 75_000, 5_000, None),
            gpu(c1("GPU-2"), 75_000, 5_000, None),
            cpu(c1(""), 75_000, 70.0),
            memory(c1(""), 75_000, 2.0 * GIB),
            gpu(mig("c2"), 75_000, 30_000, None),
            gpu(short, 75_000, 61_000, Some(63_500)),
        ],
        vec![
            gpu(c1("GPU-1"), 130_000, 5_000, Some(125_500)),
            gpu(c1("GPU-2"), 130_000, 5_000, Some(125_500)),
            cpu(c1(""), 130_000, 5.0),
            memory(c1(""), 130_000, 3.0 * GIB),
            gpu(mig("c2"), 90_000, 30_000, None),
            gpu(mig("c3"), 135_000, 100_000, None),
        ],
        vec![gpu(mig("c3"), 160_000, 100_000, None)],
    ];
    ticks
        .into_iter()
        .enumerate()
        .map(|(i, samples)| SampleBatch {
            node: "node-a".into(),
            agent_id: "agent-node-a".into(),
            sequence: i as i64 + 1,
            collected_at_ms: T0 + 15_000 + 60_000 * i as i64,
            agent_version: "test".into(),
            samples,
        })
        .collect()
}

fn gpu_by_class(v: &Value) -> Vec<(String, String, f64)> {
    v["gpu"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|g| {
                    (
                        g["gpu_class"].as_str().unwrap_or_default().to_string(),
                        g["mig_profile"].as_str().unwrap_or_default().to_string(),
                        g["gpu_seconds"].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `payload` to every partition of `topic`; returns how many.
async fn mark_partitions(brokers: &str, topic: &str, payload: &[u8]) -> usize {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    let partitions = rdkafka::producer::Producer::client(&producer)
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata")
        .topics()[0]
        .partitions()
        .len() as i32;
    for p in 0..partitions {
        producer
            .send(
                FutureRecord::<(), _>::to(topic)
                    .partition(p)
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .expect("marker delivered");
    }
    partitions as usize
}

/// A usage record of a tenant of its own, in no lease: it moves no watermark.
fn usage_marker() -> Vec<u8> {
    UsageUpdate {
        id: "restart-marker".into(),
        tenant: "restart-marker".into(),
        lease: String::new(),
        service: String::new(),
        metric: "gpu_seconds".into(),
        gpu_class: String::new(),
        mig_profile: String::new(),
        window_start_ms: T0,
        window_end_ms: T0 + 60_000,
        resolution: String::new(),
        amount: 0,
        scale: 3,
        coverage_ms: 0,
        present_ms: 0,
        node: String::new(),
    }
    .encode()
    .expect("encodes")
}

/// A billing charge of nothing, to a tenant of its own.
fn billing_marker() -> Vec<u8> {
    BillingRecord {
        id: "restart-marker".into(),
        kind: BillingKind::Charge,
        tenant: "restart-marker".into(),
        lease: "marker".into(),
        item: "gpu_seconds".into(),
        window_start_ms: T0,
        window_end_ms: T0 + 3_600_000,
        revision: 0,
        quantity: 0,
        scale: 3,
        price_book_version: String::new(),
        cost_micros: 0,
        currency: "USD".into(),
    }
    .encode()
    .expect("encodes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_seconds_known_by_construction_come_out_of_the_api_exactly() {
    let pipeline = Pipeline::start(2, 2).await;
    let brokers = pipeline.broker.bootstrap();
    let publisher = Publisher::new(&brokers).expect("producer");
    let batches = batches();
    for b in &batches {
        publisher.publish(b).await.expect("batch delivered");
    }
    // A resent batch (same agent and sequence) and bytes that are no batch at all.
    publisher
        .publish(&batches[1])
        .await
        .expect("duplicate delivered");
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    raw.send(
        FutureRecord::to(topics::SAMPLES)
            .key("node-a")
            .payload(&b"not avro"[..]),
        Duration::from_secs(10),
    )
    .await
    .expect("garbage delivered");

    let from = T0;
    let to = T0 + 3_600_000;
    let acme_token = token("acme");
    let url_total = pipeline.url(&format!(
        "/v1/tenants/acme/usage?from={from}&to={to}&window=total"
    ));
    let acme = poll_json(&url_total, &acme_token, Duration::from_secs(90), |v| {
        v["totals"]["gpu_seconds"].as_f64() == Some(361.0)
            && v["totals"]["cpu_core_seconds"].as_f64() == Some(75.0)
            && v["totals"]["coverage"]["memory_byte_seconds"].is_number()
    })
    .await;
    // The gauge: only what was observed, with the coverage that says how much that was.
    assert_eq!(
        acme["totals"]["memory_byte_seconds"].as_f64(),
        Some(20.0 * GIB)
    );
    assert_eq!(
        acme["totals"]["coverage"]["memory_byte_seconds"].as_f64(),
        Some(20.0 / 115.0)
    );
    assert_eq!(
        acme["totals"]["coverage"]["gpu_seconds"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        gpu_by_class(&acme["totals"]),
        vec![
            ("a100".into(), "1g.10gb".into(), 120.0),
            ("h100".into(), String::new(), 241.0)
        ]
    );
    let rows = acme["rows"].as_array().expect("rows");
    let per_lease: Vec<(&str, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["lease"].as_str().unwrap_or_default(),
                r["gpu_seconds"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    assert_eq!(per_lease, vec![("100.1.1", 241.0), ("100.1.2", 120.0)]);

    // Without a per-lease grouping, whole hours come from the sink's hourly view: the same
    // totals, to the millisecond, and the same coverage.
    let by_hour = poll_json(
        &pipeline.url(&format!(
            "/v1/tenants/acme/usage?from={from}&to={to}&window=hour&group_by=gpu_class"
        )),
        &acme_token,
        Duration::from_secs(10),
        |v| v["rows"].is_array(),
    )
    .await;
    assert_eq!(by_hour["totals"], acme["totals"], "{by_hour:#}");
    let per_class: Vec<(&str, f64)> = by_hour["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["gpu_class"].as_str().unwrap_or_default(),
                r["gpu_seconds"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    assert_eq!(per_class, vec![("", 0.0), ("a100", 120.0), ("h100", 241.0)]);

    // Per minute, the first lease's GPU time splits exactly at the window boundaries.
    let url = pipeline.url(&format!(
        "/v1/tenants/acme/usage?from={}&to={to}&window=minute&group_by=lease,gpu_class",
        "2026-11-23T00:00:00Z"
    ));
    let minutes = poll_json(&url, &acme_token, Duration::from_secs(10), |v| {
        v["rows"].is_array()
    })
    .await;
    let h100: Vec<(String, f64)> = minutes["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["gpu_class"] == "h100")
        .map(|r| {
            (
                r["window_start"].as_str().unwrap_or_default().to_string(),
                r["gpu_seconds"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    assert_eq!(
        h100,
        vec![
            ("2026-11-23T00:00:00.000Z".into(), 110.0),
            ("2026-11-23T00:01:00.000Z".into(), 120.0),
            ("2026-11-23T00:02:00.000Z".into(), 11.0),
        ]
    );
    // The same minutes per lease as series (`format=series`): the buckets once, then per lease
    // an array per metric. The MIG lease: c2 from 30 s to its last sight at 90 s, c3 from
    // 100 s to 160 s: 30, 30 + 20, 40 GPU-seconds; the first lease's CPU counter: 10, 60, 5.
    let series = poll_json(
        &pipeline.url(&format!(
            "/v1/tenants/acme/usage?from=2026-11-23T00:00:00Z&to={to}&window=minute&group_by=lease&format=series"
        )),
        &acme_token,
        Duration::from_secs(10),
        |v| v["series"].is_array(),
    )
    .await;
    assert_eq!(
        series["buckets"],
        serde_json::json!([
            "2026-11-23T00:00:00.000Z",
            "2026-11-23T00:01:00.000Z",
            "2026-11-23T00:02:00.000Z"
        ])
    );
    let of = |lease: &str, metric: &str| {
        series["series"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["group"]["lease"] == lease)
            .map(|s| s["values"][metric].clone())
            .unwrap_or_default()
    };
    assert_eq!(
        of("100.1.1", "gpu_seconds"),
        serde_json::json!([110.0, 120.0, 11.0]),
        "{series}"
    );
    assert_eq!(
        of("100.1.2", "gpu_seconds"),
        serde_json::json!([30.0, 50.0, 40.0]),
        "{series}"
    );
    assert_eq!(
        of("100.1.1", "cpu_core_seconds"),
        serde_json::json!([10.0, 60.0, 5.0]),
        "{series}"
    );
    assert_eq!(series["totals"], minutes["totals"]);

    let globex = poll_json(
        &pipeline.url(&format!(
            "/v1/tenants/globex/usage?from={from}&to={to}&window=total"
        )),
        &token("globex"),
        Duration::from_secs(10),
        |v| v["totals"]["gpu_seconds"].as_f64() == Some(2.5),
    )
    .await;
    assert_eq!(globex["totals"]["cpu_core_seconds"].as_f64(), Some(0.0));

    // A tenant with no data gets zeros, not an error; a bad parameter gets a 400 that says why.
    let nobody = poll_json(
        &pipeline.url("/v1/tenants/nobody/usage?window=day"),
        &token("nobody"),
        Duration::from_secs(5),
        |_| true,
    )
    .await;
    assert_eq!(nobody["totals"]["gpu_seconds"].as_f64(), Some(0.0));
    let bad = reqwest::Client::new()
        .get(pipeline.url("/v1/tenants/acme/usage?window=fortnight"))
        .bearer_auth(&acme_token)
        .send()
        .await
        .expect("answer");
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.expect("json error");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("fortnight"),
        "{body}"
    );

    // The garbage went to the dead-letter topic with its reason, and was counted; the resent
    // batch was counted as a duplicate; nothing stopped.
    // (The counters are the process's: other tests in this binary may add to them.)
    let counters = meterflow_processor::metrics::render();
    let value = |series: &str| -> f64 {
        counters
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("meterflow_processor_dead_letters_total{reason=\"undecodable\"}") >= 1.0,
        "{counters}"
    );
    assert!(
        value("meterflow_processor_duplicate_batches_total") >= 1.0,
        "{counters}"
    );
    let dead = read_topic(&brokers, topics::DEADLETTER, 2, 1);
    let reasons: Vec<String> = dead
        .iter()
        .map(|bytes| {
            DeadLetter::decode(bytes)
                .expect("dead letters decode")
                .reason
        })
        .collect();
    assert_eq!(reasons, vec!["undecodable".to_string()]);

    // Costs: every (lease, service, minute) priced on its own and summed: h100 76,083 +
    // 83,000 + 7,608; CPU 111 + 667 + 56; memory 28; the MIG slice 1,536 + 2,560 + 2,048.
    let priced = poll_json(&url_total, &acme_token, Duration::from_secs(10), |v| {
        v["totals"]["cost"].as_f64() == Some(0.173_697)
    })
    .await;
    assert_eq!(priced["totals"]["cost"].as_f64(), Some(0.173_697));
    // The budget (0.30 USD a month) is half spent: one alert, raised once, for 50 %.
    let alerts: Vec<Alert> = read_topic(&brokers, topics::ALERTS, 2, 1)
        .iter()
        .map(|bytes| Alert::decode(bytes).expect("alerts decode"))
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(
        (
            alerts[0].tenant.as_str(),
            alerts[0].period.as_str(),
            alerts[0].threshold_percent,
            alerts[0].budget_micros
        ),
        ("acme", "2026-11", 50, 300_000)
    );
    assert!(alerts[0].spent_micros >= 150_000, "{alerts:?}");

    // Burn rate, as of the watermark (00:03), over complete minutes: the last one before the
    // watermark (minute 2) could still be filling in live operation, so two minutes back from
    // it are minutes 0 and 1. Minute 2 cost h100 7,608 + CPU 56 (lease 100.1.1) and MIG 2,048
    // (100.1.2: 40 of its 120 GPU-seconds, 51.2 micros each, 6,144 in all) micros; the month
    // to date is every minute's cost, 173,697 micros. So minutes 0 and 1: 163,985 micros in
    // 2 minutes, 30 x that an hour = 4.91955; 100.1.1: 173,697 - 6,144 - 7,664 = 159,889
    // (4.79667 an hour), 100.1.2: 6,144 - 2,048 = 4,096 (0.12288 an hour). At that rate the
    // 191.95 hours left in November add 944.3...
    let burn = poll_json(
        &pipeline.url("/v1/tenants/acme/burn-rate?over=2m"),
        &acme_token,
        Duration::from_secs(10),
        |v| v["period"]["to_date"].as_f64() == Some(0.173_697),
    )
    .await;
    let near = |v: &Value, want: f64| {
        let got = v.as_f64().unwrap_or(f64::NAN);
        assert!((got - want).abs() < 1e-9, "{got} != {want}: {burn}");
    };
    assert_eq!(burn["as_of"], "2026-11-23T00:03:00.000Z", "{burn}");
    assert_eq!(
        burn["rate_window"],
        serde_json::json!({"start": "2026-11-23T00:00:00.000Z", "end": "2026-11-23T00:02:00.000Z"})
    );
    near(&burn["burn_rate"], 30.0 * 0.163_985);
    assert_eq!(burn["leases"].as_array().map(Vec::len), Some(2), "{burn}");
    near(&burn["leases"][0]["burn_rate"], 30.0 * 0.159_889);
    near(&burn["leases"][1]["burn_rate"], 30.0 * 0.004_096);
    assert_eq!(burn["period"]["end"], "2026-12-01T00:00:00.000Z");
    near(
        &burn["period"]["projection"],
        0.173_697 + 30.0 * 0.163_985 * 191.95,
    );
    near(&burn["budget"]["monthly"], 0.30);
    near(&burn["budget"]["used"], 0.173_697 / 0.30);
    // Nothing is billed yet: the hour is open (an hour's billing window, 10 minutes' lateness).
    // Pending is that hour priced per billing hour: the same usage, equal up to rounding.
    assert_eq!(burn["period"]["billed"].as_f64(), Some(0.0), "{burn}");
    let pending = burn["period"]["pending"].as_f64().unwrap_or(0.0);
    assert!((pending - 0.173_697).abs() < 1e-5, "{burn}");
    // The alert reaches the tenant: in the burn-rate answer (what its feed and dashboard
    // show), on its own route by month, and on the operator's fleet route; no one else's.
    let alerted = poll_json(
        &pipeline.url("/v1/tenants/acme/burn-rate?over=1m"),
        &acme_token,
        Duration::from_secs(30),
        |v| v["alerts"].as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    let alert = &alerted["alerts"][0];
    assert_eq!(
        alerted["alerts"].as_array().map(Vec::len),
        Some(1),
        "{alerted}"
    );
    assert_eq!(
        (
            alert["kind"].as_str(),
            alert["period"].as_str(),
            alert["threshold_percent"].as_i64(),
            alert["budget"].as_f64()
        ),
        (
            Some("budget_threshold"),
            Some("2026-11"),
            Some(50),
            Some(0.30)
        ),
        "{alert}"
    );
    assert!(
        alert["spent"].as_f64().is_some_and(|s| s >= 0.15),
        "{alert}"
    );
    assert_eq!(alert["id"].as_str(), Some(alerts[0].id.as_str()));
    for (query, n) in [("", 1), ("?period=2026-11", 1), ("?period=2026-10", 0)] {
        let (status, body) = get_as(
            &pipeline.url(&format!("/v1/tenants/acme/alerts{query}")),
            &acme_token,
        )
        .await;
        let v: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            (status, v["alerts"].as_array().map(Vec::len)),
            (200, Some(n)),
            "{query}: {body}"
        );
    }
    let (status, body) = get_as(
        &pipeline.url("/v1/tenants/acme/alerts?period=2026-13"),
        &acme_token,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (_, body) = get_as(&pipeline.url("/v1/tenants/globex/alerts"), &token("globex")).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["alerts"],
        serde_json::json!([])
    );
    // The fleet's usage by tenant and by GPU class, as the operator reads it: acme's 241 +
    // 120 GPU-seconds and globex's 2.5 (its A100 container lived 61 s -> 63.5 s); by class,
    // the H100s' 241, the whole A100's 2.5 and the 1g.10gb slice's 120.
    let fleet_usage = |group_by: &'static str| {
        let url = pipeline.url(&format!(
            "/v1/fleet/usage?from={from}&to={to}&group_by={group_by}"
        ));
        async move {
            let (status, body) = get_as(&url, &token("")).await;
            assert_eq!(status, 200, "{body}");
            let v: Value = serde_json::from_str(&body).expect("JSON");
            v["rows"]
                .as_array()
                .expect("rows")
                .iter()
                .filter(|r| r["gpu_seconds"].as_f64() > Some(0.0))
                .map(|r| {
                    let key = ["tenant", "gpu_class", "mig_profile"]
                        .iter()
                        .filter_map(|g| r[*g].as_str())
                        .collect::<Vec<_>>()
                        .join("/");
                    (key, r["gpu_seconds"].as_f64().unwrap_or(f64::NAN))
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        fleet_usage("tenant").await,
        vec![("acme".to_string(), 361.0), ("globex".to_string(), 2.5)]
    );
    assert_eq!(
        fleet_usage("gpu_class,mig_profile").await,
        vec![
            ("a100/".to_string(), 2.5),
            ("a100/1g.10gb".to_string(), 120.0),
            ("h100/".to_string(), 241.0)
        ]
    );
    let (status, _) = get_as(&pipeline.url("/v1/fleet/usage"), &acme_token).await;
    assert_eq!(status, 403, "the fleet is the operator's");
    let (_, body) = get_as(&pipeline.url("/v1/fleet/alerts?period=2026-11"), &token("")).await;
    let fleet: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(fleet["alerts"][0]["tenant"], "acme", "{fleet}");
    assert_eq!(fleet["alerts"][0]["id"], alert["id"]);

    // Five minutes back from 00:02 hold minutes 0 and 1: 12 x their cost.
    let burn5 = poll_json(
        &pipeline.url("/v1/tenants/acme/burn-rate"),
        &acme_token,
        Duration::from_secs(5),
        |_| true,
    )
    .await;
    near(&burn5["burn_rate"], 12.0 * 0.163_985);
    let wrong = reqwest::Client::new()
        .get(pipeline.url("/v1/tenants/acme/burn-rate?over=5x"))
        .bearer_auth(&acme_token)
        .send()
        .await
        .expect("sink answers");
    assert_eq!(wrong.status(), 400);

    // Live values of lease 100.1.1 on node-a: memory 3 GiB now, up 1 GiB over the last 55 s;
    // the CPU counter reset to 5 s, so its change is those 5 s.
    let mut live: std::collections::BTreeMap<String, i64> = Default::default();
    for bytes in read_topic(&brokers, topics::USAGE, 2, 1) {
        let u = UsageUpdate::decode(&bytes).expect("usage updates decode");
        if u.lease == "100.1.1" && u.metric.starts_with("live.") {
            live.insert(u.metric, u.amount);
        }
    }
    // Roll-ups of lease 100.1.1's H100 time: the hour, the day and the month hold its 241 s.
    let mut rollups: std::collections::BTreeMap<String, (i64, i64, i64)> = Default::default();
    for bytes in read_topic(&brokers, topics::USAGE, 2, 1) {
        let u = UsageUpdate::decode(&bytes).expect("usage updates decode");
        if u.lease == "100.1.1" && u.metric == "gpu_seconds" && !u.resolution.is_empty() {
            rollups.insert(u.resolution, (u.window_start_ms, u.window_end_ms, u.amount));
        }
    }
    assert_eq!(
        rollups,
        std::collections::BTreeMap::from([
            ("hour".to_string(), (T0, T0 + 3_600_000, 241_000)),
            ("day".to_string(), (T0, T0 + 86_400_000, 241_000)),
            // November 2026.
            (
                "month".to_string(),
                (1_793_491_200_000, 1_796_083_200_000, 241_000)
            ),
        ])
    );
    let l = |m: &str| live.get(m).copied();
    assert_eq!(
        l("live.memory_working_set_bytes.gauge"),
        Some(3 << 30),
        "{live:?}"
    );
    assert_eq!(
        l("live.memory_working_set_bytes.diff"),
        Some(1 << 30),
        "{live:?}"
    );
    assert_eq!(
        l("live.memory_working_set_bytes.rate"),
        Some(19_522_579),
        "{live:?}"
    );
    assert_eq!(
        l("live.cpu_usage_seconds_total.diff"),
        Some(5_000_000),
        "{live:?}"
    );
    assert_eq!(
        l("live.cpu_usage_seconds_total.rate"),
        Some(90_909),
        "{live:?}"
    );

    // The same live values in one call through the API, for an autoscaler.
    let api_live = poll_json(
        &pipeline.url("/v1/leases/100.1.1/live"),
        &acme_token,
        Duration::from_secs(10),
        |v| v["metrics"]["memory_working_set_bytes"]["gauge"].is_number(),
    )
    .await;
    let memory = &api_live["metrics"]["memory_working_set_bytes"];
    assert_eq!(memory["gauge"].as_f64(), Some(3.0 * GIB), "{api_live}");
    assert_eq!(memory["diff"].as_f64(), Some(GIB), "{api_live}");
    assert_eq!(
        api_live["metrics"]["cpu_usage_seconds_total"]["diff"].as_f64(),
        Some(5.0),
        "{api_live}"
    );
    assert_eq!(api_live["tenant"], "acme");

    // Lease 100.1.1's GPU time as a series: an hour's range allows 15 s steps, but the data
    // comes in 1-minute windows, so 60 s is the finest; a finer step is refused with it.
    let series = poll_json(
        &pipeline.url(&format!(
            "/v1/leases/100.1.1/metrics?start={from}&end={to}&metric=gpu_seconds"
        )),
        &acme_token,
        Duration::from_secs(10),
        |v| v["series"].is_array(),
    )
    .await;
    assert_eq!(series["step_seconds"], 60, "{series}");
    let points: Vec<(String, f64)> = series["series"][0]["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| {
            (
                p["t"].as_str().unwrap_or_default().to_string(),
                p["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    assert_eq!(
        points,
        vec![
            ("2026-11-23T00:00:00.000Z".into(), 110.0),
            ("2026-11-23T00:01:00.000Z".into(), 120.0),
            ("2026-11-23T00:02:00.000Z".into(), 11.0),
        ]
    );
    let (status, body) = get_as(
        &pipeline.url(&format!(
            "/v1/leases/100.1.1/metrics?start={from}&end={to}&step=15s"
        )),
        &acme_token,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("60s"), "{body}");
    let hourly_series = poll_json(
        &pipeline.url(&format!(
            "/v1/leases/100.1.1/metrics?start={from}&end={to}&step=1h&metric=gpu_seconds"
        )),
        &acme_token,
        Duration::from_secs(5),
        |_| true,
    )
    .await;
    assert_eq!(
        hourly_series["series"][0]["points"][0]["value"].as_f64(),
        Some(241.0),
        "{hourly_series}"
    );
    // The same series through `meterflow lease-metrics`, as a person reads it.
    let sink_url = pipeline.url("");
    let printed = tokio::task::spawn_blocking({
        let token = acme_token.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
                .args(["lease-metrics", "--url", &sink_url, "--token", &token])
                .args(["--lease", "100.1.1", "--metric", "gpu_seconds"])
                .args(["--from", &from.to_string(), "--to", &to.to_string()])
                .output()
                .expect("meterflow lease-metrics runs")
        }
    })
    .await
    .expect("join");
    let table = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["2026-11-23T00:00:00.000Z", "110"],
            vec!["2026-11-23T00:01:00.000Z", "120"],
            vec!["2026-11-23T00:02:00.000Z", "11"],
        ],
        "{table}"
    );

    // Per node and hour: node-a held at most 4 GPUs at once (at 61-63.5 s: two H100s of c1,
    // the MIG slice of c2 and the short A100). The fleet's per hour are the sink's sums.
    let mut fleet: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for bytes in read_topic(&brokers, topics::USAGE, 2, 1) {
        let u = UsageUpdate::decode(&bytes).expect("usage updates decode");
        if u.tenant.is_empty() && u.window_start_ms == T0 {
            // Later records of one id replace earlier ones (one id, one partition, in order).
            fleet.insert((u.node, u.metric), u.amount);
        }
    }
    let f = |node: &str, metric: &str| fleet.get(&(node.to_string(), metric.to_string())).copied();
    assert_eq!(f("node-a", "max_gpus_allocated"), Some(4), "{fleet:?}");
    assert_eq!(f("node-a", "node_active"), Some(1), "{fleet:?}");
    assert_eq!(fleet.len(), 2, "node records only: {fleet:?}");

    // The operator's view of the same hour, through the API.
    let hourly = poll_json(
        &pipeline.url(&format!("/v1/fleet/hourly?from={from}&to={to}")),
        &token(""),
        Duration::from_secs(10),
        |v| v["hours"][0]["max_gpus_allocated"] == 4,
    )
    .await;
    assert_eq!(
        hourly["hours"],
        serde_json::json!([{
            "hour": "2026-11-23T00:00:00.000Z",
            "active_nodes": 1,
            "max_gpus_allocated": 4,
            "nodes": [{"node": "node-a", "active": true, "max_gpus_allocated": 4}],
        }])
    );

    // Status and metrics tell the operator where the sink is; a tenant sees how far the data
    // reaches, not the sink's lag or offsets.
    let tenant_status = poll_json(
        &pipeline.url("/v1/status"),
        &acme_token,
        Duration::from_secs(10),
        |v| v["watermark"].is_string(),
    )
    .await;
    assert_eq!(tenant_status["watermark"], "2026-11-23T00:03:00.000Z");
    // AEP-43's discovery: the route, and its finest step, the processor's 1-minute windows.
    assert_eq!(
        tenant_status["metrics"]["min_step"], "60s",
        "{tenant_status}"
    );
    assert_eq!(tenant_status["metrics"]["enabled"], true);
    assert!(
        tenant_status.get("lag").is_none() && tenant_status.get("consumed_offsets").is_none(),
        "{tenant_status}"
    );
    let status = poll_json(
        &pipeline.url("/v1/status"),
        &token(""),
        Duration::from_secs(10),
        // Everything the processor wrote is stored: no records of lag.
        |v| v["lag"]["records"].as_i64() == Some(0),
    )
    .await;
    assert_eq!(status["watermark"], "2026-11-23T00:03:00.000Z");
    assert!(
        status["lag"]["seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{status}"
    );
    let metrics = get_text(&pipeline.url("/metrics")).await;
    assert!(
        metrics.contains("meterflow_sink_updates_applied_total"),
        "{metrics}"
    );

    // The agent's next batch, stamped 01:11, closes the hour (its end plus the lateness): the
    // hour is billed, and `billed` is what the billing topic carries, read here with a client
    // of its own; nothing is pending.
    let closing = SampleBatch {
        sequence: 5,
        collected_at_ms: T0 + 71 * 60_000,
        samples: Vec::new(),
        ..batches[0].clone()
    };
    publisher.publish(&closing).await.expect("batch delivered");
    let billed = poll_json(
        &pipeline.url("/v1/tenants/acme/burn-rate?over=1m"),
        &acme_token,
        Duration::from_secs(30),
        |v| v["period"]["pending"].as_f64() == Some(0.0),
    )
    .await;
    let on_topic: i64 = read_topic(&brokers, topics::BILLING, 2, 1)
        .iter()
        .map(|bytes| BillingRecord::decode(bytes).expect("billing records decode"))
        .filter(|b| b.tenant == "acme")
        .map(|b| b.cost_micros)
        .sum();
    assert_eq!(
        billed["period"]["billed"].as_f64(),
        Some(on_topic as f64 / 1e6),
        "{billed}"
    );
    assert!((on_topic as f64 / 1e6 - 0.173_697).abs() < 1e-5, "{billed}");
    assert_eq!(billed["as_of"], "2026-11-23T00:03:00.000Z", "{billed}");
    // The billing stream says the currency (the price book's), which usage records do not.
    assert_eq!(billed["currency"], "USD", "{billed}");

    // A restarted sink serves the same answer from RocksDB and resumes after the offsets it
    // stored with the data: nothing is consumed twice.
    let before = acme["totals"].clone();
    let mut pipeline = pipeline;
    pipeline.restart_sink().await;
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(pipeline.url("/readyz")).await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "the restarted sink is consuming within 20 s");
    let after = poll_json(
        &pipeline.url(&format!(
            "/v1/tenants/acme/usage?from={from}&to={to}&window=total"
        )),
        &acme_token,
        Duration::from_secs(10),
        |_| true,
    )
    .await;
    assert_eq!(after["totals"], before);
    // A marker after the end of every partition of both topics: each partition is read in
    // order, so once the sink has applied every marker it has read whatever it would re-read,
    // and it must have applied the markers and nothing else.
    let markers = [
        (
            topics::USAGE,
            mark_partitions(&brokers, topics::USAGE, &usage_marker()).await,
        ),
        (
            topics::BILLING,
            mark_partitions(&brokers, topics::BILLING, &billing_marker()).await,
        ),
    ];
    let applied = |metrics: &str, topic: &str| -> Option<usize> {
        metrics.lines().find_map(|l| {
            l.strip_prefix(&format!(
                "meterflow_sink_updates_applied_total{{topic=\"{topic}\"}} "
            ))?
            .parse()
            .ok()
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = get_text(&pipeline.url("/metrics")).await;
        if markers
            .iter()
            .all(|(topic, n)| applied(&metrics, topic).is_some_and(|got| got >= *n))
            || std::time::Instant::now() > deadline
        {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (topic, n) in markers {
        assert_eq!(
            applied(&metrics, topic),
            Some(n),
            "the restarted sink applies {n} markers of {topic} and re-applies nothing: {metrics}"
        );
    }

    pipeline.stop().await;
}

/// The fleet's hour is its nodes' sum, whichever worker each node's samples reach: node-x
/// holds two H100s from 10 s to 100 s, node-y one A100 from 30 s to 90 s (at most three GPUs
/// at once in the fleet: each node's most, summed), node-z only reports its CPU (active, no
/// GPU). An hour later node-x alone is active, with one GPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_hour_is_the_sum_of_its_nodes() {
    let pipeline = Pipeline::start(2, 2).await;
    let publisher = Publisher::new(&pipeline.broker.bootstrap()).expect("producer");
    let on = |node: &str, s: Sample| Sample {
        series: SeriesId {
            node: node.into(),
            ..s.series
        },
        ..s
    };
    let x = |g: &str| series("acme", "100.1.1", "cx", g, "h100", "");
    let y = series("acme", "100.1.2", "cy", "GPU-Y", "a100", "");
    let batch = |node: &str, sequence: i64, samples: Vec<Sample>| SampleBatch {
        node: node.into(),
        agent_id: format!("agent-{node}"),
        sequence,
        collected_at_ms: samples.iter().map(|s| s.timestamp_ms).max().unwrap_or(T0),
        agent_version: "test".into(),
        samples: samples.into_iter().map(|s| on(node, s)).collect(),
    };
    let batches = [
        batch(
            "node-x",
            1,
            vec![
                gpu(x("GPU-1"), 15_000, 10_000, None),
                gpu(x("GPU-2"), 15_000, 10_000, None),
            ],
        ),
        batch(
            "node-y",
            1,
            vec![gpu(y.clone(), 45_000, 30_000, Some(90_000))],
        ),
        batch("node-z", 1, vec![cpu(x(""), 45_000, 3.0)]),
        batch(
            "node-x",
            2,
            vec![
                gpu(x("GPU-1"), 105_000, 10_000, Some(100_000)),
                gpu(x("GPU-2"), 105_000, 10_000, Some(100_000)),
            ],
        ),
        batch(
            "node-x",
            3,
            vec![gpu(x("GPU-3"), 3_615_000, 3_605_000, None)],
        ),
    ];
    for b in &batches {
        publisher.publish(b).await.expect("batch delivered");
    }
    let hourly = poll_json(
        &pipeline.url("/v1/fleet/hourly?from=2026-11-23T00:00:00Z&to=2026-11-23T02:00:00Z"),
        &token(""),
        Duration::from_secs(60),
        |v| v["hours"][0]["max_gpus_allocated"] == 3 && v["hours"][1]["active_nodes"] == 1,
    )
    .await;
    assert_eq!(
        hourly["hours"],
        serde_json::json!([
            {
                "hour": "2026-11-23T00:00:00.000Z",
                "active_nodes": 3,
                "max_gpus_allocated": 3,
                "nodes": [
                    {"node": "node-x", "active": true, "max_gpus_allocated": 2},
                    {"node": "node-y", "active": true, "max_gpus_allocated": 1},
                    {"node": "node-z", "active": true, "max_gpus_allocated": 0},
                ],
            },
            {
                "hour": "2026-11-23T01:00:00.000Z",
                "active_nodes": 1,
                "max_gpus_allocated": 1,
                "nodes": [{"node": "node-x", "active": true, "max_gpus_allocated": 1}],
            },
        ])
    );
}
