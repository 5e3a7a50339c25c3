//! The agent's sources, one module each behind one small trait ([`Source`]).
//!
//! - [`cgroup`]: per-container CPU, memory, block I/O and network from cgroup v2 and `/proc`;
//! - [`nvml`]: per-GPU and per-MIG-instance readings and GPU processes through NVML;
//! - [`kubelet`]: the node's pods (labels, owners, container runs) from the kubelet;
//! - [`pod_resources`]: which GPUs each container holds, from the kubelet's gRPC socket;
//! - [`prometheus_scrape`]: readings from dcgm-exporter, Kepler, cAdvisor through a mapping
//!   table;
//! - [`simulator`]: a deterministic fleet for the demo, tests and benchmarks.
//!
//! A source yields a [`Collected`]: readings addressed to a [`Target`] (a container by id or
//! by name, a pod, a GPU) and, for the inventory sources, the pods, device assignments and
//! GPUs that let [`crate::node`] turn targets into identities. A source that fails is retried
//! at the next tick on its own; its last inventory stays in use for a bounded time.

pub mod cgroup;
pub mod kubelet;
pub mod nvml;
pub mod pod_resources;
pub mod prometheus_scrape;
pub mod simulator;

use std::future::Future;
use std::pin::Pin;

use meterflow_schemas::SampleKind;

/// Who a reading belongs to, before attribution.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// A container by its runtime id (cgroup, NVML processes).
    Container(String),
    /// A container by namespace, pod and container name (exporters).
    Named {
        namespace: String,
        pod: String,
        container: String,
    },
    /// A pod as a whole (its network namespace): given to its first container.
    Pod { namespace: String, pod: String },
    /// A pod as a whole by its UID (cgroup: its network namespace, its OOM kills): given to its
    /// first container, as [`Target::Pod`].
    PodUid(String),
    /// A GPU or MIG instance by UUID: given to the container that holds it.
    Gpu(String),
}

/// A device a DRA driver publishes in its ResourceSlice, as billing needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraDevice {
    pub driver: String,
    pub pool: String,
    /// Its name in the slice (`gpu-0`), as pod-resources names a claim's device.
    pub name: String,
    pub gpu: GpuInfo,
}

/// What is known of a GPU or MIG instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpuInfo {
    /// The GPU's (or MIG instance's) UUID.
    pub uuid: String,
    pub model: String,
    /// Empty for a whole GPU.
    pub mig_profile: String,
}

/// What a counter counts since (SPEC: counter scopes; see [`crate::node`] for how each is
/// billed).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Counts from zero with its container (cgroup CPU and block I/O): the processor counts a
    /// new series' first reading in full. Gauges have this scope too.
    #[default]
    Container,
    /// The running total of a pod's network namespace (by pod UID, or `namespace/pod`): it
    /// started with the pod and outlives a container run.
    Pod(String),
    /// A GPU board's running total since its driver loaded (by the board's UUID): it started
    /// long before its holder and outlives it.
    Board(String),
}

/// One reading of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub target: Target,
    /// The GPU the reading is of, for GPU metrics.
    pub gpu: Option<GpuInfo>,
    pub kind: SampleKind,
    pub metric: String,
    pub value: f64,
    /// What the counter counts since.
    pub scope: Scope,
}

/// What one source yields in one tick.
#[derive(Debug, Default)]
pub struct Collected {
    pub readings: Vec<Reading>,
    /// The node's pods (kubelet).
    pub pods: Option<Vec<kubelet::Pod>>,
    /// Devices held per container (pod resources).
    pub assignments: Option<Vec<pod_resources::Assignment>>,
    /// GPUs and MIG instances present (NVML).
    pub gpus: Option<Vec<GpuInfo>>,
    /// GPU → container id of a process using it (NVML).
    pub gpu_processes: Option<Vec<(String, String)>>,
    /// The node's DRA devices (the kubelet source, from the API server's ResourceSlices).
    pub dra_devices: Option<Vec<DraDevice>>,
}

/// Why a source yielded nothing.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configuration cannot work; the agent does not start.
    #[error("{0}")]
    Config(String),
    /// The source cannot exist on this node (no NVML library): said once, then off.
    #[error("{0}")]
    Unavailable(String),
    /// This tick failed; retried at the next tick.
    #[error("{0}")]
    Failed(String),
}

/// A boxed future, so sources can sit side by side in one list.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One source of readings.
pub trait Source: Send {
    /// Its name in logs, `/metrics` and `/healthz`.
    fn name(&self) -> &str;
    /// The sample metrics it can yield (checked against the other sources at start: one
    /// metric from two sources would be counted twice).
    fn metrics(&self) -> Vec<String>;
    /// Reads once.
    fn collect(&mut self) -> BoxFuture<'_, Result<Collected, SourceError>>;
}

/// Checks a source's `metrics` allow-list against what it can yield; `what` names a metric of
/// the source in the error (`a cgroup metric`).
pub(crate) fn check_allow_list(
    key: &str,
    what: &str,
    known: &[&str],
    allow: &[String],
) -> Result<(), SourceError> {
    match allow.iter().find(|m| !known.contains(&m.as_str())) {
        Some(metric) => Err(SourceError::Config(format!(
            "{key}: `{metric}` is not {what} (known: {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Whether an allow-list keeps `metric`; an empty one keeps every metric.
pub(crate) fn allows(allow: &[String], metric: &str) -> bool {
    allow.is_empty() || allow.iter().any(|a| a == metric)
}

/// The metrics of `known` an allow-list keeps.
pub(crate) fn allowed(known: &[&str], allow: &[String]) -> Vec<String> {
    known
        .iter()
        .filter(|m| allows(allow, m))
        .map(|m| m.to_string())
        .collect()
}

/// `humantime` durations (`15s`, `2m`) in the config.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration ({e}); write e.g. \"15s\" or \"2m\""
            ))
        })
    }
}

/// Stand-ins for the node's HTTP endpoints in the sources' and the collector's tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    /// What a route answers now: a status and a body, changed by the test between ticks.
    pub type Answer = Arc<Mutex<(u16, String)>>;

    /// A GET route answering whatever `answer` holds when it is asked.
    pub fn answering(answer: Answer) -> axum::routing::MethodRouter {
        axum::routing::get(move || {
            let (status, body) = answer.lock().expect("answer").clone();
            async move {
                (
                    axum::http::StatusCode::from_u16(status).expect("a status"),
                    body,
                )
            }
        })
    }

    /// Serves `app` on a free loopback port; its address.
    pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }
}
