//! Budgets per tenant and the alerts they raise, once per tenant, threshold and billing period
//! (a calendar month, UTC).
//!
//! A budgets file is TOML:
//!
//! ```toml
//! [tenants.acme]
//! monthly = 1000.0            # in the price book's currency
//! thresholds = [50, 90, 100]  # percent of the budget; this is the default
//! ```
//!
//! What a tenant has spent in a period is the cost of its billed quantities (the same integer
//! costs as the billing records), summed in the dataflow. An alert's id is derived from
//! (tenant, budget, threshold, period), so a re-emitted alert is recognisably the same one;
//! the processor reads the alerts topic back at start-up and raises only those not there yet.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use meterflow_schemas::Alert;
use meterflow_schemas::id::StrongId;
use meterflow_schemas::time;
use serde::Deserialize;

/// One tenant's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Per billing period, in millionths of the currency unit.
    pub monthly_micros: i64,
    /// Percentages of the budget that raise an alert when reached, ascending.
    pub thresholds: Vec<i32>,
}

/// Budgets by tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budgets {
    pub tenants: BTreeMap<String, Budget>,
}

/// Why a budgets file was refused.
#[derive(Debug, thiserror::Error)]
pub enum BudgetsError {
    #[error("cannot read the budgets file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("budgets file {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetsFile {
    #[serde(default)]
    tenants: BTreeMap<String, TenantBudget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantBudget {
    monthly: f64,
    #[serde(default = "default_thresholds")]
    thresholds: Vec<i32>,
}

fn default_thresholds() -> Vec<i32> {
    vec![50, 90, 100]
}

impl Budgets {
    /// Parses budgets from TOML; errors name the key.
    pub fn parse(text: &str, path: &str) -> Result<Self, BudgetsError> {
        let invalid = |message: String| BudgetsError::Invalid {
            path: path.to_string(),
            message,
        };
        let file: BudgetsFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut tenants = BTreeMap::new();
        for (tenant, b) in file.tenants {
            if !b.monthly.is_finite() || !(0.0..1e12).contains(&b.monthly) || b.monthly == 0.0 {
                return Err(invalid(format!(
                    "tenants.{tenant}.monthly = {}: a budget is a positive amount below 1e12",
                    b.monthly
                )));
            }
            let mut thresholds = b.thresholds;
            if let Some(t) = thresholds.iter().find(|t| !(1..=1000).contains(*t)) {
                return Err(invalid(format!(
                    "tenants.{tenant}.thresholds: {t} is not a percentage in 1..=1000"
                )));
            }
            thresholds.sort_unstable();
            thresholds.dedup();
            tenants.insert(
                tenant,
                Budget {
                    monthly_micros: (b.monthly * 1e6).round() as i64,
                    thresholds,
                },
            );
        }
        Ok(Self { tenants })
    }

