//! AEP-43's lease metrics route through the whole pipeline: the pipeline scenario's batches
//! (`pipeline::batches`, its readings written out by hand there) → broker → processor → sink →
//! `GET /lease/{dseq}/{gseq}/{oseq}/metrics`. The expected values are arithmetic on those
//! readings; each parameter, error code and the Prometheus shape is walked.

use std::time::Duration;

use meterflow_ingest::Publisher;
use meterflow_schemas::{Sample, SampleBatch, SampleKind, SeriesId};
use meterflow_sink::auth::SigningKey;
use serde_json::Value;

use crate::common::{Pipeline, get_as, poll_json, token, token_with};

/// 2026-11-23T00:00:00Z, the scenario's start, in Unix seconds.
const T0_S: i64 = 1_795_392_000;
const GIB: f64 = (1u64 << 30) as f64;

/// The values of `metric`'s series in an AEP-43 answer, as (Unix seconds, value).
fn samples(answer: &Value, metric: &str) -> Vec<(i64, f64)> {
    answer["series"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["metric"] == metric)
        .flat_map(|s| s["samples"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            (
                p["t"].as_i64().unwrap_or(i64::MIN),
                p["v"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

fn warned(answer: &Value, part: &str) -> bool {
    answer["warnings"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains(part)))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_metrics_route_answers_the_aep_43_table_from_the_scenarios_readings() {
    let pipeline = Pipeline::start(2, 2).await;
    let publisher = Publisher::new(&pipeline.broker.bootstrap()).expect("producer");
    for b in &crate::pipeline::batches() {
        publisher.publish(b).await.expect("batch delivered");
    }
    let acme = token("acme");
    let route = |query: &str| pipeline.url(&format!("/lease/100/1/1/metrics?{query}"));

    // Lease 100.1.1 over the scenario's first three minutes, as one 3-minute step. Its CPU
    // counter reads 10 at 15 s (a new container: from zero), 70 at 75 s, 5 at 130 s (a
    // reset): 10 + 60 + 5 = 75 core-seconds in 180 s = 0.41667 cores. Its memory is read at
    // 1 GiB at 15 s and held until the next reading at 35 s (20 GiB·s observed); the readings
    // after 35 s are more than max_staleness (30 s) apart: the container is present from
    // 15 s to 130 s (115 s), observed 20 of them. As a level over the step: the observed mean
    // (1 GiB) for the 115 s present, nothing for the 65 s before and after = 115/180 GiB.
    let query = format!(
        "metric=all&start={T0_S}&end={}&step=3m&aggregation=sum",
        T0_S + 180
    );
    // Waited for until both series say it: the processor corrects a window as later readings
    // of it arrive, and the sink applies each correction.
    let answer = poll_json(&route(&query), &acme, Duration::from_secs(90), |v| {
        samples(v, "akash_lease_cpu_usage_cores")
            .first()
            .is_some_and(|(_, cores)| (cores - 75.0 / 180.0).abs() < 1e-12)
            && samples(v, "akash_lease_memory_working_set_bytes")
                .first()
                .is_some_and(|(_, bytes)| (bytes / GIB - 115.0 / 180.0).abs() < 1e-9)
            && !warned(v, "not complete")
    })
    .await;
    assert_eq!(
        answer["lease"],
        serde_json::json!({"owner": "acme", "dseq": "100", "gseq": "1", "oseq": "1", "provider": "akash1simprovider"}),
        "{answer:#}"
    );
    assert_eq!(
        answer["range"],
        serde_json::json!({"start": "2026-11-23T00:00:00.000Z", "end": "2026-11-23T00:03:00.000Z", "step": "180s"})
    );
    let memory = samples(&answer, "akash_lease_memory_working_set_bytes");
    assert_eq!(memory.len(), 1, "{answer:#}");
    assert_eq!(memory[0].0, T0_S);
    assert!(
        (memory[0].1 / GIB - 115.0 / 180.0).abs() < 1e-9,
        "{} GiB",
        memory[0].1 / GIB
    );
    assert!(
        warned(&answer, "observed in part (coverage 0.17"),
        "{answer:#}"
    );
    // Steps of whole 5-minute lease cells are summed from the cells, not the windows: the
    // same readings give the same values. The lease has nothing after 130 s and the data
    // reaches 180 s (the end of the last window with a reading), so a 5- or 15-minute step
    // from T0 is taken over its first 180 s: 75 core-seconds / 180 s, and 115/180 GiB.
    for (step, seconds) in [("5m", 300), ("15m", 900)] {
        let query = format!(
            "metric=akash_lease_cpu_usage_cores,akash_lease_memory_working_set_bytes&start={T0_S}&end={}&step={step}&aggregation=sum",
            T0_S + seconds
        );
        let (status, body) = get_as(&route(&query), &acme).await;
        assert_eq!(status, 200, "{body}");
        let cells: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(cells["range"]["step"], format!("{seconds}s"), "{cells:#}");
        let cores = samples(&cells, "akash_lease_cpu_usage_cores");
        assert_eq!(cores.len(), 1, "{cells:#}");
        assert_eq!(cores[0].0, T0_S);
        assert!((cores[0].1 - 75.0 / 180.0).abs() < 1e-12, "{cells:#}");
        let memory = samples(&cells, "akash_lease_memory_working_set_bytes");
        assert!(
            (memory[0].1 / GIB - 115.0 / 180.0).abs() < 1e-9,
            "{cells:#}"
        );
        assert!(warned(&cells, "not complete"), "{cells:#}");
        assert!(
            warned(&cells, "observed in part (coverage 0.17"),
            "{cells:#}"
        );
    }

    // Series only for what the lease has: CPU and memory, of its one service, labelled.
    let series = answer["series"].as_array().expect("series");
    assert_eq!(series.len(), 2, "{answer:#}");
    for s in series {
        assert_eq!(
            s["labels"],
            serde_json::json!({"owner": "acme", "dseq": "100", "gseq": "1", "oseq": "1", "provider": "akash1simprovider", "service": "svc"})
        );
    }

    // The same through `meterflow lease-metrics --dseq`, as JSON and as a person reads it.
    let cli = |output: &'static str| {
        let (url, bearer) = (pipeline.url(""), acme.clone());
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
                .args(["lease-metrics", "--url", &url, "--token", &bearer])
                .args(["--dseq", "100", "--metric", "cpu,mem", "--step", "3m"])
                .args([
                    "--from",
                    &T0_S.to_string(),
                    "--to",
                    &(T0_S + 180).to_string(),
                ])
                .args(["--provider", "akash1simprovider", "--output", output])
                .output()
                .expect("meterflow lease-metrics runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let printed: Value = serde_json::from_str(&cli("json").await.expect("join")).expect("JSON");
    assert_eq!(printed["series"], answer["series"]);
    let table = cli("table").await.expect("join");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "lease acme/100/1/1 on akash1simprovider, 2026-11-23T00:00:00.000Z to 2026-11-23T00:03:00.000Z, step 180s",
        "{table}"
    );
    assert!(
        lines[1].contains("cpu_usage_cores{svc}") && lines[2].contains("0.416667"),
        "{table}"
    );
    assert!(lines.iter().any(|l| l.starts_with("warning: ")), "{table}");

    // Per minute, the counter's increase sits in the minute of the reading that shows it: the
    // bound of a counter read every 60 s. 10, 60 and 5 core-seconds.
    let minutes = poll_json(
        &route(&format!(
            "metric=akash_lease_cpu_usage_cores&start=2026-11-23T01:00:00%2B01:00&end={}&step=1m&aggregation=sum",
            T0_S + 180
        )),
        &acme,
        Duration::from_secs(10),
        |v| v["series"].is_array(),
    )
    .await;
    let cores: Vec<(i64, f64)> = samples(&minutes, "akash_lease_cpu_usage_cores");
    let expected = [10.0 / 60.0, 1.0, 5.0 / 60.0];
    assert_eq!(cores.len(), 3, "{minutes:#}");
    for (i, ((t, got), want)) in cores.iter().zip(expected).enumerate() {
        assert_eq!(*t, T0_S + 60 * i as i64);
        assert!(
            (got - want).abs() < 1e-12,
            "minute {i}: {got} cores, not {want}"
        );
    }

    // An hour allows 15 s steps; the data is in 1-minute windows: answered at 60 s, said so.
    // The AEP's default aggregation (replica) is answered as sums, said so.
    let fine = poll_json(
        &route(&format!(
            "metric=akash_lease_cpu_usage_cores&start={T0_S}&end={}&step=15s",
            T0_S + 3_600
        )),
        &acme,
        Duration::from_secs(10),
        |v| v["series"].is_array(),
    )
    .await;
    assert_eq!(fine["range"]["step"], "60s", "{fine:#}");
    assert!(
        warned(&fine, "downsampled: step 60s instead of 15s"),
        "{fine:#}"
    );
    assert!(warned(&fine, "aggregation=replica"), "{fine:#}");

    // Prometheus's query_range shape: the same values, as strings, with the labels and the
    // metric name.
    let prom = poll_json(
        &route(&format!("{query}&format=prometheus")),
        &acme,
        Duration::from_secs(10),
        |v| v["status"] == "success",
    )
    .await;
    assert_eq!(prom["data"]["resultType"], "matrix");
    let cpu = prom["data"]["result"]
        .as_array()
        .expect("result")
        .iter()
        .find(|r| r["metric"]["__name__"] == "akash_lease_cpu_usage_cores")
        .expect("the CPU series");
    assert_eq!(cpu["metric"]["service"], "svc");
    assert_eq!(cpu["metric"]["dseq"], "100");
    let value = &cpu["values"][0];
    assert_eq!(value[0], T0_S);
    let text = value[1].as_str().expect("a value is a string");
    assert!(
        (text.parse::<f64>().expect("a number") - 75.0 / 180.0).abs() < 1e-12,
        "{text}"
    );

    // A catalog metric the lease has no data of (no clock was read) is no series; names
    // outside the catalog are refused.
    let partial = poll_json(
        &route(&format!(
            "metric=akash_lease_cpu_usage_cores,akash_lease_gpu_sm_clock_mhz&start={T0_S}&end={}&aggregation=sum",
            T0_S + 180
        )),
        &acme,
        Duration::from_secs(10),
        |v| v["series"].is_array(),
    )
    .await;
    // Three minutes at the default step (15 s, answered per minute).
    assert_eq!(
        samples(&partial, "akash_lease_cpu_usage_cores").len(),
        3,
        "{partial:#}"
    );
    assert!(
        samples(&partial, "akash_lease_gpu_sm_clock_mhz").is_empty(),
        "{partial:#}"
    );

    let end = T0_S + 180;
    let no_scope = token_with(
        &SigningKey::Hs256(crate::common::SECRET.to_vec()),
        "acme",
        "",
        600,
    );
    let acme = acme.as_str();
    let no_scope = no_scope.as_str();
    let cases: Vec<(String, &str, u16, &str)> = vec![
        (
            format!("start={T0_S}&end={end}"),
            acme,
            400,
            "metric is required",
        ),
        (
            format!("metric=gpu_seconds&start={T0_S}&end={end}"),
            acme,
            400,
            "not in the AEP-43 catalog",
        ),
        (
            format!("metric=all&end={end}"),
            acme,
            400,
            "start is required",
        ),
        (
            format!("metric=all&start={}&end={end}", T0_S * 1_000),
            acme,
            400,
            "is not a time",
        ),
        (
            format!("metric=all&start={end}&end={T0_S}"),
            acme,
            400,
            "start must be before end",
        ),
        (
            format!("metric=all&start={T0_S}&end={end}&step=5s"),
            acme,
            400,
            "at least 15s",
        ),
        (
            format!("metric=all&start={T0_S}&end={end}&aggregation=max"),
            acme,
            400,
            "per-replica series",
        ),
        (
            format!("metric=all&start={T0_S}&end={end}&replica=0"),
            acme,
            400,
            "per-replica series",
        ),
        (
            format!("metric=all&start={T0_S}&end={end}&format=csv"),
            acme,
            400,
            "format",
        ),
        (
            format!("metric=all&start={T0_S}&end={}", T0_S + 31 * 86_400),
            acme,
            416,
            "range_not_satisfiable",
        ),
        (
            format!("metric=all&start={T0_S}&end={end}"),
            "",
            401,
            "bearer token",
        ),
        (
            format!("metric=all&start={T0_S}&end={end}"),
            no_scope,
            403,
            "metrics scope",
        ),
    ];
    for (query, bearer, status, says) in &cases {
        let (got, body) = get_as(&route(query), bearer).await;
        assert_eq!(got, *status, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    // Another owner's lease, and a lease nobody has: the same 404.
    for (path, bearer) in [
        ("/lease/100/1/1", token("globex")),
        ("/lease/999/1/1", acme.to_string()),
    ] {
        let (got, body) = get_as(
            &pipeline.url(&format!("{path}/metrics?metric=all&start={T0_S}&end={end}")),
            &bearer,
        )
        .await;
        assert_eq!(got, 404, "{path}: {body}");
    }
    let (got, body) = get_as(
        &pipeline.url(&format!(
            "/lease/1x/1/1/metrics?metric=all&start={T0_S}&end={end}"
        )),
        acme,
    )
    .await;
    assert_eq!(got, 400, "{body}");
    pipeline.stop().await;
}

/// A sample of lease acme/300.1.1's one service `api`, by its container, `at` seconds after T0.
fn api(container: &str, kind: SampleKind, metric: &str, at: i64, value: f64) -> Sample {
    Sample {
        series: SeriesId {
            tenant: "acme".into(),
            lease: "300.1.1".into(),
            service: "api".into(),
            replica: "0".into(),
            node: "node-b".into(),
            provider: "prov".into(),
            container_id: container.into(),
            ..Default::default()
        },
        kind,
        metric: metric.into(),
        value,
        timestamp_ms: (T0_S + at) * 1_000,
        started_at_ms: None,
        finished_at_ms: None,
    }
}

/// The catalog's limits, throttling, RSS, OOM kills, network errors, volumes and GPU memory
/// and temperature, from what happened to one pod, as its agent reads it every 15 s: container c7, limited to 0.5 cores
/// and 256 MiB, starts at 10 s and is OOM-killed at 70 s; the kubelet restarts it as c8 at
/// 72 s, running past the last reading at 135 s. Every expected value is arithmetic on that
/// story.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_limits_throttling_kills_errors_volumes_and_gpus_are_answered_as_they_happened() {
    use SampleKind::{Allocation, Counter, Gauge};
    const MIB: f64 = (1u64 << 20) as f64;
    let pipeline = Pipeline::start(1, 1).await;
    let publisher = Publisher::new(&pipeline.broker.bootstrap()).expect("producer");
    let mut batches = Vec::new();
    for (i, at) in (15..=135).step_by(15).enumerate() {
        let mut samples = Vec::new();
        // The kubelet's runs: c7 from 10 s (ended at 70 s, then listed as the last state),
        // c8 from 72 s. Each limit is an allocation over its run.
        let mut runs = vec![("c7", 10, (at > 70).then_some(70))];
        if at > 72 {
            runs.push(("c8", 72, None));
        }
        for (c, started, finished) in runs {
            for (metric, value) in [
                ("cpu_limit_cores", 0.5),
                ("memory_limit_bytes", 256.0 * MIB),
            ] {
                let mut s = api(c, Allocation, metric, at, value);
                s.started_at_ms = Some((T0_S + started) * 1_000);
                s.finished_at_ms = finished.map(|f| (T0_S + f) * 1_000);
                samples.push(s);
            }
        }
        // The living container's cgroup: throttled seconds, RSS; the pod's OOM kills and
        // network errors, given to its first container (c7, then c8, which carries on from
        // the pod's totals: 1 kill and 2 receive errors by 75 s, 5 by 90 s, 1 transmit error
        // at 120 s).
        let (c, throttled, rss, kills, rx_errors, tx_errors) = match at {
            15 => ("c7", 0.4, 96.0, 0.0, 0.0, 0.0),
            30 => ("c7", 0.9, 96.0, 0.0, 0.0, 0.0),
            45 => ("c7", 1.3, 96.0, 0.0, 2.0, 0.0),
            60 => ("c7", 1.6, 96.0, 0.0, 2.0, 0.0),
            75 => ("c8", 0.0, 64.0, 1.0, 0.0, 0.0),
            90 => ("c8", 0.3, 64.0, 1.0, 3.0, 0.0),
            105 => ("c8", 0.5, 64.0, 1.0, 3.0, 0.0),
            120 => ("c8", 0.6, 64.0, 1.0, 3.0, 1.0),
            _ => ("c8", 0.9, 64.0, 1.0, 3.0, 1.0),
        };
        samples.extend([
            api(c, Counter, "cpu_throttled_seconds_total", at, throttled),
            api(c, Gauge, "memory_rss_bytes", at, rss * MIB),
            api(c, Counter, "memory_oom_kills_total", at, kills),
            api(c, Counter, "network_receive_errors_total", at, rx_errors),
            api(c, Counter, "network_transmit_errors_total", at, tx_errors),
            // The pod's persistent volume (the kubelet's stats summary), on its first
            // container: 10 GB used of 100 GB, 5,000 inodes, throughout.
            api(c, Gauge, "filesystem_usage_bytes", at, 10e9),
            api(c, Gauge, "filesystem_capacity_bytes", at, 100e9),
            api(c, Gauge, "filesystem_inodes_used", at, 5_000.0),
        ]);
        // Its two GPUs (NVML): 80 GB each, one at 60 °C, the other at 70 °C.
        for (uuid, celsius) in [("GPU-1", 60.0), ("GPU-2", 70.0)] {
            let on_gpu = |mut s: Sample| {
                s.series.gpu_uuid = uuid.into();
                s.series.gpu_class = "h100".into();
                s
            };
            samples.push(on_gpu(api(c, Gauge, "gpu_memory_total_bytes", at, 80e9)));
            samples.push(on_gpu(api(
                c,
                Gauge,
                "gpu_temperature_celsius",
                at,
                celsius,
            )));
        }
        batches.push(SampleBatch {
            node: "node-b".into(),
            agent_id: "agent-node-b".into(),
            sequence: i as i64 + 1,
            collected_at_ms: (T0_S + at) * 1_000,
            agent_version: "test".into(),
            samples,
        });
    }
    for b in &batches {
        publisher.publish(b).await.expect("batch delivered");
    }
    let acme = token("acme");
    let route = |query: &str| pipeline.url(&format!("/lease/300/1/1/metrics?{query}"));

    // Over one 3-minute step (the data reaches 180 s, the end of the window of the last
    // reading):
    // - CPU limit: c7 0.5 cores for 60 s (10 → 70) and c8 for 63 s (72 → 135, its last
    //   observation) = 61.5 core-seconds / 180 s; memory alike, 123 s × 256 MiB / 180 s.
    // - Throttled: c7's counter from zero to 1.6 s, c8's to 0.9 s: 2.5 s.
    // - RSS: 96 MiB held from c7's first reading to its last (15 → 60, 45 s), 64 MiB over
    //   c8's (75 → 135, 60 s), read throughout: 8,160 MiB·s over 180 s.
    // - OOM kills 1, receive errors 2 + 3 = 5, transmit errors 1.
    // - The volume's figures, held as RSS is (105 s of 180): 10 GB × 105/180, and so on; the
    //   GPUs' memory alike, summed (2 × 80 GB × 105/180); their temperature, a mean: 65 °C.
    let query = format!(
        "metric=all&start={T0_S}&end={}&step=3m&aggregation=sum",
        T0_S + 180
    );
    let value = |v: &Value, metric: &str| samples(v, metric).first().map(|(_, x)| *x);
    let close =
        |got: Option<f64>, want: f64| got.is_some_and(|g| (g - want).abs() < 1e-9 * want.max(1.0));
    let answer = poll_json(&route(&query), &acme, Duration::from_secs(90), |v| {
        close(value(v, "akash_lease_cpu_limit_cores"), 61.5 / 180.0)
            && close(value(v, "akash_lease_memory_oom_kills_total"), 1.0)
            && close(value(v, "akash_lease_network_rx_errors_total"), 5.0)
            && !warned(v, "not complete")
    })
    .await;
    let want = [
        ("akash_lease_cpu_limit_cores", 61.5 / 180.0),
        (
            "akash_lease_memory_limit_bytes",
            123.0 * 256.0 * MIB / 180.0,
        ),
        ("akash_lease_cpu_throttled_seconds", 2.5),
        ("akash_lease_memory_rss_bytes", 8_160.0 * MIB / 180.0),
        ("akash_lease_memory_oom_kills_total", 1.0),
        ("akash_lease_network_rx_errors_total", 5.0),
        ("akash_lease_network_tx_errors_total", 1.0),
        ("akash_lease_filesystem_usage_bytes", 10e9 * 105.0 / 180.0),
        (
            "akash_lease_filesystem_capacity_bytes",
            100e9 * 105.0 / 180.0,
        ),
        (
            "akash_lease_filesystem_inodes_used",
            5_000.0 * 105.0 / 180.0,
        ),
        ("akash_lease_gpu_memory_total_bytes", 160e9 * 105.0 / 180.0),
        ("akash_lease_gpu_temperature_celsius", 65.0),
    ];
    for (metric, expected) in want {
        let got = value(&answer, metric);
        assert!(
            close(got, expected),
            "{metric}: {got:?}, not {expected}\n{answer:#}"
        );
    }
    let series = answer["series"].as_array().expect("series");
    assert_eq!(series.len(), want.len(), "{answer:#}");
    for s in series {
        assert_eq!(
            s["labels"],
            serde_json::json!({"owner": "acme", "dseq": "300", "gseq": "1", "oseq": "1", "provider": "akash1simprovider", "service": "api"})
        );
    }

    // Per minute, each lands where it happened: the kill in minute 1 (read at 75 s, its
    // bound: the reading interval), the limits by the time each run held them: 10 → 60 s at 0.5 cores, then 60 → 70 and
    // 72 → 120 (29 core-seconds), then 120 → 135 (7.5).
    let minutes = poll_json(
        &route(&format!(
            "metric=akash_lease_memory_oom_kills_total,akash_lease_cpu_limit_cores&start={T0_S}&end={}&step=1m&aggregation=sum",
            T0_S + 180
        )),
        &acme,
        Duration::from_secs(10),
        |v| v["series"].is_array(),
    )
    .await;
    // A counter's minute without an increase has no total (the processor keeps no zero
    // totals): the kill is the one sample.
    let kills = samples(&minutes, "akash_lease_memory_oom_kills_total");
    assert_eq!(kills, [(T0_S + 60, 1.0)], "{minutes:#}");
    let limits = samples(&minutes, "akash_lease_cpu_limit_cores");
    let expected = [25.0 / 60.0, 29.0 / 60.0, 7.5 / 60.0];
    assert_eq!(limits.len(), 3, "{minutes:#}");
    for ((t, got), (i, want)) in limits.iter().zip(expected.into_iter().enumerate()) {
        assert_eq!(*t, T0_S + 60 * i as i64);
        assert!(
            (got - want).abs() < 1e-12,
            "minute {i}: {got} cores, not {want}"
        );
    }
}
