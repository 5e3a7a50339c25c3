//! The Prometheus scrape source: readings from exporters a provider already runs —
//! dcgm-exporter, Kepler, cAdvisor — turned into samples by a mapping table.
//!
//! Each row of the table names an exporter metric, the sample metric it becomes, its kind
//! (counter, gauge) and the factor to our unit (DCGM's framebuffer MiB × 1,048,576 = bytes,
//! its energy mJ × 0.001 = joules). Rows with the same target (container or GPU) and metric
//! are summed (cAdvisor's per-device and per-interface series). Which exporter labels name the
//! namespace, pod, container and GPU is part of the preset; a custom exporter gives its own.
//! A series whose labels name no container and no GPU is skipped: it is the node's, not a
//! tenant's.

use std::collections::BTreeMap;
use std::time::Duration;

use meterflow_schemas::SampleKind;
use meterflow_schemas::metrics as m;
use serde::Deserialize;

pub use meterflow_guard::exposition::{Line, parse_text};

use super::{GpuInfo, Reading, Scope, SourceError, Target};

/// One exporter to scrape (`[[sources.prometheus_scrape]]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScrapeConfig {
    /// A name for logs, metrics and health (`dcgm`, `kepler`, …).
    pub name: String,
    /// The exporter's metrics URL.
    pub url: String,
    /// `dcgm`, `kepler`, `cadvisor` or `none`: the mapping rows and labels to start from.
    #[serde(default = "none")]
    pub preset: String,
    /// More rows, after the preset's.
    #[serde(default)]
    pub map: Vec<MapRow>,
    /// Label names, replacing the preset's where given.
    #[serde(default)]
    pub labels: LabelNames,
    /// Only these sample metrics are kept (empty: all the rows yield).
    #[serde(default)]
    pub metrics: Vec<String>,
}

fn none() -> String {
    "none".into()
}

/// One mapping row.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MapRow {
    /// The exporter's metric name.
    pub from: String,
    /// The sample metric.
    pub to: String,
    pub kind: RowKind,
    /// Multiplier to the sample's unit.
    #[serde(default = "one")]
    pub scale: f64,
    /// A pod-level series (network of the pod's namespace): attributed to the pod's first
    /// container, so it is counted once per pod.
    #[serde(default)]
    pub pod_level: bool,
}

fn one() -> f64 {
    1.0
}

/// What an exporter's metric becomes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum RowKind {
    Counter,
    Gauge,
}

/// Which labels carry the identity (empty: not carried).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelNames {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    pub gpu_uuid: Option<String>,
    pub gpu_model: Option<String>,
    pub mig_profile: Option<String>,
}

fn row(from: &str, to: &str, kind: RowKind, scale: f64, pod_level: bool) -> MapRow {
    MapRow {
        from: from.into(),
        to: to.into(),
        kind,
        scale,
        pod_level,
    }
}

/// The exposition's lines summed per (target, GPU, metric): the row's kind, the sum, and
/// what the counter counts since.
type Sums = BTreeMap<(Target, Option<GpuInfo>, String), (RowKind, f64, Scope)>;

