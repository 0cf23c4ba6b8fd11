//! `datafold-gateway audit --verify`: walks the audit trail, the rotated siblings oldest first
//! and the live file last (the same files the query reads), and recomputes every record's
//! `chain` link as `audit/chain.rs` defines it.
//!
//! Each record's link must hold after the link of the record before it, across file
//! boundaries; only the trail's very first record, and a record carrying
//! `"chain_restart":true`, link to nothing. A first record that links to a record no longer in
//! the trail (the oldest files rotated out) is taken as where the trail starts, when the records
//! after it follow it: the report says it starts mid-chain. The first link that does not hold
//! ends the walk and is reported with its file, its line in that file, and a kind:
//!
//! | kind | when |
//! |---|---|
//! | `damaged` | the line is not a whole record: empty, cut short, not JSON, or a `.gz` that cannot be read further |
//! | `unchained` | a JSON object without a `chain` member |
//! | `restart` | a record after the first carries `"chain_restart":true` |
//! | `reordered` | the record after this one follows the record before it; or this record's link holds after another record of the trail than the one before it |
//! | `removed` | no record of the trail explains the link, this record opens a file after the oldest and the record after it, if any, does follow it: what came before it is gone |
//! | `changed` | no record of the trail explains the link, inside a file: this record was edited, or records just before it were removed (a hash chain cannot tell these apart) |
//!
//! The rules are tried in the order of the table. Only the verdict needs more than one pass:
//! the walk keeps the previous link alone, and a broken link is classified by reading one record
//! ahead and, if that does not settle it, the whole trail once more.
//!
//! Exit status: 0 when every link holds, 1 when one does not, 2 when the check could not be
//! made (a file or key unreadable). `main` maps an error to 1, so this module ends the process
//! itself for 1 and 2.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::PathBuf;

use super::audit::{audit_file, open_lines, trail_files, AuditArgs};
use crate::audit::chain::{self, IntegrityKey, LINK_LEN};

/// Runs the check and ends the process with its status unless every link holds.
pub(super) fn run(args: &AuditArgs) -> Result<(), String> {
    let report = read_keys(&args.integrity_key_file).and_then(|keys| {
        let live = audit_file(args)?;
        let trail = trail_files(&live, true)?;
        verify(&trail, &keys)
    });
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let text = if args.json {
        report.json()
    } else {
        report.text()
    };
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(2);
        }
    }
    if report.broken.is_some() {
        std::process::exit(1);
    }
    Ok(())
}

/// The keys of `--integrity-key-file`, read as the gateway reads its key files. Errors name
/// the file, never its contents.
fn read_keys(paths: &[PathBuf]) -> Result<Vec<IntegrityKey>, String> {
    paths
        .iter()
        .map(|path| chain::load_key(path).map_err(|e| format!("integrity key: {e}")))
        .collect()
}

/// The keys a link may have been made with; none means plain SHA-256.
struct Keys<'a>(&'a [IntegrityKey]);

impl Keys<'_> {
    /// Whether `link` is the link of the line whose own bytes are `open` + `}` after `prev`,
    /// under any of the keys.
    fn hold(&self, prev: Option<&[u8]>, open: &[u8], link: &[u8]) -> bool {
        if self.0.is_empty() {
            return chain::link_of_parts(prev, open, None)[..] == *link;
        }
        self.0
            .iter()
            .any(|key| chain::link_of_parts(prev, open, Some(key))[..] == *link)
    }

    /// What to suspect when not even the first record holds.
    fn hint(&self) -> &'static str {
        if self.0.is_empty() {
            "links were checked as plain SHA-256: if the gateway writes with \
             audit.integrity_key_file, give that key with --integrity-key-file"
        } else {
            "no key given makes this link: the key may be wrong, or the trail may not be keyed"
        }
    }
}

/// Where a line is: an index into the trail's files, and its 1-based line in that file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct At {
    file: usize,
    line: u64,
}

/// What broke a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Removed,
    Changed,
    Reordered,
    Restart,
    Unchained,
    Damaged,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Removed => "removed",
            Self::Changed => "changed",
            Self::Reordered => "reordered",
            Self::Restart => "restart",
            Self::Unchained => "unchained",
            Self::Damaged => "damaged",
        }
    }
}

