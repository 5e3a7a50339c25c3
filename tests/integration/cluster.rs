//! Two processor processes on loopback (a timely cluster: `-n 2 -p 0/1 --hostfile`) give the
//! same results as one process: the same final value for every usage record id, the same net
//! billed quantity per billing key, and GPU time equal to the fleet's ground truth.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use meterflow::broker::EmbeddedBroker;
use meterflow_schemas::{BillingRecord, Record, UsageUpdate, topics as names};

use crate::common::{read_topic_at, spawn_processor};

const TICKS: i64 = 80;
const PARTITIONS: i32 = 4;

pub async fn broker_with_fleet() -> (
    EmbeddedBroker,
    BTreeMap<(String, String, String, String), i64>,
) {
    let broker = crate::common::memory_broker().await;
    crate::common::ensure_topics(&broker.bootstrap(), PARTITIONS).await;
    let truth =
        crate::common::publish_fleet(&broker.bootstrap(), 8, 11, TICKS, Duration::ZERO, false)
            .await;
    (broker, truth)
}

pub fn processor(brokers: &str, state: &Path, extra: &[String]) -> Child {
    let mut flags: Vec<String> = [
        "--billing-window",
        "5m",
        "--lateness",
        "1m",
        "--exit-when-caught-up",
        "--partitions",
    ]
    .map(String::from)
    .to_vec();
    flags.push(PARTITIONS.to_string());
    flags.extend_from_slice(extra);
    spawn_processor(brokers, state, &flags)
}

