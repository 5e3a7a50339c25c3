//! `meterflow lease-metrics`: asks the sink for one lease's series and prints a table.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// What to ask the sink (the flags of `meterflow lease-metrics`).
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseMetricsRequest {
    /// The sink's URL.
    #[arg(long, env = "MF_SINK_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A bearer token (see `meterflow token`).
    #[arg(long, env = "MF_TOKEN")]
    pub token: String,
    /// The lease.
    #[arg(long)]
    pub lease: String,
    /// Start: RFC 3339 UTC or epoch ms (default: an hour before --to).
    #[arg(long)]
    pub from: Option<String>,
    /// End (default: now).
    #[arg(long)]
    pub to: Option<String>,
    /// Step, e.g. 1m or 15m (default: the finest the range allows).
    #[arg(long)]
    pub step: Option<String>,
    /// Comma-separated aggregates (default: all).
    #[arg(long)]
    pub metric: Option<String>,
    /// The tenant, when an operator asks for a lease id several tenants use.
    #[arg(long)]
    pub tenant: Option<String>,
}

/// Fetches the series; on an error answer, fails with the sink's message and hint.
pub async fn fetch_lease_metrics(r: &LeaseMetricsRequest) -> Result<Value> {
    let mut query: Vec<(&str, &str)> = Vec::new();
    for (name, value) in [
        ("start", &r.from),
        ("end", &r.to),
        ("step", &r.step),
        ("metric", &r.metric),
        ("tenant", &r.tenant),
    ] {
        if let Some(v) = value {
            query.push((name, v));
        }
    }
    let base = r.url.trim_end_matches('/');
    let lease: String = url::form_urlencoded::byte_serialize(r.lease.as_bytes()).collect();
    let url = format!("{base}/v1/leases/{lease}/metrics");
    // Bounded: a sink that accepts the connection and never answers is an error, not a hang.
    let answer = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .build()?
        .get(&url)
        .query(&query)
        .bearer_auth(&r.token)
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the sink at {base}, or it did not answer within 30 s (is it running? --url)")
        })?;
    let status = answer.status();
    let body: Value = answer
        .json()
        .await
        .with_context(|| format!("the sink's answer from {url} is not JSON"))?;
    if !status.is_success() {
        bail!(
            "the sink answered {status}: {} ({})",
            body["error"].as_str().unwrap_or("no message"),
            body["hint"].as_str().unwrap_or("no hint")
        );
    }
    Ok(body)
}

/// The series as a table: one row per step, one column per metric.
pub fn table(answer: &Value) -> String {
    let mut columns: Vec<String> = Vec::new();
    let mut rows: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let mut times = BTreeSet::new();
    for series in answer["series"].as_array().into_iter().flatten() {
        let metric = series["metric"].as_str().unwrap_or_default().to_string();
        for p in series["points"].as_array().into_iter().flatten() {
            let t = p["t"].as_str().unwrap_or_default().to_string();
            times.insert(t.clone());
            rows.entry(t)
                .or_default()
                .insert(metric.clone(), p["value"].as_f64().unwrap_or(0.0));
        }
        columns.push(metric);
    }
    let mut out = format!(
        "lease {} (tenant {}), {} to {}, step {} s\n",
        answer["lease"].as_str().unwrap_or_default(),
        answer["tenant"].as_str().unwrap_or_default(),
        answer["start"].as_str().unwrap_or_default(),
        answer["end"].as_str().unwrap_or_default(),
        answer["step_seconds"]
    );
    let widths: Vec<usize> = columns.iter().map(|c| c.len().max(12)).collect();
    out.push_str(&format!("{:<24}", "time"));
    for (c, w) in columns.iter().zip(&widths) {
        out.push_str(&format!("  {c:>w$}"));
    }
    out.push('\n');
    for t in &times {
        out.push_str(&format!("{t:<24}"));
        for (c, w) in columns.iter().zip(&widths) {
            match rows.get(t).and_then(|r| r.get(c)) {
                Some(v) => out.push_str(&format!("  {:>w$}", trim(*v))),
                None => out.push_str(&format!("  {:>w$}", "-")),
            }
        }
        out.push('\n');
    }
    if times.is_empty() {
        out.push_str("(no data in this range)\n");
    }
    out
}

/// A number without trailing zeros (at most 6 decimals).
fn trim(v: f64) -> String {
    let s = format!("{v:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_has_a_row_per_step_and_a_column_per_metric() {
        let answer = serde_json::json!({
            "lease": "100.1.1", "tenant": "acme", "start": "S", "end": "E", "step_seconds": 60,
            "series": [
                {"metric": "gpu_seconds", "points": [
                    {"t": "2026-11-23T00:00:00.000Z", "value": 110.0},
                    {"t": "2026-11-23T00:01:00.000Z", "value": 120.5}]},
                {"metric": "cpu_core_seconds", "points": [
                    {"t": "2026-11-23T00:01:00.000Z", "value": 60.0}]},
            ],
        });
        let t = table(&answer);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "lease 100.1.1 (tenant acme), S to E, step 60 s");
        assert!(
            lines[1].starts_with("time") && lines[1].contains("gpu_seconds"),
            "{t}"
        );
        assert!(
            lines[2].contains("110") && lines[2].trim_end().ends_with('-'),
            "{t}"
        );
        assert!(
            lines[3].contains("120.5") && lines[3].trim_end().ends_with("60"),
            "{t}"
        );
    }
}
