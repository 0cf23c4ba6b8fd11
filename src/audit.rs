//! The audit trail: one JSON line per request the main listener answers.
//!
//! Behind one Datafold key, this file is the only record of which caller tested which data
//! source. A record is in the file (handed to the operating system) before its response is
//! released, so a SIGTERM, or even a crash of the gateway, loses nothing that a caller saw. The
//! writing happens on a thread of its own that batches whatever records are waiting into one
//! `write`, so request tasks never block on disk I/O; they only wait for the batch holding their
//! record to be written.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use prometheus_client::metrics::counter::Counter;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// What the gateway did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Forwarded,
    Rejected,
    RateLimited,
    UpstreamError,
    /// Cut off before an answer: by shutdown, after `limits.shutdown_grace` (503), or by a
    /// failure inside the gateway (500).
    Aborted,
}

/// Which rate limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Global,
    Caller,
    DataSource,
    /// The per-peer limit on refusals of requests without valid credentials.
    Unauthenticated,
}

/// What the layers learned about a request, carried back to the audit layer in the response's
/// extensions. Each layer fills in its own part on the way out.
#[derive(Debug, Clone, Default)]
pub struct AuditFacts {
    pub caller: Option<Arc<str>>,
    /// The caller is named in the config (a token entry, `callers.allow`): its name may be a
    /// metric label.
    pub caller_listed: bool,
    pub route: Option<&'static str>,
    pub data_source_id: Option<i64>,
    pub job_id: Option<i64>,
    pub outcome: Option<Outcome>,
    pub limit: Option<Limit>,
    pub upstream_status: Option<u16>,
    /// A result poll's job status, as Datafold answered it (`done`, `failed`, ...).
    pub test_status: Option<Box<str>>,
    /// A result poll's per-step statuses.
    pub test_steps: Option<TestSteps>,
    /// Refused for want of credentials: the audit samples these (see `audit_sampling.rs`).
    pub stranger: bool,
}

/// The status of each step of a connection test, in Datafold's order; audited as an object,
/// `{"connection": "done", "temp_schema": "failed"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestSteps(pub Vec<(Box<str>, Box<str>)>);

impl Serialize for TestSteps {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (step, status) in &self.0 {
            map.serialize_entry(step, status)?;
        }
        map.end()
    }
}

impl AuditFacts {
    pub fn outcome(outcome: Outcome) -> Self {
        Self {
            outcome: Some(outcome),
            ..Self::default()
        }
    }
}

/// One line of the audit file. Every field is always present, `null` where unknown, except
/// `path_truncated` (only when true) and `suppressed` (only on summary records, see
/// `audit_sampling.rs`).
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub ts: String,
    pub request_id: Option<&'a str>,
    pub caller: Option<&'a str>,
    pub peer: Option<&'a str>,
    pub method: Option<&'a str>,
    /// The request target as sent, without its query, cut to [`MAX_AUDITED_PATH`] bytes.
    pub path: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub path_truncated: bool,
    pub route: Option<&'static str>,
    pub data_source_id: Option<i64>,
    pub job_id: Option<i64>,
    pub status: u16,
    pub outcome: Outcome,
    pub limit: Option<Limit>,
    pub upstream_status: Option<u16>,
    pub test_status: Option<&'a str>,
    pub test_steps: Option<&'a TestSteps>,
    pub duration_ms: f64,
    /// On a summary record: how many refusals it stands for, none of them written alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

/// The most of a request's path an audit record keeps. Forwarded paths are far shorter; a
/// refused one may be anything a client sends (up to the 64 KiB head).
pub const MAX_AUDITED_PATH: usize = 256;

impl Record<'_> {
    /// A record with nothing known, to fill in with struct update syntax.
    pub fn empty() -> Self {
        Self {
            ts: String::new(),
            request_id: None,
            caller: None,
            peer: None,
            method: None,
            path: None,
            path_truncated: false,
            route: None,
            data_source_id: None,
            job_id: None,
            status: 0,
            outcome: Outcome::Rejected,
            limit: None,
            upstream_status: None,
            test_status: None,
            test_steps: None,
            duration_ms: 0.0,
            suppressed: None,
        }
    }
}

