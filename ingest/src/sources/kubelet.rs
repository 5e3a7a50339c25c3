//! The kubelet source: the pods of this node with their labels, owners and container runs, from
//! the kubelet's `/pods` endpoint (the same answer as the API server's pod list for the node,
//! without loading the API server from every node).
//!
//! A container run is what the runtime reports: its id, `startedAt` and, once it ended,
//! `finishedAt` — the interval a GPU allocation is billed over (SPEC: allocation). A container
//! that restarted has its current run in `state` and the previous one in `lastState`; both are
//! kept, so the end of a run is never lost to a quick restart.
//!
//! Attribution also reads each container's literal environment (`env[].value` in the pod spec;
//! `valueFrom` is not resolved) — the Akash provider writes the lease id there — and, where
//! `namespaces_url` is set, the labels of the pod's namespace from the API server (the Akash
//! provider puts the lease id labels on the namespace, not on the pod). The namespace list is
//! read again every `api_refresh`, and at once (at most once a second) when a pod's
//! namespace is not in it yet; while the API server fails, the last list stays in use. Where
//! `resource_slices_url` is set, the node's DRA ResourceSlices are read the same way: they say
//! what each device a DRA claim names is (UUID, model, MIG profile). Where `summary_url` is
//! set, the kubelet's stats summary gives each pod's persistent volumes' usage, capacity and
//! inodes (see [`parse_summary`]); when it fails, the pods are read all the same.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use meterflow_schemas::SampleKind;
use meterflow_schemas::metrics as m;

use super::{DraDevice, GpuInfo, Reading, Scope, SourceError, Target};

/// Where and how the kubelet is reached.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubeletConfig {
    pub enabled: bool,
    /// The kubelet's pod list: `https://127.0.0.1:10250/pods` on the host network, the
    /// read-only `http://…:10255/pods` where that port is open, or the API server's list of
    /// this node's pods (`https://kubernetes.default.svc/api/v1/pods?fieldSelector=spec.nodeName=${NODE_NAME}`;
    /// each `${NAME}` is replaced by that environment variable).
    pub pods_url: String,
    /// A bearer token file (the service account's token) sent to the kubelet.
    pub token_file: Option<PathBuf>,
    /// A PEM file of the CA that signed the kubelet's serving certificate.
    pub ca_file: Option<PathBuf>,
    /// Accept any serving certificate (kubelets with self-signed certificates).
    pub insecure_skip_tls_verify: bool,
    /// How long a pod list the kubelet no longer answers is still used to attribute readings.
    #[serde(with = "super::duration")]
    pub max_stale: Duration,
    /// The API server's namespace list, for `{namespace_label:KEY}` in attribution templates
    /// (in a pod: `https://${KUBERNETES_SERVICE_HOST}:${KUBERNETES_SERVICE_PORT}/api/v1/namespaces`;
    /// the service account needs `list` on `namespaces`).
    /// Unset: no namespace labels are read, and such placeholders never resolve.
    pub namespaces_url: Option<String>,
    /// The API server's ResourceSlices of this node, for GPUs allocated through DRA
    /// (`https://${KUBERNETES_SERVICE_HOST}:${KUBERNETES_SERVICE_PORT}/apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName=${NODE_NAME}`;
    /// needs `list` on `resourceslices`). Unset: DRA devices are not resolved, and not billed.
    pub resource_slices_url: Option<String>,
    /// The kubelet's stats summary (`https://127.0.0.1:10250/stats/summary`; the service
    /// account needs `get` on `nodes/stats`), for each pod's persistent volumes:
    /// `filesystem_usage_bytes`, `filesystem_capacity_bytes`, `filesystem_inodes_used`. Unset:
    /// not read. Read with `ca_file`, `insecure_skip_tls_verify` and `token_file`, as the pods.
    pub summary_url: Option<String>,
    /// A PEM file of the CA that signed the API server's certificate (for `namespaces_url` and
    /// `resource_slices_url`).
    pub api_ca_file: Option<PathBuf>,
    /// How often the namespaces and the ResourceSlices are read again.
    #[serde(with = "super::duration")]
    pub api_refresh: Duration,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        KubeletConfig {
            enabled: false,
            pods_url: "https://127.0.0.1:10250/pods".into(),
            token_file: Some("/var/run/secrets/kubernetes.io/serviceaccount/token".into()),
            ca_file: None,
            insecure_skip_tls_verify: false,
            max_stale: Duration::from_secs(600),
            namespaces_url: None,
            resource_slices_url: None,
            summary_url: None,
            api_ca_file: Some("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into()),
            api_refresh: Duration::from_secs(60),
        }
    }
}

/// One pod of the node, as much as attribution needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The labels of the pod's namespace (empty when namespaces are not read, or not yet).
    pub namespace_labels: BTreeMap<String, String>,
    /// The controller that owns the pod (kind, name), if any.
    pub owner: Option<(String, String)>,
    /// `status.startTime`: when the kubelet took the pod on (its sandbox, and so its network
    /// namespace, is not older); whole seconds.
    pub started_at_ms: Option<i64>,
    pub containers: Vec<Container>,
}

