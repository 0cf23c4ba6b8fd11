//! `datafold-gateway audit`: reads the audit trail (the file and its rotated siblings) and
//! answers who tested which data source, when, and with what result.
//!
//! The files read are the audit file itself and, in the same folder, every file whose name is
//! the audit file's name followed by `.` or `-` and something more: `audit.jsonl.1`,
//! `audit.jsonl.2.gz`, `audit.jsonl-20261201`, `audit.jsonl-20261201.gz` (logrotate's
//! numbered and dated styles). They are read oldest first, by modification time, the live file
//! last; names ending in `.gz` are decompressed on the fly. Everything is streamed a line at a
//! time, so the size of the trail does not matter. A line that is not an audit record (not JSON,
//! no `ts`) is reported on stderr with its file and line number and skipped.
//!
//! Filters (`--data-source`, `--caller`, `--since`, `--until`, `--outcome`) all have to match.
//! `--since` is inclusive and `--until` exclusive. The matching records are shown as a table,
//! as their original JSON lines (`--json`), or counted per data source and caller
//! (`--summary`):
//!
//! - **started**: test starts forwarded to Datafold that got a job id back.
//! - **succeeded** / **failed**: jobs whose latest polled `test_status` is `done`, or
//!   `failed` / `cancelled`; a job is counted for the data source and caller that started it
//!   (or, if its start is not among the matching records, that polled it). Test starts that
//!   Datafold answered with a non-2xx status also count as failed. Jobs still `processing` or
//!   never polled count as neither; neither do `upstream_error` and `aborted` requests, which
//!   say nothing about the data source (list them with `--outcome`).
//! - **refused**: requests the gateway answered itself, `rejected` or `rate_limited`.
//! - **last tested**: the time of the latest test start counted in *started*.
//!
//! `--verify` checks the trail's hash chain instead, over the same files: see `cli/verify.rs`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use flate2::read::MultiGzDecoder;
use serde::Deserialize;

use crate::audit::{Outcome, ROUTE_TEST_CONNECTION, ROUTE_TEST_RESULT};
use crate::config::Config;

/// Past this many, corrupt lines are only counted, so a damaged file cannot flood the terminal.
const MAX_REPORTED_CORRUPT_LINES: u64 = 100;

/// Options of the `audit` subcommand.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// The configuration file (TOML); only its `[audit] file` is used, and only without --file.
    #[arg(
        long,
        env = "DATAFOLD_GATEWAY_CONFIG",
        default_value = "config/gateway.toml"
    )]
    pub config: PathBuf,
    /// The audit file; rotated siblings beside it (`.1`, `.2.gz`, `-20261201`, ...) are read too.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Only records of this data source (`data_source_id`).
    #[arg(long, value_name = "N")]
    pub data_source: Option<i64>,
    /// Only records of this caller.
    #[arg(long, value_name = "NAME")]
    pub caller: Option<String>,
    /// Only records at or after TIME: RFC 3339 in UTC (`2026-12-01T00:00:00Z`, `2026-12-01`) or
    /// that long before now (`90m`, `24h`, `7d`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<SystemTime>,
    /// Only records before TIME; the same forms as --since.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<SystemTime>,
    /// Only records with this outcome.
    #[arg(long, value_name = "O", value_enum)]
    pub outcome: Option<Outcome>,
    /// Print the matching records as they are in the file, one JSON object a line (with
    /// --verify: the verdict as one JSON document).
    #[arg(long, conflicts_with = "summary")]
    pub json: bool,
    /// Count tests started, succeeded and failed, and requests refused, per data source and
    /// caller.
    #[arg(long)]
    pub summary: bool,
    /// Check the hash chain of the whole trail, oldest record first; exit 0 if every link holds,
    /// 1 naming the first broken one, 2 if the check could not be made.
    #[arg(
        long,
        conflicts_with_all = ["summary", "data_source", "caller", "since", "until", "outcome"]
    )]
    pub verify: bool,
    /// With --verify: the key of a keyed trail (`audit.integrity_key_file`). Give it once per
    /// key the trail may have been written with; a record holds under any of them.
    #[arg(long, value_name = "PATH", requires = "verify")]
    pub integrity_key_file: Vec<PathBuf>,
}

