//! Any `from`, `to` and `over` query values: parsing never panics, an accepted range is
//! non-empty, an accepted duration is not negative and `over` stays within 1 minute to a day;
//! an AEP-43 time (Unix seconds or RFC 3339) is within 1970 to year 9999.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_guard::params::{
    LATEST_MS, over_ms, parse_duration_ms, time_range, unix_seconds_or_rfc3339,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\n').map(str::to_string);
    let (from, to, over) = (parts.next(), parts.next(), parts.next());
    if let Ok((f, t)) = time_range(&from, &to, 0, 1) {
        assert!(f < t, "{from:?}..{to:?} gave {f}..{t}");
    }
    if let Some(ms) = over.as_deref().and_then(parse_duration_ms) {
        assert!(ms >= 0);
    }
    for text in [&from, &to].into_iter().flatten() {
        if let Some(ms) = unix_seconds_or_rfc3339(text) {
            assert!((0..=LATEST_MS).contains(&ms), "{text:?} gave {ms}");
        }
    }
    if let Ok(ms) = over_ms(over.as_deref()) {
        assert!((60_000..=86_400_000).contains(&ms));
    }
});
