//! The node collector: every tick, reads each enabled source, attributes what it read to the
//! containers of this node and their identities, and makes the node's one [`SampleBatch`].
//!
//! - GPU allocations come from the pod-resources assignments (which container holds which
//!   GPU or MIG instance) and the kubelet's container runs (start and finish times, SPEC:
//!   allocation). A pending container (no run) holds nothing billable. A container's end is
//!   kept in memory: once its run is seen finished — in `state`, or in `lastState` after a
//!   restart — its allocations are sent with `finished_at`, even though the kubelet already
//!   lists the next run.
//! - Readings are addressed to containers by id (cgroup, NVML processes), by name
//!   (exporters), to pods (network) or to GPUs (NVML, DCGM without pod labels): each is resolved
//!   through the pods and the assignments, then given the container's identity
//!   ([`crate::attribution`]). A reading no container can be found for is counted and dropped —
//!   never published under an empty tenant.
//! - A failing source is retried alone with exponential backoff (one interval, doubling, at
//!   most a minute); one that cannot exist on the node (no NVML) is said once and stays off.
//!   The kubelet's pods and the assignments are kept for a bounded time (`max_stale`) when
//!   their source fails, so a kubelet hiccup does not empty the inventory.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use meterflow_schemas::{Sample, SampleBatch, SampleKind, SeriesId, metrics as m};
use tracing::{info, warn};

use crate::attribution::{Attribution, Identity};
use crate::metrics::{self, METRICS};
use crate::sources::kubelet::{Pod, Run};
use crate::sources::pod_resources::Assignment;
use crate::sources::{Collected, GpuInfo, Reading, Source, SourceError, Target};

/// Who this node is, for every series it sends.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node: String,
    pub provider: String,
    pub agent_id: String,
}

/// A source and its health.
struct Guarded {
    source: Box<dyn Source>,
    failures: u32,
    retry_at_ms: i64,
    off: bool,
}

/// Something kept from a source until it is too old.
struct Cached<T> {
    value: Option<T>,
    at_ms: i64,
}

impl<T> Cached<T> {
    fn new() -> Self {
        Cached {
            value: None,
            at_ms: 0,
        }
    }

    fn set(&mut self, value: Option<T>, now_ms: i64) {
        if let Some(v) = value {
            self.value = Some(v);
            self.at_ms = now_ms;
        }
    }

    fn get(&self, now_ms: i64, max_stale: Duration) -> Option<&T> {
        self.value
            .as_ref()
            .filter(|_| now_ms - self.at_ms <= max_stale.as_millis() as i64)
    }
}

/// The GPUs a container run was seen holding.
#[derive(Debug, Clone)]
struct Held {
    series: Vec<SeriesId>,
    started_at_ms: i64,
}

/// The collector of one node.
pub struct NodeCollector {
    me: NodeIdentity,
    interval: Duration,
    max_stale: Duration,
    attribution: Attribution,
    gpu_resources: Vec<String>,
    sources: Vec<Guarded>,
    pods: Cached<Vec<Pod>>,
    assignments: Cached<Vec<Assignment>>,
    gpus: Cached<Vec<GpuInfo>>,
    gpu_processes: Cached<Vec<(String, String)>>,
    /// Container runs holding GPUs, by container id, until their pod is gone.
    held: BTreeMap<String, Held>,
    sequence: i64,
}

/// Where a reading or an allocation lands.
struct Resolved<'a> {
    pod: &'a Pod,
    container: String,
    container_id: String,
}

impl NodeCollector {
    /// Checks that no metric comes from two sources (it would be counted twice).
    pub fn new(
        me: NodeIdentity,
        interval: Duration,
        max_stale: Duration,
        attribution: Attribution,
        gpu_resources: Vec<String>,
        sources: Vec<Box<dyn Source>>,
    ) -> Result<Self, SourceError> {
        let mut yielded: BTreeMap<String, String> = BTreeMap::new();
        for s in &sources {
            for metric in s.metrics() {
                if let Some(other) = yielded.insert(metric.clone(), s.name().to_string()) {
                    return Err(SourceError::Config(format!(
                        "sources {other} and {} both yield {metric}: it would be counted twice; keep it in one of them with their `metrics` allow-lists",
                        s.name()
                    )));
                }
            }
        }
        Ok(NodeCollector {
            me,
            interval,
            max_stale,
            attribution,
            gpu_resources,
            sources: sources
                .into_iter()
                .map(|source| Guarded {
                    source,
                    failures: 0,
                    retry_at_ms: 0,
                    off: false,
                })
                .collect(),
            pods: Cached::new(),
            assignments: Cached::new(),
            gpus: Cached::new(),
            gpu_processes: Cached::new(),
            held: BTreeMap::new(),
            sequence: 0,
        })
    }

