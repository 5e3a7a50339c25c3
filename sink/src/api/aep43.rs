//! AEP-43's lease metrics route, `GET /lease/{dseq}/{gseq}/{oseq}/metrics`: a lease's
//! catalog metrics (`akash_lease_*`) as time series, derived from the aggregates the
//! processor keeps (its base windows), in the AEP's JSON shape or as Prometheus `query_range`
//! JSON.
//!
//! What the aggregates allow, and so what this route departs from in the AEP
//! (`docs/aep-43.md` lists them for operators):
//! - every series is a **sum over the service's replicas** (the processor keys its aggregates by
//!   lease and service): `aggregation=sum` is exact; `replica`, the AEP's default, is answered
//!   with the same sums and a warning; `avg`, `max` and a `replica` filter are refused;
//! - no step is finer than the processor's base window (1 minute by default): a finer step the
//!   resolution table asks for is answered at the base window, with a warning;
//! - gauges come as their mean over the observed part of each step, counters (`*_total`) as
//!   their total from the range's start, rates (cores, watts) as the mean over the step;
//! - catalog metrics the agent does not collect are named in `warnings`, not refused.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use meterflow_guard::leases::Grant;
use meterflow_guard::params::{parse_duration_ms, unix_seconds_or_rfc3339};
#[cfg(test)]
use meterflow_schemas::UsageUpdate;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    AppState, Need, Params, authorize, comma_list, count, error, owner_and_grant, take_series,
};
use crate::store::{CellRef, LEASE_CELL_MS};
use crate::time::format_rfc3339;

/// Query of `GET /lease/{dseq}/{gseq}/{oseq}/metrics`.
#[derive(Debug, Deserialize)]
pub struct AepQuery {
    /// Required: comma-separated catalog names, or `all`.
    pub metric: Option<String>,
    /// Required: Unix seconds or RFC 3339 with any offset.
    pub start: Option<String>,
    pub end: Option<String>,
    /// `15s`, `1m`, `5m`, `1h`, `1d`; default from the resolution table.
    pub step: Option<String>,
    /// Comma-separated service names.
    pub service: Option<String>,
    /// Comma-separated replica indexes: refused (no per-replica series are kept).
    pub replica: Option<String>,
    /// `sum` or `replica` (answered as `sum`); `avg` and `max` refused.
    pub aggregation: Option<String>,
    /// `json` (default) or `prometheus`.
    pub format: Option<String>,
    /// The lease's owner, for an operator token when two owners have a lease of these numbers
    /// (a tenant token's owner is its tenant).
    pub owner: Option<String>,
}

/// How a catalog metric comes from a Meterflow aggregate over one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Derive {
    /// The amount per second of the step: cores from core-seconds, watts from joules.
    PerSecond,
    /// A gauge's time integral as its level over the observed part of the step, times the
    /// factor (100 for a 0..1 ratio as a percentage).
    Level(f64),
    /// A counter's total from the range's start to the step's end.
    Total,
    /// A gauge's mean over the time it was read, whatever the number of series read: the
    /// mean temperature or clock of a service's GPUs, not their sum.
    Mean,
}

/// One metric of the catalog this route serves.
#[derive(Debug)]
pub struct Entry {
    pub name: &'static str,
    /// The Meterflow aggregate it comes from.
    pub from: &'static str,
    pub derive: Derive,
}

