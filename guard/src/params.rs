//! The sink API's parameters from the outside: the identifiers in its paths (a tenant, a
//! lease) and the times and durations in its queries. Each check says what is wrong in words
//! a caller can act on.

use meterflow_schemas::time::parse_time;

/// The longest tenant or lease name a path may carry, in bytes (as the processor's limit on
/// identity values).
pub const MAX_IDENTIFIER_LEN: usize = 256;

/// A tenant or lease name from a path (already percent-decoded): 1 to
/// [`MAX_IDENTIFIER_LEN`] bytes without NUL (the view store's key separator) or another
/// control character. `what` names it in the error.
pub fn identifier(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_IDENTIFIER_LEN || value.chars().any(char::is_control) {
        return Err(format!(
            "{what} must be 1 to {MAX_IDENTIFIER_LEN} bytes without control characters"
        ));
    }
    Ok(())
}

/// A duration such as `90s`, `5m`, `1h`, `1d` or plain milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<i64> {
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
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms)
}

/// The `over` of a burn rate: 5 minutes when not given, from 1 minute to 24 hours.
pub fn over_ms(over: Option<&str>) -> Result<i64, String> {
    match over.map(parse_duration_ms) {
        None => Ok(300_000),
        Some(Some(ms)) if (60_000..=86_400_000).contains(&ms) => Ok(ms),
        Some(_) => Err(format!(
            "over={:?} is not a duration from 1m to 24h",
            over.unwrap_or_default()
        )),
    }
}

/// A time as AEP-43's lease metrics route takes one, in milliseconds: Unix **seconds**
/// (`1795428000`, or with a fraction, `1795428000.25`) or RFC 3339 with any offset
/// (`2026-11-23T12:00:00+02:00`); from 1970 to the end of year 9999.
pub fn unix_seconds_or_rfc3339(s: &str) -> Option<i64> {
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    let ms = if !whole.is_empty()
        && whole.len() <= 12
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.len() <= 9
        && fraction.bytes().all(|b| b.is_ascii_digit())
        && !(s.contains('.') && fraction.is_empty())
    {
        let milli = format!("{:0<3}", &fraction[..fraction.len().min(3)]);
        whole.parse::<i64>().ok()? * 1_000 + milli.parse::<i64>().ok()?
    } else if s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    } else {
        parse_time(s)?
    };
    (0..=LATEST_MS).contains(&ms).then_some(ms)
}

/// The latest time an answer can say in RFC 3339 (four-digit years): 9999-12-31T23:59:59.999Z.
pub const LATEST_MS: i64 = 253_402_300_799_999;

/// The `from` and `to` query parameters (RFC 3339 UTC or milliseconds since the epoch, from
/// 1970 to the end of year 9999), with their defaults; on error, what is wrong and what to do.
pub fn time_range(
    from: &Option<String>,
    to: &Option<String>,
    default_from: i64,
    default_to: i64,
) -> Result<(i64, i64), (String, &'static str)> {
    let time = |v: &Option<String>, default: i64, name: &str| {
        match v {
        None => Ok(default),
        Some(s) => parse_time(s).filter(|ms| (0..=LATEST_MS).contains(ms)).ok_or_else(|| {
            (
                format!("{name}={s:?} is not a time"),
                "give RFC 3339 UTC (2026-11-23T10:00:00Z) or milliseconds since the epoch, from 1970 to year 9999",
            )
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_bounded_and_printable() {
        assert!(identifier("tenant", "akash1tenant").is_ok());
        assert!(identifier("lease", "100.1.1").is_ok());
        assert!(identifier("tenant", "ünïcödé tenant").is_ok());
        assert!(identifier("tenant", "").is_err());
        assert!(identifier("tenant", &"x".repeat(MAX_IDENTIFIER_LEN + 1)).is_err());
        assert!(
            identifier("tenant", "a\0b").is_err(),
            "the store's separator"
        );
        assert!(
            identifier("tenant", "a\nb").is_err(),
            "a line break in a log line"
        );
        // Path traversal is only a name here: it never reaches a file path.
        assert!(identifier("lease", "../../etc/passwd").is_ok());
    }

    #[test]
    fn durations_and_time_ranges() {
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("5m"), Some(300_000));
        assert_eq!(parse_duration_ms("1500"), Some(1_500));
        assert_eq!(parse_duration_ms("1d"), Some(86_400_000));
        assert_eq!(parse_duration_ms("1w"), None);
        assert_eq!(parse_duration_ms("99999999999999999h"), None, "overflow");
        assert_eq!(over_ms(None), Ok(300_000));
        assert!(over_ms(Some("30s")).is_err());
        assert_eq!(time_range(&None, &None, 1, 2), Ok((1, 2)));
        // 9999-12-31T23:59:59.999Z is the last time RFC 3339 writes; a millisecond later, or
        // before 1970, is no time the API can answer with.
        assert_eq!(
            time_range(&Some("0".into()), &Some("253402300799999".into()), 0, 0),
            Ok((0, 253_402_300_799_999))
        );
        assert!(time_range(&None, &Some("253402300800000".into()), 0, 0).is_err());
        assert!(time_range(&Some("-1".into()), &None, 0, 1).is_err());
        let r = time_range(
            &Some("2026-11-23T10:00:00Z".into()),
            &Some("1795392000000".into()),
            0,
            0,
        );
        assert!(r.is_err(), "from after to: {r:?}");
        assert!(time_range(&Some("yesterday".into()), &None, 0, 10).is_err());
    }

    #[test]
    fn aep_times_are_unix_seconds_or_rfc3339_with_any_offset() {
        // 2026-11-23T10:00:00Z, written four ways.
        const T: i64 = 1_795_428_000_000;
        assert_eq!(unix_seconds_or_rfc3339("1795428000"), Some(T));
        assert_eq!(unix_seconds_or_rfc3339("2026-11-23T10:00:00Z"), Some(T));
        assert_eq!(
            unix_seconds_or_rfc3339("2026-11-23T12:00:00+02:00"),
            Some(T)
        );
        assert_eq!(
            unix_seconds_or_rfc3339("2026-11-23T05:00:00-05:00"),
            Some(T)
        );
        assert_eq!(unix_seconds_or_rfc3339("1795428000.25"), Some(T + 250));
        assert_eq!(
            unix_seconds_or_rfc3339("1795428000.123456789"),
            Some(T + 123)
        );
        // Milliseconds by mistake (13 digits) would land in the year 58,000: refused, not
        // read as something else.
        assert_eq!(unix_seconds_or_rfc3339("1795428000000"), None);
        for bad in ["", ".5", "1795428000.", "-1", "1e9", "now", "2026-11-23"] {
            assert_eq!(unix_seconds_or_rfc3339(bad), None, "{bad:?}");
        }
    }
}