/// `path` cut to at most [`MAX_AUDITED_PATH`] bytes (on a character boundary), and whether it
/// was cut.
pub fn bounded_path(path: &str) -> (&str, bool) {
    if path.len() <= MAX_AUDITED_PATH {
        return (path, false);
    }
    let mut end = MAX_AUDITED_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    (&path[..end], true)
}

enum Message {
    Record {
        line: Vec<u8>,
        written: oneshot::Sender<bool>,
    },
    /// Open the file at the configured path again (after logrotate moved it away).
    Reopen(oneshot::Sender<Result<(), String>>),
    /// Find out, without writing a record, whether the file takes writes again.
    Probe(oneshot::Sender<bool>),
    Close(oneshot::Sender<()>),
}

/// Handle to the audit writer; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<Message>,
    healthy: Arc<AtomicBool>,
}

/// How the writer writes, besides the file.
#[derive(Debug, Clone, Default)]
pub struct WriterOptions {
    /// Each record also goes to stdout.
    pub stdout: bool,
    /// Counts records that could not be written.
    pub errors: Counter,
}

/// A batch is written once it holds this much, even if more records are waiting.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Room the readiness probe asks for: a few records.
const PROBE_BYTES: usize = 4096;

impl AuditLog {
    /// Opens (creating if needed) the audit file for appending and starts the writer thread.
    pub fn open(path: &Path, options: WriterOptions) -> Result<Self, AuditError> {
        let file = open_append(path).map_err(|e| AuditError {
            path: path.to_owned(),
            source: e,
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let stdout = if options.stdout {
            Some(stdout_writer().map_err(|e| AuditError {
                path: path.to_owned(),
                source: e,
            })?)
        } else {
            None
        };
        let writer = Writer {
            // A crash in the middle of a write may have left half a line.
            torn: !ends_a_line(&file),
            file,
            path: path.to_owned(),
            options,
            healthy: healthy.clone(),
            stdout,
        };
        thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError {
                path: path.to_owned(),
                source: e,
            })?;
        Ok(Self { tx, healthy })
    }

    /// Appends one record; returns once it is written to the file, `false` if it could not be.
    pub async fn append(&self, record: &Record<'_>) -> bool {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize an audit record");
                return false;
            }
        };
        line.push(b'\n');
        let (written, done) = oneshot::channel();
        if self.tx.send(Message::Record { line, written }).is_err() {
            tracing::error!("audit record dropped: the audit writer has already stopped");
            return false;
        }
        done.await.unwrap_or(false)
    }

    /// Whether the last write reached the file.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the file takes writes now (it asks the writer to find out, writing no record).
    pub async fn probe(&self) -> bool {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Message::Probe(reply)).is_err() {
            return false;
        }
        done.await.unwrap_or(false)
    }

    /// Opens the file at its path again; records queued before this call go to the old file,
    /// records after it to the new one. On failure the old file is kept.
    pub async fn reopen(&self) -> Result<(), String> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Message::Reopen(reply))
            .map_err(|_| "the audit writer has stopped".to_owned())?;
        done.await
            .unwrap_or_else(|_| Err("the audit writer has stopped".to_owned()))
    }

    /// Writes out what is queued, syncs the file to disk and stops the writer.
    pub async fn close(&self) {
        let (closed, done) = oneshot::channel();
        if self.tx.send(Message::Close(closed)).is_ok() {
            let _ = done.await;
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    // Readable too, to look at how the file ends after a failed write.
    options.append(true).create(true).read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    options.open(path)
}

struct Writer {
    file: File,
    path: PathBuf,
    options: WriterOptions,
    healthy: Arc<AtomicBool>,
    /// The last write failed part-way and may have left half a line: start the next on a line
    /// of its own, so that the half line does not swallow a good record.
    torn: bool,
    /// Batches for stdout, written by a thread of their own so that a stalled stdout pipe
    /// cannot hold up the file or the requests waiting on it.
    stdout: Option<std::sync::mpsc::SyncSender<Arc<[u8]>>>,
}

/// Whether `file` is empty or ends with a newline (also when it cannot be read, such as
/// `/dev/full`: nothing to mend there).
fn ends_a_line(file: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return true;
    };
    let mut last = [0u8];
    len == 0 || !matches!(file.read_at(&mut last, len - 1), Ok(1) if last[0] != b'\n')
}

