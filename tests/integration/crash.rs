//! The processor killed with SIGKILL at random points, again and again, while a simulated fleet
//! publishes: afterwards every billing record id is in `meterflow.billing` exactly once, each
//! key's revisions run 0, 1, 2, … without a gap, and the billed GPU time and reserved cores and
//! memory equal the fleet's ground truth to the millisecond. Most kills must land mid-work (the
//! process had consumed input and more was arriving), or the test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use meterflow::broker;
use meterflow_ingest::{Fleet, FleetConfig, Publisher};
use meterflow_processor::PriceBook;
use meterflow_processor::model::BillingKey;
use meterflow_schemas::{
    BillingKind, BillingRecord, Record, SampleBatch, UsageUpdate, topics as names,
};

use crate::common::{KillOnDrop, T0, TICK_MS, read_topic_at, spawn_processor};

const TICKS: i64 = 240;
pub(crate) const PARTITIONS: i32 = 4;
const KILLS: usize = 20;
/// How many ticks node-000's batches lag behind the rest of the fleet's.
const LAG_TICKS: i64 = 40;

fn start_processor(brokers: &str, state: &Path, workers: usize) -> Child {
    start_processor_with(brokers, state, workers, &[])
}

fn start_processor_with(brokers: &str, state: &Path, workers: usize, extra: &[&str]) -> Child {
    let mut flags: Vec<String> = [
        "-w",
        &workers.to_string(),
        "--billing-window",
        "5m",
        "--lateness",
        "1m",
        "--max-batch",
        "20",
        "--max-catch-up-batch",
        "20",
        "--checkpoint-interval",
        "150ms",
        // Containers come and go every few minutes: their series leave memory two minutes
        // after their last sample and come back from the state directory when they report
        // again, across the kills.
        "--retire-idle-after",
        "2m",
        "--partitions",
        &PARTITIONS.to_string(),
    ]
    .map(String::from)
    .to_vec();
    flags.extend(extra.iter().map(|f| f.to_string()));
    spawn_processor(brokers, state, &flags)
}

/// A billing record and where it was found (partition, offset).
pub(crate) type Found = (i32, i64, BillingRecord);

/// GPU-ms per (tenant, lease, class, MIG profile).
pub(crate) type GpuMs = crate::common::GpuTruth;

/// What the billing topic says: billed GPU-ms and every record.
pub(crate) fn billed(brokers: &str) -> (GpuMs, Vec<Found>) {
    let found: Vec<Found> = read_topic_at(brokers, names::BILLING, PARTITIONS, 0)
        .into_iter()
        .map(|(p, o, bytes)| {
            let r = BillingRecord::decode(&bytes).expect("billing records decode");
            (p, o, r)
        })
        .collect();
    let mut gpu_ms = BTreeMap::new();
    for (_, _, r) in &found {
        let key = BillingKey::from_record(r).expect("a known item");
        if key.gpu_class.is_empty() {
            continue;
        }
        *gpu_ms
            .entry((key.tenant, key.lease, key.gpu_class, key.mig_profile))
            .or_insert(0) += r.quantity;
    }
    gpu_ms.retain(|_, ms| *ms != 0);
    (gpu_ms, found)
}

/// What the usage topic says, as a sink keeps it (the last record of each id): GPU-ms per
/// (tenant, lease, class, MIG profile), summed over the windows of each resolution (`""` for
/// base windows).
fn used_gpu_ms(brokers: &str) -> BTreeMap<String, GpuMs> {
    let mut last: BTreeMap<String, UsageUpdate> = BTreeMap::new();
    let started = Instant::now();
    let records = crate::common::read_topic(brokers, names::USAGE, PARTITIONS, 0);
    println!(
        "{} usage records read in {:.1} s",
        records.len(),
        started.elapsed().as_secs_f64()
    );
    for bytes in records {
        let u = UsageUpdate::decode(&bytes).expect("usage records decode");
        last.insert(u.id.clone(), u);
    }
    let mut used: BTreeMap<String, GpuMs> = BTreeMap::new();
    for u in last.into_values().filter(|u| u.metric == "gpu_seconds") {
        let ms = u.amount * 10i64.pow(3) / 10i64.pow(u.scale as u32);
        *used
            .entry(u.resolution.clone())
            .or_default()
            .entry((u.tenant, u.lease, u.gpu_class, u.mig_profile))
            .or_insert(0) += ms;
    }
    for by_key in used.values_mut() {
        by_key.retain(|_, ms| *ms != 0);
    }
    used
}

