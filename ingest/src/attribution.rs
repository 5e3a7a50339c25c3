//! Attribution: which tenant, lease, service and replica a container's readings belong to
//! (SPEC: Identity), from its pod's namespace, name, owner, labels and annotations.
//!
//! Each identity field is a template: literal text and placeholders `{namespace}`, `{pod}`,
//! `{container}`, `{workload}` (the owning controller, see [`Pod::workload`]),
//! `{label:KEY}` and `{annotation:KEY}`. Presets cover the two common clouds:
//! - `akash`: tenant = the lease owner label, lease = `dseq.gseq.oseq` from the lease labels,
//!   service = the manifest service label, replica = the pod;
//! - `namespace`: tenant = the namespace, lease = the workload, service = the container,
//!   replica = the pod.
//!
//! A placeholder whose label is missing makes the field unresolved; a pod whose tenant or lease
//! is unresolved is not attributed at all (its readings are counted and dropped, never billed
//! to an empty tenant). GPU price classes come from the model name through a table of
//! substrings (first match wins).

use serde::Deserialize;

use crate::sources::kubelet::Pod;

/// The identity templates (`[attribution]` in the agent's config).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttributionConfig {
    /// `akash` or `namespace`: the defaults of the four templates.
    #[serde(default = "default_preset")]
    pub preset: String,
    pub tenant: Option<String>,
    pub lease: Option<String>,
    pub service: Option<String>,
    pub replica: Option<String>,
    /// GPU model substring → price class, tried in order (e.g. `["H100", "h100"]`); a model no
    /// row matches is priced under its own name, lower-cased with spaces as dashes.
    #[serde(default)]
    pub gpu_classes: Vec<(String, String)>,
}

fn default_preset() -> String {
    "namespace".into()
}

impl Default for AttributionConfig {
    fn default() -> Self {
        AttributionConfig {
            preset: default_preset(),
            tenant: None,
            lease: None,
            service: None,
            replica: None,
            gpu_classes: Vec::new(),
        }
    }
}

/// Why a template cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("attribution.{key}: {why}")]
pub struct TemplateError {
    pub key: String,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Namespace,
    Pod,
    Container,
    Workload,
    Label(String),
    Annotation(String),
}

/// One parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Part>);

impl Template {
    pub fn parse(key: &str, text: &str) -> Result<Template, TemplateError> {
        let error = |why: String| TemplateError {
            key: key.to_string(),
            why,
        };
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..].find('}').ok_or_else(|| {
                error(format!(
                    "`{text}` has a `{{` without its `}}` (placeholders: {{namespace}}, {{pod}}, {{container}}, {{workload}}, {{label:KEY}}, {{annotation:KEY}})"
                ))
            })? + open;
            let name = &rest[open + 1..close];
            parts.push(match name.split_once(':') {
                None => match name {
                    "namespace" => Part::Namespace,
                    "pod" => Part::Pod,
                    "container" => Part::Container,
                    "workload" => Part::Workload,
                    _ => {
                        return Err(error(format!(
                            "unknown placeholder {{{name}}} in `{text}` (known: {{namespace}}, {{pod}}, {{container}}, {{workload}}, {{label:KEY}}, {{annotation:KEY}})"
                        )));
                    }
                },
                Some(("label", k)) if !k.is_empty() => Part::Label(k.to_string()),
                Some(("annotation", k)) if !k.is_empty() => Part::Annotation(k.to_string()),
                Some(_) => {
                    return Err(error(format!(
                        "unknown placeholder {{{name}}} in `{text}` (use {{label:KEY}} or {{annotation:KEY}})"
                    )));
                }
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(error(format!("`{text}` has a `}}` without its `{{`")));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template(parts))
    }

    /// The field for `container` of `pod`; `None` when a label or annotation is missing.
    pub fn render(&self, pod: &Pod, container: &str) -> Option<String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Namespace => out.push_str(&pod.namespace),
                Part::Pod => out.push_str(&pod.name),
                Part::Container => out.push_str(container),
                Part::Workload => out.push_str(&pod.workload()),
                Part::Label(k) => out.push_str(pod.labels.get(k)?),
                Part::Annotation(k) => out.push_str(pod.annotations.get(k)?),
            }
        }
        Some(out)
    }
}

/// Tenant, lease, service and replica of one container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub tenant: String,
    pub lease: String,
    pub service: String,
    pub replica: String,
}

/// The compiled rules.
#[derive(Debug, Clone)]
pub struct Attribution {
    tenant: Template,
    lease: Template,
    service: Template,
    replica: Template,
    gpu_classes: Vec<(String, String)>,
}

const AKASH: [&str; 4] = [
    "{label:akash.network/lease.id.owner}",
    "{label:akash.network/lease.id.dseq}.{label:akash.network/lease.id.gseq}.{label:akash.network/lease.id.oseq}",
    "{label:akash.network/manifest-service}",
    "{pod}",
];
const NAMESPACE: [&str; 4] = ["{namespace}", "{workload}", "{container}", "{pod}"];

