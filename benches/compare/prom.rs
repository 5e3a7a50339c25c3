//! The Prometheus side: what dcgm-exporter, cAdvisor and a scrape loop would have stored,
//! written through Prometheus's remote-write receiver, and read back with the PromQL people
//! use for GPU chargeback.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meterflow_schemas::{Sample, metrics};
use prost::Message;
use serde_json::Value;

use meterflow_ingest::simulator::ContainerTruth;

use crate::proc::Child;
use crate::scenario::{Delivery, HOUR_MS, INTERVAL_MS, Scenario, running_at};

#[derive(Clone, PartialEq, Message)]
struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, Message)]
struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<PromSample>,
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Message)]
struct Label {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, Message)]
struct PromSample {
    #[prost(double, tag = "1")]
    value: f64,
    #[prost(int64, tag = "2")]
    timestamp: i64,
}

/// Prometheus's staleness marker: the value a scrape loop writes for a series that is gone.
const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

type Series = Vec<Label>;

fn labels(pairs: &[(&str, &str)]) -> Series {
    let mut l: Series = pairs
        .iter()
        .map(|(n, v)| Label {
            name: n.to_string(),
            value: v.to_string(),
        })
        .collect();
    l.sort();
    l
}

/// The series one scrape of one node shows for one sample, dcgm-exporter's and cAdvisor's
/// names and labels (the pod's namespace is the tenant, the pod the lease).
fn exposition(s: &Sample) -> Option<(Series, f64)> {
    let id = &s.series;
    let gpu = |name: &str| {
        labels(&[
            ("__name__", name),
            ("Hostname", &id.node),
            ("UUID", &id.gpu_uuid),
            ("modelName", &id.gpu_model),
            ("GPU_I_PROFILE", &id.mig_profile),
            ("namespace", &id.tenant),
            ("pod", &id.lease),
        ])
    };
    let container_path = format!("/kubepods/{}", id.container_id);
    let container = |name: &str| {
        labels(&[
            ("__name__", name),
            ("instance", &id.node),
            ("namespace", &id.tenant),
            ("pod", &id.lease),
            ("container", "main"),
            ("id", &container_path),
        ])
    };
    match s.metric.as_str() {
        metrics::GPU_UTILIZATION => Some((gpu("DCGM_FI_DEV_GPU_UTIL"), (s.value * 100.0).round())),
        metrics::CPU_SECONDS => Some((container("container_cpu_usage_seconds_total"), s.value)),
        metrics::MEMORY_BYTES => Some((container("container_memory_working_set_bytes"), s.value)),
        _ => None,
    }
}

/// Who collects the nodes for Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collector {
    /// The Prometheus server scrapes every node across the network: a failed exchange, or
    /// one across a partition, is a failed scrape (staleness markers, the readings never
    /// taken); a duplicated one is written twice.
    Server,
    /// A Prometheus in agent mode on each node scrapes its exporters locally and remote-writes
    /// from its write-ahead log: a failed delivery is retried, so every reading it took
    /// arrives once and in order. Only a collection fault (the node's agent down) loses
    /// readings. (The delivery fault it meets is real: the server it writes to is down for a
    /// while, see `main.rs`.)
    Agent,
}

/// The remote-write requests of one way of collecting, and what they carry.
pub struct Requests {
    /// Encoded and compressed, in the order they are sent, each in its shards.
    pub bodies: Vec<Vec<Vec<u8>>>,
    pub samples: u64,
    /// GPU-ms per (class, MIG profile) that failed scrapes hid: 15 s per GPU series a failed
    /// scrape would have shown (the collector's own loss, beside the sampling bound).
    pub hidden_gpu_ms: BTreeMap<(String, String), i64>,
}

