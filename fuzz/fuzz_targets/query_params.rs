//! Any `from`, `to` and `over` query values: parsing never panics, an accepted range is
//! non-empty, an accepted duration is not negative and `over` stays within 1 minute to a day.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_guard::params::{over_ms, parse_duration_ms, time_range};

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
    if let Ok(ms) = over_ms(over.as_deref()) {
        assert!((60_000..=86_400_000).contains(&ms));
    }
});
