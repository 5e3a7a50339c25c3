//! UTC timestamps without a calendar library: RFC 3339 in and out, calendar months.
//!
//! Civil-date arithmetic from Howard Hinnant's `days_from_civil` / `civil_from_days`.

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

const DAY_MS: i64 = 86_400_000;

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(DAY_MS), ms.rem_euclid(DAY_MS));
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    if !(0..=9999).contains(&y) {
        return format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z");
    }
    // Years 0 to 9999 (every time the API accepts): digits written straight into the 24
    // bytes, as an answer writes two per row.
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y);
    put(5, 2, m);
    put(8, 2, d);
    put(11, 2, h);
    put(14, 2, mi);
    put(17, 2, s);
    put(20, 3, milli);
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses milliseconds since the epoch, or an RFC 3339 time (`2026-11-23T10:00:00Z`, optional
/// fraction, `Z` or an offset such as `+02:00` or `-05:30`).
pub fn parse_time(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut milli = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &frac[..digits.min(3)]);
        milli = padded.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    // The offset: local time minus UTC.
    let offset_ms = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digit = |b: &u8| b.is_ascii_digit().then(|| i64::from(b - b'0'));
            let (oh, om) = (digit(h1)? * 10 + digit(h2)?, digit(m1)? * 10 + digit(m2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let ms = oh * 3_600_000 + om * 60_000;
            if *sign == b'-' { -ms } else { ms }
        }
        _ => return None,
    };
    Some(
        days_from_civil(y, m, d) * DAY_MS + h * 3_600_000 + mi * 60_000 + sec * 1000 + milli
            - offset_ms,
    )
}

/// Start of the calendar month (UTC) that contains `ms`.
pub fn month_start(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    days_from_civil(y, m, 1) * DAY_MS
}

/// `YYYY-MM` of the calendar month (UTC) that contains `ms`.
pub fn month_name(ms: i64) -> String {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    format!("{y:04}-{m:02}")
}

/// Start of the calendar month after the one that contains `ms`.
pub fn next_month_start(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * DAY_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_known_values() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_time("2026-11-23T10:00:00.5Z"),
            Some(1_795_428_000_500)
        );
        assert_eq!(
            format_rfc3339(1_795_428_000_500),
            "2026-11-23T10:00:00.500Z"
        );
        assert_eq!(
            parse_time("2024-02-29T23:59:59+00:00"),
            Some(1_709_251_199_000)
        );
        assert_eq!(parse_time("12345"), Some(12_345));
        assert_eq!(parse_time("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("yesterday"), None);
        // An offset is local time minus UTC: 02:00 at +02:00 is midnight UTC.
        assert_eq!(
            parse_time("2024-01-01T02:00:00+02:00"),
            parse_time("2024-01-01T00:00:00Z")
        );
        assert_eq!(
            parse_time("2023-12-31T18:30:00.250-05:30"),
            parse_time("2024-01-01T00:00:00.250Z")
        );
        assert_eq!(parse_time("2024-01-01T00:00:00+24:00"), None);
        assert_eq!(parse_time("2024-01-01T00:00:00+0200"), None);
        assert_eq!(parse_time("2024-01-01T00:00:00+02:00x"), None);
        for ms in [0, 1, 86_399_999, 951_782_400_000, 4_102_444_800_000] {
            assert_eq!(parse_time(&format_rfc3339(ms)), Some(ms));
        }
    }

    #[test]
    fn formats_every_digit_in_place_and_years_past_9999_in_full() {
        for (ms, text) in [
            (-1, "1969-12-31T23:59:59.999Z"),
            (0, "1970-01-01T00:00:00.000Z"),
            (1_796_083_199_001, "2026-11-30T23:59:59.001Z"),
            (1_767_225_610_250, "2026-01-01T00:00:10.250Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
            (253_402_300_800_000, "10000-01-01T00:00:00.000Z"),
        ] {
            assert_eq!(format_rfc3339(ms), text);
        }
    }

    #[test]
    fn months() {
        let t = parse_time("2024-02-15T12:00:00Z").expect("valid");
        assert_eq!(format_rfc3339(month_start(t)), "2024-02-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(next_month_start(t)),
            "2024-03-01T00:00:00.000Z"
        );
        let dec = parse_time("2025-12-31T23:59:59Z").expect("valid");
        assert_eq!(
            format_rfc3339(next_month_start(dec)),
            "2026-01-01T00:00:00.000Z"
        );
    }
}
