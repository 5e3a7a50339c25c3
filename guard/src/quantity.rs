//! Kubernetes resource quantities (`"500m"`, `"2"`, `"0.5"`, `"4Gi"`, `"1e9"`), as a pod spec's
//! `resources.requests` and `limits` carry them, read exactly.
//!
//! The grammar is the API's (`k8s.io/apimachinery/pkg/api/resource`):
//!
//! ```text
//! quantity ::= signedNumber suffix
//! number   ::= digits | digits "." digits | digits "." | "." digits
//! suffix   ::= binarySI (Ki Mi Gi Ti Pi Ei) | decimalSI (n u m "" k M G T P E)
//!            | ("e" | "E") signedNumber
//! ```
//!
//! A value is rounded *up* to the unit asked for, as Kubernetes' own `MilliValue()` and
//! `Value()` do (a request of `0.0001` cores is scheduled as `1m`). What Meterflow reads here is
//! never negative; a negative quantity, an unknown suffix, or a value beyond `i64` is refused.

/// A quantity as written: `digits × 10^exp10 × 2^exp2`, exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    digits: u128,
    exp10: i32,
    exp2: u32,
}

/// Why a quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Kubernetes quantity this reads ({1})")]
pub struct QuantityError(pub String, pub &'static str);

/// The most significant digits kept; more (which no API server writes) are refused.
const MAX_DIGITS: usize = 30;

impl Quantity {
    /// Reads a quantity string.
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let fail = |why| Err(QuantityError(text.chars().take(64).collect(), why));
        let body = text.strip_prefix('+').unwrap_or(text);
        if body.starts_with('-') {
            return fail("negative");
        }
        let number_end = body
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(body.len());
        let (number, suffix) = body.split_at(number_end);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return fail("no number");
        }
        if fraction.contains('.') {
            return fail("two decimal points");
        }
        let all: String = format!("{whole}{fraction}");
        let significant = all.trim_start_matches('0');
        if significant.len() > MAX_DIGITS {
            return fail("too many digits");
        }
        // At most 30 ASCII digits: always a u128.
        let digits: u128 = if significant.is_empty() {
            0
        } else {
            significant.parse().expect("at most 30 digits")
        };
        let mut exp10 = -(fraction.len() as i32);
        let mut exp2 = 0;
        match suffix {
            "" => {}
            "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
                let step = "KMGTPE".find(&suffix[..1]).expect("listed") as u32 + 1;
                exp2 = 10 * step;
            }
            "n" => exp10 -= 9,
            "u" => exp10 -= 6,
            "m" => exp10 -= 3,
            "k" => exp10 += 3,
            "M" => exp10 += 6,
            "G" => exp10 += 9,
            "T" => exp10 += 12,
            "P" => exp10 += 15,
            "E" => exp10 += 18,
            s if s.starts_with(['e', 'E']) => {
                let exponent = s[1..].strip_prefix('+').unwrap_or(&s[1..]);
                let negative = exponent.starts_with('-');
                let magnitude = exponent.strip_prefix('-').unwrap_or(exponent);
                if magnitude.is_empty()
                    || magnitude.len() > 3
                    || !magnitude.bytes().all(|b| b.is_ascii_digit())
                {
                    return fail("bad exponent");
                }
                let e: i32 = magnitude.parse().expect("at most three digits");
                exp10 += if negative { -e } else { e };
            }
            _ => return fail("unknown suffix"),
        }
        Ok(Self {
            digits,
            exp10,
            exp2,
        })
    }

    /// The quantity in units of `10^-decimals`, rounded up: `decimals = 3` gives millicores
    /// of a CPU quantity, `0` bytes of a memory one. `None` beyond `i64`.
    pub fn ceil(self, decimals: i32) -> Option<i64> {
        if self.digits == 0 {
            return Some(0);
        }
        let scaled = self.digits.checked_mul(1u128.checked_shl(self.exp2)?)?;
        let exp = self.exp10 + decimals;
        let value = if exp >= 0 {
            scaled.checked_mul(10u128.checked_pow(exp as u32)?)?
        } else {
            match 10u128.checked_pow((-exp) as u32) {
                Some(d) => scaled.div_ceil(d),
                // 10^39 and beyond exceed every u128: what remains is a positive fraction.
                None => 1,
            }
        };
        i64::try_from(value).ok()
    }
}

/// CPU quantity → millicores, rounded up.
pub fn millicores(text: &str) -> Result<i64, QuantityError> {
    Quantity::parse(text)?
        .ceil(3)
        .ok_or_else(|| QuantityError(text.chars().take(64).collect(), "too large"))
}

/// Memory (or any byte) quantity → bytes, rounded up.
pub fn bytes(text: &str) -> Result<i64, QuantityError> {
    Quantity::parse(text)?
        .ceil(0)
        .ok_or_else(|| QuantityError(text.chars().take(64).collect(), "too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_as_pod_specs_write_them() {
        for (text, millis) in [
            ("1", 1_000),
            ("8", 8_000),
            ("500m", 500),
            ("0.5", 500),
            ("1.5", 1_500),
            (".25", 250),
            ("2.", 2_000),
            ("+3", 3_000),
            ("100m", 100),
            // Finer than a millicore rounds up, as Kubernetes schedules it.
            ("0.0001", 1),
            ("1500u", 2),
            ("250000000n", 250),
            ("1e3", 1_000_000),
            ("0", 0),
            ("0m", 0),
        ] {
            assert_eq!(millicores(text), Ok(millis), "{text}");
        }
    }

    #[test]
    fn memory_quantities_as_pod_specs_write_them() {
        for (text, b) in [
            ("32Gi", 32 << 30),
            ("512Mi", 512 << 20),
            ("128974848", 128_974_848),
            ("129e6", 129_000_000),
            ("129E6", 129_000_000),
            ("129M", 129_000_000),
            ("123Mi", 123 << 20),
            ("1G", 1_000_000_000),
            ("1k", 1_000),
            ("1Ki", 1_024),
            ("1.5Gi", 3 << 29),
            ("2Ti", 2 << 40),
            ("1Ei", 1 << 60),
            // A fraction of a byte rounds up.
            ("1500m", 2),
            ("0.1", 1),
        ] {
            assert_eq!(bytes(text), Ok(b), "{text}");
        }
    }

    #[test]
    fn what_is_not_a_quantity_is_refused_with_a_reason() {
        for (text, why) in [
            ("", "no number"),
            ("Gi", "no number"),
            (".", "no number"),
            ("-1", "negative"),
            ("1.2.3", "two decimal points"),
            ("1gi", "unknown suffix"),
            ("1 Gi", "unknown suffix"),
            ("1KiB", "unknown suffix"),
            ("1e", "bad exponent"),
            ("1e1.5", "bad exponent"),
            ("1e9999", "bad exponent"),
            ("1234567890123456789012345678901", "too many digits"),
        ] {
            assert_eq!(Quantity::parse(text).map_err(|e| e.1), Err(why), "{text:?}");
        }
        assert_eq!(bytes("16Ei").map_err(|e| e.1), Err("too large"));
        assert_eq!(millicores("1e300").map_err(|e| e.1), Err("too large"));
        // Zeros ahead of the digits do not count against the limit, nor change the value.
        assert_eq!(bytes("000000000000000000000000000000001Gi"), Ok(1 << 30));
        assert_eq!(millicores("1e-300"), Ok(1));
    }
}
