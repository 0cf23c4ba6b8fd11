//! The three small parsers the deployment tests read artifacts with: YAML lookups by dotted
//! path (Kubernetes manifests), Dockerfile instructions and `.dockerignore` patterns, and
//! systemd unit files. Each takes text and knows nothing of the files in `deploy/`; they parse
//! as much of each format as the shipped artifacts use, and fail loudly beyond that.

use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

// ---- YAML -------------------------------------------------------------------------------------

/// Every non-empty document of a multi-document YAML text; `source` names it in a failure.
pub fn yaml_documents(source: &str, text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).unwrap_or_else(|e| panic!("{source}: {e}")))
        .filter(|document| !document.is_null())
        .collect()
}

/// The value at a dotted path of mapping keys, if every step is there.
pub fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |value, key| value.get(key))
}

pub fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    lookup(value, path).unwrap_or_else(|| panic!("`{path}` is missing"))
}

pub fn str_at<'a>(value: &'a Value, path: &str) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string"))
}

pub fn int_at(value: &Value, path: &str) -> i64 {
    at(value, path)
        .as_i64()
        .unwrap_or_else(|| panic!("`{path}` is not an integer"))
}

pub fn list_at<'a>(value: &'a Value, path: &str) -> &'a [Value] {
    lookup(value, path)
        .map(|v| {
            v.as_sequence()
                .unwrap_or_else(|| panic!("`{path}` is not a list"))
                .as_slice()
        })
        .unwrap_or(&[])
}

pub fn is_true(value: &Value, path: &str) -> bool {
    lookup(value, path).and_then(Value::as_bool) == Some(true)
}

/// Whether a `matchLabels` selector is non-empty and every one of its labels is on `labels`.
pub fn selects(match_labels: &Value, labels: &Value) -> bool {
    let Some(wanted) = match_labels.as_mapping() else {
        return false;
    };
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A Kubernetes memory quantity (`32Mi`, `1Gi`, `128M`) in bytes.
pub fn memory_bytes(quantity: &str) -> u64 {
    let units = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    let (number, scale) = units
        .iter()
        .find_map(|(suffix, scale)| Some((quantity.strip_suffix(suffix)?, *scale)))
        .unwrap_or((quantity, 1));
    number
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("`{quantity}` is not a memory quantity"))
        * scale
}

// ---- Dockerfile -------------------------------------------------------------------------------

/// One Dockerfile instruction, continuation lines joined, in the stage (0-based) it belongs to.
pub struct Instruction {
    pub stage: usize,
    pub keyword: String,
    pub args: String,
}

/// A Dockerfile's instructions, comments dropped and continuation lines joined.
pub fn dockerfile(text: &str) -> Vec<Instruction> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(current.is_empty(), "the Dockerfile ends in a continuation");
    let mut stage = None;
    logical
        .into_iter()
        .map(|line| {
            let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let keyword = keyword.to_ascii_uppercase();
            if keyword == "FROM" {
                stage = Some(stage.map_or(0, |s| s + 1));
            }
            Instruction {
                stage: stage.expect("the Dockerfile starts with FROM"),
                keyword,
                args: args.trim().to_owned(),
            }
        })
        .collect()
}

/// The instructions of the last stage, the one the image runs.
pub fn final_stage(instructions: &[Instruction]) -> Vec<&Instruction> {
    let last = instructions.last().expect("an empty Dockerfile").stage;
    instructions.iter().filter(|i| i.stage == last).collect()
}

/// The words of an exec-form (`["a", "b"]`) or shell-form argument list.
pub fn docker_words(args: &str) -> Vec<String> {
    if args.starts_with('[') {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("`{args}`: {e}"))
    } else {
        args.split_whitespace().map(str::to_owned).collect()
    }
}

/// `COPY [--flag=value ...] source... dest`: its flags, sources and destination.
pub fn docker_copy(args: &str) -> (Vec<String>, Vec<String>, String) {
    let words = docker_words(args);
    let (flags, mut paths): (Vec<String>, Vec<String>) =
        words.into_iter().partition(|w| w.starts_with("--"));
    let dest = paths.pop().expect("COPY has a destination");
    (flags, paths, dest)
}

