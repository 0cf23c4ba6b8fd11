//! Properties over generated input: the route allow-list accepts exactly the two endpoints and
//! maps each accepted spelling to one canonical upstream path; the header allow-lists let
//! through exactly their names, both ways, with every value; the config loader never panics,
//! and its errors always name the file. The fuzz targets in `fuzz/` check the same invariants
//! over much longer runs; these keep them in every `cargo test`.

use std::path::Path;

use datafold_gateway::config::Config;
use datafold_gateway::middleware::route::{match_route, Matched, Route};
use datafold_gateway::upstream::AllowedHeaders;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

const PREFIX: &str = "/api/v1/data_sources/";

/// Cheap cases (the route parser); a failure is a real bug, so nothing is persisted: the
/// shrunk input is in the failure message, to be turned into a unit test.
fn cheap() -> ProptestConfig {
    ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The config loader builds a tracing filter and more per case.
fn moderate() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Route parser

/// What paths are made of, including the spellings that must never reach Datafold.
const PATH_TOKENS: &[&str] = &[
    "/",
    "/",
    "/",
    ".",
    "..",
    "%",
    "%2f",
    "%2F",
    "%2e",
    "%5c",
    "%00",
    "api",
    "v1",
    "data_sources",
    "test",
    "test",
    "0",
    "1",
    "7",
    "9",
    "42",
    "00",
    "-",
    "+",
    "a",
    "f",
    "A",
    "F",
    "x",
    "z",
    " ",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
];

fn path_token() -> impl Strategy<Value = &'static str> {
    select(PATH_TOKENS)
}

/// An integer as a client may spell it: with a `+`, with leading zeros, or plainly.
fn spelled_id() -> impl Strategy<Value = (i64, String)> {
    let id = prop_oneof![any::<i64>(), -3i64..1000, Just(i64::MAX), Just(i64::MIN)];
    (id, 0usize..3, any::<bool>()).prop_map(|(id, zeros, plus)| {
        let digits = format!("{}{}", "0".repeat(zeros), id.unsigned_abs());
        let sign = match (id < 0, plus) {
            (true, _) => "-",
            (false, true) => "+",
            (false, false) => "",
        };
        (id, format!("{sign}{digits}"))
    })
}

/// A path of one of the two routes, possibly with the other route's method.
fn valid_path() -> impl Strategy<Value = String> {
    (spelled_id(), any::<bool>()).prop_map(|((_, id), starts)| {
        if starts {
            format!("{PREFIX}{id}/test")
        } else {
            format!("{PREFIX}test/{id}")
        }
    })
}

/// A valid path with a few tokens inserted or characters removed: the near misses.
fn mutated_path() -> impl Strategy<Value = String> {
    let edit = (any::<Index>(), path_token(), any::<bool>());
    (valid_path(), prop::collection::vec(edit, 1..4)).prop_map(|(mut path, edits)| {
        for (at, token, insert) in edits {
            // Every path here is ASCII, so every index is a char boundary.
            let at = at.index(path.len() + 1);
            if insert {
                path.insert_str(at, token);
            } else if at < path.len() {
                path.remove(at);
            }
        }
        path
    })
}

fn path() -> impl Strategy<Value = String> {
    let tokens = |n| prop::collection::vec(path_token(), 0..n).prop_map(|t| t.concat());
    prop_oneof![
        2 => tokens(16),
        2 => (select(&["", PREFIX, "/api/v1/data_sources/test/"][..]), tokens(8))
            .prop_map(|(start, rest)| format!("{start}{rest}")),
        3 => mutated_path(),
        3 => valid_path(),
    ]
}

