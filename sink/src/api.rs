//! The HTTP API (SPEC: HTTP API), served with axum.
//!
//! Routes so far: `GET /v1/tenants/{tenant}/usage`, `GET /v1/tenants/{tenant}/burn-rate`,
//! `GET /v1/fleet/hourly`, `GET /v1/status`,
//! `GET /metrics`,
//! `GET /healthz`, `GET /readyz`, and `GET /` (a landing page listing tenants with data).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use meterflow_schemas::{UsageUpdate, topics};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::metrics::Metrics;
use crate::store::Store;
use crate::time::{format_rfc3339, month_start, next_month_start, parse_time};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub metrics: Metrics,
    /// Clock, so tests can pin "now".
    pub now_ms: fn() -> i64,
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/v1/tenants/{tenant}/usage", get(tenant_usage))
        .route("/v1/tenants/{tenant}/burn-rate", get(burn_rate))
        .route("/v1/fleet/hourly", get(fleet_hourly))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// A JSON error: what was wrong and what to do.
fn error(
    state: &AppState,
    route: &str,
    status: StatusCode,
    message: String,
    hint: &str,
) -> Response {
    count(state, route, status);
    (status, Json(json!({ "error": message, "hint": hint }))).into_response()
}

fn count(state: &AppState, route: &str, status: StatusCode) {
    state
        .metrics
        .requests
        .with_label_values(&[route, status.as_str()])
        .inc();
}

/// Query of `GET /v1/tenants/{tenant}/usage`.
#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    /// Start (inclusive): RFC 3339 or milliseconds since the epoch. Default: start of this month.
    pub from: Option<String>,
    /// End (exclusive). Default: now.
    pub to: Option<String>,
    /// Bucket: minute, hour, day, month or total. Default: hour.
    pub window: Option<String>,
    /// Comma-separated: lease, service, gpu_class, mig_profile; `none` for one row per bucket.
    /// Default: lease.
    pub group_by: Option<String>,
}

const GROUPS: [&str; 4] = ["lease", "service", "gpu_class", "mig_profile"];
/// Records per tenant and calendar month: spend as billed, and the budget it is judged by.
const PERIOD_METRICS: [&str; 2] = ["period_cost", "budget"];
const MAX_TENANT_LEN: usize = 256;

#[derive(Default)]
struct Sums {
    /// metric → (amount, scale)
    metrics: BTreeMap<String, (i128, i32)>,
    /// (gpu_class, mig_profile) → GPU milliseconds
    gpu_ms: BTreeMap<(String, String), i128>,
    /// metric → (observed ms, present ms), summed over windows and series
    seen_ms: BTreeMap<String, (i128, i128)>,
}

impl Sums {
    fn add(&mut self, u: &UsageUpdate) {
        let e = self.metrics.entry(u.metric.clone()).or_insert((0, u.scale));
        e.0 += i128::from(u.amount);
        let seen = self.seen_ms.entry(u.metric.clone()).or_default();
        seen.0 += i128::from(u.coverage_ms);
        seen.1 += i128::from(u.present_ms);
        if u.metric == "gpu_seconds" {
            *self
                .gpu_ms
                .entry((u.gpu_class.clone(), u.mig_profile.clone()))
                .or_default() += i128::from(u.amount);
        }
    }

    fn write(&self, out: &mut Map<String, Value>) {
        for metric in ["gpu_seconds", "cpu_core_seconds"] {
            out.insert(metric.into(), json!(0.0));
        }
        for (metric, (amount, scale)) in &self.metrics {
            out.insert(metric.clone(), json!(*amount as f64 / 10f64.powi(*scale)));
        }
        let gpu: Vec<Value> = self
            .gpu_ms
            .iter()
            .map(|((class, mig), ms)| json!({"gpu_class": class, "mig_profile": mig, "gpu_seconds": *ms as f64 / 1000.0}))
            .collect();
        out.insert("gpu".into(), Value::Array(gpu));
        // Observed over present time: 1 for exact aggregates, below 1 where a gauge had gaps.
        let coverage: Map<String, Value> = self
            .seen_ms
            .iter()
            .filter(|(_, (_, present))| *present > 0)
            .map(|(metric, (observed, present))| {
                (metric.clone(), json!(*observed as f64 / *present as f64))
            })
            .collect();
        out.insert("coverage".into(), Value::Object(coverage));
    }
}

