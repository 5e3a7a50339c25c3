//! The versioned price book, and the cost of a billed quantity.
//!
//! A price book is a TOML file:
//!
//! ```toml
//! version = "2026-11"          # stamped on every billing record priced with it
//! currency = "USD"
//! cpu_core_hour = 0.04         # per core-hour
//! memory_gib_hour = 0.005      # per GiB-hour of memory working set (observed time only)
//! kwh = 0.12                   # per kWh of GPU energy
//! cpu_core_hour_reserved = 0   # per core-hour requested (a container's spec, start to finish)
//! memory_gib_hour_reserved = 0 # per GiB-hour of memory requested
//!
//! [gpu_hour]                   # per GPU class, per hour of a whole GPU
//! h100 = 2.49
//! a100 = 1.29
//!
//! [mig_fraction]               # optional: a MIG profile's share of a whole GPU
//! "1g.10gb" = [1, 7]
//! ```
//!
//! A MIG profile not listed is priced by its compute slices, `<n>g.*` as n/7 of its class.
//! A provider that prices what a lease reserves rather than what it uses (as an Akash lease
//! is priced) sets the `_reserved` prices and leaves `cpu_core_hour` and `memory_gib_hour` at
//! 0; every item is on the billing stream with its quantity whatever its price.
//! Prices are held in millionths of the currency unit and costs are computed on integers, so
//! the same quantity always costs the same.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::model::{Aggregate, BillingKey};

/// Prices in millionths of the currency unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceBook {
    pub version: String,
    pub currency: String,
    /// Per GPU class, per hour of one whole GPU.
    pub gpu_hour_micros: BTreeMap<String, i64>,
    /// A MIG profile's share of a whole GPU, `(numerator, denominator)`.
    pub mig_fraction: BTreeMap<String, (i64, i64)>,
    pub cpu_core_hour_micros: i64,
    /// Per GiB-hour of memory.
    pub memory_gib_hour_micros: i64,
    /// Per kilowatt-hour of energy.
    pub kwh_micros: i64,
    /// Per core-hour of CPU requested.
    pub cpu_core_hour_reserved_micros: i64,
    /// Per GiB-hour of memory requested.
    pub memory_gib_hour_reserved_micros: i64,
}

impl Default for PriceBook {
    /// The demo's prices.
    fn default() -> Self {
        Self {
            version: "demo-2026-11".into(),
            currency: "USD".into(),
            gpu_hour_micros: BTreeMap::from([
                ("h100".into(), 2_490_000),
                ("a100".into(), 1_290_000),
                ("l40s".into(), 990_000),
            ]),
            mig_fraction: BTreeMap::new(),
            cpu_core_hour_micros: 40_000,
            memory_gib_hour_micros: 5_000,
            kwh_micros: 120_000,
            // The demo bills what is used; reservations are on the billing stream at 0.
            cpu_core_hour_reserved_micros: 0,
            memory_gib_hour_reserved_micros: 0,
        }
    }
}

/// A GPU class the price book has no price for: its GPU time is billed at 0, which is said
/// once per class (a warning naming what to add) and shown as
/// `meterflow_processor_unpriced_gpu_class{gpu_class}` = 1. An empty class is a GPU whose model
/// the agent never learnt.
fn unpriced(gpu_class: &str, version: &str) -> i64 {
    let gauge = crate::metrics::METRICS
        .unpriced_gpu_classes
        .with_label_values(&[gpu_class]);
    if gauge.get() == 0 {
        gauge.set(1);
        if gpu_class.is_empty() {
            tracing::warn!(price_book = %version, "GPU time of a GPU whose model is unknown (no NVML, no exporter naming it) is billed at 0; enable a source that names the GPU's model");
        } else {
            tracing::warn!(price_book = %version, gpu_class, "GPU time of a class the price book has no price for is billed at 0; add it under [gpu_hour]");
        }
    }
    0
}

/// Micros per unit of quantity, as a fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    numerator: i128,
    denominator: i128,
}

impl Rate {
    /// The cost in micros of `quantity`, rounded half away from zero.
    pub fn cost(&self, quantity: i64) -> i64 {
        if self.numerator == 0 {
            return 0;
        }
        let n = quantity as i128 * self.numerator;
        let d = self.denominator;
        ((n + n.signum() * d / 2) / d) as i64
    }
}

/// Why a price book was refused.
#[derive(Debug, thiserror::Error)]
pub enum PriceBookError {
    #[error("cannot read the price book {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("price book {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceBookFile {
    /// Stamped on every billing record priced with this book.
    version: String,
    /// ISO 4217 code of the prices.
    #[serde(default = "usd")]
    currency: String,
    /// Per core-hour of CPU time.
    #[serde(default)]
    cpu_core_hour: f64,
    /// Per GiB-hour of memory.
    #[serde(default)]
    memory_gib_hour: f64,
    /// Per kilowatt-hour of energy.
    #[serde(default)]
    kwh: f64,
    /// Per core-hour of CPU requested.
    #[serde(default)]
    cpu_core_hour_reserved: f64,
    /// Per GiB-hour of memory requested.
    #[serde(default)]
    memory_gib_hour_reserved: f64,
    /// Per GPU class, per hour of a whole GPU.
    #[serde(default)]
    gpu_hour: BTreeMap<String, f64>,
    /// A MIG profile's share of a whole GPU, as `[numerator, denominator]`.
    #[serde(default)]
    mig_fraction: BTreeMap<String, (i64, i64)>,
}