/// Methods other than the two the routes use, standard and extension ones (`post` is not
/// `POST`: methods are case-sensitive).
fn other_method() -> impl Strategy<Value = Method> {
    let standard = select(vec![
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::TRACE,
        Method::CONNECT,
    ]);
    let extension = prop_oneof![
        select(&["post", "get", "Post", "GETS", "POST ", "PROPFIND"][..]).prop_map(String::from),
        prop::collection::vec(
            select(&['A', 'G', 'P', 'O', 'S', 'T', 'E', '-', '!'][..]),
            1..8
        )
        .prop_map(|c| c.into_iter().collect()),
    ]
    .prop_filter_map("not a method token", |name: String| {
        Method::from_bytes(name.as_bytes()).ok()
    })
    .prop_filter("a routed method", |m| {
        *m != Method::POST && *m != Method::GET
    });
    prop_oneof![standard, extension]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        2 => Just(Method::POST),
        2 => Just(Method::GET),
        1 => other_method(),
    ]
}

/// An optional sign, then ASCII digits only; its value if it fits an `i64`. Written apart from
/// `str::parse` so the parser is checked against an independent reading. The fuzz target
/// `fuzz/fuzz_targets/route.rs` has the same oracle: change both together.
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

/// The route a method and path should be, read off the two shapes directly.
fn expected_route(method: &Method, path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.strip_prefix(PREFIX)?.split('/').collect();
    match segments[..] {
        [id, "test"] if *method == Method::POST => {
            integer_spelling(id).map(|data_source_id| Route::TestConnection { data_source_id })
        }
        ["test", id] if *method == Method::GET => {
            integer_spelling(id).map(|job_id| Route::TestResult { job_id })
        }
        _ => None,
    }
}

fn accepted(matched: Matched) -> Option<Route> {
    match matched {
        Matched::Route(route) => Some(route),
        _ => None,
    }
}

/// The method a route is reached with.
fn method_of(route: Route) -> Method {
    match route {
        Route::TestConnection { .. } => Method::POST,
        Route::TestResult { .. } => Method::GET,
    }
}

proptest! {
    #![proptest_config(cheap())]

    #[test]
    fn only_the_two_route_shapes_are_accepted(method in method(), path in path()) {
        prop_assert_eq!(
            accepted(match_route(&method, &path)),
            expected_route(&method, &path),
            "{} {}", method, path
        );
    }

    #[test]
    fn accepted_paths_map_to_one_canonical_upstream_path(method in method(), path in path()) {
        if let Matched::Route(route) = match_route(&method, &path) {
            let upstream = route.upstream_path();
            prop_assert_eq!(match_route(&method, &upstream), Matched::Route(route), "{}", upstream);
            prop_assert!(
                !upstream.contains("..") && !upstream.contains('%') && !upstream.contains("//"),
                "{} {} went upstream as {}", method, path, upstream
            );
        }
    }

    #[test]
    fn any_i64_id_round_trips_in_any_spelling((id, spelled) in spelled_id()) {
        for (route, path) in [
            (Route::TestConnection { data_source_id: id }, format!("{PREFIX}{spelled}/test")),
            (Route::TestResult { job_id: id }, format!("{PREFIX}test/{spelled}")),
        ] {
            prop_assert_eq!(match_route(&method_of(route), &path), Matched::Route(route));
            prop_assert_eq!(
                match_route(&method_of(route), &route.upstream_path()),
                Matched::Route(route)
            );
        }
    }

    #[test]
    fn other_methods_never_reach_a_route(method in other_method(), path in path()) {
        prop_assert!(
            accepted(match_route(&method, &path)).is_none(),
            "{} {}", method, path
        );
    }

    #[test]
    fn arbitrary_unicode_paths_do_not_panic(
        start in select(&["", PREFIX, "/api/v1/data_sources/test/"][..]),
        rest in any::<String>(),
        end in select(&["", "/test", "/"][..]),
        method in method(),
    ) {
        let path = format!("{start}{rest}{end}");
        // The shapes are ASCII; the oracle checks that no other character gets a path through.
        prop_assert_eq!(accepted(match_route(&method, &path)), expected_route(&method, &path));
    }
}

