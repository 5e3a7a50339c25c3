//! `meterflow lease-metrics`: asks the sink for one lease's series and prints a table: by
//! Meterflow lease id (`--lease`, `/v1/leases/{lease}/metrics`, its aggregates) or by Akash
//! lease numbers (`--dseq`, AEP-43's `/lease/{dseq}/{gseq}/{oseq}/metrics`, its catalog
//! metrics).

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
    /// The lease, as Meterflow names it (`dseq.gseq.oseq` for Akash, a workload elsewhere).
    #[arg(long, required_unless_present = "dseq")]
    pub lease: Option<String>,
    /// An Akash lease's deployment sequence: asks AEP-43's route for its catalog metrics
    /// (with --gseq and --oseq).
    #[arg(long, conflicts_with = "lease")]
    pub dseq: Option<u64>,
    /// The lease's group sequence (with --dseq).
    #[arg(long, default_value_t = 1)]
    pub gseq: u64,
    /// The lease's order sequence (with --dseq).
    #[arg(long, default_value_t = 1)]
    pub oseq: u64,
    /// The provider that should host the lease (with --dseq): an answer from another is an
    /// error.
    #[arg(long, requires = "dseq")]
    pub provider: Option<String>,
    /// Start: RFC 3339 (Unix seconds with --dseq, epoch ms without; default: an hour before
    /// --to).
    #[arg(long)]
    pub from: Option<String>,
    /// End (default: now).
    #[arg(long)]
    pub to: Option<String>,
    /// The last this long, up to now (`24h`, `7d`), instead of --from and --to.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub since: Option<String>,
    /// Step, e.g. 1m or 15m (default: the finest the range allows).
    #[arg(long)]
    pub step: Option<String>,
    /// Comma-separated aggregates (default: all); with --dseq, catalog names or the short
    /// `cpu`, `mem`, `net`, `gpu`.
    #[arg(long)]
    pub metric: Option<String>,
    /// The tenant (the lease owner with --dseq), when an operator asks for a lease id several
    /// tenants use.
    #[arg(long)]
    pub tenant: Option<String>,
}

/// The catalog metrics the short names of `--metric` stand for (with --dseq).
const ALIASES: [(&str, &[&str]); 4] = [
    ("cpu", &["akash_lease_cpu_usage_cores"]),
    ("mem", &["akash_lease_memory_working_set_bytes"]),
    (
        "net",
        &[
            "akash_lease_network_rx_bytes_total",
            "akash_lease_network_tx_bytes_total",
        ],
    ),
    (
        "gpu",
        &[
            "akash_lease_gpu_utilization_percent",
            "akash_lease_gpu_memory_used_bytes",
            "akash_lease_gpu_power_watts",
        ],
    ),
];