/// The first link that does not hold.
#[derive(Debug)]
pub(super) struct Broken {
    at: At,
    kind: Kind,
    detail: String,
}

/// What the walk found.
#[derive(Debug)]
pub(super) struct Report {
    files: Vec<PathBuf>,
    /// Records whose link holds, per file.
    per_file: Vec<u64>,
    /// The trail's first record follows a record no longer in it (rotated out, or removed):
    /// the links from the second record on are checked, the first one's cannot be.
    starts_mid_chain: bool,
    broken: Option<Broken>,
}

impl Report {
    /// Records whose link holds: all of them, or those before the broken one.
    fn records(&self) -> u64 {
        self.per_file.iter().sum()
    }

    fn place(&self, at: At) -> String {
        format!("{}:{}", self.files[at.file].display(), at.line)
    }

    /// What `--verify` prints without `--json`.
    fn text(&self) -> String {
        let mut text = String::new();
        let files = self.files.len();
        match &self.broken {
            None => {
                let _ = writeln!(
                    text,
                    "{} in {}, every link holds:",
                    count(self.records(), "record"),
                    count(files as u64, "file")
                );
                for (file, records) in self.files.iter().zip(&self.per_file) {
                    let _ = writeln!(text, "  {} ({})", file.display(), count(*records, "record"));
                }
                if self.starts_mid_chain {
                    let _ = writeln!(
                        text,
                        "the trail starts after records it no longer holds (older files rotated \
                         out, or removed): its first record's own link cannot be checked"
                    );
                }
            }
            Some(broken) => {
                let _ = writeln!(
                    text,
                    "first broken link: {}: {}: {}",
                    self.place(broken.at),
                    broken.kind.name(),
                    broken.detail
                );
                let _ = writeln!(
                    text,
                    "{} before it hold; the trail, oldest first:",
                    count(self.records(), "record")
                );
                for file in &self.files {
                    let _ = writeln!(text, "  {}", file.display());
                }
            }
        }
        text
    }

    /// What `--verify --json` prints: one JSON document, its members in the documented order.
    fn json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Document<'a> {
            ok: bool,
            records: u64,
            files: Vec<Cow<'a, str>>,
            starts_mid_chain: bool,
            broken: Option<BrokenLink<'a>>,
        }
        #[derive(serde::Serialize)]
        struct BrokenLink<'a> {
            file: Cow<'a, str>,
            line: u64,
            kind: &'static str,
            detail: &'a str,
        }
        let document = Document {
            ok: self.broken.is_none(),
            records: self.records(),
            files: self
                .files
                .iter()
                .map(|file| file.to_string_lossy())
                .collect(),
            starts_mid_chain: self.starts_mid_chain,
            broken: self.broken.as_ref().map(|broken| BrokenLink {
                file: self.files[broken.at.file].to_string_lossy(),
                line: broken.at.line,
                kind: broken.kind.name(),
                detail: &broken.detail,
            }),
        };
        let mut text = serde_json::to_string(&document).expect("the verdict serializes");
        text.push('\n');
        text
    }
}

/// `1 record`, `3 files`.
fn count(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// One line of the trail as read, without its newline.
struct Item {
    at: At,
    bytes: Vec<u8>,
    /// A newline ended it (the last line of a file cut short has none).
    ended: bool,
    /// Set when the file could not be read past here (a damaged `.gz`).
    unreadable: Option<String>,
}

/// The lines of the trail's files, one file after the other.
struct Reader<'a> {
    files: &'a [PathBuf],
    file: usize,
    lines: Option<Box<dyn io::BufRead>>,
    line: u64,
}

impl<'a> Reader<'a> {
    fn new(files: &'a [PathBuf]) -> Self {
        Self {
            files,
            file: 0,
            lines: None,
            line: 0,
        }
    }