/// The properties above say nothing if the generator never reaches an accepted path, or
/// reaches nothing else; this checks that it produces both routes and refusals, each often.
#[test]
fn path_generator_reaches_both_routes_and_refusals() {
    let mut runner = TestRunner::deterministic();
    let strategy = (method(), path());
    let (mut starts, mut results, mut refused) = (0, 0, 0);
    for _ in 0..2000 {
        let (method, path) = strategy.new_tree(&mut runner).unwrap().current();
        match match_route(&method, &path) {
            Matched::Route(Route::TestConnection { .. }) => starts += 1,
            Matched::Route(Route::TestResult { .. }) => results += 1,
            _ => refused += 1,
        }
    }
    assert!(
        starts > 50 && results > 50 && refused > 1000,
        "starts {starts}, results {results}, refused {refused}"
    );
}

// ---------------------------------------------------------------------------------------------
// Config loader

/// Sections with the keys their structs know (src/config/); `[[callers.token]]` and the three
/// rate limits are tables of their own.
const SECTIONS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "listen",
            "admin",
            "upstream",
            "api_key",
            "callers",
            "rate_limit",
            "audit",
            "log",
            "limits",
        ],
    ),
    ("[listen]", &["addr", "tls_cert", "tls_key", "client_ca"]),
    ("[admin]", &["addr"]),
    (
        "[upstream]",
        &["url", "ca_file", "connect_timeout", "timeout"],
    ),
    ("[api_key]", &["env", "file"]),
    (
        "[callers]",
        &[
            "mode",
            "allow",
            "share_results",
            "max_tracked_jobs",
            "token",
        ],
    ),
    ("[[callers.token]]", &["name", "sha256", "rate", "burst"]),
    (
        "[rate_limit]",
        &[
            "max_tracked_keys",
            "global",
            "per_caller",
            "per_data_source",
        ],
    ),
    ("[rate_limit.global]", &["rate", "burst"]),
    ("[rate_limit.per_caller]", &["rate", "burst"]),
    ("[rate_limit.per_data_source]", &["rate", "burst"]),
    ("[audit]", &["file", "stdout", "on_failure"]),
    ("[log]", &["format", "level"]),
    (
        "[limits]",
        &[
            "max_body_bytes",
            "header_read_timeout",
            "idle_timeout",
            "shutdown_grace",
            "max_concurrent_requests",
        ],
    ),
];

/// Values that mean something to some key, and some that are almost right.
const MEANINGFUL_STRINGS: &[&str] = &[
    "127.0.0.1:8080",
    "127.0.0.1:0",
    "[::1]:9090",
    "0.0.0.0:65535",
    "127.0.0.1:65536",
    "localhost:80",
    "https://app.datafold.com",
    "https://datafold.example.com:8443/datafold/",
    "http://app.datafold.com",
    "https://u:p@x.example",
    "https://x.example?q=1",
    "https://",
    "https://[::1]/",
    "10/s",
    "600/min",
    "1/h",
    "0/s",
    "4294967295/s",
    "1000000001/s",
    "5/day",
    "1 / min",
    "5s",
    "0s",
    "1ns",
    "24h",
    "25h",
    "86400s",
    "500000000000years",
    "18446744073709551616s",
    "open",
    "token",
    "mtls",
    "refuse",
    "continue",
    "json",
    "pretty",
    "info",
    "datafold_gateway=debug",
    "[[",
    "DATAFOLD_API_KEY",
    "_K1",
    "dfk_live_SECRET",
    "/run/secrets/key",
    "c.pem",
    "",
    "é",
    "\u{0}",
    "\u{1b}[2J",
    "  padded  ",
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
    "ÿa7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
];

/// Integers around the bounds src/config/ checks, and beyond what TOML's i64 holds.
const INTEGER_LITERALS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "65536",
    "1073741824",
    "1073741825",
    "1000000",
    "1000001",
    "100000000",
    "100000001",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",
    "18446744073709551616",
    "0x10",
    "0o7",
    "0b1",
    "1_000",
    "+5",
    "007",
];

/// A TOML basic string holding `text`, escaped so that it parses.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(MEANINGFUL_STRINGS).prop_map(toml_string),
        1 => any::<String>().prop_map(|s| toml_string(&s)),
        2 => select(INTEGER_LITERALS).prop_map(String::from),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => select(&["1.5", "-0.0", "nan", "inf", "1e400", "1979-05-27T07:32:00Z"][..]).prop_map(String::from),
    ]
}