    /// Reads every source that is due and makes the node's batch for `now_ms`.
    pub async fn tick(&mut self, now_ms: i64) -> SampleBatch {
        // The sources due are read side by side: one slow source delays the tick by its own
        // time (each has a timeout), not by the sum of all.
        let results = futures_util::future::join_all(self.sources.iter_mut().map(|g| async move {
            let due = !g.off && now_ms >= g.retry_at_ms;
            let result = if due {
                Some(g.source.collect().await)
            } else {
                None
            };
            (g, result)
        }))
        .await;
        let mut readings = Vec::new();
        for (g, result) in results {
            let Some(result) = result else { continue };
            let name = g.source.name().to_string();
            match result {
                Ok(collected) => {
                    if g.failures > 0 {
                        info!(source = %name, after = g.failures, "source recovered");
                    }
                    g.failures = 0;
                    metrics::set_source(&name, true);
                    let Collected {
                        readings: r,
                        pods,
                        assignments,
                        gpus,
                        gpu_processes,
                    } = collected;
                    readings.extend(r.into_iter().map(|r| (name.clone(), r)));
                    self.pods.set(pods, now_ms);
                    self.assignments.set(assignments, now_ms);
                    self.gpus.set(gpus, now_ms);
                    self.gpu_processes.set(gpu_processes, now_ms);
                }
                Err(SourceError::Unavailable(why)) | Err(SourceError::Config(why)) => {
                    warn!(source = %name, %why, "source off for the life of this agent");
                    g.off = true;
                    metrics::set_source_off(&name);
                }
                Err(SourceError::Failed(why)) => {
                    g.failures += 1;
                    let backoff = (self.interval.as_millis() as i64)
                        .saturating_mul(1 << (g.failures - 1).min(10))
                        .min(60_000);
                    g.retry_at_ms = now_ms + backoff;
                    METRICS.source_errors.with_label_values(&[&name]).inc();
                    if g.failures == 1 {
                        warn!(source = %name, %why, retry_in_ms = backoff, "source failed; retrying with backoff, the others go on");
                    } else {
                        tracing::debug!(source = %name, %why, failures = g.failures, "source still failing");
                    }
                    metrics::set_source(&name, false);
                }
            }
        }
        let samples = self.attribute(now_ms, readings);
        self.sequence += 1;
        SampleBatch {
            node: self.me.node.clone(),
            agent_id: self.me.agent_id.clone(),
            sequence: self.sequence,
            collected_at_ms: now_ms,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            samples,
        }
    }

