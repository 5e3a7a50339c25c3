//! Backpressure: a broker that stops answering, a processor and a sink that stop consuming
//! (each frozen with SIGSTOP, the slowest a peer can be: connections open, nothing read or
//! answered, then SIGCONT). Upstream absorbs the difference — the agent in its spool up to
//! its limit, the broker in its topics — with memory that stays flat, and once the stalled
//! part moves again it catches up to the exact totals.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meterflow_schemas::{Record, SampleBatch, topics as names};

use crate::common::{KillOnDrop, spawn_processor};
use crate::crash::PARTITIONS;

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// Sends `signal` (`STOP`, `CONT`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "SIG{signal} to {pid}");
}

/// How many records `topic` holds, as the broker says.
fn log_end(brokers: &str, topic: &str) -> i64 {
    let client: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("client");
    crate::common::log_end(&client, topic, PARTITIONS)
}

/// The agent's health answer (JSON) from `GET /healthz` on `addr`.
fn agent_health(addr: std::net::SocketAddr) -> Option<serde_json::Value> {
    let (_, body) = crate::common::http_get(addr, "/healthz")?;
    serde_json::from_str(&body).ok()
}

const MIB: u64 = 1 << 20;

/// The broker (its own process, SQLite storage) frozen for 6 s while an agent publishes every
/// 50 ms into a 64 KiB spool: the spool fills to its limit and no further, dropping its oldest
/// batches and counting them, and the agent's memory stays flat. Once the broker answers again
/// the spool drains, and the topic holds every sequence but exactly as many as were dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_broker_fills_the_agent_spool_to_its_limit_and_no_further() {
    const LIMIT: u64 = 64 << 10;
    let dir = tempfile::tempdir().expect("broker dir");
    let spool = tempfile::tempdir().expect("spool dir");
    let brokers = crate::common::free_addr().to_string();
    let metrics = crate::common::free_addr();
    let bin = env!("CARGO_BIN_EXE_meterflow");
    let (brokers_at, spool_dir) = (brokers.clone(), spool.path().to_path_buf());
    let (dropped, missing, peak_spool, growth) = tokio::task::spawn_blocking(move || {
        let broker = KillOnDrop(
            std::process::Command::new(bin)
                .args(["broker", "--listen", &brokers_at])
                .args(["--storage", "sqlite://broker.db"])
                .args(["--partitions", &PARTITIONS.to_string()])
                .current_dir(dir.path())
                .env("MF_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("the broker starts"),
        );
        let mut agent = KillOnDrop(
            std::process::Command::new(bin)
                .args(["agent", "--brokers", &brokers_at, "--nodes", "2"])
                .args(["--interval", "50ms"])
                .args(["--spool-max-bytes", &LIMIT.to_string()])
                .args(["--metrics-listen", &metrics.to_string()])
                .args(["--partitions", &PARTITIONS.to_string()])
                .arg("--spool-dir")
                .arg(&spool_dir)
                .env("MF_LOG", "error")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("the agent starts"),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent_health(metrics).is_none_or(|h| h["spool_batches"].as_u64() != Some(0)) {
            assert!(Instant::now() < deadline, "the agent never caught up");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(1));

        signal(broker.0.id(), "STOP");
        let before = rss(agent.0.id());
        let (mut peak_rss, mut peak_spool) = (before, 0);
        let stall = Instant::now();
        while stall.elapsed() < Duration::from_secs(6) {
            if let Some(h) = agent_health(metrics) {
                peak_spool = peak_spool.max(h["spool_bytes"].as_u64().expect("spool bytes"));
            }
            peak_rss = peak_rss.max(rss(agent.0.id()));
            std::thread::sleep(Duration::from_millis(100));
        }
        let during = agent_health(metrics).expect("health");
        assert!(
            during["send_lag_seconds"].as_f64().is_some_and(|s| s >= 5.0),
            "the send lag grows through the stall: {during}"
        );
        signal(broker.0.id(), "CONT");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let h = agent_health(metrics).expect("health");
            if h["spool_batches"].as_u64().is_some_and(|n| n <= 2) {
                break;
            }
            assert!(Instant::now() < deadline, "the spool did not drain: {h}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let dropped = agent_health(metrics).expect("health")["spool_dropped"]
            .as_u64()
            .expect("dropped");
        println!(
            "frozen broker: spool peak {peak_spool} bytes of {LIMIT}, {dropped} batches dropped, agent RSS {} → peak {} MiB; at the end of the stall {during}",
            before / MIB,
            peak_rss / MIB
        );
        crate::common::terminate(&agent.0);
        assert!(agent.0.wait().expect("the agent exits").success());
        // Every sequence each agent made is in the topic or still in the spool, but for as
        // many as the spool dropped.
        let mut made: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        for payload in crate::common::read_topic(&brokers_at, names::SAMPLES, PARTITIONS, 1) {
            let b = SampleBatch::decode(&payload).expect("a batch");
            made.entry(b.agent_id).or_default().insert(b.sequence);
        }
        let held = meterflow_ingest::spool::Spool::open(&spool_dir, u64::MAX).expect("spool");
        let mut held = held;
        while let Some((position, b)) = held.front().expect("reads") {
            made.entry(b.agent_id).or_default().insert(b.sequence);
            held.remove(position).expect("removes");
        }
        let missing: u64 = made
            .values()
            .map(|s| (s.last().copied().unwrap_or(0) - s.len() as i64) as u64)
            .sum();
        drop(broker);
        (dropped, missing, peak_spool, peak_rss - before)
    })
    .await
    .expect("the scenario runs");
    assert!(
        peak_spool <= LIMIT && peak_spool > LIMIT / 2,
        "the spool filled to its limit and no further: {peak_spool} bytes"
    );
    assert!(dropped > 0, "a 6 s stall overflows a 64 KiB spool");
    assert_eq!(
        missing, dropped,
        "the sequences missing from the topic are the batches the spool dropped"
    );
    assert!(
        growth < 32 * MIB,
        "the agent's memory grew {growth} bytes while the broker was frozen"
    );
    drop(spool);
}

/// The processor frozen for 4 s and then the sink for 4 s while a fleet of eight nodes
/// publishes an hour of event time: the samples wait in the broker (each freeze's input topic
/// is shown to grow while its reader is stopped), each resumes and catches up, with resident
/// memory sampled throughout; afterwards the billed GPU time equals the ground truth to the
/// millisecond, and the sink serves each tenant the same GPU time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_processor_and_a_frozen_sink_catch_up_to_the_exact_totals() {
    let (broker, brokers) = crate::crash::broker_with_topics().await;
    let state = tempfile::tempdir().expect("state dir");
    let data = tempfile::tempdir().expect("sink data");
    let processor = KillOnDrop(spawn_processor(
        &brokers,
        state.path(),
        &[
            "--billing-window",
            "5m",
            "--lateness",
            "1m",
            "--partitions",
            &PARTITIONS.to_string(),
        ],
    ));
    let secret = data.path().join("jwt-secret");
    std::fs::write(&secret, crate::common::SECRET).expect("secret");
    let port = crate::common::free_addr().port();
    let sink = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args(["sink", "--brokers", &brokers, "--partitions", "4"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data.path().join("views"))
            .arg("--jwt-secret-file")
            .arg(&secret)
            .env("MF_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("sink starts"),
    );

    let publisher = tokio::spawn({
        let brokers = brokers.clone();
        async move {
            crate::common::publish_fleet(&brokers, 8, 5, 240, Duration::from_millis(50), true).await
        }
    });

    // Freeze one, then the other, sampling both processes' memory every 100 ms.
    let (processor_pid, sink_pid) = (processor.0.id(), sink.0.id());
    let inputs = brokers.clone();
    let (peaks, backlogs) = tokio::task::spawn_blocking(move || {
        let mut peaks = (0u64, 0u64);
        // Records added to the frozen process's input topic while it was stopped.
        let mut backlogs: Vec<(&str, i64)> = Vec::new();
        let mut end_at_stop = 0;
        let sample = |peaks: &mut (u64, u64)| {
            peaks.0 = peaks.0.max(rss(processor_pid));
            peaks.1 = peaks.1.max(rss(sink_pid));
        };
        let start = Instant::now();
        let mut frozen: Option<u32> = None;
        for (at_ms, pid, what, input) in [
            (1_500, processor_pid, "STOP", names::SAMPLES),
            (5_500, processor_pid, "CONT", names::SAMPLES),
            (6_000, sink_pid, "STOP", names::USAGE),
            (10_000, sink_pid, "CONT", names::USAGE),
            (20_000, 0, "", ""),
        ] {
            while start.elapsed() < Duration::from_millis(at_ms) {
                sample(&mut peaks);
                std::thread::sleep(Duration::from_millis(100));
            }
            match what {
                "STOP" => {
                    signal(pid, what);
                    end_at_stop = log_end(&inputs, input);
                }
                "CONT" => {
                    backlogs.push((input, log_end(&inputs, input) - end_at_stop));
                    signal(pid, what);
                }
                _ => {}
            }
            frozen = (what == "STOP").then_some(pid);
        }
        assert_eq!(frozen, None, "both thawed");
        (peaks, backlogs)
    })
    .await
    .expect("the freezes run");
    // The fault happened: each stopped reader's input grew while it was stopped.
    println!("records waiting at each thaw: {backlogs:?}");
    assert_eq!(backlogs.len(), 2);
    for (topic, waiting) in &backlogs {
        assert!(
            *waiting >= 20,
            "{topic} grew by {waiting} records while its reader was frozen: no backlog built up"
        );
    }
    let truth = publisher.await.expect("the publisher");

    let (gpu_ms, _) = crate::crash::billed_within(&brokers, &truth, Duration::from_secs(60)).await;
    assert_eq!(
        gpu_ms, truth,
        "billed GPU-ms per tenant, lease, class and MIG profile equal the ground truth"
    );

    // The sink serves each tenant the same GPU time, once it has read the whole usage topic.
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for ((tenant, _, _, _), ms) in &truth {
        *want.entry(tenant.clone()).or_default() += ms;
    }
    let operator = crate::common::token("");
    let deadline = Instant::now() + Duration::from_secs(60);
    let served = loop {
        let mut served: BTreeMap<String, i64> = BTreeMap::new();
        for tenant in want.keys() {
            let url = format!(
                "http://127.0.0.1:{port}/v1/tenants/{tenant}/usage?from=2026-01-01T00:00:00Z&to=2026-01-01T02:00:00Z&window=hour&group_by=gpu_class,mig_profile"
            );
            let (status, body) = crate::common::get_as(&url, &operator).await;
            if status != 200 {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON usage");
            let ms: f64 = v["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r["gpu"].as_array().into_iter().flatten())
                .map(|g| g["gpu_seconds"].as_f64().unwrap_or(0.0) * 1e3)
                .sum();
            served.insert(tenant.clone(), ms.round() as i64);
        }
        if served == want || Instant::now() > deadline {
            break served;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(served, want, "the sink's GPU time per tenant");
    println!(
        "frozen processor and sink: peak RSS processor {} MiB, sink {} MiB",
        peaks.0 / MIB,
        peaks.1 / MIB
    );
    assert!(
        peaks.0 < 512 * MIB && peaks.1 < 512 * MIB,
        "memory stays bounded while catching up: {peaks:?}"
    );
    drop((processor, sink));
    broker.stop();
}
