//! The node agent as a provider runs it: `meterflow agent --config FILE` with the kubelet
//! source (a kubelet's `/pods` and `/stats/summary` answers served over HTTP on loopback),
//! the cgroup source (a
//! kubepods tree in a temporary directory) and NVML switched on where no NVIDIA library
//! exists, started before its broker is up. It spools from its first tick; once the broker
//! comes up every batch reaches it, in order, attributed to the Akash lease of the pod (found
//! in the container's env); NVML says once that it is off, and the agent runs on.

use std::time::{Duration, Instant};

use meterflow_schemas::{Record, SampleBatch, SampleKind, metrics as m, topics as names};

const PODS: &str = include_str!("../../ingest/src/sources/fixtures/kubelet-pods.json");
const SUMMARY: &str = include_str!("../../ingest/src/sources/fixtures/kubelet-summary.json");
const WEB: &str = "aaaa456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const STRANGER: &str = "eeee456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn write(dir: &std::path::Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join(file), text).expect("file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_from_its_config_file_sends_attributed_batches() {
    // The broker is not up yet: the agent must collect and spool meanwhile.
    let broker_addr = crate::common::free_addr();
    let brokers = broker_addr.to_string();

    // The kubelet.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let kubelet = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/pods", axum::routing::get(|| async { PODS }))
        .route("/stats/summary", axum::routing::get(|| async { SUMMARY }));
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The node's cgroups: the web pod's running container and one no pod lists.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("cgroup");
    write(&root, "cgroup.controllers", "cpu memory io\n");
    for (pod, id, usec) in [
        (
            "kubepods-pod7f1c2a3b_1111_4c5d_9e8f_0123456789ab.slice",
            WEB,
            42_000_000u64,
        ),
        ("kubepods-pod00000000_9999.slice", STRANGER, 1_000_000),
    ] {
        let pod = root.join("kubepods.slice").join(pod);
        // Two OOM kills before the agent started, in a pod older than the agent.
        write(
            &pod,
            "memory.events",
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n",
        );
        let c = pod.join(format!("cri-containerd-{id}.scope"));
        write(&c, "cpu.stat", &format!("usage_usec {usec}\n"));
        write(&c, "memory.current", "5000\n");
        write(&c, "memory.stat", "anon 3000\ninactive_file 1000\n");
        write(&c, "io.stat", "259:0 rbytes=100 wbytes=200\n");
    }
    let metrics = crate::common::free_addr();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
brokers = "{brokers}"
node = "gpu-node-7"
provider = "akash1provider"
interval = "100ms"
metrics_listen = "{metrics}"

[agent.spool]
dir = "{spool}"

[agent.attribution]
preset = "akash"

[agent.sources.kubelet]
enabled = true
pods_url = "http://{kubelet}/pods"
summary_url = "http://{kubelet}/stats/summary"

[agent.sources.cgroup]
enabled = true
root = "{root}"

[agent.sources.nvml]
enabled = true
library = "/nonexistent/libnvidia-ml.so.1"
"#,
            spool = dir.path().join("spool").display(),
            root = root.display(),
        ),
    )
    .expect("config");

    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .env("MF_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the agent starts");

    // Its health says what each source is doing.
    let deadline = Instant::now() + Duration::from_secs(90);
    let health = loop {
        let answer = reqwest::get(format!("http://{metrics}/healthz")).await;
        if let Ok(answer) = answer {
            let health: serde_json::Value = answer.json().await.expect("health is JSON");
            if health["sources"]["cgroup"] == "up"
                && health["sources"]["nvml"] == "off"
                && health["spool_batches"].as_i64().is_some_and(|n| n >= 3)
                && health["broker_error"].is_string()
            {
                break health;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent never spooled with its broker away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The fault happened: batches waited in the spool, none went out, and health said why.
    assert_eq!(health["sources"]["kubelet"], "up", "{health}");
    let exposition = crate::common::get_text(&format!("http://{metrics}/metrics")).await;
    assert_eq!(
        crate::common::metric_value(&exposition, "meterflow_agent_batches_sent_total"),
        Some(0.0),
        "{exposition}"
    );
    // The finished job's pod is no Akash lease: said, and counted.
    assert_eq!(health["unattributed_pods"], 1, "{health}");
    let spooled = health["spool_batches"].as_i64().expect("a number");

    // The broker comes up where the agent looks for it.
    let broker = meterflow::broker::start(meterflow::broker::BrokerConfig {
        listen: broker_addr,
        storage: "memory".into(),
    })
    .await
    .expect("the broker starts");
    // Its topics, as the agent's own retry would create them within 10 s (created here at
    // once, so that the reader below finds four partitions whichever creates them first).
    crate::common::ensure_topics(&brokers, 4).await;
    let exposition = crate::common::get_text(&format!("http://{metrics}/metrics")).await;
    assert!(
        exposition.contains("meterflow_agent_source_up{source=\"nvml\"} 0"),
        "{exposition}"
    );
    let unattributed = crate::common::metric_value(
        &exposition,
        "meterflow_agent_unattributed_readings_total{source=\"cgroup\"}",
    );
    assert!(
        unattributed.is_some_and(|n| n > 0.0),
        "the stranger's readings are counted: {exposition}"
    );

    // Its batches in the topic, once three were acknowledged and it stopped.
    let sent = || async {
        let exposition = crate::common::get_text(&format!("http://{metrics}/metrics")).await;
        crate::common::metric_value(&exposition, "meterflow_agent_batches_sent_total")
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !sent().await.is_some_and(|n| n >= spooled as f64 + 1.0) {
        assert!(
            Instant::now() < deadline,
            "the spooled batches never went out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::common::terminate(&agent);
    assert!(agent.wait().expect("exits").success(), "a clean stop");
    let brokers2 = brokers.clone();
    let payloads = tokio::task::spawn_blocking(move || {
        crate::common::read_topic(&brokers2, names::SAMPLES, 4, spooled as usize + 1)
    })
    .await
    .expect("read");
    let batches: Vec<SampleBatch> = payloads
        .iter()
        .map(|p| SampleBatch::decode(p).expect("a batch"))
        .collect();
    assert!(
        batches.len() as i64 > spooled,
        "{} batches, {spooled} spooled",
        batches.len()
    );
    let sequences: Vec<i64> = batches.iter().map(|b| b.sequence).collect();
    assert_eq!(
        sequences,
        (1..=batches.len() as i64).collect::<Vec<_>>(),
        "one node, one partition, in order"
    );
    for b in &batches {
        assert_eq!(
            (b.node.as_str(), b.agent_id.as_str()),
            ("gpu-node-7", "gpu-node-7")
        );
        // Exactly the web container's five cgroup readings, its pod's OOM kills and its
        // persistent volumes' three figures, and what its spec requests and limits it to (8
        // cores, 32 GiB each) over its current run and the one before its restart; the
        // stranger's readings are not sent.
        assert_eq!(b.samples.len(), 17, "{:#?}", b.samples);
        for s in &b.samples {
            assert_eq!(
                s.series.tenant,
                "akash1tenantaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            );
            assert_eq!(s.series.lease, "18231234.1.1");
            assert_eq!(s.series.service, "web");
            assert_eq!(s.series.provider, "akash1provider");
            if s.kind != SampleKind::Allocation {
                assert_eq!(s.series.container_id, WEB);
            }
        }
        let mut reserved: Vec<(&str, f64, &str)> = b
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Allocation)
            .map(|s| (s.metric.as_str(), s.value, &s.series.container_id[..4]))
            .collect();
        reserved.sort_by(|a, b| a.partial_cmp(b).expect("numbers"));
        let gib = (1u64 << 30) as f64;
        assert_eq!(
            reserved,
            [
                ("cpu_limit_cores", 8.0, "aaaa"),
                ("cpu_limit_cores", 8.0, "bbbb"),
                ("cpu_request_cores", 8.0, "aaaa"),
                ("cpu_request_cores", 8.0, "bbbb"),
                ("memory_limit_bytes", 32.0 * gib, "aaaa"),
                ("memory_limit_bytes", 32.0 * gib, "bbbb"),
                ("memory_request_bytes", 32.0 * gib, "aaaa"),
                ("memory_request_bytes", 32.0 * gib, "bbbb"),
            ]
        );
        let value = |metric: &str| {
            let s = b.samples.iter().find(|s| s.metric == metric).expect(metric);
            (s.kind, s.value)
        };
        assert_eq!(value(m::MEMORY_RSS), (SampleKind::Gauge, 3000.0));
        // The kills counted before the agent's first tick are a baseline, no one's.
        assert_eq!(value(m::OOM_KILLS), (SampleKind::Counter, 0.0));
        // The pod's two persistent volumes (the summary's `web-data` and `web-cache`).
        assert_eq!(
            value(m::FILESYSTEM_CAPACITY),
            (SampleKind::Gauge, 118_111_600_640.0)
        );
        let volume = b
            .samples
            .iter()
            .find(|s| s.metric == m::FILESYSTEM_USAGE)
            .expect("usage");
        assert_eq!(volume.series.container_id, WEB, "the pod's first container");
        let cpu = b
            .samples
            .iter()
            .find(|s| s.metric == m::CPU_SECONDS)
            .expect("cpu");
        assert_eq!((cpu.kind, cpu.value), (SampleKind::Counter, 42.0));
        let memory = b
            .samples
            .iter()
            .find(|s| s.metric == m::MEMORY_BYTES)
            .expect("memory");
        assert_eq!(memory.value, 4000.0);
    }

    broker.stop();
}

/// A config with a mistake is refused at start, naming the key.
#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[agent.sources.kubelet]\nenabled = true\n[agent.attribution]\npreset = \"akash\"\nlease = \"{label:x\"\n",
    )
    .expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("agent.attribution.lease: `{label:x` has a `{` without its `}`"),
        "{stderr}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args(["agent", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the config file") && stderr.contains("missing.toml"),
        "{stderr}"
    );
}