/// One container of a pod and its runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Container {
    pub name: String,
    pub restarts: i64,
    /// The run in `state` (running, or terminated and not restarted).
    pub current: Option<Run>,
    /// The run in `lastState` (the one before a restart).
    pub previous: Option<Run>,
    /// The literal environment of the container's spec (`env[].value`; `valueFrom` entries
    /// are left out).
    pub env: BTreeMap<String, String>,
    /// The whole-number limits of the container's spec (`resources.limits`: extended
    /// resources such as `nvidia.com/gpu`; quantities like `500m` or `4Gi` are left out).
    pub limits: BTreeMap<String, i64>,
    /// The cores and memory the container's spec requests.
    pub requests: Requests,
    /// The cores and memory the container's spec limits it to (`resources.limits` alone: no
    /// limit is no limit).
    pub limited: Requests,
}

/// The cores and memory of a container's spec. As its requests (`resources.requests`), what the
/// scheduler reserves: a request left out where a limit is set is the limit (the API server's
/// defaulting, which the kubelet's answer already shows; applied here again for a static pod's
/// spec). As its limits, `resources.limits`. `None` where not set, or the quantity cannot be
/// read (a warning says which).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    /// Millicores (`"500m"`, `"2"`), rounded up to the millicore as Kubernetes does.
    pub cpu_millicores: Option<i64>,
    /// Bytes (`"4Gi"`, `"129e6"`).
    pub memory_bytes: Option<i64>,
}

/// One run of a container, as the runtime reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The runtime's id without its scheme (`containerd://`, `cri-o://`, `docker://`).
    pub container_id: String,
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

impl Pod {
    /// The container named `name`, if the pod has it.
    pub fn container(&self, name: &str) -> Option<&Container> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// The workload the pod belongs to: its owner's name (a ReplicaSet's pod-template hash
    /// removed, so a Deployment's pods share it), or the pod's name when it has no owner.
    pub fn workload(&self) -> String {
        match &self.owner {
            Some((kind, name)) if kind == "ReplicaSet" => {
                match self.labels.get("pod-template-hash") {
                    Some(hash) => name
                        .strip_suffix(hash.as_str())
                        .and_then(|n| n.strip_suffix('-'))
                        .unwrap_or(name)
                        .to_string(),
                    None => name.clone(),
                }
            }
            Some((_, name)) => name.clone(),
            None => self.name.clone(),
        }
    }
}

/// Parses the kubelet's (or the API server's) pod list JSON.
pub fn parse_pods(json: &[u8]) -> Result<Vec<Pod>, String> {
    let list: wire::PodList =
        serde_json::from_slice(json).map_err(|e| format!("not a pod list: {e}"))?;
    Ok(list.items.into_iter().map(wire::Pod::into_pod).collect())
}

/// Parses the API server's namespace list JSON: each namespace's labels by name.
pub fn parse_namespaces(json: &[u8]) -> Result<BTreeMap<String, BTreeMap<String, String>>, String> {
    let list: wire::NamespaceList =
        serde_json::from_slice(json).map_err(|e| format!("not a namespace list: {e}"))?;
    Ok(list
        .items
        .into_iter()
        .map(|n| (n.metadata.name, n.metadata.labels))
        .collect())
}

/// `text` with each `${NAME}` replaced by the environment variable (empty when unset), e.g.
/// `${NODE_NAME}` or `${KUBERNETES_SERVICE_HOST}`.
pub fn expand_env(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("${") {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&std::env::var(&rest[open + 2..open + close]).unwrap_or_default());
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// One HTTPS endpoint of the cluster, read with the service account's token.
struct Endpoint {
    http: reqwest::Client,
    url: String,
    token_file: Option<PathBuf>,
}

impl Endpoint {
    fn new(
        key: &str,
        url: &str,
        ca_file: Option<&PathBuf>,
        insecure: bool,
        token_file: Option<PathBuf>,
    ) -> Result<Self, SourceError> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .danger_accept_invalid_certs(insecure);
        // A CA file that is not there (no service account mounted) leaves the system roots.
        if let Some(ca) = ca_file.filter(|ca| ca.exists()) {
            let pem = std::fs::read(ca).map_err(|e| {
                SourceError::Config(format!("{key}: cannot read {}: {e}", ca.display()))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                SourceError::Config(format!(
                    "{key}: {} is not a PEM certificate: {e}",
                    ca.display()
                ))
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| SourceError::Config(format!("{key}: {e}")))?;
        Ok(Endpoint {
            http,
            url: expand_env(url),
            token_file,
        })
    }

    /// The body of a GET; `needs` says which permission a 401 or 403 lacks.
    async fn get(&self, needs: &str) -> Result<bytes::Bytes, SourceError> {
        let mut request = self.http.get(&self.url);
        // The token is read on every call: projected service-account tokens rotate.
        if let Some(file) = &self.token_file {
            match std::fs::read_to_string(file) {
                Ok(token) => request = request.bearer_auth(token.trim()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(SourceError::Failed(format!(
                        "cannot read token {}: {e}",
                        file.display()
                    )));
                }
            }
        }
        let failed = |e: reqwest::Error| {
            SourceError::Failed(format!("GET {}: {}", self.url, crate::error_chain(&e)))
        };
        let response = request.send().await.map_err(failed)?;
        let status = response.status();
        let body = response.bytes().await.map_err(failed)?;
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => format!(" (the agent's service account needs {needs})"),
                _ => String::new(),
            };
            return Err(SourceError::Failed(format!(
                "GET {} answered {status}{hint}",
                self.url
            )));
        }
        Ok(body)
    }
}

