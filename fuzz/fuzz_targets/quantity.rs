//! Any string as a pod spec's resource quantity: the parser never panics, what it accepts is
//! never negative, and rounding up to a coarser unit never gives less than to a finer one
//! (a thousandth of the millicores, rounded up, is the cores rounded up).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_guard::quantity::Quantity;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(q) = Quantity::parse(text) else {
        return;
    };
    let (fine, coarse) = (q.ceil(3), q.ceil(0));
    if let Some(f) = fine {
        assert!(f >= 0, "{text:?} → {f}");
        if let Some(c) = coarse {
            assert_eq!(c, (f + 999) / 1000, "{text:?}");
        }
    }
});