/// `--metric` for AEP-43's route: short names expanded, `all` when not given.
fn catalog_names(metric: Option<&str>) -> String {
    let Some(metric) = metric else {
        return "all".into();
    };
    metric
        .split(',')
        .map(str::trim)
        .flat_map(|m| match ALIASES.iter().find(|(short, _)| *short == m) {
            Some((_, names)) => names.to_vec(),
            None => vec![m],
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `--since` as Unix seconds from now back.
fn since_seconds(since: &str, now_s: i64) -> Result<(i64, i64)> {
    let seconds = humantime::parse_duration(since)
        .ok()
        .map(|d| d.as_secs() as i64)
        .filter(|s| *s > 0)
        .with_context(|| format!("--since {since:?} is not a duration: write 1h, 24h or 7d"))?;
    Ok((now_s - seconds, now_s))
}

/// Fetches the series; on an error answer, fails with the sink's message and hint.
pub async fn fetch_lease_metrics(r: &LeaseMetricsRequest) -> Result<Value> {
    let base = r.url.trim_end_matches('/');
    let mut query: Vec<(&str, String)> = Vec::new();
    let url = match (r.dseq, &r.lease) {
        (Some(dseq), _) => {
            let now_s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let (from, to) = match (&r.since, &r.from, &r.to) {
                (Some(since), _, _) => {
                    let (from, to) = since_seconds(since, now_s)?;
                    (from.to_string(), to.to_string())
                }
                (None, from, to) => (
                    from.clone().unwrap_or_else(|| (now_s - 3_600).to_string()),
                    to.clone().unwrap_or_else(|| now_s.to_string()),
                ),
            };
            query.extend([
                ("metric", catalog_names(r.metric.as_deref())),
                ("start", from),
                ("end", to),
                ("aggregation", "sum".into()),
            ]);
            query.extend(r.step.clone().map(|s| ("step", s)));
            query.extend(r.tenant.clone().map(|t| ("owner", t)));
            format!("{base}/lease/{dseq}/{}/{}/metrics", r.gseq, r.oseq)
        }
        (None, lease) => {
            let lease = lease.as_deref().unwrap_or_default();
            let since = match &r.since {
                Some(since) => {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    let (from, _) = since_seconds(since, now_ms / 1_000)?;
                    Some((from * 1_000).to_string())
                }
                None => None,
            };
            for (name, value) in [
                ("start", since.as_ref().or(r.from.as_ref())),
                ("end", r.to.as_ref()),
                ("step", r.step.as_ref()),
                ("metric", r.metric.as_ref()),
                ("tenant", r.tenant.as_ref()),
            ] {
                if let Some(v) = value {
                    query.push((name, v.clone()));
                }
            }
            let lease: String = url::form_urlencoded::byte_serialize(lease.as_bytes()).collect();
            format!("{base}/v1/leases/{lease}/metrics")
        }
    };
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
    if let (Some(want), Some(got)) = (&r.provider, body["lease"]["provider"].as_str())
        && want != got
    {
        bail!(
            "the sink at {base} serves provider {got:?}, not {want:?}: point --url at that provider's sink"
        );
    }
    Ok(body)
}

/// An AEP-43 answer as a table: one row per step, one column per series (metric and service),
/// and its warnings after it.
pub fn aep_table(answer: &Value) -> String {
    let lease = &answer["lease"];
    let field = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let mut columns = Vec::new();
    let mut rows: BTreeMap<i64, BTreeMap<usize, f64>> = BTreeMap::new();
    for series in answer["series"].as_array().into_iter().flatten() {
        let column = columns.len();
        let metric = field(&series["metric"]);
        let short = metric.strip_prefix("akash_lease_").unwrap_or(&metric);
        columns.push(format!(
            "{short}{{{}}}",
            field(&series["labels"]["service"])
        ));
        for p in series["samples"].as_array().into_iter().flatten() {
            if let (Some(t), Some(v)) = (p["t"].as_i64(), p["v"].as_f64()) {
                rows.entry(t).or_default().insert(column, v);
            }
        }
    }
    let mut out = format!(
        "lease {}/{}/{}/{} on {}, {} to {}, step {}\n",
        field(&lease["owner"]),
        field(&lease["dseq"]),
        field(&lease["gseq"]),
        field(&lease["oseq"]),
        field(&lease["provider"]),
        field(&answer["range"]["start"]),
        field(&answer["range"]["end"]),
        field(&answer["range"]["step"]),
    );
    let widths: Vec<usize> = columns.iter().map(|c| c.len().max(12)).collect();
    out.push_str(&format!("{:<24}", "time"));
    for (c, w) in columns.iter().zip(&widths) {
        out.push_str(&format!("  {c:>w$}"));
    }
    out.push('\n');
    for (t, values) in &rows {
        out.push_str(&format!(
            "{:<24}",
            meterflow_schemas::time::format_rfc3339(t * 1_000)
        ));
        for (column, w) in widths.iter().enumerate() {
            match values.get(&column) {
                Some(v) => out.push_str(&format!("  {:>w$}", trim(*v))),
                None => out.push_str(&format!("  {:>w$}", "-")),
            }
        }
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no data in this range)\n");
    }
    for w in answer["warnings"].as_array().into_iter().flatten() {
        out.push_str(&format!("warning: {}\n", w.as_str().unwrap_or_default()));
    }
    out
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
    fn short_metric_names_stand_for_catalog_names() {
        assert_eq!(catalog_names(None), "all");
        assert_eq!(
            catalog_names(Some("cpu, mem")),
            "akash_lease_cpu_usage_cores,akash_lease_memory_working_set_bytes"
        );
        assert_eq!(
            catalog_names(Some("akash_lease_gpu_power_watts,net")),
            "akash_lease_gpu_power_watts,akash_lease_network_rx_bytes_total,akash_lease_network_tx_bytes_total"
        );
        assert_eq!(since_seconds("24h", 100_000).ok(), Some((13_600, 100_000)));
        assert!(since_seconds("yesterday", 0).is_err());
        assert!(since_seconds("0s", 0).is_err());
    }

    #[test]
    fn an_aep_table_has_a_column_per_series_and_its_warnings_after() {
        let answer = serde_json::json!({
            "lease": {"owner": "acme", "dseq": "100", "gseq": "1", "oseq": "1", "provider": "p"},
            "range": {"start": "S", "end": "E", "step": "60s"},
            "series": [
                {"metric": "akash_lease_cpu_usage_cores", "labels": {"service": "web"},
                 "samples": [{"t": 1795392000, "v": 0.5}, {"t": 1795392060, "v": 1.25}]},
                {"metric": "akash_lease_cpu_usage_cores", "labels": {"service": "db"},
                 "samples": [{"t": 1795392060, "v": 2.0}]},
            ],
            "warnings": ["downsampled"],
        });
        let t = aep_table(&answer);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "lease acme/100/1/1 on p, S to E, step 60s");
        assert!(
            lines[1].contains("cpu_usage_cores{web}") && lines[1].contains("cpu_usage_cores{db}"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("2026-11-23T00:00:00.000Z")
                && lines[2].contains("0.5")
                && lines[2].trim_end().ends_with('-'),
            "{t}"
        );
        assert!(
            lines[3].contains("1.25") && lines[3].trim_end().ends_with('2'),
            "{t}"
        );
        assert_eq!(lines[4], "warning: downsampled");
    }

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
