//! Any text as a scraped exposition page: parsing never panics, and every line it accepts has
//! a name without whitespace or braces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_guard::exposition::parse_text;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(lines) = parse_text(text) {
        for line in lines {
            assert!(
                !line.name.contains(|c: char| c.is_whitespace() || c == '{' || c == '}'),
                "{line:?}"
            );
        }
    }
});