async fn tenant_usage(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Query(q): Query<UsageQuery>,
) -> Response {
    const ROUTE: &str = "/v1/tenants/{tenant}/usage";
    let bad = |msg: String, hint: &str| error(&state, ROUTE, StatusCode::BAD_REQUEST, msg, hint);
    if tenant.is_empty() || tenant.len() > MAX_TENANT_LEN || tenant.contains('\0') {
        return bad(
            format!("tenant must be 1 to {MAX_TENANT_LEN} bytes without NUL"),
            "use the tenant name exactly as the agent reports it",
        );
    }
    let now = (state.now_ms)();
    let (from, to) = match time_range(&q.from, &q.to, month_start(now), now) {
        Ok(range) => range,
        Err((message, hint)) => return bad(message, hint),
    };
    let window = q.window.as_deref().unwrap_or("hour");
    let bucket: Box<dyn Fn(i64) -> (i64, i64)> = match window {
        "minute" => Box::new(|t| fixed(t, 60_000)),
        "hour" => Box::new(|t| fixed(t, 3_600_000)),
        "day" => Box::new(|t| fixed(t, 86_400_000)),
        "month" => Box::new(|t| (month_start(t), next_month_start(t))),
        "total" => Box::new(move |_| (from, to)),
        other => {
            return bad(
                format!("window={other:?} is not one of minute, hour, day, month, total"),
                "pick one of those",
            );
        }
    };
    let group_by: Vec<&str> = match q.group_by.as_deref().unwrap_or("lease") {
        "" | "none" => Vec::new(),
        list => list.split(',').map(str::trim).collect(),
    };
    if let Some(g) = group_by.iter().find(|g| !GROUPS.contains(g)) {
        return bad(
            format!("group_by={g:?} is not one of {}", GROUPS.join(", ")),
            "or use group_by=none",
        );
    }

    let updates = match state.store.usage(&tenant, from, to) {
        Ok(u) => u,
        Err(e) => {
            return error(
                &state,
                ROUTE,
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
                "see the sink's log",
            );
        }
    };
    let mut rows: BTreeMap<(i64, i64, Vec<String>), Sums> = BTreeMap::new();
    let mut totals = Sums::default();
    // Base windows only: live values (`live.*`) are not usage of a window, roll-ups
    // (`resolution` hour, day, month) repeat what base windows hold, and a month's spend and
    // budget are the burn-rate route's.
    for u in updates.iter().filter(|u| {
        !u.metric.starts_with("live.")
            && u.resolution.is_empty()
            && !PERIOD_METRICS.contains(&u.metric.as_str())
    }) {
        let (start, end) = bucket(u.window_start_ms);
        let key: Vec<String> = group_by
            .iter()
            .map(|g| match *g {
                "lease" => u.lease.clone(),
                "service" => u.service.clone(),
                "gpu_class" => u.gpu_class.clone(),
                _ => u.mig_profile.clone(),
            })
            .collect();
        rows.entry((start, end, key)).or_default().add(u);
        totals.add(u);
    }
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|((start, end, key), sums)| {
            let mut row = Map::new();
            row.insert("window_start".into(), json!(format_rfc3339(start)));
            row.insert("window_end".into(), json!(format_rfc3339(end)));
            for (g, v) in group_by.iter().zip(key) {
                row.insert((*g).into(), json!(v));
            }
            sums.write(&mut row);
            Value::Object(row)
        })
        .collect();
    let mut total = Map::new();
    totals.write(&mut total);
    count(&state, ROUTE, StatusCode::OK);
    Json(json!({
        "tenant": tenant,
        "from": format_rfc3339(from),
        "to": format_rfc3339(to),
        "window": window,
        "group_by": group_by,
        "rows": rows,
        "totals": total,
    }))
    .into_response()
}

/// Query of `GET /v1/tenants/{tenant}/burn-rate`.
#[derive(Debug, Deserialize)]
pub struct BurnRateQuery {
    /// How far back the rate looks from the watermark: `90s`, `5m`, `1h`, or milliseconds.
    /// Default 5m; from 1 minute to 24 hours.
    pub over: Option<String>,
}

/// A duration such as `90s`, `5m`, `1h` or plain milliseconds.
fn parse_duration_ms(s: &str) -> Option<i64> {
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "ms"),
    };
    let n: i64 = number.parse().ok()?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(unit_ms)
}

fn money(micros: i128) -> f64 {
    micros as f64 / 1e6
}

