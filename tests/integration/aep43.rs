//! AEP-43's lease metrics route through the whole pipeline: the pipeline scenario's batches
//! (`pipeline::batches`, its readings written out by hand there) → broker → processor → sink →
//! `GET /lease/{dseq}/{gseq}/{oseq}/metrics`. The expected values are arithmetic on those
//! readings; each parameter, error code and the Prometheus shape is walked.

use std::time::Duration;

use meterflow_ingest::Publisher;
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

    // Catalog names not collected are warnings; names outside the catalog are refused.
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
    assert!(
        warned(&partial, "akash_lease_gpu_sm_clock_mhz is not collected"),
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
