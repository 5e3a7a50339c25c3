//! A node as the real sources describe it, through the agent's own collector (kubelet `/pods`,
//! the API server's namespaces, the pod-resources socket, cgroup files with the host's `/proc`,
//! dcgm-exporter) → the embedded broker → processor → sink HTTP.
//!
//! The node (`gpu-node-1`, two H100 boards) over two minutes, read every 15 s:
//! - `web`, an Akash lease whose id the provider wrote on the namespace (the pod carries none);
//!   its container holds GPU-1, is OOM-killed and restarted in the same pod, which keeps the GPU;
//! - `batch`, an Akash lease whose namespace the API server does not list: found from the
//!   `AKASH_*` env the provider writes into the container; it holds GPU-2, whose driver is
//!   reloaded mid-run (its energy counter starts again from zero);
//! - the GPU operator's exporter pod: no lease, counted as unattributed, never billed.
//!
//! Each lease's spec requests cores and memory (web `1500m` and `6Gi`; batch only limits,
//! `4` and `16Gi`, which the scheduler reserves as its requests): reserved, and billed as
//! such, from each run's start to its finish.
//!
//! Each board's energy counter is its running total since the driver loaded (9 MJ and 5 MJ at
//! the start), as NVML and dcgm-exporter report it; kubelet times are whole seconds. The truth
//! is the scenario's physical model below (power and times in milliseconds), and the expected
//! bills are worked out from it by hand, with the bound each source's resolution allows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meterflow_ingest::Publisher;
use meterflow_ingest::attribution::{Attribution, AttributionConfig};
use meterflow_ingest::node::{NodeCollector, NodeIdentity};
use meterflow_ingest::sources::Source;
use meterflow_ingest::sources::cgroup::{CgroupConfig, CgroupSource};
use meterflow_ingest::sources::kubelet::{KubeletConfig, KubeletSource};
use meterflow_ingest::sources::pod_resources::{
    self, PodResourcesConfig, PodResourcesSource, proto,
};
use meterflow_ingest::sources::prometheus_scrape::{LabelNames, ScrapeConfig, Scraper};
use serde_json::{Value, json};

use crate::common::{Pipeline, poll_json, token};

/// 2026-11-23T00:00:00Z: the agent's first tick.
const T0: i64 = 1_795_392_000_000;
const TICK_S: i64 = 15;
const LAST_S: i64 = 120;

const NS_WEB: &str = "4pv7q2k0dl8r1ls3r1hmp7n0uc0fh0b5q4dqm0m4vq8c6";
const NS_BATCH: &str = "b1ql0a7m3d6s0c2r5k9v4n8p1x7z3y6w2u5t8q0e4r7j1";
const OWNER: &str = "akash1tenantaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const GPU_1: &str = "GPU-5f3c1a2b-7d4e-4c11-9a0b-1c2d3e4f5a6b";
const GPU_2: &str = "GPU-8e9d0c1b-2a3f-4e55-8b6c-7d8e9f0a1b2c";
const WEB_POD_UID: &str = "7f1c2a3b-1111-4c5d-9e8f-0123456789ab";
const BATCH_POD_UID: &str = "9a8b7c6d-2222-4c5d-9e8f-0123456789ab";
const OPERATOR_POD_UID: &str = "1a2b3c4d-3333-4c5d-9e8f-0123456789ab";
const NS_JOB: &str = "j7m2q9w4e1r8t5y3u6i0o2p4a7s1d9f3g5h8k0l2z4x6c";
const JOB_OWNER: &str = "akash1tenantbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const JOB_POD_UID: &str = "5e6f7a8b-4444-4c5d-9e8f-0123456789ab";