/// Reads the usage topic every 2 s until its GPU-ms in base windows and hours equal `truth`
/// or `limit` passes; returns the last reading.
async fn used_within(brokers: &str, truth: &GpuMs, limit: Duration) -> BTreeMap<String, GpuMs> {
    let deadline = Instant::now() + limit;
    loop {
        let used = tokio::task::spawn_blocking({
            let brokers = brokers.to_string();
            move || used_gpu_ms(&brokers)
        })
        .await
        .expect("reader");
        let done = ["", "hour"].iter().all(|l| used.get(*l) == Some(truth));
        if done || Instant::now() >= deadline {
            return used;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Reads the billing topic once a second until its billed GPU-ms equal `truth` or `limit`
/// passes; returns the last reading (for the caller's assertions).
pub(crate) async fn billed_within(
    brokers: &str,
    truth: &GpuMs,
    limit: Duration,
) -> (GpuMs, Vec<Found>) {
    let deadline = Instant::now() + limit;
    loop {
        let (gpu_ms, found) = tokio::task::spawn_blocking({
            let brokers = brokers.to_string();
            move || billed(&brokers)
        })
        .await
        .expect("reader");
        if gpu_ms == *truth || Instant::now() > deadline {
            return (gpu_ms, found);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The embedded broker in memory, with the topics at [`PARTITIONS`] partitions.
pub(crate) async fn broker_with_topics() -> (broker::EmbeddedBroker, String) {
    let broker = crate::common::memory_broker().await;
    let brokers = broker.bootstrap();
    crate::common::ensure_topics(&brokers, PARTITIONS).await;
    (broker, brokers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_is_exactly_once_across_twenty_sigkills() {
    let (broker, brokers) = broker_with_topics().await;
    let state = tempfile::tempdir().expect("temp dir");

    // The fleet publishes an hour of event time over about ten seconds of wall time.
    let publisher_brokers = brokers.clone();
    let publisher = tokio::spawn(async move {
        let publisher = std::sync::Arc::new(Publisher::new(&publisher_brokers).expect("publisher"));
        let mut fleet = Fleet::new(
            FleetConfig {
                nodes: 12,
                seed: 7,
                ..FleetConfig::default()
            },
            T0,
        );
        // node-000's batches arrive ten minutes of event time behind the others': within its
        // own agent's lateness, but after the others have closed the windows it falls in, so
        // its usage is charged late and then adjusted as its intervals grow.
        let mut lagging: std::collections::VecDeque<SampleBatch> = Default::default();
        for tick in 1..=TICKS + LAG_TICKS {
            let mut due = if tick <= TICKS {
                fleet.tick(T0 + tick * TICK_MS)
            } else {
                Vec::new()
            };
            lagging.extend(due.extract_if(.., |b| b.node == "node-000"));
            if tick > LAG_TICKS {
                due.extend(lagging.pop_front());
            }
            // One tick's batches (one per node) in flight together; each node's stay in order.
            let mut sends = tokio::task::JoinSet::new();
            for batch in due {
                let publisher = publisher.clone();
                sends.spawn(async move { publisher.publish(&batch).await.expect("published") });
            }
            sends.join_all().await;
            // Paced to last about as long as the kills below, so that they land while input
            // still arrives.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert!(lagging.is_empty(), "every lagging batch published");
        // A clock far enough ahead to close every billing window of the run.
        let end = T0 + TICKS * TICK_MS;
        let clock = SampleBatch {
            node: "clock".into(),
            agent_id: "clock".into(),
            sequence: 1,
            collected_at_ms: end + 20 * 60_000,
            agent_version: "test".into(),
            samples: vec![],
        };
        publisher.publish(&clock).await.expect("published");
        (
            crate::common::gpu_truth(&fleet),
            crate::common::reserved_truth(&fleet),
        )
    });

    // Kill the processor at random points while the fleet publishes, alternating one and two
    // workers so partitions change hands between runs.
    // A kill lands mid-work when, in its life, the process consumed input (it restored its
    // state and changed it) and the fleet was still publishing (more input, outputs and
    // checkpoints in flight); its metrics say what it consumed, read just before the kill.
    let mut rng: u64 = 0x5eed;
    let mut mid_work = 0;
    // Totals of closed windows taken out of the dataflow, and brought back by a late change
    // (node-000 lags the fleet by more than the lateness), summed over the runs.
    let (mut retired, mut revived) = (0.0, 0.0);
    // The kinds of state the processor said it held (`meterflow_processor_state_entries`).
    let mut held: BTreeSet<String> = BTreeSet::new();
    for kill in 0..KILLS {
        let metrics = crate::common::free_addr();
        let metrics_flag = metrics.to_string();
        let mut child = start_processor_with(
            &brokers,
            state.path(),
            1 + kill % 2,
            &["--metrics-listen", &metrics_flag],
        );
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let lifetime = Duration::from_millis(1_500 + (rng >> 33) % 2_500);
        tokio::time::sleep(lifetime).await;
        let read = tokio::task::spawn_blocking(move || {
            crate::common::http_get(metrics, "/metrics").map(|(_, body)| {
                let value = |series| crate::common::metric_value(&body, series);
                // The kinds of state the workers said they held some of.
                let held: BTreeSet<String> = body
                    .lines()
                    .filter_map(|l| l.strip_prefix("meterflow_processor_state_entries{"))
                    .filter_map(|l| l.split_once("} "))
                    .filter(|(_, v)| v.trim().parse::<f64>().is_ok_and(|v| v > 0.0))
                    .filter_map(|(labels, _)| labels.split("kind=\"").nth(1))
                    .filter_map(|k| k.split('"').next().map(String::from))
                    .collect();
                (
                    value("meterflow_processor_input_messages_total"),
                    value("meterflow_processor_totals_retired_total").unwrap_or(0.0),
                    value("meterflow_processor_totals_revived_total").unwrap_or(0.0),
                    held,
                )
            })
        })
        .await
        .expect("metrics read");
        let consumed = read.as_ref().and_then(|r| r.0);
        if let Some((_, r, v, kinds)) = read {
            retired += r;
            revived += v;
            held.extend(kinds);
        }
        let publishing = !publisher.is_finished();
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        if consumed.is_some_and(|n| n > 0.0) && publishing {
            mid_work += 1;
        }
    }
    println!("{mid_work} of {KILLS} kills landed mid-work");
    for kind in [
        "allocation_series",
        "reading_series",
        "node_hours",
        "gpu_pieces",
        "open_totals",
        "names",
    ] {
        assert!(
            held.contains(kind),
            "the processor's /metrics says how much {kind} it holds (saw {held:?})"
        );
    }
    assert!(
        mid_work * 2 > KILLS,
        "most kills must land mid-work, {mid_work} of {KILLS} did"
    );
    let (truth, reserved_truth) = publisher.await.expect("publisher task");
    assert!(
        truth.len() > 10 && truth.values().all(|ms| *ms > 0),
        "the scenario bills several leases"
    );

    // The last run finishes the stream.
    let mut child = start_processor(&brokers, state.path(), 2);
    let (gpu_ms, found) = billed_within(&brokers, &truth, Duration::from_secs(60)).await;
    // Usage goes out through a producer of its own: its last records may land after the
    // billing records that matched.
    let usage = used_within(&brokers, &truth, Duration::from_secs(20)).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    for (k, t) in &truth {
        let used = usage.get("").and_then(|m| m.get(k)).copied().unwrap_or(0);
        let billed = gpu_ms.get(k).copied().unwrap_or(0);
        if used != *t || billed != *t {
            eprintln!("{k:?}: truth {t} ms, used {used}, billed {billed}");
        }
    }
    broker.stop();

    // Closed windows left the dataflow as the runs went, and the lagging node's late samples
    // brought some back; billing (below) stays exact through it.
    println!("{retired} totals retired, {revived} brought back, over the runs");
    assert!(
        retired > 0.0 && revived > 0.0,
        "closed windows left the dataflow ({retired}) and late changes brought some back ({revived})"
    );
    // Usage as the sinks keep it (the last record per id), in base windows and rolled up to
    // hours, equals the truth too: no checkpoint covered input whose records any worker had
    // not had acknowledged, so no kill lost one (a restart does not send the state it restores).
    for level in ["", "hour"] {
        assert_eq!(
            usage.get(level),
            Some(&truth),
            "GPU-ms per tenant, lease, class and MIG profile on the usage topic, over the {level:?} windows, equal the ground truth"
        );
    }

    let records: Vec<&BillingRecord> = found.iter().map(|(_, _, r)| r).collect();
    let adjustments = records.iter().filter(|r| r.revision > 0).count();
    println!(
        "{} billing records ({adjustments} adjustments) after {KILLS} kills",
        records.len()
    );
    let mut seen: BTreeMap<&str, &Found> = BTreeMap::new();
    for f in &found {
        if let Some(first) = seen.insert(f.2.id.as_str(), f) {
            eprintln!("duplicate id:\n  {first:?}\n  {f:?}");
        }
    }
    let ids: BTreeSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids.len(),
        records.len(),
        "every billing record id exactly once"
    );
    let mut revisions: BTreeMap<BillingKey, Vec<i64>> = BTreeMap::new();
    for r in &records {
        let key = BillingKey::from_record(r).expect("a known item");
        revisions.entry(key).or_default().push(r.revision);
        assert_eq!(
            r.kind == BillingKind::Charge,
            r.revision == 0,
            "revision 0 is the charge"
        );
    }
    for (key, mut revs) in revisions {
        revs.sort();
        let expected: Vec<i64> = (0..revs.len() as i64).collect();
        assert_eq!(revs, expected, "revisions of {key:?} without gap or repeat");
    }
    for (k, want) in &truth {
        let got = gpu_ms.get(k).copied().unwrap_or(0);
        if got != *want {
            eprintln!("{k:?}: billed {got} ms, truth {want} ms");
        }
    }
    for k in gpu_ms.keys().filter(|k| !truth.contains_key(*k)) {
        eprintln!("{k:?}: billed {} ms, not in the truth", gpu_ms[k]);
    }
    assert_eq!(
        gpu_ms, truth,
        "billed GPU-ms per tenant, lease, class and MIG profile equal the ground truth"
    );
    // Reserved cores and memory: each run's requests over its interval, to the millicore-ms
    // and the byte-second.
    let mut reserved = crate::common::ReservedTruth::new();
    for r in &records {
        let item = match r.item.as_str() {
            "cpu_reserved" => "cpu_reserved",
            "memory_reserved" => "memory_reserved",
            _ => continue,
        };
        *reserved
            .entry((r.tenant.clone(), r.lease.clone(), item))
            .or_default() += r.quantity;
    }
    reserved.retain(|_, v| *v != 0);
    assert_eq!(
        reserved.len(),
        2 * truth.keys().map(|k| &k.1).collect::<BTreeSet<_>>().len()
    );
    assert_eq!(
        reserved, reserved_truth,
        "billed reserved cores and memory per tenant and lease equal the ground truth"
    );
    // Costs add up to the cost of each key's total: no rounding drift across adjustments.
    let prices = PriceBook::default();
    let mut totals: BTreeMap<BillingKey, (i64, i64)> = BTreeMap::new();
    for r in &records {
        let t = totals
            .entry(BillingKey::from_record(r).expect("known"))
            .or_default();
        t.0 += r.quantity;
        t.1 += r.cost_micros;
    }
    for (key, (quantity, cost)) in totals {
        assert_eq!(cost, prices.cost_micros(&key, quantity), "cost of {key:?}");
    }
}

/// Brokers that do not answer do not stop the sink: it keeps serving what it has, says it is
/// not ready, counts the failures, and stops cleanly when told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_whose_brokers_do_not_answer_waits_not_ready_and_stops_cleanly() {
    // A port nothing listens on.
    let port = crate::common::free_addr().port();
    let data = tempfile::tempdir().expect("temp dir");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sink = meterflow_sink::start(
        crate::common::sink_config(format!("127.0.0.1:{port}"), &data, Default::default()),
        shutdown.clone(),
    )
    .await
    .expect("the sink starts without brokers");
    let url = |path: &str| format!("http://{}{path}", sink.addr);
    // Longer than one metadata request's timeout (5 s): the first failure is behind us.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = crate::common::get_text(&url("/metrics")).await;
        if metrics.contains("meterflow_sink_errors_total{reason=\"kafka\"}") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Kafka error counted: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        !sink.task.is_finished(),
        "the sink stopped on a broker failure"
    );
    let (health, _) = crate::common::get_as(&url("/healthz"), "").await;
    let (ready, _) = crate::common::get_as(&url("/readyz"), "").await;
    assert_eq!((health, ready), (200, 503));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), sink.task)
        .await
        .expect("stops in time")
        .expect("sink task")
        .expect("a clean stop");
}

/// The agent killed with SIGKILL again and again while it publishes, then stopped with SIGTERM:
/// every batch it made is either in `meterflow.samples` or still in its spool, its sequence
/// numbers run 1, 2, 3, … per agent without a gap across all the restarts, and a sequence that
/// appears twice is the same batch sent again (acknowledged, then killed before the spool
/// forgot it), never a new batch reusing an old number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_again_and_again_loses_nothing_and_never_reuses_a_sequence() {
    let (broker, brokers) = broker_with_topics().await;
    let spool = tempfile::tempdir().expect("spool dir");
    let (spool_dir, agent_brokers) = (spool.path().to_path_buf(), brokers.clone());
    let run = move |ms: u64, extra: &[String]| {
        let agent = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args([
                "agent",
                "--brokers",
                &agent_brokers,
                "--nodes",
                "2",
                "--interval",
                "50ms",
            ])
            .arg("--spool-dir")
            .arg(&spool_dir)
            .args(extra)
            .env("MF_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the meterflow binary starts");
        std::thread::sleep(Duration::from_millis(ms));
        agent
    };
    // The last run serves its metrics and health.
    let port = crate::common::free_addr().port();
    let runtime = tokio::runtime::Handle::current();
    let rounds = tokio::task::spawn_blocking({
        move || {
            for round in 0..4u64 {
                let mut agent = run(1_200 + 170 * round, &[]);
                agent.kill().expect("SIGKILL");
                agent.wait().expect("reaped");
            }
            // Last, a clean stop.
            let listen = format!("127.0.0.1:{port}");
            let agent = run(1_500, &["--metrics-listen".into(), listen.clone()]);
            let (health, metrics) = runtime.block_on(async {
                let base = format!("http://{listen}");
                (
                    crate::common::get_text(&format!("{base}/healthz")).await,
                    crate::common::get_text(&format!("{base}/metrics")).await,
                )
            });
            let health: serde_json::Value = serde_json::from_str(&health).expect("health is JSON");
            assert_eq!(health["sources"]["simulator"], "up", "{health}");
            assert!(health["spool_batches"].is_u64(), "{health}");
            assert!(
                health["send_lag_seconds"].as_f64().is_some_and(|s| s < 5.0),
                "{health}"
            );
            let sent = crate::common::metric_value(&metrics, "meterflow_agent_batches_sent_total");
            assert!(sent.is_some_and(|n| n > 0.0), "{metrics}");
            assert!(metrics.contains("meterflow_agent_spool_bytes"), "{metrics}");
            crate::common::terminate(&agent);
            agent
        }
    });
    let mut last = rounds.await.expect("rounds");
    let status = last.wait().expect("the agent exits");
    assert!(status.success(), "a SIGTERM is a clean stop: {status}");

    let (seen, in_spool) = sequences_in_topic_and_spool(&brokers, spool.path());
    for (agent, sequences) in &seen {
        assert!(
            sequences.len() >= 10,
            "{agent}: only {} batches",
            sequences.len()
        );
    }
    println!("batches in the spool at the end: {in_spool}");
    broker.stop();
}

/// Every batch agents made, by agent and sequence, with the time it was collected at: what
/// `meterflow.samples` has and what the spool still holds (emptied here). Checks that each
/// agent's sequences run 1, 2, 3, … without a gap (no batch lost) and that a sequence seen
/// twice is the same batch sent again, never a new batch reusing a number.
pub(crate) fn sequences_in_topic_and_spool(
    brokers: &str,
    spool: &Path,
) -> (BTreeMap<String, BTreeMap<i64, Vec<i64>>>, usize) {
    let mut seen: BTreeMap<String, BTreeMap<i64, Vec<i64>>> = BTreeMap::new();
    for payload in crate::common::read_topic(brokers, names::SAMPLES, PARTITIONS, 1) {
        let b = SampleBatch::decode(&payload).expect("a batch");
        seen.entry(b.agent_id)
            .or_default()
            .entry(b.sequence)
            .or_default()
            .push(b.collected_at_ms);
    }
    let mut held = meterflow_ingest::spool::Spool::open(spool, u64::MAX).expect("spool");
    let mut in_spool = 0;
    while let Some((position, b)) = held.front().expect("reads") {
        seen.entry(b.agent_id)
            .or_default()
            .entry(b.sequence)
            .or_default()
            .push(b.collected_at_ms);
        held.remove(position).expect("removes");
        in_spool += 1;
    }
    assert_eq!(seen.len(), 2, "two agents: {:?}", seen.keys());
    for (agent, sequences) in &seen {
        let numbers: Vec<i64> = sequences.keys().copied().collect();
        let expected: Vec<i64> = (1..=numbers.len() as i64).collect();
        assert_eq!(
            numbers, expected,
            "{agent}: a gap (a lost batch) or not from 1"
        );
        // Had a restart begun again at 1, its batch 1 would sit beside the first run's batch
        // 1 with another time: each sequence names one batch.
        for (sequence, made_at) in sequences {
            assert!(
                made_at.iter().all(|t| *t == made_at[0]),
                "{agent} sequence {sequence} names different batches: {made_at:?}"
            );
        }
    }
    (seen, in_spool)
}

/// The embedded broker (SQLite storage, its own process) killed with SIGKILL while an agent
/// publishes, then started again on the same file and port: the agent keeps collecting into
/// its spool while the broker is away and replays in order on reconnect, so every sequence
/// number of every agent is in `meterflow.samples` (or, for the last tick at the stop, in
/// the spool) — none lost, none sent twice with different content. A batch the killed broker
/// stored without acknowledging is sent again: the processor deduplicates by sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_mid_stream_loses_no_batch() {
    let dir = tempfile::tempdir().expect("broker dir");
    let spool = tempfile::tempdir().expect("spool dir");
    let addr = crate::common::free_addr().to_string();
    let bin = env!("CARGO_BIN_EXE_meterflow");
    // tansu resolves `sqlite://FILE` against its working directory.
    let (broker_dir, broker_addr) = (dir.path().to_path_buf(), addr.clone());
    let start_broker = move || {
        let child = std::process::Command::new(bin)
            .args([
                "broker",
                "--listen",
                &broker_addr,
                "--storage",
                "sqlite://broker.db",
            ])
            .args(["--partitions", &PARTITIONS.to_string()])
            .current_dir(&broker_dir)
            .env("MF_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the meterflow binary starts");
        let child = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&broker_addr).is_err() {
            assert!(Instant::now() < deadline, "the broker did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    };
    let brokers = addr.clone();
    let spool_dir = spool.path().to_path_buf();
    let metrics = crate::common::free_addr().to_string();
    let broker = tokio::task::spawn_blocking(move || {
        let mut broker = start_broker();
        let mut agent = std::process::Command::new(bin)
            .args([
                "agent",
                "--brokers",
                &brokers,
                "--nodes",
                "2",
                "--interval",
                "50ms",
            ])
            .args(["--metrics-listen", &metrics])
            .args(["--partitions", &PARTITIONS.to_string()])
            .arg("--spool-dir")
            .arg(&spool_dir)
            .env("MF_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the agent starts");
        std::thread::sleep(Duration::from_millis(2_500));
        broker.0.kill().expect("SIGKILL the broker");
        broker.0.wait().expect("reaped");
        // Away for a while: the agent's ticks go on into the spool.
        std::thread::sleep(Duration::from_millis(2_000));
        let broker = start_broker();
        let restarted = Instant::now();
        // Caught up: the spool holds at most the last tick's batches.
        let health = || {
            let mut stream = std::net::TcpStream::connect(&metrics).ok()?;
            std::io::Write::write_all(
                &mut stream,
                b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
            .ok()?;
            let mut answer = String::new();
            std::io::Read::read_to_string(&mut stream, &mut answer).ok()?;
            let body = answer.split_once("\r\n\r\n")?.1;
            serde_json::from_str::<serde_json::Value>(body).ok()
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let held = health().and_then(|h| h["spool_batches"].as_u64());
            if held.is_some_and(|n| n <= 2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not catch up 90 s after the broker came back: {:?}",
                health()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "caught up {:?} after the broker came back",
            restarted.elapsed()
        );
        crate::common::terminate(&agent);
        assert!(agent.wait().expect("the agent exits").success());
        broker
    })
    .await
    .expect("rounds");
    let (seen, in_spool) = sequences_in_topic_and_spool(&addr, spool.path());
    for (agent, sequences) in &seen {
        // A tick every 50 ms for more than 4.5 s, 2 s of them with the broker away.
        assert!(
            sequences.len() >= 60,
            "{agent}: only {} batches",
            sequences.len()
        );
        let twice: Vec<&i64> = sequences
            .iter()
            .filter(|(_, copies)| copies.len() > 1)
            .map(|(s, _)| s)
            .collect();
        println!(
            "{agent}: {} batches, {} sent twice (acknowledged by the killed broker or not: the processor deduplicates by sequence)",
            sequences.len(),
            twice.len()
        );
    }
    // Caught up (the wait above saw the spool drained): what is left is only what the last
    // ticks before the stop made, far less than the 2 s outage's ~80 batches.
    assert!(in_spool < 20, "{in_spool} batches still in the spool");
    drop(broker);
}

/// A loopback proxy between the broker and everything else (the broker advertises the proxy,
/// so every connection goes through it) cuts all connections three times for 1.5 s while an
/// agent (two simulated nodes, every 100 ms) and a processor (restarted whenever it exits)
/// run. Afterwards: every batch of each agent is in the topic, none lost; no billing record id
/// is there twice; and the processor's outputs equal those of a processor that read the same
/// samples without a fault (a second broker, the topic copied) — the final value of every
/// usage record and the net billed quantity per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_and_restored_lose_and_duplicate_nothing() {
    let front = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port for the proxy");
    let front_addr = front.local_addr().expect("addr");
    let broker = broker::start_behind(
        broker::BrokerConfig {
            listen: "127.0.0.1:0".parse().expect("literal"),
            storage: "memory".into(),
        },
        Some(front_addr),
    )
    .await
    .expect("embedded broker starts");
    let proxy = crate::common::Proxy::start(front, broker.addr);
    let brokers = proxy.addr.to_string();
    crate::common::ensure_topics(&brokers, PARTITIONS).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let metrics = crate::common::free_addr();
    // Seconds-long windows, so that billing windows close within the run.
    let processing = [
        "--window",
        "1s",
        "--billing-window",
        "2s",
        "--lateness",
        "1s",
        "--max-staleness",
        "1s",
        "--rollups",
        "none",
        "--partitions",
        "4",
    ];
    let agent = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args([
                "agent",
                "--brokers",
                &brokers,
                "--nodes",
                "2",
                "--seed",
                "5",
            ])
            .args(["--interval", "100ms", "--partitions", "4", "--spool-dir"])
            .arg(&spool)
            .args(["--metrics-listen", &metrics.to_string()])
            .env("MF_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("agent starts"),
    );
    // The processor, started again whenever it stops (as its StatefulSet would).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let state = dir.path().join("state");
    let supervisor = std::thread::spawn({
        let (stop, brokers, state) = (stop.clone(), brokers.clone(), state.clone());
        move || {
            let mut restarts = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut child = KillOnDrop(spawn_processor(&brokers, &state, &processing));
                loop {
                    if let Some(status) = child.0.try_wait().expect("status") {
                        assert!(
                            status.code().is_some(),
                            "the processor died of a signal: {status}"
                        );
                        restarts += 1;
                        break;
                    }
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        crate::common::terminate(&child.0);
                        let status = child.0.wait().expect("processor exits");
                        assert!(status.success(), "a SIGTERM is a clean stop: {status}");
                        return restarts;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            restarts
        }
    });

    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        proxy.restore();
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // The agent's spool drains once the broker is reachable again; then it stops.
    let health = format!("http://{metrics}/healthz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = crate::common::get_text(&health).await;
        let h: serde_json::Value = serde_json::from_str(&text).expect("health is JSON");
        if h["spool_batches"].as_u64() == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the spool never drained: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::common::terminate(&agent.0);
    let mut agent = agent;
    assert!(agent.0.wait().expect("agent exits").success());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let restarts = tokio::task::spawn_blocking(move || supervisor.join().expect("supervisor"))
        .await
        .expect("joined");
    println!("processor restarts during the cuts: {restarts}");

    let (samples, billing) = tokio::task::spawn_blocking({
        let brokers = brokers.clone();
        move || {
            // What the agent's last batches made: read to the end by a processor on the same
            // state.
            let mut last = spawn_processor(
                &brokers,
                &state,
                &[&processing[..], &["--exit-when-caught-up"]].concat(),
            );
            assert!(last.wait().expect("exits").success());
            (
                read_topic_at(&brokers, names::SAMPLES, PARTITIONS, 1),
                read_topic_at(&brokers, names::BILLING, PARTITIONS, 1),
            )
        }
    })
    .await
    .expect("read");
    // Batches made after the spool was seen empty and before the stop wait in the spool for
    // the next start: not lost, and not in the topic for either processor.
    let (seen, in_spool) = sequences_in_topic_and_spool(&brokers, &spool);
    assert!(in_spool < 10, "{in_spool} batches left in the spool");
    assert!(seen.values().all(|s| s.len() >= 50), "{:?}", seen.keys());
    let mut ids = BTreeSet::new();
    for (_, _, bytes) in &billing {
        let r = BillingRecord::decode(bytes).expect("a billing record");
        assert!(ids.insert(r.id.clone()), "billing record {} twice", r.id);
    }
    assert!(!ids.is_empty(), "billing windows closed during the run");

    // The same samples, without a fault.
    let clean = crate::common::memory_broker().await;
    crate::common::ensure_topics(&clean.bootstrap(), PARTITIONS).await;
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", clean.bootstrap())
        .create()
        .expect("producer");
    for (partition, _, bytes) in &samples {
        producer
            .send(
                rdkafka::producer::FutureRecord::<(), _>::to(names::SAMPLES)
                    .partition(*partition)
                    .payload(bytes),
                Duration::from_secs(10),
            )
            .await
            .expect("copied");
    }
    let clean_brokers = clean.bootstrap();
    let status = tokio::task::spawn_blocking(move || {
        let clean_state = tempfile::tempdir().expect("tempdir");
        spawn_processor(
            &clean_brokers,
            clean_state.path(),
            &[&processing[..], &["--exit-when-caught-up"]].concat(),
        )
        .wait()
        .expect("exits")
    })
    .await
    .expect("joined");
    assert!(status.success());
    let (faulty, clean_outputs) = tokio::task::spawn_blocking({
        let (brokers, clean_brokers) = (brokers.clone(), clean.bootstrap());
        move || {
            (
                crate::cluster::outputs(&brokers, PARTITIONS),
                crate::cluster::outputs(&clean_brokers, PARTITIONS),
            )
        }
    })
    .await
    .expect("read");
    assert!(faulty.0.len() > 100, "{} usage records", faulty.0.len());
    assert_eq!(
        faulty.0, clean_outputs.0,
        "the same final usage per record id"
    );
    assert_eq!(
        faulty.1, clean_outputs.1,
        "the same net billed quantity per key"
    );
    drop(proxy);
    broker.stop();
    clean.stop();
}

/// The sink SIGKILLed six times while it builds its views from a usage topic of 7,500 records
/// (each time its stored offsets pass another seventh), then started once more: it serves every tenant's usage (per lease,
/// per minute) exactly as a sink that was never killed serves it. Its offsets are stored in the
/// same RocksDB write as the data, so an update is applied once or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_killed_again_and_again_serves_what_an_unkilled_one_serves() {
    let (broker, _) = crate::cluster::broker_with_fleet().await;
    let brokers = broker.bootstrap();
    let dir = tempfile::tempdir().expect("tempdir");
    crate::cluster::wait_all(vec![crate::cluster::processor(
        &brokers,
        &dir.path().join("state"),
        &[],
    )]);
    let usage = read_topic_at(&brokers, names::USAGE, PARTITIONS, 1);
    let tenants: BTreeSet<String> = usage
        .iter()
        .map(|(_, _, b)| {
            meterflow_schemas::UsageUpdate::decode(b)
                .expect("usage")
                .tenant
        })
        .filter(|t| !t.is_empty())
        .collect();
    assert!(
        usage.len() > 1_000 && !tenants.is_empty(),
        "{} records",
        usage.len()
    );

    let secret = dir.path().join("jwt-secret");
    std::fs::write(&secret, crate::common::SECRET).expect("secret");
    let sink = |data: &Path, port: u16| {
        KillOnDrop(
            std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
                .args(["sink", "--brokers", &brokers, "--partitions", "4"])
                .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
                .arg(data)
                .arg("--jwt-secret-file")
                .arg(&secret)
                .env("MF_LOG", "error")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("sink starts"),
        )
    };
    let killed_data = dir.path().join("killed");
    // Each start is killed once its views pass another seventh of the records, so the kills
    // land while it applies (a restart goes on from what the last one stored).
    let stored_by = |port: u16| async move {
        let status = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/v1/status"))
            .bearer_auth(crate::common::token(""))
            .send()
            .await;
        match status {
            Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default()["consumed_offsets"]
                [names::USAGE]
                .as_object()
                .map_or(0, |o| o.values().filter_map(|v| v.as_i64()).sum::<i64>()),
            Err(_) => 0,
        }
    };
    let total = usage.len() as i64;
    let mut mid_way = 0;
    for k in 1..=6 {
        let port = crate::common::free_addr().port();
        let mut s = sink(&killed_data, port);
        let deadline = Instant::now() + Duration::from_secs(60);
        let stored = loop {
            let stored = stored_by(port).await;
            if stored >= total * k / 7 {
                break stored;
            }
            assert!(
                Instant::now() < deadline,
                "the sink stored {stored} records"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        s.0.kill().expect("SIGKILL");
        s.0.wait().expect("reaped");
        println!("killed with {stored} of {total} records stored");
        mid_way += usize::from(stored < total);
    }
    assert!(mid_way >= 3, "only {mid_way} kills landed before the end");
    let (killed_port, clean_port) = (
        crate::common::free_addr().port(),
        crate::common::free_addr().port(),
    );
    let _killed = sink(&killed_data, killed_port);
    let _clean = sink(&dir.path().join("clean"), clean_port);

    let operator = crate::common::token("");
    let answer = |port: u16, tenant: &str| {
        let url = format!(
            "http://127.0.0.1:{port}/v1/tenants/{tenant}/usage?from=2026-01-01T00:00:00Z&to=2026-01-01T01:00:00Z&window=minute&group_by=lease"
        );
        let operator = operator.clone();
        async move { crate::common::get_as(&url, &operator).await }
    };
    // Both have stored every record once their next offsets reach the topic's ends.
    let mut ends: BTreeMap<String, i64> = BTreeMap::new();
    for (partition, offset, _) in &usage {
        let end = ends.entry(partition.to_string()).or_insert(0);
        *end = (*end).max(offset + 1);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for port in [killed_port, clean_port] {
        let url = format!("http://127.0.0.1:{port}/v1/status");
        loop {
            let answer = reqwest::Client::new()
                .get(&url)
                .bearer_auth(&operator)
                .send()
                .await;
            let status: serde_json::Value = match answer {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => serde_json::Value::Null, // not listening yet
            };
            let stored = &status["consumed_offsets"][names::USAGE];
            if ends.iter().all(|(p, end)| stored[p].as_i64() == Some(*end)) {
                break;
            }
            assert!(Instant::now() < deadline, "not caught up: {status}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for tenant in &tenants {
        let (a, b) = (
            answer(killed_port, tenant).await,
            answer(clean_port, tenant).await,
        );
        assert_eq!(a.0, 200, "{}", a.1);
        assert!(a.1.contains("gpu_seconds"), "{}", a.1);
        assert_eq!(a, b, "{tenant}: the killed sink and the clean one differ");
    }
    broker.stop();
}
