//! A full disk under the agent's spool and under the processor's state directory: each on a
//! small tmpfs of its own that the test fills with a ballast file and then frees. Neither
//! process stops: the failure is logged, `/readyz` answers 503 with the reason while it lasts,
//! and once space returns the store is reopened and nothing is lost — every batch reaches the
//! broker in sequence, and the billed GPU time after a restart from the checkpoints written
//! across the episode equals the ground truth to the millisecond.
//!
//! Mounting a tmpfs needs CAP_SYS_ADMIN, which a user has in a user and mount namespace of its
//! own: each test runs itself again under `unshare --user --map-root-user --mount`, so it passes
//! for a user who is not root and leaves no mount behind on the host.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::{KillOnDrop, spawn_processor};
use crate::crash::PARTITIONS;

/// Set in the test's own run inside its user and mount namespace.
const IN_NAMESPACE: &str = "MF_TEST_IN_MOUNT_NAMESPACE";

/// Runs the test `name` (this module's) again inside a user and mount namespace of its own,
/// where it may mount a tmpfs, and checks it passed there. False when this already is that run.
fn ran_in_own_namespace(name: &str) -> bool {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return false;
    }
    let test = format!("disk::{name}");
    let out = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--"])
        .arg(std::env::current_exe().expect("the test binary"))
        .args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .output()
        .expect("unshare runs (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in its own user and mount namespace: {}\n{stdout}\n{stderr}\n(if unshare says \
         'Operation not permitted', this kernel forbids user namespaces to this user: \
         sysctl kernel.unprivileged_userns_clone=1, or \
         kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu)",
        out.status
    );
    true
}