/// The rows and labels of a preset.
pub fn preset(name: &str) -> Option<(Vec<MapRow>, LabelNames)> {
    use RowKind::{Counter, Gauge};
    let names = |ns: &str, pod: &str, container: &str| LabelNames {
        namespace: Some(ns.into()),
        pod: Some(pod.into()),
        container: Some(container.into()),
        ..Default::default()
    };
    Some(match name {
        "none" => (Vec::new(), LabelNames::default()),
        "dcgm" => (
            vec![
                row(
                    "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
                    m::GPU_UTILIZATION,
                    Gauge,
                    1.0,
                    false,
                ),
                row(
                    "DCGM_FI_DEV_FB_USED",
                    m::VRAM_BYTES,
                    Gauge,
                    1_048_576.0,
                    false,
                ),
                row(
                    "DCGM_FI_DEV_POWER_USAGE",
                    "gpu_power_watts",
                    Gauge,
                    1.0,
                    false,
                ),
                // In percent.
                row(
                    "DCGM_FI_DEV_MEM_COPY_UTIL",
                    m::GPU_COPY_UTILIZATION,
                    Gauge,
                    0.01,
                    false,
                ),
                row(
                    "DCGM_FI_DEV_GPU_TEMP",
                    m::GPU_TEMPERATURE,
                    Gauge,
                    1.0,
                    false,
                ),
                row("DCGM_FI_DEV_SM_CLOCK", m::GPU_SM_CLOCK, Gauge, 1.0, false),
                row(
                    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                    m::ENERGY_JOULES,
                    Counter,
                    0.001,
                    false,
                ),
            ],
            LabelNames {
                gpu_uuid: Some("UUID".into()),
                gpu_model: Some("modelName".into()),
                mig_profile: Some("GPU_I_PROFILE".into()),
                ..names("namespace", "pod", "container")
            },
        ),
        // Kepler (0.7 to 0.9): a container's host energy is its package, DRAM and other
        // joules summed (over both modes, dynamic and idle); its GPU joules are left to NVML or
        // dcgm-exporter, which measure the board.
        "kepler" => (
            ["package", "dram", "other"]
                .map(|part| {
                    row(
                        &format!("kepler_container_{part}_joules_total"),
                        m::HOST_ENERGY_JOULES,
                        Counter,
                        1.0,
                        false,
                    )
                })
                .into(),
            names("container_namespace", "pod_name", "container_name"),
        ),
        "cadvisor" => (
            vec![
                row(
                    "container_cpu_usage_seconds_total",
                    m::CPU_SECONDS,
                    Counter,
                    1.0,
                    false,
                ),
                row(
                    "container_memory_working_set_bytes",
                    m::MEMORY_BYTES,
                    Gauge,
                    1.0,
                    false,
                ),
                row(
                    "container_fs_reads_bytes_total",
                    m::STORAGE_READ_BYTES,
                    Counter,
                    1.0,
                    false,
                ),
                row(
                    "container_fs_writes_bytes_total",
                    m::STORAGE_WRITE_BYTES,
                    Counter,
                    1.0,
                    false,
                ),
                row(
                    "container_network_receive_bytes_total",
                    m::NETWORK_RECEIVE_BYTES,
                    Counter,
                    1.0,
                    true,
                ),
                row(
                    "container_network_transmit_bytes_total",
                    m::NETWORK_TRANSMIT_BYTES,
                    Counter,
                    1.0,
                    true,
                ),
            ],
            names("namespace", "pod", "container"),
        ),
        _ => return None,
    })
}

/// One exporter, ready to scrape.
#[derive(Debug, Clone)]
pub struct Scraper {
    pub name: String,
    url: String,
    rows: BTreeMap<String, MapRow>,
    labels: LabelNames,
    http: reqwest::Client,
}