/// Parses the API server's ResourceSlice list (`resource.k8s.io` v1, or v1beta1 where the
/// attributes sit under `basic`): each device with a `uuid` attribute, as a GPU. NVIDIA's
/// driver publishes `uuid`, `productName` and, for a MIG device, `profile`.
pub fn parse_resource_slices(json: &[u8]) -> Result<Vec<DraDevice>, String> {
    let list: wire::SliceList =
        serde_json::from_slice(json).map_err(|e| format!("not a ResourceSlice list: {e}"))?;
    let mut out = Vec::new();
    for slice in list.items {
        let spec = slice.spec;
        for device in spec.devices {
            let mut attributes = device.attributes;
            if let Some(basic) = device.basic {
                attributes.extend(basic.attributes);
            }
            // An attribute's name may carry its driver's domain (`gpu.nvidia.com/uuid`).
            let attribute = |name: &str| {
                attributes.iter().find_map(|(k, v)| {
                    (k.rsplit('/').next() == Some(name))
                        .then(|| v.string.clone())
                        .flatten()
                })
            };
            let Some(uuid) = attribute("uuid") else {
                continue;
            };
            out.push(DraDevice {
                driver: spec.driver.clone(),
                pool: spec.pool.name.clone(),
                name: device.name,
                gpu: GpuInfo {
                    uuid,
                    model: attribute("productName").unwrap_or_default(),
                    mig_profile: attribute("profile").unwrap_or_default(),
                },
            });
        }
    }
    Ok(out)
}

/// The metrics of the stats summary.
pub const SUMMARY_METRICS: [&str; 3] = [
    m::FILESYSTEM_USAGE,
    m::FILESYSTEM_CAPACITY,
    m::FILESYSTEM_INODES_USED,
];

/// Each pod's persistent volumes (those with a `pvcRef`) in the kubelet's stats summary
/// (`/stats/summary`, `k8s.io/kubelet/pkg/apis/stats/v1alpha1`), summed per pod: bytes used,
/// capacity in bytes and inodes used, as gauges of the pod (given to its first container).
/// The pod's other volumes are left out: configMaps, secrets and service-account tokens are
/// not the tenant's storage, and an `emptyDir` is on the node's own filesystem, whose capacity
/// the kubelet reports for it. A figure the kubelet leaves out (a volume not measured yet) is
/// absent for the pod, never zero.
pub fn parse_summary(json: &[u8]) -> Result<Vec<Reading>, String> {
    let summary: wire::Summary =
        serde_json::from_slice(json).map_err(|e| format!("not a stats summary: {e}"))?;
    let mut readings = Vec::new();
    for pod in summary.pods {
        let persistent: Vec<&wire::VolumeStats> =
            pod.volume.iter().filter(|v| v.pvc_ref.is_some()).collect();
        if persistent.is_empty() {
            continue;
        }
        // In the order of SUMMARY_METRICS.
        let figures = |v: &wire::VolumeStats| [v.used_bytes, v.capacity_bytes, v.inodes_used];
        for (i, metric) in SUMMARY_METRICS.into_iter().enumerate() {
            let Some(sum) = persistent
                .iter()
                .map(|v| figures(v)[i])
                .sum::<Option<u64>>()
            else {
                continue;
            };
            readings.push(Reading {
                target: Target::Pod {
                    namespace: pod.pod_ref.namespace.clone(),
                    pod: pod.pod_ref.name.clone(),
                },
                gpu: None,
                kind: SampleKind::Gauge,
                metric: metric.to_string(),
                value: sum as f64,
                scope: Scope::Container,
            });
        }
    }
    Ok(readings)
}

/// Reads the pod list from the kubelet.
pub struct KubeletClient {
    pods: Endpoint,
}

impl KubeletClient {
    pub fn new(config: &KubeletConfig) -> Result<Self, SourceError> {
        Ok(KubeletClient {
            pods: Endpoint::new(
                "sources.kubelet.ca_file",
                &config.pods_url,
                config.ca_file.as_ref(),
                config.insecure_skip_tls_verify,
                config.token_file.clone(),
            )?,
        })
    }

    /// The node's pods now.
    pub async fn pods(&self) -> Result<Vec<Pod>, SourceError> {
        let body = self.pods.get("get on nodes/proxy").await?;
        parse_pods(&body).map_err(|e| SourceError::Failed(format!("GET {}: {e}", self.pods.url)))
    }
}

/// A list read from the API server now and then (the namespaces, the ResourceSlices): while
/// the API server fails, the last list read stays in use and the failure is said once.
struct ApiList<T> {
    endpoint: Option<Endpoint>,
    /// What is read, for logs and `meterflow_agent_source_errors_total{source}`.
    name: &'static str,
    /// The permission a 401 or 403 lacks.
    needs: &'static str,
    parse: fn(&[u8]) -> Result<T, String>,
    last: Option<T>,
    read_at: Option<std::time::Instant>,
    failing: bool,
}

impl<T> ApiList<T> {
    fn new(
        config: &KubeletConfig,
        url: &Option<String>,
        (name, needs): (&'static str, &'static str),
        parse: fn(&[u8]) -> Result<T, String>,
    ) -> Result<Self, SourceError> {
        let endpoint = url
            .as_deref()
            .map(|url| {
                Endpoint::new(
                    "sources.kubelet.api_ca_file",
                    url,
                    config.api_ca_file.as_ref(),
                    false,
                    config.token_file.clone(),
                )
            })
            .transpose()?;
        Ok(ApiList {
            endpoint,
            name,
            needs,
            parse,
            last: None,
            read_at: None,
            failing: false,
        })
    }

