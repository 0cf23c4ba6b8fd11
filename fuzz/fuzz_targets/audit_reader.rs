//! One line of an audit file as `datafold-gateway audit` reads it: any bytes (a damaged or
//! hand-edited file) give a record or a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = datafold_gateway::cli::audit::parse_line(data) {
        assert!(
            why.starts_with("not JSON: ") || why.starts_with("not an audit record: "),
            "{why}"
        );
    }
});
