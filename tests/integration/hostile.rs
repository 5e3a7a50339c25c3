//! Hostile samples among good ones: NaN and infinity, negative counters, timestamps before
//! 1970 and far in the future, a label value of 100 KB, a fractional GPU count, a value too
//! large for the aggregates. Each lands in `meterflow.deadletter` with its reason, and the
//! rest of the stream comes out exactly as it does without them: the same final value for
//! every usage record and the same net billed quantity per key. Messages that are no batch at
//! all (1 MB of garbage, a cut frame, an unknown schema id) are dead-lettered too, the largest
//! as a bounded excerpt, and billing never stops for them.

use std::collections::BTreeMap;

use meterflow_ingest::Publisher;
use meterflow_schemas::{
    DeadLetter, Record, Sample, SampleBatch, SampleKind, UsageUpdate, topics as names,
};

use crate::cluster::{outputs, processor, wait_all};
use crate::common::{memory_broker, read_topic};

const PARTITIONS: i32 = 4;

/// Each hostile sample, made from a good one of the same batch, with the reason it must get.
fn hostile(good: &Sample) -> Vec<(Sample, &'static str)> {
    let with = |f: &dyn Fn(&mut Sample)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    let counter = |s: &mut Sample| {
        s.kind = SampleKind::Counter;
        s.metric = "cpu_usage_seconds_total".into();
        s.started_at_ms = None;
        s.finished_at_ms = None;
    };
    let year_ms = 365 * 86_400_000;
    vec![
        (
            with(&|s| {
                counter(s);
                s.value = f64::NAN;
            }),
            "non_finite_value",
        ),
        (
            with(&|s| {
                counter(s);
                s.value = f64::INFINITY;
            }),
            "non_finite_value",
        ),
        (
            with(&|s| {
                counter(s);
                s.value = -3.0;
            }),
            "negative_counter",
        ),
        // Before 1970 is also before its agent's watermark, once there is one: `too_late` then.
        (with(&|s| s.timestamp_ms = -1), "before_epoch|too_late"),
        (
            with(&|s| s.timestamp_ms = meterflow_processor::now_ms() + year_ms),
            "far_future",
        ),
        (
            with(&|s| s.series.lease = "x".repeat(100_000)),
            "label_too_long",
        ),
        (
            with(&|s| {
                s.kind = SampleKind::Allocation;
                s.metric = "gpu".into();
                s.value = 0.5;
                s.started_at_ms = Some(s.timestamp_ms);
                s.finished_at_ms = None;
            }),
            "bad_gpu_count",
        ),
        (
            with(&|s| {
                s.kind = SampleKind::Gauge;
                s.metric = "memory_working_set_bytes".into();
                s.value = 1e300;
            }),
            "value_too_large",
        ),
    ]
}

async fn run(
    batches: &[SampleBatch],
    flags: &[&str],
) -> (meterflow::broker::EmbeddedBroker, tempfile::TempDir) {
    run_with(batches, &[], flags).await
}

/// [`run`], with `raw` messages produced into the samples topic after the batches, as they are.
async fn run_with(
    batches: &[SampleBatch],
    raw: &[Vec<u8>],
    flags: &[&str],
) -> (meterflow::broker::EmbeddedBroker, tempfile::TempDir) {
    let broker = memory_broker().await;
    crate::common::ensure_topics(&broker.bootstrap(), PARTITIONS).await;
    let publisher = Publisher::new(&broker.bootstrap()).expect("publisher");
    for b in batches {
        publisher.publish(b).await.expect("published");
    }
    if !raw.is_empty() {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        // A broker's default message limit (1 MiB and a little) admits what the processor's own
        // producer, at librdkafka's default of 1,000,000 bytes, cannot send back whole.
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("message.max.bytes", "1048576")
            .create()
            .expect("producer");
        for (i, bytes) in raw.iter().enumerate() {
            producer
                .send(
                    FutureRecord::to(names::SAMPLES)
                        .key(&format!("garbage-{i}"))
                        .payload(bytes.as_slice()),
                    std::time::Duration::from_secs(30),
                )
                .await
                .expect("the broker takes the message");
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let brokers = broker.bootstrap();
    let state = dir.path().join("state");
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        // Four partitions, as `processor` creates them.
        wait_all(vec![processor(&brokers, &state, &flags)])
    })
    .await
    .expect("processor");
    (broker, dir)
}