    /// Reads and parses a budgets file.
    pub fn load(path: &Path) -> Result<Self, BudgetsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| BudgetsError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// The alerts a tenant's spend in the period starting at `period_start_ms` raises that are
    /// not in `raised` (by id).
    pub fn alerts(
        &self,
        tenant: &str,
        period_start_ms: i64,
        spent_micros: i64,
        raised: &HashSet<String>,
        now_ms: i64,
        currency: &str,
    ) -> Vec<Alert> {
        let Some(budget) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        let period = period_name(period_start_ms);
        budget
            .thresholds
            .iter()
            .filter(|t| spent_micros as i128 * 100 >= budget.monthly_micros as i128 * **t as i128)
            .map(|t| Alert {
                id: alert_id(tenant, budget.monthly_micros, *t, &period),
                tenant: tenant.to_string(),
                kind: "budget_threshold".into(),
                period: period.clone(),
                threshold_percent: *t,
                budget_micros: budget.monthly_micros,
                spent_micros,
                raised_at_ms: now_ms,
                message: format!(
                    "{tenant} has spent {:.2} {currency} of its {:.2} {currency} budget for {period} ({t} % reached)",
                    spent_micros as f64 / 1e6,
                    budget.monthly_micros as f64 / 1e6,
                ),
            })
            .filter(|a| !raised.contains(&a.id))
            .collect()
    }
}

/// The id of the alert for (tenant, budget, threshold, period): 128 bits of SHA-256, so that
/// no tenant's name can make its alert's id another's (an alert whose id was seen is not
/// raised again).
pub fn alert_id(tenant: &str, budget_micros: i64, threshold: i32, period: &str) -> String {
    StrongId::new("alert")
        .str(tenant)
        .int(budget_micros)
        .int(threshold as i64)
        .str(period)
        .hex()
}

/// The start of the calendar month (UTC) holding `t_ms`.
pub fn month_start_ms(t_ms: i64) -> i64 {
    time::month_start(t_ms)
}

/// The start of the calendar month after the one holding `t_ms`.
pub fn next_month_start_ms(t_ms: i64) -> i64 {
    time::next_month_start(t_ms)
}

/// `YYYY-MM` of the month holding `t_ms`.
pub fn period_name(t_ms: i64) -> String {
    time::month_name(t_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-23T00:00:00Z.
    const NOV_23: i64 = 1_795_392_000_000;

    #[test]
    fn months_start_on_the_first_at_midnight_utc() {
        assert_eq!(month_start_ms(NOV_23), 1_793_491_200_000); // 2026-11-01
        assert_eq!(next_month_start_ms(NOV_23), 1_796_083_200_000); // 2026-12-01
        assert_eq!(period_name(NOV_23), "2026-11");
        assert_eq!(month_start_ms(0), 0);
        assert_eq!(period_name(0), "1970-01");
        // 2024-02-29 (leap day) is in February, and December rolls over the year.
        assert_eq!(period_name(1_709_164_800_000), "2024-02");
        assert_eq!(
            period_name(next_month_start_ms(1_798_675_200_000 - 1)),
            "2027-01"
        );
        // Every month of a few years: the next month's start is the end of this one.
        let mut t = 1_704_067_200_000; // 2024-01-01
        for _ in 0..48 {
            let next = next_month_start_ms(t);
            assert_eq!(month_start_ms(next - 1), t);
            assert!((28 * 86_400_000..=31 * 86_400_000).contains(&(next - t)));
            t = next;
        }
    }

    #[test]
    fn thresholds_raise_once_each_and_bad_files_name_the_key() {
        let budgets = Budgets::parse(
            "[tenants.acme]\nmonthly = 100.0\nthresholds = [90, 50, 100]\n",
            "b.toml",
        )
        .expect("valid");
        assert_eq!(budgets.tenants["acme"].thresholds, vec![50, 90, 100]);
        let mut raised = HashSet::new();
        let at = |spent: i64, raised: &HashSet<String>| {
            budgets
                .alerts("acme", NOV_23, spent, raised, 0, "USD")
                .into_iter()
                .map(|a| (a.threshold_percent, a.id))
                .collect::<Vec<_>>()
        };
        assert!(at(49_999_999, &raised).is_empty());
        let first = at(90_000_000, &raised);
        assert_eq!(
            first.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![50, 90]
        );
        raised.extend(first.into_iter().map(|(_, id)| id));
        assert!(at(95_000_000, &raised).is_empty(), "raised once");
        assert_eq!(at(100_000_000, &raised).len(), 1);
        assert!(
            budgets
                .alerts("globex", NOV_23, 1 << 40, &raised, 0, "USD")
                .is_empty()
        );

        let err =
            Budgets::parse("[tenants.acme]\nmonthly = -1.0\n", "b.toml").expect_err("negative");
        assert!(err.to_string().contains("tenants.acme.monthly"), "{err}");
        let err = Budgets::parse(
            "[tenants.acme]\nmonthly = 1.0\nthresholds = [0]\n",
            "b.toml",
        )
        .expect_err("zero");
        assert!(err.to_string().contains("tenants.acme.thresholds"), "{err}");
    }
}