/// One remote-write request per tick (for the server, plus the duplicates), each sample
/// stamped `shift_ms` after its reading, in `shards`.
pub fn requests(
    scenario: &Scenario,
    collector: Collector,
    shift_ms: i64,
    shards: usize,
) -> Requests {
    // Per node: the series its last successful scrape showed (a scrape loop marks the rest stale).
    let mut shown: Vec<HashSet<Series>> = vec![HashSet::new(); scenario.nodes];
    let mut hidden_gpu_ms: BTreeMap<(String, String), i64> = BTreeMap::new();
    let (mut out, mut total) = (Vec::new(), 0u64);
    for (i, row) in scenario.ticks.iter().enumerate() {
        let k = i as i64 + 1;
        let now = scenario.tick_ms(k);
        let stamp = now + shift_ms;
        let mut request: Vec<(Series, PromSample)> = Vec::new();
        let mut duplicates: Vec<(Series, PromSample)> = Vec::new();
        for t in row {
            let delivery = match (collector, t.delivery) {
                // A server scraping across a partition fails its scrapes: nothing comes late.
                (Collector::Server, Delivery::LateUntil(_)) => Delivery::Dropped,
                (Collector::Server, d) => d,
                (Collector::Agent, _) => Delivery::OnTime,
            };
            if let (Some(batch), Delivery::Dropped) = (&t.batch, delivery) {
                for s in running_at(batch, now) {
                    if s.metric == metrics::GPU_UTILIZATION {
                        let kind = (
                            class_of(&s.series.gpu_model).to_string(),
                            s.series.mig_profile.clone(),
                        );
                        *hidden_gpu_ms.entry(kind).or_default() += INTERVAL_MS;
                    }
                }
            }
            let scraped = t.batch.as_ref().filter(|_| delivery != Delivery::Dropped);
            let mut samples = Vec::new();
            let mut now_shown = HashSet::new();
            if let Some(batch) = scraped {
                for s in running_at(batch, now) {
                    if let Some((series, value)) = exposition(s) {
                        now_shown.insert(series.clone());
                        samples.push((
                            series,
                            PromSample {
                                value,
                                timestamp: stamp,
                            },
                        ));
                    }
                }
                // dcgm-exporter: each board's energy since its driver loaded, with the labels
                // of the pod that holds it (none while idle or split into MIG instances).
                for board in &t.boards {
                    let (tenant, lease, _) = board.holder.clone().unwrap_or_default();
                    let series = labels(&[
                        ("__name__", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"),
                        ("Hostname", &batch.node),
                        ("UUID", &board.uuid),
                        ("modelName", &board.model),
                        ("GPU_I_PROFILE", ""),
                        ("namespace", &tenant),
                        ("pod", &lease),
                    ]);
                    now_shown.insert(series.clone());
                    samples.push((
                        series,
                        PromSample {
                            value: board.energy_mj as f64,
                            timestamp: stamp,
                        },
                    ));
                }
            }
            // The server: a failed scrape (or a target that is down) marks everything stale; a
            // scrape marks what it no longer shows. A node's agent that is down writes nothing,
            // markers included, and forgets what it last showed (its scrape cache is in memory):
            // its series fade after the 5-min lookback.
            if collector == Collector::Agent && t.batch.is_none() {
                shown[t.node].clear();
                continue;
            }
            for gone in shown[t.node].difference(&now_shown) {
                samples.push((
                    gone.clone(),
                    PromSample {
                        value: f64::from_bits(STALE_NAN),
                        timestamp: stamp,
                    },
                ));
            }
            shown[t.node] = now_shown;
            if delivery == Delivery::Duplicated {
                duplicates.extend(samples.iter().cloned());
            }
            request.extend(samples);
        }
        total += request.len() as u64;
        out.push(encode(request, shards));
        if !duplicates.is_empty() {
            out.push(encode(duplicates, shards));
        }
    }
    Requests {
        bodies: out,
        samples: total,
        hidden_gpu_ms,
    }
}

/// What the API server shows of one workload's container at an instant: the index of its
/// running run (the container's `state`) and of the last run that exited (`lastState`).
fn api_view(runs: &[&ContainerTruth], at: i64) -> (Option<usize>, Option<usize>) {
    let Some(last) = runs
        .partition_point(|r| r.started_at_ms <= at)
        .checked_sub(1)
    else {
        return (None, None);
    };
    if !runs[last].finished || at < runs[last].until_ms {
        (Some(last), last.checked_sub(1))
    } else {
        (None, Some(last))
    }
}

/// Whole seconds, as the kubelet reports a container's times and kube-state-metrics exports
/// them.
fn unix_seconds(ms: i64) -> f64 {
    ms.div_euclid(1_000) as f64
}

/// kube-state-metrics as the central server scrapes it at every tick: each GPU pod's container
/// as the API server holds it (`kube_pod_container_status_running`, the running run's
/// `kube_pod_container_state_started` and the last exited run's
/// `kube_pod_container_status_last_terminated_timestamp`, in whole seconds as the kubelet
/// reports them), its GPU requests (`kube_pod_container_resource_requests`, the device
/// plugin's resource as KSM writes it) and its node's GPU product (GPU feature discovery's
/// label, through `kube_node_labels`).
///
/// The API server hears from a node's kubelet over the node's link, so the node's faults
/// reach it: at a tick whose exchange fails (a dropped delivery) it still holds the node's
/// state of the tick before, through a partition the state from before it until it heals. The
/// agent's outage leaves the kubelet running: its status arrives as usual. KSM's own scrape
/// runs in the cluster beside the server and does not fail.
///
/// `hidden_gpu_ms` is this way of reading's bound, from the physical runs and the faults: per
/// GPU, 2 s per run (a start and an exit in whole seconds), 15 s for a run no tick saw running
/// (its start is never shown: the step of its exit is counted from the step's start), and
/// 15 s for each tick at which the API server's view of its workload was stale and not what ran.
pub fn ksm_requests(scenario: &Scenario) -> Requests {
    // Each workload's runs in start order, by node.
    let mut workloads: BTreeMap<(usize, &str), Vec<&ContainerTruth>> = BTreeMap::new();
    for run in &scenario.runs {
        workloads
            .entry((node_index(&run.node), &run.lease))
            .or_default()
            .push(run);
    }
    let mut hidden_gpu_ms: BTreeMap<(String, String), i64> = BTreeMap::new();
    let kind = |run: &ContainerTruth| {
        let gpu = &run.gpus[0];
        (gpu.class.clone(), gpu.mig_profile.clone())
    };
    for runs in workloads.values_mut() {
        runs.sort_by_key(|r| r.started_at_ms);
        for run in runs.iter() {
            let first_tick = (run.started_at_ms - scenario.t0 + INTERVAL_MS - 1)
                .div_euclid(INTERVAL_MS)
                .max(1);
            let seen = !run.finished || scenario.tick_ms(first_tick) < run.until_ms;
            let ms = 2_000 + if seen { 0 } else { INTERVAL_MS };
            *hidden_gpu_ms.entry(kind(run)).or_default() += ms * run.gpus.len() as i64;
        }
    }
    let mut as_of = vec![scenario.t0; scenario.nodes];
    let mut shown: Vec<HashSet<Series>> = vec![HashSet::new(); scenario.nodes];
    let (mut out, mut total) = (Vec::new(), 0u64);
    for (i, row) in scenario.ticks.iter().enumerate() {
        let now = scenario.tick_ms(i as i64 + 1);
        let mut request: Vec<(Series, PromSample)> = Vec::new();
        for t in row {
            let n = t.node;
            if matches!(t.delivery, Delivery::OnTime | Delivery::Duplicated) {
                as_of[n] = now;
            }
            let mut now_shown = HashSet::new();
            let mut show = |series: Series, value: f64| {
                now_shown.insert(series.clone());
                request.push((
                    series,
                    PromSample {
                        value,
                        timestamp: now,
                    },
                ));
            };
            let node = format!("node-{n:03}");
            let mut product = None;
            for ((_, lease), runs) in workloads.range((n, "")..(n + 1, "")) {
                let (class, profile) = kind(runs[0]);
                let gpus = runs[0].gpus.len() as i64;
                let (current, previous) = api_view(runs, as_of[n]);
                if as_of[n] != now && (current, previous) != api_view(runs, now) {
                    *hidden_gpu_ms
                        .entry((class.clone(), profile.clone()))
                        .or_default() += INTERVAL_MS * gpus;
                }
                let tenant = &runs[0].tenant;
                let container = |name: &str| {
                    labels(&[
                        ("__name__", name),
                        ("namespace", tenant),
                        ("pod", lease),
                        ("container", "main"),
                    ])
                };
                let resource = match profile.as_str() {
                    "" => "nvidia_com_gpu".to_string(),
                    mig => format!("nvidia_com_mig_{}", mig.replace('.', "_")),
                };
                show(
                    labels(&[
                        ("__name__", "kube_pod_container_resource_requests"),
                        ("namespace", tenant),
                        ("pod", lease),
                        ("container", "main"),
                        ("node", &node),
                        ("resource", &resource),
                        ("unit", "integer"),
                    ]),
                    gpus as f64,
                );
                show(
                    container("kube_pod_container_status_running"),
                    f64::from(u8::from(current.is_some())),
                );
                if let Some(c) = current {
                    show(
                        container("kube_pod_container_state_started"),
                        unix_seconds(runs[c].started_at_ms),
                    );
                }
                if let Some(p) = previous {
                    show(
                        container("kube_pod_container_status_last_terminated_timestamp"),
                        unix_seconds(runs[p].until_ms),
                    );
                }
                product.get_or_insert(match class.as_str() {
                    "h100" => "NVIDIA-H100-80GB-HBM3",
                    _ => "NVIDIA-A100-SXM4-80GB",
                });
            }
            if let Some(product) = product {
                show(
                    labels(&[
                        ("__name__", "kube_node_labels"),
                        ("node", &node),
                        ("label_nvidia_com_gpu_product", product),
                    ]),
                    1.0,
                );
            }
            // A series KSM no longer exports (a run's start once it exited) is marked stale
            // by the scrape loop.
            for gone in shown[n].difference(&now_shown) {
                request.push((
                    gone.clone(),
                    PromSample {
                        value: f64::from_bits(STALE_NAN),
                        timestamp: now,
                    },
                ));
            }
            shown[n] = now_shown;
        }
        total += request.len() as u64;
        out.push(encode(request, SHARDS));
    }
    Requests {
        bodies: out,
        samples: total,
        hidden_gpu_ms,
    }
}

/// `node-NNN`'s index.
fn node_index(name: &str) -> usize {
    name.trim_start_matches("node-")
        .parse()
        .expect("simulated nodes are named node-NNN")
}

/// The remote-write shards a server's samples are sent in at once (remote write's queue
/// spreads series over its shards by a hash, each shard sending its series in order).
pub const SHARDS: usize = 4;

/// One request's samples, encoded and compressed, split over `shards` by series.
fn encode(samples: Vec<(Series, PromSample)>, shards: usize) -> Vec<Vec<u8>> {
    let mut by_series: Vec<BTreeMap<Series, Vec<PromSample>>> = vec![BTreeMap::new(); shards];
    for (series, sample) in samples {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&series, &mut hasher);
        let shard = std::hash::Hasher::finish(&hasher) as usize % shards;
        by_series[shard].entry(series).or_default().push(sample);
    }
    by_series
        .into_iter()
        .filter(|series| shards == 1 || !series.is_empty())
        .map(|series| {
            let request = WriteRequest {
                timeseries: series
                    .into_iter()
                    .map(|(labels, samples)| TimeSeries { labels, samples })
                    .collect(),
            };
            snap::raw::Encoder::new()
                .compress_vec(&request.encode_to_vec())
                .expect("snappy compresses any input")
        })
        .collect()
}

