//! A second node as the real sources describe it, for what the first (`real_node.rs`) leaves
//! out, through the agent's own collector → the embedded broker → processor → sink HTTP:
//!
//! - `infer`, an Akash lease whose GPUs came through Dynamic Resource Allocation: pod-resources
//!   lists its claims' devices by driver, pool and device name (`gpu.nvidia.com`,
//!   `gpu-node-1/gpu-1`, `gpu-node-1/gpu-3-mig-19-0-1`, and a network device of another
//!   driver), and only the node's ResourceSlices say what they are (a whole H100, and a
//!   `1g.10gb` instance of an A100); Kepler estimates its container's host energy;
//! - `tune`, an Akash lease holding a `1g.10gb` MIG instance through the device plugin, on a
//!   node without NVML: pod-resources names it by its own `MIG-…` UUID, dcgm-exporter by its
//!   parent's UUID with `GPU_I_PROFILE`, so its class (the parent's model) comes only from the
//!   exporter; the exporter is down for two ticks mid-run.
//!
//! The truth is the scenario's own timeline below, in milliseconds; the expected bills are
//! worked out from it by hand, at the kubelet's whole seconds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meterflow_ingest::Publisher;
use meterflow_ingest::sources::Source;
use meterflow_ingest::sources::kubelet::{KubeletConfig, KubeletSource};
use meterflow_ingest::sources::pod_resources::{
    self, PodResourcesConfig, PodResourcesSource, proto,
};
use meterflow_ingest::sources::prometheus_scrape::{LabelNames, ScrapeConfig, Scraper};
use serde_json::{Value, json};

use crate::common::{Pipeline, poll_json, token};

/// 2026-11-24T00:00:00Z: the agent's first tick.
const T0: i64 = 1_795_478_400_000;
const TICK_S: i64 = 15;
const LAST_S: i64 = 120;

const OWNER: &str = "akash1tenantccccccccccccccccccccccccccccccccc";
const NS_INFER: &str = "c4n8r2t6y0u3i7o1p5a9s2d6f0g4h8j1k5l9z3x7c1v5b";
const NS_TUNE: &str = "t9u3n7e1m5i9g3p7r1o5f4i8l2e6s0d4x8c2v6b0n4m8q";
/// The tune pod's MIG instance as pod-resources names it, and its parent as dcgm-exporter does.
const TUNE_MIG: &str = "MIG-0a1b2c3d-4e5f-5a6b-9c8d-7e6f5a4b3c2d";
const TUNE_PARENT: &str = "GPU-55555555-eeee-4a7b-8c9d-0e1f2a3b4c5d";

// ---- What happened, in milliseconds after T0 ----
/// The infer pod is taken on at 1.2 s; its container runs from 3.7 s on.
const INFER_POD_MS: i64 = 1_200;
const INFER_START: i64 = 3_700;
/// The tune pod is taken on at 8.1 s; its container runs from 10.5 s on.
const TUNE_POD_MS: i64 = 8_100;
const TUNE_START: i64 = 10_500;
/// dcgm-exporter answers 503 while it restarts: the ticks at 45 s and 60 s.
const EXPORTER_DOWN: (i64, i64) = (40_000, 65_000);
/// Kepler's model of the infer container's host power, in watts: CPU package (dynamic and
/// idle), DRAM, other; and the GPU's, which Kepler reports but the board measures.
const KEPLER_WATTS: [(&str, &str, i64); 5] = [
    ("package", "dynamic", 25),
    ("package", "idle", 5),
    ("dram", "dynamic", 4),
    ("other", "dynamic", 1),
    ("gpu", "dynamic", 250),
];

fn kube_time(ms: i64) -> String {
    meterflow_schemas::time::format_rfc3339((T0 + ms).div_euclid(1000) * 1000)
}

fn container_id(prefix: char) -> String {
    std::iter::repeat_n(prefix, 4)
        .chain("456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".chars())
        .collect()
}