/// Batches queued for stdout at most; past it they are dropped (and logged), not waited for.
const STDOUT_QUEUE: usize = 1024;

fn stdout_writer() -> io::Result<std::sync::mpsc::SyncSender<Arc<[u8]>>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<[u8]>>(STDOUT_QUEUE);
    thread::Builder::new()
        .name("audit-stdout".into())
        .spawn(move || {
            for batch in rx {
                let mut stdout = io::stdout().lock();
                if let Err(e) = stdout.write_all(&batch).and_then(|()| stdout.flush()) {
                    tracing::error!(error = %e, "cannot write audit records to stdout");
                }
            }
        })?;
    Ok(tx)
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Message>) {
        let mut batch = Vec::with_capacity(64 * 1024);
        let mut waiting = Vec::new();
        let mut closing = None;
        while closing.is_none() {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut next = Some(first);
            let mut reopen = None;
            let mut probe = None;
            while let Some(message) = next.take() {
                match message {
                    Message::Record { line, written } => {
                        batch.extend_from_slice(&line);
                        waiting.push(written);
                    }
                    Message::Reopen(reply) => {
                        reopen = Some(reply);
                        break;
                    }
                    Message::Probe(reply) => {
                        probe = Some(reply);
                        break;
                    }
                    Message::Close(done) => {
                        closing = Some(done);
                        break;
                    }
                }
                if batch.len() < MAX_BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !waiting.is_empty() {
                let ok = self.write(&batch, waiting.len());
                for written in waiting.drain(..) {
                    let _ = written.send(ok);
                }
                batch.clear();
            }
            if let Some(reply) = reopen {
                let _ = reply.send(self.reopen());
            }
            if let Some(reply) = probe {
                let _ = reply.send(self.probe());
            }
        }
        if let Err(e) = self.file.sync_all() {
            tracing::error!(file = %self.path.display(), error = %e, "cannot sync the audit file");
        }
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// Writes one batch of `records` records; `false` if the file did not take it.
    fn write(&mut self, batch: &[u8], records: usize) -> bool {
        let mut result = Ok(());
        if self.torn {
            result = self.file.write_all(b"\n");
        }
        let ok = match result.and_then(|()| self.file.write_all(batch)) {
            Ok(()) => true,
            Err(e) => {
                self.options.errors.inc_by(records as u64);
                tracing::error!(file = %self.path.display(), error = %e, records, "cannot write to the audit file");
                false
            }
        };
        // Only a failure can leave half a line; then look at how the file ends.
        self.torn = !ok && !ends_a_line(&self.file);
        self.healthy.store(ok, Ordering::Relaxed);
        if let Some(stdout) = &self.stdout {
            if stdout.try_send(Arc::from(batch)).is_err() {
                tracing::error!(
                    records,
                    "audit records not copied to stdout: it is not keeping up"
                );
            }
        }
        ok
    }

    /// Whether the file takes writes, found out without writing a record: a torn line is mended
    /// (a write it needs anyway), or else room for a few records is reserved past the end of the
    /// file without changing its size (`fallocate` with `FALLOC_FL_KEEP_SIZE`; the next appends
    /// use that room), which fails on a full disk or quota. On a file system without `fallocate`,
    /// the free space it reports decides. A file that is not a regular one (`/dev/full`, a pipe)
    /// cannot be asked: the next record decides, as before.
    fn probe(&mut self) -> bool {
        use std::os::fd::AsRawFd;
        if self.healthy.load(Ordering::Relaxed) {
            return true;
        }
        let ok = if self.torn {
            let ok = self.file.write_all(b"\n").is_ok();
            self.torn = !ok;
            ok
        } else {
            let fd = self.file.as_raw_fd();
            let end = self.file.metadata().map_or(0, |m| m.len());
            // SAFETY: a plain system call on a descriptor this writer owns; no memory is passed.
            let reserved = unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_KEEP_SIZE,
                    end as libc::off_t,
                    PROBE_BYTES as libc::off_t,
                )
            };
            if reserved == 0 {
                true
            } else if io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
                // SAFETY: fstatvfs fills the struct it is given on success, and only then is it read.
                let found = unsafe { libc::fstatvfs(fd, stats.as_mut_ptr()) } == 0;
                found && {
                    // SAFETY: initialised by the successful call above.
                    let stats = unsafe { stats.assume_init() };
                    stats.f_bavail.saturating_mul(stats.f_frsize) >= PROBE_BYTES as u64
                }
            } else {
                false
            }
        };
        if ok {
            tracing::info!(file = %self.path.display(), "the audit file takes writes again");
        }
        self.healthy.store(ok, Ordering::Relaxed);
        ok
    }

    fn reopen(&mut self) -> Result<(), String> {
        match open_append(&self.path) {
            Ok(file) => {
                if let Err(e) = self.file.sync_all() {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot sync the audit file being closed");
                }
                self.file = file;
                self.torn = !ends_a_line(&self.file);
                tracing::info!(file = %self.path.display(), "audit file reopened");
                Ok(())
            }
            Err(e) => {
                let message = format!(
                    "audit.file: cannot reopen {}: {e}; still writing to the file open before",
                    self.path.display()
                );
                tracing::error!("{message}");
                // Records still reach the file open before (which rotation moved away); counted
                // so that an alert on write errors sees that something is wrong.
                self.options.errors.inc();
                Err(message)
            }
        }
    }
}

