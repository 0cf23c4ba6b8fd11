//! The audit trail: one JSON line per request the main listener answers.
//!
//! Behind one Datafold key, this file is the only record of which caller tested which data
//! source. A record is in the file (handed to the operating system) before its response is
//! released, so a SIGTERM, or even a crash of the gateway, loses nothing that a caller saw.
//!
//! Each worker writes its own requests' records, in batches: group commit through an
//! [`AuditBatcher`], one `write` for all the records its event loop made in one turn, on the
//! worker's own thread. Requests wait for the batch holding their record, never for a thread
//! hop. Control work that may stall on a disk (reopen, probe, the final sync) runs on a
//! blocking thread instead.

pub mod chain;
pub mod sampling;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;

use serde::Serialize;

use crate::audit::chain::IntegrityKey;
use crate::datafold::TestSteps;
use tokio::sync::Notify;

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

impl Outcome {
    /// Every outcome, in the order `datafold-gateway audit --help` lists them. A new variant
    /// goes here as well as in [`Outcome::name`], where the compiler asks for it.
    pub const ALL: [Outcome; 5] = [
        Self::Forwarded,
        Self::Rejected,
        Self::RateLimited,
        Self::UpstreamError,
        Self::Aborted,
    ];

    /// The outcome as a record spells it (`rate_limited`): what serde writes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Rejected => "rejected",
            Self::RateLimited => "rate_limited",
            Self::UpstreamError => "upstream_error",
            Self::Aborted => "aborted",
        }
    }

    /// The outcome a record's `outcome` names, if it is one of ours.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|outcome| outcome.name() == name)
    }
}

/// A record's `route` for a test start, `POST /api/v1/data_sources/{id}/test`.
pub const ROUTE_TEST_CONNECTION: &str = "test_connection";
/// A record's `route` for a result poll, `GET /api/v1/data_sources/test/{job_id}`.
pub const ROUTE_TEST_RESULT: &str = "test_result";

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
    /// Refused for want of credentials: the audit samples these (see `audit/sampling.rs`).
    pub stranger: bool,
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
/// `audit/sampling.rs`).
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// When the request arrived; written as RFC 3339 UTC with microseconds, formatted straight
    /// into the line.
    #[serde(serialize_with = "rfc3339_micros")]
    pub ts: SystemTime,
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
            ts: SystemTime::UNIX_EPOCH,
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

fn rfc3339_micros<S: serde::Serializer>(ts: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*ts))
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

/// Handle to the audit file; cheap to clone.
///
/// Request paths append through an [`AuditBatcher`] (one per worker, see
/// [`AuditLog::batcher`]); [`AuditLog::append`] is for the occasional record written from
/// elsewhere.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// What every handle and every worker's flush task share.
struct Shared {
    /// Taken once per write (a worker's whole batch, or one record of [`AuditLog::append`]),
    /// never per record of a batch. Workers rarely meet here: each holds it only for its
    /// `write`, and only when it has records waiting.
    writer: Mutex<Writer>,
    healthy: Arc<AtomicBool>,
    /// Set by [`AuditLog::close`]; lets appends after it fail without queueing.
    closed: AtomicBool,
    /// Every batcher's queue, for `reopen` and `close` to write out what is waiting first.
    queues: Mutex<Vec<Weak<Queue>>>,
    path: PathBuf,
}

/// How the writer writes, besides the file.
#[derive(Debug, Clone, Default)]
pub struct WriterOptions {
    /// Each record also goes to stdout.
    pub stdout: bool,
    /// Counts records that could not be written.
    pub errors: Counter,
    /// Links the records with HMAC-SHA256 under this key instead of SHA-256 (see `chain.rs`).
    pub integrity_key: Option<IntegrityKey>,
}

/// A batch is written once it holds this much; records after it wait for the next `write`.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Room the readiness probe asks for: a few records.
const PROBE_BYTES: usize = 4096;