// ---- What physically happened, in milliseconds after T0 ----
/// The web pod is taken on at 0.6 s (kubelet `startTime` 00:00:00Z).
const WEB_POD_MS: i64 = 600;
/// Its container's first run, OOM-killed; then its second run in the same pod.
const WEB_RUN_1: (i64, i64) = (2_400, 47_700);
const WEB_RUN_2_START: i64 = 49_200;
/// The batch pod (kubelet `startTime` 00:00:19Z) and its container.
const BATCH_POD_MS: i64 = 19_100;
const BATCH_START: i64 = 20_300;
/// Another tenant's one-GPU job, wholly between the ticks at 60 s and 75 s (its pod taken on
/// at 61.0 s), on a board dcgm-exporter is not asked about here: pod-resources never lists it.
const JOB_POD_MS: i64 = 61_000;
const JOB_RUN: (i64, i64) = (61_400, 68_900);
/// GPU-2's driver reloads: its energy counter starts again from zero.
const RELOAD_MS: i64 = 100_000;
/// Board power: while a container runs on it, and idle.
const WEB_WATTS: i64 = 300;
const BATCH_WATTS: i64 = 400;
const IDLE_WATTS: i64 = 50;
/// Each board's total before the scenario (joules since its driver loaded).
const GPU_1_LIFETIME_J: i64 = 9_000_000;
const GPU_2_LIFETIME_J: i64 = 5_000_000;
/// The web pod's network namespace receives 1 MB/s from the pod's start.
const RX_BYTES_PER_S: i64 = 1_000_000;

fn web_running(t: i64) -> bool {
    (WEB_RUN_1.0..WEB_RUN_1.1).contains(&t) || t >= WEB_RUN_2_START
}

/// ∫ power dt over [0, t) in millijoules, for a board whose holder runs while `running`.
fn energy_mj(t: i64, watts: i64, running: impl Fn(i64) -> bool) -> i64 {
    (0..t)
        .map(|ms| if running(ms) { watts } else { IDLE_WATTS })
        .sum()
}

/// What each board's counter reads at `t` (mJ, as dcgm-exporter reports it).
fn board_counters_mj(t: i64) -> (i64, i64) {
    let gpu_1 = GPU_1_LIFETIME_J * 1000 + energy_mj(t, WEB_WATTS, web_running);
    let batch = |ms: i64| ms >= BATCH_START;
    let gpu_2 = if t < RELOAD_MS {
        GPU_2_LIFETIME_J * 1000 + energy_mj(t, BATCH_WATTS, batch)
    } else {
        energy_mj(t, BATCH_WATTS, batch) - energy_mj(RELOAD_MS, BATCH_WATTS, batch)
    };
    (gpu_1, gpu_2)
}

/// RFC 3339 at whole seconds, as the kubelet writes a time (truncated).
fn kube_time(ms: i64) -> String {
    meterflow_schemas::time::format_rfc3339((T0 + ms).div_euclid(1000) * 1000)
}

fn container_id(prefix: char) -> String {
    std::iter::repeat_n(prefix, 4)
        .chain("456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".chars())
        .collect()
}

fn akash_env(dseq: &str) -> Value {
    json!([
        {"name": "MODEL", "value": "meta-llama/Llama-3.1-8B-Instruct"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "credentials", "key": "token"}}},
        {"name": "AKASH_GROUP_SEQUENCE", "value": "1"},
        {"name": "AKASH_DEPLOYMENT_SEQUENCE", "value": dseq},
        {"name": "AKASH_ORDER_SEQUENCE", "value": "1"},
        {"name": "AKASH_OWNER", "value": OWNER},
        {"name": "AKASH_PROVIDER", "value": "akash1provider"}
    ])
}

fn running(id: &str, started_ms: i64) -> Value {
    json!({"running": {"startedAt": kube_time(started_ms)}, "containerID": format!("containerd://{id}")})
}