/// Cost per hour now (over the last `over` before the watermark), per lease and service and in
/// total; the month's cost to date, what is billed of it, its projection to the month's end at
/// the current rate, and the budget used.
async fn burn_rate(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Query(q): Query<BurnRateQuery>,
) -> Response {
    const ROUTE: &str = "/v1/tenants/{tenant}/burn-rate";
    const HOUR: f64 = 3_600_000.0;
    let bad = |msg: String, hint: &str| error(&state, ROUTE, StatusCode::BAD_REQUEST, msg, hint);
    if tenant.is_empty() || tenant.len() > MAX_TENANT_LEN || tenant.contains('\0') {
        return bad(
            format!("tenant must be 1 to {MAX_TENANT_LEN} bytes without NUL"),
            "use the tenant name exactly as the agent reports it",
        );
    }
    let over_ms = match q.over.as_deref().map(parse_duration_ms) {
        None => 300_000,
        Some(Some(ms)) if (60_000..=86_400_000).contains(&ms) => ms,
        Some(_) => {
            return bad(
                format!(
                    "over={:?} is not a duration from 1m to 24h",
                    q.over.unwrap_or_default()
                ),
                "write it as 90s, 5m, 1h or milliseconds",
            );
        }
    };
    let internal = |e: crate::store::StoreError| {
        error(
            &state,
            ROUTE,
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            "see the sink's log",
        )
    };
    // "Now" is as far as the data has come, not the wall clock: a stalled pipeline shows an
    // old `as_of`, never a rate of zero.
    let as_of = match state.store.watermark_ms() {
        Ok(w) => w.unwrap_or_else(|| (state.now_ms)()),
        Err(e) => return internal(e),
    };
    let (month, month_end) = (month_start(as_of - 1), next_month_start(as_of - 1));
    let recent = match state.store.usage(&tenant, as_of - over_ms, as_of) {
        Ok(u) => u,
        Err(e) => return internal(e),
    };
    let mut by_lease: BTreeMap<(String, String), i128> = BTreeMap::new();
    for u in recent
        .iter()
        .filter(|u| u.metric == "cost" && u.resolution.is_empty())
    {
        *by_lease
            .entry((u.lease.clone(), u.service.clone()))
            .or_default() += i128::from(u.amount);
    }
    let per_hour = |micros: i128| money(micros) * HOUR / over_ms as f64;
    let total_recent: i128 = by_lease.values().sum();
    let to_date = match state.store.month_cost(&tenant, month) {
        Ok(c) => i128::from(c),
        Err(e) => return internal(e),
    };
    let period = match state.store.usage(&tenant, month, month + 1) {
        Ok(u) => u,
        Err(e) => return internal(e),
    };
    let of_period = |metric: &str| {
        period
            .iter()
            .find(|u| u.metric == metric && u.lease.is_empty())
            .map(|u| i128::from(u.amount))
    };
    let rate = per_hour(total_recent);
    let projection = money(to_date) + rate * (month_end - as_of) as f64 / HOUR;
    let budget = of_period("budget").map(|b| {
        json!({
            "monthly": money(b),
            "used": if b > 0 { money(to_date) / money(b) } else { 0.0 },
            "projected_used": if b > 0 { projection / money(b) } else { 0.0 },
        })
    });
    let leases: Vec<Value> = by_lease
        .iter()
        .map(|((lease, service), micros)| {
            json!({"lease": lease, "service": service, "burn_rate": per_hour(*micros)})
        })
        .collect();
    count(&state, ROUTE, StatusCode::OK);
    Json(json!({
        "tenant": tenant,
        "as_of": format_rfc3339(as_of),
        "over_seconds": over_ms / 1000,
        "burn_rate": rate,
        "leases": leases,
        "period": {
            "start": format_rfc3339(month),
            "end": format_rfc3339(month_end),
            "to_date": money(to_date),
            "billed": of_period("period_cost").map(money).unwrap_or(0.0),
            "projection": projection,
        },
        "budget": budget,
    }))
    .into_response()
}

/// Query of `GET /v1/fleet/hourly`.
#[derive(Debug, Deserialize)]
pub struct RangeQuery {
    /// Start (inclusive): RFC 3339 or milliseconds since the epoch. Default: 24 hours ago.
    pub from: Option<String>,
    /// End (exclusive). Default: now.
    pub to: Option<String>,
}