    /// Reads the list again when it was never read or `due(its age)` says so.
    async fn refresh(&mut self, due: impl Fn(Duration) -> bool) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
        if self.read_at.is_some_and(|t| !due(t.elapsed())) {
            return;
        }
        self.read_at = Some(std::time::Instant::now());
        let read = match endpoint.get(self.needs).await {
            Ok(body) => (self.parse)(&body)
                .map_err(|e| SourceError::Failed(format!("GET {}: {e}", endpoint.url))),
            Err(e) => Err(e),
        };
        match read {
            Ok(list) => {
                if self.failing {
                    tracing::info!(list = self.name, "read again");
                }
                self.failing = false;
                self.last = Some(list);
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(list = self.name, error = %e, "cannot read it from the API server; the last one read stays in use");
                }
                self.failing = true;
                crate::metrics::METRICS
                    .source_errors
                    .with_label_values(&[self.name])
                    .inc();
            }
        }
    }
}

/// The kubelet as a source: yields the pods (with their namespaces' labels), the node's DRA
/// devices and, where the stats summary is read, the pods' persistent volumes' figures.
pub struct KubeletSource {
    /// The stats summary, where configured, and whether its last read failed (said once).
    summary: Option<(Endpoint, bool)>,
    client: KubeletClient,
    refresh: Duration,
    namespaces: ApiList<BTreeMap<String, BTreeMap<String, String>>>,
    slices: ApiList<Vec<DraDevice>>,
}

impl KubeletSource {
    pub fn new(config: &KubeletConfig) -> Result<Self, SourceError> {
        let summary = match &config.summary_url {
            Some(url) => Some((
                Endpoint::new(
                    "sources.kubelet.ca_file",
                    url,
                    config.ca_file.as_ref(),
                    config.insecure_skip_tls_verify,
                    config.token_file.clone(),
                )?,
                false,
            )),
            None => None,
        };
        Ok(KubeletSource {
            summary,
            client: KubeletClient::new(config)?,
            refresh: config.api_refresh,
            namespaces: ApiList::new(
                config,
                &config.namespaces_url,
                ("kubelet_namespaces", "list on namespaces"),
                parse_namespaces,
            )?,
            slices: ApiList::new(
                config,
                &config.resource_slices_url,
                (
                    "kubelet_resource_slices",
                    "list on resourceslices (resource.k8s.io)",
                ),
                parse_resource_slices,
            )?,
        })
    }

    /// The pods' persistent volumes from the stats summary, where configured; none while it
    /// fails (said once, and again once it answers).
    async fn volumes(&mut self) -> Vec<Reading> {
        let Some((endpoint, failing)) = &mut self.summary else {
            return Vec::new();
        };
        let read = match endpoint.get("get on nodes/stats").await {
            Ok(body) => parse_summary(&body).map_err(|e| format!("{}: {e}", endpoint.url)),
            Err(e) => Err(e.to_string()),
        };
        match read {
            Ok(readings) => {
                if std::mem::take(failing) {
                    tracing::info!(url = %endpoint.url, "the kubelet's stats summary answers again");
                }
                readings
            }
            Err(error) => {
                if !std::mem::replace(failing, true) {
                    tracing::warn!(%error, "the kubelet's stats summary cannot be read: no volume figures until it can (the pods are read all the same)");
                }
                Vec::new()
            }
        }
    }

    /// Gives each pod its namespace's labels, reading the namespaces again when the list is
    /// older than `refresh`, or when a pod's namespace is not in it (a lease created since; at
    /// most once a second).
    async fn label_namespaces(&mut self, pods: &mut [Pod]) {
        let known = self.namespaces.last.as_ref();
        let missing = pods
            .iter()
            .any(|p| !known.is_some_and(|n| n.contains_key(&p.namespace)));
        let refresh = self.refresh;
        self.namespaces
            .refresh(|age| age >= refresh || (missing && age >= Duration::from_secs(1)))
            .await;
        let Some(namespaces) = &self.namespaces.last else {
            return;
        };
        for pod in pods {
            if let Some(labels) = namespaces.get(&pod.namespace) {
                pod.namespace_labels = labels.clone();
            }
        }
    }
}

impl super::Source for KubeletSource {
    fn name(&self) -> &str {
        "kubelet"
    }

    fn metrics(&self) -> Vec<String> {
        match self.summary {
            Some(_) => SUMMARY_METRICS.iter().map(|m| m.to_string()).collect(),
            None => Vec::new(),
        }
    }

    fn collect(&mut self) -> super::BoxFuture<'_, Result<super::Collected, SourceError>> {
        Box::pin(async move {
            let mut pods = self.client.pods().await?;
            self.label_namespaces(&mut pods).await;
            let refresh = self.refresh;
            self.slices.refresh(|age| age >= refresh).await;
            Ok(super::Collected {
                pods: Some(pods),
                dra_devices: self.slices.last.clone(),
                readings: self.volumes().await,
                ..Default::default()
            })
        })
    }
}

/// The JSON shapes, only the fields read.
mod wire {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    /// The kubelet's stats summary, only what is read of it.
    #[derive(Deserialize)]
    pub struct Summary {
        #[serde(default)]
        pub pods: Vec<PodStats>,
    }

    #[derive(Deserialize)]
    pub struct PodStats {
        #[serde(rename = "podRef")]
        pub pod_ref: PodRef,
        #[serde(default)]
        pub volume: Vec<VolumeStats>,
    }

    #[derive(Deserialize)]
    pub struct PodRef {
        pub name: String,
        pub namespace: String,
    }