/// A Prometheus server on loopback with its remote-write receiver on.
pub struct Prometheus {
    pub child: Child,
    pub url: String,
    http: reqwest::Client,
    /// How it was started, to start it again (see [`Prometheus::backfill_rules`]).
    binary: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
}

impl Prometheus {
    /// The server: a TSDB, its remote-write receiver on.
    pub async fn start(binary: &Path, dir: &Path, port: u16) -> Result<Self> {
        let config = "global:\n  scrape_interval: 15s\n";
        let data = format!("--storage.tsdb.path={}", dir.join("data").display());
        // The admin API takes the snapshot that keeps the samples when rules are backfilled.
        let admin = "--web.enable-admin-api".to_string();
        Self::spawn(binary, dir, port, config, &[data, admin]).await
    }

    /// A node's Prometheus in agent mode: no TSDB, a write-ahead log, remote write to
    /// `remote_write` (a failed send is retried with backoff until it succeeds). What it
    /// scrapes comes in through its own remote-write receiver here (see [`Collector::Agent`]).
    /// The queue keeps one shard, as a node's agent taking a few hundred samples every 15 s
    /// does: this one agent stands in for every node and takes hours of readings in seconds,
    /// and the default's many shards drifted more than the server's 1-h appendable window
    /// apart, which made the server refuse up to 11 % of the readings as out of bounds (an
    /// artefact of the replay's speed, not what a node's agent meets).
    pub async fn start_agent(
        binary: &Path,
        dir: &Path,
        port: u16,
        remote_write: &str,
    ) -> Result<Self> {
        let config = format!(
            "global:\n  scrape_interval: 15s\nremote_write:\n  - url: {remote_write}/api/v1/write\n    queue_config:\n      max_shards: 1\n"
        );
        let flags = [
            "--enable-feature=agent".to_string(),
            format!("--storage.agent.path={}", dir.join("wal").display()),
        ];
        Self::spawn(binary, dir, port, &config, &flags).await
    }