    /// The next line; an error when a file cannot be opened or read (not when a `.gz` turns
    /// out to be damaged: that is a damaged line, in the trail).
    fn next_line(&mut self) -> Result<Option<Item>, String> {
        loop {
            let Some(path) = self.files.get(self.file) else {
                return Ok(None);
            };
            let lines = match &mut self.lines {
                Some(lines) => lines,
                None => {
                    self.line = 0;
                    self.lines.insert(
                        open_lines(path)
                            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
                    )
                }
            };
            let mut bytes = Vec::with_capacity(512);
            let read = lines.read_until(b'\n', &mut bytes);
            let at = At {
                file: self.file,
                line: self.line + 1,
            };
            match read {
                Ok(0) => {
                    self.lines = None;
                    self.file += 1;
                }
                Ok(_) => {
                    self.line += 1;
                    let ended = bytes.last() == Some(&b'\n');
                    if ended {
                        bytes.pop();
                    }
                    return Ok(Some(Item {
                        at,
                        bytes,
                        ended,
                        unreadable: None,
                    }));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::InvalidData
                            | io::ErrorKind::InvalidInput
                            | io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    // Bad compressed data: nothing more of this file can be read.
                    self.lines = None;
                    self.file += 1;
                    return Ok(Some(Item {
                        at,
                        bytes: Vec::new(),
                        ended: false,
                        unreadable: Some(format!("the file cannot be read from here on: {e}")),
                    }));
                }
                Err(e) => {
                    return Err(format!(
                        "cannot read {} after line {}: {e}",
                        path.display(),
                        self.line
                    ))
                }
            }
        }
    }
}

/// A line of the trail as the chain sees it.
enum Line<'a> {
    Chained {
        open: &'a [u8],
        link: &'a [u8],
        restart: bool,
    },
    Unchained,
    Damaged(&'static str),
}

fn read_line(item: &Item) -> Line<'_> {
    if item.unreadable.is_some() {
        return Line::Damaged("the compressed file is damaged");
    }
    if let Some((open, link)) = chain::split(&item.bytes) {
        let restart = chain::starts_new_chain(open);
        return Line::Chained {
            open,
            link,
            restart,
        };
    }
    if item.bytes.is_empty() {
        return Line::Damaged("an empty line, which the gateway never writes");
    }
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&item.bytes) {
        Ok(members) if members.contains_key("chain") => Line::Damaged(
            "its chain member is not a link as the gateway writes one (64 lowercase hex \
             characters, the last member)",
        ),
        Ok(_) => Line::Unchained,
        Err(_) if !item.ended => {
            Line::Damaged("the line is cut short: not a whole record, and no newline ends it")
        }
        Err(_) => Line::Damaged("not a whole record: the line is not a JSON object"),
    }
}