fn usd() -> String {
    "USD".into()
}

fn micros(key: &str, price: f64) -> Result<i64, String> {
    if !price.is_finite() || !(0.0..1e9).contains(&price) {
        return Err(format!(
            "{key} = {price}: a price is a non-negative number below 1e9"
        ));
    }
    Ok((price * 1e6).round() as i64)
}

impl PriceBook {
    /// Parses a price book from TOML; errors name the key.
    pub fn parse(text: &str, path: &str) -> Result<Self, PriceBookError> {
        let invalid = |message: String| PriceBookError::Invalid {
            path: path.to_string(),
            message,
        };
        let file: PriceBookFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if file.version.trim().is_empty() {
            return Err(invalid("`version` must not be empty".into()));
        }
        let mut gpu_hour_micros = BTreeMap::new();
        for (class, price) in &file.gpu_hour {
            gpu_hour_micros.insert(
                class.clone(),
                micros(&format!("gpu_hour.{class}"), *price).map_err(invalid)?,
            );
        }
        for (profile, (n, d)) in &file.mig_fraction {
            if *n <= 0 || *d <= 0 || n > d {
                return Err(invalid(format!(
                    "mig_fraction.\"{profile}\" = [{n}, {d}]: a share is [n, d] with 0 < n <= d"
                )));
            }
        }
        Ok(Self {
            version: file.version,
            currency: file.currency,
            gpu_hour_micros,
            mig_fraction: file.mig_fraction,
            cpu_core_hour_micros: micros("cpu_core_hour", file.cpu_core_hour).map_err(invalid)?,
            memory_gib_hour_micros: micros("memory_gib_hour", file.memory_gib_hour)
                .map_err(invalid)?,
            kwh_micros: micros("kwh", file.kwh).map_err(invalid)?,
            cpu_core_hour_reserved_micros: micros(
                "cpu_core_hour_reserved",
                file.cpu_core_hour_reserved,
            )
            .map_err(invalid)?,
            memory_gib_hour_reserved_micros: micros(
                "memory_gib_hour_reserved",
                file.memory_gib_hour_reserved,
            )
            .map_err(invalid)?,
        })
    }

    /// Reads and parses a price book file.
    pub fn load(path: &Path) -> Result<Self, PriceBookError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PriceBookError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// A MIG profile's share of a whole GPU: listed, else `<n>g.*` as n/7, else whole.
    pub fn fraction(&self, mig_profile: &str) -> (i64, i64) {
        if mig_profile.is_empty() {
            return (1, 1);
        }
        if let Some(f) = self.mig_fraction.get(mig_profile) {
            return *f;
        }
        mig_profile
            .split_once("g.")
            .and_then(|(n, _)| n.parse::<i64>().ok())
            .filter(|n| (1..=7).contains(n))
            .map_or((1, 1), |n| (n, 7))
    }

    /// The cost in micros of `quantity` of the key's item (at the aggregate's scale), rounded
    /// to the nearest micro. A GPU class without a price, and an aggregate that is not billed,
    /// cost nothing.
    pub fn cost_micros(&self, key: &BillingKey, quantity: i64) -> i64 {
        self.cost_of(key.metric, &key.gpu_class, &key.mig_profile, quantity)
    }

    /// The cost in micros of `quantity` of an aggregate (of a GPU class and MIG profile).
    pub fn cost_of(
        &self,
        metric: Aggregate,
        gpu_class: &str,
        mig_profile: &str,
        quantity: i64,
    ) -> i64 {
        self.rate(metric, gpu_class, mig_profile).cost(quantity)
    }

