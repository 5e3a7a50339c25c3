//! Records inside the dataflow, and the validation that turns a [`Sample`] into one.
//!
//! Quantities are integers at a fixed scale (GPU time in milliseconds, CPU time in
//! microseconds), so sums are exact and independent of the order they are added in.

use meterflow_schemas::{Sample, SampleKind};
use serde::{Deserialize, Serialize};

use crate::names::{ItemId, LeaseId, OwnerId};

/// Whose usage an aggregate is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub tenant: String,
    pub lease: String,
    pub service: String,
}

/// One allocation series: one GPU (or MIG instance) held by one container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AllocationKey {
    pub owner: Owner,
    pub gpu_class: String,
    pub mig_profile: String,
    pub node: String,
    pub container_id: String,
    pub gpu_uuid: String,
}

/// One observation of an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AllocationObs {
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub observed_at_ms: i64,
    /// GPUs held by this series (1 for one GPU or one MIG instance).
    pub count: i64,
}

impl AllocationObs {
    /// Two observations of one series folded into one: the interval depends only on the
    /// earliest start, the earliest finish, the latest observation and the largest count.
    pub fn merge(self, other: Self) -> Self {
        Self {
            started_at_ms: self.started_at_ms.min(other.started_at_ms),
            finished_at_ms: match (self.finished_at_ms, other.finished_at_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            observed_at_ms: self.observed_at_ms.max(other.observed_at_ms),
            count: self.count.max(other.count),
        }
    }
}

/// One counter series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CounterKey {
    pub owner: Owner,
    pub node: String,
    pub container_id: String,
    pub metric: Aggregate,
}

/// One counter reading, as an integer at the aggregate's scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CounterObs {
    pub timestamp_ms: i64,
    pub units: i64,
}

/// What the dataflow is fed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Observation {
    Allocation(AllocationKey, AllocationObs),
    Counter(CounterKey, CounterObs),
}

/// The aggregates the processor keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Aggregate {
    /// GPU time from allocation intervals, in milliseconds.
    GpuSeconds,
    /// CPU time from the `cpu_usage_seconds_total` counter, in microseconds.
    CpuCoreSeconds,
}

impl Aggregate {
    /// The name on the wire and in the API.
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::GpuSeconds => "gpu_seconds",
            Aggregate::CpuCoreSeconds => "cpu_core_seconds",
        }
    }

    /// Decimal places of the integer amount.
    pub fn scale(self) -> i32 {
        match self {
            Aggregate::GpuSeconds => 3,
            Aggregate::CpuCoreSeconds => 6,
        }
    }
}

/// One series as the dataflow knows it: a number unique within the process, and the interned
/// owner, lease and item it adds to (see [`crate::names`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeriesRef {
    pub series: u64,
    pub owner: OwnerId,
    pub lease: LeaseId,
    pub item: ItemId,
}

/// What the dataflow is fed: one summary per allocation series, and per counter series its
/// usage per window (the amount travels in the update's multiplicity). Both come from a
/// [`crate::series::Feeder`], which keeps the per-series state that the raw samples reduce to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Summary {
    /// The merged observations of one allocation series.
    Allocation(SeriesRef, AllocationObs),
    /// A counter series' usage in the window starting at the given millisecond.
    CounterWindow(SeriesRef, i64),
}

/// The key of one windowed aggregate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UsageKey {
    pub owner: Owner,
    pub metric: Aggregate,
    pub gpu_class: String,
    pub mig_profile: String,
    pub window_start_ms: i64,
}

/// The key of one billed quantity: what a lease used of one item in one billing window.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BillingKey {
    pub tenant: String,
    pub lease: String,
    pub metric: Aggregate,
    pub gpu_class: String,
    pub mig_profile: String,
    pub window_start_ms: i64,
}

impl BillingKey {
    /// The billing key a usage key adds to, for billing windows of `billing_window_ms`.
    pub fn of(usage: &UsageKey, billing_window_ms: i64) -> Self {
        Self {
            tenant: usage.owner.tenant.clone(),
            lease: usage.owner.lease.clone(),
            metric: usage.metric,
            gpu_class: usage.gpu_class.clone(),
            mig_profile: usage.mig_profile.clone(),
            window_start_ms: usage.window_start_ms.div_euclid(billing_window_ms)
                * billing_window_ms,
        }
    }

    /// The key of a billing record read back from the billing topic; `None` for an item this
    /// version does not bill.
    pub fn from_record(record: &meterflow_schemas::BillingRecord) -> Option<Self> {
        let (metric, gpu_class, mig_profile) = match record.item.split(':').collect::<Vec<_>>()[..]
        {
            ["gpu", class, mig] => (Aggregate::GpuSeconds, class, mig),
            ["cpu"] => (Aggregate::CpuCoreSeconds, "", ""),
            _ => return None,
        };
        Some(Self {
            tenant: record.tenant.clone(),
            lease: record.lease.clone(),
            metric,
            gpu_class: gpu_class.to_string(),
            mig_profile: mig_profile.to_string(),
            window_start_ms: record.window_start_ms,
        })
    }