/// Walks the trail, oldest file first, and reports the first link that does not hold.
pub(super) fn verify(files: &[PathBuf], keys: &[IntegrityKey]) -> Result<Report, String> {
    let keys = Keys(keys);
    let mut report = Report {
        files: files.to_vec(),
        per_file: vec![0; files.len()],
        starts_mid_chain: false,
        broken: None,
    };
    let mut reader = Reader::new(files);
    // The link of the last record that held, and where it is.
    let mut prev: Option<([u8; LINK_LEN], At)> = None;
    // Lines read ahead to judge the one before them, to be checked in their turn.
    let mut ahead: std::collections::VecDeque<Item> = std::collections::VecDeque::new();
    loop {
        let item = match ahead.pop_front() {
            Some(item) => item,
            None => match reader.next_line()? {
                Some(item) => item,
                None => break,
            },
        };
        let found = |kind, detail: &str| Broken {
            at: item.at,
            kind,
            detail: match &item.unreadable {
                Some(why) => format!("{detail}: {why}"),
                None => detail.to_owned(),
            },
        };
        let (open, link, restart) = match read_line(&item) {
            Line::Chained {
                open,
                link,
                restart,
            } => (open, link, restart),
            Line::Unchained => {
                report.broken = Some(found(
                    Kind::Unchained,
                    "a record without a chain member: written before the chain existed, or \
                     not by the gateway",
                ));
                break;
            }
            Line::Damaged(why) => {
                report.broken = Some(found(Kind::Damaged, why));
                break;
            }
        };
        if restart && prev.is_some() {
            report.broken = Some(found(
                Kind::Restart,
                "the record starts a new chain (chain_restart): the gateway could not read \
                 the link before it, so nothing ties the records before it to those after \
                 (its log at that time says why)",
            ));
            break;
        }
        let expected = match &prev {
            Some((link, _)) if !restart => Some(&link[..]),
            _ => None,
        };
        if keys.hold(expected, open, link) {
            let mut held = [0; LINK_LEN];
            held.copy_from_slice(link);
            prev = Some((held, item.at));
            report.per_file[item.at.file] += 1;
            continue;
        }
        // One record ahead is enough for most verdicts; a read error there only means less
        // to go on.
        let next = reader.next_line().ok().flatten();
        // The trail's first record, followed by the next one: the records before it are gone,
        // as `rotate N` in logrotate removes the oldest files. That is where the trail starts.
        let next_follows = next.as_ref().is_some_and(|next| match read_line(next) {
            Line::Chained {
                open: next_open,
                link: next_link,
                restart: false,
            } => keys.hold(Some(link), next_open, next_link),
            _ => false,
        });
        // Or the trail starts mid-chain and its second record is the broken one: the record
        // after that one follows it, so the links do work under the keys given, and the break
        // is at the second record, not at the first (whose own bytes cannot be checked).
        let mut after_next = None;
        if prev.is_none() && !restart && !next_follows {
            if let Some(Line::Chained {
                link: next_link,
                restart: false,
                ..
            }) = next.as_ref().map(read_line)
            {
                after_next = reader.next_line().ok().flatten();
                let follows_next =
                    after_next
                        .as_ref()
                        .is_some_and(|after| match read_line(after) {
                            Line::Chained {
                                open: after_open,
                                link: after_link,
                                restart: false,
                            } => keys.hold(Some(next_link), after_open, after_link),
                            _ => false,
                        });
                if !follows_next {
                    after_next = None;
                }
            }
        }
        if prev.is_none() && !restart && (next_follows || after_next.is_some()) {
            let mut held = [0; LINK_LEN];
            held.copy_from_slice(link);
            prev = Some((held, item.at));
            report.starts_mid_chain = true;
            report.per_file[item.at.file] += 1;
            ahead.extend(next);
            ahead.extend(after_next);
            continue;
        }
        let (kind, detail) = classify(
            files,
            &keys,
            &item,
            (open, link),
            prev.as_ref().map(|(link, at)| (&link[..], *at)),
            next.as_ref(),
        );
        report.broken = Some(Broken {
            at: item.at,
            kind,
            detail,
        });
        break;
    }
    Ok(report)
}

/// Why the link of the chained record `item` (`open`, `link`) does not hold after `prev`, the
/// last record that held (none if this is the trail's first), given the record after it.
fn classify(
    files: &[PathBuf],
    keys: &Keys<'_>,
    item: &Item,
    (open, link): (&[u8], &[u8]),
    prev: Option<(&[u8], At)>,
    next: Option<&Item>,
) -> (Kind, String) {
    let place = |at: At| format!("{}:{}", files[at.file].display(), at.line);
    let mut own = open.to_vec();
    own.push(b'}');
    if serde_json::from_slice::<serde::de::IgnoredAny>(&own).is_err() {
        return (
            Kind::Damaged,
            "the record without its link is not JSON: the line was cut or damaged".into(),
        );
    }
    let next = next.and_then(|next| match read_line(next) {
        Line::Chained {
            open,
            link,
            restart: false,
        } => Some((open, link)),
        _ => None,
    });
    let next_follows = |target: Option<&[u8]>| {
        next.is_some_and(|(next_open, next_link)| keys.hold(target, next_open, next_link))
    };

    // The record after this one links straight to the one before: this one is out of place.
    if next_follows(prev.map(|(link, _)| link)) {
        let before = prev.map_or_else(
            || "starts the trail itself".to_owned(),
            |(_, at)| format!("follows {} directly", place(at)),
        );
        return (
            Kind::Reordered,
            format!("the record after this one {before}: this record was moved here or inserted"),
        );
    }
    // This record's link holds after some other record of the trail.
    if let Some(origin) = find_predecessor(files, keys, item.at, prev.map(|(_, at)| at), open, link)
    {
        let detail = if origin > item.at {
            format!(
                "its link follows {}, which comes later in the trail: records were moved",
                place(origin)
            )
        } else {
            format!(
                "its link follows {}, not the record right before it: it is a copy of a \
                 record from further back, or the records between were inserted",
                place(origin)
            )
        };
        return (Kind::Reordered, detail);
    }

    let followed = next_follows(Some(link)) || next.is_none();
    match prev {
        None if next_follows(Some(link)) => (
            Kind::Removed,
            "the first record of the trail follows a record that is not in it: older records \
             are missing (rotated files deleted, or the start of this file cut), or this \
             record was changed"
                .into(),
        ),
        None => (
            Kind::Changed,
            format!("the first record does not match its link; {}", keys.hint()),
        ),
        Some((_, before)) if before.file != item.at.file && followed => (
            Kind::Removed,
            format!(
                "the first record of this file does not follow the last record before it \
                 ({}): the records between are missing (the end of that file cut, or a \
                 rotated file between them deleted)",
                place(before)
            ),
        ),
        Some((_, before)) if followed => (
            Kind::Changed,
            format!(
                "the record does not match its link after the record before it ({}), while \
                 the record after it does follow it: this record was changed, or records \
                 between the two were removed (a hash chain cannot tell which)",
                place(before)
            ),
        ),
        Some((_, before)) => (
            Kind::Changed,
            format!(
                "the record does not match its link after the record before it ({}), and \
                 the record after it does not follow it either: this record was changed \
                 along with its link, or replaced; or the key changed here ({})",
                place(before),
                keys.hint()
            ),
        ),
    }
}