/// An Akash lease's pod, as the provider creates it, with one running container.
fn akash_pod(
    (name, namespace, uid): (&str, &str, &str),
    (service, container, dseq): (&str, &str, &str),
    (pod_ms, start_ms, id): (i64, i64, char),
) -> Value {
    let hash = name.split('-').nth(1).expect("a pod-template hash");
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid,
            "labels": {"akash.network": "true", "akash.network/namespace": namespace,
                "akash.network/manifest-service": service, "pod-template-hash": hash},
            "ownerReferences": [{"kind": "ReplicaSet", "name": format!("{service}-{hash}"), "controller": true}]},
        "spec": {"containers": [{"name": container, "env": [
            {"name": "AKASH_OWNER", "value": OWNER},
            {"name": "AKASH_DEPLOYMENT_SEQUENCE", "value": dseq},
            {"name": "AKASH_GROUP_SEQUENCE", "value": "1"},
            {"name": "AKASH_ORDER_SEQUENCE", "value": "1"},
            {"name": "AKASH_PROVIDER", "value": "akash1provider"}]}]},
        "status": {"phase": "Running", "startTime": kube_time(pod_ms), "containerStatuses": [{
            "name": container, "restartCount": 0,
            "containerID": format!("containerd://{}", container_id(id)),
            "state": {"running": {"startedAt": kube_time(start_ms)}}, "lastState": {}}]}
    })
}

fn pods_at(t: i64) -> Value {
    let mut items = Vec::new();
    if t >= INFER_POD_MS {
        items.push(akash_pod(
            (
                "infer-6f7a8b9c0d-k3m5n",
                NS_INFER,
                "6c7d8e9f-5555-4c5d-9e8f-0123456789ab",
            ),
            ("infer", "server", "18250001"),
            (INFER_POD_MS, INFER_START, 'a'),
        ));
    }
    if t >= TUNE_POD_MS {
        items.push(akash_pod(
            (
                "tune-1a2b3c4d5e-p7q8r",
                NS_TUNE,
                "7d8e9f0a-6666-4c5d-9e8f-0123456789ab",
            ),
            ("tune", "tune", "18250002"),
            (TUNE_POD_MS, TUNE_START, 'b'),
        ));
    }
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
}

/// pod-resources: the infer container's DRA claims (a GPU claim; a MIG claim that also holds a
/// network device of another driver), the tune container's device-plugin MIG instance.
fn assignments() -> proto::ListPodResourcesResponse {
    let claimed = |driver: &str, device: &str| proto::ClaimResource {
        cdi_devices: vec![proto::CdiDevice {
            name: format!("k8s.{driver}/claim=0f4e2a1c-{device}"),
        }],
        driver_name: driver.into(),
        pool_name: "gpu-node-1".into(),
        device_name: device.into(),
    };
    let claim = |name: &str, resources| proto::DynamicResource {
        claim_name: name.into(),
        claim_namespace: NS_INFER.into(),
        claim_resources: resources,
    };
    proto::ListPodResourcesResponse {
        pod_resources: vec![
            proto::PodResources {
                name: "infer-6f7a8b9c0d-k3m5n".into(),
                namespace: NS_INFER.into(),
                containers: vec![proto::ContainerResources {
                    name: "server".into(),
                    devices: vec![],
                    dynamic_resources: vec![
                        claim("infer-gpu-x8k2m", vec![claimed("gpu.nvidia.com", "gpu-1")]),
                        claim(
                            "infer-mig-p2d7q",
                            vec![
                                claimed("gpu.nvidia.com", "gpu-3-mig-19-0-1"),
                                claimed("dra.net", "eth1"),
                            ],
                        ),
                    ],
                }],
            },
            proto::PodResources {
                name: "tune-1a2b3c4d5e-p7q8r".into(),
                namespace: NS_TUNE.into(),
                containers: vec![proto::ContainerResources {
                    name: "tune".into(),
                    devices: vec![proto::ContainerDevices {
                        resource_name: "nvidia.com/mig-1g.10gb".into(),
                        device_ids: vec![TUNE_MIG.into()],
                    }],
                    dynamic_resources: vec![],
                }],
            },
        ],
    }
}

