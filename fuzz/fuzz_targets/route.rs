//! The route allow-list over arbitrary methods and paths: whatever it accepts has exactly one
//! of the two shapes with the right method, and re-parses from its upstream path to itself.
#![no_main]

use datafold_gateway::middleware::route::{match_route, Matched, Route};
use http::Method;
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "/api/v1/data_sources/";

/// Picked by the input's first byte; the rest of the input is the path.
const METHODS: [Method; 6] = [
    Method::POST,
    Method::GET,
    Method::PUT,
    Method::DELETE,
    Method::HEAD,
    Method::PATCH,
];

/// An optional sign, then ASCII digits only; its value if it fits an `i64`. Independent of
/// `str::parse`, which the parser uses. The same oracle as in `tests/it/properties.rs` (this crate
/// stands apart from the test suite): change both together.
fn integer_spelling(segment: &str) -> Option<i64> {
    let (negative, digits) = match segment.as_bytes().first()? {
        b'-' => (true, &segment[1..]),
        b'+' => (false, &segment[1..]),
        _ => (false, segment),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut value: i128 = 0;
    for digit in digits.bytes() {
        value = value * 10 + i128::from(digit - b'0');
        if value > 1 << 64 {
            return None;
        }
    }
    i64::try_from(if negative { -value } else { value }).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let method = &METHODS[usize::from(first) % METHODS.len()];
    let path = String::from_utf8_lossy(rest);
    let Matched::Route(route) = match_route(method, &path) else {
        return;
    };
    let segments: Vec<&str> = path
        .strip_prefix(PREFIX)
        .expect("an accepted path starts with the prefix")
        .split('/')
        .collect();
    match route {
        Route::TestConnection { data_source_id } => {
            assert_eq!(*method, Method::POST, "{path}");
            assert_eq!(segments.len(), 2, "{path}");
            assert_eq!(segments[1], "test", "{path}");
            assert_eq!(
                integer_spelling(segments[0]),
                Some(data_source_id),
                "{path}"
            );
        }
        Route::TestResult { job_id } => {
            assert_eq!(*method, Method::GET, "{path}");
            assert_eq!(segments.len(), 2, "{path}");
            assert_eq!(segments[0], "test", "{path}");
            assert_eq!(integer_spelling(segments[1]), Some(job_id), "{path}");
        }
    }
    let upstream = route.upstream_path();
    assert_eq!(
        match_route(method, &upstream),
        Matched::Route(route),
        "{path} went upstream as {upstream}"
    );
    assert!(
        !upstream.contains("..") && !upstream.contains('%') && !upstream.contains("//"),
        "{path} went upstream as {upstream}"
    );
});
