//! Attribution: which tenant, lease, service and replica a container's readings belong to
//! (SPEC: Identity), from its pod's namespace, name, owner, labels and annotations.
//!
//! Each identity field is a template: literal text and placeholders `{namespace}`, `{pod}`,
//! `{container}`, `{workload}` (the owning controller, see [`Pod::workload`]),
//! `{label:KEY}` and `{annotation:KEY}` (the pod's), `{env:NAME}` (the container's literal
//! environment in the pod spec) and `{namespace_label:KEY}` (the labels of the pod's
//! namespace, read from the API server: see the kubelet source's `namespaces_url`). A
//! placeholder may list alternatives, `{namespace_label:KEY|env:NAME}`: the first that resolves
//! is used, and alternatives that resolve to different values are a conflict the agent counts
//! and warns of. Presets cover the two common clouds:
//! - `akash`: tenant = the lease owner, lease = `dseq.gseq.oseq`, from the namespace's lease
//!   labels or else the container's `AKASH_*` env (as the Akash provider writes them; see
//!   [`AKASH`] for which wins), service = the manifest service label, replica = the pod;
//! - `namespace`: tenant = the namespace, lease = the workload, service = the container,
//!   replica = the pod.
//!
//! A placeholder whose label is missing makes the field unresolved; a pod whose tenant or lease
//! is unresolved is not attributed at all (its readings are counted and dropped, never billed
//! to an empty tenant). GPU price classes come from the model name through a table of
//! substrings (first match wins).
//!
//! Namespaces are metered unless excluded: by default the cluster's own (`kube-system`,
//! `kube-public`, `kube-node-lease`, `openshift`, `openshift-*`), whose pods are no tenant's;
//! `exclude_namespaces` replaces that list and `include_namespaces`, when given, meters only
//! the namespaces it names. A pod of a namespace left out is not attributed, without a
//! warning and without counting as unattributed.

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
    /// Namespaces never metered: names, or patterns with `*` (`openshift-*`). Default
    /// [`SYSTEM_NAMESPACES`]; `[]` meters every namespace.
    pub exclude_namespaces: Option<Vec<String>>,
    /// When not empty, only these namespaces (names or patterns) are metered.
    #[serde(default)]
    pub include_namespaces: Vec<String>,
}

/// The namespaces left out unless `exclude_namespaces` says otherwise: Kubernetes' and
/// OpenShift's own, whose pods are no tenant's.
pub const SYSTEM_NAMESPACES: [&str; 5] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "openshift",
    "openshift-*",
];

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
            exclude_namespaces: None,
            include_namespaces: Vec::new(),
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

/// Where a placeholder's value comes from.
#[derive(Debug, Clone, PartialEq)]
enum Lookup {
    Namespace,
    Pod,
    Container,
    Workload,
    Label(String),
    Annotation(String),
    Env(String),
    NamespaceLabel(String),
}

const PLACEHOLDERS: &str = "{namespace}, {pod}, {container}, {workload}, {label:KEY}, {annotation:KEY}, {env:NAME}, {namespace_label:KEY}, alternatives as {namespace_label:KEY|env:NAME}";

impl Lookup {
    fn parse(name: &str) -> Option<Lookup> {
        Some(match name.split_once(':') {
            None => match name {
                "namespace" => Lookup::Namespace,
                "pod" => Lookup::Pod,
                "container" => Lookup::Container,
                "workload" => Lookup::Workload,
                _ => return None,
            },
            Some((_, "")) => return None,
            Some(("label", k)) => Lookup::Label(k.to_string()),
            Some(("annotation", k)) => Lookup::Annotation(k.to_string()),
            Some(("env", k)) => Lookup::Env(k.to_string()),
            Some(("namespace_label", k)) => Lookup::NamespaceLabel(k.to_string()),
            Some(_) => return None,
        })
    }

