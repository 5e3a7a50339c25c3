//! What `deploy/` ships is checked against the running parts: every metric a Grafana panel
//! queries is one a running sink exports, and every API a panel reads is a route it serves.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::common::{Pipeline, get_as, get_text, token};

const OPERATOR_DASHBOARD: &str = include_str!("../../deploy/grafana/meterflow-operator.json");

/// The `meterflow_*` metric names a PromQL expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("meterflow_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_dashboard_queries_only_what_the_sink_exports() {
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
    // Every datasource a panel names is one of the dashboard's inputs.
    let inputs: BTreeSet<String> = dashboard["__inputs"]
        .as_array()
        .expect("__inputs")
        .iter()
        .filter_map(|i| Some(format!("${{{}}}", i["name"].as_str()?)))
        .collect();
    let targets: Vec<&Value> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .collect();
    for t in panels.iter().chain(targets.iter().copied()) {
        let uid = t["datasource"]["uid"].as_str().expect("a datasource uid");
        assert!(inputs.contains(uid), "unknown datasource {uid}");
    }

    let pipeline = Pipeline::start(1, 1).await;
    // One answered request, so the per-route request counter exists too.
    let operator = token("");
    assert_eq!(get_as(&pipeline.url("/v1/status"), &operator).await.0, 200);
    let exported = get_text(&pipeline.url("/metrics")).await;
    let is_exported = |name: &str| {
        exported.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
    };
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
    let missing: Vec<&String> = queried.iter().filter(|n| !is_exported(n)).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\n{exported}"
    );
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