/// The first record of the trail, other than `at` itself and `prev`, after whose link the
/// record at `at` holds. Reads the trail once more; a file that cannot be read ends the search.
fn find_predecessor(
    files: &[PathBuf],
    keys: &Keys<'_>,
    at: At,
    prev: Option<At>,
    open: &[u8],
    link: &[u8],
) -> Option<At> {
    let mut reader = Reader::new(files);
    while let Ok(Some(item)) = reader.next_line() {
        if item.at == at || Some(item.at) == prev {
            continue;
        }
        if let Line::Chained {
            link: candidate, ..
        } = read_line(&item)
        {
            if keys.hold(Some(candidate), open, link) {
                return Some(item.at);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write as _;
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use flate2::write::GzEncoder;

    use super::*;

    /// Never in any output: the tests below look for this very string.
    const KEY: &[u8] = b"k3y-of-the-audit-trail-5e1f";
    const OTHER_KEY: &[u8] = b"another-key-7a0c";

    fn key(bytes: &[u8]) -> IntegrityKey {
        IntegrityKey::from_file_bytes(bytes).unwrap()
    }

    /// The own bytes of the `n`th record of a made-up trail.
    fn own(n: usize) -> String {
        format!(
            r#"{{"ts":"2026-12-01T00:{:02}:{:02}Z","caller":"alice","route":"test_connection","data_source_id":{n},"status":200,"outcome":"forwarded"}}"#,
            n / 60 % 60,
            n % 60
        )
    }

    /// `own` as the writer puts it in the file: with its link after `prev`.
    fn chained(prev: Option<&str>, own: &str, key: Option<&IntegrityKey>) -> String {
        let link = chain::link(prev.map(str::as_bytes), own.as_bytes(), key);
        let open = own.strip_suffix('}').unwrap();
        format!(
            "{open},\"chain\":\"{}\"}}",
            std::str::from_utf8(&link).unwrap()
        )
    }

    fn link_of(line: &str) -> &str {
        std::str::from_utf8(chain::split(line.as_bytes()).unwrap().1).unwrap()
    }

    /// `n` records in one chain, the first linking to nothing.
    fn trail(n: usize, key: Option<&IntegrityKey>) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        for i in 0..n {
            let prev = lines.last().map(|line| link_of(line).to_owned());
            lines.push(chained(prev.as_deref(), &own(i), key));
        }
        lines
    }

    fn text(lines: &[String]) -> String {
        lines.iter().map(|line| format!("{line}\n")).collect()
    }

    /// A file of `contents`, modified `age` ago (the trail's order is by modification time).
    fn write(path: &Path, contents: &[u8], age: u64) {
        let mut file = File::create(path).unwrap();
        if path.extension().is_some_and(|ext| ext == "gz") {
            let mut gzip = GzEncoder::new(&mut file, flate2::Compression::default());
            gzip.write_all(contents).unwrap();
            gzip.finish().unwrap();
        } else {
            file.write_all(contents).unwrap();
        }
        file.set_modified(SystemTime::now() - Duration::from_secs(age))
            .unwrap();
    }

    /// A trail of 12 records, 4 each in `audit.jsonl.2.gz`, `audit.jsonl.1` and `audit.jsonl`,
    /// after `edit` had its way with the lines of each (by file, oldest first).
    struct Trail {
        dir: tempfile::TempDir,
    }

    impl Trail {
        fn new(key: Option<&IntegrityKey>, edit: impl FnOnce(&mut [Vec<String>; 3])) -> Self {
            let lines = trail(12, key);
            let mut files = [
                lines[..4].to_vec(),
                lines[4..8].to_vec(),
                lines[8..].to_vec(),
            ];
            edit(&mut files);
            Self::of(files.map(|lines| text(&lines).into_bytes()))
        }

        fn of(files: [Vec<u8>; 3]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let [oldest, rotated, live] = files;
            write(&dir.path().join("audit.jsonl.2.gz"), &oldest, 200);
            write(&dir.path().join("audit.jsonl.1"), &rotated, 100);
            write(&dir.path().join("audit.jsonl"), &live, 0);
            Self { dir }
        }

        fn check(&self, keys: &[IntegrityKey]) -> Report {
            let files = trail_files(&self.dir.path().join("audit.jsonl"), true).unwrap();
            verify(&files, keys).unwrap()
        }
    }

    /// The broken link's file name, line and kind.
    fn broken(report: &Report) -> (String, u64, Kind) {
        let broken = report.broken.as_ref().expect("a broken link");
        let name = report.files[broken.at.file].file_name().unwrap();
        (
            name.to_string_lossy().into_owned(),
            broken.at.line,
            broken.kind,
        )
    }

    fn at(name: &str, line: u64, kind: Kind) -> (String, u64, Kind) {
        (name.to_owned(), line, kind)
    }

    #[test]
    fn an_untouched_trail_over_a_gz_a_rotated_and_the_live_file_holds() {
        let report = Trail::new(None, |_| {}).check(&[]);
        assert!(report.broken.is_none(), "{report:?}");
        assert_eq!(report.records(), 12);
        assert_eq!(report.per_file, [4, 4, 4]);
        let names: Vec<_> = report
            .files
            .iter()
            .map(|file| file.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["audit.jsonl.2.gz", "audit.jsonl.1", "audit.jsonl"]);
        let text = report.text();
        assert!(
            text.starts_with("12 records in 3 files, every link holds"),
            "{text}"
        );
        assert!(text.contains("audit.jsonl.2.gz (4 records)"), "{text}");
    }

    #[test]
    fn a_record_deleted_inside_a_file_shows_at_the_record_after_it() {
        let report = Trail::new(None, |files| {
            files[1].remove(1);
        })
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl.1", 2, Kind::Changed));
        assert_eq!(report.records(), 5);
        let detail = &report.broken.as_ref().unwrap().detail;
        assert!(detail.contains("removed"), "{detail}");
    }

    #[test]
    fn records_deleted_at_a_file_boundary_are_removed() {
        // The last record of the rotated file.
        let report = Trail::new(None, |files| {
            files[1].pop();
        })
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl", 1, Kind::Removed));
        let detail = &report.broken.as_ref().unwrap().detail;
        assert!(detail.contains("audit.jsonl.1:3"), "{detail}");
        // The first record of the live file.
        let report = Trail::new(None, |files| {
            files[2].remove(0);
        })
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl", 1, Kind::Removed));
        // A whole rotated file.
        let report = Trail::new(None, |files| files[1].clear()).check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl", 1, Kind::Removed));
        // The start of the trail, as logrotate's `rotate N` removes it: checked from there on.
        let report = Trail::new(None, |files| {
            files[0].remove(0);
        })
        .check(&[]);
        assert!(report.broken.is_none(), "{:?}", report.broken);
        assert!(report.starts_mid_chain);
        assert!(
            report.text().contains("no longer holds"),
            "{}",
            report.text()
        );
        // ...but a changed record right after that start is still found, at its own line.
        let report = Trail::new(None, |files| {
            files[0].remove(0);
            files[0][1] = files[0][1].replace("\"status\":", "\"status\":1");
        })
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl.2.gz", 2, Kind::Changed));
    }

    #[test]
    fn an_edited_field_is_a_changed_record() {
        let report = Trail::new(None, |files| {
            files[1][2] = files[1][2].replace("\"alice\"", "\"mallory\"");
        })
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl.1", 3, Kind::Changed));
        assert_eq!(report.records(), 6);
    }

    #[test]
    fn swapped_records_are_reordered() {
        // Neighbours.
        let report = Trail::new(None, |files| files[2].swap(1, 2)).check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl", 2, Kind::Reordered));
        // Two records apart, and across files.
        let report = Trail::new(None, |files| files[1].swap(0, 3)).check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl.1", 1, Kind::Reordered));
        let report = Trail::new(None, |files| {
            let last = files[1].pop().unwrap();
            files[2].insert(0, last);
            let first = files[2].remove(1);
            files[1].push(first);
        })
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl.1", 4, Kind::Reordered));
        // A copy of an earlier record.
        let report = Trail::new(None, |files| {
            let copy = files[0][1].clone();
            files[1].insert(2, copy);
        })
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl.1", 3, Kind::Reordered));
    }

    #[test]
    fn a_file_cut_mid_line_is_damaged() {
        let lines = trail(12, None);
        let cut = |lines: &[String]| {
            let mut bytes = text(lines).into_bytes();
            bytes.truncate(bytes.len() - 40);
            bytes
        };
        // The live file, its last line half written.
        let report = Trail::of([
            text(&lines[..4]).into_bytes(),
            text(&lines[4..8]).into_bytes(),
            cut(&lines[8..]),
        ])
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl", 4, Kind::Damaged));
        assert_eq!(report.records(), 11);
        // A rotated file cut short, the next file going on.
        let report = Trail::of([
            text(&lines[..4]).into_bytes(),
            cut(&lines[4..8]),
            text(&lines[8..]).into_bytes(),
        ])
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl.1", 4, Kind::Damaged));
        // A gzip file cut short.
        let gz = Trail::new(None, |_| {});
        let path = gz.dir.path().join("audit.jsonl.2.gz");
        let bytes = std::fs::read(&path).unwrap();
        write(&path, &bytes[..bytes.len() / 2], 200);
        let report = gz.check(&[]);
        let (name, _, kind) = broken(&report);
        assert_eq!((name.as_str(), kind), ("audit.jsonl.2.gz", Kind::Damaged));
    }

    #[test]
    fn lines_that_are_not_chained_records_say_so() {
        let report = Trail::new(None, |files| files[1][1] = own(5)).check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl.1", 2, Kind::Unchained));
        let report = Trail::new(None, |files| files[2].insert(2, String::new())).check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl", 3, Kind::Damaged));
        let report = Trail::new(None, |files| files[0][0] = "garbage".into()).check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl.2.gz", 1, Kind::Damaged));
        // A well-formed tail stuck to the remains of a cut line.
        let report = Trail::new(None, |files| {
            files[2][1] = format!("{{\"ts\":\"2026{}", files[2][1]);
        })
        .check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl", 2, Kind::Damaged));
    }

    /// A trail whose record `at` (0-based, over all 12) starts a new chain.
    fn restarted_at(at: usize) -> Trail {
        Trail::new(None, |files| {
            let mut lines: Vec<String> = files.concat();
            let mut prev: Option<String> = None;
            for (i, line) in lines.iter_mut().enumerate() {
                let (open, _) = chain::split(line.as_bytes()).unwrap();
                let mut own = String::from_utf8(open.to_vec()).unwrap();
                if i == at {
                    own.push_str(",\"chain_restart\":true");
                    prev = None;
                }
                own.push('}');
                *line = chained(prev.as_deref(), &own, None);
                prev = Some(link_of(line).to_owned());
            }
            for (n, file) in files.iter_mut().enumerate() {
                *file = lines[n * 4..n * 4 + 4].to_vec();
            }
        })
    }

    #[test]
    fn a_restart_after_the_first_record_is_reported() {
        let report = restarted_at(9).check(&[]);
        assert_eq!(broken(&report), at("audit.jsonl", 2, Kind::Restart));
        // The very first record may carry it: it links to nothing anyway.
        assert!(restarted_at(0).check(&[]).broken.is_none());
    }

    #[test]
    fn a_keyed_trail_holds_only_under_its_key() {
        let right = key(KEY);
        let wrong = key(OTHER_KEY);
        let trail = Trail::new(Some(&right), |_| {});
        for keys in [vec![], vec![wrong.clone()]] {
            let report = trail.check(&keys);
            assert_eq!(broken(&report), at("audit.jsonl.2.gz", 1, Kind::Changed));
            let detail = &report.broken.as_ref().unwrap().detail;
            assert!(detail.contains("key"), "{detail}");
        }
        let report = trail.check(&[wrong, right]);
        assert!(report.broken.is_none(), "{report:?}");
        assert_eq!(report.records(), 12);
    }

    #[test]
    fn a_trail_whose_key_rotated_holds_under_both_keys() {
        let old = key(OTHER_KEY);
        let new = key(KEY);
        let trail = Trail::new(None, |files| {
            let mut prev: Option<String> = None;
            for (n, file) in files.iter_mut().enumerate() {
                for (i, line) in file.iter_mut().enumerate() {
                    let signer = if n == 2 { &new } else { &old };
                    *line = chained(prev.as_deref(), &own(n * 4 + i), Some(signer));
                    prev = Some(link_of(line).to_owned());
                }
            }
        });
        assert!(trail.check(&[old.clone(), new.clone()]).broken.is_none());
        // Without the new key, the first record it made breaks, and the key is suspected.
        let report = trail.check(&[old]);
        assert_eq!(broken(&report), at("audit.jsonl", 1, Kind::Changed));
        let detail = &report.broken.as_ref().unwrap().detail;
        assert!(detail.contains("key may be wrong"), "{detail}");
    }

    #[test]
    fn no_output_shows_the_key() {
        let right = key(KEY);
        let wrong = key(OTHER_KEY);
        let good = Trail::new(Some(&right), |_| {});
        let bad = Trail::new(Some(&right), |files| files[1].swap(0, 1));
        let secret = std::str::from_utf8(KEY).unwrap();
        let other = std::str::from_utf8(OTHER_KEY).unwrap();
        for keys in [
            vec![right.clone()],
            vec![wrong.clone(), right.clone()],
            vec![wrong],
        ] {
            for report in [good.check(&keys), bad.check(&keys)] {
                for output in [report.text(), report.json(), format!("{report:?}")] {
                    assert!(!output.contains(secret), "{output}");
                    assert!(!output.contains(other), "{output}");
                }
            }
        }
        // Nor the errors about key files.
        let dir = tempfile::tempdir().unwrap();
        let blank = dir.path().join("blank.key");
        std::fs::write(&blank, " \n").unwrap();
        let large = dir.path().join("large.key");
        std::fs::write(&large, secret.repeat(1000)).unwrap();
        for path in [blank, large, dir.path().join("missing.key")] {
            let err = read_keys(std::slice::from_ref(&path)).unwrap_err();
            assert!(err.contains(path.to_str().unwrap()), "{err}");
            assert!(!err.contains(secret), "{err}");
        }
        let good_key = dir.path().join("good.key");
        std::fs::write(&good_key, [KEY, b"\n"].concat()).unwrap();
        let keys = read_keys(&[good_key]).unwrap();
        assert!(!format!("{keys:?}").contains(secret));
    }

    #[test]
    fn the_json_document_names_the_first_broken_link() {
        let trail = Trail::new(None, |files| {
            files[1][2] = files[1][2].replace("forwarded", "rejected");
        });
        let report = trail.check(&[]);
        let document: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(document["ok"], false);
        assert_eq!(document["records"], 6);
        assert_eq!(document["files"].as_array().unwrap().len(), 3);
        assert!(document["broken"]["file"]
            .as_str()
            .unwrap()
            .ends_with("audit.jsonl.1"));
        assert_eq!(document["broken"]["line"], 3);
        assert_eq!(document["broken"]["kind"], "changed");
        let text = report.text();
        assert!(
            text.starts_with("first broken link: ") && text.contains("audit.jsonl.1:3: changed: "),
            "{text}"
        );
        let report = Trail::new(None, |_| {}).check(&[]);
        let document: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(document["ok"], true);
        assert_eq!(document["records"], 12);
        assert!(document["broken"].is_null());
    }
}