    #[derive(Deserialize)]
    pub struct VolumeStats {
        #[serde(rename = "usedBytes")]
        pub used_bytes: Option<u64>,
        #[serde(rename = "capacityBytes")]
        pub capacity_bytes: Option<u64>,
        #[serde(rename = "inodesUsed")]
        pub inodes_used: Option<u64>,
        #[serde(rename = "pvcRef")]
        pub pvc_ref: Option<serde_json::Value>,
    }

    #[derive(Deserialize)]
    pub struct PodList {
        #[serde(default)]
        pub items: Vec<Pod>,
    }

    #[derive(Deserialize)]
    pub struct Pod {
        pub metadata: Metadata,
        #[serde(default)]
        pub spec: Spec,
        #[serde(default)]
        pub status: Status,
    }

    #[derive(Deserialize, Default)]
    pub struct Spec {
        #[serde(default)]
        pub containers: Vec<SpecContainer>,
    }

    #[derive(Deserialize)]
    pub struct SpecContainer {
        pub name: String,
        #[serde(default)]
        pub env: Vec<EnvVar>,
        #[serde(default)]
        pub resources: Resources,
    }

    /// Quantities are strings (`"1"`, `"500m"`, `"4Gi"`); a number is taken too.
    #[derive(Deserialize, Default)]
    pub struct Resources {
        #[serde(default)]
        pub limits: BTreeMap<String, serde_json::Value>,
        #[serde(default)]
        pub requests: BTreeMap<String, serde_json::Value>,
    }

    impl Resources {
        /// The requested cores and memory (a limit where no request is set).
        pub fn requests(&self, pod: &str, container: &str) -> super::Requests {
            self.quantities(pod, container, Some(&self.requests))
        }

        /// The cores and memory the container is limited to.
        pub fn limited(&self, pod: &str, container: &str) -> super::Requests {
            self.quantities(pod, container, None)
        }

        /// The limits' cores and memory, under `requests` where given.
        fn quantities(
            &self,
            pod: &str,
            container: &str,
            requests: Option<&BTreeMap<String, serde_json::Value>>,
        ) -> super::Requests {
            let what = match requests {
                Some(_) => "a request the agent cannot read is not billed as reserved",
                None => "a limit the agent cannot read is not reported",
            };
            let read = |resource: &str, parse: fn(&str) -> Result<i64, _>| {
                let quantity = requests
                    .and_then(|r| r.get(resource))
                    .or_else(|| self.limits.get(resource))?;
                let text = match quantity {
                    serde_json::Value::String(q) => q.clone(),
                    other => other.to_string(),
                };
                parse(&text)
                    .map_err(|e: meterflow_guard::quantity::QuantityError| {
                        tracing::warn!(%pod, %container, resource, error = %e, "{what}");
                    })
                    .ok()
            };
            super::Requests {
                cpu_millicores: read("cpu", meterflow_guard::quantity::millicores),
                memory_bytes: read("memory", meterflow_guard::quantity::bytes),
            }
        }
    }

    /// `value` is absent for `valueFrom` entries (secrets, the downward API): not read.
    #[derive(Deserialize)]
    pub struct EnvVar {
        pub name: String,
        pub value: Option<String>,
    }

    #[derive(Deserialize)]
    pub struct SliceList {
        #[serde(default)]
        pub items: Vec<Slice>,
    }

    #[derive(Deserialize)]
    pub struct Slice {
        pub spec: SliceSpec,
    }

    #[derive(Deserialize)]
    pub struct SliceSpec {
        pub driver: String,
        pub pool: SlicePool,
        #[serde(default)]
        pub devices: Vec<SliceDevice>,
    }

    #[derive(Deserialize)]
    pub struct SlicePool {
        pub name: String,
    }

    #[derive(Deserialize)]
    pub struct SliceDevice {
        pub name: String,
        #[serde(default)]
        pub attributes: BTreeMap<String, Attribute>,
        /// `resource.k8s.io/v1beta1` keeps the attributes here.
        pub basic: Option<BasicDevice>,
    }

    #[derive(Deserialize)]
    pub struct BasicDevice {
        #[serde(default)]
        pub attributes: BTreeMap<String, Attribute>,
    }

    /// One of `string`, `int`, `bool`, `version`; only strings are read.
    #[derive(Deserialize)]
    pub struct Attribute {
        pub string: Option<String>,
    }

    #[derive(Deserialize)]
    pub struct NamespaceList {
        #[serde(default)]
        pub items: Vec<Namespace>,
    }

    #[derive(Deserialize)]
    pub struct Namespace {
        pub metadata: Metadata,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Metadata {
        #[serde(default)]
        pub name: String,
        #[serde(default)]
        pub namespace: String,
        #[serde(default)]
        pub uid: String,
        #[serde(default)]
        pub labels: BTreeMap<String, String>,
        #[serde(default)]
        pub annotations: BTreeMap<String, String>,
        #[serde(default)]
        pub owner_references: Vec<Owner>,
    }

