//! `datafold-gateway audit`, run as a process over audit files written here: filters, the
//! table, `--json`, `--summary`, rotated and gzip siblings, and what it says about bad input.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use flate2::write::GzEncoder;
use serde_json::{json, Value};
use tempfile::TempDir;

/// One audit line in the gateway's format: a forwarded test start of data source 1 by `caller`,
/// with `changes` applied.
fn record(ts: &str, caller: &str, changes: Value) -> String {
    let mut record = json!({
        "ts": ts,
        "request_id": format!("req-{ts}"),
        "caller": caller,
        "peer": "10.0.0.7:51234",
        "method": "POST",
        "path": "/api/v1/data_sources/1/test",
        "route": "test_connection",
        "data_source_id": 1,
        "job_id": null,
        "status": 200,
        "outcome": "forwarded",
        "limit": null,
        "upstream_status": 200,
        "test_status": null,
        "test_steps": null,
        "duration_ms": 12.5,
    });
    for (field, value) in changes.as_object().expect("changes are an object") {
        record[field] = value.clone();
    }
    record.to_string()
}

fn start(ts: &str, caller: &str, data_source: i64, job: i64) -> String {
    record(
        ts,
        caller,
        json!({
            "path": format!("/api/v1/data_sources/{data_source}/test"),
            "data_source_id": data_source,
            "job_id": job,
        }),
    )
}

fn poll(ts: &str, caller: &str, data_source: i64, job: i64, test_status: &str) -> String {
    record(
        ts,
        caller,
        json!({
            "method": "GET",
            "path": format!("/api/v1/data_sources/test/{job}"),
            "route": "test_result",
            "data_source_id": data_source,
            "job_id": job,
            "test_status": test_status,
            "test_steps": {"connection": test_status},
        }),
    )
}

fn refused(ts: &str, caller: &str, data_source: i64, outcome: &str, status: u16) -> String {
    record(
        ts,
        caller,
        json!({
            "path": format!("/api/v1/data_sources/{data_source}/test"),
            "data_source_id": data_source,
            "status": status,
            "outcome": outcome,
            "limit": (outcome == "rate_limited").then_some("data_source"),
            "upstream_status": null,
            "duration_ms": 0.1,
        }),
    )
}

/// The trail: two days rotated away (the older one compressed), and today's live file.
struct Trail {
    dir: TempDir,
    oldest: Vec<String>,
    rotated: Vec<String>,
    live: Vec<String>,
}

impl Trail {
    fn new() -> Self {
        let oldest = vec![
            start("2026-11-29T10:00:00.000001Z", "alice", 1, 101),
            poll("2026-11-29T10:00:05Z", "alice", 1, 101, "processing"),
            poll("2026-11-29T10:00:10Z", "alice", 1, 101, "done"),
        ];
        let rotated = vec![
            start("2026-11-30T09:00:00Z", "bob", 2, 201),
            poll("2026-11-30T09:00:07Z", "bob", 2, 201, "failed"),
            refused("2026-11-30T09:05:00Z", "bob", 2, "rate_limited", 429),
        ];
        let live = vec![
            start("2026-12-01T08:00:00.250000Z", "alice", 1, 102),
            poll("2026-12-01T08:00:09Z", "alice", 1, 102, "cancelled"),
            // Datafold refused to start this one.
            record(
                "2026-12-01T08:30:00Z",
                "bob",
                json!({"status": 500, "upstream_status": 500}),
            ),
            refused("2026-12-01T09:00:00Z", "mallory", 2, "rejected", 403),
            start("2026-12-01T09:10:00Z", "alice", 2, 202),
            poll("2026-12-01T09:10:03Z", "alice", 2, 202, "processing"),
        ];
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        // Modification times, not names, say which is older: `.2.gz` sorts after `.1` by name.
        write_gzip(
            &dir.path().join("audit.jsonl.2.gz"),
            &oldest,
            now - 3 * hour,
        );
        write_plain(&dir.path().join("audit.jsonl.1"), &rotated, now - 2 * hour);
        write_plain(&dir.path().join("audit.jsonl"), &live, now);
        // Not a sibling: another file's rotation.
        write_plain(
            &dir.path().join("other.jsonl.1"),
            &[start("2026-12-01T10:00:00Z", "eve", 9, 999)],
            now,
        );
        Self {
            dir,
            oldest,
            rotated,
            live,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// Every record, oldest first.
    fn all(&self) -> Vec<&String> {
        self.oldest
            .iter()
            .chain(&self.rotated)
            .chain(&self.live)
            .collect()
    }

    fn audit(&self, args: &[&str]) -> Output {
        let file = self.file();
        let mut all = vec!["--file", file.to_str().unwrap()];
        all.extend_from_slice(args);
        audit(self.dir.path(), &all)
    }

    /// `--json` with `args`; the lines printed.
    fn json_lines(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let output = self.audit(&all);
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output).lines().map(String::from).collect()
    }

    /// The records, oldest first, for which `keep` holds.
    fn matching(&self, keep: impl Fn(&Value) -> bool) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|line| keep(&serde_json::from_str(line).unwrap()))
            .cloned()
            .collect()
    }
}