/// A tmpfs of its own, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("meterflow-full-disk")
            .tempdir()
            .expect("a mount point")
            .keep();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount runs");
        assert!(
            mounted.success(),
            "mounting a {size} tmpfs at {} failed (this run should be in a user and mount namespace of its own)",
            dir.display()
        );
        Tmpfs { dir }
    }

    fn ballast(&self) -> PathBuf {
        self.dir.join("ballast")
    }

    /// Writes a ballast file until the filesystem refuses more.
    fn fill(&self) {
        let mut file = std::fs::File::create(self.ballast()).expect("the ballast file");
        let chunk = vec![0x5a_u8; 64 << 10];
        while file.write_all(&chunk).is_ok() {}
        // The last bytes: a smaller write may still fit.
        while file.write_all(&[0x5a; 512]).is_ok() {}
        let free = meterflow_schemas::disk::available_bytes(&self.dir);
        assert!(
            free.is_some_and(|b| b < 1 << 20),
            "the disk is full: {free:?} bytes free"
        );
    }

    /// Gives the ballast's space back.
    fn free(&self) {
        std::fs::remove_file(self.ballast()).expect("the ballast removed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Polls `GET path` until `done` holds for its answer; panics naming `what` after `limit`.
fn wait_for(
    addr: SocketAddr,
    path: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let answer = crate::common::http_get(addr, path);
        if let Some((status, body)) = &answer
            && done(*status, body)
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; last answer {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_spool_disk_fills_says_so_and_loses_nothing_once_space_returns() {
    if ran_in_own_namespace(
        "an_agent_whose_spool_disk_fills_says_so_and_loses_nothing_once_space_returns",
    ) {
        return;
    }
    let disk = Tmpfs::mount("16m");
    let spool_dir = disk.dir.join("spool");
    let (broker, brokers) = crate::crash::broker_with_topics().await;
    let metrics = crate::common::free_addr();
    let seen = tokio::task::spawn_blocking(move || {
        let mut agent = KillOnDrop(
            std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
                .args(["agent", "--brokers", &brokers, "--nodes", "2"])
                .args(["--interval", "50ms"])
                .args(["--metrics-listen", &metrics.to_string()])
                .args(["--partitions", &PARTITIONS.to_string()])
                .arg("--spool-dir")
                .arg(&spool_dir)
                .env("MF_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("the agent starts"),
        );
        wait_for(
            metrics,
            "/readyz",
            "the agent is ready",
            Duration::from_secs(30),
            |status, _| status == 200,
        );
        std::thread::sleep(Duration::from_millis(1_000));

        disk.fill();
        let failing = wait_for(
            metrics,
            "/readyz",
            "the agent's readiness says the spool cannot write",
            Duration::from_secs(20),
            |status, body| {
                status == 503
                    && (body.contains("No space left on device")
                        || body.contains("the disk is full"))
            },
        );
        let health: serde_json::Value = serde_json::from_str(&failing).expect("JSON health");
        assert_eq!(health["healthy"], false, "{failing}");
        // Liveness stays 200: restarting the agent would lose what it holds in memory.
        let (status, _) = crate::common::http_get(metrics, "/healthz").expect("health answers");
        assert_eq!(status, 200);
        // Batches go on being made, held in memory while the disk is full.
        wait_for(
            metrics,
            "/healthz",
            "batches held in memory",
            Duration::from_secs(20),
            |_, body| {
                serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|h| h["spool_unstored_batches"].as_u64())
                    .is_some_and(|n| n >= 20)
            },
        );

        disk.free();
        let recovered = wait_for(
            metrics,
            "/readyz",
            "the agent recovers once space returns",
            Duration::from_secs(30),
            |status, body| status == 200 && body.contains("\"spool_unstored_batches\": 0,"),
        );
        let health: serde_json::Value = serde_json::from_str(&recovered).expect("JSON health");
        assert_eq!(health["spool_error"], serde_json::Value::Null);
        assert_eq!(health["spool_dropped"], 0, "nothing dropped: {recovered}");
        std::thread::sleep(Duration::from_millis(1_000));
        crate::common::terminate(&agent.0);
        assert!(agent.0.wait().expect("the agent exits").success());
        // Every sequence of both agents, from 1 without a gap, is in the topic or the spool.
        let (seen, _) = crate::crash::sequences_in_topic_and_spool(&brokers, &spool_dir);
        drop(disk);
        seen
    })
    .await
    .expect("the scenario runs");
    broker.stop();
    for (agent, sequences) in &seen {
        // A second before the disk filled, ten or more ticks held in memory, a second after
        // the spool recovered: every one of them, in order (the helper checks the sequence).
        assert!(
            sequences.len() >= 40,
            "{agent}: only {} batches",
            sequences.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_whose_state_disk_fills_goes_on_says_so_and_bills_exactly_after_a_restart() {
    if ran_in_own_namespace(
        "a_processor_whose_state_disk_fills_goes_on_says_so_and_bills_exactly_after_a_restart",
    ) {
        return;
    }
    let disk = Tmpfs::mount("64m");
    let state = disk.dir.join("state");
    let (broker, brokers) = crate::crash::broker_with_topics().await;
    let metrics = crate::common::free_addr();
    let flags = |extra: &[&str]| -> Vec<String> {
        [
            "--billing-window",
            "5m",
            "--lateness",
            "1m",
            "--max-batch",
            "20",
            "--max-catch-up-batch",
            "20",
            "--checkpoint-interval",
            "100ms",
            "--partitions",
            &PARTITIONS.to_string(),
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let mut processor = KillOnDrop(spawn_processor(
        &brokers,
        &state,
        &flags(&["--metrics-listen", &metrics.to_string()]),
    ));

    // An hour of event time for eight nodes, a tick every 40 ms of wall time (about 10 s).
    let publisher = tokio::spawn({
        let brokers = brokers.clone();
        async move {
            crate::common::publish_fleet(&brokers, 8, 11, 240, Duration::from_millis(40), true)
                .await
        }
    });

    let episode = tokio::task::spawn_blocking(move || {
        wait_for(
            metrics,
            "/readyz",
            "the processor is ready",
            Duration::from_secs(30),
            |status, _| status == 200,
        );
        std::thread::sleep(Duration::from_millis(2_000));
        disk.fill();
        let why = wait_for(
            metrics,
            "/readyz",
            "the processor's readiness says checkpoints fail",
            Duration::from_secs(20),
            |status, body| status == 503 && body.contains("checkpoint"),
        );
        let (status, _) = crate::common::http_get(metrics, "/healthz").expect("liveness answers");
        assert_eq!(status, 200, "still alive while the disk is full");
        std::thread::sleep(Duration::from_millis(2_000));
        let exposition = crate::common::http_get(metrics, "/metrics")
            .expect("metrics answer")
            .1;
        let failures = crate::common::metric_value(
            &exposition,
            "meterflow_processor_checkpoint_failures_total",
        );
        assert!(
            failures.is_some_and(|n| n >= 2.0),
            "checkpoints retried while the disk is full: {failures:?}"
        );
        disk.free();
        wait_for(
            metrics,
            "/readyz",
            "the processor writes checkpoints again once space returns",
            Duration::from_secs(30),
            |status, _| status == 200,
        );
        (why, disk)
    });
    let (why, disk) = episode.await.expect("the episode runs");
    println!("readiness while the disk was full: {why}");
    let truth = publisher.await.expect("the publisher");
    // Let it write a few checkpoints after the episode, then kill it: the restart resumes
    // from what was checkpointed across the full disk.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    processor.0.kill().expect("SIGKILL");
    processor.0.wait().expect("reaped");
    let _restarted = KillOnDrop(spawn_processor(&brokers, &state, &flags(&[])));
    let (gpu_ms, found) =
        crate::crash::billed_within(&brokers, &truth, Duration::from_secs(60)).await;
    drop(_restarted);
    broker.stop();
    drop(disk);
    assert!(truth.len() > 4, "the scenario bills several leases");
    assert_eq!(
        gpu_ms, truth,
        "billed GPU-ms per tenant, lease, class and MIG profile equal the ground truth"
    );
    let ids: BTreeSet<&str> = found.iter().map(|(_, _, r)| r.id.as_str()).collect();
    assert_eq!(
        ids.len(),
        found.len(),
        "every billing record id exactly once"
    );
}
