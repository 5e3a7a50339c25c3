//! Any path segment as a tenant or lease name (after the router's percent-decoding): the
//! check never panics, and what it accepts is 1 to 256 bytes without control characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_guard::params::{MAX_IDENTIFIER_LEN, identifier};

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if identifier("lease", name).is_ok() {
        assert!(!name.is_empty() && name.len() <= MAX_IDENTIFIER_LEN);
        assert!(!name.chars().any(char::is_control), "{name:?}");
    }
});