/// `--outcome` takes the outcomes the writer knows, spelled as records spell them.
impl clap::ValueEnum for Outcome {
    fn value_variants<'a>() -> &'a [Self] {
        &Outcome::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// Runs the query; the error names the file or flag at fault and what to do.
pub fn run(args: &AuditArgs) -> Result<(), String> {
    if args.verify {
        return super::verify::run(args);
    }
    if let (Some(since), Some(until)) = (args.since, args.until) {
        if since >= until {
            return Err(format!(
                "--since ({}) is not before --until ({})",
                humantime::format_rfc3339_seconds(since),
                humantime::format_rfc3339_seconds(until)
            ));
        }
    }
    let live = audit_file(args)?;
    let files = audit_files(&live)?;
    let filter = Filter {
        data_source: args.data_source,
        caller: args.caller.as_deref(),
        since: args.since,
        until: args.until,
        outcome: args.outcome,
    };
    let mut out = BufWriter::new(io::stdout().lock());
    let mut scan = Scan::new(&filter);
    let written = if args.json {
        scan.records(&files, |line, _| {
            out.write_all(line)?;
            out.write_all(b"\n")
        })
    } else if args.summary {
        let mut summary = Summary::default();
        scan.records(&files, |_, record| {
            summary.add(record);
            Ok(())
        })
        .and_then(|()| summary.print(&mut out))
    } else {
        writeln!(out, "{}", table_row(TABLE_HEADER.map(String::from)))
            .and_then(|()| scan.records(&files, |_, record| print_record(&mut out, record)))
    };
    match written.and_then(|()| out.flush()) {
        Ok(()) => {}
        // `audit ... | head` closing the pipe early is not a failure.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        Err(e) => return Err(format!("cannot write to standard output: {e}")),
    }
    scan.report_end();
    Ok(())
}

/// The audit file named by --file, or else by the configuration's `[audit] file`.
pub(super) fn audit_file(args: &AuditArgs) -> Result<PathBuf, String> {
    if let Some(file) = &args.file {
        return Ok(file.clone());
    }
    Config::load(&args.config)
        .map(|config| config.audit.file)
        .map_err(|e| {
            format!("cannot find the audit file through the configuration: {e}\n(name the audit file with --file PATH)")
        })
}

/// The live audit file's rotated siblings, oldest first, then the live file.
fn audit_files(live: &Path) -> Result<Vec<PathBuf>, String> {
    trail_files(live, false)
}

/// [`audit_files`]; with `strict`, a folder that cannot be listed is an error rather than a
/// warning and the live file alone (a check of the whole trail cannot leave files out).
pub(super) fn trail_files(live: &Path, strict: bool) -> Result<Vec<PathBuf>, String> {
    let not_readable =
        |why: String| format!("cannot read the audit file {}: {why}", live.display());
    let metadata = fs::metadata(live).map_err(|e| not_readable(e.to_string()))?;
    if !metadata.is_file() {
        return Err(not_readable("not a file".into()));
    }
    let Some(name) = live.file_name() else {
        return Err(not_readable("not a file".into()));
    };
    let folder = match live.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    let entries = match fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if strict => {
            return Err(format!(
                "cannot list {} for rotated audit files: {e}",
                folder.display()
            ))
        }
        Err(e) => {
            eprintln!(
                "warning: cannot list {} for rotated audit files ({e}); reading only {}",
                folder.display(),
                live.display()
            );
            return Ok(vec![live.to_owned()]);
        }
    };
    let mut rotated = Vec::new();
    for entry in entries.flatten() {
        if !is_rotated_sibling(
            name.as_encoded_bytes(),
            entry.file_name().as_encoded_bytes(),
        ) {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: a link to a rotated file is read like the file.
        match fs::metadata(&path) {
            Ok(metadata) if metadata.is_file() => {
                let modified = metadata.modified().unwrap_or(UNIX_EPOCH);
                rotated.push((modified, path));
            }
            _ => {}
        }
    }
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, path)| path).collect();
    files.push(live.to_owned());
    Ok(files)
}