fn write_plain(path: &Path, lines: &[String], modified: SystemTime) {
    let mut file = File::create(path).unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
    file.set_modified(modified).unwrap();
}

fn write_gzip(path: &Path, lines: &[String], modified: SystemTime) {
    let mut gzip = GzEncoder::new(File::create(path).unwrap(), flate2::Compression::default());
    for line in lines {
        writeln!(gzip, "{line}").unwrap();
    }
    gzip.finish().unwrap().set_modified(modified).unwrap();
}

fn audit(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datafold-gateway"))
        .arg("audit")
        .args(args)
        .current_dir(dir)
        .env_remove("DATAFOLD_GATEWAY_CONFIG")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[test]
fn filters_by_data_source() {
    let trail = Trail::new();
    assert_eq!(
        trail.json_lines(&["--data-source", "2"]),
        trail.matching(|r| r["data_source_id"] == 2)
    );
}

#[test]
fn filters_by_caller() {
    let trail = Trail::new();
    let lines = trail.json_lines(&["--caller", "bob"]);
    assert_eq!(lines.len(), 4);
    assert_eq!(lines, trail.matching(|r| r["caller"] == "bob"));
}

#[test]
fn filters_by_outcome() {
    let trail = Trail::new();
    assert_eq!(
        trail.json_lines(&["--outcome", "rate_limited"]),
        [trail.rotated[2].clone()]
    );
    assert_eq!(
        trail.json_lines(&["--outcome", "rejected", "--caller", "alice"]),
        Vec::<String>::new()
    );
}

#[test]
fn since_and_until_take_rfc3339_times() {
    let trail = Trail::new();
    // --since is inclusive, --until exclusive.
    let lines = trail.json_lines(&[
        "--since",
        "2026-11-30T09:00:00Z",
        "--until",
        "2026-12-01T08:30:00Z",
    ]);
    let expected: Vec<String> = trail
        .rotated
        .iter()
        .chain(&trail.live[..2])
        .cloned()
        .collect();
    assert_eq!(lines, expected);
    assert_eq!(trail.json_lines(&["--since", "2026-12-01"]), trail.live);
}

#[test]
fn since_and_until_take_times_relative_to_now() {
    let dir = tempfile::tempdir().unwrap();
    let ago = |hours: u64| {
        let time = SystemTime::now() - Duration::from_secs(hours * 3600);
        humantime::format_rfc3339_micros(time).to_string()
    };
    let lines = [
        start(&ago(24 * 8), "alice", 1, 1),
        start(&ago(30), "alice", 1, 2),
        start(&ago(2), "alice", 1, 3),
    ];
    write_plain(&dir.path().join("audit.jsonl"), &lines, SystemTime::now());
    let json = |args: &[&str]| {
        let mut all = vec!["--file", "audit.jsonl", "--json"];
        all.extend_from_slice(args);
        let output = audit(dir.path(), &all);
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(json(&["--since", "24h"]), [lines[2].clone()]);
    assert_eq!(json(&["--since", "7d"]), lines[1..]);
    assert_eq!(json(&["--until", "90m", "--since", "2d"]), lines[1..]);
    assert_eq!(
        json(&["--until", "3h", "--since", "2d"]),
        [lines[1].clone()]
    );
}

#[test]
fn json_prints_exactly_the_matching_original_lines() {
    let trail = Trail::new();
    // Field order, spacing and fields the query does not know survive as written.
    let odd = r#"{"duration_ms":3.0, "ts":"2026-12-01T11:00:00Z","caller":"carol","data_source_id":7,"route":"test_connection","outcome":"forwarded","job_id":701,"new_field":{"x":[1,2]}}"#;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(trail.file())
        .unwrap();
    writeln!(file, "{odd}").unwrap();
    let output = trail.audit(&["--json", "--data-source", "7"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("{odd}\n"));
}

#[test]
fn rotated_and_gzip_siblings_are_read_oldest_first() {
    let trail = Trail::new();
    let expected: Vec<String> = trail.all().into_iter().cloned().collect();
    assert_eq!(trail.json_lines(&[]), expected);
}

#[test]
fn table_shows_time_caller_data_source_job_status_test_status_and_duration() {
    let trail = Trail::new();
    let output = trail.audit(&["--caller", "alice", "--data-source", "1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 1 + 5, "{text}");
    assert!(
        text.lines().next().unwrap().starts_with("time (UTC)"),
        "{text}"
    );
    assert_eq!(
        rows[3],
        [
            "2026-11-29",
            "10:00:10",
            "alice",
            "1",
            "101",
            "200",
            "forwarded",
            "done",
            "12.5",
            "ms"
        ]
    );
    assert_eq!(
        rows[4],
        [
            "2026-12-01",
            "08:00:00",
            "alice",
            "1",
            "102",
            "200",
            "forwarded",
            "-",
            "12.5",
            "ms"
        ]
    );
}

#[test]
fn summary_counts_per_data_source_and_caller() {
    let trail = Trail::new();
    let output = trail.audit(&["--summary"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect())
        .collect();
    // data source, caller, started, succeeded, failed, refused, last tested (date, time)
    assert_eq!(
        rows,
        [
            // 101 done; 102 cancelled.
            vec!["1", "alice", "2", "1", "1", "0", "2026-12-01", "08:00:00"],
            // Started, but Datafold answered 500.
            vec!["1", "bob", "0", "0", "1", "0", "-"],
            // 202 still processing.
            vec!["2", "alice", "1", "0", "0", "0", "2026-12-01", "09:10:00"],
            // 201 failed; one rate limited.
            vec!["2", "bob", "1", "0", "1", "1", "2026-11-30", "09:00:00"],
            vec!["2", "mallory", "0", "0", "0", "1", "-"],
        ],
        "{text}"
    );
    let header = text.lines().next().unwrap();
    for column in [
        "data source",
        "caller",
        "started",
        "succeeded",
        "failed",
        "refused",
        "last tested",
    ] {
        assert!(header.contains(column), "{header}");
    }
}

#[test]
fn summary_follows_the_filters() {
    let trail = Trail::new();
    let output = trail.audit(&["--summary", "--caller", "alice", "--since", "2026-12-01"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows: Vec<Vec<String>> = stdout(&output)
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().map(String::from).collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["1", "alice", "1", "0", "1", "0", "2026-12-01", "08:00:00"],
            ["2", "alice", "1", "0", "0", "0", "2026-12-01", "09:10:00"],
        ]
    );
}

#[test]
fn corrupt_line_is_reported_with_file_and_line_number_and_skipped() {
    let trail = Trail::new();
    let rotated = trail.dir.path().join("audit.jsonl.1");
    let modified = fs::metadata(&rotated).unwrap().modified().unwrap();
    let mut lines = trail.rotated.clone();
    lines.insert(1, "{\"ts\": \"2026-11-30T09:00:01Z\", \"caller\": ".into());
    lines.insert(3, json!({"caller": "bob", "data_source_id": 2}).to_string());
    write_plain(&rotated, &lines, modified);

    let output = trail.audit(&["--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let expected: Vec<String> = trail.all().into_iter().cloned().collect();
    assert_eq!(
        stdout(&output).lines().collect::<Vec<_>>(),
        expected,
        "the good lines are all there"
    );
    let err = stderr(&output);
    let name = rotated.display();
    assert!(
        err.contains(&format!("{name}:2: skipped, not JSON")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{name}:4: skipped, not an audit record")),
        "{err}"
    );
    assert!(err.contains("ts"), "{err}");
    assert_eq!(err.lines().count(), 2, "{err}");
}

#[test]
fn unknown_outcome_is_an_error_naming_the_flag() {
    let trail = Trail::new();
    let output = trail.audit(&["--outcome", "refused"]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("--outcome"), "{err}");
    for outcome in [
        "forwarded",
        "rejected",
        "rate_limited",
        "upstream_error",
        "aborted",
    ] {
        assert!(err.contains(outcome), "{err}");
    }
    assert!(output.stdout.is_empty());
}

#[test]
fn bad_time_is_an_error_naming_the_flag() {
    let trail = Trail::new();
    for (flag, value) in [
        ("--since", "yesterday"),
        ("--until", "2026-12-01T25:00:00Z"),
    ] {
        let output = trail.audit(&[flag, value]);
        assert!(!output.status.success());
        let err = stderr(&output);
        assert!(err.contains(flag) && err.contains("RFC 3339"), "{err}");
    }
    let output = trail.audit(&["--since", "1h", "--until", "2h"]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("--since") && err.contains("--until"), "{err}");
}

#[test]
fn missing_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.jsonl");
    let output = audit(dir.path(), &["--file", missing.to_str().unwrap()]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(output.stdout.is_empty());
}

#[test]
fn without_file_the_audit_file_comes_from_the_config() {
    let trail = Trail::new();
    let config = trail.dir.path().join("gateway.toml");
    fs::write(
        &config,
        format!("[audit]\nfile = {:?}\n", trail.file().to_str().unwrap()),
    )
    .unwrap();
    let output = audit(
        trail.dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--json",
            "--caller",
            "mallory",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("{}\n", trail.live[3]));

    // No config where the default says: the error says which, and how else to name the file.
    let output = audit(trail.dir.path(), &[]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("config/gateway.toml") && err.contains("--file"),
        "{err}"
    );
}