/// The AEP-43 catalog metrics Meterflow's aggregates give.
pub const CATALOG: [Entry; 21] = [
    Entry {
        name: "akash_lease_cpu_usage_cores",
        from: "cpu_core_seconds",
        derive: Derive::PerSecond,
    },
    Entry {
        name: "akash_lease_memory_working_set_bytes",
        from: "memory_byte_seconds",
        derive: Derive::Level(1.0),
    },
    Entry {
        name: "akash_lease_network_rx_bytes_total",
        from: "network_receive_bytes",
        derive: Derive::Total,
    },
    Entry {
        name: "akash_lease_network_tx_bytes_total",
        from: "network_transmit_bytes",
        derive: Derive::Total,
    },
    Entry {
        name: "akash_lease_gpu_utilization_percent",
        from: "gpu_utilization_seconds",
        derive: Derive::Level(100.0),
    },
    Entry {
        name: "akash_lease_gpu_memory_used_bytes",
        from: "vram_byte_seconds",
        derive: Derive::Level(1.0),
    },
    Entry {
        name: "akash_lease_gpu_power_watts",
        from: "energy_joules",
        derive: Derive::PerSecond,
    },
    Entry {
        name: "akash_lease_cpu_throttled_seconds",
        from: "cpu_throttled_seconds",
        derive: Derive::Total,
    },
    Entry {
        name: "akash_lease_cpu_limit_cores",
        from: "cpu_limit_core_seconds",
        derive: Derive::PerSecond,
    },
    Entry {
        name: "akash_lease_memory_rss_bytes",
        from: "memory_rss_byte_seconds",
        derive: Derive::Level(1.0),
    },
    Entry {
        name: "akash_lease_memory_limit_bytes",
        from: "memory_limit_byte_seconds",
        derive: Derive::PerSecond,
    },
    Entry {
        name: "akash_lease_memory_oom_kills_total",
        from: "oom_kills",
        derive: Derive::Total,
    },
    Entry {
        name: "akash_lease_network_rx_errors_total",
        from: "network_receive_errors",
        derive: Derive::Total,
    },
    Entry {
        name: "akash_lease_network_tx_errors_total",
        from: "network_transmit_errors",
        derive: Derive::Total,
    },
    Entry {
        name: "akash_lease_filesystem_usage_bytes",
        from: "filesystem_usage_byte_seconds",
        derive: Derive::Level(1.0),
    },
    Entry {
        name: "akash_lease_filesystem_capacity_bytes",
        from: "filesystem_capacity_byte_seconds",
        derive: Derive::Level(1.0),
    },
    Entry {
        name: "akash_lease_filesystem_inodes_used",
        from: "filesystem_inode_seconds",
        derive: Derive::Level(1.0),
    },
    Entry {
        name: "akash_lease_gpu_memory_total_bytes",
        from: "vram_total_byte_seconds",
        derive: Derive::Level(1.0),
    },
    Entry {
        name: "akash_lease_gpu_memory_copy_utilization_percent",
        from: "gpu_copy_utilization_seconds",
        derive: Derive::Level(100.0),
    },
    Entry {
        name: "akash_lease_gpu_temperature_celsius",
        from: "gpu_temperature_celsius_seconds",
        derive: Derive::Mean,
    },
    Entry {
        name: "akash_lease_gpu_sm_clock_mhz",
        from: "gpu_sm_clock_mhz_seconds",
        derive: Derive::Mean,
    },
];

/// The longest range the resolution table covers: 30 days.
pub const MAX_RANGE_MS: i64 = 30 * 86_400_000;

/// AEP-43's resolution table: for a range, its default step and the finest step allowed
/// (≤ 1 h: 15 s; ≤ 24 h: 1 m, 30 s; ≤ 7 d: 5 m, 1 m; ≤ 30 d: 15 m, 5 m); `None` past 30 days.
pub fn resolution(range_ms: i64) -> Option<(i64, i64)> {
    const S: i64 = 1_000;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;
    [
        (H, 15 * S, 15 * S),
        (24 * H, M, 30 * S),
        (7 * 24 * H, 5 * M, M),
        (MAX_RANGE_MS, 15 * M, 5 * M),
    ]
    .into_iter()
    .find(|(range, _, _)| range_ms <= *range)
    .map(|(_, default, finest)| (default, finest))
}

/// The catalog entries a `metric` parameter names; `Err` names what is not in the catalog.
fn wanted(metric: &str) -> Result<Vec<&'static Entry>, String> {
    let mut entries: Vec<&'static Entry> = Vec::new();
    for name in comma_list(metric) {
        if name == "all" {
            entries.extend(CATALOG.iter());
        } else if let Some(entry) = CATALOG.iter().find(|e| e.name == name) {
            entries.push(entry);
        } else {
            return Err(name.to_string());
        }
    }
    entries.sort_by_key(|e| e.name);
    entries.dedup_by_key(|e| e.name);
    Ok(entries)
}

/// One step's sums of an aggregate.
#[derive(Default, Clone, Copy)]
struct StepSums {
    amount: i128,
    scale: i32,
    observed_ms: i128,
    present_ms: i128,
}

/// One series of an answer: a catalog metric of one service, a value per step (its start, in
/// ms).
#[derive(Debug, PartialEq)]
pub struct Series {
    pub metric: &'static str,
    pub service: String,
    pub samples: Vec<(i64, f64)>,
}

/// A series' catalog metric and service.
type SeriesKey = (&'static str, String);

/// A lease's windows summed per catalog metric, service and step
/// `[start + k·step, start + (k+1)·step)` before `end` (both multiples of `step`), per service
/// (only `services` when given), as they are read. A window is in the step its start is in,
/// so a lease cell summed into a step whose edges are cell edges adds what its windows would.
pub struct Steps<'q> {
    entries: &'q [&'static Entry],
    services: Option<&'q [&'q str]>,
    start: i64,
    end: i64,
    step: i64,
    /// (metric, service) → step index → sums; few series per lease, searched in order.
    sums: Vec<(SeriesKey, BTreeMap<i64, StepSums>)>,
}

