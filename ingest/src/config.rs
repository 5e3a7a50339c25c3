//! The agent's configuration: the `[agent]` table of Meterflow's config file (`meterflow
//! --config FILE agent`, TOML; in Kubernetes a ConfigMap), shown here as the table's own
//! contents (in the file: `[agent]`, `[agent.spool]`, `[agent.sources.cgroup]`, ...). Every
//! section has defaults; each source is switched on with `enabled = true`
//! and most keep an allow-list of the metrics they yield (`metrics = [...]`). An unknown key,
//! a value of the wrong type or a rule that cannot work is refused at start with the key's
//! name and what is wrong.
//!
//! ```toml
//! brokers = "kafka-0.kafka:9092"
//! provider = "provider.example.com"
//! interval = "15s"
//!
//! [spool]
//! dir = "/var/lib/meterflow/spool"
//!
//! [attribution]
//! preset = "akash"              # or "namespace"
//! gpu_classes = [["H100", "h100"], ["A100", "a100"]]
//!
//! [sources.cgroup]
//! enabled = true
//!
//! [sources.kubelet]
//! enabled = true
//! pods_url = "https://10.0.0.5:10250/pods"
//! insecure_skip_tls_verify = true
//!
//! [sources.pod_resources]
//! enabled = true
//!
//! [sources.nvml]
//! enabled = true
//!
//! [[sources.prometheus_scrape]]
//! name = "kepler"
//! url = "http://127.0.0.1:9102/metrics"
//! preset = "kepler"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::attribution::{Attribution, AttributionConfig};
use crate::node::{NodeCollector, NodeIdentity};
use crate::sources::cgroup::{CgroupConfig, CgroupSource};
use crate::sources::kubelet::{KubeletConfig, KubeletSource};
use crate::sources::nvml::{NvmlConfig, NvmlSource};
use crate::sources::pod_resources::{PodResourcesConfig, PodResourcesSource};
use crate::sources::prometheus_scrape::{ScrapeConfig, Scraper};
use crate::sources::{Source, SourceError};

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Kafka bootstrap servers (`--brokers` overrides).
    pub brokers: Option<String>,
    /// This node's name; `$NODE_NAME` (the DaemonSet passes `spec.nodeName`), else the host
    /// name.
    pub node: Option<String>,
    /// The provider every series is labelled with.
    pub provider: String,
    /// The agent's id for deduplication; the node's name when absent.
    pub agent_id: Option<String>,
    /// Time between two ticks.
    #[serde(with = "crate::sources::duration")]
    pub interval: Duration,
    /// Serve `/metrics` and `/healthz` here.
    pub metrics_listen: Option<SocketAddr>,
    pub spool: SpoolSection,
    pub attribution: AttributionConfig,
    pub sources: Sources,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            brokers: None,
            node: None,
            provider: String::new(),
            agent_id: None,
            interval: Duration::from_secs(15),
            metrics_listen: None,
            spool: SpoolSection::default(),
            attribution: AttributionConfig::default(),
            sources: Sources::default(),
        }
    }
}

/// `[spool]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSection {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            dir: "meterflow-agent-spool".into(),
            max_bytes: 256 << 20,
        }
    }
}

/// `[sources.*]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Sources {
    pub simulator: SimulatorSection,
    pub cgroup: CgroupConfig,
    pub kubelet: KubeletConfig,
    pub pod_resources: PodResourcesConfig,
    pub nvml: NvmlConfig,
    pub prometheus_scrape: Vec<ScrapeConfig>,
}

/// `[sources.simulator]`: a simulated fleet instead of this node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorSection {
    pub enabled: bool,
    pub nodes: usize,
    pub seed: u64,
}

