//! What the node agent costs on a node: `meterflow agent --config` (the release binary, its
//! own process) with the kubelet, pod-resources, cgroup and dcgm-exporter sources, every
//! interval, on a node of CONTAINERS containers (one pod each, the first eight holding one
//! GPU each). The stand-ins — the kubelet's `/pods` and a dcgm-exporter over HTTP on
//! loopback, the pod-resources gRPC socket, a kubepods cgroup tree in a temporary directory,
//! the embedded broker — run in this process, so the agent's CPU time and memory read from
//! `/proc/PID` are its own.
//!
//! `cargo bench --bench agent_node -- [CONTAINERS] [SECONDS] [INTERVAL_MS]`
//! (defaults: 100 containers, 60 s, 1000 ms).

use std::time::{Duration, Instant};

use meterflow::broker::{self, BrokerConfig};
use meterflow_ingest::sources::pod_resources::{fake, proto};

fn id(i: usize) -> String {
    format!("{i:064x}")
}

fn write(dir: &std::path::Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join(file), text).expect("file");
}

/// The kubelet's `/pods` answer for `n` Akash lease pods, labelled and with the env the Akash
/// provider writes (the lease id is in the container's env; the namespaces are not read here).
fn pods(n: usize) -> String {
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "metadata": {
                    "name": format!("web-{i}"),
                    "namespace": format!("lease-ns-{i}"),
                    "uid": format!("{i:08x}-0000-0000-0000-000000000000"),
                    "labels": {
                        "akash.network": "true",
                        "akash.network/namespace": format!("lease-ns-{i}"),
                        "akash.network/manifest-service": "web",
                    },
                    "ownerReferences": [{"kind": "ReplicaSet", "name": format!("web-{i}"), "controller": true}],
                },
                "spec": {"containers": [{"name": "web", "env": [
                    {"name": "AKASH_GROUP_SEQUENCE", "value": "1"},
                    {"name": "AKASH_DEPLOYMENT_SEQUENCE", "value": format!("{}", 1_000_000 + i)},
                    {"name": "AKASH_ORDER_SEQUENCE", "value": "1"},
                    {"name": "AKASH_OWNER", "value": format!("akash1tenant{}", i % 10)},
                    {"name": "AKASH_PROVIDER", "value": "akash1provider"},
                ]}]},
                "status": {
                    "phase": "Running",
                    "containerStatuses": [{
                        "name": "web",
                        "restartCount": 0,
                        "containerID": format!("containerd://{}", id(i)),
                        "state": {"running": {"startedAt": "2026-11-23T10:00:00Z"}},
                        "lastState": {},
                    }],
                },
            })
        })
        .collect();
    serde_json::json!({"kind": "PodList", "items": items}).to_string()
}

/// A kubepods tree (systemd driver) with the files a real container cgroup has.
fn cgroups(root: &std::path::Path, n: usize) {
    write(root, "cgroup.controllers", "cpuset cpu io memory pids\n");
    let memory_stat: String = [
        "anon",
        "file",
        "kernel",
        "kernel_stack",
        "pagetables",
        "sec_pagetables",
        "percpu",
        "sock",
        "vmalloc",
        "shmem",
        "file_mapped",
        "file_dirty",
        "file_writeback",
        "swapcached",
        "anon_thp",
        "file_thp",
        "shmem_thp",
        "inactive_anon",
        "active_anon",
        "inactive_file",
        "active_file",
        "unevictable",
        "slab_reclaimable",
        "slab_unreclaimable",
        "slab",
        "workingset_refault_anon",
        "workingset_refault_file",
        "pgfault",
        "pgmajfault",
    ]
    .iter()
    .enumerate()
    .map(|(k, name)| format!("{name} {}\n", 4096 * (k + 1)))
    .collect();
    for i in 0..n {
        let c = root
            .join("kubepods.slice/kubepods-burstable.slice")
            .join(format!(
                "kubepods-burstable-pod{i:08x}_0000_0000_0000_000000000000.slice"
            ))
            .join(format!("cri-containerd-{}.scope", id(i)));
        write(
            &c,
            "cpu.stat",
            &format!(
                "usage_usec {}\nuser_usec 1\nsystem_usec 1\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
                1_000_000 * i
            ),
        );
        write(&c, "memory.current", "1073741824\n");
        write(&c, "memory.stat", &memory_stat);
        write(
            &c,
            "io.stat",
            "259:0 rbytes=1000 wbytes=2000 rios=1 wios=2 dbytes=0 dios=0\n8:0 rbytes=10 wbytes=20 rios=1 wios=1 dbytes=0 dios=0\n",
        );
    }
}