    /// What is billed, as the billing record names it: `gpu:<class>:<mig_profile>` or `cpu`.
    pub fn item(&self) -> String {
        match self.metric {
            Aggregate::GpuSeconds => format!("gpu:{}:{}", self.gpu_class, self.mig_profile),
            Aggregate::CpuCoreSeconds => "cpu".to_string(),
        }
    }
}

/// Why a sample was refused; it goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

fn reject(reason: &'static str, detail: String) -> Result<Option<Observation>, Rejection> {
    Err(Rejection { reason, detail })
}

/// Validates a sample and turns it into an observation; `Ok(None)` for metrics this version
/// of the processor does not aggregate yet.
pub fn observe(s: &Sample) -> Result<Option<Observation>, Rejection> {
    if !s.value.is_finite() {
        return reject(
            "non_finite_value",
            format!("{} = {} is not a finite number", s.metric, s.value),
        );
    }
    if s.timestamp_ms < 0 {
        return reject(
            "before_epoch",
            format!("timestamp {} ms is before 1970", s.timestamp_ms),
        );
    }
    let owner = || Owner {
        tenant: s.series.tenant.clone(),
        lease: s.series.lease.clone(),
        service: s.series.service.clone(),
    };
    match (s.kind, s.metric.as_str()) {
        (SampleKind::Allocation, "gpu") => {
            let Some(started_at_ms) = s.started_at_ms else {
                return reject(
                    "missing_start",
                    "a GPU allocation needs started_at_ms".into(),
                );
            };
            if let Some(f) = s.finished_at_ms
                && f < started_at_ms
            {
                return reject(
                    "bad_interval",
                    format!("finished_at_ms {f} is before started_at_ms {started_at_ms}"),
                );
            }
            if s.value < 0.0 || s.value.fract() != 0.0 {
                return reject(
                    "bad_gpu_count",
                    format!(
                        "a GPU allocation holds a whole number of GPUs, not {}",
                        s.value
                    ),
                );
            }
            Ok(Some(Observation::Allocation(
                AllocationKey {
                    owner: owner(),
                    gpu_class: s.series.gpu_class.clone(),
                    mig_profile: s.series.mig_profile.clone(),
                    node: s.series.node.clone(),
                    container_id: s.series.container_id.clone(),
                    gpu_uuid: s.series.gpu_uuid.clone(),
                },
                AllocationObs {
                    started_at_ms,
                    finished_at_ms: s.finished_at_ms,
                    observed_at_ms: s.timestamp_ms,
                    count: s.value as i64,
                },
            )))
        }
        (SampleKind::Counter, "cpu_usage_seconds_total") => {
            if s.value < 0.0 {
                return reject(
                    "negative_counter",
                    format!("counter {} = {} is negative", s.metric, s.value),
                );
            }
            let metric = Aggregate::CpuCoreSeconds;
            let units = (s.value * 10f64.powi(metric.scale())).round();
            if units >= i64::MAX as f64 {
                return reject("value_too_large", format!("{} = {}", s.metric, s.value));
            }
            Ok(Some(Observation::Counter(
                CounterKey {
                    owner: owner(),
                    node: s.series.node.clone(),
                    container_id: s.series.container_id.clone(),
                    metric,
                },
                CounterObs {
                    timestamp_ms: s.timestamp_ms,
                    units: units as i64,
                },
            )))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterflow_schemas::SeriesId;

    fn sample(kind: SampleKind, metric: &str, value: f64) -> Sample {
        Sample {
            series: SeriesId::default(),
            kind,
            metric: metric.into(),
            value,
            timestamp_ms: 1_000,
            started_at_ms: Some(0),
            finished_at_ms: None,
        }
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        let r = |s: Sample| observe(&s).expect_err("rejected").reason;
        assert_eq!(
            r(sample(
                SampleKind::Counter,
                "cpu_usage_seconds_total",
                f64::NAN
            )),
            "non_finite_value"
        );
        assert_eq!(
            r(sample(SampleKind::Gauge, "x", f64::INFINITY)),
            "non_finite_value"
        );
        assert_eq!(
            r(sample(SampleKind::Counter, "cpu_usage_seconds_total", -1.0)),
            "negative_counter"
        );
        assert_eq!(
            r(sample(SampleKind::Allocation, "gpu", 0.5)),
            "bad_gpu_count"
        );
        let mut s = sample(SampleKind::Allocation, "gpu", 1.0);
        s.started_at_ms = None;
        assert_eq!(r(s.clone()), "missing_start");
        s.started_at_ms = Some(10);
        s.finished_at_ms = Some(5);
        assert_eq!(r(s), "bad_interval");
    }

    #[test]
    fn counters_become_integer_microseconds() {
        let o = observe(&sample(
            SampleKind::Counter,
            "cpu_usage_seconds_total",
            1.000_001,
        ))
        .expect("valid")
        .expect("aggregated");
        let Observation::Counter(_, obs) = o else {
            panic!("a counter")
        };
        assert_eq!(obs.units, 1_000_001);
    }
}