impl AuditLog {
    /// Opens (creating if needed) the audit file for appending, and the stdout mirror's thread
    /// if asked for.
    pub fn open(path: &Path, options: WriterOptions) -> Result<Self, AuditError> {
        let file = open_append(path).map_err(|e| AuditError {
            path: path.to_owned(),
            source: e,
        })?;
        let healthy = Arc::new(AtomicBool::new(true));
        let stdout = if options.stdout {
            Some(stdout_writer().map_err(|e| AuditError {
                path: path.to_owned(),
                source: e,
            })?)
        } else {
            None
        };
        let (last_link, restart) = last_link_at_start(path, &file);
        let writer = Writer {
            // A crash in the middle of a write may have left half a line.
            torn: !ends_a_line(&file),
            chain: Chain {
                last: last_link,
                restart,
                expected_len: file.metadata().map_or(0, |m| m.len()),
            },
            scratch: Vec::new(),
            file: Some(file),
            path: path.to_owned(),
            options,
            healthy: healthy.clone(),
            stdout,
            writes: 0,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                writer: Mutex::new(writer),
                healthy,
                closed: AtomicBool::new(false),
                queues: Mutex::default(),
                path: path.to_owned(),
            }),
        })
    }

    /// A batcher for one worker: its records are gathered and written together by a flush task
    /// spawned here, on the current runtime (so this must be called on the worker's runtime, and
    /// panics outside one). The task ends once every clone of the batcher is dropped.
    pub fn batcher(&self) -> AuditBatcher {
        let queue = Arc::new(Queue::default());
        {
            let mut queues = lock(&self.shared.queues);
            queues.retain(|q| q.strong_count() > 0);
            queues.push(Arc::downgrade(&queue));
        }
        tokio::spawn(flush_task(queue.clone(), self.shared.clone()));
        AuditBatcher {
            handle: Arc::new(Handle {
                queue,
                shared: self.shared.clone(),
            }),
        }
    }

    /// Appends one record, written at once from this thread; returns once it is in the file,
    /// `false` if it could not be written.
    pub async fn append(&self, record: &Record<'_>) -> bool {
        if self.shared.closed.load(Ordering::Acquire) {
            tracing::error!("audit record dropped: the audit file is already closed");
            return false;
        }
        let mut line = Vec::with_capacity(512);
        if !serialize_line(&mut line, record) {
            return false;
        }
        // On a blocking thread: the callers (the refusal summaries) run on the control
        // runtime, which a stalled disk must not stop from answering probes and signals.
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.lock_writer().write(&line, 1))
            .await
            .unwrap_or(false)
    }

    /// Whether the last write reached the file.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Whether the file takes writes now, found out without writing a record (see
    /// [`Writer::probe`]). Runs on a blocking thread: a stalled disk holds that thread, not a
    /// runtime's.
    pub async fn probe(&self) -> bool {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.lock_writer().probe())
            .await
            .unwrap_or(false)
    }

    /// Opens the file at its path again; records appended before this call go to the old file
    /// (also those still waiting in a batcher), records after it to the new one. On failure the
    /// old file is kept. Runs on a blocking thread, as [`AuditLog::probe`].
    pub async fn reopen(&self) -> Result<(), ReopenError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.reopen())
            .await
            .unwrap_or_else(|e| Err(ReopenError::Unfinished(e)))
    }

    /// Links the records written after this under `key` (plain SHA-256 with `None`). Runs on a
    /// blocking thread, as [`AuditLog::probe`]: the writer may be stuck on a hung volume.
    pub async fn set_integrity_key(&self, key: Option<IntegrityKey>) {
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            shared.lock_writer().options.integrity_key = key;
        })
        .await;
    }

    /// Writes out what the batchers hold, syncs the file to disk and closes it: every append
    /// after this returns `false`. Runs on a blocking thread, so that a caller can bound it with
    /// a timeout.
    pub async fn close(&self) {
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.close()).await;
    }
}

impl Shared {
    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        lock(&self.writer)
    }

    /// Writes out every batcher's waiting records, into the file open now.
    fn write_out_batchers(&self, writer: &mut Writer) {
        let queues: Vec<Arc<Queue>> = lock(&self.queues)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for queue in queues {
            queue.write_out(writer, &mut Vec::new());
        }
    }

    fn reopen(&self) -> Result<(), ReopenError> {
        let mut writer = self.lock_writer();
        self.write_out_batchers(&mut writer);
        writer.reopen()
    }

    fn close(&self) {
        let file = {
            let mut writer = self.lock_writer();
            self.write_out_batchers(&mut writer);
            self.closed.store(true, Ordering::Release);
            // The mirror's thread writes what it was given, then ends.
            writer.stdout = None;
            writer.file.take()
        };
        // Outside the lock: nothing can be written any more, but nothing should wait for this.
        if let Some(file) = file {
            if let Err(e) = file.sync_all() {
                tracing::error!(file = %self.path.display(), error = %e, "cannot sync the audit file");
            }
        }
    }
}

/// Links each line of `batch` (records as serialized, each `{...}` and a newline) into the
/// chain, into `out`: the first after `chain.last` (or starting a new chain, marked
/// `chain_restart`, if `chain.restart` says so), each next after the one before. Returns the link
/// of the last line; the chain itself moves only once the batch is in the file.
fn link_batch(
    chain: &Chain,
    batch: &[u8],
    out: &mut Vec<u8>,
    key: Option<&IntegrityKey>,
) -> Option<[u8; chain::LINK_LEN]> {
    out.clear();
    let mut last = chain.last;
    let mut restart = chain.restart.is_some();
    for line in batch.split_inclusive(|&b| b == b'\n') {
        let Some(open) = line
            .strip_suffix(b"\n")
            .and_then(|l| l.strip_suffix(b"}"))
            .filter(|open| !open.is_empty())
        else {
            // Not a record as `serialize_line` makes them; never happens, and never unlinked.
            continue;
        };
        let own_start = out.len();
        out.extend_from_slice(open);
        let prev = if std::mem::take(&mut restart) {
            out.extend_from_slice(chain::RESTART_MEMBER);
            None
        } else {
            last
        };
        out.push(b'}');
        let link = chain::link(prev.as_ref().map(|l| &l[..]), &out[own_start..], key);
        out.pop();
        out.extend_from_slice(chain::MEMBER);
        out.extend_from_slice(&link);
        out.extend_from_slice(b"\"}\n");
        last = Some(link);
    }
    last
}