/// dcgm-exporter at `t` (Kubernetes mode, no NVML on the node): the tune pod's MIG instance,
/// named by its parent's UUID, profile and GPU instance id.
fn dcgm_at(t: i64) -> String {
    let mut text = String::from(
        "# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.\n# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge\n",
    );
    if t >= TUNE_START {
        text += &format!(
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu=\"3\",UUID=\"{TUNE_PARENT}\",pci_bus_id=\"00000000:5D:00.0\",device=\"nvidia3\",modelName=\"NVIDIA A100-SXM4-80GB\",GPU_I_PROFILE=\"1g.10gb\",GPU_I_ID=\"7\",Hostname=\"gpu-node-1\",container=\"tune\",namespace=\"{NS_TUNE}\",pod=\"tune-1a2b3c4d5e-p7q8r\"}} 0.5\n"
        );
    }
    text
}

/// Kepler at `t`: the infer container's joules since Kepler first saw it (its start).
fn kepler_at(t: i64) -> String {
    let mut text = String::new();
    for (part, mode, watts) in KEPLER_WATTS {
        let joules = (t - INFER_START).max(0) as f64 * watts as f64 / 1e3;
        text += &format!(
            "kepler_container_{part}_joules_total{{container_id=\"{}\",container_namespace=\"{NS_INFER}\",pod_name=\"infer-6f7a8b9c0d-k3m5n\",container_name=\"server\",mode=\"{mode}\"}} {joules}\n",
            container_id('a')
        );
    }
    text
}