/// Waits for every child to exit successfully.
pub fn wait_all(mut children: Vec<Child>) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !children.is_empty() {
        assert!(
            Instant::now() < deadline,
            "processors still running after 180 s"
        );
        children.retain_mut(|c| match c.try_wait().expect("child status") {
            Some(status) => {
                assert!(status.success(), "a processor failed: {status}");
                false
            }
            None => true,
        });
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The final value of every usage record id, and the net billed quantity per billing key.
#[allow(clippy::type_complexity)]
pub fn outputs(
    brokers: &str,
    partitions: i32,
) -> (
    BTreeMap<String, (i64, i64, i64)>,
    BTreeMap<(String, String, String, i64), i64>,
) {
    let mut usage = BTreeMap::new();
    // Records of one id are on one partition, in order.
    for (_, _, bytes) in read_topic_at(brokers, names::USAGE, partitions, 1) {
        let u = UsageUpdate::decode(&bytes).expect("usage updates decode");
        usage.insert(u.id, (u.amount, u.coverage_ms, u.present_ms));
    }
    let mut billed = BTreeMap::new();
    // Read once the processors are done: what is there is all there will be (maybe nothing).
    for (_, _, bytes) in read_topic_at(brokers, names::BILLING, partitions, 0) {
        let r = BillingRecord::decode(&bytes).expect("billing records decode");
        *billed
            .entry((r.tenant, r.lease, r.item, r.window_start_ms))
            .or_insert(0) += r.quantity;
    }
    billed.retain(|_, q| *q != 0);
    (usage, billed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_give_the_same_results_as_one() {
    let (one, truth) = broker_with_fleet().await;
    let (two, truth_again) = broker_with_fleet().await;
    assert_eq!(truth, truth_again, "the simulated fleet is deterministic");

    let dir = tempfile::tempdir().expect("temp dir");
    // One process, two workers.
    wait_all(vec![processor(
        &one.bootstrap(),
        &dir.path().join("single"),
        &["-w".into(), "2".into()],
    )]);
    // Two processes of one worker each: the same four partitions, spread over the cluster.
    let hostfile = dir.path().join("hosts");
    std::fs::write(
        &hostfile,
        format!(
            "127.0.0.1:{}\n127.0.0.1:{}\n",
            crate::common::free_addr().port(),
            crate::common::free_addr().port()
        ),
    )
    .expect("host file");
    let cluster: Vec<Child> = (0..2)
        .map(|p| {
            processor(
                &two.bootstrap(),
                &dir.path().join(format!("process-{p}")),
                &[
                    "-w".into(),
                    "1".into(),
                    "-n".into(),
                    "2".into(),
                    "-p".into(),
                    p.to_string(),
                    "--hostfile".into(),
                    hostfile.display().to_string(),
                ],
            )
        })
        .collect();
    wait_all(cluster);

    let (usage_one, billed_one) = outputs(&one.bootstrap(), PARTITIONS);
    let (usage_two, billed_two) = outputs(&two.bootstrap(), PARTITIONS);
    assert!(usage_one.len() > 100, "{} usage records", usage_one.len());
    assert!(!billed_one.is_empty(), "closed windows were billed");
    for (id, value) in &usage_one {
        if usage_two.get(id) != Some(value) {
            eprintln!(
                "{id}: {value:?} in one process, {:?} in two",
                usage_two.get(id)
            );
        }
    }
    for id in usage_two.keys().filter(|id| !usage_one.contains_key(*id)) {
        eprintln!("{id}: only in two processes, {:?}", usage_two[id]);
    }
    assert_eq!(usage_one, usage_two, "the same final usage per record id");
    assert_eq!(
        billed_one, billed_two,
        "the same net billed quantity per key"
    );

    // And both are the truth: GPU time per (tenant, lease, class, MIG profile), from the
    // last value of each usage record.
    let mut latest: BTreeMap<String, UsageUpdate> = BTreeMap::new();
    for (_, _, bytes) in read_topic_at(&two.bootstrap(), names::USAGE, PARTITIONS, 1) {
        let u = UsageUpdate::decode(&bytes).expect("usage updates decode");
        // Base windows only: the roll-ups hold the same time again.
        if u.metric == "gpu_seconds" && u.resolution.is_empty() {
            latest.insert(u.id.clone(), u);
        }
    }
    let mut gpu_ms: BTreeMap<(String, String, String, String), i64> = BTreeMap::new();
    for u in latest.into_values() {
        *gpu_ms
            .entry((u.tenant, u.lease, u.gpu_class, u.mig_profile))
            .or_insert(0) += u.amount;
    }
    gpu_ms.retain(|_, ms| *ms != 0);
    assert_eq!(gpu_ms, truth, "GPU-ms equal the fleet's ground truth");
    one.stop();
    two.stop();
}

/// `meterflow replay` rebuilds the processor's state from the samples topic into a new
/// directory: it reads every message the topic held, bills nothing twice (the billing topic
/// is unchanged), leaves every usage record's final value as it was, and the processor then
/// continues from the state it built. Partial replays start at the given offsets; a directory
/// that holds state is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_rebuilds_state_without_billing_twice() {
    let (broker, _) = broker_with_fleet().await;
    let brokers = broker.bootstrap();
    let dir = tempfile::tempdir().expect("temp dir");
    wait_all(vec![processor(&brokers, &dir.path().join("live"), &[])]);
    let (usage, billed) = outputs(&brokers, PARTITIONS);
    let billing_records = read_topic_at(&brokers, names::BILLING, PARTITIONS, 1).len();
    let samples = read_topic_at(&brokers, names::SAMPLES, PARTITIONS, 1);
    assert!(billing_records > 0 && !samples.is_empty());

    let replay = |state: &Path, from: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args(["replay", "--brokers", &brokers, "--billing-window", "5m"])
            .args(["--lateness", "1m", "--partitions", &PARTITIONS.to_string()])
            .args(["--from", from, "--state-dir"])
            .arg(state)
            .env("MF_LOG", "warn")
            .output()
            .expect("meterflow replay runs")
    };
    let rebuilt = dir.path().join("rebuilt");
    let out = replay(&rebuilt, "beginning");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = samples.len();
    assert!(
        stdout.contains(&format!(
            "replayed {n} messages from {PARTITIONS} partition(s)"
        )),
        "{stdout}"
    );
    let (usage_after, billed_after) = outputs(&brokers, PARTITIONS);
    assert_eq!(usage_after, usage, "the same final usage per record id");
    assert_eq!(billed_after, billed, "the same net billed quantity");
    assert_eq!(
        read_topic_at(&brokers, names::BILLING, PARTITIONS, 1).len(),
        billing_records,
        "nothing billed twice"
    );
    // The processor continues from the rebuilt state: caught up at once, nothing new.
    wait_all(vec![processor(&brokers, &rebuilt, &[])]);
    assert_eq!(
        read_topic_at(&brokers, names::BILLING, PARTITIONS, 1).len(),
        billing_records
    );

    // From offsets: partition 0 from its 10th message, the others from their beginning.
    let on_0 = samples.iter().filter(|(p, _, _)| *p == 0).count();
    assert!(on_0 > 10, "{on_0} messages on partition 0");
    let out = replay(&dir.path().join("partial"), "0:10");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let m = n - 10;
    assert!(
        stdout.contains(&format!("replayed {m} messages")),
        "{stdout}"
    );

    // A directory that holds state is refused, saying what to do instead.
    let out = replay(&rebuilt, "beginning");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is not empty") && stderr.contains("meterflow processor --state-dir"),
        "{stderr}"
    );
    let out = replay(&dir.path().join("other"), "9:0");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("partition 9 is not a partition"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    broker.stop();
}
