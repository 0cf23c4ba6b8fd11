//! The config loader over arbitrary text: it never panics, its errors name the file, and a
//! config it loads prints (as `check-config` does) to text that loads again.
#![no_main]

use std::path::Path;

use datafold_gateway::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A config file that is not UTF-8 is refused by `Config::load` before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    match Config::parse(path, text) {
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.toml: "), "{shown}");
        }
        Ok(config) => {
            let printed = config.redacted_toml();
            if let Err(e) = Config::parse(path, &printed) {
                panic!("{text:?} loads but prints as {printed:?}, which does not: {e}");
            }
        }
    }
});