impl<'q> Steps<'q> {
    pub fn new(
        entries: &'q [&'static Entry],
        services: Option<&'q [&'q str]>,
        (start, end, step): (i64, i64, i64),
    ) -> Self {
        Self {
            entries,
            services,
            start,
            end,
            step,
            sums: Vec::new(),
        }
    }

    /// Adds a base window, or a lease cell (the sums of the windows that start in it).
    pub fn add(&mut self, w: &CellRef<'_>) {
        if w.start_ms < self.start || w.start_ms >= self.end {
            return;
        }
        let Some(entry) = self.entries.iter().find(|e| e.from == w.metric) else {
            return;
        };
        if self.services.is_some_and(|s| !s.contains(&w.service)) {
            return;
        }
        let at = (w.start_ms - self.start).div_euclid(self.step);
        let steps = match self
            .sums
            .iter_mut()
            .position(|((name, service), _)| *name == entry.name && service == w.service)
        {
            Some(i) => &mut self.sums[i].1,
            None => {
                self.sums
                    .push(((entry.name, w.service.to_string()), BTreeMap::new()));
                &mut self.sums.last_mut().expect("pushed").1
            }
        };
        let step_sums = steps.entry(at).or_default();
        step_sums.amount += i128::from(w.amount);
        step_sums.scale = w.scale;
        step_sums.observed_ms += i128::from(w.coverage_ms);
        step_sums.present_ms += i128::from(w.present_ms);
    }

    /// The series, in metric and service order, and what a caller should know about them. A
    /// step that ends after `data_to` (the end of the data so far) is taken over its part
    /// before it.
    pub fn finish(mut self, data_to: i64) -> (Vec<Series>, Vec<String>) {
        let (start, step) = (self.start, self.step);
        self.sums.sort_by(|a, b| a.0.cmp(&b.0));
        let mut warnings = Vec::new();
        let mut series = Vec::new();
        for ((name, service), steps) in self.sums {
            let derive = self
                .entries
                .iter()
                .find(|e| e.name == name)
                .map_or(Derive::PerSecond, |e| e.derive);
            let mut samples = Vec::with_capacity(steps.len());
            let (mut total, mut unobserved, mut partial, mut worst) = (0f64, 0, 0, 1f64);
            for (&at, s) in &steps {
                let step_start = start + at * step;
                let step_s = step.min(data_to - step_start).max(1) as f64 / 1_000.0;
                let amount = s.amount as f64 / 10f64.powi(s.scale);
                let value = match derive {
                    Derive::PerSecond => amount / step_s,
                    Derive::Total => {
                        total += amount;
                        total
                    }
                    Derive::Level(factor) => {
                        if s.observed_ms <= 0 {
                            unobserved += 1;
                            continue;
                        }
                        if s.observed_ms < s.present_ms {
                            partial += 1;
                            worst = worst.min(s.observed_ms as f64 / s.present_ms as f64);
                        }
                        amount * (s.present_ms as f64 / s.observed_ms as f64) / step_s * factor
                    }
                    // Over the time read, summed over the series: no coverage to speak of.
                    Derive::Mean => {
                        if s.observed_ms <= 0 {
                            unobserved += 1;
                            continue;
                        }
                        amount / (s.observed_ms as f64 / 1_000.0)
                    }
                };
                samples.push((step_start, value));
            }
            let label = format!("{name}{{service={service:?}}}");
            if let (Some(first), Some(last)) = (steps.keys().next(), steps.keys().last()) {
                let gaps = (last - first + 1) as usize - steps.len();
                if gaps > 0 {
                    warnings.push(format!(
                        "{label}: no data for {gaps} step(s) between its first and last sample: nothing of the lease ran or was read then"
                    ));
                }
            }
            if unobserved > 0 {
                warnings.push(format!(
                    "{label}: {unobserved} step(s) had the lease's containers running but no reading: left out, never filled"
                ));
            }
            if partial > 0 {
                warnings.push(format!(
                    "{label}: {partial} step(s) observed in part (coverage {worst:.2} at worst): a container's unread time holds its mean over the read time"
                ));
            }
            series.push(Series {
                metric: name,
                service,
                samples,
            });
        }
        (series, warnings)
    }
}