fn scraper(name: &str, url: String, preset: &str) -> Box<dyn Source> {
    Box::new(
        Scraper::new(&ScrapeConfig {
            name: name.into(),
            url,
            preset: preset.into(),
            map: vec![],
            labels: LabelNames::default(),
            metrics: vec![],
        })
        .expect("scraper"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_gpus_mig_named_by_the_exporter_and_kepler_energy_are_billed_through_an_outage() {
    let pipeline = Pipeline::start(1, 1).await;
    let brokers = pipeline.broker.bootstrap();

    // The kubelet, the API server's ResourceSlices, dcgm-exporter and Kepler.
    let now = Arc::new(Mutex::new(0i64));
    let refused = Arc::new(AtomicUsize::new(0));
    let (at, at2, at3, refusals) = (now.clone(), now.clone(), now.clone(), refused.clone());
    let app = axum::Router::new()
        .route(
            "/pods",
            axum::routing::get(move || {
                let t = *at.lock().expect("lock");
                async move { pods_at(t).to_string() }
            }),
        )
        .route(
            "/apis/resource.k8s.io/v1/resourceslices",
            axum::routing::get(|| async {
                include_str!("../../ingest/src/sources/fixtures/resource-slices.json")
            }),
        )
        .route(
            "/dcgm",
            axum::routing::get(move || {
                let t = *at2.lock().expect("lock");
                let refusals = refusals.clone();
                async move {
                    if (EXPORTER_DOWN.0..EXPORTER_DOWN.1).contains(&t) {
                        refusals.fetch_add(1, Ordering::SeqCst);
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, String::new())
                    } else {
                        (axum::http::StatusCode::OK, dcgm_at(t))
                    }
                }
            }),
        )
        .route(
            "/kepler",
            axum::routing::get(move || {
                let t = *at3.lock().expect("lock");
                async move { kepler_at(t) }
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

    let sources: Vec<Box<dyn Source>> = vec![
        Box::new(
            KubeletSource::new(&KubeletConfig {
                enabled: true,
                pods_url: format!("http://{http}/pods"),
                token_file: None,
                resource_slices_url: Some(format!(
                    "http://{http}/apis/resource.k8s.io/v1/resourceslices"
                )),
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
        scraper("dcgm", format!("http://{http}/dcgm"), "dcgm"),
        scraper("kepler", format!("http://{http}/kepler"), "kepler"),
    ];
    let mut node = crate::real_node::akash_collector(
        "gpu-node-1-dra",
        &[("H100", "h100"), ("A100", "a100")],
        sources,
    );

    let publisher = Publisher::new(&brokers).expect("producer");
    for k in 0..=LAST_S / TICK_S {
        let t = k * TICK_S * 1000;
        *now.lock().expect("lock") = t;
        let batch = node.tick(T0 + t).await;
        publisher.publish(&batch).await.expect("delivered");
    }
    // The fault happened: the agent asked the exporter at both ticks of its outage.
    assert_eq!(
        refused.load(Ordering::SeqCst),
        2,
        "the exporter was asked while down"
    );

    // ---- The bills, worked out by hand ----
    // infer runs from 00:03 (kubelet; physically 3.7 s) to the last reading at 02:00: 117 s
    // on the H100 its GPU claim got and 117 s on the A100 instance its MIG claim got (the
    // network device of the other driver is no GPU). tune runs from 00:10 (10.5 s) to 02:00:
    // 110 s on its `1g.10gb` instance, whose class is its parent's model as dcgm-exporter named
    // it (a100), through the exporter's outage without a second, class-less series.
    let infer_s = 117.0;
    let tune_s = 110.0;
    assert!((infer_s - (LAST_S * 1000 - INFER_START) as f64 / 1e3).abs() <= 1.0);
    assert!((tune_s - (LAST_S * 1000 - TUNE_START) as f64 / 1e3).abs() <= 1.0);
    // Kepler's estimate at the last reading, 116.3 s after the container started: package
    // 25 + 5 W, DRAM 4 W, other 1 W = 35 W × 116.3 s = 4,070.5 J; its 250 W of GPU are left
    // to the board's own counter.
    let infer_host_j = 4_070.5;
    // tune's slice is priced: a100 at 1.29 an hour, a 1g slice 1/7 of it, over 110 s.
    let tune_cost = 1.29 / 7.0 * tune_s / 3_600.0;

    let (from, to) = (T0, T0 + 3_600_000);
    let url = pipeline.url(&format!(
        "/v1/tenants/{OWNER}/usage?from={from}&to={to}&window=total&group_by=lease"
    ));
    let row = |v: &Value, lease: &str| -> Value {
        v["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["lease"] == lease)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let gpus = |row: &Value| -> Vec<(String, String, f64)> {
        row["gpu"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| {
                (
                    g["gpu_class"].as_str().unwrap_or("?").to_string(),
                    g["mig_profile"].as_str().unwrap_or("?").to_string(),
                    g["gpu_seconds"].as_f64().unwrap_or(-1.0),
                )
            })
            .collect()
    };
    let infer_gpus = vec![
        ("a100".to_string(), "1g.10gb".to_string(), infer_s),
        ("h100".to_string(), String::new(), infer_s),
    ];
    let tune_gpus = vec![("a100".to_string(), "1g.10gb".to_string(), tune_s)];
    let answer = poll_json(&url, &token(OWNER), Duration::from_secs(90), |v| {
        gpus(&row(v, "18250001.1.1")) == infer_gpus
            && gpus(&row(v, "18250002.1.1")) == tune_gpus
            && row(v, "18250001.1.1")["host_energy_joules"].as_f64() == Some(infer_host_j)
    })
    .await;
    let (infer, tune) = (row(&answer, "18250001.1.1"), row(&answer, "18250002.1.1"));
    assert_eq!(gpus(&infer), infer_gpus, "{answer}");
    assert_eq!(gpus(&tune), tune_gpus, "{answer}");
    assert_eq!(
        infer["gpu_seconds"].as_f64(),
        Some(2.0 * infer_s),
        "{answer}"
    );
    assert_eq!(tune["gpu_seconds"].as_f64(), Some(tune_s), "{answer}");
    assert_eq!(
        infer["host_energy_joules"].as_f64(),
        Some(infer_host_j),
        "{answer}"
    );
    let cost = tune["cost"].as_f64().expect("a cost");
    assert!(
        (cost - tune_cost).abs() < 1e-4,
        "tune's slice priced as an a100's seventh: {cost} against {tune_cost}"
    );
    grpc.abort();
    pipeline.stop().await;
}