impl Attribution {
    pub fn new(config: &AttributionConfig) -> Result<Attribution, TemplateError> {
        let preset = match config.preset.as_str() {
            "akash" => AKASH,
            "namespace" => NAMESPACE,
            other => {
                return Err(TemplateError {
                    key: "preset".into(),
                    why: format!("unknown preset `{other}` (known: akash, namespace)"),
                });
            }
        };
        let field = |key: &str, given: &Option<String>, default: &str| {
            Template::parse(key, given.as_deref().unwrap_or(default))
        };
        Ok(Attribution {
            tenant: field("tenant", &config.tenant, preset[0])?,
            lease: field("lease", &config.lease, preset[1])?,
            service: field("service", &config.service, preset[2])?,
            replica: field("replica", &config.replica, preset[3])?,
            gpu_classes: config.gpu_classes.clone(),
        })
    }

    /// The identity of `container` in `pod`; `None` when its tenant or lease is unresolved or
    /// empty. An unresolved service or replica is empty.
    pub fn identify(&self, pod: &Pod, container: &str) -> Option<Identity> {
        let tenant = self
            .tenant
            .render(pod, container)
            .filter(|t| !t.is_empty())?;
        let lease = self
            .lease
            .render(pod, container)
            .filter(|l| !l.is_empty())?;
        Some(Identity {
            tenant,
            lease,
            service: self.service.render(pod, container).unwrap_or_default(),
            replica: self.replica.render(pod, container).unwrap_or_default(),
        })
    }

    /// The price class of a GPU model.
    pub fn gpu_class(&self, model: &str) -> String {
        self.gpu_classes
            .iter()
            .find(|(needle, _)| model.contains(needle.as_str()))
            .map(|(_, class)| class.clone())
            .unwrap_or_else(|| model.trim().to_lowercase().replace(' ', "-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::kubelet::parse_pods;

    fn pods() -> Vec<Pod> {
        parse_pods(include_bytes!("sources/fixtures/kubelet-pods.json")).expect("fixture")
    }

    fn rules(preset: &str) -> Attribution {
        Attribution::new(&AttributionConfig {
            preset: preset.into(),
            ..Default::default()
        })
        .expect("preset compiles")
    }

    #[test]
    fn the_akash_preset_reads_the_lease_labels() {
        let pods = pods();
        assert_eq!(
            rules("akash").identify(&pods[0], "web"),
            Some(Identity {
                tenant: "akash1tenantaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
                lease: "18231234.1.1".into(),
                service: "web".into(),
                replica: "web-6d4cf56db6-x7k2p".into(),
            })
        );
        // A pod that is not an Akash lease is not attributed under the Akash preset.
        assert_eq!(rules("akash").identify(&pods[1], "trainer"), None);
    }

    #[test]
    fn the_namespace_preset_takes_the_namespace_and_the_workload() {
        let pods = pods();
        let r = rules("namespace");
        assert_eq!(
            r.identify(&pods[1], "trainer"),
            Some(Identity {
                tenant: "research".into(),
                lease: "train-42".into(),
                service: "trainer".into(),
                replica: "train-42-8xq4d".into(),
            })
        );
        let web = r.identify(&pods[0], "web").expect("attributed");
        assert_eq!(
            web.lease, "web",
            "the ReplicaSet's hash is not part of the lease"
        );
        assert_eq!(
            r.identify(&pods[2], "main").expect("no owner").lease,
            "lonely"
        );
    }

    #[test]
    fn custom_templates_mix_text_labels_and_fall_back_to_the_preset() {
        let r = Attribution::new(&AttributionConfig {
            preset: "namespace".into(),
            lease: Some("{label:team}/{workload}".into()),
            ..Default::default()
        })
        .expect("compiles");
        let pods = pods();
        let id = r.identify(&pods[1], "trainer").expect("attributed");
        assert_eq!(
            (id.tenant.as_str(), id.lease.as_str()),
            ("research", "vision/train-42")
        );
        assert_eq!(r.identify(&pods[0], "web"), None, "no team label, no lease");
    }

    #[test]
    fn template_errors_name_the_key_and_the_fix() {
        let bad = |lease: &str| {
            Attribution::new(&AttributionConfig {
                lease: Some(lease.into()),
                ..Default::default()
            })
            .expect_err("rejected")
            .to_string()
        };
        let e = bad("{labels:x}");
        assert!(
            e.starts_with("attribution.lease: unknown placeholder {labels:x}"),
            "{e}"
        );
        assert!(bad("{pod").contains("without its `}`"));
        assert!(bad("pod}").contains("without its `{`"));
        assert!(bad("{node}").contains("known: {namespace}"));
        let e = Attribution::new(&AttributionConfig {
            preset: "openshift".into(),
            ..Default::default()
        })
        .expect_err("rejected")
        .to_string();
        assert_eq!(
            e,
            "attribution.preset: unknown preset `openshift` (known: akash, namespace)"
        );
    }

    #[test]
    fn gpu_classes_come_from_the_table_then_the_model_name() {
        let r = Attribution::new(&AttributionConfig {
            gpu_classes: vec![
                ("H100".into(), "h100".into()),
                ("A100".into(), "a100".into()),
            ],
            ..Default::default()
        })
        .expect("compiles");
        assert_eq!(r.gpu_class("NVIDIA H100 80GB HBM3"), "h100");
        assert_eq!(r.gpu_class("NVIDIA A100-SXM4-40GB"), "a100");
        assert_eq!(r.gpu_class("NVIDIA L40S"), "nvidia-l40s");
    }
}
