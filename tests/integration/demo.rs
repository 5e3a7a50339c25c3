//! `meterflow demo` as a user runs it: the real binary, its printed URL, its API, its exit on
//! SIGTERM (what `kill` and `docker stop` send), leaving no temporary files behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{get_as, poll_json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_gpu_seconds_and_exits_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            // A bound in case the signal is lost; the test stops it long before.
            "--exit-after",
            "120",
            "--nodes",
            "2",
            "--interval",
            "1s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the meterflow binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let (mut url, mut token) = (None, None);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.trim().strip_prefix("tenant usage:") {
                url = Some(rest.trim().to_string());
            }
            if let Some(rest) = line.trim().strip_prefix("tenant token:") {
                token = Some(rest.trim().to_string());
            }
            if let (Some(u), Some(t)) = (url.take_if(|_| token.is_some()), &token) {
                let _ = url_tx.send((u, t.clone()));
            }
            lines.push(line);
        }
        lines
    });
    let (usage_url, token) =
        tokio::task::spawn_blocking(move || url_rx.recv_timeout(Duration::from_secs(60)))
            .await
            .expect("join")
            .expect("the demo prints the tenant usage URL and a tenant token");
    assert!(usage_url.starts_with("http://127.0.0.1:"), "{usage_url}");

    // The printed URL needs the printed token: without it, 401.
    let (status, _) = get_as(&usage_url, "").await;
    assert_eq!(status, 401);
    let usage = poll_json(&usage_url, &token, Duration::from_secs(25), |v| {
        v["totals"]["gpu_seconds"].as_f64().is_some_and(|s| s > 0.0)
    })
    .await;
    assert!(
        usage["rows"].as_array().is_some_and(|r| !r.is_empty()),
        "{usage}"
    );

    // The demo keeps its broker-less state (sink views, processor checkpoints) in a temporary
    // directory while it runs; SIGTERM stops it cleanly and removes it.
    let data_dir = std::env::temp_dir().join(format!("meterflow-demo-{}", child.id()));
    assert!(
        data_dir.is_dir(),
        "the demo's data is at {data_dir:?} while it runs"
    );
    crate::common::terminate(&child);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "demo exit status: {status}");
    let printed = reader.join().expect("reader");
    assert!(
        printed
            .iter()
            .any(|l| l.contains("Meterflow demo stopped.")),
        "{printed:?}"
    );
    assert!(!data_dir.exists(), "{data_dir:?} left behind");
}