/// Appends `record` and a newline to `buffer`; on failure (logged), `buffer` is left as it was.
fn serialize_line(buffer: &mut Vec<u8>, record: &Record<'_>) -> bool {
    let start = buffer.len();
    match serde_json::to_writer(&mut *buffer, record) {
        Ok(()) => {
            buffer.push(b'\n');
            true
        }
        Err(e) => {
            buffer.truncate(start);
            tracing::error!(error = %e, "cannot serialize an audit record");
            false
        }
    }
}

/// Locks `mutex`, poisoned or not: nothing here panics while holding one, and the state behind
/// each stays valid if something did.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One worker's way into the audit file: group commit, as nginx writes its access log from each
/// worker. A record is serialized into the worker's pending batch and its request waits; the
/// worker's flush task, woken by the first record of a batch, runs after the tasks the runtime
/// had already made ready, so it finds every record made in that turn of the event loop. It
/// writes them with one `write` on the worker's own thread (taking the file's lock once) and
/// then releases every request waiting on the batch with its result. No thread hop, no
/// allocation per record.
///
/// Cheap to clone; the pending batch is the worker's own, so its lock is uncontended.
#[derive(Clone)]
pub struct AuditBatcher {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for AuditBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditBatcher")
            .field("path", &self.handle.shared.path)
            .finish_non_exhaustive()
    }
}

impl AuditBatcher {
    /// Queues one record; the future resolves once the record is in the file (handed to the
    /// operating system), `false` if it could not be written. The record is serialized before
    /// this returns, so the future borrows nothing.
    pub fn append(&self, record: &Record<'_>) -> impl Future<Output = bool> + Send + 'static {
        let queued = self.handle.enqueue(record);
        async move {
            match queued {
                Some(written) => written.wait().await,
                None => false,
            }
        }
    }
}

/// Shared by the clones of one batcher; when the last goes, the flush task is told to finish.
struct Handle {
    queue: Arc<Queue>,
    shared: Arc<Shared>,
}

impl Handle {
    fn enqueue(&self, record: &Record<'_>) -> Option<Arc<Written>> {
        if self.shared.closed.load(Ordering::Acquire) {
            tracing::error!("audit record dropped: the audit file is already closed");
            return None;
        }
        let mut pending = lock(&self.queue.pending);
        if pending.stopped {
            tracing::error!("audit record dropped: this worker's audit flush task has stopped");
            return None;
        }
        let was_idle = pending.is_idle();
        let batch = &mut pending.filling;
        if !serialize_line(&mut batch.lines, record) {
            return None;
        }
        batch.records += 1;
        let written = batch.written.clone();
        if batch.lines.len() >= MAX_BATCH_BYTES {
            let full = std::mem::take(&mut pending.filling);
            pending.full.push_back(full);
        }
        drop(pending);
        if was_idle {
            self.queue.wake.notify_one();
        }
        Some(written)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        lock(&self.queue.pending).abandoned = true;
        self.queue.wake.notify_one();
    }
}

/// One worker's records waiting for their write.
#[derive(Default)]
struct Queue {
    pending: Mutex<Pending>,
    /// Wakes the flush task: records are waiting, or the last handle is gone.
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    /// Batches that reached [`MAX_BATCH_BYTES`], oldest first: written before `filling`.
    full: VecDeque<Batch>,
    filling: Batch,
    /// Every handle is gone: the flush task ends once it has written what is left.
    abandoned: bool,
    /// The flush task is gone (its runtime shut down): appends fail at once.
    stopped: bool,
}

impl Pending {
    fn is_idle(&self) -> bool {
        self.full.is_empty() && self.filling.records == 0
    }

    /// The batches waiting, oldest first; `spare` becomes the next batch's buffer.
    fn take(&mut self, spare: &mut Vec<u8>) -> (VecDeque<Batch>, Option<Batch>) {
        let full = std::mem::take(&mut self.full);
        let filling = (self.filling.records > 0).then(|| Batch {
            lines: std::mem::replace(&mut self.filling.lines, std::mem::take(spare)),
            records: std::mem::take(&mut self.filling.records),
            written: std::mem::take(&mut self.filling.written),
        });
        (full, filling)
    }
}

#[derive(Default)]
struct Batch {
    lines: Vec<u8>,
    records: usize,
    written: Arc<Written>,
}

impl Queue {
    /// Writes every waiting batch with `writer` (locked by the caller, before this queue's own
    /// lock: always in that order) and releases the records' waiters. `spare` trades buffers
    /// with the queue, so that a busy worker reuses one.
    fn write_out(&self, writer: &mut Writer, spare: &mut Vec<u8>) {
        let (full, filling) = lock(&self.pending).take(spare);
        for batch in full {
            let ok = writer.write(&batch.lines, batch.records);
            batch.written.finish(ok);
        }
        if let Some(batch) = filling {
            let ok = writer.write(&batch.lines, batch.records);
            batch.written.finish(ok);
            *spare = batch.lines;
            spare.clear();
        }
    }
}

/// Whether one batch was written, for the requests waiting on it.
#[derive(Default)]
struct Written {
    /// 0 while waiting, then 1 written or 2 not.
    state: AtomicU8,
    done: Notify,
}

impl Written {
    fn finish(&self, ok: bool) {
        self.state.store(if ok { 1 } else { 2 }, Ordering::Release);
        self.done.notify_waiters();
    }