/// `audit.jsonl.1`, `audit.jsonl-20261201.gz`, ... for `audit.jsonl`.
fn is_rotated_sibling(live: &[u8], candidate: &[u8]) -> bool {
    candidate.len() > live.len() + 1
        && candidate.starts_with(live)
        && matches!(candidate[live.len()], b'.' | b'-')
}

/// Parses `--since` / `--until`.
fn parse_time(text: &str) -> Result<SystemTime, String> {
    parse_time_at(text, SystemTime::now())
}

/// An RFC 3339 time in UTC, a bare date (its midnight, UTC), or a duration before `now`.
fn parse_time_at(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    let text = text.trim();
    let expected = "expected an RFC 3339 time in UTC (2026-12-01T00:00:00Z, 2026-12-01) or how long before now (90m, 24h, 7d)";
    if text.starts_with(|c: char| c.is_ascii_digit()) && text.contains('-') {
        let full;
        let timestamp = if text.len() == "2026-12-01".len() {
            full = format!("{text}T00:00:00Z");
            &full
        } else {
            text
        };
        return humantime::parse_rfc3339_weak(timestamp).map_err(|e| format!("{e}; {expected}"));
    }
    let ago = humantime::parse_duration(text).map_err(|e| format!("{e}; {expected}"))?;
    now.checked_sub(ago)
        .ok_or_else(|| format!("{text} before now is out of range; {expected}"))
}

/// Reads one audit line (without its newline) as the query does; the error says why it is not
/// an audit record. Public only for the fuzz target in `fuzz/`: the query itself is [`run`].
pub fn parse_line(line: &[u8]) -> Result<(), String> {
    Record::parse(line).map(|_| ())
}

/// The fields of an audit record ([`crate::audit::Record`]) that the query uses, owned and
/// each optional but `ts`, so that records of older versions, and summaries of suppressed
/// refusals, read as well. Fields the query does not use are ignored.
#[derive(Debug, Deserialize)]
struct Record {
    ts: String,
    #[serde(default)]
    caller: Option<String>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    data_source_id: Option<i64>,
    #[serde(default)]
    job_id: Option<i64>,
    #[serde(default)]
    status: Option<u16>,
    /// As written: an outcome this version does not know is still shown (see [`Record::outcome`]).
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default)]
    upstream_status: Option<u16>,
    #[serde(default)]
    test_status: Option<String>,
    #[serde(default)]
    duration_ms: Option<f64>,
    /// `ts`, parsed.
    #[serde(skip, default = "unix_epoch")]
    time: SystemTime,
}

fn unix_epoch() -> SystemTime {
    UNIX_EPOCH
}

impl Record {
    fn parse(line: &[u8]) -> Result<Self, String> {
        let mut record: Record = serde_json::from_slice(line).map_err(|e| {
            // The position inside the line adds nothing to the file's line number.
            let message = e.to_string();
            let message = message
                .rfind(" at line ")
                .map_or(&message[..], |at| &message[..at]);
            if e.is_data() {
                format!("not an audit record: {message}")
            } else {
                format!("not JSON: {message}")
            }
        })?;
        record.time = humantime::parse_rfc3339_weak(&record.ts)
            .map_err(|e| format!("not an audit record: ts is not an RFC 3339 time ({e})"))?;
        Ok(record)
    }

    /// The outcome, if it is one the writer of this version writes.
    fn outcome(&self) -> Option<Outcome> {
        self.outcome.as_deref().and_then(Outcome::from_name)
    }

    fn is_test_start(&self) -> bool {
        self.route.as_deref() == Some(ROUTE_TEST_CONNECTION)
    }

    fn is_result_poll(&self) -> bool {
        self.route.as_deref() == Some(ROUTE_TEST_RESULT)
    }
}

/// What a record has to match to be shown or counted.
struct Filter<'a> {
    data_source: Option<i64>,
    caller: Option<&'a str>,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
    outcome: Option<Outcome>,
}