fn value() -> impl Strategy<Value = String> {
    let array = prop::collection::vec(scalar(), 0..4).prop_map(|v| format!("[{}]", v.join(", ")));
    let table = prop::collection::vec(
        (
            select(&["rate", "burst", "env", "file", "name", "x"][..]),
            scalar(),
        ),
        0..3,
    )
    .prop_map(|kv| {
        let entries: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        format!("{{ {} }}", entries.join(", "))
    });
    prop_oneof![6 => scalar(), 2 => array, 1 => table]
}

/// One section: its header (none for the top level) and a few `key = value` lines, the keys
/// mostly its own, sometimes another section's, sometimes a typo.
fn section() -> impl Strategy<Value = String> {
    (
        select(SECTIONS),
        prop::collection::vec((any::<Index>(), 0u8..10, value()), 0..5),
    )
        .prop_map(|((header, keys), entries)| {
            let mut text = format!("{header}\n");
            for (index, pick, value) in entries {
                let key = match pick {
                    0 => "burts",
                    1 => {
                        let (_, other) = SECTIONS[index.index(SECTIONS.len())];
                        other[index.index(other.len())]
                    }
                    _ => keys[index.index(keys.len())],
                };
                text.push_str(&format!("{key} = {value}\n"));
            }
            text
        })
}

fn toml_document() -> impl Strategy<Value = String> {
    prop::collection::vec(section(), 0..8).prop_map(|sections| sections.concat())
}

fn file_name() -> impl Strategy<Value = &'static str> {
    select(
        &[
            "gateway.toml",
            "config/gateway.toml",
            "/etc/datafold gateway/é.toml",
            "g",
        ][..],
    )
}

/// Parses `text`; an error must start with the file's name, and a loaded config must print
/// (as `check-config` does) to text that loads back to the same printout.
fn check_parse(name: &str, text: &str) -> Result<(), TestCaseError> {
    match Config::parse(Path::new(name), text) {
        Err(e) => {
            let shown = e.to_string();
            prop_assert!(shown.starts_with(&format!("{name}: ")), "{}", shown);
        }
        Ok(config) => {
            let printed = config.redacted_toml();
            let again = Config::parse(Path::new(name), &printed);
            prop_assert!(
                again.is_ok(),
                "{}\nprinted as\n{}\ndoes not load: {:?}",
                text,
                printed,
                again.err()
            );
            prop_assert_eq!(again.unwrap().redacted_toml(), printed);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(moderate())]

    #[test]
    fn config_from_arbitrary_text_never_panics_and_errors_name_the_file(
        name in file_name(),
        text in any::<String>(),
    ) {
        check_parse(name, &text)?;
    }

    #[test]
    fn config_from_toml_like_documents_never_panics_and_errors_name_the_file(
        name in file_name(),
        text in toml_document(),
    ) {
        check_parse(name, &text)?;
    }
}

/// As for routes: the documents must get past TOML into validation, and some must load.
#[test]
fn toml_generator_reaches_validation_and_loaded_configs() {
    let mut runner = TestRunner::deterministic();
    let (mut loaded, mut refused_by_key) = (0, 0);
    for _ in 0..1000 {
        let text = toml_document().new_tree(&mut runner).unwrap().current();
        match Config::parse(Path::new("g"), &text) {
            Ok(_) => loaded += 1,
            Err(e) if e.key().is_some() => refused_by_key += 1,
            Err(_) => {}
        }
    }
    assert!(
        loaded > 50 && refused_by_key > 100,
        "loaded {loaded}, refused naming a key {refused_by_key}"
    );
}

// ---------------------------------------------------------------------------------------------
// Header allow-lists

/// What may reach Datafold, written out here rather than read from the code under test.
const TO_DATAFOLD: &[&str] = &[
    "authorization",
    "content-type",
    "accept",
    "user-agent",
    "x-request-id",
];

/// What may reach the caller, besides the `ratelimit-` and `x-ratelimit-` families.
const TO_CALLER: &[&str] = &[
    "ratelimit",
    "content-type",
    "content-encoding",
    "cache-control",
    "date",
    "retry-after",
    "vary",
];

/// Header names a client or an upstream might send: the allowed ones, the ones the issue names as
/// dangerous, lookalikes of the allowed ones, and the quota families.
const HEADER_NAMES: &[&str] = &[
    "authorization",
    "content-type",
    "accept",
    "user-agent",
    "x-request-id",
    "content-encoding",
    "cache-control",
    "date",
    "retry-after",
    "vary",
    "set-cookie",
    "cookie",
    "www-authenticate",
    "alt-svc",
    "strict-transport-security",
    "x-http-method-override",
    "x-original-url",
    "x-rewrite-url",
    "forwarded",
    "x-forwarded-for",
    "x_forwarded_for",
    "x-real-ip",
    "x-api-key",
    "connection",
    "transfer-encoding",
    "content-length",
    "host",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-limit",
    "ratelimit",
    "x-ratelimitx",
    "accept-encoding",
    "content-type2",
    "x-team",
];

fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        4 => select(HEADER_NAMES).prop_map(HeaderName::from_static),
        1 => "[a-z0-9_-]{1,24}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
    ]
}