/// A dcgm-exporter's answer for eight GPUs, the first eight pods holding one each.
fn dcgm(n: usize) -> String {
    let mut out = String::new();
    for (metric, value) in [
        ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "0.5"),
        ("DCGM_FI_DEV_FB_USED", "40000"),
        ("DCGM_FI_DEV_POWER_USAGE", "600"),
        ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "123456789"),
    ] {
        out.push_str(&format!("# HELP {metric} x\n# TYPE {metric} gauge\n"));
        for g in 0..8.min(n) {
            out.push_str(&format!(
                "{metric}{{gpu=\"{g}\",UUID=\"GPU-{g:08}\",device=\"nvidia{g}\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"bench\",container=\"web\",namespace=\"lease-ns-{g}\",pod=\"web-{g}\"}} {value}\n"
            ));
        }
    }
    out
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix(" kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn metric(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100);
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(60);
    let interval_ms: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1000);

    let broker = broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("literal"),
        storage: "memory".into(),
    })
    .await
    .expect("embedded broker");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("cgroup");
    cgroups(&root, n);
    let (pods, dcgm) = (pods(n), dcgm(n));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route(
            "/pods",
            axum::routing::get(move || async move { pods.clone() }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || async move { dcgm.clone() }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let socket = dir.path().join("kubelet.sock");
    let assignments = proto::ListPodResourcesResponse {
        pod_resources: (0..n)
            .map(|i| proto::PodResources {
                name: format!("web-{i}"),
                namespace: format!("lease-ns-{i}"),
                containers: vec![proto::ContainerResources {
                    name: "web".into(),
                    devices: if i < 8 {
                        vec![proto::ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: vec![format!("GPU-{i:08}")],
                        }]
                    } else {
                        vec![]
                    },
                    dynamic_resources: vec![],
                }],
            })
            .collect(),
    };
    let _grpc = fake::serve(socket.clone(), Ok(assignments))
        .await
        .expect("socket");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
brokers = "{brokers}"
node = "bench-node"
interval = "{interval_ms}ms"
metrics_listen = "{metrics}"
[agent.spool]
dir = "{spool}"
[agent.attribution]
preset = "akash"
gpu_classes = [["H100", "h100"]]
[agent.sources.kubelet]
enabled = true
pods_url = "http://{http}/pods"
[agent.sources.pod_resources]
enabled = true
socket = "{socket}"
[agent.sources.cgroup]
enabled = true
root = "{root}"
[[agent.sources.prometheus_scrape]]
name = "dcgm"
url = "http://{http}/metrics"
preset = "dcgm"
"#,
            brokers = broker.bootstrap(),
            spool = dir.path().join("spool").display(),
            socket = socket.display(),
            root = root.display(),
        ),
    )
    .expect("config");
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args(["agent", "--config"])
        .arg(&config)
        .env("MF_LOG", "warn")
        .spawn()
        .expect("the agent starts");
    let pid = agent.id();
    let scrape = || async {
        reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    // Warm up: the first batches sent.
    let deadline = Instant::now() + Duration::from_secs(60);
    while scrape()
        .await
        .is_none_or(|e| metric(&e, "meterflow_agent_batches_sent_total") < 3.0)
    {
        assert!(Instant::now() < deadline, "the agent sent nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (cpu0, sent0, t0) = (
        cpu_seconds(pid),
        metric(
            &scrape().await.unwrap_or_default(),
            "meterflow_agent_batches_sent_total",
        ),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let exposition = scrape().await.unwrap_or_default();
    let (cpu1, sent1, wall) = (
        cpu_seconds(pid),
        metric(&exposition, "meterflow_agent_batches_sent_total"),
        t0.elapsed().as_secs_f64(),
    );
    let (rss, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let unattributed = exposition
        .lines()
        .filter(|l| l.starts_with("meterflow_agent_unattributed_readings_total"))
        .count();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = agent.wait();
    let ticks = sent1 - sent0;
    let cpu = cpu1 - cpu0;
    println!(
        "agent_node: {n} containers (8 with a GPU), interval {interval_ms} ms, {wall:.1} s measured"
    );
    println!(
        "  batches sent {ticks:.0} ({:.2}/s); samples per batch ~{}",
        ticks / wall,
        n * 4 + 8 * 5
    );
    println!(
        "  agent CPU {cpu:.2} s = {:.2} % of one core; {:.2} ms per tick; {:.2} ms per tick per 100 containers",
        100.0 * cpu / wall,
        1000.0 * cpu / ticks.max(1.0),
        1000.0 * cpu / ticks.max(1.0) * 100.0 / n as f64
    );
    println!(
        "  agent memory: RSS {:.1} MiB, peak {:.1} MiB; unattributed series lines: {unattributed}",
        rss / 1024.0,
        hwm / 1024.0
    );
    broker.stop();
}