impl Filter<'_> {
    fn matches(&self, record: &Record) -> bool {
        self.data_source
            .is_none_or(|id| record.data_source_id == Some(id))
            && self
                .caller
                .is_none_or(|caller| record.caller.as_deref() == Some(caller))
            && self.since.is_none_or(|since| record.time >= since)
            && self.until.is_none_or(|until| record.time < until)
            && self
                .outcome
                .is_none_or(|outcome| record.outcome() == Some(outcome))
    }
}

/// Reads the files line by line, handing each matching record on and reporting the lines that
/// are not records.
struct Scan<'a> {
    filter: &'a Filter<'a>,
    matched: u64,
    corrupt: u64,
}

impl<'a> Scan<'a> {
    fn new(filter: &'a Filter<'a>) -> Self {
        Self {
            filter,
            matched: 0,
            corrupt: 0,
        }
    }

    /// Calls `visit` with each matching record and its line (without the newline). Files that
    /// cannot be read are reported and skipped; only `visit`'s errors end the scan.
    fn records(
        &mut self,
        files: &[PathBuf],
        mut visit: impl FnMut(&[u8], &Record) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut line = Vec::with_capacity(1024);
        for path in files {
            let mut reader = match open_lines(path) {
                Ok(reader) => reader,
                Err(e) => {
                    eprintln!("warning: cannot read {}: {e}; skipped", path.display());
                    continue;
                }
            };
            let mut number: u64 = 0;
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) => break,
                    Ok(_) => number += 1,
                    Err(e) => {
                        eprintln!(
                            "warning: cannot read {} after line {number}: {e}; the rest of it is skipped",
                            path.display()
                        );
                        break;
                    }
                }
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                let text = text.strip_suffix(b"\r").unwrap_or(text);
                if text.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match Record::parse(text) {
                    Ok(record) if self.filter.matches(&record) => {
                        self.matched += 1;
                        visit(text, &record)?;
                    }
                    Ok(_) => {}
                    Err(why) => self.report_corrupt(path, number, &why),
                }
            }
        }
        Ok(())
    }

    fn report_corrupt(&mut self, path: &Path, number: u64, why: &str) {
        self.corrupt += 1;
        if self.corrupt <= MAX_REPORTED_CORRUPT_LINES {
            eprintln!(
                "warning: {}:{number}: skipped, {}",
                path.display(),
                printable(why)
            );
        }
    }

    /// What is worth knowing on stderr once everything is printed.
    fn report_end(&self) {
        if self.corrupt > MAX_REPORTED_CORRUPT_LINES {
            eprintln!(
                "warning: {} more lines that are not audit records were skipped",
                self.corrupt - MAX_REPORTED_CORRUPT_LINES
            );
        }
        if self.matched == 0 {
            eprintln!("no audit records match");
        }
    }
}

/// The lines of a file, decompressed if its name ends in `.gz`.
pub(super) fn open_lines(path: &Path) -> io::Result<Box<dyn BufRead>> {
    let file = File::open(path)?;
    const BUFFER: usize = 64 * 1024;
    if path.extension().is_some_and(|ext| ext == "gz") {
        // Multi-member: `cat a.gz b.gz` is one valid gzip file too.
        Ok(Box::new(BufReader::with_capacity(
            BUFFER,
            MultiGzDecoder::new(file),
        )))
    } else {
        Ok(Box::new(BufReader::with_capacity(BUFFER, file)))
    }
}

const TABLE_HEADER: [&str; 8] = [
    "time (UTC)",
    "caller",
    "data source",
    "job",
    "status",
    "outcome",
    "test status",
    "duration",
];

/// Widths are fixed, not measured, so that records print as they are read.
const TABLE_WIDTHS: [usize; 8] = [19, 16, 11, 10, 6, 14, 11, 0];

fn table_row(cells: [String; 8]) -> String {
    let mut row = String::new();
    for (cell, width) in cells.iter().zip(TABLE_WIDTHS) {
        let _ = write!(row, "{cell:<width$}  ");
    }
    row.trim_end().to_owned()
}

fn print_record(out: &mut impl Write, record: &Record) -> io::Result<()> {
    let cells = [
        utc_seconds(record.time),
        or_dash(record.caller.as_deref()),
        or_dash(record.data_source_id),
        or_dash(record.job_id),
        or_dash(record.status),
        or_dash(record.outcome.as_deref()),
        or_dash(record.test_status.as_deref()),
        record
            .duration_ms
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms")),
    ];
    writeln!(out, "{}", table_row(cells))
}