/// Whether a `.dockerignore` pattern list lets `path` (relative to the context) through: the
/// last pattern matching the path or one of its folders decides. Patterns are `*` globs per
/// path segment, optionally negated with `!`.
pub fn docker_context_admits(patterns: &[&str], path: &str) -> bool {
    let segment_matches = |pattern: &str, segment: &str| match pattern.split_once('*') {
        None => pattern == segment,
        Some((head, tail)) => {
            assert!(
                !tail.contains('*'),
                "pattern `{pattern}` is beyond this test"
            );
            segment.len() >= head.len() + tail.len()
                && segment.starts_with(head)
                && segment.ends_with(tail)
        }
    };
    let segments: Vec<&str> = path.split('/').collect();
    let mut admitted = true;
    for pattern in patterns {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, *pattern),
        };
        let parts: Vec<&str> = pattern.trim_matches('/').split('/').collect();
        let matches = parts.len() <= segments.len()
            && parts
                .iter()
                .zip(&segments)
                .all(|(p, s)| segment_matches(p, s));
        if matches {
            admitted = negated;
        }
    }
    admitted
}

// ---- systemd ----------------------------------------------------------------------------------

/// A unit file as (section, key, value) assignments, in order.
pub struct Unit {
    /// The unit file's name, for failures.
    source: String,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    /// Parses the unit file `text`; `source` names it in a failure.
    pub fn parse(source: &str, text: &str) -> Self {
        let mut section = String::new();
        let mut entries = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "continuation lines are beyond this test: {line}"
            );
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not an assignment: {line}"));
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        }
        Self {
            source: source.to_owned(),
            entries,
        }
    }

    /// Every value assigned to `key` in [Service], in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The effective value of a single-valued [Service] key: its last assignment.
    pub fn get(&self, key: &str) -> &str {
        self.all(key)
            .last()
            .copied()
            .unwrap_or_else(|| panic!("{}: no {key}=", self.source))
    }
}

/// A systemd time span: bare seconds or humantime units (`45s`, `1min 30s`).
pub fn systemd_span(value: &str) -> Duration {
    match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(value)
            .unwrap_or_else(|e| panic!("`{value}` is not a time span: {e}")),
    }
}

// The parsers' own checks: a parser that read the artifacts wrong would make the tests above
// pass or fail for the wrong reason.

#[test]
fn memory_quantities_are_read_in_binary_and_decimal_units() {
    assert_eq!(memory_bytes("32Mi"), 32 << 20);
    assert_eq!(memory_bytes("1Gi"), 1 << 30);
    assert_eq!(memory_bytes("128M"), 128_000_000);
    assert_eq!(memory_bytes("4096"), 4096);
}

#[test]
fn dockerfile_continuations_are_joined_and_stages_counted() {
    let text = "FROM rust AS build\n# a comment\nRUN cargo build \\\n    --release\n\nFROM distroless\nUSER 65532:65532\n";
    let instructions = dockerfile(text);
    let seen: Vec<_> = instructions
        .iter()
        // Words, not spacing: a joined line may keep the space before its backslash.
        .map(|i| (i.stage, i.keyword.as_str(), docker_words(&i.args).join(" ")))
        .collect();
    assert_eq!(
        seen,
        [
            (0, "FROM", "rust AS build".to_owned()),
            (0, "RUN", "cargo build --release".to_owned()),
            (1, "FROM", "distroless".to_owned()),
            (1, "USER", "65532:65532".to_owned()),
        ]
    );
    assert_eq!(final_stage(&instructions).len(), 2);
}

#[test]
fn docker_copy_splits_flags_sources_and_destination() {
    let (flags, sources, dest) = docker_copy("--chown=1:1 a.toml b.toml /etc/x/");
    assert_eq!(flags, ["--chown=1:1"]);
    assert_eq!(sources, ["a.toml", "b.toml"]);
    assert_eq!(dest, "/etc/x/");
    assert_eq!(
        docker_words(r#"["serve", "--config", "/c"]"#),
        ["serve", "--config", "/c"]
    );
}

#[test]
fn dockerignore_last_matching_pattern_decides() {
    let patterns = ["*", "!src", "!Cargo.*", "src/secret*"];
    assert!(docker_context_admits(&patterns, "src/main.rs"));
    assert!(docker_context_admits(&patterns, "Cargo.lock"));
    assert!(!docker_context_admits(&patterns, "target/debug/x"));
    assert!(!docker_context_admits(&patterns, "src/secret.key"));
}

#[test]
fn unit_files_are_read_per_section_and_spans_in_either_form() {
    let unit = Unit::parse(
        "test.service",
        "[Unit]\nDescription=x\n\n[Service]\n; a comment\nExecStart=/bin/a\nEnvironment=A=1\nEnvironment=B=2\nTimeoutStopSec=1min 30s\n",
    );
    assert_eq!(unit.all("Environment"), ["A=1", "B=2"]);
    assert_eq!(unit.get("ExecStart"), "/bin/a");
    assert!(unit.all("Description").is_empty(), "only [Service] is read");
    assert_eq!(
        systemd_span(unit.get("TimeoutStopSec")),
        Duration::from_secs(90)
    );
    assert_eq!(systemd_span("45"), Duration::from_secs(45));
}
