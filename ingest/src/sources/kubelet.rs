//! The kubelet source: the pods of this node with their labels, owners and container runs, from
//! the kubelet's `/pods` endpoint (the same answer as the API server's pod list for the node,
//! without loading the API server from every node).
//!
//! A container run is what the runtime reports: its id, `startedAt` and, once it ended,
//! `finishedAt` — the interval a GPU allocation is billed over (SPEC: allocation). A container
//! that restarted has its current run in `state` and the previous one in `lastState`; both are
//! kept, so the end of a run is never lost to a quick restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::SourceError;

/// Where and how the kubelet is reached.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubeletConfig {
    pub enabled: bool,
    /// The kubelet's pod list: `https://127.0.0.1:10250/pods` on the host network, the
    /// read-only `http://…:10255/pods` where that port is open, or the API server's list of
    /// this node's pods (`https://kubernetes.default.svc/api/v1/pods?fieldSelector=spec.nodeName=${NODE_NAME}`;
    /// `${NODE_NAME}` is replaced by the environment variable).
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
    /// The controller that owns the pod (kind, name), if any.
    pub owner: Option<(String, String)>,
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

/// Reads the pod list from the kubelet.
pub struct KubeletClient {
    http: reqwest::Client,
    url: String,
    token_file: Option<PathBuf>,
}

impl KubeletClient {
    pub fn new(config: &KubeletConfig) -> Result<Self, SourceError> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .danger_accept_invalid_certs(config.insecure_skip_tls_verify);
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                SourceError::Config(format!(
                    "sources.kubelet.ca_file: cannot read {}: {e}",
                    ca.display()
                ))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                SourceError::Config(format!(
                    "sources.kubelet.ca_file: {} is not a PEM certificate: {e}",
                    ca.display()
                ))
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| SourceError::Config(format!("sources.kubelet: {e}")))?;
        Ok(KubeletClient {
            http,
            url: config.pods_url.replace(
                "${NODE_NAME}",
                &std::env::var("NODE_NAME").unwrap_or_default(),
            ),
            token_file: config.token_file.clone(),
        })
    }

    /// The node's pods now.
    pub async fn pods(&self) -> Result<Vec<Pod>, SourceError> {
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
        let response = request
            .send()
            .await
            .map_err(|e| SourceError::Failed(format!("GET {}: {e}", self.url)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| SourceError::Failed(format!("GET {}: {e}", self.url)))?;
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => " (the agent's service account needs get on nodes/proxy)",
                _ => "",
            };
            return Err(SourceError::Failed(format!(
                "GET {} answered {status}{hint}",
                self.url
            )));
        }
        parse_pods(&body).map_err(|e| SourceError::Failed(format!("GET {}: {e}", self.url)))
    }
}

/// The kubelet as a source: yields the pods, no readings.
pub struct KubeletSource {
    client: KubeletClient,
}

impl KubeletSource {
    pub fn new(config: &KubeletConfig) -> Result<Self, SourceError> {
        Ok(KubeletSource {
            client: KubeletClient::new(config)?,
        })
    }
}

impl super::Source for KubeletSource {
    fn name(&self) -> &str {
        "kubelet"
    }

    fn metrics(&self) -> Vec<String> {
        Vec::new()
    }

    fn collect(&mut self) -> super::BoxFuture<'_, Result<super::Collected, SourceError>> {
        Box::pin(async move {
            Ok(super::Collected {
                pods: Some(self.client.pods().await?),
                ..Default::default()
            })
        })
    }
}

/// The JSON shapes, only the fields read.
mod wire {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct PodList {
        #[serde(default)]
        pub items: Vec<Pod>,
    }

    #[derive(Deserialize)]
    pub struct Pod {
        pub metadata: Metadata,
        #[serde(default)]
        pub status: Status,
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
            let containers = self
                .status
                .container_statuses
                .into_iter()
                .map(|c| super::Container {
                    current: c.state.run(&c.container_id),
                    // The previous run's id is only in its own terminated state.
                    previous: c.last_state.run(""),
                    name: c.name,
                    restarts: c.restart_count,
                })
                .collect();
            super::Pod {
                uid: m.uid,
                namespace: m.namespace,
                name: m.name,
                labels: m.labels,
                annotations: m.annotations,
                owner,
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
    fn pods_runs_and_owners_are_read() {
        let pods = parse_pods(PODS.as_bytes()).expect("fixture parses");
        assert_eq!(pods.len(), 3);
        let web = &pods[0];
        assert_eq!(
            web.namespace,
            "4pv7q2k0dl8r1ls3r1hmp7n0uc0fh0b5q4dqm0m4vq8c6"
        );
        assert_eq!(web.workload(), "web");
        assert_eq!(
            web.labels
                .get("akash.network/lease.id.dseq")
                .map(String::as_str),
            Some("18231234")
        );
        let c = &web.containers[0];
        assert_eq!(c.restarts, 1);
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
            meterflow_schemas::time::parse_time("2026-11-23T11:00:00.250Z")
        );

        // Pending: no run yet, nothing to bill.
        let pending = &pods[2];
        assert_eq!(pending.workload(), "lonely");
        assert_eq!(pending.containers[0].current, None);
    }

    #[test]
    fn a_body_that_is_not_a_pod_list_is_an_error_not_an_empty_node() {
        assert!(parse_pods(b"<html>").is_err());
        assert!(parse_pods(b"{\"items\": 3}").is_err());
        assert_eq!(parse_pods(b"{\"items\": []}").expect("empty"), vec![]);
    }
}
