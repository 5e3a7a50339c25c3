//! What `deploy/` ships is checked against the running parts: every metric a Grafana panel or
//! an alert queries is one the running components export, in PromQL Prometheus parses, and
//! every API a panel reads is a route the sink serves.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::common::{Pipeline, get_as, get_text, token};

const OPERATOR_DASHBOARD: &str = include_str!("../../deploy/grafana/meterflow-operator.json");

/// The metric names (`meterflow_*`, `process_*`) a PromQL expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("meterflow_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_dashboard_queries_only_what_the_components_export() {
    let dashboard: Value = serde_json::from_str(OPERATOR_DASHBOARD).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    // Panels have distinct ids and fit Grafana's 24-column grid.
    let ids: BTreeSet<i64> = panels.iter().filter_map(|p| p["id"].as_i64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids repeat");
    for p in panels {
        let grid = &p["gridPos"];
        let (x, w) = (
            grid["x"].as_i64().unwrap_or(-1),
            grid["w"].as_i64().unwrap_or(0),
        );
        assert!(x >= 0 && w > 0 && x + w <= 24, "{}: {grid}", p["title"]);
    }
    // Every datasource a panel names is one of the dashboard's datasource variables, of the
    // panel's datasource type, so the importer picks it from a list (no inputs to map).
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        dashboard["__inputs"].is_null(),
        "datasource variables, not inputs"
    );
    let panels: Vec<&Value> = panels.iter().filter(|p| p["type"] != "row").collect();
    let targets: Vec<&Value> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .collect();
    for t in panels.iter().copied().chain(targets.iter().copied()) {
        let ds = &t["datasource"];
        let uid = ds["uid"].as_str().expect("a datasource uid");
        assert!(
            variables.iter().any(|v| v["type"] == "datasource"
                && format!("${{{}}}", v["name"].as_str().unwrap_or_default()) == uid
                && v["query"] == ds["type"]),
            "datasource {ds}: no datasource variable of its type"
        );
    }
    // A row each for the sink, the processor and the agents.
    for part in [
        "meterflow_sink_",
        "meterflow_processor_",
        "meterflow_agent_",
    ] {
        assert!(
            targets
                .iter()
                .filter(|t| t["expr"].as_str().is_some_and(|e| e.contains(part)))
                .count()
                >= 6,
            "fewer than six queries on {part}*"
        );
    }

    // The sink URL it starts with is the sink Service's, from another namespace, on its port;
    // every replica reads the whole usage topic, so their lags are never summed.
    let sink_service =
        render(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base"))
            .into_iter()
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "meterflow-sink")
            .expect("the sink's Service");
    let port = sink_service["spec"]["ports"][0]["port"]
        .as_i64()
        .expect("a port");
    let host = format!(
        "http://meterflow-sink.{}.svc",
        sink_service["metadata"]["namespace"]
            .as_str()
            .expect("a namespace")
    );
    let url = variables
        .iter()
        .find(|v| v["name"] == "sink_url")
        .and_then(|v| v["current"]["value"].as_str())
        .expect("the sink URL");
    assert!(
        url == host && port == 80 || url == format!("{host}:{port}"),
        "{url}: the sink Service is {host} port {port}"
    );
    for t in &targets {
        let expr = t["expr"].as_str().unwrap_or_default();
        assert!(
            !(expr.contains("meterflow_sink_consumer_lag_records") && expr.contains("sum(")),
            "{expr}: each replica's lag is the whole topic's"
        );
    }

    let (pipeline, exported) =
        components_after_work(meterflow_sink::limits::Limits::default()).await;
    let operator = token("");
    let mut queried = BTreeSet::new();
    let mut paths = Vec::new();
    for t in &targets {
        if let Some(expr) = t["expr"].as_str() {
            queried.extend(metric_names(expr));
        }
        if let Some(url) = t["url"].as_str() {
            paths.push(
                url.strip_prefix("${sink_url}")
                    .expect("URLs start at the sink")
                    .to_string(),
            );
        }
    }
    assert!(queried.len() >= 8, "{queried:?}");
    promql_parses(targets.iter().filter_map(|t| t["expr"].as_str()));
    assert_exported(&queried, &exported, "queried");
    // The API panels read routes the sink serves, and an operator token gets an answer.
    assert!(!paths.is_empty());
    for path in paths {
        assert!(
            meterflow_sink::api::paths().contains(&path.as_str()),
            "{path}"
        );
        assert_eq!(
            get_as(&pipeline.url(&path), &operator).await.0,
            200,
            "{path}"
        );
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_rules_ask_only_for_what_the_components_export() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base");
    let rules: Vec<Value> = render(&root)
        .into_iter()
        .filter(|d| d["kind"] == "PrometheusRule")
        .flat_map(|d| d["spec"]["groups"].as_array().cloned().unwrap_or_default())
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(rules.len() >= 8, "{rules:?}");
    let mut queried = BTreeSet::new();
    for rule in &rules {
        let name = rule["alert"].as_str().expect("an alert name");
        assert!(
            ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: a severity"
        );
        for annotation in ["summary", "runbook"] {
            assert!(
                rule["annotations"][annotation]
                    .as_str()
                    .is_some_and(|t| t.len() > 20),
                "{name}: a {annotation} that says something"
            );
        }
        queried.extend(metric_names(rule["expr"].as_str().expect("an expression")));
    }
    promql_parses(rules.iter().filter_map(|r| r["expr"].as_str()));

    let (pipeline, exported) =
        components_after_work(meterflow_sink::limits::Limits::default()).await;
    assert_exported(&queried, &exported, "alerted on");
    pipeline.stop().await;
}