/// Per hour: active nodes and the sum of the per-node maxima of GPUs allocated, then each node.
async fn fleet_hourly(State(state): State<AppState>, Query(q): Query<RangeQuery>) -> Response {
    const ROUTE: &str = "/v1/fleet/hourly";
    const HOUR: i64 = 3_600_000;
    let now = (state.now_ms)();
    let (from, to) = match time_range(&q.from, &q.to, now - 24 * HOUR, now) {
        Ok(range) => range,
        Err((message, hint)) => {
            return error(&state, ROUTE, StatusCode::BAD_REQUEST, message, hint);
        }
    };
    // Node and fleet records are stored under the empty tenant.
    let updates = match state.store.usage("", from.div_euclid(HOUR) * HOUR, to) {
        Ok(u) => u,
        Err(e) => {
            return error(
                &state,
                ROUTE,
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
                "see the sink's log",
            );
        }
    };
    // hour → (fleet metric → amount, node → metric → amount)
    type Hour = (
        BTreeMap<String, i64>,
        BTreeMap<String, BTreeMap<String, i64>>,
    );
    let mut hours: BTreeMap<i64, Hour> = BTreeMap::new();
    for u in updates {
        let (fleet, nodes) = hours.entry(u.window_start_ms).or_default();
        if u.node.is_empty() {
            fleet.insert(u.metric, u.amount);
        } else {
            nodes.entry(u.node).or_default().insert(u.metric, u.amount);
        }
    }
    let rows: Vec<Value> = hours
        .into_iter()
        .map(|(hour, (fleet, nodes))| {
            let get = |m: &BTreeMap<String, i64>, k: &str| m.get(k).copied().unwrap_or(0);
            let nodes: Vec<Value> = nodes
                .iter()
                .map(|(node, m)| {
                    json!({
                        "node": node,
                        "active": get(m, "node_active") > 0,
                        "max_gpus_allocated": get(m, "max_gpus_allocated"),
                    })
                })
                .collect();
            json!({
                "hour": format_rfc3339(hour),
                "active_nodes": get(&fleet, "active_nodes"),
                "max_gpus_allocated": get(&fleet, "max_gpus_allocated"),
                "nodes": nodes,
            })
        })
        .collect();
    count(&state, ROUTE, StatusCode::OK);
    Json(json!({
        "from": format_rfc3339(from),
        "to": format_rfc3339(to),
        "hours": rows,
    }))
    .into_response()
}

/// The `from` and `to` query parameters (RFC 3339 UTC or milliseconds since the epoch), with
/// their defaults; on error, what is wrong and what to do.
fn time_range(
    from: &Option<String>,
    to: &Option<String>,
    default_from: i64,
    default_to: i64,
) -> Result<(i64, i64), (String, &'static str)> {
    let time = |v: &Option<String>, default: i64, name: &str| match v {
        None => Ok(default),
        Some(s) => parse_time(s).ok_or_else(|| {
            (
                format!("{name}={s:?} is not a time"),
                "give RFC 3339 UTC (2026-11-23T10:00:00Z) or milliseconds since the epoch",
            )
        }),
    };
    let (from, to) = (
        time(from, default_from, "from")?,
        time(to, default_to, "to")?,
    );
    if from >= to {
        return Err((
            format!("from ({from}) must be before to ({to})"),
            "swap them or widen the range",
        ));
    }
    Ok((from, to))
}

fn fixed(t: i64, len: i64) -> (i64, i64) {
    let start = t.div_euclid(len) * len;
    (start, start + len)
}

async fn status(State(state): State<AppState>) -> Response {
    let watermark = state.store.watermark_ms().ok().flatten();
    let offsets = state.store.offsets(topics::USAGE).unwrap_or_default();
    count(&state, "/v1/status", StatusCode::OK);
    Json(json!({
        "service": "meterflow-sink",
        "version": env!("CARGO_PKG_VERSION"),
        "features": ["usage"],
        "watermark": watermark.map(format_rfc3339),
        "watermark_ms": watermark,
        "consumed_offsets": { topics::USAGE: offsets },
    }))
    .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let encoder = prometheus::TextEncoder::new();
    match encoder.encode_to_string(&state.metrics.registry.gather()) {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.metrics.ready.get() == 1 {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not yet consuming meterflow.usage\n",
        )
            .into_response()
    }
}

async fn index(State(state): State<AppState>) -> Response {
    let tenants = state.store.tenants().unwrap_or_default();
    let items: String = tenants
        .iter()
        .map(|t| {
            let t = html_escape(t);
            format!("<li><a href=\"/v1/tenants/{t}/usage?window=total\">{t}</a></li>")
        })
        .collect();
    count(&state, "/", StatusCode::OK);
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Meterflow</title></head><body>\
         <h1>Meterflow</h1><p>Usage this month, per tenant (JSON):</p><ul>{items}</ul>\
         <p><a href=\"/v1/status\">status</a> · <a href=\"/metrics\">metrics</a></p></body></html>"
    ))
    .into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