impl Scraper {
    /// Checks `config` (errors name the key under `sources.prometheus_scrape`).
    pub fn new(config: &ScrapeConfig) -> Result<Scraper, SourceError> {
        let key = format!("sources.prometheus_scrape[{}]", config.name);
        let (mut rows, mut labels) = preset(&config.preset).ok_or_else(|| {
            SourceError::Config(format!(
                "{key}.preset: unknown preset `{}` (known: dcgm, kepler, cadvisor, none)",
                config.preset
            ))
        })?;
        rows.extend(config.map.iter().cloned());
        if !config.metrics.is_empty() {
            for wanted in &config.metrics {
                if !rows.iter().any(|r| &r.to == wanted) {
                    return Err(SourceError::Config(format!(
                        "{key}.metrics: no row yields `{wanted}` (rows yield: {})",
                        rows.iter()
                            .map(|r| r.to.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
            rows.retain(|r| config.metrics.contains(&r.to));
        }
        for r in &rows {
            if !(r.scale.is_finite() && r.scale > 0.0) {
                return Err(SourceError::Config(format!(
                    "{key}.map: scale of `{}` must be a positive number, not {}",
                    r.from, r.scale
                )));
            }
        }
        let l = &config.labels;
        for (mine, given) in [
            (&mut labels.namespace, &l.namespace),
            (&mut labels.pod, &l.pod),
            (&mut labels.container, &l.container),
            (&mut labels.gpu_uuid, &l.gpu_uuid),
            (&mut labels.gpu_model, &l.gpu_model),
            (&mut labels.mig_profile, &l.mig_profile),
        ] {
            if given.is_some() {
                mine.clone_from(given);
            }
        }
        if reqwest::Url::parse(&config.url).is_err() {
            return Err(SourceError::Config(format!(
                "{key}.url: `{}` is not a URL (e.g. http://127.0.0.1:9400/metrics)",
                config.url
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| SourceError::Config(format!("{key}: {e}")))?;
        Ok(Scraper {
            name: config.name.clone(),
            url: config.url.clone(),
            rows: rows.into_iter().map(|r| (r.from.clone(), r)).collect(),
            labels,
            http,
        })
    }

    /// The sample metrics this scraper can yield.
    pub fn metrics(&self) -> Vec<String> {
        // Several rows may be summed into one metric (Kepler's parts of host energy).
        let metrics: std::collections::BTreeSet<&String> =
            self.rows.values().map(|r| &r.to).collect();
        metrics.into_iter().cloned().collect()
    }

    /// Scrapes the exporter once.
    pub async fn scrape(&self) -> Result<Vec<Reading>, SourceError> {
        let failed = |e: String| SourceError::Failed(format!("GET {}: {e}", self.url));
        let response = self
            .http
            .get(&self.url)
            .send()
            .await
            .map_err(|e| failed(crate::error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(format!("answered {status}")));
        }
        let text = response
            .text()
            .await
            .map_err(|e| failed(crate::error_chain(&e)))?;
        let lines = parse_text(&text).map_err(failed)?;
        Ok(self.readings(&lines))
    }

    /// The readings of a parsed exposition.
    pub fn readings(&self, lines: &[Line]) -> Vec<Reading> {
        let mut sums: Sums = BTreeMap::new();
        let label = |line: &Line, name: &Option<String>| -> String {
            name.as_ref()
                .and_then(|n| line.labels.get(n))
                .cloned()
                .unwrap_or_default()
        };
        for line in lines {
            let Some(row) = self.rows.get(&line.name) else {
                continue;
            };
            if !line.value.is_finite() {
                continue;
            }
            let (ns, pod, container) = (
                label(line, &self.labels.namespace),
                label(line, &self.labels.pod),
                label(line, &self.labels.container),
            );
            let uuid = label(line, &self.labels.gpu_uuid);
            let gpu = (!uuid.is_empty()).then(|| GpuInfo {
                uuid: uuid.clone(),
                model: label(line, &self.labels.gpu_model),
                mig_profile: label(line, &self.labels.mig_profile),
            });
            // Board-level energy repeated on every MIG instance's line would be counted once per
            // instance: it is never attributed to an instance's holder.
            if row.to == m::ENERGY_JOULES && gpu.as_ref().is_some_and(|g| !g.mig_profile.is_empty())
            {
                continue;
            }
            // What a counter counts since: a board's energy since its driver loaded, a pod's
            // network since the pod started; the rest from the container's start.
            let scope = match &gpu {
                Some(g) if row.to == m::ENERGY_JOULES => Scope::Board(g.uuid.clone()),
                _ if row.pod_level && !pod.is_empty() => Scope::Pod(format!("{ns}/{pod}")),
                _ => Scope::Container,
            };
            let pod_container = container.is_empty() || container == "POD";
            let target = if !pod.is_empty() && row.pod_level {
                Target::Pod { namespace: ns, pod }
            } else if !pod.is_empty() && !pod_container {
                Target::Named {
                    namespace: ns,
                    pod,
                    container,
                }
            } else if !pod.is_empty() || gpu.is_none() {
                // The pod's own cgroup (cAdvisor's container="") or no identity at all.
                continue;
            } else {
                Target::Gpu(uuid)
            };
            let entry = sums
                .entry((target, gpu, row.to.clone()))
                .or_insert((row.kind, 0.0, scope));
            entry.1 += line.value * row.scale;
        }
        sums.into_iter()
            .map(|((target, gpu, metric), (kind, value, scope))| Reading {
                target,
                gpu,
                kind: match kind {
                    RowKind::Counter => SampleKind::Counter,
                    RowKind::Gauge => SampleKind::Gauge,
                },
                metric,
                value,
                scope,
            })
            .collect()
    }
}

impl super::Source for Scraper {
    fn name(&self) -> &str {
        &self.name
    }

    fn metrics(&self) -> Vec<String> {
        Scraper::metrics(self)
    }

    fn collect(&mut self) -> super::BoxFuture<'_, Result<super::Collected, SourceError>> {
        Box::pin(async move {
            Ok(super::Collected {
                readings: self.scrape().await?,
                ..Default::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scraper(preset: &str) -> Scraper {
        Scraper::new(&ScrapeConfig {
            name: preset.into(),
            url: "http://127.0.0.1:1/metrics".into(),
            preset: preset.into(),
            map: vec![],
            labels: LabelNames::default(),
            metrics: vec![],
        })
        .expect("valid")
    }

    fn value(readings: &[Reading], target: &Target, metric: &str) -> f64 {
        readings
            .iter()
            .find(|r| &r.target == target && r.metric == metric)
            .unwrap_or_else(|| panic!("no {metric} for {target:?} in {readings:#?}"))
            .value
    }

    #[test]
    fn dcgm_exporter_maps_units_and_attributes_by_pod_or_gpu() {
        let readings = scraper("dcgm")
            .readings(&parse_text(include_str!("fixtures/dcgm-exporter.txt")).expect("fixture"));
        let web = Target::Named {
            namespace: "4pv7q2k0dl8r1ls3r1hmp7n0uc0fh0b5q4dqm0m4vq8c6".into(),
            pod: "web-6d4cf56db6-x7k2p".into(),
            container: "web".into(),
        };
        let held: Vec<&Reading> = readings.iter().filter(|r| r.target == web).collect();
        // Two GPUs, seven metrics each.
        assert_eq!(held.len(), 14);
        // Temperature and SM clock as they are; the copy engine's percent as a ratio.
        let of_gpu0 = |metric: &str| {
            held.iter()
                .find(|r| {
                    r.metric == metric
                        && r.gpu
                            .as_ref()
                            .is_some_and(|g| g.uuid == "GPU-11111111-aaaa")
                })
                .map(|r| (r.kind, r.value))
        };
        assert_eq!(of_gpu0(m::GPU_TEMPERATURE), Some((SampleKind::Gauge, 64.0)));
        assert_eq!(of_gpu0(m::GPU_SM_CLOCK), Some((SampleKind::Gauge, 1_980.0)));
        let copy = of_gpu0(m::GPU_COPY_UTILIZATION).expect("copy engine");
        assert_eq!(copy.0, SampleKind::Gauge);
        assert!((copy.1 - 0.41).abs() < 1e-12, "{copy:?}");
        let gpu0 = held
            .iter()
            .find(|r| {
                r.metric == m::VRAM_BYTES
                    && r.gpu
                        .as_ref()
                        .is_some_and(|g| g.uuid == "GPU-11111111-aaaa")
            })
            .expect("vram of GPU 0");
        assert_eq!(gpu0.value, 40_000.0 * 1_048_576.0);
        assert_eq!(gpu0.kind, SampleKind::Gauge);
        assert_eq!(
            gpu0.gpu.as_ref().expect("gpu").model,
            "NVIDIA H100 80GB HBM3"
        );
        let energy = held
            .iter()
            .find(|r| {
                r.metric == m::ENERGY_JOULES
                    && r.gpu
                        .as_ref()
                        .is_some_and(|g| g.uuid == "GPU-11111111-aaaa")
            })
            .expect("energy");
        assert_eq!(energy.kind, SampleKind::Counter);
        assert_eq!(energy.value, 123_456_789.0 * 0.001);
        // A GPU no pod holds right now is known by its UUID only.
        let idle = Target::Gpu("GPU-44444444-dddd".into());
        assert_eq!(value(&readings, &idle, m::GPU_UTILIZATION), 0.0);
        // A MIG instance carries its profile.
        let mig = readings
            .iter()
            .find(|r| r.gpu.as_ref().is_some_and(|g| g.mig_profile == "1g.10gb"))
            .expect("mig instance");
        assert_eq!(
            mig.target,
            Target::Named {
                namespace: "research".into(),
                pod: "train-42-8xq4d".into(),
                container: "trainer".into()
            }
        );
        assert!(
            !readings.iter().any(|r| r.metric == m::ENERGY_JOULES
                && r.gpu.as_ref().is_some_and(|g| !g.mig_profile.is_empty())),
            "board energy is not given to a MIG instance's holder"
        );
    }

    #[test]
    fn cadvisor_sums_devices_skips_pod_cgroups_and_puts_network_on_the_pod() {
        let readings = scraper("cadvisor")
            .readings(&parse_text(include_str!("fixtures/cadvisor.txt")).expect("fixture"));
        let trainer = Target::Named {
            namespace: "research".into(),
            pod: "train-42-8xq4d".into(),
            container: "trainer".into(),
        };
        assert_eq!(value(&readings, &trainer, m::CPU_SECONDS), 1234.5);
        assert_eq!(value(&readings, &trainer, m::MEMORY_BYTES), 2_147_483_648.0);
        // Two block devices, summed.
        assert_eq!(value(&readings, &trainer, m::STORAGE_READ_BYTES), 3000.0);
        let pod = Target::Pod {
            namespace: "research".into(),
            pod: "train-42-8xq4d".into(),
        };
        // Two interfaces of the pod's network namespace, summed, once.
        assert_eq!(value(&readings, &pod, m::NETWORK_RECEIVE_BYTES), 7000.0);
        // The pod-level cgroup (container="") and the node's root cgroup are not tenants'.
        assert!(readings.iter().all(|r| match &r.target {
            Target::Named { container, .. } => container == "trainer",
            Target::Pod { .. } => true,
            _ => false,
        }));
        assert_eq!(readings.len(), 6);
    }

    #[test]
    fn kepler_host_energy_is_package_dram_and_other_without_the_gpu() {
        let line = |part: &str, mode: &str, joules: f64| {
            format!(
                "kepler_container_{part}_joules_total{{container_id=\"cccc\",container_namespace=\"research\",pod_name=\"train-42-8xq4d\",container_name=\"trainer\",mode=\"{mode}\"}} {joules}\n"
            )
        };
        let text: String = [
            line("package", "dynamic", 100.0),
            line("package", "idle", 40.0),
            line("dram", "dynamic", 10.0),
            line("dram", "idle", 4.0),
            line("other", "dynamic", 1.0),
            line("other", "idle", 0.5),
            line("gpu", "dynamic", 900.0),
            // The total repeats the parts (GPU included): not read.
            line("", "dynamic", 1_011.0).replace("kepler_container__", "kepler_container_"),
        ]
        .concat();
        let readings = scraper("kepler").readings(&parse_text(&text).expect("parses"));
        let trainer = Target::Named {
            namespace: "research".into(),
            pod: "train-42-8xq4d".into(),
            container: "trainer".into(),
        };
        // 100 + 40 + 10 + 4 + 1 + 0.5 joules, by hand.
        assert_eq!(value(&readings, &trainer, m::HOST_ENERGY_JOULES), 155.5);
        assert_eq!(readings.len(), 1, "{readings:?}");
        assert_eq!(readings[0].scope, Scope::Container);
    }

    #[test]
    fn config_errors_name_the_key() {
        let config = |preset: &str, metrics: Vec<String>| ScrapeConfig {
            name: "x".into(),
            url: "http://127.0.0.1:9400/metrics".into(),
            preset: preset.into(),
            map: vec![],
            labels: LabelNames::default(),
            metrics,
        };
        let e = Scraper::new(&config("dcgmx", vec![]))
            .expect_err("preset")
            .to_string();
        assert!(
            e.contains("sources.prometheus_scrape[x].preset: unknown preset `dcgmx`"),
            "{e}"
        );
        let e = Scraper::new(&config("dcgm", vec!["cpu_usage_seconds_total".into()]))
            .expect_err("metric")
            .to_string();
        assert!(
            e.contains(
                "sources.prometheus_scrape[x].metrics: no row yields `cpu_usage_seconds_total`"
            ),
            "{e}"
        );
        let kept = Scraper::new(&config("dcgm", vec![m::GPU_UTILIZATION.into()])).expect("ok");
        assert_eq!(kept.metrics(), [m::GPU_UTILIZATION]);
        let mut bad_url = config("dcgm", vec![]);
        bad_url.url = "9400".into();
        assert!(
            Scraper::new(&bad_url)
                .expect_err("url")
                .to_string()
                .contains(".url: `9400` is not a URL")
        );
    }
}