    /// Allocations and readings as samples of their containers' series.
    fn attribute(&mut self, now_ms: i64, readings: Vec<(String, Reading)>) -> Vec<Sample> {
        let mut samples = Vec::new();
        let mut unattributed = 0u64;
        let empty = Vec::new();
        let pods = self.pods.get(now_ms, self.max_stale).unwrap_or(&empty);
        let empty_a = Vec::new();
        let assignments = self
            .assignments
            .get(now_ms, self.max_stale)
            .unwrap_or(&empty_a);
        // What each GPU is: NVML's inventory first, then what exporters' labels say.
        let mut gpu_info: BTreeMap<String, GpuInfo> = self
            .gpus
            .get(now_ms, self.max_stale)
            .into_iter()
            .flatten()
            .map(|g| (g.uuid.clone(), g.clone()))
            .collect();
        for g in readings.iter().filter_map(|(_, r)| r.gpu.as_ref()) {
            if !g.model.is_empty() {
                gpu_info.entry(g.uuid.clone()).or_insert_with(|| g.clone());
            }
        }

        // Container runs by id and by name.
        let mut by_id: BTreeMap<&str, (&Pod, &str, &Run)> = BTreeMap::new();
        let mut by_name: BTreeMap<(&str, &str, &str), (&Pod, &Run)> = BTreeMap::new();
        let mut first: BTreeMap<(&str, &str), (&str, &Run)> = BTreeMap::new();
        for pod in pods {
            let mut names: Vec<&str> = Vec::new();
            for c in &pod.containers {
                for run in c.current.iter().chain(c.previous.iter()) {
                    by_id.insert(&run.container_id, (pod, &c.name, run));
                }
                if let Some(run) = &c.current {
                    by_name.insert((&pod.namespace, &pod.name, &c.name), (pod, run));
                    names.push(&c.name);
                }
            }
            names.sort();
            if let Some(name) = names.first()
                && let Some((_, run)) =
                    by_name.get(&(pod.namespace.as_str(), pod.name.as_str(), *name))
            {
                first.insert((&pod.namespace, &pod.name), (name, run));
            }
        }
        let resolved = |pod: &'_ Pod, container: &str, run: &Run| -> Option<(Identity, String)> {
            let id = self.attribution.identify(pod, container)?;
            Some((id, run.container_id.clone()))
        };