    /// The price of one unit of an aggregate (of a GPU class and MIG profile), to apply to
    /// many quantities.
    pub fn rate(&self, metric: Aggregate, gpu_class: &str, mig_profile: &str) -> Rate {
        let (price_per_hour, units_per_hour, (num, den)) = match metric {
            Aggregate::GpuSeconds => (
                self.gpu_hour_micros
                    .get(gpu_class)
                    .copied()
                    .unwrap_or_else(|| unpriced(gpu_class, &self.version)),
                3_600_000i128,
                self.fraction(mig_profile),
            ),
            Aggregate::CpuCoreSeconds => (self.cpu_core_hour_micros, 3_600_000_000, (1, 1)),
            Aggregate::CpuRequestSeconds => {
                (self.cpu_core_hour_reserved_micros, 3_600_000_000, (1, 1))
            }
            // Byte-seconds per GiB-hour.
            Aggregate::MemoryByteSeconds => (self.memory_gib_hour_micros, 3_600 << 30, (1, 1)),
            Aggregate::MemoryRequestByteSeconds => {
                (self.memory_gib_hour_reserved_micros, 3_600 << 30, (1, 1))
            }
            // Millijoules per kWh: a GPU board's and a container's host energy alike.
            Aggregate::EnergyJoules | Aggregate::HostEnergyJoules => {
                (self.kwh_micros, 3_600_000_000, (1, 1))
            }
            _ => (0, 1, (1, 1)),
        };
        Rate {
            numerator: price_per_hour as i128 * num as i128,
            denominator: units_per_hour * den as i128,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_class_without_a_price_is_billed_at_zero_and_said() {
        let book = PriceBook::default();
        let gauge = || {
            crate::metrics::METRICS
                .unpriced_gpu_classes
                .with_label_values(&["rtx-9090-test"])
                .get()
        };
        assert_eq!(gauge(), 0);
        assert_eq!(
            book.rate(Aggregate::GpuSeconds, "rtx-9090-test", "")
                .cost(3_600_000),
            0
        );
        assert_eq!(gauge(), 1, "shown on /metrics");
        assert_eq!(
            book.rate(Aggregate::GpuSeconds, "h100", "").cost(3_600_000),
            2_490_000
        );
    }

    fn gpu(class: &str, mig: &str) -> BillingKey {
        BillingKey {
            tenant: "t".into(),
            lease: "l".into(),
            metric: Aggregate::GpuSeconds,
            gpu_class: class.into(),
            mig_profile: mig.into(),
            window_start_ms: 0,
        }
    }

    #[test]
    fn an_hour_of_a_whole_gpu_costs_its_price_and_a_mig_slice_its_share() {
        let book = PriceBook::default();
        assert_eq!(book.cost_micros(&gpu("h100", ""), 3_600_000), 2_490_000);
        assert_eq!(
            book.cost_micros(&gpu("a100", "1g.10gb"), 7 * 3_600_000),
            1_290_000
        );
        assert_eq!(
            book.cost_micros(&gpu("a100", "3g.40gb"), 3_600_000),
            552_857
        );
        assert_eq!(book.cost_micros(&gpu("unknown", ""), 3_600_000), 0);
        let cpu = BillingKey {
            metric: Aggregate::CpuCoreSeconds,
            ..gpu("", "")
        };
        assert_eq!(book.cost_micros(&cpu, 3_600_000_000), 40_000);
        let memory = BillingKey {
            metric: Aggregate::MemoryByteSeconds,
            ..gpu("", "")
        };
        // 2 GiB for half an hour is one GiB-hour.
        assert_eq!(book.cost_micros(&memory, (2 << 30) * 1_800), 5_000);
        let energy = BillingKey {
            metric: Aggregate::EnergyJoules,
            ..gpu("", "")
        };
        // 3.6 MJ (in mJ) is one kWh.
        assert_eq!(book.cost_micros(&energy, 3_600_000_000), 120_000);
        let unpriced = BillingKey {
            metric: Aggregate::VramByteSeconds,
            ..gpu("", "")
        };
        assert_eq!(book.cost_micros(&unpriced, 1 << 40), 0);
    }

    #[test]
    fn a_price_book_file_is_read_and_bad_keys_are_named() {
        let book = PriceBook::parse(
            r#"
                version = "2026-11"
                cpu_core_hour = 0.05
                [gpu_hour]
                h100 = 3.10
                [mig_fraction]
                "1g.10gb" = [1, 8]
            "#,
            "prices.toml",
        )
        .expect("valid");
        assert_eq!(book.gpu_hour_micros["h100"], 3_100_000);
        assert_eq!(book.fraction("1g.10gb"), (1, 8));
        assert_eq!(book.fraction("2g.20gb"), (2, 7));
        assert_eq!(book.currency, "USD");

        let err = PriceBook::parse("version = \"v\"\n[gpu_hour]\nh100 = -1.0\n", "p.toml")
            .expect_err("negative");
        assert!(err.to_string().contains("gpu_hour.h100"), "{err}");
        let err = PriceBook::parse("version = \"v\"\ncolour = 1\n", "p.toml").expect_err("unknown");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn reserved_cores_and_memory_cost_their_own_prices() {
        let book = PriceBook::parse(
            "version = \"v\"\ncpu_core_hour_reserved = 0.03\nmemory_gib_hour_reserved = 0.004\n",
            "p.toml",
        )
        .expect("valid");
        // 500 millicores for 2 hours = 1 core-hour (3.6e9 millicore-ms): 0.03 = 30,000 micros.
        assert_eq!(
            book.cost_of(Aggregate::CpuRequestSeconds, "", "", 500 * 7_200_000),
            30_000
        );
        // 4 GiB for 30 minutes = 2 GiB-hours: 0.008 = 8,000 micros.
        assert_eq!(
            book.cost_of(
                Aggregate::MemoryRequestByteSeconds,
                "",
                "",
                (4 << 30) * 1_800
            ),
            8_000
        );
        // Usage prices are left at 0: what is used is on the stream, at no cost.
        assert_eq!(
            book.cost_of(Aggregate::CpuCoreSeconds, "", "", 3_600_000_000),
            0
        );
        assert_eq!(PriceBook::default().cpu_core_hour_reserved_micros, 0);
    }
}