    async fn spawn(
        binary: &Path,
        dir: &Path,
        port: u16,
        config: &str,
        flags: &[String],
    ) -> Result<Self> {
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let mut args = vec![
            format!("--config.file={}", config_file.display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--web.enable-remote-write-receiver".into(),
            "--log.level=warn".into(),
        ];
        args.extend_from_slice(flags);
        let child = Child::spawn("prometheus", binary, &args, dir)?;
        let prom = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            args,
        };
        prom.wait_ready().await?;
        Ok(prom)
    }

    /// Evaluates the recording rules of `rules` (a rule file) over `[start_ms, end_ms]` at
    /// their group's interval, as the server's rule manager would have while the samples came
    /// in (it evaluates only at the present, and the scenario is replayed in seconds):
    /// promtool's backfiller loads the file as the rule manager does and evaluates each rule
    /// at every step through this server's query API. The blocks it writes join a snapshot of
    /// the server's TSDB, its head included, and the server is started again on them: blocks
    /// added beside a head that spans the same hours would make it drop those hours of its
    /// write-ahead log (the scenario is recent, so all of it is in the head). Returns the
    /// server's CPU-seconds spent evaluating.
    pub async fn backfill_rules(&mut self, rules: &str, start_ms: i64, end_ms: i64) -> Result<f64> {
        let promtool = match self.binary.with_file_name("promtool") {
            beside if beside.exists() => beside,
            _ => PathBuf::from("promtool"),
        };
        // The rule manager offsets a group's evaluations into its interval by a hash of the
        // group's name and file: the file is named the same in every run (relative to the
        // server's directory), so the offset is too.
        std::fs::write(self.dir.join("rules.yml"), rules)?;
        let blocks = self.dir.join("backfill");
        let cpu = self.child.cpu_seconds();
        let out = std::process::Command::new(&promtool)
            .args(["tsdb", "create-blocks-from", "rules", "--quiet"])
            .arg(format!("--start={}", start_ms / 1000))
            .arg(format!("--end={}", end_ms / 1000))
            .arg(format!("--url={}", self.url))
            .arg(format!("--output-dir={}", blocks.display()))
            .arg("rules.yml")
            .current_dir(&self.dir)
            .output()
            .with_context(|| format!("cannot run {}", promtool.display()))?;
        if !out.status.success() {
            bail!(
                "promtool could not backfill the recording rules: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cpu = self.child.cpu_seconds() - cpu;
        let snapshot = self
            .http
            .post(format!("{}/api/v1/admin/tsdb/snapshot", self.url))
            .send()
            .await?
            .error_for_status()?
            .json::<Value>()
            .await?;
        let name = snapshot["data"]["name"]
            .as_str()
            .with_context(|| format!("no snapshot name in {snapshot}"))?;
        self.child.stop();
        let data = self.dir.join("data");
        let taken = self.dir.join("data-before-rules");
        std::fs::rename(&data, &taken)?;
        std::fs::create_dir(&data)?;
        for from in [taken.join("snapshots").join(name), blocks] {
            for block in std::fs::read_dir(&from)? {
                let block = block?;
                std::fs::rename(block.path(), data.join(block.file_name()))?;
            }
        }
        self.child = Child::spawn("prometheus", &self.binary, &self.args, &self.dir)?;
        self.wait_ready().await?;
        Ok(cpu)
    }

    async fn wait_ready(&self) -> Result<()> {
        let prom = self;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = prom.http.get(format!("{}/-/ready", prom.url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "Prometheus did not become ready in 60 s; its log: {}",
                    prom.child.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The sum of a metric of Prometheus's own over all its label sets, from `/metrics`.
    pub async fn own_metric(&self, name: &str) -> Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    pub async fn write(&self, body: Vec<u8>) -> Result<()> {
        send(&self.http, &self.url, body).await
    }

    /// One request's shards at once, as remote write's shards send theirs (each shard's
    /// series in order).
    pub async fn write_shards(&self, shards: Vec<Vec<u8>>) -> Result<()> {
        let mut sending = tokio::task::JoinSet::new();
        for body in shards {
            let (http, url) = (self.http.clone(), self.url.clone());
            sending.spawn(async move { send(&http, &url, body).await });
        }
        sending.join_all().await.into_iter().collect()
    }
}

/// One remote-write request to the server at `url`.
async fn send(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<()> {
    let r = http
        .post(format!("{url}/api/v1/write"))
        .header("Content-Encoding", "snappy")
        .header("Content-Type", "application/x-protobuf")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(body)
        .send()
        .await
        .context("remote write")?;
    if !r.status().is_success() {
        bail!(
            "remote write answered {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

impl Prometheus {
    async fn get(&self, path: &str, params: &[(&str, String)]) -> Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .query(params)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() || v["status"] != "success" {
            bail!("Prometheus answered {status}: {v}");
        }
        Ok(v)
    }

    /// An instant query at `at_ms`: each result's labels and value.
    pub async fn query(&self, q: &str, at_ms: i64) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let v = self
            .get(
                "/api/v1/query",
                &[("query", q.to_string()), ("time", seconds(at_ms))],
            )
            .await?;
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().into_iter().flatten() {
            let labels = r["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value: f64 = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .context("a sample value")?;
            out.push((labels, value));
        }
        Ok(out)
    }

    /// A range query; returns how many points came back.
    pub async fn query_range(
        &self,
        q: &str,
        start_ms: i64,
        end_ms: i64,
        step_ms: i64,
    ) -> Result<usize> {
        let v = self
            .get(
                "/api/v1/query_range",
                &[
                    ("query", q.to_string()),
                    ("start", seconds(start_ms)),
                    ("end", seconds(end_ms)),
                    ("step", seconds(step_ms)),
                ],
            )
            .await?;
        Ok(v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["values"].as_array().map_or(0, Vec::len))
            .sum())
    }
}

fn seconds(ms: i64) -> String {
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

/// The recording rules a provider keeps, evaluated every 15 s, and the hourly queries on what
/// they recorded (see [`Prometheus::backfill_rules`]). An hour reaches back 59m59.999s, not
/// `1h`: Prometheus 2 ranges include both ends, and `[1h]` would count the step on the hour in
/// the hours before and after it. The rule manager evaluates a group at an offset into each
/// 15-s interval (a hash of the group), so an hour's evaluations, each of the scrape at or
/// before it, are read at [`RULES_AFTER_MS`] past the hour's end: they are those of the
/// scrapes after the hour's start up to its end, whatever the offset.
pub const RULES_AFTER_MS: i64 = INTERVAL_MS - 1;

pub mod promql {
    /// An hour of 15-s steps, each in one hour only.
    pub const HOUR_STEPS: &str = "[59m59s999ms:15s]";
    /// An hour of a recorded rule's 15-s samples, each in one hour only.
    pub const HOUR: &str = "[59m59s999ms]";
    /// GPUs held per tenant, model and MIG profile (a GPU is held while its series is live).
    pub const GPUS_HELD: &str =
        "count by (namespace, modelName, GPU_I_PROFILE) (DCGM_FI_DEV_GPU_UTIL)";
    /// GPUs held per node.
    pub const NODE_GPUS_HELD: &str = "count by (Hostname) (DCGM_FI_DEV_GPU_UTIL)";
    /// Memory working set per tenant.
    pub const MEMORY: &str = "sum by (namespace) (container_memory_working_set_bytes)";
    /// kube-state-metrics: per container, the seconds of the scrape interval `(t - 15 s, t]`
    /// before its latest scrape `t` that its GPUs were held, from the API server's times: the
    /// running run since its start (the interval at most) and a run that exited in the interval
    /// up to its exit. Summed over an hour's scrapes, a run counts from its start to its exit,
    /// to the kubelet's second. `t` is the scrape's timestamp, not the evaluation's `time()`:
    /// the rule manager evaluates a group at an offset of its own into each interval (and
    /// `timestamp` gives a sample's own time only of a series selector, not of an operator's
    /// result).
    pub const KSM_HELD_SECONDS: &str = "sum by (namespace, pod, container) (clamp_max((timestamp(kube_pod_container_status_running) - kube_pod_container_state_started) and on (namespace, pod, container) kube_pod_container_status_running == 1, 15) or label_replace(clamp_min(kube_pod_container_status_last_terminated_timestamp - timestamp(kube_pod_container_status_last_terminated_timestamp) + 15, 0), \"part\", \"exit\", \"container\", \".*\"))";
    /// Each container's GPU requests.
    pub const KSM_GPU_REQUESTS: &str =
        "kube_pod_container_resource_requests{resource=~\"nvidia_com_.+\"}";

    /// GPU-seconds per tenant, GPU product and resource in one step.
    pub fn ksm_gpu_seconds() -> String {
        format!(
            "sum by (namespace, resource, label_nvidia_com_gpu_product) ({KSM_GPU_REQUESTS} * on (namespace, pod, container) group_left () ({KSM_HELD_SECONDS}) * on (node) group_left (label_nvidia_com_gpu_product) kube_node_labels)"
        )
    }
    /// GPUs requested by the running containers, per node.
    pub fn ksm_node_gpus() -> String {
        format!(
            "sum by (node) ({KSM_GPU_REQUESTS} * on (namespace, pod, container) group_left () (kube_pod_container_status_running == 1))"
        )
    }

    /// The recording rules every server here evaluates every 15 s (a rule whose series a
    /// server has not yields nothing there), as a rule file (JSON is YAML).
    pub fn recording_rules() -> String {
        let rules: Vec<serde_json::Value> = [
            (
                "namespace_model_profile:dcgm_gpus:count",
                GPUS_HELD.to_string(),
            ),
            ("hostname:dcgm_gpus:count", NODE_GPUS_HELD.to_string()),
            (
                "namespace:container_memory_working_set_bytes:sum",
                MEMORY.to_string(),
            ),
            (
                "namespace_resource_product:kube_gpu_seconds:step15s",
                ksm_gpu_seconds(),
            ),
            ("node:kube_gpus_running:sum", ksm_node_gpus()),
        ]
        .into_iter()
        .map(|(record, expr)| serde_json::json!({ "record": record, "expr": expr }))
        .collect();
        serde_json::json!({
            "groups": [{ "name": "chargeback", "interval": "15s", "rules": rules }]
        })
        .to_string()
    }

    /// GPU-hours per tenant, model and MIG profile, from the recorded GPUs held.
    pub fn gpu_hours() -> String {
        format!("sum_over_time(namespace_model_profile:dcgm_gpus:count{HOUR}) * 15 / 3600")
    }
    /// The same from a subquery at the rule's steps: what the recording rule must equal.
    pub fn gpu_hours_subquery() -> String {
        format!("sum_over_time(({GPUS_HELD}){HOUR_STEPS}) * 15 / 3600")
    }
    pub fn energy_joules() -> String {
        "sum by (namespace) (increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{namespace!=\"\"}[1h])) / 1000".into()
    }
    pub fn cpu_core_hours() -> String {
        "sum by (namespace) (increase(container_cpu_usage_seconds_total[1h])) / 3600".into()
    }
    pub fn memory_gib_hours() -> String {
        format!(
            "sum_over_time(namespace:container_memory_working_set_bytes:sum{HOUR}) * 15 / 3600 / 1073741824"
        )
    }
    pub fn node_max_gpus() -> String {
        format!("max_over_time(hostname:dcgm_gpus:count{HOUR})")
    }
    pub fn ksm_gpu_hours() -> String {
        format!("sum_over_time(namespace_resource_product:kube_gpu_seconds:step15s{HOUR}) / 3600")
    }
    /// The same from a subquery at the rule's steps: what the recording rule must equal.
    pub fn ksm_gpu_hours_subquery() -> String {
        format!("sum_over_time(({}){HOUR_STEPS}) / 3600", ksm_gpu_seconds())
    }
    pub fn ksm_node_max_gpus() -> String {
        format!("max_over_time(node:kube_gpus_running:sum{HOUR})")
    }
    /// A tenant's GPU-hours, hour by hour (the dashboard's query, on the recorded rule).
    pub fn tenant_gpu_hours(tenant: &str) -> String {
        format!(
            "sum by (namespace) (sum_over_time(namespace_model_profile:dcgm_gpus:count{{namespace=\"{tenant}\"}}{HOUR})) * 15 / 3600"
        )
    }
    /// A tenant's energy, hour by hour.
    pub fn tenant_energy(tenant: &str) -> String {
        format!(
            "sum by (namespace) (increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{namespace=\"{tenant}\"}}[1h])) / 1000"
        )
    }
}

/// The class a GPU model is priced as (the price book's mapping, applied to dcgm's `modelName`).
pub fn class_of(model: &str) -> &'static str {
    if model.contains("H100") {
        "h100"
    } else if model.contains("A100") {
        "a100"
    } else {
        "other"
    }
}

/// Hour starts of the scenario, and the instant each hour's `[1h]` queries are evaluated at.
pub fn hours(scenario: &Scenario) -> impl Iterator<Item = (i64, i64)> + '_ {
    (0..scenario.hours).map(|h| {
        let start = scenario.t0 + h * HOUR_MS;
        (start, start + HOUR_MS)
    })
}

/// A freshness probe: one new series, one sample at `now_ms`.
pub fn probe(i: usize, now_ms: i64) -> Vec<u8> {
    let probe = i.to_string();
    let mut shards = encode(
        vec![(
            labels(&[("__name__", "meterflow_compare_probe"), ("probe", &probe)]),
            PromSample {
                value: 1.0,
                timestamp: now_ms,
            },
        )],
        1,
    );
    shards.pop().expect("one series, one shard")
}