    #[derive(Deserialize)]
    pub struct Owner {
        pub kind: String,
        pub name: String,
        #[serde(default)]
        pub controller: bool,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Status {
        pub start_time: Option<String>,
        #[serde(default)]
        pub container_statuses: Vec<ContainerStatus>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ContainerStatus {
        pub name: String,
        #[serde(default)]
        pub restart_count: i64,
        #[serde(rename = "containerID", default)]
        pub container_id: String,
        #[serde(default)]
        pub state: State,
        #[serde(default)]
        pub last_state: State,
    }

    #[derive(Deserialize, Default)]
    pub struct State {
        pub running: Option<Running>,
        pub terminated: Option<Terminated>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Running {
        pub started_at: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Terminated {
        #[serde(rename = "containerID", default)]
        pub container_id: String,
        pub started_at: Option<String>,
        pub finished_at: Option<String>,
    }

    fn bare(id: &str) -> String {
        id.split_once("://")
            .map_or(id, |(_, bare)| bare)
            .to_string()
    }

    fn time(t: &Option<String>) -> Option<i64> {
        meterflow_schemas::time::parse_time(t.as_deref()?)
    }

    impl State {
        /// The run this state describes; `id` is the status's container id, which a
        /// terminated state may repeat in its own field.
        fn run(&self, id: &str) -> Option<super::Run> {
            if let Some(running) = &self.running {
                return Some(super::Run {
                    container_id: bare(id),
                    started_at_ms: time(&running.started_at)?,
                    finished_at_ms: None,
                });
            }
            let t = self.terminated.as_ref()?;
            let id = if t.container_id.is_empty() {
                id
            } else {
                &t.container_id
            };
            Some(super::Run {
                container_id: bare(id),
                started_at_ms: time(&t.started_at)?,
                finished_at_ms: Some(time(&t.finished_at)?),
            })
            .filter(|r| !r.container_id.is_empty())
        }
    }

    impl Pod {
        pub fn into_pod(self) -> super::Pod {
            let m = self.metadata;
            let owner = m
                .owner_references
                .iter()
                .find(|o| o.controller)
                .or(m.owner_references.first())
                .map(|o| (o.kind.clone(), o.name.clone()));
            /// A container's literal env, whole-number limits, requests and CPU and memory
            /// limits, by its name.
            type Spec = (
                BTreeMap<String, String>,
                BTreeMap<String, i64>,
                super::Requests,
                super::Requests,
            );
            let pod_name = format!("{}/{}", m.namespace, m.name);
            let mut spec: BTreeMap<String, Spec> = self
                .spec
                .containers
                .into_iter()
                .map(|c| {
                    let vars = c
                        .env
                        .into_iter()
                        .filter_map(|v| Some((v.name, v.value?)))
                        .collect();
                    let requests = c.resources.requests(&pod_name, &c.name);
                    let limited = c.resources.limited(&pod_name, &c.name);
                    let limits = c
                        .resources
                        .limits
                        .into_iter()
                        .filter_map(|(resource, quantity)| {
                            let whole = match quantity {
                                serde_json::Value::String(q) => q.parse().ok(),
                                serde_json::Value::Number(n) => n.as_i64(),
                                _ => None,
                            };
                            Some((resource, whole?))
                        })
                        .collect();
                    (c.name, (vars, limits, requests, limited))
                })
                .collect();
            let containers = self
                .status
                .container_statuses
                .into_iter()
                .map(|c| {
                    let (env, limits, requests, limited) = spec.remove(&c.name).unwrap_or_default();
                    super::Container {
                        current: c.state.run(&c.container_id),
                        // The previous run's id is only in its own terminated state.
                        previous: c.last_state.run(""),
                        env,
                        limits,
                        requests,
                        limited,
                        name: c.name,
                        restarts: c.restart_count,
                    }
                })
                .collect();
            super::Pod {
                uid: m.uid,
                namespace: m.namespace,
                name: m.name,
                labels: m.labels,
                annotations: m.annotations,
                namespace_labels: BTreeMap::new(),
                owner,
                started_at_ms: time(&self.status.start_time),
                containers,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trimmed `/pods` answer of a real kubelet: an Akash deployment with a GPU container
    /// that restarted once, a job pod whose container finished, and a pending pod.
    pub const PODS: &str = include_str!("fixtures/kubelet-pods.json");

    #[test]
    fn a_request_left_out_is_its_limit_and_an_unreadable_one_is_not_billed() {
        let pods = parse_pods(
            br#"{"items": [{"metadata": {"name": "p", "namespace": "n", "uid": "u"},
                "spec": {"containers": [
                    {"name": "a", "resources": {"limits": {"cpu": "4", "memory": "16Gi"}}},
                    {"name": "b", "resources": {"requests": {"cpu": 0.25, "memory": "129e6"},
                        "limits": {"cpu": "1", "memory": "1Gi"}}},
                    {"name": "c", "resources": {"requests": {"cpu": "lots", "memory": "1Gi"}}}]},
                "status": {"containerStatuses": [
                    {"name": "a", "state": {}}, {"name": "b", "state": {}}, {"name": "c", "state": {}}]}}]}"#,
        )
        .expect("parses");
        let requests: Vec<Requests> = pods[0].containers.iter().map(|c| c.requests).collect();
        assert_eq!(
            requests,
            vec![
                Requests {
                    cpu_millicores: Some(4_000),
                    memory_bytes: Some(16 << 30)
                },
                Requests {
                    cpu_millicores: Some(250),
                    memory_bytes: Some(129_000_000)
                },
                Requests {
                    cpu_millicores: None,
                    memory_bytes: Some(1 << 30)
                },
            ]
        );
        // Limits are the spec's limits alone: none where only requests are set.
        let limited: Vec<Requests> = pods[0].containers.iter().map(|c| c.limited).collect();
        assert_eq!(
            limited,
            vec![
                Requests {
                    cpu_millicores: Some(4_000),
                    memory_bytes: Some(16 << 30)
                },
                Requests {
                    cpu_millicores: Some(1_000),
                    memory_bytes: Some(1 << 30)
                },
                Requests::default(),
            ]
        );
    }

    pub const SUMMARY: &str = include_str!("fixtures/kubelet-summary.json");

    /// The web pod's two persistent volumes, summed; its service-account token and `shm`
    /// volumes, and its ephemeral storage, left out; the trainer's volume, not measured yet,
    /// gives nothing (not a zero); a pod without volumes, nothing.
    #[test]
    fn a_pods_persistent_volumes_come_from_the_stats_summary() {
        let readings = parse_summary(SUMMARY.as_bytes()).expect("fixture parses");
        let got: Vec<(&str, &str, f64)> = readings
            .iter()
            .map(|r| {
                assert_eq!(r.kind, SampleKind::Gauge);
                let Target::Pod { pod, .. } = &r.target else {
                    panic!("a pod's reading: {r:?}")
                };
                (pod.as_str(), r.metric.as_str(), r.value)
            })
            .collect();
        let web = "web-6d4cf56db6-x7k2p";
        assert_eq!(
            got,
            [
                (
                    web,
                    "filesystem_usage_bytes",
                    (75_161_927_680u64 + 536_870_912) as f64
                ),
                (
                    web,
                    "filesystem_capacity_bytes",
                    (107_374_182_400u64 + 10_737_418_240) as f64
                ),
                (web, "filesystem_inodes_used", (51_488 + 80) as f64),
            ]
        );
        assert!(
            parse_summary(br#"{"items": []}"#)
                .expect("no pods")
                .is_empty()
        );
        assert!(parse_summary(b"<html>").is_err());
    }

    #[test]
    fn pods_runs_and_owners_are_read() {
        let pods = parse_pods(PODS.as_bytes()).expect("fixture parses");
        assert_eq!(pods.len(), 3);
        let web = &pods[0];
        assert_eq!(
            web.namespace,
            "4pv7q2k0dl8r1ls3r1hmp7n0uc0fh0b5q4dqm0m4vq8c6"
        );
        assert_eq!(web.workload(), "web");
        // The Akash provider puts the lease id on the namespace and in env, not on the pod.
        assert!(
            !web.labels
                .keys()
                .any(|k| k.starts_with("akash.network/lease.id"))
        );
        assert_eq!(
            web.labels
                .get("akash.network/manifest-service")
                .map(String::as_str),
            Some("web")
        );
        let c = &web.containers[0];
        assert_eq!(c.restarts, 1);
        // Whole-number limits are read (the GPUs a run between two ticks is billed for);
        // `32Gi` of memory is not a count.
        assert_eq!(
            c.limits,
            BTreeMap::from([("cpu".to_string(), 8), ("nvidia.com/gpu".to_string(), 1)])
        );
        // Requested cores and memory, read as the scheduler reserves them.
        assert_eq!(
            c.requests,
            Requests {
                cpu_millicores: Some(8_000),
                memory_bytes: Some(32 << 30),
            }
        );
        // A pod listed without a spec requests nothing.
        assert_eq!(pods[1].containers[0].requests, Requests::default());
        let current = c.current.as_ref().expect("running");
        assert_eq!(current.container_id.len(), 64);
        assert!(current.container_id.starts_with("aaaa"));
        assert_eq!(
            current.started_at_ms,
            meterflow_schemas::time::parse_time("2026-11-23T10:05:00Z").expect("time")
        );
        assert_eq!(current.finished_at_ms, None);
        let previous = c.previous.as_ref().expect("restarted");
        assert!(previous.container_id.starts_with("bbbb"));
        assert_eq!(
            previous.finished_at_ms,
            meterflow_schemas::time::parse_time("2026-11-23T10:04:30Z")
        );

        let job = &pods[1];
        assert_eq!(job.workload(), "train-42");
        let run = job.containers[0].current.as_ref().expect("terminated");
        assert!(run.container_id.starts_with("cccc"));
        assert_eq!(
            run.finished_at_ms,
            meterflow_schemas::time::parse_time("2026-11-23T11:00:01Z")
        );
        assert_eq!(
            job.started_at_ms,
            meterflow_schemas::time::parse_time("2026-11-23T09:59:58Z")
        );

        // The spec's literal environment, by container; a `valueFrom` entry is not read.
        let env = &web.containers[0].env;
        assert_eq!(
            env.get("AKASH_DEPLOYMENT_SEQUENCE").map(String::as_str),
            Some("18231234")
        );
        assert_eq!(
            env.get("AKASH_OWNER").map(String::as_str),
            Some("akash1tenantaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
        );
        assert!(!env.contains_key("HF_TOKEN"));
        assert!(job.containers[0].env.is_empty());

        // Pending: no run yet, nothing to bill.
        let pending = &pods[2];
        assert_eq!(pending.workload(), "lonely");
        assert_eq!(pending.containers[0].current, None);
    }

    #[test]
    fn dra_devices_come_from_the_resource_slices() {
        let devices =
            parse_resource_slices(include_bytes!("fixtures/resource-slices.json")).expect("parses");
        assert_eq!(
            devices.len(),
            2,
            "the network device has no uuid: {devices:?}"
        );
        assert_eq!(
            devices[0],
            DraDevice {
                driver: "gpu.nvidia.com".into(),
                pool: "gpu-node-1".into(),
                name: "gpu-1".into(),
                gpu: GpuInfo {
                    uuid: "GPU-9d2b4c6e-1f3a-4b5c-8d7e-0a1b2c3d4e5f".into(),
                    model: "NVIDIA H100 80GB HBM3".into(),
                    mig_profile: String::new(),
                },
            }
        );
        assert_eq!(devices[1].name, "gpu-3-mig-19-0-1");
        assert_eq!(devices[1].gpu.mig_profile, "1g.10gb");
        assert_eq!(devices[1].gpu.model, "NVIDIA A100-SXM4-80GB");
        // v1beta1 keeps the attributes under `basic`.
        let beta = r#"{"items": [{"spec": {"driver": "gpu.nvidia.com", "pool": {"name": "n"},
            "devices": [{"name": "gpu-0", "basic": {"attributes": {"uuid": {"string": "GPU-0"}}}}]}}]}"#;
        let devices = parse_resource_slices(beta.as_bytes()).expect("parses");
        assert_eq!(devices[0].gpu.uuid, "GPU-0");
        assert!(parse_resource_slices(b"{\"items\": [{}]}").is_err());
    }

    #[test]
    fn urls_take_environment_variables() {
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(
            expand_env("https://${PATH}:${MF_TEST_UNSET_VARIABLE}/x?${"),
            format!("https://{path}:/x?${{")
        );
    }

    #[test]
    fn namespace_labels_are_read_by_name() {
        let namespaces =
            parse_namespaces(include_bytes!("fixtures/kube-namespaces.json")).expect("parses");
        let lease = &namespaces["4pv7q2k0dl8r1ls3r1hmp7n0uc0fh0b5q4dqm0m4vq8c6"];
        assert_eq!(lease["akash.network/lease.id.dseq"], "18231234");
        assert_eq!(namespaces["research"].len(), 1);
        assert!(parse_namespaces(b"{\"items\": 3}").is_err());
    }

    /// A kubelet and an API server on loopback: the pods come with their namespace's labels,
    /// a namespace created later is read at once, and a failing API server leaves the last
    /// labels in use.
    #[tokio::test]
    async fn pods_carry_their_namespaces_labels() {
        use super::super::testing::{answering, serve};
        let namespaces = std::sync::Arc::new(std::sync::Mutex::new((
            200u16,
            String::from("{\"items\": []}"),
        )));
        let addr = serve(
            axum::Router::new()
                .route("/pods", axum::routing::get(|| async { PODS }))
                .route("/api/v1/namespaces", answering(namespaces.clone())),
        )
        .await;
        let mut source = KubeletSource::new(&KubeletConfig {
            enabled: true,
            pods_url: format!("http://{addr}/pods"),
            token_file: None,
            namespaces_url: Some(format!("http://{addr}/api/v1/namespaces")),
            api_ca_file: None,
            ..Default::default()
        })
        .expect("source");
        let lease_labels = |c: super::super::Collected| {
            c.pods.expect("pods")[0]
                .namespace_labels
                .get("akash.network/lease.id.owner")
                .cloned()
        };
        use super::super::Source;
        let first = source.collect().await.expect("collects");
        assert_eq!(lease_labels(first), None, "no namespace listed yet");
        *namespaces.lock().expect("lock") = (
            200,
            include_str!("fixtures/kube-namespaces.json").to_string(),
        );
        tokio::time::sleep(Duration::from_millis(1_050)).await;
        let second = source.collect().await.expect("collects");
        assert_eq!(
            lease_labels(second).as_deref(),
            Some("akash1tenantaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            "a pod's namespace missing from the list has it read again"
        );
        *namespaces.lock().expect("lock") = (403, "forbidden".into());
        source.refresh = Duration::ZERO;
        let third = source.collect().await.expect("the pods still come");
        assert_eq!(
            lease_labels(third).as_deref(),
            Some("akash1tenantaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            "the last labels stay in use"
        );
    }

    /// A stats summary the agent may not read (no `nodes/stats`) costs the volume figures
    /// only: the pods come all the same, and the figures once it answers.
    #[tokio::test]
    async fn a_stats_summary_refused_leaves_the_pods_and_comes_back() {
        use super::super::testing::{answering, serve};
        let summary = std::sync::Arc::new(std::sync::Mutex::new((403u16, "forbidden".into())));
        let addr = serve(
            axum::Router::new()
                .route("/pods", axum::routing::get(|| async { PODS }))
                .route("/stats/summary", answering(summary.clone())),
        )
        .await;
        let mut source = KubeletSource::new(&KubeletConfig {
            enabled: true,
            pods_url: format!("http://{addr}/pods"),
            summary_url: Some(format!("http://{addr}/stats/summary")),
            token_file: None,
            api_ca_file: None,
            ..Default::default()
        })
        .expect("source");
        use super::super::Source;
        assert_eq!(source.metrics(), SUMMARY_METRICS);
        let refused = source.collect().await.expect("the pods come");
        assert_eq!(refused.pods.expect("pods").len(), 3);
        assert!(refused.readings.is_empty());
        assert!(source.summary.as_ref().is_some_and(|(_, failing)| *failing));
        *summary.lock().expect("lock") = (200, SUMMARY.to_string());
        let answered = source.collect().await.expect("collects");
        assert_eq!(answered.pods.expect("pods").len(), 3);
        assert_eq!(answered.readings.len(), 3, "{:?}", answered.readings);
        assert!(
            source
                .summary
                .as_ref()
                .is_some_and(|(_, failing)| !*failing)
        );
    }

    #[test]
    fn a_body_that_is_not_a_pod_list_is_an_error_not_an_empty_node() {
        assert!(parse_pods(b"<html>").is_err());
        assert!(parse_pods(b"{\"items\": 3}").is_err());
        assert_eq!(parse_pods(b"{\"items\": []}").expect("empty"), vec![]);
    }
}