        let series_of = |identity: &Identity, container_id: &str, gpu: Option<&GpuInfo>| {
            let gpu = gpu.map(|g| {
                // NVML knows the model and profile best; an exporter's or the assignment's
                // fill in what it lacks.
                let known = gpu_info.get(g.uuid.as_str());
                let model = known
                    .map(|k| k.model.clone())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| g.model.clone());
                let mig = known
                    .map(|k| k.mig_profile.clone())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| g.mig_profile.clone());
                (g.uuid.clone(), model, mig)
            });
            let (uuid, model, mig) = gpu.unwrap_or_default();
            SeriesId {
                tenant: identity.tenant.clone(),
                lease: identity.lease.clone(),
                service: identity.service.clone(),
                replica: identity.replica.clone(),
                node: self.me.node.clone(),
                provider: self.me.provider.clone(),
                container_id: container_id.to_string(),
                gpu_class: if uuid.is_empty() {
                    String::new()
                } else {
                    self.attribution.gpu_class(&model)
                },
                gpu_uuid: uuid,
                gpu_model: model,
                mig_profile: mig,
            }
        };

        // GPU holders: from the assignments, then from the processes NVML saw.
        let mut holder: BTreeMap<String, (&Pod, String, &Run)> = BTreeMap::new();
        let mut now_held: BTreeMap<String, Held> = BTreeMap::new();
        for a in assignments {
            if !crate::sources::pod_resources::is_gpu(&self.gpu_resources, &a.resource) {
                continue;
            }
            let Some(&(pod, run)) =
                by_name.get(&(a.namespace.as_str(), a.pod.as_str(), a.container.as_str()))
            else {
                // Pending (no run yet) or a pod the kubelet has not listed: nothing to bill.
                continue;
            };
            for device in &a.device_ids {
                holder.insert(device.clone(), (pod, a.container.clone(), run));
            }
            let Some((identity, container_id)) = resolved(pod, &a.container, run) else {
                unattributed += a.device_ids.len() as u64;
                continue;
            };
            let held = now_held.entry(container_id.clone()).or_insert(Held {
                series: Vec::new(),
                started_at_ms: run.started_at_ms,
            });
            for device in &a.device_ids {
                let info = GpuInfo {
                    uuid: device.clone(),
                    model: String::new(),
                    mig_profile: a.mig_profile().to_string(),
                };
                held.series
                    .push(series_of(&identity, &container_id, Some(&info)));
            }
        }
        for (gpu, container_id) in self
            .gpu_processes
            .get(now_ms, self.max_stale)
            .into_iter()
            .flatten()
        {
            if let (false, Some(&(pod, name, run))) =
                (holder.contains_key(gpu), by_id.get(container_id.as_str()))
            {
                holder.insert(gpu.clone(), (pod, name.to_string(), run));
            }
        }
        // Runs seen holding GPUs before and now finished (or gone from the kubelet's list).
        for (id, held) in &now_held {
            self.held.insert(id.clone(), held.clone());
        }
        let mut ended = BTreeSet::new();
        for (id, held) in &self.held {
            let finished = by_id
                .get(id.as_str())
                .and_then(|(_, _, run)| run.finished_at_ms);
            let listed = by_id.contains_key(id.as_str());
            if !listed && !pods.is_empty() {
                // The pod is gone: the processor closes the run at its last observation.
                ended.insert(id.clone());
                continue;
            }
            if !listed {
                continue;
            }
            for series in &held.series {
                samples.push(Sample {
                    series: series.clone(),
                    kind: SampleKind::Allocation,
                    metric: m::GPU.into(),
                    value: 1.0,
                    // When it was observed, not when it ended: a run seen finished long after
                    // (a Job pod the kubelet still lists) must not look late to the processor;
                    // the interval itself is in started_at/finished_at.
                    timestamp_ms: now_ms,
                    started_at_ms: Some(held.started_at_ms),
                    finished_at_ms: finished,
                });
            }
        }
        for id in ended {
            self.held.remove(&id);
        }

        for (source, r) in readings {
            let target: Option<Resolved> = match &r.target {
                Target::Container(id) => by_id.get(id.as_str()).map(|&(pod, name, run)| Resolved {
                    pod,
                    container: name.to_string(),
                    container_id: run.container_id.clone(),
                }),
                Target::Named {
                    namespace,
                    pod,
                    container,
                } => by_name
                    .get(&(namespace.as_str(), pod.as_str(), container.as_str()))
                    .map(|&(pod, run)| Resolved {
                        pod,
                        container: container.clone(),
                        container_id: run.container_id.clone(),
                    }),
                Target::Pod { namespace, pod } => first
                    .get(&(namespace.as_str(), pod.as_str()))
                    .and_then(|&(name, run)| {
                        let (pod, _) = by_name.get(&(namespace.as_str(), pod.as_str(), name))?;
                        Some(Resolved {
                            pod,
                            container: name.to_string(),
                            container_id: run.container_id.clone(),
                        })
                    }),
                Target::Gpu(uuid) => holder.get(uuid).map(|(pod, name, run)| Resolved {
                    pod,
                    container: name.clone(),
                    container_id: run.container_id.clone(),
                }),
            };
            let identity = target.and_then(|t| {
                let id = self.attribution.identify(t.pod, &t.container)?;
                Some((id, t.container_id))
            });
            let Some((identity, container_id)) = identity else {
                unattributed += 1;
                METRICS.unattributed.with_label_values(&[&source]).inc();
                continue;
            };
            samples.push(Sample {
                series: series_of(&identity, &container_id, r.gpu.as_ref()),
                kind: r.kind,
                metric: r.metric,
                value: r.value,
                timestamp_ms: now_ms,
                started_at_ms: None,
                finished_at_ms: None,
            });
        }
        if unattributed > 0 {
            tracing::debug!(
                unattributed,
                "readings no container of this node could be found for"
            );
        }
        samples
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::attribution::AttributionConfig;
    use crate::sources::cgroup::{CgroupConfig, CgroupSource};
    use crate::sources::kubelet::{KubeletConfig, KubeletSource};
    use crate::sources::pod_resources::{self, PodResourcesConfig, PodResourcesSource};
    use crate::sources::prometheus_scrape::{LabelNames, ScrapeConfig, Scraper};

    const PODS: &str = include_str!("sources/fixtures/kubelet-pods.json");

    fn id(prefix: &str) -> String {
        format!("{prefix}456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    }

    /// A one-route HTTP/1.1 server on loopback answering whatever `answer` holds now.
    async fn http(answer: Arc<Mutex<(u16, String)>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (status, body) = answer.lock().expect("answer").clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(body.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    /// A cgroup tree with the web pod's container (current run `aaaa…`) and a container no
    /// pod lists.
    fn cgroups(root: &std::path::Path) {
        let write = |dir: &std::path::Path, file: &str, text: &str| {
            std::fs::create_dir_all(dir).expect("dir");
            std::fs::write(dir.join(file), text).expect("file");
        };
        write(root, "cgroup.controllers", "cpu memory io\n");
        for (pod, container, usec) in [
            ("kubepods-pod7f1c2a3b_1111.slice", id("aaaa"), 90_000_000u64),
            ("kubepods-pod00000000_9999.slice", id("eeee"), 5_000_000),
        ] {
            let dir = root
                .join("kubepods.slice")
                .join(pod)
                .join(format!("cri-containerd-{container}.scope"));
            write(&dir, "cpu.stat", &format!("usage_usec {usec}\n"));
            write(&dir, "memory.current", "3000\n");
            write(&dir, "memory.stat", "inactive_file 1000\n");
            write(&dir, "io.stat", "259:0 rbytes=10 wbytes=20\n");
        }
    }

    #[tokio::test]
    async fn a_node_attributes_allocations_and_readings_and_survives_its_kubelet_failing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cgroup_root = dir.path().join("cgroup");
        cgroups(&cgroup_root);
        let socket = dir.path().join("kubelet.sock");
        let grpc = pod_resources::fake::serve(socket.clone(), Ok(pod_resources::tests::fixture()))
            .await
            .expect("fake socket");
        let kubelet = Arc::new(Mutex::new((200, PODS.to_string())));
        let kubelet_url = http(kubelet.clone()).await;
        let dcgm = Arc::new(Mutex::new((
            200,
            include_str!("sources/fixtures/dcgm-exporter.txt").to_string(),
        )));
        let dcgm_url = http(dcgm.clone()).await;

        let sources: Vec<Box<dyn Source>> = vec![
            Box::new(
                KubeletSource::new(&KubeletConfig {
                    enabled: true,
                    pods_url: format!("{kubelet_url}/pods"),
                    token_file: None,
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
                    root: cgroup_root,
                    proc_root: None,
                    metrics: vec![],
                })
                .expect("cgroup"),
            ),
            Box::new(
                Scraper::new(&ScrapeConfig {
                    name: "dcgm".into(),
                    url: format!("{dcgm_url}/metrics"),
                    preset: "dcgm".into(),
                    map: vec![],
                    labels: LabelNames::default(),
                    metrics: vec![m::GPU_UTILIZATION.into()],
                })
                .expect("dcgm"),
            ),
        ];
        let attribution = Attribution::new(&AttributionConfig {
            preset: "akash".into(),
            gpu_classes: vec![("H100".into(), "h100".into())],
            ..Default::default()
        })
        .expect("rules");
        let mut node = NodeCollector::new(
            NodeIdentity {
                node: "gpu-node-1".into(),
                provider: "akash1provider".into(),
                agent_id: "gpu-node-1".into(),
            },
            Duration::from_secs(1),
            Duration::from_secs(600),
            attribution,
            PodResourcesConfig::default().gpu_resources,
            sources,
        )
        .expect("collector");
        let t0 = meterflow_schemas::time::parse_time("2026-11-23T10:10:00Z").expect("time");
        let started = meterflow_schemas::time::parse_time("2026-11-23T10:05:00Z").expect("time");

        let batch = node.tick(t0).await;
        assert_eq!((batch.node.as_str(), batch.sequence), ("gpu-node-1", 1));
        let gpus: Vec<&Sample> = batch
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Allocation)
            .collect();
        // The web container's two H100s; the trainer is not an Akash lease, so not billed here.
        assert_eq!(gpus.len(), 2, "{gpus:#?}");
        for g in &gpus {
            assert_eq!(
                g.series.tenant,
                "akash1tenantaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            );
            assert_eq!(g.series.lease, "18231234.1.1");
            assert_eq!(g.series.service, "web");
            assert_eq!(g.series.container_id, id("aaaa"));
            assert_eq!(g.series.provider, "akash1provider");
            assert_eq!(g.started_at_ms, Some(started));
            assert_eq!(g.finished_at_ms, None);
            assert_eq!(g.metric, m::GPU);
            // The model and class come from DCGM's labels (NVML's, where it runs).
            assert_eq!(
                (g.series.gpu_model.as_str(), g.series.gpu_class.as_str()),
                ("NVIDIA H100 80GB HBM3", "h100")
            );
        }
        // cgroup: the web container's counters under its identity; the unknown container
        // is dropped, not billed to an empty tenant.
        let cpu: Vec<&Sample> = batch
            .samples
            .iter()
            .filter(|s| s.metric == m::CPU_SECONDS)
            .collect();
        assert_eq!(cpu.len(), 1);
        assert_eq!(cpu[0].value, 90.0);
        assert_eq!(cpu[0].series.lease, "18231234.1.1");
        let memory = batch
            .samples
            .iter()
            .find(|s| s.metric == m::MEMORY_BYTES)
            .expect("memory");
        assert_eq!(memory.value, 2000.0);
        // DCGM: utilization of the two held GPUs, with model and class from the labels.
        let util: Vec<&Sample> = batch
            .samples
            .iter()
            .filter(|s| s.metric == m::GPU_UTILIZATION)
            .collect();
        assert_eq!(util.len(), 2, "{util:#?}");
        assert!(util.iter().all(|s| s.series.gpu_class == "h100"
            && s.series.container_id == id("aaaa")
            && s.series.gpu_model == "NVIDIA H100 80GB HBM3"));
        assert!(batch.samples.iter().all(|s| !s.series.tenant.is_empty()));

        // The kubelet fails: its last pod list is used, the other sources go on, and the
        // failure shows in the source's health.
        *kubelet.lock().expect("answer") = (500, "oops".into());
        let batch = node.tick(t0 + 1_000).await;
        assert_eq!(batch.sequence, 2);
        assert_eq!(
            batch
                .samples
                .iter()
                .filter(|s| s.kind == SampleKind::Allocation)
                .count(),
            2
        );
        assert!(batch.samples.iter().any(|s| s.metric == m::CPU_SECONDS));
        assert_eq!(
            METRICS.source_up.with_label_values(&["kubelet"]).get(),
            0,
            "the kubelet is down"
        );
        assert!(METRICS.source_errors.with_label_values(&["kubelet"]).get() >= 1);

        // The kubelet is back and the container restarted: the old run is sent finished,
        // the new one starts.
        let restarted = PODS
            .replacen(&id("bbbb"), &id("aaaa"), 1)
            .replacen("2026-11-23T10:04:30Z", "2026-11-23T10:10:01.500Z", 1)
            .replacen("2026-11-23T10:00:00Z", "2026-11-23T10:05:00Z", 1)
            .replacen(
                &format!("containerd://{}\",\n            \"state\": {{\"running\": {{\"startedAt\": \"2026-11-23T10:05:00Z\"", id("aaaa")),
                &format!("containerd://{}\",\n            \"state\": {{\"running\": {{\"startedAt\": \"2026-11-23T10:10:02Z\"", id("dddd")),
                1,
            );
        assert!(restarted.contains(&id("dddd")), "the fixture edit applied");
        *kubelet.lock().expect("answer") = (200, restarted);
        // Past the backoff (one interval after the first failure).
        let batch = node.tick(t0 + 5_000).await;
        let allocations: Vec<(&str, Option<i64>, Option<i64>)> = batch
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Allocation)
            .map(|s| {
                (
                    &s.series.container_id[..4],
                    s.started_at_ms,
                    s.finished_at_ms,
                )
            })
            .collect();
        let finished = meterflow_schemas::time::parse_time("2026-11-23T10:10:01.500Z");
        let restarted_at = meterflow_schemas::time::parse_time("2026-11-23T10:10:02Z");
        assert_eq!(
            allocations
                .iter()
                .filter(|a| **a == ("aaaa", Some(started), finished))
                .count(),
            2,
            "{allocations:?}"
        );
        assert_eq!(
            allocations
                .iter()
                .filter(|a| **a == ("dddd", restarted_at, None))
                .count(),
            2,
            "{allocations:?}"
        );
        // Stamped with the tick that observed them, the finished run too: a run seen ended
        // long after its end must not look late to the processor.
        assert!(
            batch.samples.iter().all(|s| s.timestamp_ms == t0 + 5_000),
            "{:#?}",
            batch.samples
        );
        assert_eq!(METRICS.source_up.with_label_values(&["kubelet"]).get(), 1);
        grpc.abort();
    }
}