    fn result(&self) -> Option<bool> {
        match self.state.load(Ordering::Acquire) {
            0 => None,
            state => Some(state == 1),
        }
    }

    async fn wait(&self) -> bool {
        // A `Notified` hears `notify_waiters` from the moment it is made, so a batch finished
        // between this line and the check below still wakes it.
        let done = self.done.notified();
        if let Some(ok) = self.result() {
            return ok;
        }
        done.await;
        self.result().unwrap_or(false)
    }
}

/// One worker's writer of batches: wakes when a batch starts, and (being queued behind the
/// tasks already ready) writes it once they have added their records.
fn flush_task(queue: Arc<Queue>, shared: Arc<Shared>) -> impl Future<Output = ()> {
    // Made outside the `async` block, so that it is dropped even with a task never polled.
    let stopped = FailOnStop(queue.clone());
    async move {
        let _stopped = stopped;
        let mut spare = Vec::new();
        loop {
            queue.wake.notified().await;
            let abandoned = {
                let mut writer = shared.lock_writer();
                queue.write_out(&mut writer, &mut spare);
                lock(&queue.pending).abandoned
            };
            if abandoned {
                // No handle is left to add records; the last ones were just written.
                return;
            }
        }
    }
}

/// Should the flush task end with records waiting (its runtime shut down), their requests get
/// `false` instead of waiting forever, and later appends fail at once.
struct FailOnStop(Arc<Queue>);

impl Drop for FailOnStop {
    fn drop(&mut self) {
        let (full, filling) = {
            let mut pending = lock(&self.0.pending);
            pending.stopped = true;
            pending.take(&mut Vec::new())
        };
        let lost: usize = full.iter().chain(&filling).map(|b| b.records).sum();
        if lost > 0 {
            tracing::error!(
                records = lost,
                "audit records not written: their worker stopped first"
            );
        }
        for batch in full.into_iter().chain(filling) {
            batch.written.finish(false);
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

/// The file and what goes with it; behind [`Shared::writer`].
struct Writer {
    /// `None` once closed.
    file: Option<File>,
    path: PathBuf,
    options: WriterOptions,
    healthy: Arc<AtomicBool>,
    /// The last write failed part-way and may have left half a line: start the next on a line
    /// of its own, so that the half line does not swallow a good record.
    torn: bool,
    /// Batches for stdout, written by a thread of their own so that a stalled stdout pipe
    /// cannot hold up the file or the requests waiting on it.
    stdout: Option<std::sync::mpsc::SyncSender<Arc<[u8]>>>,
    /// Writes of records attempted: the tests see batching in it.
    writes: u64,
    /// Where the hash chain stands.
    chain: Chain,
    /// The batch being written, its lines linked into the chain.
    scratch: Vec<u8>,
}

/// The writer's place in the hash chain (see `chain.rs`).
struct Chain {
    /// The link of the last record in the file; `None` before the first record of a trail.
    last: Option<[u8; chain::LINK_LEN]>,
    /// Why the next record starts a new chain, if it must.
    restart: Option<String>,
    /// How long the file should be after the last write: shorter means someone truncated it.
    expected_len: u64,
}

/// The link of the last record at start, from the file or, when it is empty, from the rotated
/// `.1` beside it (a restart right after a rotation); and why the chain restarts, when the last
/// line holds no link.
fn last_link_at_start(path: &Path, file: &File) -> (Option<[u8; chain::LINK_LEN]>, Option<String>) {
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    let rotated = PathBuf::from(rotated);
    let found = match last_line(file) {
        Some(line) => Some((line, path.to_owned())),
        None => File::open(&rotated)
            .ok()
            .and_then(|f| last_line(&f))
            .map(|line| (line, rotated.clone())),
    };
    let Some((line, from)) = found else {
        // A new trail, unless rotated files sit beside it (dateext, compressed, ...) whose last
        // link is not looked for here: then say that the chain starts anew.
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let folder = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let rotated_beside = std::fs::read_dir(folder).is_ok_and(|entries| {
            entries.flatten().any(|entry| {
                let other = entry.file_name().to_string_lossy().into_owned();
                other.len() > name.len()
                    && other.starts_with(&name)
                    && matches!(other.as_bytes()[name.len()], b'.' | b'-')
            })
        });
        let why = rotated_beside.then(|| {
            format!(
                "{} is new and the rotated files beside it have no {} to link to",
                path.display(),
                rotated.display()
            )
        });
        return (None, why);
    };
    match chain::split(&line) {
        Some((_, link)) => (link.try_into().ok(), None),
        None => (
            None,
            Some(format!(
                "the last line of {} holds no chain link (written by an older version, or damaged)",
                from.display()
            )),
        ),
    }
}

/// The last complete line of `file` (without its newline), read from its end; `None` if it has
/// none. A torn line after it (no newline) is passed over.
fn last_line(file: &File) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    const TAIL: u64 = 64 * 1024;
    let len = file.metadata().ok()?.len();
    let start = len.saturating_sub(TAIL);
    let mut tail = vec![0; (len - start) as usize];
    file.read_exact_at(&mut tail, start).ok()?;
    let end = tail.iter().rposition(|&b| b == b'\n')?;
    let begin = tail[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    // A line longer than the tail read is not one the writer made.
    (begin > 0 || start == 0).then(|| tail[begin..end].to_vec())
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
    /// Writes one batch of `records` records; `false` if the file did not take it.
    fn write(&mut self, batch: &[u8], records: usize) -> bool {
        let Some(file) = self.file.as_mut() else {
            tracing::error!(
                records,
                "audit records dropped: the audit file is already closed"
            );
            return false;
        };
        self.writes += 1;
        // Someone cut the file short: what the last link points at is gone. (Only a regular
        // file has a length to go by; a pipe or a device always says 0.)
        if let Some(len) = file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
        {
            if len < self.chain.expected_len && self.chain.restart.is_none() {
                self.chain.restart = Some(format!(
                    "{} was truncated from {} to {len} bytes",
                    self.path.display(),
                    self.chain.expected_len
                ));
            }
            self.chain.expected_len = len;
        }
        let last = link_batch(
            &self.chain,
            batch,
            &mut self.scratch,
            self.options.integrity_key.as_ref(),
        );
        let batch = &self.scratch[..];
        let mut result = Ok(());
        if self.torn {
            result = file.write_all(b"\n");
        }
        let ok = match result.and_then(|()| file.write_all(batch)) {
            Ok(()) => true,
            Err(e) => {
                self.options.errors.inc_by(records as u64);
                tracing::error!(file = %self.path.display(), error = %e, records, "cannot write to the audit file");
                false
            }
        };
        if ok {
            if let Some(reason) = self.chain.restart.take() {
                tracing::warn!(file = %self.path.display(), reason, "the audit chain starts anew (chain_restart)");
            }
            self.chain.last = last;
            self.chain.expected_len += (batch.len() + usize::from(self.torn)) as u64;
        } else if self.chain.restart.is_none() {
            // Some of the batch may be in the file, linked, some not: the next record cannot
            // tell which link it follows, and a gap in the trail must show as one.
            self.chain.restart = Some(format!(
                "a write of {records} records to {} failed; those records may be missing",
                self.path.display()
            ));
        }
        // Only a failure can leave half a line; then look at how the file ends.
        self.torn = !ok && !ends_a_line(file);
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
    /// cannot be asked: the next record decides, as before. A closed file takes nothing.
    fn probe(&mut self) -> bool {
        use std::os::fd::AsRawFd;
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        if self.healthy.load(Ordering::Relaxed) {
            return true;
        }
        let ok = if self.torn {
            let ok = file.write_all(b"\n").is_ok();
            self.torn = !ok;
            ok
        } else {
            let fd = file.as_raw_fd();
            let end = file.metadata().map_or(0, |m| m.len());
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

    fn reopen(&mut self) -> Result<(), ReopenError> {
        let Some(old) = self.file.as_ref() else {
            return Err(ReopenError::Closed {
                path: self.path.clone(),
            });
        };
        match open_append(&self.path) {
            Ok(file) => {
                if let Err(e) = old.sync_all() {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot sync the audit file being closed");
                }
                // The records the chain links to were removed, not moved: say so in the next one.
                use std::os::unix::fs::MetadataExt;
                let old_meta = old.metadata().ok();
                let removed = old_meta.as_ref().is_some_and(|m| m.nlink() == 0);
                // Not rotated but cut short in place (copytruncate, or someone).
                let cut = match (&old_meta, file.metadata()) {
                    (Some(old), Ok(new)) => {
                        old.dev() == new.dev()
                            && old.ino() == new.ino()
                            && new.is_file()
                            && new.len() < self.chain.expected_len
                    }
                    _ => false,
                };
                let follows = match last_line(&file) {
                    None => true,
                    Some(line) => {
                        chain::split(&line).map(|(_, link)| link)
                            == self.chain.last.as_ref().map(|l| &l[..])
                    }
                };
                if removed || cut || !follows {
                    self.chain.restart = Some(if removed {
                        format!(
                            "{} was removed, not moved, before it was reopened",
                            self.path.display()
                        )
                    } else if cut {
                        format!(
                            "{} was truncated before it was reopened",
                            self.path.display()
                        )
                    } else {
                        format!("{} was replaced by a file that does not end with the last record written", self.path.display())
                    });
                }
                self.torn = !ends_a_line(&file);
                self.chain.expected_len = file.metadata().map_or(0, |m| m.len());
                self.file = Some(file);
                tracing::info!(file = %self.path.display(), "audit file reopened");
                Ok(())
            }
            Err(source) => {
                let error = ReopenError::Open {
                    path: self.path.clone(),
                    source,
                };
                tracing::error!("{error}");
                // Records still reach the file open before (which rotation moved away); counted
                // so that an alert on write errors sees that something is wrong.
                self.options.errors.inc();
                Err(error)
            }
        }
    }
}

/// The audit file cannot be opened (at start).
#[derive(Debug, thiserror::Error)]
#[error("audit.file: cannot open {} for appending: {source}", path.display())]
pub struct AuditError {
    /// The file as configured in `audit.file`.
    pub path: PathBuf,
    /// Why the open (or the stdout mirror's thread) failed.
    pub source: io::Error,
}

/// Why the audit file was not reopened; the file open before is kept.
#[derive(Debug, thiserror::Error)]
pub enum ReopenError {
    /// The log was closed at shutdown; nothing is written any more.
    #[error("audit.file: {} is already closed (shutting down)", path.display())]
    Closed { path: PathBuf },
    /// The file at the configured path cannot be opened (the folder gone, no permission).
    #[error("audit.file: cannot reopen {}: {source}; still writing to the file open before", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// The blocking task doing the reopen panicked or was cancelled.
    #[error("audit.file: the reopen did not finish: {0}")]
    Unfinished(#[source] tokio::task::JoinError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends a record of each status from tasks of their own, all at once; each must be
    /// written.
    async fn append_at_once(log: &AuditLog, statuses: std::ops::Range<u16>) {
        let tasks: Vec<_> = statuses
            .map(|status| {
                let log = log.clone();
                tokio::spawn(async move { log.append(&record(status)).await })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap());
        }
    }

    /// Cuts the file to nothing where it is, as `copytruncate` (or an intruder) does.
    fn empty_in_place(path: &Path) {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(0).unwrap();
    }

    /// An audit log on `audit.jsonl` in a new folder, which must be kept while the log is used.
    fn fresh_log() -> (tempfile::TempDir, PathBuf, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, WriterOptions::default()).unwrap();
        (dir, path, log)
    }

    fn record(status: u16) -> Record<'static> {
        Record {
            ts: humantime::parse_rfc3339("2026-12-01T00:00:00Z").unwrap(),
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
        let (_dir, path, log) = fresh_log();
        assert!(log.append(&record(200)).await);
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(value["ts"], "2026-12-01T00:00:00.000000Z");
        assert_eq!(value["status"], 200);
        assert_eq!(value["limit"], serde_json::Value::Null);
        log.close().await;
    }

    #[tokio::test]
    async fn concurrent_appends_each_get_one_whole_line() {
        let (_dir, path, log) = fresh_log();
        append_at_once(&log, 200..400).await;
        log.close().await;
        assert_eq!(statuses(&path), (200..400).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn reopen_moves_later_records_to_a_new_file() {
        let (dir, path, log) = fresh_log();
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
        let (_dir, path, log) = fresh_log();
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

    fn writes(log: &AuditLog) -> u64 {
        log.shared.lock_writer().writes
    }

    fn statuses(path: &Path) -> Vec<u64> {
        let mut statuses: Vec<u64> = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["status"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        statuses.sort();
        statuses
    }

    #[tokio::test]
    async fn records_made_in_one_turn_share_one_write_and_wait_for_it() {
        let (_dir, path, log) = fresh_log();
        let batcher = log.batcher();
        // All made ready together, as requests answered in one turn of a worker's event loop.
        let tasks: Vec<_> = (0..50u16)
            .map(|i| {
                let (batcher, path) = (batcher.clone(), path.clone());
                tokio::spawn(async move {
                    let written = batcher.append(&record(200 + i)).await;
                    let text = std::fs::read_to_string(&path).unwrap();
                    let line = format!("\"status\":{},", 200 + i);
                    (written, text.contains(&line))
                })
            })
            .collect();
        for task in tasks {
            let (written, in_the_file) = task.await.unwrap();
            assert!(written);
            assert!(in_the_file, "released before its line was in the file");
        }
        assert_eq!(statuses(&path), (200..250).collect::<Vec<u64>>());
        let writes = writes(&log);
        assert!(writes < 50, "50 records took {writes} writes");
        log.close().await;
    }

    #[tokio::test]
    async fn a_batch_is_cut_at_its_size_limit() {
        let (_dir, path, log) = fresh_log();
        let batcher = log.batcher();
        let long = "/x".repeat(2048);
        // About 4 KiB each: 100 of them are past one batch's 256 KiB.
        let appends: Vec<_> = (0..100u16)
            .map(|i| {
                batcher.append(&Record {
                    path: Some(&long),
                    ..record(200 + i)
                })
            })
            .collect();
        for written in futures_util::future::join_all(appends).await {
            assert!(written);
        }
        assert_eq!(statuses(&path), (200..300).collect::<Vec<u64>>());
        assert_eq!(writes(&log), 2);
        log.close().await;
    }

    #[tokio::test]
    async fn records_waiting_in_a_batcher_at_reopen_go_to_the_old_file() {
        let (dir, path, log) = fresh_log();
        let batcher = log.batcher();
        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        // Queued, not yet written: its flush task has not had a turn, and gets none before the
        // reopen (called directly, without yielding to the runtime).
        let before = batcher.append(&record(200));
        log.shared.reopen().unwrap();
        assert!(batcher.append(&record(201)).await);
        assert!(before.await);
        log.close().await;
        assert_eq!(statuses(&rotated), [200]);
        assert_eq!(statuses(&path), [201]);
    }

    #[tokio::test]
    async fn close_writes_what_is_waiting_then_refuses_every_append() {
        let (_dir, path, log) = fresh_log();
        let batcher = log.batcher();
        let waiting = batcher.append(&record(200));
        // Directly, so that the flush task gets no turn first: the close must write it.
        log.shared.close();
        assert!(waiting.await);
        assert_eq!(statuses(&path), [200]);
        assert!(!batcher.append(&record(201)).await);
        assert!(!log.append(&record(202)).await);
        assert!(log.reopen().await.is_err());
        assert!(!log.probe().await);
        assert_eq!(statuses(&path), [200]);
    }

    #[test]
    fn a_worker_that_stops_fails_its_waiting_records_instead_of_hanging() {
        let (_dir, _, log) = fresh_log();
        let worker = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let batcher = worker.block_on(async { log.batcher() });
        // Queued, then the worker's runtime goes before its flush task ran.
        let waiting = batcher.append(&record(200));
        drop(worker);
        let elsewhere = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(!elsewhere.block_on(waiting));
        assert!(!elsewhere.block_on(batcher.append(&record(201))));
    }

    #[test]
    fn outcome_names_are_what_serde_writes_and_each_is_listed_once() {
        for outcome in Outcome::ALL {
            let written = serde_json::to_value(outcome).unwrap();
            assert_eq!(written, outcome.name(), "{outcome:?}");
            assert_eq!(Outcome::from_name(outcome.name()), Some(outcome));
        }
        let mut names = Outcome::ALL.map(Outcome::name);
        names.sort();
        names.windows(2).for_each(|w| assert_ne!(w[0], w[1]));
        assert_eq!(Outcome::from_name("timeout"), None);
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

    /// Every line of `paths` (oldest first), as the chain sees them: `Ok` if each links to the
    /// one before under `key`, else the 0-based index of the first line that does not. A line
    /// carrying `chain_restart` starts afresh, as the first line does.
    fn links_hold(paths: &[&Path], key: Option<&IntegrityKey>) -> Result<usize, usize> {
        let mut prev: Option<Vec<u8>> = None;
        let mut index = 0;
        for path in paths {
            for line in std::fs::read(path).unwrap().split(|&b| b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                let (open, link) = chain::split(line).ok_or(index)?;
                let restart = open.ends_with(chain::RESTART_MEMBER);
                let after = if restart { None } else { prev.as_deref() };
                if chain::link_of_parts(after, open, key)[..] != *link {
                    return Err(index);
                }
                prev = Some(link.to_vec());
                index += 1;
            }
        }
        Ok(index)
    }

    fn restarts(path: &Path) -> usize {
        std::fs::read_to_string(path)
            .unwrap()
            .matches("\"chain_restart\":true")
            .count()
    }

    #[tokio::test]
    async fn records_of_a_batch_and_of_concurrent_appends_form_one_chain() {
        let (_dir, path, log) = fresh_log();
        let batcher = log.batcher();
        let appends: Vec<_> = (0..50u16)
            .map(|i| batcher.append(&record(200 + i)))
            .collect();
        for written in futures_util::future::join_all(appends).await {
            assert!(written);
        }
        append_at_once(&log, 300..350).await;
        log.close().await;
        assert_eq!(links_hold(&[&path], None), Ok(100));
        assert_eq!(restarts(&path), 0);
        // Changing one byte of one record breaks its link.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"status\":230", "\"status\":231", 1)).unwrap();
        assert_eq!(links_hold(&[&path], None), Err(30));
    }

    #[tokio::test]
    async fn the_chain_goes_on_across_a_rotation_and_a_restart() {
        let (dir, path, log) = fresh_log();
        assert!(log.append(&record(200)).await);
        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen().await.unwrap();
        assert!(log.append(&record(201)).await);
        log.close().await;
        // A new gateway on the same file links to its last record.
        let log = AuditLog::open(&path, WriterOptions::default()).unwrap();
        assert!(log.append(&record(202)).await);
        log.close().await;
        assert_eq!(links_hold(&[&rotated, &path], None), Ok(3));
        // Rotated again while stopped: the new gateway finds the last link in `.1`.
        let older = dir.path().join("audit.jsonl.2");
        std::fs::rename(&rotated, &older).unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        let log = AuditLog::open(&path, WriterOptions::default()).unwrap();
        assert!(log.append(&record(203)).await);
        log.close().await;
        assert_eq!(links_hold(&[&older, &rotated, &path], None), Ok(4));
        assert_eq!(restarts(&path), 0);
    }

    #[tokio::test]
    async fn a_truncated_or_removed_file_makes_the_next_record_a_restart() {
        let (_dir, path, log) = fresh_log();
        assert!(log.append(&record(200)).await);
        assert!(log.append(&record(201)).await);
        // Someone empties the file under the gateway.
        empty_in_place(&path);
        assert!(log.append(&record(202)).await);
        assert!(log.append(&record(203)).await);
        assert_eq!(restarts(&path), 1);
        assert_eq!(links_hold(&[&path], None), Ok(2));
        // Removed rather than moved, then reopened: the records linked to are gone.
        std::fs::remove_file(&path).unwrap();
        log.reopen().await.unwrap();
        assert!(log.append(&record(204)).await);
        log.close().await;
        assert_eq!(restarts(&path), 1);
        assert_eq!(links_hold(&[&path], None), Ok(1));
    }

    #[tokio::test]
    async fn a_trail_without_links_is_followed_by_a_restart() {
        let (_dir, path, log) = fresh_log();
        log.close().await;
        std::fs::write(&path, "{\"status\":200}\n").unwrap();
        let log = AuditLog::open(&path, WriterOptions::default()).unwrap();
        assert!(log.append(&record(201)).await);
        log.close().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap();
        assert!(last.contains("\"chain_restart\":true"), "{last}");
    }

    #[tokio::test]
    async fn a_keyed_chain_holds_under_its_key_only_and_goes_on_under_a_new_one() {
        let key = IntegrityKey::from_file_bytes(b"first-integrity-key").unwrap();
        let next = IntegrityKey::from_file_bytes(b"second-integrity-key").unwrap();
        let (dir, path, _) = fresh_log();
        let options = WriterOptions {
            integrity_key: Some(key.clone()),
            ..WriterOptions::default()
        };
        let log = AuditLog::open(&path, options).unwrap();
        assert!(log.append(&record(200)).await);
        assert!(log.append(&record(201)).await);
        assert_eq!(links_hold(&[&path], Some(&key)), Ok(2));
        assert_eq!(links_hold(&[&path], None), Err(0));
        assert_eq!(links_hold(&[&path], Some(&next)), Err(0));
        // A new key (SIGHUP): the next record links to the last one, under the new key.
        log.set_integrity_key(Some(next.clone())).await;
        assert!(log.append(&record(202)).await);
        log.close().await;
        assert_eq!(links_hold(&[&path], Some(&key)), Err(2));
        let text = std::fs::read_to_string(&path).unwrap();
        let (old, new) = text.split_at(text.match_indices('\n').nth(1).unwrap().0 + 1);
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        std::fs::write(&first, old).unwrap();
        std::fs::write(&second, new).unwrap();
        assert_eq!(links_hold(&[&first], Some(&key)), Ok(2));
        let last_old = chain::split(old.lines().last().unwrap().as_bytes())
            .unwrap()
            .1
            .to_vec();
        let (open, link) = chain::split(new.trim_end().as_bytes()).unwrap();
        assert_eq!(
            chain::link_of_parts(Some(&last_old), open, Some(&next))[..],
            *link
        );
        assert!(!text.contains("integrity-key"));
    }

    #[tokio::test]
    async fn a_file_emptied_in_place_then_reopened_makes_the_next_record_a_restart() {
        let (_dir, path, log) = fresh_log();
        assert!(log.append(&record(200)).await);
        empty_in_place(&path);
        log.reopen().await.unwrap();
        assert!(log.append(&record(201)).await);
        log.close().await;
        assert_eq!(restarts(&path), 1);
    }

    #[tokio::test]
    async fn a_failed_write_makes_the_next_record_a_restart_and_a_device_never_does() {
        // /dev/full fails every write; /dev/null takes them and has no length to go by.
        let full = AuditLog::open(Path::new("/dev/full"), WriterOptions::default()).unwrap();
        assert!(!full.append(&record(200)).await);
        assert!(full.shared.lock_writer().chain.restart.is_some());
        full.close().await;
        let null = AuditLog::open(Path::new("/dev/null"), WriterOptions::default()).unwrap();
        for status in 200..203 {
            assert!(null.append(&record(status)).await);
        }
        {
            let writer = null.shared.lock_writer();
            assert!(writer.chain.restart.is_none());
            assert!(writer.chain.last.is_some());
        }
        null.close().await;
    }

    #[tokio::test]
    async fn a_new_file_beside_rotated_files_without_a_dot_one_starts_with_a_restart() {
        let (dir, path, log) = fresh_log();
        log.close().await;
        std::fs::remove_file(&path).unwrap();
        std::fs::write(dir.path().join("audit.jsonl-20261201.gz"), b"").unwrap();
        let log = AuditLog::open(&path, WriterOptions::default()).unwrap();
        assert!(log.append(&record(200)).await);
        log.close().await;
        assert_eq!(restarts(&path), 1);
    }
}