/// The metrics the sink, the processor and the agent export after some work: the pipeline
/// scenario, a GPU of a class the price book does not know, and one message that is no batch
/// (a dead letter), through the in-process processor and sink, and one answered API request;
/// the agent's registry after one simulated node's collector has read its sources once. The
/// sink answers within `limits`.
pub(crate) async fn components_after_work(
    limits: meterflow_sink::limits::Limits,
) -> (Pipeline, String) {
    // A simulated node's collector (the agent's own NodeCollector over the node's sources),
    // collecting once: its sources' gauges and counters.
    meterflow_ingest::Fleet::new(
        meterflow_ingest::FleetConfig {
            nodes: 1,
            ..meterflow_ingest::FleetConfig::default()
        },
        0,
    )
    .tick(15_000);
    let pipeline = Pipeline::start_limited(1, 1, limits).await;
    let brokers = pipeline.broker.bootstrap();
    let publisher = meterflow_ingest::Publisher::new(&brokers).expect("producer");
    let mut batches = crate::pipeline::batches();
    let mut unpriced = batches[0].clone();
    unpriced.agent_id = "agent-node-x".into();
    unpriced.node = "node-x".into();
    unpriced.samples.truncate(1);
    unpriced.samples[0].series.node = "node-x".into();
    unpriced.samples[0].series.gpu_class = "unpriced-class".into();
    batches.push(unpriced);
    for b in batches {
        publisher.publish(&b).await.expect("published");
    }
    let raw: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    raw.send(
        rdkafka::producer::FutureRecord::to(meterflow_schemas::topics::SAMPLES)
            .key("node-a")
            .payload(&b"not avro"[..]),
        std::time::Duration::from_secs(10),
    )
    .await
    .expect("delivered");
    crate::common::poll_json(
        &pipeline.url("/v1/status"),
        &token(""),
        std::time::Duration::from_secs(60),
        |v| v["watermark"] == "2026-11-23T00:03:00.000Z",
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let exported = loop {
        let exported = format!(
            "{}{}{}",
            get_text(&pipeline.url("/metrics")).await,
            meterflow_processor::metrics::render(),
            meterflow_ingest::metrics::render()
        );
        if (exported.contains("meterflow_processor_dead_letters_total{")
            && exported.contains("meterflow_processor_unpriced_gpu_class{"))
            || std::time::Instant::now() > deadline
        {
            break exported;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    (pipeline, exported)
}

/// Prometheus's own parser (`promtool check rules`) accepts every expression.
fn promql_parses<'a>(exprs: impl Iterator<Item = &'a str>) {
    let rules: Vec<Value> = exprs
        .enumerate()
        .map(|(i, e)| serde_json::json!({ "record": format!("check:expr_{i}"), "expr": e }))
        .collect();
    assert!(!rules.is_empty());
    let file = tempfile::Builder::new()
        .suffix(".json")
        .tempfile()
        .expect("a rules file");
    // JSON is YAML: promtool reads it as a rules file.
    std::fs::write(
        file.path(),
        serde_json::json!({ "groups": [{ "name": "check", "rules": rules }] }).to_string(),
    )
    .expect("written");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(file.path())
        .output()
        .expect("promtool runs (Debian's prometheus package; `make test` installs it)");
    assert!(
        out.status.success(),
        "PromQL Prometheus refuses: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every metric `queried` has a sample in the exposition text `exported`; `what` says how it
/// was used, in the failure.
fn assert_exported(queried: &BTreeSet<String>, exported: &str, what: &str) {
    let missing: Vec<&String> = queried
        .iter()
        .filter(|name| {
            !exported.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{what} but not exported: {missing:?}\n{exported}"
    );
}

/// Secrets the operator creates by hand (deploy/README.md says how); every other reference
/// must name a resource of the kustomization.
const EXTERNAL_SECRETS: [&str; 2] = ["meterflow-sink-jwt", "meterflow-kafka"];

/// Cluster roles a binding may name without defining them: OpenShift makes one per security
/// context constraint.
const BUILT_IN_ROLES: &str = "system:openshift:scc:";

/// YAML documents as JSON; `what` names them in a failure.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let v = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}"));
            serde_json::to_value(v).expect("YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The files of a kustomization folder other than `kustomization.yaml`: each must be used.
fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("a kustomization folder")
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_type().ok()?.is_file().then_some(())?;
            e.file_name().into_string().ok()
        })
        .filter(|f| f != "kustomization.yaml")
        .collect()
}

/// Renders a kustomization with the real kustomize, as `kubectl apply -k` does, after checking
/// that it uses every file of its folder (a file left out is a change that never ships).
fn render(dir: &Path) -> Vec<Value> {
    let file = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&file).expect("kustomization.yaml");
    let kustomization = yaml_docs(&text, &file.display().to_string()).remove(0);
    let mut used: BTreeSet<String> = strings(&kustomization["resources"])
        .into_iter()
        .filter(|r| dir.join(r).is_file())
        .collect();
    for generator in kustomization["configMapGenerator"]
        .as_array()
        .into_iter()
        .flatten()
    {
        used.extend(strings(&generator["files"]));
    }
    for patch in kustomization["patches"].as_array().into_iter().flatten() {
        used.extend(patch["path"].as_str().map(str::to_string));
    }
    let unused: Vec<String> = files_in(dir).difference(&used).cloned().collect();
    assert!(
        unused.is_empty(),
        "{}: files not used: {unused:?}",
        dir.display()
    );
    // A kustomize of its own where there is one, else kubectl's (scripts/setup.sh makes sure
    // one of them is v4 or later).
    let out = match std::process::Command::new("kustomize")
        .arg("build")
        .arg(dir)
        .output()
    {
        Ok(out) => out,
        Err(_) => std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .expect("kustomize or kubectl runs (scripts/setup.sh installs one)"),
    };
    assert!(
        out.status.success(),
        "kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(
        &String::from_utf8(out.stdout).expect("UTF-8"),
        &dir.display().to_string(),
    )
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

/// Whether every pair of `selector` is in `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_kubernetes_manifests_hold_together() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let rendered = render(&root.join("base"));
    // The base has the topics; an overlay may leave them to the cluster.
    assert_eq!(
        rendered
            .iter()
            .filter(|d| d["kind"] == "KafkaTopic")
            .count(),
        meterflow_schemas::topics::ALL.len()
    );
    check(&rendered);
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(root.join("overlays"))
        .expect("overlays")
        .map(|e| e.expect("entry").path())
        .collect();
    overlays.sort();
    assert!(overlays.len() >= 2, "{overlays:?}");
    for overlay in overlays {
        eprintln!("checking {}", overlay.display());
        let docs = render(&overlay);
        check(&docs);
    }
}

/// What every rendering must hold.
fn check(docs: &[Value]) {
    let docs = docs.to_vec();
    let workloads: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("Deployment" | "StatefulSet" | "DaemonSet")
            )
        })
        .collect();
    assert_eq!(workloads.len(), 3, "agent, processor, sink");
    let mut brokers = BTreeSet::new();

    for d in &docs {
        let name = d["metadata"]["name"]
            .as_str()
            .expect("every resource has a name");
        assert!(
            name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !name.starts_with('-')
                && !name.ends_with('-'),
            "{name}: a DNS label of at most 63 characters"
        );
    }

    for w in &workloads {
        let name = w["metadata"]["name"].as_str().expect("name");
        let pod = &w["spec"]["template"];
        assert!(
            selects(
                &w["spec"]["selector"]["matchLabels"],
                &pod["metadata"]["labels"]
            ),
            "{name}: its selector matches its pods"
        );
        // All but the node agent (host PID, network and paths: docs/presets.md) run as
        // restricted pods: not root, no privilege escalation, no capability, a read-only root
        // file system; and a disruption budget keeps drains from taking them all at once.
        // The image is this version's, the one the Dockerfile says how to build.
        let image = format!("ghcr.io/meterflow/meterflow:{}", env!("CARGO_PKG_VERSION"));
        for c in pod["spec"]["containers"].as_array().expect("containers") {
            assert_eq!(c["image"], image.as_str(), "{name}");
        }
        assert!(
            include_str!("../../Dockerfile").contains(&format!("docker build -t {image} .")),
            "the Dockerfile says how to build {image}"
        );
        if w["kind"] != "DaemonSet" {
            let security = &pod["spec"]["securityContext"];
            assert_eq!(security["runAsNonRoot"], true, "{name}: not root");
            assert_eq!(
                security["seccompProfile"]["type"], "RuntimeDefault",
                "{name}: seccomp"
            );
            for c in pod["spec"]["containers"].as_array().expect("containers") {
                let security = &c["securityContext"];
                assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
                assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
                assert_eq!(
                    security["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{name}"
                );
            }
            assert!(
                docs.iter().any(|b| b["kind"] == "PodDisruptionBudget"
                    && selects(
                        &b["spec"]["selector"]["matchLabels"],
                        &pod["metadata"]["labels"]
                    )),
                "{name}: a PodDisruptionBudget selects its pods"
            );
        }
        if let Some(account) = pod["spec"]["serviceAccountName"].as_str() {
            assert!(
                find(&docs, "ServiceAccount", account).is_some(),
                "{name}: {account}"
            );
        }
        let volumes = pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut volume_names: Vec<String> = volumes
            .iter()
            .map(|v| v["name"].as_str().expect("volume name").to_string())
            .collect();
        volume_names.extend(
            w["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| t["metadata"]["name"].as_str().expect("claim").to_string()),
        );
        for v in &volumes {
            if let Some(map) = v["configMap"]["name"].as_str() {
                assert!(
                    find(&docs, "ConfigMap", map).is_some(),
                    "{name}: ConfigMap {map}"
                );
            }
            if let Some(secret) = v["secret"]["secretName"].as_str() {
                assert!(
                    EXTERNAL_SECRETS.contains(&secret),
                    "{name}: Secret {secret}"
                );
            }
        }
        for c in pod["spec"]["containers"].as_array().expect("containers") {
            let requests = &c["resources"]["requests"];
            assert!(
                requests["cpu"].is_string() && requests["memory"].is_string(),
                "{name}: CPU and memory requests"
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{name}: a memory limit"
            );
            let ports: Vec<(String, u64)> = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or_default().to_string(),
                        p["containerPort"].as_u64().expect("port"),
                    )
                })
                .collect();
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let http = &c[probe]["httpGet"];
                if probe == "livenessProbe" {
                    assert!(http.is_object(), "{name}: a liveness probe");
                }
                if http.is_object() {
                    assert_eq!(http["path"], path, "{name}: {probe}");
                    let port = &http["port"];
                    assert!(
                        ports
                            .iter()
                            .any(|(n, p)| port == n.as_str() || port.as_u64() == Some(*p)),
                        "{name}: {probe} port {port} is a container port"
                    );
                }
            }
            let env: Vec<String> = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["name"].as_str().expect("env name").to_string())
                .collect();
            for e in c["env"].as_array().into_iter().flatten() {
                if e["name"] == "KAFKA_BROKERS" {
                    brokers.insert(e["value"].as_str().expect("brokers").to_string());
                }
                if let Some(secret) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    assert!(
                        EXTERNAL_SECRETS.contains(&secret),
                        "{name}: Secret {secret} in {}",
                        e["name"]
                    );
                }
            }
            let names: BTreeSet<&str> = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["name"].as_str())
                .collect();
            assert_eq!(
                names.len(),
                c["env"].as_array().map_or(0, Vec::len),
                "{name}: a variable set twice"
            );
            // The binary reads MF_LOG; a RUST_LOG there would change nothing.
            assert!(
                !names.contains("RUST_LOG"),
                "{name}: RUST_LOG is not read; Meterflow's filter is MF_LOG"
            );
            let mounts: Vec<(String, String)> = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let volume = m["name"].as_str().expect("mount name").to_string();
                    assert!(volume_names.contains(&volume), "{name}: volume {volume}");
                    (volume, m["mountPath"].as_str().expect("path").to_string())
                })
                .collect();
            // The arguments: flags the binary knows, variables the container defines, files
            // its ConfigMaps hold.
            let args = strings(&c["args"]);
            let sub = args.first().expect("a subcommand");
            let help = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
                .args([sub.as_str(), "--help"])
                .output()
                .expect("meterflow --help");
            let help = String::from_utf8_lossy(&help.stdout);
            for a in &args {
                if a.starts_with("--") {
                    assert!(
                        help.contains(&format!("{a} "))
                            || help.contains(&format!("{a}\n"))
                            || help.contains(&format!("{a} <")),
                        "{name}: `meterflow {sub}` has no flag {a}"
                    );
                }
                if let Some(var) = a.strip_prefix("$(").and_then(|v| v.strip_suffix(')')) {
                    assert!(
                        env.iter().any(|e| e == var),
                        "{name}: $({var}) is not defined"
                    );
                }
                for (volume, path) in &mounts {
                    let Some(file) = a
                        .strip_prefix(path.as_str())
                        .and_then(|f| f.strip_prefix('/'))
                    else {
                        continue;
                    };
                    let source = volumes.iter().find(|v| v["name"] == volume.as_str());
                    if let Some(map) = source.and_then(|v| v["configMap"]["name"].as_str()) {
                        let map = find(&docs, "ConfigMap", map).expect("checked above");
                        assert!(
                            map["data"][file].is_string(),
                            "{name}: {a} is not in ConfigMap {}",
                            map["metadata"]["name"]
                        );
                    }
                }
            }
        }
    }

    // The processor: one pod per timely process, each in the host file.
    let processor = find(&docs, "StatefulSet", "meterflow-processor").expect("processor");
    let replicas = processor["spec"]["replicas"].as_u64().expect("replicas");
    let service = processor["spec"]["serviceName"]
        .as_str()
        .expect("serviceName");
    assert_eq!(
        find(&docs, "Service", service).expect("its Service")["spec"]["clusterIP"],
        "None",
        "a headless Service names the pods"
    );
    let args = strings(&processor["spec"]["template"]["spec"]["containers"][0]["args"]);
    let after = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    assert_eq!(after("--processes"), Some(replicas.to_string()));
    let hosts = find(&docs, "ConfigMap", "meterflow-processor-hosts").expect("host file");
    let lines: Vec<&str> = hosts["data"]["hosts"]
        .as_str()
        .expect("hosts")
        .lines()
        .collect();
    assert_eq!(lines.len() as u64, replicas, "one host per process");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(*line, format!("meterflow-processor-{i}.{service}:2101"));
    }

    // Services select pods and name their ports; monitors select Services and pods.
    for s in docs.iter().filter(|d| d["kind"] == "Service") {
        let name = s["metadata"]["name"].as_str().expect("name");
        let pods = workloads
            .iter()
            .find(|w| {
                selects(
                    &s["spec"]["selector"],
                    &w["spec"]["template"]["metadata"]["labels"],
                )
            })
            .unwrap_or_else(|| panic!("Service {name} selects no pods"));
        let container_ports: Vec<Value> = pods["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .collect();
        for p in s["spec"]["ports"].as_array().expect("ports") {
            let target = if p["targetPort"].is_null() {
                &p["port"]
            } else {
                &p["targetPort"]
            };
            assert!(
                container_ports
                    .iter()
                    .any(|c| &c["name"] == target || &c["containerPort"] == target),
                "Service {name}: port {target} is no container port"
            );
        }
    }
    for m in docs.iter().filter(|d| d["kind"] == "ServiceMonitor") {
        let name = m["metadata"]["name"].as_str().expect("name");
        let service = docs
            .iter()
            .filter(|d| d["kind"] == "Service")
            .find(|s| {
                selects(
                    &m["spec"]["selector"]["matchLabels"],
                    &s["metadata"]["labels"],
                )
            })
            .unwrap_or_else(|| panic!("ServiceMonitor {name} selects no Service"));
        for e in m["spec"]["endpoints"].as_array().expect("endpoints") {
            assert!(
                service["spec"]["ports"]
                    .as_array()
                    .expect("ports")
                    .iter()
                    .any(|p| p["name"] == e["port"]),
                "ServiceMonitor {name}: port {} is not the Service's",
                e["port"]
            );
        }
    }
    for m in docs.iter().filter(|d| d["kind"] == "PodMonitor") {
        let name = m["metadata"]["name"].as_str().expect("name");
        assert!(
            workloads.iter().any(|w| selects(
                &m["spec"]["selector"]["matchLabels"],
                &w["spec"]["template"]["metadata"]["labels"]
            )),
            "PodMonitor {name} selects no pods"
        );
    }
    for h in docs
        .iter()
        .filter(|d| d["kind"] == "HorizontalPodAutoscaler")
    {
        let target = &h["spec"]["scaleTargetRef"];
        let t = find(
            &docs,
            target["kind"].as_str().expect("kind"),
            target["name"].as_str().expect("name"),
        );
        assert!(t.is_some(), "the autoscaler's target exists");
    }
    for b in docs.iter().filter(|d| {
        matches!(
            d["kind"].as_str(),
            Some("ClusterRoleBinding" | "RoleBinding")
        )
    }) {
        let role = b["roleRef"]["name"].as_str().expect("role");
        assert!(
            find(&docs, b["roleRef"]["kind"].as_str().expect("kind"), role).is_some()
                || role.starts_with(BUILT_IN_ROLES),
            "role {role}"
        );
        for s in b["subjects"].as_array().expect("subjects") {
            assert!(
                find(
                    &docs,
                    "ServiceAccount",
                    s["name"].as_str().expect("subject")
                )
                .is_some()
            );
        }
    }

    check_network_policies(&docs, &workloads);

    // The topics, where they are here, are exactly the pipeline's, on one Strimzi cluster,
    // usage compacted.
    let topics: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "KafkaTopic").collect();
    if topics.is_empty() {
        return check_brokers(&docs, brokers);
    }
    let names: BTreeSet<&str> = topics
        .iter()
        .map(|t| t["spec"]["topicName"].as_str().expect("topicName"))
        .collect();
    assert_eq!(
        names,
        meterflow_schemas::topics::ALL
            .into_iter()
            .collect::<BTreeSet<_>>()
    );
    let clusters: BTreeSet<String> = topics
        .iter()
        .map(|t| t["metadata"]["labels"]["strimzi.io/cluster"].to_string())
        .collect();
    assert_eq!(clusters.len(), 1);
    for t in &topics {
        assert_eq!(
            t["apiVersion"], "kafka.strimzi.io/v1",
            "Strimzi's v1 API (0.49 on)"
        );
    }
    let usage = topics
        .iter()
        .find(|t| t["spec"]["topicName"] == meterflow_schemas::topics::USAGE)
        .expect("usage");
    assert_eq!(usage["spec"]["config"]["cleanup.policy"], "compact");
    check_brokers(&docs, brokers);
}