/// Final usage per record id and net billed quantity per key (see [`outputs`]).
type Outputs = (
    BTreeMap<String, (i64, i64, i64)>,
    BTreeMap<(String, String, String, i64), i64>,
);

/// The processor run on `good` alone and on `attacked` with `raw` messages after it: each run's
/// outputs, the attacked run's dead letters (waiting for at least `dead`), and its broker, up
/// for more reads until the caller stops it.
async fn side_by_side(
    good: &[SampleBatch],
    attacked: &[SampleBatch],
    raw: &[Vec<u8>],
    dead: usize,
) -> (
    Outputs,
    Outputs,
    Vec<DeadLetter>,
    meterflow::broker::EmbeddedBroker,
) {
    let (clean, _clean_dir) = run(good, &[]).await;
    let (hit, _hit_dir) = run_with(attacked, raw, &[]).await;
    let (clean_b, hit_b) = (clean.bootstrap(), hit.bootstrap());
    let (clean_out, hit_out, letters) = tokio::task::spawn_blocking(move || {
        (
            outputs(&clean_b, PARTITIONS),
            outputs(&hit_b, PARTITIONS),
            read_topic(&hit_b, names::DEADLETTER, PARTITIONS, dead),
        )
    })
    .await
    .expect("read");
    clean.stop();
    let letters = letters
        .iter()
        .map(|b| DeadLetter::decode(b).expect("a dead letter"))
        .collect();
    (clean_out, hit_out, letters, hit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_samples_are_dead_lettered_with_a_reason_and_the_rest_is_untouched() {
    let good = crate::pipeline::batches();
    let mut expected: BTreeMap<&str, usize> = BTreeMap::new();
    let mut mixed = good.clone();
    for batch in &mut mixed {
        let first = batch.samples[0].clone();
        // Hostile samples between the good ones, on the same series.
        for (i, (sample, reason)) in hostile(&first).into_iter().enumerate() {
            *expected.entry(reason).or_default() += 1;
            let at = (i * 2 + 1).min(batch.samples.len());
            batch.samples.insert(at, sample);
        }
    }

    let (clean, _clean_dir) = run(&good, &[]).await;
    let (attacked, _attacked_dir) = run(&mixed, &[]).await;
    let (clean_b, attacked_b) = (clean.bootstrap(), attacked.bootstrap());
    let ((clean_usage, clean_billed), (usage, billed), dead, clean_dead) =
        tokio::task::spawn_blocking(move || {
            (
                outputs(&clean_b, PARTITIONS),
                outputs(&attacked_b, PARTITIONS),
                read_topic(&attacked_b, names::DEADLETTER, PARTITIONS, 1),
                read_topic(&clean_b, names::DEADLETTER, PARTITIONS, 0),
            )
        })
        .await
        .expect("read");
    assert!(clean_dead.is_empty(), "good samples are not dead letters");
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for bytes in &dead {
        let d = DeadLetter::decode(bytes).expect("a dead letter");
        assert!(!d.detail.is_empty(), "{} without a detail", d.reason);
        let reason = expected
            .keys()
            .find(|r| r.split('|').any(|one| one == d.reason))
            .map_or(d.reason.clone(), |r| r.to_string());
        *reasons.entry(reason).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = expected
        .into_iter()
        .map(|(r, n)| (r.to_string(), n))
        .collect();
    assert_eq!(
        reasons, expected,
        "one dead letter per hostile sample, with its reason"
    );
    assert!(!clean_usage.is_empty());
    assert_eq!(usage, clean_usage, "the same final usage per record id");
    assert_eq!(billed, clean_billed, "the same net billed quantity per key");
    clean.stop();
    attacked.stop();
}

/// One tenant opens 5,000 series in an hour (a container id in a label, say) against a limit
/// of 1,000: the first 1,000 are kept, the other 4,000 samples are dead letters
/// `series_limit` naming the tenant, and the other tenants' usage and billing are exactly
/// what they are without it. (The noisy series are single memory readings on a node already
/// active that hour: admitted, they add no usage record, so the outputs compare whole.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_exploding_its_series_is_stopped_at_its_limit_and_the_others_are_untouched() {
    let good = crate::pipeline::batches();
    let template = good[0].samples[0].clone();
    let mut attacked = good.clone();
    for b in 0..5 {
        attacked.push(SampleBatch {
            node: good[0].node.clone(),
            agent_id: "noisy-agent".into(),
            sequence: b + 1,
            collected_at_ms: template.timestamp_ms,
            agent_version: "test".into(),
            samples: (0..1_000)
                .map(|i| {
                    let mut s = template.clone();
                    s.series.tenant = "noisy".into();
                    s.series.container_id = format!("request-{b}-{i}");
                    s.series.gpu_uuid = String::new();
                    s.series.gpu_class = String::new();
                    s.series.mig_profile = String::new();
                    s.kind = SampleKind::Gauge;
                    s.metric = "memory_working_set_bytes".into();
                    s.value = 1e6;
                    s.started_at_ms = None;
                    s.finished_at_ms = None;
                    s
                })
                .collect(),
        });
    }
    let limit = ["--max-new-series-per-tenant-hour", "1000"];
    let (clean, _clean_dir) = run(&good, &limit).await;
    let (noisy, _noisy_dir) = run(&attacked, &limit).await;
    let (clean_b, noisy_b) = (clean.bootstrap(), noisy.bootstrap());
    // The final value of every usage record but the noisy tenant's own (its admitted series
    // have live values), by id.
    let others = |brokers: &str| -> BTreeMap<String, (i64, i64, i64)> {
        crate::common::read_topic_at(brokers, names::USAGE, PARTITIONS, 1)
            .into_iter()
            .map(|(_, _, bytes)| UsageUpdate::decode(&bytes).expect("usage decodes"))
            .filter(|u| u.tenant != "noisy")
            .map(|u| (u.id, (u.amount, u.coverage_ms, u.present_ms)))
            .collect()
    };
    let ((clean_usage, clean_billed), (usage, billed), dead) =
        tokio::task::spawn_blocking(move || {
            (
                (others(&clean_b), outputs(&clean_b, PARTITIONS).1),
                (others(&noisy_b), outputs(&noisy_b, PARTITIONS).1),
                read_topic(&noisy_b, names::DEADLETTER, PARTITIONS, 4_000),
            )
        })
        .await
        .expect("read");
    let letters: Vec<DeadLetter> = dead
        .iter()
        .map(|b| DeadLetter::decode(b).expect("a dead letter"))
        .collect();
    assert_eq!(letters.len(), 4_000, "every sample past the limit, once");
    for d in &letters {
        assert_eq!(d.reason, "series_limit", "{}", d.detail);
        assert!(
            d.detail.contains("\"noisy\"") && d.detail.contains("--max-new-series-per-tenant-hour"),
            "the detail names the tenant and the setting: {}",
            d.detail
        );
    }
    assert!(!clean_usage.is_empty());
    assert_eq!(usage, clean_usage, "the same final usage per record id");
    assert_eq!(billed, clean_billed, "the same net billed quantity per key");
    clean.stop();
    noisy.stop();
}

/// Messages that are not batches: 1,000,000 bytes of garbage (too large to be sent back whole
/// inside a dead letter by the processor's producer), a batch cut in half, a frame naming a
/// schema id no one registered. Each is a dead letter with its reason, the largest cut to its
/// first 64 KiB with its size and SHA-256 said; the processor runs to the end of its input
/// (before, the garbage stopped it for ever: its dead letter was refused, the run resumed from
/// its checkpoint and read the garbage again), and the outputs are those of the good input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_are_no_batch_are_dead_lettered_in_bounded_size_and_billing_goes_on() {
    use sha2::Digest;
    let good = crate::pipeline::batches();
    let garbage = vec![0xab_u8; 1_000_000];
    let digest: String = sha2::Sha256::digest(&garbage)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut cut = SampleBatch {
        agent_id: "cut-agent".into(),
        ..good[0].clone()
    }
    .encode()
    .expect("encodes");
    cut.truncate(cut.len() / 2);
    let mut unknown = vec![0u8, 0x7f, 0xff, 0xff, 0xfe];
    unknown.extend_from_slice(b"not avro");
    let raw = vec![garbage.clone(), cut, unknown];

    let ((clean_usage, clean_billed), (usage, billed), mut letters, attacked) =
        side_by_side(&good, &good, &raw, raw.len()).await;
    let attacked_b = attacked.bootstrap();
    let messages = good.len() + raw.len();
    let sizes: Vec<usize> = tokio::task::spawn_blocking(move || {
        crate::common::read_topic_at(&attacked_b, names::SAMPLES, PARTITIONS, messages)
            .into_iter()
            .map(|(_, _, bytes)| bytes.len())
            .collect()
    })
    .await
    .expect("read");
    // The fault is there: the broker holds the megabyte of garbage.
    assert!(sizes.contains(&1_000_000), "{sizes:?}");
    letters.sort_by_key(|d| std::cmp::Reverse(d.payload.len()));
    let reasons: Vec<&str> = letters.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(letters[0].reason, "undecodable");
    assert_eq!(letters[0].payload, garbage[..64 * 1024]);
    assert!(
        letters[0].detail.contains("of 1000000 bytes")
            && letters[0].detail.contains(&digest)
            && letters[0].detail.contains(&format!(
                "partition {} offset {}",
                letters[0].source_partition, letters[0].source_offset
            )),
        "the detail says how large it was, its digest and where it is: {}",
        letters[0].detail
    );
    let mut rest: Vec<&str> = reasons[1..].to_vec();
    rest.sort();
    assert_eq!(rest, ["undecodable", "unknown_schema"], "{reasons:?}");
    assert!(!clean_usage.is_empty());
    assert_eq!(usage, clean_usage, "the same final usage per record id");
    assert_eq!(billed, clean_billed, "the same net billed quantity per key");
    attacked.stop();
}

/// One agent's clock an hour fast: its empty batch is a dead letter `far_future` naming it, and
/// it closes no one's billing window. The good input alone leaves its 5-minute billing windows
/// open (its agent's watermark is not past them): had the rogue stamp moved the watermark, every
/// one of them would have been charged at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agents_fast_clock_closes_no_ones_billing_windows() {
    let good = crate::pipeline::batches();
    let mut attacked = good.clone();
    attacked.push(SampleBatch {
        node: "node-z".into(),
        agent_id: "agent-fast-clock".into(),
        sequence: 1,
        collected_at_ms: meterflow_processor::now_ms() + 3_600_000,
        agent_version: "test".into(),
        samples: vec![],
    });
    let ((clean_usage, clean_billed), (usage, billed), letters, fast) =
        side_by_side(&good, &attacked, &[], 1).await;
    assert!(!clean_usage.is_empty());
    assert!(
        clean_billed.is_empty(),
        "the good input's windows stay open: {clean_billed:?}"
    );
    assert_eq!(billed, clean_billed, "nothing charged early");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "far_future");
    assert!(
        letters[0].detail.contains("agent-fast-clock")
            && letters[0].detail.contains("--max-clock-skew"),
        "{}",
        letters[0].detail
    );
    assert_eq!(usage, clean_usage, "the same final usage per record id");
    fast.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fast_within_the_skew_bound_closes_no_window_before_its_time() {
    // One-minute billing windows, ten minutes' lateness, the default 5-minute skew bound.
    // Times from the wall clock: E is a minute boundary 7 to 8 minutes ago, E0 five minutes
    // before it. acme's honest agent holds one H100 for 40 s inside [E0 - 1m, E0) and 40 s
    // inside [E - 1m, E); its own watermark, E - 5 s, closes neither (E - 5 s - 10 m is before
    // both ends). An agent stamping its batch 4 minutes ahead (inside the bound: not refused)
    // makes the newest watermark now + 4 m. Read as it is, it would close every window ending
    // by now - 6 m, [E - 1m, E) included; capped by the processor's clock, only those ending
    // by now - 10 m: [E0 - 1m, E0) is charged (the fast stamp was taken: the fault happened)
    // and [E - 1m, E) stays open until 10 minutes after E, over 2 minutes after this started.
    const MIN: i64 = 60_000;
    let now0 = meterflow_processor::now_ms();
    let e = (now0 - 7 * MIN).div_euclid(MIN) * MIN;
    let e0 = e - 5 * MIN;
    let held = |container: &str, from: i64, to: i64, at: i64| Sample {
        series: meterflow_schemas::SeriesId {
            tenant: "acme".into(),
            lease: "100.1.1".into(),
            service: "svc".into(),
            replica: "0".into(),
            node: "node-a".into(),
            provider: "prov".into(),
            container_id: container.into(),
            gpu_uuid: "GPU-1".into(),
            gpu_model: String::new(),
            gpu_class: "h100".into(),
            mig_profile: String::new(),
        },
        kind: SampleKind::Allocation,
        metric: "gpu".into(),
        value: 1.0,
        timestamp_ms: at,
        started_at_ms: Some(from),
        finished_at_ms: Some(to),
    };
    let batch =
        |agent: &str, node: &str, sequence: i64, at: i64, samples: Vec<Sample>| SampleBatch {
            node: node.into(),
            agent_id: agent.into(),
            sequence,
            collected_at_ms: at,
            agent_version: "test".into(),
            samples,
        };
    let batches = vec![
        batch(
            "agent-node-a",
            "node-a",
            1,
            e0 - 5_000,
            vec![held("c0", e0 - 50_000, e0 - 10_000, e0 - 5_000)],
        ),
        batch(
            "agent-node-a",
            "node-a",
            2,
            e - 5_000,
            vec![held("c1", e - 50_000, e - 10_000, e - 5_000)],
        ),
        batch("agent-fast-clock", "node-z", 1, now0 + 4 * MIN, vec![]),
    ];
    let broker = memory_broker().await;
    crate::common::ensure_topics(&broker.bootstrap(), PARTITIONS).await;
    let publisher = Publisher::new(&broker.bootstrap()).expect("publisher");
    for b in &batches {
        publisher.publish(b).await.expect("published");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let brokers = broker.bootstrap();
    let state = dir.path().join("state");
    let (_, billed, letters) = tokio::task::spawn_blocking(move || {
        wait_all(vec![crate::common::spawn_processor(
            &brokers,
            &state,
            &[
                "--billing-window",
                "1m",
                "--lateness",
                "10m",
                "--exit-when-caught-up",
                "--partitions",
                &PARTITIONS.to_string(),
            ],
        )]);
        let (usage, billed) = outputs(&brokers, PARTITIONS);
        let letters = read_topic(&brokers, names::DEADLETTER, PARTITIONS, 0);
        (usage, billed, letters)
    })
    .await
    .expect("run");
    assert!(
        meterflow_processor::now_ms() < e + 10 * MIN,
        "the run ended before [E - 1m, E) may close by the clock"
    );
    assert!(letters.is_empty(), "the fast stamp is inside the bound");
    let key = |window: i64| {
        (
            "acme".to_string(),
            "100.1.1".to_string(),
            "gpu:h100:".to_string(),
            window,
        )
    };
    assert_eq!(
        billed,
        BTreeMap::from([(key(e0 - MIN), 40_000)]),
        "only the window ending 10 minutes before the clock is charged"
    );
    broker.stop();
}

/// The processor from the state in `state`, until it has read everything, with `flags`.
fn process(brokers: &str, state: &std::path::Path, flags: &[&str]) {
    let mut all = vec![
        "--exit-when-caught-up".to_string(),
        "--partitions".to_string(),
        PARTITIONS.to_string(),
    ];
    all.extend(flags.iter().map(|f| f.to_string()));
    wait_all(vec![crate::common::spawn_processor(brokers, state, &all)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_cannot_bill_into_a_period_closed_in_an_earlier_run() {
    // A live agent reports now (December 2026), and the processor runs: November's billing
    // period is past its end. Then a new agent publishes the pipeline scenario, dated 23
    // November, and another new agent reports, 20 minutes ago, an H100 held since 30 November
    // 23:30; the processor runs again from its checkpoint. With a grace of 30 days November is
    // still open: its usage is charged, the last half hour of November included (the
    // back-dating this guards against). With a grace of one day it closed on 2 December:
    // every November sample is a dead letter `closed_period` naming the agent and the month;
    // the H100's December is billed, its half hour of November is set aside as a dead letter
    // `closed_period` carrying the record it would have been; nothing of November is billed.
    let live = SampleBatch {
        node: "node-live".into(),
        agent_id: "agent-live".into(),
        sequence: 1,
        collected_at_ms: meterflow_processor::now_ms(),
        agent_version: "test".into(),
        samples: vec![],
    };
    let mut back_dated = crate::pipeline::batches();
    let samples: usize = back_dated.iter().map(|b| b.samples.len()).sum();
    const DEC_1: i64 = 1_796_083_200_000;
    let now0 = meterflow_processor::now_ms();
    let mut since_november = back_dated[0].samples[0].clone();
    since_november.series.tenant = "initech".into();
    since_november.series.lease = "300.1.1".into();
    since_november.series.node = "node-b".into();
    since_november.timestamp_ms = now0 - 20 * 60_000;
    since_november.started_at_ms = Some(DEC_1 - 30 * 60_000);
    since_november.finished_at_ms = None;
    back_dated.push(SampleBatch {
        node: "node-b".into(),
        agent_id: "agent-node-b".into(),
        sequence: 1,
        collected_at_ms: now0 - 20 * 60_000,
        agent_version: "test".into(),
        samples: vec![since_november],
    });
    let november_hour = (
        "initech".to_string(),
        "300.1.1".to_string(),
        "gpu:h100:".to_string(),
        DEC_1 - 3_600_000,
    );
    let mut runs = Vec::new();
    for grace in ["30d", "1d"] {
        let broker = memory_broker().await;
        crate::common::ensure_topics(&broker.bootstrap(), PARTITIONS).await;
        let publisher = Publisher::new(&broker.bootstrap()).expect("publisher");
        let dir = tempfile::tempdir().expect("tempdir");
        let (brokers, state) = (broker.bootstrap(), dir.path().join("state"));
        publisher.publish(&live).await.expect("published");
        let (b, s) = (brokers.clone(), state.clone());
        tokio::task::spawn_blocking(move || process(&b, &s, &["--period-grace", grace]))
            .await
            .expect("first run");
        for b in &back_dated {
            publisher.publish(b).await.expect("published");
        }
        let outcome = tokio::task::spawn_blocking(move || {
            process(&brokers, &state, &["--period-grace", grace]);
            let (_, billed) = outputs(&brokers, PARTITIONS);
            let letters: Vec<DeadLetter> = read_topic(&brokers, names::DEADLETTER, PARTITIONS, 0)
                .iter()
                .map(|b| DeadLetter::decode(b).expect("a dead letter"))
                .collect();
            (billed, letters)
        })
        .await
        .expect("second run");
        broker.stop();
        runs.push(outcome);
    }
    let (open_billed, open_letters) = &runs[0];
    assert!(
        open_billed.keys().any(|(tenant, ..)| tenant == "acme"),
        "within the grace the back-dated usage is charged: {open_billed:?}"
    );
    assert_eq!(open_billed.get(&november_hour), Some(&1_800_000));
    assert!(open_letters.is_empty(), "{open_letters:?}");
    let (closed_billed, closed_letters) = &runs[1];
    assert!(
        closed_billed
            .keys()
            .all(|(tenant, _, _, window)| tenant == "initech" && *window >= DEC_1),
        "nothing of November is billed: {closed_billed:?}"
    );
    assert!(
        closed_billed.contains_key(&(
            "initech".to_string(),
            "300.1.1".to_string(),
            "gpu:h100:".to_string(),
            DEC_1
        )),
        "the H100's December is billed: {closed_billed:?}"
    );
    let (set_aside, closed_letters): (Vec<&DeadLetter>, Vec<&DeadLetter>) = closed_letters
        .iter()
        .partition(|l| l.source_topic == names::BILLING);
    assert_eq!(set_aside.len(), 1, "{set_aside:?}");
    let would_have_been =
        meterflow_schemas::BillingRecord::decode(&set_aside[0].payload).expect("a billing record");
    assert_eq!(
        (
            set_aside[0].reason.as_str(),
            would_have_been.tenant.as_str(),
            would_have_been.window_start_ms,
            would_have_been.quantity
        ),
        ("closed_period", "initech", DEC_1 - 3_600_000, 1_800_000)
    );
    assert!(
        set_aside[0].detail.contains("2026-11"),
        "{}",
        set_aside[0].detail
    );
    assert_eq!(closed_letters.len(), samples, "{closed_letters:?}");
    for letter in closed_letters {
        assert_eq!(letter.reason, "closed_period");
        assert!(
            letter.detail.contains("agent-node-a")
                && letter.detail.contains("2026-11")
                && letter.detail.contains("--period-grace"),
            "{}",
            letter.detail
        );
        let kept = SampleBatch::decode(&letter.payload).expect("the sample is kept");
        assert_eq!(kept.samples.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_records_are_keyed_so_that_no_tenant_can_compact_away_anothers() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (broker, _dir) = run(&crate::pipeline::batches(), &[]).await;
    let brokers = broker.bootstrap();
    // Every usage record with its partition and Kafka key.
    let reader = brokers.clone();
    let records: Vec<(i32, String, UsageUpdate)> = tokio::task::spawn_blocking(move || {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &reader);
        crate::common::read_all(config, names::USAGE, PARTITIONS)
            .into_iter()
            .map(|(partition, key, payload)| {
                let key = String::from_utf8(key.expect("a key")).expect("UTF-8 key");
                let u = UsageUpdate::decode(&payload).expect("a usage update");
                (partition, key, u)
            })
            .collect()
    })
    .await
    .expect("read");
    assert!(records.len() > 20, "{} usage records", records.len());
    // The oracle for the partitions is librdkafka's own default partitioner, given the id as
    // the key (what keyed these records before): each aggregate stays where it was, so a
    // reader of the compacted topic still sees its values in order.
    let oracle: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    for (partition, key, u) in &records {
        assert_eq!(key.len(), 32, "128 bits: {key}");
        assert_ne!(key, &u.id);
        // The same id under another tenant is another key: no tenant's name can make its
        // record replace another tenant's in compaction.
        let other = UsageUpdate {
            tenant: format!("{}-other", u.tenant),
            ..u.clone()
        };
        assert_ne!(
            key,
            &meterflow_processor::runner::usage_key(&other),
            "{u:?}"
        );
        let was = oracle
            .send(
                FutureRecord::to(names::DEADLETTER)
                    .key(&u.id)
                    .payload(&b""[..]),
                std::time::Duration::from_secs(10),
            )
            .await
            .expect("delivered")
            .partition;
        assert_eq!(was, *partition, "{} keeps its partition", u.id);
    }
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_says_how_far_it_has_come() {
    // The pipeline scenario's last batch is stamped T0 + 195 s; with a minute's lateness the
    // billing frontier is a minute behind it, and once everything is read nothing is waiting.
    const T0_S: f64 = 1_795_392_000.0;
    let broker = memory_broker().await;
    let brokers = broker.bootstrap();
    crate::common::ensure_topics(&brokers, PARTITIONS).await;
    let publisher = Publisher::new(&brokers).expect("publisher");
    for b in crate::pipeline::batches() {
        publisher.publish(&b).await.expect("published");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = crate::common::free_addr();
    let _processor = crate::common::KillOnDrop(crate::common::spawn_processor(
        &brokers,
        &dir.path().join("state"),
        &[
            "--lateness",
            "1m",
            "--partitions",
            &PARTITIONS.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ],
    ));
    let text = tokio::task::spawn_blocking(move || {
        let value = |text: &str, series: &str| crate::common::metric_value(text, series);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let text = crate::common::http_get(metrics, "/metrics")
                .map(|(_, body)| body)
                .unwrap_or_default();
            if (value(&text, "meterflow_processor_watermark_seconds") == Some(T0_S + 195.0)
                && value(&text, "meterflow_processor_input_lag_records") == Some(0.0))
                || std::time::Instant::now() > deadline
            {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    })
    .await
    .expect("metrics");
    let value = |series: &str| crate::common::metric_value(&text, series);
    assert_eq!(
        value("meterflow_processor_watermark_seconds"),
        Some(T0_S + 195.0),
        "{text}"
    );
    assert_eq!(
        value("meterflow_processor_billing_frontier_seconds"),
        Some(T0_S + 135.0)
    );
    assert_eq!(value("meterflow_processor_input_lag_records"), Some(0.0));
    assert!(
        text.contains("meterflow_build_info{component=\"processor\",version=")
            && value("process_resident_memory_bytes").is_some_and(|b| b > 0.0),
        "{text}"
    );
    broker.stop();
}