fn header_map() -> impl Strategy<Value = HeaderMap> {
    proptest::collection::vec((header_name(), "[ -~]{0,16}"), 0..24).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name, HeaderValue::from_str(&value).unwrap());
        }
        map
    })
}

fn extra_names() -> impl Strategy<Value = Vec<HeaderName>> {
    proptest::collection::vec(
        select(&["x-team", "x-datafold-trace", "x-ratelimitx"][..]),
        0..3,
    )
    .prop_map(|names| names.into_iter().map(HeaderName::from_static).collect())
}

/// Checks one direction: only `allowed` names are kept, each with all its values in order, and
/// the dropped count accounts for every other value.
fn check_allow_list(
    list: &AllowedHeaders,
    allowed: impl Fn(&str) -> bool,
    headers: HeaderMap,
) -> Result<(), TestCaseError> {
    let total = headers.len();
    let (kept, dropped) = list.keep(headers.clone());
    prop_assert_eq!(kept.len() as u64 + dropped, total as u64);
    for name in kept.keys() {
        prop_assert!(allowed(name.as_str()), "{} crossed", name);
    }
    for name in headers.keys() {
        let before: Vec<_> = headers.get_all(name).iter().collect();
        let after: Vec<_> = kept.get_all(name).iter().collect();
        if allowed(name.as_str()) {
            prop_assert_eq!(before, after, "{} lost values", name);
        } else {
            prop_assert!(after.is_empty());
        }
    }
    // What is kept passes again untouched.
    let (again, none) = list.keep(kept.clone());
    prop_assert_eq!(none, 0);
    prop_assert_eq!(again, kept);
    Ok(())
}

fn wrapped(names: &[HeaderName]) -> Vec<datafold_gateway::config::HeaderName> {
    names
        .iter()
        .cloned()
        .map(datafold_gateway::config::HeaderName)
        .collect()
}

proptest! {
    #![proptest_config(cheap())]

    #[test]
    fn only_allowed_headers_reach_datafold(headers in header_map(), extra in extra_names()) {
        let list = AllowedHeaders::request(&wrapped(&extra));
        let allowed = |name: &str| TO_DATAFOLD.contains(&name) || extra.iter().any(|e| e == name);
        check_allow_list(&list, allowed, headers)?;
    }

    #[test]
    fn only_allowed_headers_reach_the_caller(headers in header_map(), extra in extra_names()) {
        let list = AllowedHeaders::response(&wrapped(&extra));
        let allowed = |name: &str| {
            TO_CALLER.contains(&name)
                || name.starts_with("ratelimit-")
                || name.starts_with("x-ratelimit-")
                || extra.iter().any(|e| e == name)
        };
        check_allow_list(&list, allowed, headers)?;
    }
}