/// The series of `entries` from a lease's base-window records ([`Steps`]).
#[cfg(test)]
fn build(
    updates: &[UsageUpdate],
    entries: &[&'static Entry],
    services: Option<&[&str]>,
    (start, end, step, data_to): (i64, i64, i64, i64),
) -> (Vec<Series>, Vec<String>) {
    let mut steps = Steps::new(entries, services, (start, end, step));
    for u in updates {
        steps.add(&u.into());
    }
    steps.finish(data_to)
}

/// The lease's identity, as the answer and every series' labels carry it.
struct Lease<'a> {
    owner: &'a str,
    dseq: &'a str,
    gseq: &'a str,
    oseq: &'a str,
    provider: &'a str,
}

impl Lease<'_> {
    fn labels(&self, service: &str) -> Map<String, Value> {
        let mut labels = Map::new();
        for (k, v) in [
            ("owner", self.owner),
            ("dseq", self.dseq),
            ("gseq", self.gseq),
            ("oseq", self.oseq),
            ("provider", self.provider),
            ("service", service),
        ] {
            labels.insert(k.into(), v.into());
        }
        labels
    }
}

/// AEP-43's JSON answer: `lease`, `range`, `series[{metric, labels, samples[{t, v}]}]` (`t` in
/// Unix seconds, the step's start) and `warnings`.
fn aep_json(
    lease: &Lease,
    (start, end, step): (i64, i64, i64),
    series: &[Series],
    warnings: &[String],
) -> Value {
    let series: Vec<Value> = series
        .iter()
        .map(|s| {
            let samples: Vec<Value> = s
                .samples
                .iter()
                .map(|(t, v)| json!({"t": t / 1_000, "v": v}))
                .collect();
            json!({"metric": s.metric, "labels": lease.labels(&s.service), "samples": samples})
        })
        .collect();
    json!({
        "lease": {
            "owner": lease.owner,
            "dseq": lease.dseq,
            "gseq": lease.gseq,
            "oseq": lease.oseq,
            "provider": lease.provider,
        },
        "range": {
            "start": format_rfc3339(start),
            "end": format_rfc3339(end),
            "step": format!("{}s", step / 1_000),
        },
        "series": series,
        "warnings": warnings,
    })
}

/// Prometheus's `query_range` answer (a matrix; values `[unix seconds, "value"]`), with the
/// warnings in its `warnings` array.
fn prometheus_json(lease: &Lease, series: &[Series], warnings: &[String]) -> Value {
    let result: Vec<Value> = series
        .iter()
        .map(|s| {
            let mut metric = Map::new();
            metric.insert("__name__".into(), s.metric.into());
            metric.extend(lease.labels(&s.service));
            let values: Vec<Value> = s
                .samples
                .iter()
                .map(|(t, v)| json!([t / 1_000, v.to_string()]))
                .collect();
            json!({"metric": metric, "values": values})
        })
        .collect();
    let mut answer = json!({
        "status": "success",
        "data": {"resultType": "matrix", "result": result},
    });
    if !warnings.is_empty() {
        answer["warnings"] = json!(warnings);
    }
    answer
}

/// `x` rounded up to a multiple of `unit` (> 0).
fn round_up(x: i64, unit: i64) -> i64 {
    -(-x).div_euclid(unit) * unit
}

