//! meshd's manifest parser on arbitrary text: no panic, and bounded time and memory (libFuzzer's
//! -rss_limit_mb / -timeout, set by `cargo xtask fuzz`) — a YAML alias bomb must be refused,
//! not expanded. Parsed files must also describe themselves without panicking (the names meshd
//! logs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = meshd::parse::parse_file("fuzz.yaml", text) {
        for r in &parsed.resources {
            let _ = r.describe();
        }
    }
});