/// Every pod not on the host's network is isolated for ingress by a NetworkPolicy that lets
/// in exactly what its Services, monitors and probes reach (each port a policy names is one of
/// its pods'), and the timely cluster's port only from the processor's own pods.
fn check_network_policies(docs: &[Value], workloads: &[&Value]) {
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    for w in workloads {
        let name = w["metadata"]["name"].as_str().expect("name");
        let pod = &w["spec"]["template"];
        if pod["spec"]["hostNetwork"] == true {
            continue;
        }
        let labels = &pod["metadata"]["labels"];
        let mine: Vec<&&Value> = policies
            .iter()
            .filter(|p| selects(&p["spec"]["podSelector"]["matchLabels"], labels))
            .collect();
        assert!(
            !mine.is_empty(),
            "{name}: no NetworkPolicy selects its pods"
        );
        let ports: Vec<(Value, Value)> = pod["spec"]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .map(|p| (p["name"].clone(), p["containerPort"].clone()))
            .collect();
        let rules: Vec<&Value> = mine
            .iter()
            .flat_map(|p| p["spec"]["ingress"].as_array().into_iter().flatten())
            .collect();
        // Which rules let a given container port in.
        let admitting = |port: &(Value, Value)| -> Vec<&Value> {
            rules
                .iter()
                .copied()
                .filter(|r| {
                    r["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["port"] == port.0 || p["port"] == port.1)
                })
                .collect()
        };
        for p in mine.iter().flat_map(|p| {
            p["spec"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
        }) {
            assert!(
                ports
                    .iter()
                    .any(|(n, c)| p["port"] == *n || p["port"] == *c),
                "{name}: a NetworkPolicy lets in port {}, which none of its containers has",
                p["port"]
            );
        }
        for port in &ports {
            let rules = admitting(port);
            assert!(
                !rules.is_empty(),
                "{name}: no NetworkPolicy lets in port {}, which its Service, monitor or probe uses",
                port.0
            );
            if port.0 == "timely" {
                for r in rules {
                    for from in r["from"].as_array().expect("from") {
                        assert!(
                            from["namespaceSelector"].is_null()
                                && from["ipBlock"].is_null()
                                && selects(&from["podSelector"]["matchLabels"], labels),
                            "{name}: the timely port is open to more than the processor's pods"
                        );
                    }
                }
            }
        }
    }
}

/// Every component reaches the same Kafka, and the Secrets made by hand are documented.
fn check_brokers(docs: &[Value], mut brokers: BTreeSet<String>) {
    // Every component reaches the same Kafka.
    // The generated ConfigMap's name ends in a hash of its content.
    let text = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("meterflow-agent-"))
        })
        .expect("agent config")["data"]["agent.toml"]
        .as_str()
        .expect("agent.toml");
    let agent = meterflow_ingest::AgentConfig::parse_table(text)
        .expect("agent.toml parses")
        .expect("agent.toml has an [agent] table");
    agent.check().expect("a valid agent config");
    brokers.insert(agent.brokers.expect("agent.toml names the brokers"));
    assert_eq!(brokers.len(), 1, "one Kafka for all: {brokers:?}");
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/README.md"),
    )
    .expect("deploy/README.md");
    for secret in EXTERNAL_SECRETS {
        assert!(
            readme.contains(secret),
            "deploy/README.md says how to make {secret}"
        );
    }
}