    fn value<'a>(&self, pod: &'a Pod, container: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        use std::borrow::Cow::{Borrowed, Owned};
        Some(match self {
            Lookup::Namespace => Borrowed(&pod.namespace),
            Lookup::Pod => Borrowed(&pod.name),
            Lookup::Container => Borrowed(container),
            Lookup::Workload => Owned(pod.workload()),
            Lookup::Label(k) => Borrowed(pod.labels.get(k)?),
            Lookup::Annotation(k) => Borrowed(pod.annotations.get(k)?),
            Lookup::Env(k) => Borrowed(pod.container(container)?.env.get(k)?),
            Lookup::NamespaceLabel(k) => Borrowed(pod.namespace_labels.get(k)?),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    /// The first alternative that resolves.
    Placeholder {
        text: String,
        alternatives: Vec<Lookup>,
    },
}

/// One parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Part>);

/// Two alternatives of one placeholder that both resolve, to different values: the first
/// was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub placeholder: String,
    pub used: String,
    pub other: String,
}

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
                    "`{text}` has a `{{` without its `}}` (placeholders: {PLACEHOLDERS})"
                ))
            })? + open;
            let name = &rest[open + 1..close];
            let alternatives = name
                .split('|')
                .map(|alt| {
                    Lookup::parse(alt).ok_or_else(|| {
                        error(format!(
                            "unknown placeholder {{{alt}}} in `{text}` (known: {PLACEHOLDERS})"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            parts.push(Part::Placeholder {
                text: format!("{{{name}}}"),
                alternatives,
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

    /// The field for `container` of `pod`; the placeholder that did not resolve otherwise.
    pub fn render(&self, pod: &Pod, container: &str) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Placeholder { text, alternatives } => {
                    let value = alternatives
                        .iter()
                        .find_map(|a| a.value(pod, container))
                        .ok_or_else(|| text.clone())?;
                    out.push_str(&value);
                }
            }
        }
        Ok(out)
    }

    /// Placeholders whose alternatives resolve to different values for `container` of `pod`.
    pub fn conflicts(&self, pod: &Pod, container: &str) -> Vec<Conflict> {
        let mut out = Vec::new();
        for part in &self.0 {
            let Part::Placeholder { text, alternatives } = part else {
                continue;
            };
            let mut values = alternatives.iter().filter_map(|a| a.value(pod, container));
            if let Some(used) = values.next() {
                for other in values.filter(|o| *o != used) {
                    out.push(Conflict {
                        placeholder: text.clone(),
                        used: used.to_string(),
                        other: other.to_string(),
                    });
                }
            }
        }
        out
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
    exclude_namespaces: Vec<String>,
    include_namespaces: Vec<String>,
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
fn matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The Akash provider labels the tenant's namespace with the lease id and writes it into every
/// container's env (`AKASH_OWNER`, `AKASH_DEPLOYMENT_SEQUENCE`, …); pods carry only
/// `akash.network`, `akash.network/namespace` and `akash.network/manifest-service`. The
/// namespace's labels win: the provider alone writes them, while a tenant's SDL may set an
/// `AKASH_*` variable itself (the provider adds each only when the SDL has not). The env is
/// used where the namespaces are not read.
const AKASH: [&str; 4] = [
    "{namespace_label:akash.network/lease.id.owner|env:AKASH_OWNER}",
    "{namespace_label:akash.network/lease.id.dseq|env:AKASH_DEPLOYMENT_SEQUENCE}.{namespace_label:akash.network/lease.id.gseq|env:AKASH_GROUP_SEQUENCE}.{namespace_label:akash.network/lease.id.oseq|env:AKASH_ORDER_SEQUENCE}",
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
        let exclude_namespaces = config
            .exclude_namespaces
            .clone()
            .unwrap_or_else(|| SYSTEM_NAMESPACES.map(String::from).to_vec());
        for (key, patterns) in [
            ("exclude_namespaces", &exclude_namespaces),
            ("include_namespaces", &config.include_namespaces),
        ] {
            if patterns.iter().any(|p| p.trim().is_empty()) {
                return Err(TemplateError {
                    key: key.into(),
                    why: "an empty pattern; give namespace names, or patterns such as openshift-*"
                        .into(),
                });
            }
        }
        Ok(Attribution {
            tenant: field("tenant", &config.tenant, preset[0])?,
            lease: field("lease", &config.lease, preset[1])?,
            service: field("service", &config.service, preset[2])?,
            replica: field("replica", &config.replica, preset[3])?,
            gpu_classes: config.gpu_classes.clone(),
            exclude_namespaces,
            include_namespaces: config.include_namespaces.clone(),
        })
    }

    /// Whether the pods of `namespace` are metered: not excluded, and included when
    /// `include_namespaces` is given.
    pub fn meters(&self, namespace: &str) -> bool {
        !self
            .exclude_namespaces
            .iter()
            .any(|p| matches(p, namespace))
            && (self.include_namespaces.is_empty()
                || self
                    .include_namespaces
                    .iter()
                    .any(|p| matches(p, namespace)))
    }

    /// The identity of `container` in `pod`; `None` when its tenant or lease is unresolved or
    /// empty ([`Attribution::why_unattributed`] says which). An unresolved service or replica is
    /// empty.
    pub fn identify(&self, pod: &Pod, container: &str) -> Option<Identity> {
        if !self.meters(&pod.namespace) {
            return None;
        }
        let tenant = self
            .tenant
            .render(pod, container)
            .ok()
            .filter(|t| !t.is_empty())?;
        let lease = self
            .lease
            .render(pod, container)
            .ok()
            .filter(|l| !l.is_empty())?;
        Some(Identity {
            tenant,
            lease,
            service: self.service.render(pod, container).unwrap_or_default(),
            replica: self.replica.render(pod, container).unwrap_or_default(),
        })
    }

    /// Why `container` of `pod` has no identity (`tenant: {env:AKASH_OWNER} did not
    /// resolve`), or `None` when it has one.
    pub fn why_unattributed(&self, pod: &Pod, container: &str) -> Option<String> {
        if !self.meters(&pod.namespace) {
            return Some(format!(
                "namespace {} is not metered (exclude_namespaces, include_namespaces)",
                pod.namespace
            ));
        }
        [("tenant", &self.tenant), ("lease", &self.lease)]
            .into_iter()
            .find_map(|(field, template)| match template.render(pod, container) {
                Err(placeholder) => Some(format!("{field}: {placeholder} did not resolve")),
                Ok(v) if v.is_empty() => Some(format!("{field} is empty")),
                Ok(_) => None,
            })
    }

    /// The fields of `container` of `pod` whose placeholder alternatives disagree.
    pub fn conflicts(&self, pod: &Pod, container: &str) -> Vec<(&'static str, Conflict)> {
        [
            ("tenant", &self.tenant),
            ("lease", &self.lease),
            ("service", &self.service),
            ("replica", &self.replica),
        ]
        .into_iter()
        .flat_map(|(field, t)| {
            t.conflicts(pod, container)
                .into_iter()
                .map(move |c| (field, c))
        })
        .collect()
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

    /// The fixture's pods with their namespaces' labels, as the kubelet source adds them.
    fn labelled_pods() -> Vec<Pod> {
        let namespaces = crate::sources::kubelet::parse_namespaces(include_bytes!(
            "sources/fixtures/kube-namespaces.json"
        ))
        .expect("fixture");
        let mut pods = pods();
        for pod in &mut pods {
            pod.namespace_labels = namespaces.get(&pod.namespace).cloned().unwrap_or_default();
        }
        pods
    }

    #[test]
    fn the_akash_preset_finds_the_lease_in_the_namespace_labels_or_else_in_env() {
        let lease = Identity {
            tenant: "akash1tenantaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            lease: "18231234.1.1".into(),
            service: "web".into(),
            replica: "web-6d4cf56db6-x7k2p".into(),
        };
        let akash = rules("akash");
        // Lookup the namespace's labels.
        let mut pods = labelled_pods();
        pods[0].containers[0].env.clear();
        assert_eq!(akash.identify(&pods[0], "web"), Some(lease.clone()));
        // Lookup env alone (namespaces not read).
        let pods = self::pods();
        assert!(pods[0].namespace_labels.is_empty());
        assert_eq!(akash.identify(&pods[0], "web"), Some(lease.clone()));
        // Both, and a tenant's SDL that set AKASH_OWNER to someone else: the namespace wins,
        // and the disagreement is reported.
        let mut pods = labelled_pods();
        pods[0].containers[0]
            .env
            .insert("AKASH_OWNER".into(), "akash1victim".into());
        assert_eq!(akash.identify(&pods[0], "web"), Some(lease));
        let conflicts = akash.conflicts(&pods[0], "web");
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert_eq!(conflicts[0].0, "tenant");
        assert_eq!(conflicts[0].1.other, "akash1victim");
        assert!(akash.conflicts(&labelled_pods()[0], "web").is_empty());
        // Neither: not attributed, and the agent can say why.
        let mut pods = self::pods();
        pods[0].containers[0].env.clear();
        assert_eq!(akash.identify(&pods[0], "web"), None);
        assert_eq!(
            akash.why_unattributed(&pods[0], "web").as_deref(),
            Some(
                "tenant: {namespace_label:akash.network/lease.id.owner|env:AKASH_OWNER} did not resolve"
            )
        );
    }

    #[test]
    fn a_pod_that_is_no_akash_lease_is_not_attributed_under_the_akash_preset() {
        let pods = labelled_pods();
        assert_eq!(rules("akash").identify(&pods[1], "trainer"), None);
        assert_eq!(
            rules("akash")
                .why_unattributed(&pods[1], "trainer")
                .as_deref(),
            Some(
                "tenant: {namespace_label:akash.network/lease.id.owner|env:AKASH_OWNER} did not resolve"
            )
        );
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
    fn system_namespaces_are_left_out_unless_the_config_says_otherwise() {
        for name in [
            "kube-system",
            "openshift",
            "openshift-monitoring",
            "openshift-",
        ] {
            assert!(!rules("namespace").meters(name), "{name}");
        }
        for name in ["research", "openshiftx", "my-openshift-app", "kube-systems"] {
            assert!(rules("namespace").meters(name), "{name}");
        }
        let mut pod = pods().remove(1);
        pod.namespace = "openshift-monitoring".into();
        assert_eq!(rules("namespace").identify(&pod, "trainer"), None);
        assert!(
            rules("namespace")
                .why_unattributed(&pod, "trainer")
                .is_some_and(|why| why.contains("not metered"))
        );
        let configured = |exclude: Option<&[&str]>, include: &[&str]| {
            Attribution::new(&AttributionConfig {
                exclude_namespaces: exclude.map(|e| e.iter().map(|s| s.to_string()).collect()),
                include_namespaces: include.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
        };
        // `[]` meters every namespace; a list replaces the default; include narrows.
        let all = configured(Some(&[]), &[]).expect("valid");
        assert!(all.identify(&pod, "trainer").is_some());
        let own = configured(Some(&["*-sandbox", "ci"]), &[]).expect("valid");
        assert!(own.meters("openshift-monitoring"));
        assert!(!own.meters("team-a-sandbox") && !own.meters("ci"));
        let only = configured(None, &["team-*", "research"]).expect("valid");
        assert!(only.meters("team-a") && only.meters("research"));
        assert!(!only.meters("default") && !only.meters("kube-system"));
        assert_eq!(
            configured(Some(&[" "]), &[])
                .map(|_| ())
                .expect_err("an empty pattern")
                .key,
            "exclude_namespaces"
        );
        // Patterns: `*` anywhere, any run of characters (none included).
        assert!(matches("a*b*c", "abc") && matches("a*b*c", "a-b-b-c") && !matches("a*b*c", "acb"));
        assert!(
            matches("*", "")
                && matches("x", "x")
                && !matches("x", "xy")
                && !matches("ab*ba", "aba")
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
        assert!(bad("{env:}").contains("unknown placeholder {env:}"));
        assert!(bad("{env:A|node}").contains("unknown placeholder {node}"));
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