/// The kubelet's `/pods` at `t`: pods the provider created, as it labels them.
fn pods_at(t: i64) -> Value {
    let mut items = vec![json!({
        "metadata": {"name": "dcgm-exporter-x2k9d", "namespace": "gpu-operator", "uid": OPERATOR_POD_UID,
            "labels": {"app": "nvidia-dcgm-exporter"},
            "ownerReferences": [{"kind": "DaemonSet", "name": "nvidia-dcgm-exporter", "controller": true}]},
        "spec": {"containers": [{"name": "nvidia-dcgm-exporter", "env": [{"name": "DCGM_EXPORTER_KUBERNETES", "value": "true"}]}]},
        "status": {"phase": "Running", "startTime": "2026-11-20T08:00:00Z", "containerStatuses": [{
            "name": "nvidia-dcgm-exporter", "restartCount": 0,
            "containerID": format!("containerd://{}", container_id('f')),
            "state": {"running": {"startedAt": "2026-11-20T08:00:03Z"}}, "lastState": {}}]}
    })];
    if t >= WEB_POD_MS {
        let (state, last, id, restarts) = if t < WEB_RUN_1.1 {
            (
                running(&container_id('a'), WEB_RUN_1.0),
                json!({}),
                container_id('a'),
                0,
            )
        } else {
            let last = json!({"terminated": {"exitCode": 137, "reason": "OOMKilled",
                "startedAt": kube_time(WEB_RUN_1.0), "finishedAt": kube_time(WEB_RUN_1.1),
                "containerID": format!("containerd://{}", container_id('a'))}});
            (
                running(&container_id('d'), WEB_RUN_2_START),
                last,
                container_id('d'),
                1,
            )
        };
        let mut state = state;
        state.as_object_mut().expect("object").remove("containerID");
        items.push(json!({
            "metadata": {"name": "web-6d4cf56db6-x7k2p", "namespace": NS_WEB, "uid": WEB_POD_UID,
                "labels": {"akash.network": "true", "akash.network/namespace": NS_WEB,
                    "akash.network/manifest-service": "web", "pod-template-hash": "6d4cf56db6"},
                "ownerReferences": [{"kind": "ReplicaSet", "name": "web-6d4cf56db6", "controller": true}]},
            "spec": {"containers": [{"name": "web", "env": akash_env("18231234"),
                "resources": {"requests": {"cpu": "1500m", "memory": "6Gi", "nvidia.com/gpu": "1"},
                    "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"}}}]},
            "status": {"phase": "Running", "startTime": kube_time(WEB_POD_MS), "containerStatuses": [{
                "name": "web", "restartCount": restarts, "containerID": format!("containerd://{id}"),
                "state": state, "lastState": last}]}
        }));
    }
    if t >= BATCH_POD_MS {
        let status = if t >= BATCH_START {
            json!({"name": "main", "restartCount": 0, "containerID": format!("containerd://{}", container_id('b')),
                "state": {"running": {"startedAt": kube_time(BATCH_START)}}, "lastState": {}})
        } else {
            json!({"name": "main", "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {}})
        };
        items.push(json!({
            "metadata": {"name": "batch-7b8c9d0e1f-q4w5e", "namespace": NS_BATCH, "uid": BATCH_POD_UID,
                "labels": {"akash.network": "true", "akash.network/namespace": NS_BATCH,
                    "akash.network/manifest-service": "batch", "pod-template-hash": "7b8c9d0e1f"},
                "ownerReferences": [{"kind": "ReplicaSet", "name": "batch-7b8c9d0e1f", "controller": true}]},
            "spec": {"containers": [{"name": "main", "env": akash_env("18239999"),
                "resources": {"limits": {"cpu": "4", "memory": "16Gi"}}}]},
            "status": {"phase": "Running", "startTime": kube_time(BATCH_POD_MS), "containerStatuses": [status]}
        }));
    }
    if t >= JOB_POD_MS {
        let status = if t >= JOB_RUN.1 {
            json!({"name": "render", "restartCount": 0, "containerID": format!("containerd://{}", container_id('c')),
                "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                    "startedAt": kube_time(JOB_RUN.0), "finishedAt": kube_time(JOB_RUN.1)}}, "lastState": {}})
        } else {
            json!({"name": "render", "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {}})
        };
        items.push(json!({
            "metadata": {"name": "render-5c6d7e8f9a-r2t4y", "namespace": NS_JOB, "uid": JOB_POD_UID,
                "labels": {"akash.network": "true", "akash.network/namespace": NS_JOB,
                    "akash.network/manifest-service": "render", "pod-template-hash": "5c6d7e8f9a"},
                "ownerReferences": [{"kind": "ReplicaSet", "name": "render-5c6d7e8f9a", "controller": true}]},
            "spec": {"containers": [{"name": "render",
                "env": [{"name": "AKASH_OWNER", "value": JOB_OWNER},
                    {"name": "AKASH_DEPLOYMENT_SEQUENCE", "value": "18240000"},
                    {"name": "AKASH_GROUP_SEQUENCE", "value": "1"},
                    {"name": "AKASH_ORDER_SEQUENCE", "value": "1"},
                    {"name": "AKASH_PROVIDER", "value": "akash1provider"}],
                "resources": {"limits": {"cpu": "2", "nvidia.com/gpu": "1"}}}]},
            "status": {"phase": if t >= JOB_RUN.1 { "Succeeded" } else { "Pending" },
                "startTime": kube_time(JOB_POD_MS), "containerStatuses": [status]}
        }));
    }
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
}

/// The API server's namespaces: the web lease's, labelled by the provider; the batch lease's
/// is not listed (created since, as far as this answer knows).
fn namespaces() -> Value {
    json!({"kind": "NamespaceList", "apiVersion": "v1", "items": [
        {"metadata": {"name": NS_WEB, "labels": {
            "akash.network": "true",
            "akash.network/lease.id.owner": OWNER,
            "akash.network/lease.id.dseq": "18231234",
            "akash.network/lease.id.gseq": "1",
            "akash.network/lease.id.oseq": "1",
            "akash.network/lease.id.provider": "akash1provider"}}},
        {"metadata": {"name": "gpu-operator", "labels": {"kubernetes.io/metadata.name": "gpu-operator"}}}
    ]})
}

/// dcgm-exporter's answer at `t`: the boards' energy, labelled with the pod that holds each
/// board now (its Kubernetes mode), none while idle.
fn dcgm_at(t: i64) -> String {
    let (gpu_1, gpu_2) = board_counters_mj(t);
    let holder = |held: bool, ns: &str, pod: &str, container: &str| {
        if held {
            format!(",container=\"{container}\",namespace=\"{ns}\",pod=\"{pod}\"")
        } else {
            String::new()
        }
    };
    let line = |index: u32, uuid: &str, who: String, mj: i64| {
        format!(
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu=\"{index}\",UUID=\"{uuid}\",pci_bus_id=\"00000000:{:02X}:00.0\",device=\"nvidia{index}\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"gpu-node-1\",DCGM_FI_DRIVER_VERSION=\"550.54.15\"{who}}} {mj}\n",
            0x18 + index * 0x12
        )
    };
    let mut text = String::from(
        "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).\n# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n",
    );
    text += &line(
        0,
        GPU_1,
        holder(web_running(t), NS_WEB, "web-6d4cf56db6-x7k2p", "web"),
        gpu_1,
    );
    text += &line(
        1,
        GPU_2,
        holder(t >= BATCH_START, NS_BATCH, "batch-7b8c9d0e1f-q4w5e", "main"),
        gpu_2,
    );
    text
}

/// The node's cgroups and `/proc` at `t`: each running container's cgroup (its first process
/// in `cgroup.procs`) and the web pod's network namespace.
fn write_node(root: &std::path::Path, proc_root: &std::path::Path, t: i64) {
    let _ = std::fs::remove_dir_all(root.join("kubepods.slice"));
    let write = |path: std::path::PathBuf, text: &str| {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(path, text).expect("file");
    };
    write(root.join("cgroup.controllers"), "cpu memory io\n");
    let web_id = if t < WEB_RUN_1.1 {
        container_id('a')
    } else {
        container_id('d')
    };
    let pod_dir = |uid: &str| {
        root.join("kubepods.slice/kubepods-burstable.slice")
            .join(format!(
                "kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ))
    };
    // (pod, container id, its process, the process whose network namespace it is in). Each
    // pod also has containerd's sandbox (the pause container): its own scope in the pod's
    // slice, an id the kubelet does not list (here one that sorts first), in the pod's
    // network namespace.
    let mut containers = vec![(OPERATOR_POD_UID, container_id('f'), 1000, 1000)];
    if web_running(t) {
        containers.push((WEB_POD_UID, container_id('0'), 4200, 4242));
        containers.push((WEB_POD_UID, web_id, 4242, 4242));
    }
    if t >= BATCH_START {
        containers.push((BATCH_POD_UID, container_id('1'), 5300, 5353));
        containers.push((BATCH_POD_UID, container_id('b'), 5353, 5353));
    }
    for (uid, id, pid, ns_pid) in containers {
        let dir = pod_dir(uid).join(format!("cri-containerd-{id}.scope"));
        write(
            dir.join("cpu.stat"),
            "usage_usec 1000000\nuser_usec 800000\nsystem_usec 200000\n",
        );
        write(dir.join("memory.current"), "1073741824\n");
        write(dir.join("memory.stat"), "anon 1000000\ninactive_file 0\n");
        write(dir.join("io.stat"), "");
        write(dir.join("cgroup.procs"), &format!("{pid}\n"));
        let ns = proc_root.join(format!("{pid}/ns"));
        std::fs::create_dir_all(&ns).expect("ns dir");
        let _ = std::fs::remove_file(ns.join("net"));
        // The exporter runs in the host's network namespace; each pod has its own.
        let netns = if pid == 1000 {
            "net:[4026531840]".to_string()
        } else {
            format!("net:[40265320{}]", ns_pid % 100)
        };
        std::os::unix::fs::symlink(netns, ns.join("net")).expect("symlink");
        let rx = if uid == WEB_POD_UID {
            RX_BYTES_PER_S * (t - WEB_POD_MS) / 1000
        } else {
            0
        };
        write(
            proc_root.join(format!("{pid}/net/dev")),
            &format!(
                "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:  123456     100    0    0    0     0          0         0   123456     100    0    0    0     0       0          0\n  eth0: {rx}    9000    0    0    0     0          0         0     5000      50    0    0    0     0       0          0\n"
            ),
        );
    }
    let host = proc_root.join("1/ns");
    std::fs::create_dir_all(&host).expect("host ns");
    let _ = std::fs::remove_file(host.join("net"));
    std::os::unix::fs::symlink("net:[4026531840]", host.join("net")).expect("symlink");
}

/// pod-resources: each pod's container and the GPU the device plugin gave it (kept across a
/// container restart in the same pod).
fn assignments() -> proto::ListPodResourcesResponse {
    let pod = |name: &str, namespace: &str, container: &str, gpu: &str| proto::PodResources {
        name: name.into(),
        namespace: namespace.into(),
        containers: vec![proto::ContainerResources {
            name: container.into(),
            devices: vec![proto::ContainerDevices {
                resource_name: "nvidia.com/gpu".into(),
                device_ids: vec![gpu.into()],
            }],
            dynamic_resources: vec![],
        }],
    };
    proto::ListPodResourcesResponse {
        pod_resources: vec![
            pod("web-6d4cf56db6-x7k2p", NS_WEB, "web", GPU_1),
            pod("batch-7b8c9d0e1f-q4w5e", NS_BATCH, "main", GPU_2),
        ],
    }
}

/// The agent's collector of node `gpu-node-1` of provider `akash1provider` as `agent_id`,
/// reading `sources` every 15 s with the Akash preset and these GPU model → price classes.
pub(crate) fn akash_collector(
    agent_id: &str,
    classes: &[(&str, &str)],
    sources: Vec<Box<dyn Source>>,
) -> NodeCollector {
    let attribution = Attribution::new(&AttributionConfig {
        preset: "akash".into(),
        gpu_classes: classes
            .iter()
            .map(|(model, class)| (model.to_string(), class.to_string()))
            .collect(),
        ..Default::default()
    })
    .expect("rules");
    NodeCollector::new(
        NodeIdentity {
            node: "gpu-node-1".into(),
            provider: "akash1provider".into(),
            agent_id: agent_id.into(),
        },
        Duration::from_secs(TICK_S as u64),
        Duration::from_secs(600),
        attribution,
        PodResourcesConfig::default().gpu_resources,
        sources,
    )
    .expect("collector")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_nodes_sources_bill_each_lease_its_own_gpu_time_energy_and_traffic() {
    let pipeline = Pipeline::start(1, 1).await;
    let brokers = pipeline.broker.bootstrap();

    // The kubelet, the API server and dcgm-exporter, answering what the node is at the tick.
    let now = Arc::new(Mutex::new(0i64));
    let at = now.clone();
    let at2 = now.clone();
    let app = axum::Router::new()
        .route(
            "/pods",
            axum::routing::get(move || {
                let t = *at.lock().expect("lock");
                async move { pods_at(t).to_string() }
            }),
        )
        .route(
            "/api/v1/namespaces",
            axum::routing::get(|| async { namespaces().to_string() }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let t = *at2.lock().expect("lock");
                async move { dcgm_at(t) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("kubelet.sock");
    let grpc = pod_resources::fake::serve(socket.clone(), Ok(assignments()))
        .await
        .expect("pod-resources socket");
    let (cgroup_root, proc_root) = (dir.path().join("cgroup"), dir.path().join("proc"));

    let sources: Vec<Box<dyn Source>> = vec![
        Box::new(
            KubeletSource::new(&KubeletConfig {
                enabled: true,
                pods_url: format!("http://{http}/pods"),
                token_file: None,
                namespaces_url: Some(format!("http://{http}/api/v1/namespaces")),
                api_ca_file: None,
                ..Default::default()
            })
            .expect("kubelet"),
        ),
        Box::new(PodResourcesSource::new(PodResourcesConfig {
            enabled: true,
            socket,
            ..Default::default()
        })),
        Box::new(
            CgroupSource::new(CgroupConfig {
                enabled: true,
                root: cgroup_root.clone(),
                proc_root: Some(proc_root.clone()),
                metrics: vec![],
            })
            .expect("cgroup"),
        ),
        Box::new(
            Scraper::new(&ScrapeConfig {
                name: "dcgm".into(),
                url: format!("http://{http}/metrics"),
                preset: "dcgm".into(),
                map: vec![],
                labels: LabelNames::default(),
                metrics: vec![],
            })
            .expect("dcgm"),
        ),
    ];
    let mut node = akash_collector("gpu-node-1", &[("H100", "h100")], sources);

    let publisher = Publisher::new(&brokers).expect("producer");
    for k in 0..=LAST_S / TICK_S {
        let t = k * TICK_S * 1000;
        *now.lock().expect("lock") = t;
        write_node(&cgroup_root, &proc_root, t);
        let batch = node.tick(T0 + t).await;
        publisher.publish(&batch).await.expect("delivered");
    }
    // The exporter's pod has no lease: counted (the agent's /healthz shows this count) and
    // said, never billed.
    assert_eq!(node.unattributed_pods(), 1);

    // ---- The bills, worked out by hand from the physical model ----
    // GPU time, from the kubelet's whole-second times: web 00:02→00:47 and 00:49→02:00
    // (the last reading), 45 s + 71 s; batch 00:20→02:00, 100 s. Physically web ran
    // 45.3 s + 70.8 s and batch 99.7 s: each start and finish within one second of the truth.
    let web_gpu_s = 45.0 + 71.0;
    let batch_gpu_s = 100.0;
    let physical_web_s = (WEB_RUN_1.1 - WEB_RUN_1.0 + LAST_S * 1000 - WEB_RUN_2_START) as f64 / 1e3;
    let physical_batch_s = (LAST_S * 1000 - BATCH_START) as f64 / 1e3;
    assert!((web_gpu_s - physical_web_s).abs() <= 2.0 * 2.0);
    assert!((batch_gpu_s - physical_batch_s).abs() <= 1.0);
    // Energy: a holder is billed what its board used between two readings that both fell in
    // its run. web run 1 is read at 15, 30, 45 s (30 s × 300 W = 9,000 J); run 2 at 60 … 120 s
    // (60 s × 300 W = 18,000 J): 27,000 J of the 34,800 J it used (45.3 s + 70.8 s at 300 W),
    // short by its partial intervals, never more. batch is read at 30 … 120 s: 30→90 s is
    // 24,000 J; at 100 s the driver reloads, so 90→105 s counts only the 5 s since (2,000 J);
    // 105→120 s 6,000 J: 32,000 J of the 39,880 J it used. Neither is billed a joule of the
    // boards' 14 MJ lifetime.
    let web_joules = 27_000.0;
    let batch_joules = 32_000.0;
    let physical_web_j = physical_web_s * WEB_WATTS as f64;
    assert!(web_joules <= physical_web_j && physical_web_j - web_joules <= 4.0 * 15.0 * 300.0);
    // Network: the pod's namespace counts from the pod's start (after the agent's first tick),
    // 1 MB/s up to the last reading at 120 s, across the container's restart: 119.4 MB.
    let web_rx = (RX_BYTES_PER_S * (LAST_S * 1000 - WEB_POD_MS) / 1000) as f64;
    // Reserved: each run's requests over the same kubelet times as its GPU. web 1.5 cores and
    // 6 GiB over 116 s; batch, whose spec sets only limits, 4 cores and 16 GiB over 100 s. A
    // pending container (batch from 19.1 s to 20.3 s) reserves nothing.
    let web_reserved_core_s = 1.5 * 116.0;
    let web_reserved_byte_s = (6u64 << 30) as f64 * 116.0;
    let batch_reserved_core_s = 4.0 * 100.0;
    let batch_reserved_byte_s = (16u64 << 30) as f64 * 100.0;
    assert!((web_reserved_core_s - 1.5 * physical_web_s).abs() <= 1.5 * 2.0 * 2.0);
    assert!((batch_reserved_core_s - 4.0 * physical_batch_s).abs() <= 4.0);

    let from = T0;
    let to = T0 + 3_600_000;
    let url = pipeline.url(&format!(
        "/v1/tenants/{OWNER}/usage?from={from}&to={to}&window=total&group_by=lease"
    ));
    let lease = |v: &Value, lease: &str, metric: &str| {
        v["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["lease"] == lease)
            .and_then(|r| r[metric].as_f64())
    };
    let answer = poll_json(&url, &token(OWNER), Duration::from_secs(90), |v| {
        lease(v, "18231234.1.1", "gpu_seconds") == Some(web_gpu_s)
            && lease(v, "18239999.1.1", "gpu_seconds") == Some(batch_gpu_s)
            && lease(v, "18231234.1.1", "network_receive_bytes") == Some(web_rx)
            && lease(v, "18239999.1.1", "energy_joules") == Some(batch_joules)
    })
    .await;
    assert_eq!(
        lease(&answer, "18231234.1.1", "energy_joules"),
        Some(web_joules),
        "{answer}"
    );
    assert_eq!(
        lease(&answer, "18239999.1.1", "energy_joules"),
        Some(batch_joules),
        "{answer}"
    );
    assert_eq!(
        lease(&answer, "18231234.1.1", "network_receive_bytes"),
        Some(web_rx),
        "{answer}"
    );
    for (l, metric, expected) in [
        (
            "18231234.1.1",
            "cpu_request_core_seconds",
            web_reserved_core_s,
        ),
        (
            "18231234.1.1",
            "memory_request_byte_seconds",
            web_reserved_byte_s,
        ),
        (
            "18239999.1.1",
            "cpu_request_core_seconds",
            batch_reserved_core_s,
        ),
        (
            "18239999.1.1",
            "memory_request_byte_seconds",
            batch_reserved_byte_s,
        ),
    ] {
        assert_eq!(
            lease(&answer, l, metric),
            Some(expected),
            "{l} {metric}: {answer}"
        );
    }
    let rows = answer["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "only the two leases: {answer}");
    // The energy no single lease held a board for between two readings is the operator's,
    // counted by the agent. GPU-1 over 0→120 s: 116.1 s at 300 W and 3.9 s idle at 50 W,
    // 35,025 J, less web's 27,000 J. GPU-2 over 0→90 s: 20.3 s idle and 69.7 s at 400 W,
    // 28,895 J, then 8,000 J counted since the reload, less batch's 32,000 J. The 4,000 J of
    // 90→100 s went with the reload and are no one's.
    let unheld = node.unheld_energy_joules();
    assert!(
        (unheld - ((35_025.0 - web_joules) + (28_895.0 + 8_000.0 - batch_joules))).abs() < 1e-6,
        "unheld {unheld} J"
    );
    // The job pod-resources never listed: billed from its spec's one GPU, from 01:01 to 01:08
    // as the kubelet shows them (7 s; physically 7.5 s, within a second at each end), priced
    // as the node's one GPU model.
    let job_gpu_s = 7.0;
    let physical_job_s = (JOB_RUN.1 - JOB_RUN.0) as f64 / 1e3;
    assert!((job_gpu_s - physical_job_s).abs() <= 2.0);
    let url = pipeline.url(&format!(
        "/v1/tenants/{JOB_OWNER}/usage?from={from}&to={to}&window=total&group_by=gpu_class"
    ));
    let answer = poll_json(&url, &token(JOB_OWNER), Duration::from_secs(30), |v| {
        v["totals"]["gpu_seconds"].as_f64() == Some(job_gpu_s)
    })
    .await;
    assert_eq!(
        answer["totals"]["gpu_seconds"].as_f64(),
        Some(job_gpu_s),
        "{answer}"
    );
    assert_eq!(answer["totals"]["gpu"][0]["gpu_class"], "h100", "{answer}");
    // Its spec's 2 cores (a limit, so its request) over the same 7 s; no memory asked for.
    assert_eq!(
        answer["totals"]["cpu_request_core_seconds"].as_f64(),
        Some(2.0 * job_gpu_s),
        "{answer}"
    );
    assert!(
        answer["totals"]["memory_request_byte_seconds"]
            .as_f64()
            .is_none_or(|b| b == 0.0),
        "{answer}"
    );
    grpc.abort();
    pipeline.stop().await;
}