impl Default for SimulatorSection {
    fn default() -> Self {
        SimulatorSection {
            enabled: false,
            nodes: 1,
            seed: 1,
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the agent config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("agent config: {0}")]
    Invalid(String),
}

impl AgentConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.check()?;
        Ok(config)
    }

    /// Parses TOML; the message names the key, the line and what is wrong.
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// The `[agent]` table of a Meterflow config file, if it has one (other tables are not
    /// looked at; line numbers in messages are the file's).
    pub fn parse_table(text: &str) -> Result<Option<AgentConfig>, String> {
        #[derive(Deserialize)]
        struct File {
            agent: Option<AgentConfig>,
        }
        toml::from_str::<File>(text)
            .map(|f| f.agent)
            .map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Rules across keys.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        if self.interval < Duration::from_millis(100) {
            return invalid(format!(
                "interval: {:?} is too short (at least 100ms; 15s is usual)",
                self.interval
            ));
        }
        let s = &self.sources;
        let node_sources = s.cgroup.enabled
            || s.kubelet.enabled
            || s.pod_resources.enabled
            || s.nvml.enabled
            || !s.prometheus_scrape.is_empty();
        if s.simulator.enabled && node_sources {
            return invalid(
                "sources.simulator.enabled: the simulator replaces this node's sources; disable it or them".into(),
            );
        }
        if !s.simulator.enabled && !node_sources {
            return invalid(
                "sources: no source is enabled; set enabled = true under sources.cgroup, sources.kubelet, sources.pod_resources, sources.nvml, add a [[sources.prometheus_scrape]], or enable sources.simulator".into(),
            );
        }
        if s.simulator.enabled && s.simulator.nodes == 0 {
            return invalid("sources.simulator.nodes: must be at least 1".into());
        }
        if node_sources && !s.kubelet.enabled {
            return invalid(
                "sources.kubelet.enabled: readings are attributed through the node's pods; enable the kubelet source".into(),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for scrape in &s.prometheus_scrape {
            if !names.insert(&scrape.name) {
                return invalid(format!(
                    "sources.prometheus_scrape: two exporters are named `{}`; names must differ",
                    scrape.name
                ));
            }
        }
        if self.spool.max_bytes < 1 << 20 {
            return invalid(format!(
                "spool.max_bytes: {} is under 1 MiB; a broker outage of minutes would drop batches",
                self.spool.max_bytes
            ));
        }
        Attribution::new(&self.attribution).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The names of the enabled sources.
    pub fn enabled_sources(&self) -> Vec<String> {
        let s = &self.sources;
        let mut names: Vec<String> = [
            ("simulator", s.simulator.enabled),
            ("kubelet", s.kubelet.enabled),
            ("pod_resources", s.pod_resources.enabled),
            ("cgroup", s.cgroup.enabled),
            ("nvml", s.nvml.enabled),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| name.to_string())
        .collect();
        names.extend(s.prometheus_scrape.iter().map(|p| p.name.clone()));
        names
    }

    /// This node's name.
    pub fn node_name(&self) -> String {
        self.node
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "unknown-node".into())
    }

    /// The collector of this node's enabled sources.
    pub fn collector(&self) -> Result<NodeCollector, ConfigError> {
        let config = |e: SourceError| ConfigError::Invalid(e.to_string());
        let s = &self.sources;
        let mut sources: Vec<Box<dyn Source>> = Vec::new();
        if s.kubelet.enabled {
            sources.push(Box::new(KubeletSource::new(&s.kubelet).map_err(config)?));
        }
        if s.pod_resources.enabled {
            sources.push(Box::new(PodResourcesSource::new(s.pod_resources.clone())));
        }
        if s.cgroup.enabled {
            sources.push(Box::new(
                CgroupSource::new(s.cgroup.clone()).map_err(config)?,
            ));
        }
        if s.nvml.enabled {
            sources.push(Box::new(NvmlSource::new(s.nvml.clone()).map_err(config)?));
        }
        for scrape in &s.prometheus_scrape {
            sources.push(Box::new(Scraper::new(scrape).map_err(config)?));
        }
        let node = self.node_name();
        NodeCollector::new(
            NodeIdentity {
                agent_id: self.agent_id.clone().unwrap_or_else(|| node.clone()),
                node,
                provider: self.provider.clone(),
            },
            self.interval,
            s.kubelet.max_stale,
            Attribution::new(&self.attribution).map_err(|e| ConfigError::Invalid(e.to_string()))?,
            s.pod_resources.gpu_resources.clone(),
            sources,
        )
        .map_err(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        match AgentConfig::parse(text) {
            Err(e) => e,
            Ok(c) => c.check().expect_err("rejected").to_string(),
        }
    }

    #[test]
    fn the_documented_example_is_a_valid_config() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let c = AgentConfig::parse(&example).expect("the example parses");
        c.check().expect("the example is valid");
        assert_eq!(c.interval, Duration::from_secs(15));
        assert_eq!(c.attribution.preset, "akash");
        assert!(c.sources.kubelet.insecure_skip_tls_verify);
        assert_eq!(c.sources.prometheus_scrape[0].preset, "kepler");
        // Defaults fill what the file leaves out.
        assert_eq!(c.spool.max_bytes, 256 << 20);
        assert_eq!(
            c.sources.pod_resources.socket,
            PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock")
        );
        let collector = c.collector().expect("builds");
        drop(collector);
    }

    #[test]
    fn the_shipped_daemonset_config_is_valid() {
        let c = AgentConfig::parse_table(include_str!("../../deploy/kubernetes/base/agent.toml"))
            .expect("deploy/kubernetes/base/agent.toml parses")
            .expect("it has an [agent] table");
        c.check().expect("and is valid");
        assert!(c.sources.nvml.enabled && c.sources.cgroup.enabled);
        assert_eq!(c.metrics_listen.map(|a| a.port()), Some(9469));
        c.collector().expect("builds its collector");
    }

    #[test]
    fn errors_name_the_key_and_what_is_wrong() {
        let e = error("[sources.cgroup]\nenabled = true\nroots = \"/x\"\n");
        assert!(e.contains("unknown field `roots`"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let e = error("interval = \"fifteen\"\n");
        assert!(
            e.contains("interval") && e.contains("`fifteen` is not a duration"),
            "{e}"
        );
        let e = error("[sources.nvml]\nenabled = \"yes\"\n");
        assert!(
            e.contains("enabled") && e.contains("expected a boolean"),
            "{e}"
        );
        assert!(error("").contains("no source is enabled"));
        assert!(
            error("[sources.simulator]\nenabled = true\n[sources.cgroup]\nenabled = true\n")
                .starts_with("agent config: sources.simulator.enabled")
        );
        assert!(
            error("[sources.cgroup]\nenabled = true\n")
                .contains("sources.kubelet.enabled: readings are attributed")
        );
        let e = error("[sources.kubelet]\nenabled = true\n[attribution]\nlease = \"{label:a\"\n");
        assert!(e.starts_with("agent config: attribution.lease:"), "{e}");
        let e = error("interval = \"10ms\"\n[sources.simulator]\nenabled = true\n");
        assert!(e.contains("interval: 10ms is too short"), "{e}");
    }

    #[test]
    fn a_metric_from_two_sources_is_refused() {
        let c = AgentConfig::parse(
            "[sources.kubelet]\nenabled = true\n[sources.cgroup]\nenabled = true\n\
             [[sources.prometheus_scrape]]\nname = \"cadvisor\"\nurl = \"http://127.0.0.1:4194/metrics\"\npreset = \"cadvisor\"\n",
        )
        .expect("parses");
        c.check().expect("each section is fine alone");
        let e = c.collector().err().expect("overlap").to_string();
        assert!(
            e.contains("sources cgroup and cadvisor both yield cpu_usage_seconds_total"),
            "{e}"
        );
        // Narrowing one allow-list resolves it.
        let c = AgentConfig::parse(
            "[sources.kubelet]\nenabled = true\n[sources.cgroup]\nenabled = true\n\
             [[sources.prometheus_scrape]]\nname = \"cadvisor\"\nurl = \"http://127.0.0.1:4194/metrics\"\npreset = \"cadvisor\"\n\
             metrics = [\"network_receive_bytes_total\"]\n[sources.cgroup.x]\n",
        );
        assert!(c.is_err(), "unknown table under sources.cgroup");
        let c = AgentConfig::parse(
            "[sources.kubelet]\nenabled = true\n[sources.cgroup]\nenabled = true\nproc_root = \"/nonexistent\"\nmetrics = [\"cpu_usage_seconds_total\"]\n\
             [[sources.prometheus_scrape]]\nname = \"cadvisor\"\nurl = \"http://127.0.0.1:4194/metrics\"\npreset = \"cadvisor\"\n\
             metrics = [\"network_receive_bytes_total\"]\n",
        )
        .expect("parses");
        c.collector().expect("no metric twice");
    }
}