/// `2026-12-01 14:05:15`
fn utc_seconds(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.trim_end_matches('Z').replacen('T', " ", 1)
}

fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| printable(&v.to_string()))
}

/// A field as it can safely go to a terminal: control characters (a caller name comes from a
/// client certificate) are escaped rather than interpreted.
fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        text.to_owned()
    }
}

/// Who a summary row is about.
type Key = (Option<i64>, Option<String>);

#[derive(Debug, Default)]
struct Tally {
    started: u64,
    succeeded: u64,
    failed: u64,
    refused: u64,
    last_tested: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Succeeded,
    Failed,
    Unfinished,
}

impl Verdict {
    fn of(test_status: &str) -> Self {
        match test_status {
            "done" => Self::Succeeded,
            "failed" | "cancelled" => Self::Failed,
            _ => Self::Unfinished,
        }
    }
}

/// A connection test job, by the row it is counted in.
#[derive(Debug)]
struct Job {
    row: usize,
    /// The latest poll's verdict, and when it was polled.
    latest: Option<(SystemTime, Verdict)>,
}

/// Counts per data source and caller. Rows are kept in a list and jobs point at theirs by
/// index, so a job costs a few words whatever the caller's name.
#[derive(Debug, Default)]
struct Summary {
    rows: Vec<(Key, Tally)>,
    index: HashMap<Key, usize>,
    jobs: HashMap<i64, Job>,
}

impl Summary {
    fn row(&mut self, record: &Record) -> usize {
        let key = (record.data_source_id, record.caller.clone());
        if let Some(&row) = self.index.get(&key) {
            return row;
        }
        self.rows.push((key.clone(), Tally::default()));
        self.index.insert(key, self.rows.len() - 1);
        self.rows.len() - 1
    }

    fn add(&mut self, record: &Record) {
        if matches!(
            record.outcome(),
            Some(Outcome::Rejected | Outcome::RateLimited)
        ) {
            let row = self.row(record);
            self.rows[row].1.refused += 1;
            return;
        }
        if record.is_test_start() {
            let answered_non_2xx = record
                .upstream_status
                .is_some_and(|status| !(200..300).contains(&status));
            if answered_non_2xx {
                let row = self.row(record);
                self.rows[row].1.failed += 1;
            } else if let (Some(Outcome::Forwarded), Some(job_id)) =
                (record.outcome(), record.job_id)
            {
                let row = self.row(record);
                let tally = &mut self.rows[row].1;
                tally.started += 1;
                tally.last_tested = tally.last_tested.max(Some(record.time));
                // The starter owns the job, even if someone else polled it first.
                self.jobs
                    .entry(job_id)
                    .and_modify(|job| job.row = row)
                    .or_insert(Job { row, latest: None });
            }
        } else if record.is_result_poll() {
            let (Some(job_id), Some(status)) = (record.job_id, record.test_status.as_deref())
            else {
                return;
            };
            let verdict = Verdict::of(status);
            let job = match self.jobs.get_mut(&job_id) {
                Some(job) => job,
                None => {
                    let row = self.row(record);
                    self.jobs.entry(job_id).or_insert(Job { row, latest: None })
                }
            };
            if job.latest.is_none_or(|(at, _)| record.time >= at) {
                job.latest = Some((record.time, verdict));
            }
        }
    }