/// The audit file cannot be opened.
#[derive(Debug)]
pub struct AuditError {
    pub path: PathBuf,
    pub source: io::Error,
}

impl std::fmt::Display for AuditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "audit.file: cannot open {} for appending: {}",
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for AuditError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: u16) -> Record<'static> {
        Record {
            ts: "2026-12-01T00:00:00Z".into(),
            request_id: Some("r1"),
            caller: Some("127.0.0.1"),
            peer: Some("127.0.0.1:5000"),
            method: Some("POST"),
            path: Some("/api/v1/data_sources/1/test"),
            route: Some("test_connection"),
            data_source_id: Some(1),
            status,
            outcome: Outcome::Forwarded,
            upstream_status: Some(status),
            duration_ms: 1.5,
            ..Record::empty()
        }
    }

    #[tokio::test]
    async fn record_is_in_the_file_when_append_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, WriterOptions::default()).unwrap();
        assert!(log.append(&record(200)).await);
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(value["status"], 200);
        assert_eq!(value["limit"], serde_json::Value::Null);
        log.close().await;
    }

    #[tokio::test]
    async fn concurrent_appends_each_get_one_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, WriterOptions::default()).unwrap();
        let tasks: Vec<_> = (0..200u16)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(&record(200 + i)).await })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap());
        }
        log.close().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let mut statuses: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["status"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        statuses.sort();
        assert_eq!(statuses, (200..400).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn reopen_moves_later_records_to_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, WriterOptions::default()).unwrap();
        assert!(log.append(&record(200)).await);
        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        assert!(log.append(&record(201)).await);
        log.reopen().await.unwrap();
        assert!(log.append(&record(202)).await);
        log.close().await;
        let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
        assert_eq!(lines(&rotated), 2);
        assert_eq!(lines(&path), 1);
    }

    #[tokio::test]
    async fn a_failed_write_is_counted_and_marks_the_log_unhealthy() {
        let options = WriterOptions::default();
        let errors = options.errors.clone();
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        let log = AuditLog::open(Path::new("/dev/full"), options).unwrap();
        assert!(log.is_healthy());
        assert!(!log.append(&record(200)).await);
        assert!(!log.is_healthy());
        assert_eq!(errors.get(), 1);
        log.close().await;
    }

    #[tokio::test]
    async fn a_half_written_line_does_not_swallow_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, WriterOptions::default()).unwrap();
        assert!(log.append(&record(200)).await);
        // As a write cut short by a full disk leaves it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"ts\":\"2026-")
            .unwrap();
        log.reopen().await.unwrap();
        assert!(log.append(&record(201)).await);
        log.close().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["status"], 201);
    }

    #[test]
    fn unwritable_path_names_the_file() {
        let err = AuditLog::open(
            Path::new("/nonexistent-dir/audit.jsonl"),
            WriterOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/audit.jsonl"));
    }
}