pub(super) async fn lease_metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((dseq, gseq, oseq)): Path<(String, String, String)>,
    Params(q): Params<AepQuery>,
) -> Response {
    const ROUTE: &str = "/lease/{dseq}/{gseq}/{oseq}/metrics";
    let bad = |msg: String, hint: &str| error(&state, ROUTE, StatusCode::BAD_REQUEST, msg, hint);
    let numbers = [("dseq", &dseq), ("gseq", &gseq), ("oseq", &oseq)];
    if let Some((what, value)) = numbers
        .iter()
        .find(|(_, v)| v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad(
            format!("{what}={value:?} is not a number"),
            "the path is /lease/DSEQ/GSEQ/OSEQ/metrics, each a decimal number",
        );
    }
    let lease = format!("{dseq}.{gseq}.{oseq}");
    // A lease owner's token (AEP-64) may reach only some of the lease's services.
    let found = authorize(&state, &headers, ROUTE, Need::Metrics).and_then(|claims| {
        owner_and_grant(&state, ROUTE, claims, (&lease, q.owner.as_deref(), "owner"))
    });
    let (owner, claims, grant) = match found {
        Ok(found) => found,
        Err(denied) => return *denied,
    };
    let entries = match q.metric.as_deref() {
        None => {
            return bad(
                "metric is required".into(),
                "give catalog names, comma-separated (akash_lease_cpu_usage_cores,...), or all",
            );
        }
        Some(metric) => match wanted(metric) {
            Ok(found) => found,
            Err(unknown) => {
                return bad(
                    format!("metric {unknown:?} is not in the AEP-43 catalog"),
                    &format!(
                        "use all, or names from: {}",
                        CATALOG
                            .iter()
                            .map(|e| e.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        },
    };
    let time = |name: &str, value: &Option<String>| match value.as_deref() {
        None => Err(format!("{name} is required")),
        Some(text) => {
            unix_seconds_or_rfc3339(text).ok_or_else(|| format!("{name}={text:?} is not a time"))
        }
    };
    let (start, end) = match (time("start", &q.start), time("end", &q.end)) {
        (Ok(start), Ok(end)) if start < end => (start, end),
        (Ok(_), Ok(_)) => {
            return bad(
                "start must be before end".into(),
                "swap them or widen the range",
            );
        }
        (Err(message), _) | (_, Err(message)) => {
            return bad(
                message,
                "give Unix seconds (1795428000) or RFC 3339 (2026-11-23T10:00:00Z, any offset)",
            );
        }
    };
    let Some((default_step, finest)) = resolution(end - start) else {
        count(&state, ROUTE, StatusCode::RANGE_NOT_SATISFIABLE);
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            Json(json!({
                "error": format!("range_not_satisfiable: the range is {:.1} days; this route answers at most 30", (end - start) as f64 / 86_400_000.0),
                "hint": "narrow it, or use /v1/tenants/{tenant}/usage for longer periods",
            })),
        )
            .into_response();
    };
    let asked = match q.step.as_deref().map(|s| (s, parse_duration_ms(s))) {
        None => default_step,
        Some((_, Some(step))) if step >= finest => step,
        Some((text, Some(_))) => {
            return bad(
                format!(
                    "step={text} is finer than a range of this length allows: at least {}s",
                    finest / 1_000
                ),
                "give that step or a coarser one, or narrow the range",
            );
        }
        Some((text, None)) => {
            return bad(
                format!("step={text:?} is not a duration"),
                "write it as 15s, 1m, 5m, 1h or 1d",
            );
        }
    };
    let aggregation = q.aggregation.as_deref().unwrap_or("replica");
    let mut warnings = Vec::new();
    match aggregation {
        "sum" => {}
        "replica" => warnings.push(
            "aggregation=replica: this provider keeps no per-replica series; each series is the sum over its service's replicas".to_string(),
        ),
        "avg" | "max" => {
            return bad(
                format!("aggregation={aggregation} needs per-replica series, which this provider does not keep"),
                "use aggregation=sum",
            );
        }
        other => {
            return bad(
                format!("aggregation={other:?} is not one of sum, avg, max, replica"),
                "use aggregation=sum",
            );
        }
    }
    if q.replica.is_some() {
        return bad(
            "replica filters need per-replica series, which this provider does not keep".into(),
            "leave replica out: each series is the sum over its service's replicas",
        );
    }
    let prometheus = match q.format.as_deref().unwrap_or("json") {
        "json" => false,
        "prometheus" => true,
        other => {
            return bad(
                format!("format={other:?} is not json or prometheus"),
                "use format=json or format=prometheus",
            );
        }
    };
    let wanted_services: Option<Vec<&str>> = q.service.as_deref().map(comma_list);
    let services: Option<Vec<&str>> = match (&grant, wanted_services) {
        (Grant::Services(granted), None) => Some(granted.iter().map(String::as_str).collect()),
        (Grant::Services(granted), Some(named)) => {
            if let Some(other) = named.iter().find(|a| !granted.iter().any(|g| g == *a)) {
                return error(
                    &state,
                    ROUTE,
                    StatusCode::FORBIDDEN,
                    format!("this token does not reach service {other:?} of this lease"),
                    &format!("it reaches {}", granted.join(", ")),
                );
            }
            Some(named)
        }
        (_, named) => named,
    };
    // Steps nest the base windows: a multiple of the base window, aligned to the epoch as the
    // windows are. The base window is read from the records (the processor's `--window`); the
    // windows of a first step that starts before `start` are read after.
    let unavailable = |e: crate::store::StoreError| {
        error(
            &state,
            ROUTE,
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
            "the sink's store failed; retry, and see the sink's log",
        )
    };
    let base = match state.store.lease_window_ms(&owner, &lease, start, end) {
        Ok(base) => base.unwrap_or(1).max(1),
        Err(e) => return unavailable(e),
    };
    let step = round_up(asked, base);
    if step != asked {
        warnings.push(format!(
            "downsampled: step {}s instead of {}s; the finest data this provider keeps is its base window of {}s",
            step / 1_000,
            asked / 1_000,
            base / 1_000
        ));
    }
    let (from, to) = (start.div_euclid(step) * step, round_up(end, step));
    // Steps of whole lease cells (5 minutes and more: the default from 24 hours on) are summed
    // from the cells, twelve minute windows a read; finer ones from the windows themselves.
    let mut steps = Steps::new(&entries, services.as_deref(), (from, to, step));
    let read = if step % LEASE_CELL_MS == 0 {
        state
            .store
            .each_lease_cell(&owner, &lease, from, to, |c| steps.add(c))
    } else {
        state
            .store
            .lease_usage(&owner, &lease, from, to)
            .map(|updates| updates.iter().for_each(|u| steps.add(&u.into())))
    };
    if let Err(e) = read {
        return unavailable(e);
    }
    // The last step, when the data does not reach its end yet, is taken over its part so far:
    // a rate over complete data, not one that climbs through the step.
    let watermark = state.store.watermark_ms().ok().flatten().unwrap_or(to);
    let open_from = watermark.div_euclid(step) * step;
    if from < watermark && watermark < to && open_from < watermark {
        warnings.push(format!(
            "the step from {} is not complete (data up to {}): its values are over its first {}s",
            format_rfc3339(open_from),
            format_rfc3339(watermark),
            (watermark - open_from) / 1_000,
        ));
    }
    let (series, mut more) = steps.finish(watermark);
    warnings.append(&mut more);
    if let Err(denied) = take_series(&state, ROUTE, &claims, series.len()) {
        return *denied;
    }
    let lease = Lease {
        owner: &owner,
        dseq: &dseq,
        gseq: &gseq,
        oseq: &oseq,
        provider: &state.provider,
    };
    count(&state, ROUTE, StatusCode::OK);
    let answer = if prometheus {
        prometheus_json(&lease, &series, &warnings)
    } else {
        aep_json(&lease, (from, to, step), &series, &warnings)
    };
    Json(answer).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = 60_000;

    /// A base-window record as the processor writes it.
    fn window(
        metric: &str,
        service: &str,
        start: i64,
        amount: i64,
        scale: i32,
        observed: i64,
        present: i64,
    ) -> UsageUpdate {
        UsageUpdate {
            id: format!("{metric}/{service}/{start}"),
            tenant: "akash1owner".into(),
            lease: "100.1.1".into(),
            service: service.into(),
            metric: metric.into(),
            gpu_class: String::new(),
            mig_profile: String::new(),
            window_start_ms: start,
            window_end_ms: start + M,
            resolution: String::new(),
            amount,
            scale,
            coverage_ms: observed,
            present_ms: present,
            node: String::new(),
        }
    }

    /// The samples of `name`'s series.
    fn samples_of<'a>(series: &'a [Series], name: &str) -> &'a [(i64, f64)] {
        &series
            .iter()
            .find(|s| s.metric == name)
            .expect(name)
            .samples
    }

    #[test]
    fn the_resolution_table_is_the_aeps() {
        const S: i64 = 1_000;
        assert_eq!(resolution(60 * M), Some((15 * S, 15 * S)));
        assert_eq!(resolution(60 * M + 1), Some((M, 30 * S)));
        assert_eq!(resolution(24 * 60 * M), Some((M, 30 * S)));
        assert_eq!(resolution(7 * 24 * 60 * M), Some((5 * M, M)));
        assert_eq!(resolution(MAX_RANGE_MS), Some((15 * M, 5 * M)));
        assert_eq!(resolution(MAX_RANGE_MS + 1), None);
    }

    #[test]
    fn metric_names_are_the_catalogs_or_all() {
        let entries = wanted("all").expect("all");
        assert_eq!(entries.len(), CATALOG.len());
        // AEP-43's 21 metrics, each once.
        assert_eq!(CATALOG.len(), 21);
        let entries = wanted(
            "akash_lease_gpu_power_watts, akash_lease_gpu_sm_clock_mhz,akash_lease_gpu_power_watts",
        )
        .expect("known names");
        assert_eq!(
            entries.iter().map(|e| e.name).collect::<Vec<_>>(),
            [
                "akash_lease_gpu_power_watts",
                "akash_lease_gpu_sm_clock_mhz"
            ]
        );
        assert_eq!(
            wanted("cpu_core_seconds").err().as_deref(),
            Some("cpu_core_seconds")
        );
    }

    #[test]
    fn rates_levels_and_totals_come_from_the_windows_by_hand() {
        let t0 = 1_795_428_000_000; // 2026-11-23T10:00:00Z
        // Two replicas of "web", 0.25 and 0.5 cores: 45 core-seconds a minute (scale 6).
        // Memory: 1 GiB and 3 GiB held the whole minute, then a minute with the first replica
        // read for 30 s of its 60 (the second gone): 1 GiB over the observed half.
        // Received bytes: 1,000 then 500.
        const GIB: i64 = 1 << 30;
        let updates = vec![
            window("cpu_core_seconds", "web", t0, 45_000_000, 6, M, M),
            window("cpu_core_seconds", "web", t0 + M, 45_000_000, 6, M, M),
            window(
                "memory_byte_seconds",
                "web",
                t0,
                4 * GIB * 60,
                0,
                2 * M,
                2 * M,
            ),
            window("memory_byte_seconds", "web", t0 + M, GIB * 30, 0, M / 2, M),
            window("network_receive_bytes", "web", t0, 1_000, 0, M, M),
            window("network_receive_bytes", "web", t0 + M, 500, 0, M, M),
            window("network_receive_bytes", "db", t0, 7, 0, M, M),
            window("cost", "web", t0, 1, 6, M, M),
        ];
        let entries: Vec<&Entry> = CATALOG.iter().collect();
        let (series, warnings) = build(
            &updates,
            &entries,
            Some(&["web"]),
            (t0, t0 + 2 * M, M, t0 + 2 * M),
        );
        let get = |name: &str| samples_of(&series, name);
        assert_eq!(series.len(), 3, "cpu, memory and rx of web; db left out");
        assert_eq!(
            get("akash_lease_cpu_usage_cores"),
            &[(t0, 0.75), (t0 + M, 0.75)]
        );
        assert_eq!(
            get("akash_lease_memory_working_set_bytes"),
            &[(t0, 4.0 * GIB as f64), (t0 + M, GIB as f64)]
        );
        assert_eq!(
            get("akash_lease_network_rx_bytes_total"),
            &[(t0, 1_000.0), (t0 + M, 1_500.0)]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("observed in part (coverage 0.50"),
            "{warnings:?}"
        );

        // Two-minute steps: rates and levels are means over the step, totals its end's.
        let (series, _) = build(
            &updates,
            &entries,
            Some(&["web"]),
            (t0, t0 + 2 * M, 2 * M, t0 + 2 * M),
        );
        let get = |name: &str| samples_of(&series, name);
        assert_eq!(get("akash_lease_cpu_usage_cores"), &[(t0, 0.75)]);
        // (4 GiB·60 s + 1 GiB·30 s) over the observed 150 of 180 present seconds, as a level
        // over 120 s: (270 GiB·s × 180/150) / 120 s = 2.7 GiB.
        let memory = get("akash_lease_memory_working_set_bytes")[0].1;
        assert!((memory / GIB as f64 - 2.7).abs() < 1e-9, "{memory}");
        assert_eq!(get("akash_lease_network_rx_bytes_total"), &[(t0, 1_500.0)]);

        // With data up to the first minute's end only, a two-minute step is its first minute:
        // 45 core-seconds over 60 s, not over 120.
        let (series, _) = build(
            &updates[..1],
            &entries,
            None,
            (t0, t0 + 2 * M, 2 * M, t0 + M),
        );
        assert_eq!(series[0].samples, [(t0, 0.75)]);
    }

    #[test]
    fn limits_throttling_rss_oom_kills_and_errors_come_from_their_aggregates_by_hand() {
        let t0 = 1_795_428_000_000; // 2026-11-23T10:00:00Z
        const MIB: i64 = 1 << 20;
        // One container limited to 0.5 cores and 512 MiB for the first minute, then replaced
        // after 45 s of the second by one limited to 1 core and 1 GiB for its last 15 s:
        // 30 core-seconds, then 0.5·45 + 1·15 = 37.5 (scale 6); byte-seconds alike.
        // Throttled 1.25 s then 0.5 s (scale 6); RSS 200 MiB held the first minute; one OOM
        // kill in the second; 3 receive errors, then none; 2 transmit errors.
        let updates = vec![
            window("cpu_limit_core_seconds", "web", t0, 30_000_000, 6, M, M),
            window("cpu_limit_core_seconds", "web", t0 + M, 37_500_000, 6, M, M),
            window(
                "memory_limit_byte_seconds",
                "web",
                t0,
                512 * MIB * 60,
                0,
                M,
                M,
            ),
            window(
                "memory_limit_byte_seconds",
                "web",
                t0 + M,
                512 * MIB * 45 + 1024 * MIB * 15,
                0,
                M,
                M,
            ),
            window("cpu_throttled_seconds", "web", t0, 1_250_000, 6, M, M),
            window("cpu_throttled_seconds", "web", t0 + M, 500_000, 6, M, M),
            window(
                "memory_rss_byte_seconds",
                "web",
                t0,
                200 * MIB * 60,
                0,
                M,
                M,
            ),
            window("oom_kills", "web", t0 + M, 1, 0, M, M),
            window("network_receive_errors", "web", t0, 3, 0, M, M),
            window("network_transmit_errors", "web", t0 + M, 2, 0, M, M),
        ];
        let entries: Vec<&Entry> = CATALOG.iter().collect();
        let (series, warnings) = build(&updates, &entries, None, (t0, t0 + 2 * M, M, t0 + 2 * M));
        assert!(warnings.is_empty(), "{warnings:?}");
        let get = |name: &str| samples_of(&series, name);
        assert_eq!(
            get("akash_lease_cpu_limit_cores"),
            [(t0, 0.5), (t0 + M, 0.625)]
        );
        assert_eq!(
            get("akash_lease_memory_limit_bytes"),
            [(t0, 512.0 * MIB as f64), (t0 + M, 640.0 * MIB as f64)]
        );
        assert_eq!(
            get("akash_lease_cpu_throttled_seconds"),
            [(t0, 1.25), (t0 + M, 1.75)]
        );
        assert_eq!(
            get("akash_lease_memory_rss_bytes"),
            [(t0, 200.0 * MIB as f64)]
        );
        assert_eq!(get("akash_lease_memory_oom_kills_total"), [(t0 + M, 1.0)]);
        assert_eq!(get("akash_lease_network_rx_errors_total"), [(t0, 3.0)]);
        assert_eq!(get("akash_lease_network_tx_errors_total"), [(t0 + M, 2.0)]);
        assert_eq!(series.len(), 7);
    }

    /// A service's two GPUs at 60 °C and 70 °C for a minute: a mean of 65 °C, not a sum of
    /// 130; the next minute the second is read for 30 s at 80 °C and the first not at all:
    /// 80 °C. Their memory and copy engine are summed, as their utilization is.
    #[test]
    fn temperature_and_clock_are_means_over_the_gpus_read_memory_and_copy_engine_sums() {
        let t0 = 1_795_428_000_000;
        let updates = vec![
            window(
                "gpu_temperature_celsius_seconds",
                "llm",
                t0,
                60 * 60 + 70 * 60,
                0,
                2 * M,
                2 * M,
            ),
            window(
                "gpu_temperature_celsius_seconds",
                "llm",
                t0 + M,
                80 * 30,
                0,
                M / 2,
                2 * M,
            ),
            window(
                "gpu_sm_clock_mhz_seconds",
                "llm",
                t0,
                1_980 * 60 + 1_410 * 60,
                0,
                2 * M,
                2 * M,
            ),
            // 80 GB each (kilobyte-seconds, scale -3).
            window(
                "vram_total_byte_seconds",
                "llm",
                t0,
                2 * 80_000_000 * 60,
                -3,
                2 * M,
                2 * M,
            ),
            // 0.25 and 0.5 busy: 45 s of full activity (milliseconds, scale 3).
            window(
                "gpu_copy_utilization_seconds",
                "llm",
                t0,
                45_000,
                3,
                2 * M,
                2 * M,
            ),
        ];
        let entries: Vec<&Entry> = CATALOG.iter().collect();
        let (series, _) = build(&updates, &entries, None, (t0, t0 + 2 * M, M, t0 + 2 * M));
        let get = |name: &str| samples_of(&series, name);
        assert_eq!(
            get("akash_lease_gpu_temperature_celsius"),
            [(t0, 65.0), (t0 + M, 80.0)]
        );
        assert_eq!(get("akash_lease_gpu_sm_clock_mhz"), [(t0, 1_695.0)]);
        assert_eq!(get("akash_lease_gpu_memory_total_bytes"), [(t0, 160e9)]);
        assert_eq!(
            get("akash_lease_gpu_memory_copy_utilization_percent"),
            [(t0, 75.0)]
        );
    }

    #[test]
    fn a_step_with_nothing_observed_is_a_gap_not_a_zero() {
        let t0 = 1_795_428_000_000;
        let updates = vec![
            window("vram_byte_seconds", "llm", t0, 600, 0, M, M),
            window("vram_byte_seconds", "llm", t0 + M, 0, 0, 0, M),
            window("vram_byte_seconds", "llm", t0 + 3 * M, 1_200, 0, M, M),
        ];
        let entries: Vec<&Entry> = CATALOG.iter().collect();
        let (series, warnings) = build(&updates, &entries, None, (t0, t0 + 4 * M, M, t0 + 4 * M));
        assert_eq!(series[0].samples, [(t0, 10.0), (t0 + 3 * M, 20.0)]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings.iter().any(|w| w.contains("no data for 1 step")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("1 step(s) had the lease's containers running but no reading")),
            "{warnings:?}"
        );
    }
}