    fn print(mut self, out: &mut impl Write) -> io::Result<()> {
        for job in self.jobs.values() {
            let tally = &mut self.rows[job.row].1;
            match job.latest.map(|(_, verdict)| verdict) {
                Some(Verdict::Succeeded) => tally.succeeded += 1,
                Some(Verdict::Failed) => tally.failed += 1,
                Some(Verdict::Unfinished) | None => {}
            }
        }
        self.rows.sort_by(|(a, _), (b, _)| a.cmp(b));
        let header = [
            "data source",
            "caller",
            "started",
            "succeeded",
            "failed",
            "refused",
            "last tested (UTC)",
        ]
        .map(String::from);
        let lines: Vec<[String; 7]> = self
            .rows
            .iter()
            .map(|((data_source, caller), tally)| {
                [
                    or_dash(*data_source),
                    or_dash(caller.as_deref()),
                    tally.started.to_string(),
                    tally.succeeded.to_string(),
                    tally.failed.to_string(),
                    tally.refused.to_string(),
                    tally
                        .last_tested
                        .map_or_else(|| "-".to_owned(), utc_seconds),
                ]
            })
            .collect();
        let mut widths = header.clone().map(|cell| cell.chars().count());
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for line in std::iter::once(&header).chain(&lines) {
            let mut text = String::new();
            for (cell, width) in line.iter().zip(widths) {
                let _ = write!(text, "{cell:<width$}  ");
            }
            writeln!(out, "{}", text.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit;

    /// 2026-12-01T00:00:00Z
    const DEC_1: Duration = Duration::from_secs(1_796_083_200);

    #[test]
    fn rfc3339_times_and_bare_dates_are_utc() {
        let now = SystemTime::now();
        assert_eq!(
            parse_time_at("2026-12-01T00:00:00Z", now),
            Ok(UNIX_EPOCH + DEC_1)
        );
        assert_eq!(parse_time_at("2026-12-01", now), Ok(UNIX_EPOCH + DEC_1));
        assert_eq!(
            parse_time_at("2026-12-01 14:05:15.5", now),
            Ok(UNIX_EPOCH + DEC_1 + Duration::from_millis((14 * 3600 + 5 * 60 + 15) * 1000 + 500))
        );
    }

    #[test]
    fn durations_are_that_long_before_now() {
        let now = UNIX_EPOCH + DEC_1;
        let hour = Duration::from_secs(3600);
        assert_eq!(parse_time_at("24h", now), Ok(now - 24 * hour));
        assert_eq!(parse_time_at("7d", now), Ok(now - 7 * 24 * hour));
        assert_eq!(parse_time_at("90m", now), Ok(now - hour * 3 / 2));
    }

    #[test]
    fn unparseable_times_say_what_is_expected() {
        for bad in ["yesterday", "2026-13-01", "2026-12-01T00:00:00+02:00", ""] {
            let err = parse_time_at(bad, SystemTime::now()).unwrap_err();
            assert!(err.contains("RFC 3339"), "{bad}: {err}");
        }
    }

    #[test]
    fn rotated_siblings_are_the_name_then_a_dot_or_dash_and_more() {
        let live = b"audit.jsonl";
        for sibling in ["audit.jsonl.1", "audit.jsonl.2.gz", "audit.jsonl-20261201"] {
            assert!(is_rotated_sibling(live, sibling.as_bytes()), "{sibling}");
        }
        for other in [
            "audit.jsonl",
            "audit.jsonl.",
            "audit.jsonlx",
            "other.jsonl.1",
        ] {
            assert!(!is_rotated_sibling(live, other.as_bytes()), "{other}");
        }
    }

    /// A record as the writer puts it in the audit file (`serde_json`, as `audit/mod.rs` writes it).
    fn written(record: &audit::Record<'_>) -> Vec<u8> {
        serde_json::to_vec(record).expect("an audit record serializes")
    }

    #[test]
    fn a_written_record_reads_back_with_every_field_the_query_uses() {
        let steps = crate::datafold::TestSteps(vec![("connection".into(), "done".into())]);
        let record = audit::Record {
            ts: UNIX_EPOCH + DEC_1 + Duration::from_micros(1_500),
            request_id: Some("req-1"),
            caller: Some("alice"),
            peer: Some("10.0.0.7:51234"),
            method: Some("GET"),
            path: Some("/api/v1/data_sources/test/7"),
            path_truncated: true,
            route: Some(ROUTE_TEST_RESULT),
            data_source_id: Some(3),
            job_id: Some(7),
            status: 200,
            outcome: Outcome::Forwarded,
            limit: None,
            upstream_status: Some(200),
            test_status: Some("done"),
            test_steps: Some(&steps),
            duration_ms: 12.5,
            suppressed: None,
        };
        let read = Record::parse(&written(&record)).unwrap();
        assert_eq!(read.time, record.ts);
        assert_eq!(read.caller.as_deref(), record.caller);
        assert_eq!(read.route.as_deref(), record.route);
        assert!(read.is_result_poll() && !read.is_test_start());
        assert_eq!(read.data_source_id, record.data_source_id);
        assert_eq!(read.job_id, record.job_id);
        assert_eq!(read.status, Some(record.status));
        assert_eq!(read.outcome(), Some(record.outcome));
        assert_eq!(read.upstream_status, record.upstream_status);
        assert_eq!(read.test_status.as_deref(), record.test_status);
        assert_eq!(read.duration_ms, Some(record.duration_ms));
    }

    #[test]
    fn every_outcome_written_reads_back_as_itself_and_matches_its_filter() {
        for outcome in Outcome::ALL {
            let record = audit::Record {
                ts: UNIX_EPOCH + DEC_1,
                route: Some(ROUTE_TEST_CONNECTION),
                outcome,
                ..audit::Record::empty()
            };
            let read = Record::parse(&written(&record)).unwrap();
            assert_eq!(read.outcome(), Some(outcome));
            assert!(read.is_test_start());
            let filter = Filter {
                data_source: None,
                caller: None,
                since: None,
                until: None,
                outcome: Some(outcome),
            };
            assert!(filter.matches(&read), "{outcome:?}");
        }
    }

    #[test]
    fn a_summary_of_suppressed_refusals_reads_and_counts_as_refused() {
        // As `audit/sampling.rs` writes one: no caller, no route, a count of refusals.
        let record = audit::Record {
            ts: UNIX_EPOCH + DEC_1,
            peer: Some("10.0.0.7"),
            status: 429,
            outcome: Outcome::RateLimited,
            limit: Some(audit::Limit::Unauthenticated),
            suppressed: Some(40),
            duration_ms: 812.0,
            ..audit::Record::empty()
        };
        let read = Record::parse(&written(&record)).unwrap();
        assert_eq!(read.outcome(), Some(Outcome::RateLimited));
        let mut summary = Summary::default();
        summary.add(&read);
        assert_eq!(summary.rows.len(), 1);
        assert_eq!(summary.rows[0].1.refused, 1);
    }

    #[test]
    fn a_record_of_the_first_version_still_reads() {
        // Before `path_truncated`, `test_status`, `test_steps` and `suppressed` existed.
        let line = br#"{"ts":"2026-12-01T00:00:00.000123Z","request_id":null,"caller":"alice","peer":"10.0.0.7:51234","method":"POST","path":"/api/v1/data_sources/1/test","route":"test_connection","data_source_id":1,"job_id":5,"status":200,"outcome":"forwarded","limit":null,"upstream_status":200,"duration_ms":3.0}"#;
        let read = Record::parse(line).unwrap();
        assert!(read.is_test_start());
        assert_eq!(read.outcome(), Some(Outcome::Forwarded));
        assert_eq!(read.job_id, Some(5));
        assert_eq!(read.test_status, None);
    }

    #[test]
    fn an_outcome_this_version_does_not_know_is_shown_but_matches_no_filter() {
        let line = br#"{"ts":"2026-12-01T00:00:00Z","outcome":"timeout"}"#;
        let read = Record::parse(line).unwrap();
        assert_eq!(read.outcome(), None);
        let mut table = Vec::new();
        print_record(&mut table, &read).unwrap();
        assert!(String::from_utf8(table).unwrap().contains("timeout"));
    }

    #[test]
    fn the_route_layer_names_routes_as_the_reader_expects() {
        use crate::middleware::route::Route;
        let start = Route::TestConnection { data_source_id: 1 };
        let poll = Route::TestResult { job_id: 1 };
        assert_eq!(start.name(), ROUTE_TEST_CONNECTION);
        assert_eq!(poll.name(), ROUTE_TEST_RESULT);
    }

    #[test]
    fn control_characters_in_fields_are_escaped() {
        assert_eq!(printable("evil\u{1b}[2J"), "evil\\u{1b}[2J");
        assert_eq!(printable("alice"), "alice");
    }
}
