//! The audit trail's hash chain: each record carries a `chain` field that links it to the record
//! before it, so that a record removed, changed or moved shows.
//!
//! A record's line is the JSON object the gateway writes, ending in the member
//! `,"chain":"<64 lowercase hex>"}`. Its *own bytes* are that line without the member (the
//! object closed right after its other members) and without the newline. Its link is
//!
//! ```text
//! chain = hex(SHA-256(prev || "\n" || own bytes))          without an integrity key
//! chain = hex(HMAC-SHA256(key, prev || "\n" || own bytes)) with `audit.integrity_key_file`
//! ```
//!
//! where `prev` is the previous record's `chain` as its 64 hex characters, or nothing for the
//! first record of a trail and for a record that starts a new chain. A record that starts a new
//! chain because the previous one could not be read carries `"chain_restart":true` among its own
//! bytes (so it is covered by its link too).
//!
//! The writer (`audit/mod.rs`) links each record as it goes into the file, in file order; the
//! verifier (`datafold-gateway audit --verify`) walks the file and its rotated siblings and
//! recomputes every link.

use std::path::{Path, PathBuf};

use ring::{digest, hmac};

use crate::files::{self, FileError};

/// What ends every chained line: this, the link's 64 hex characters, `"}`.
pub const MEMBER: &[u8] = b",\"chain\":\"";

/// What a record that starts a new chain carries among its own bytes.
pub const RESTART_MEMBER: &[u8] = b",\"chain_restart\":true";

/// The length of a link in hex.
pub const LINK_LEN: usize = 64;

/// The key of a keyed chain (`audit.integrity_key_file`). Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct IntegrityKey(hmac::Key);

impl IntegrityKey {
    /// The key made from the bytes of a key file, surrounding whitespace (a trailing newline)
    /// left out; `None` when nothing is left.
    pub fn from_file_bytes(bytes: &[u8]) -> Option<Self> {
        let key = bytes.trim_ascii();
        (!key.is_empty()).then(|| Self(hmac::Key::new(hmac::HMAC_SHA256, key)))
    }
}

impl std::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntegrityKey(<redacted>)")
    }
}

/// Why a key file gave no key. Names the file, never its contents; whoever reports it says
/// which setting (`audit.integrity_key_file`) or flag named the file.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityKeyError {
    /// The file could not be read (missing, not a regular file, too large, ...).
    #[error(transparent)]
    File(#[from] FileError),
    /// The file holds nothing but whitespace.
    #[error("{} is empty (or only whitespace)", .0.display())]
    Empty(PathBuf),
}

/// Reads the key of a keyed chain from `path` (blocking: at start, or off the runtime).
pub fn load_key(path: &Path) -> Result<IntegrityKey, IntegrityKeyError> {
    let contents = files::read_regular(path, files::KEY_FILE_CAP)?;
    IntegrityKey::from_file_bytes(&contents.bytes)
        .ok_or_else(|| IntegrityKeyError::Empty(path.to_owned()))
}

/// The link of a record whose own bytes are `own`, after the record whose link is `prev` (none
/// for the first record of a chain), as 64 lowercase hex characters.
pub fn link(prev: Option<&[u8]>, own: &[u8], key: Option<&IntegrityKey>) -> [u8; LINK_LEN] {
    let prev = prev.unwrap_or_default();
    let mut hex = [0u8; LINK_LEN];
    let encode = |tag: &[u8], hex: &mut [u8; LINK_LEN]| {
        hex::encode_to_slice(tag, hex).expect("32 bytes are 64 hex characters");
    };
    match key {
        Some(IntegrityKey(key)) => {
            let mut context = hmac::Context::with_key(key);
            context.update(prev);
            context.update(b"\n");
            context.update(own);
            encode(context.sign().as_ref(), &mut hex);
        }
        None => {
            let mut context = digest::Context::new(&digest::SHA256);
            context.update(prev);
            context.update(b"\n");
            context.update(own);
            encode(context.finish().as_ref(), &mut hex);
        }
    }
    hex
}

/// A chained line (without its newline) split into its own bytes, less the closing `}` (`open`:
/// the own bytes are `open` then `}`), and its link. `None` if the line does not end in a
/// well-formed `chain` member.
pub fn split(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let tail_len = MEMBER.len() + LINK_LEN + 2;
    let cut = line.len().checked_sub(tail_len)?;
    let (open, tail) = line.split_at(cut);
    let link = tail.strip_prefix(MEMBER)?.strip_suffix(b"\"}")?;
    let well_formed = link
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    (well_formed && !open.is_empty()).then_some((open, link))
}

/// The link of a chained line (`split`'s parts): `open` + `}` is hashed.
pub fn link_of_parts(
    prev: Option<&[u8]>,
    open: &[u8],
    key: Option<&IntegrityKey>,
) -> [u8; LINK_LEN] {
    // The own bytes are `open` followed by the object's closing brace.
    let mut own = Vec::with_capacity(open.len() + 1);
    own.extend_from_slice(open);
    own.push(b'}');
    link(prev, &own, key)
}

/// Whether a chained line's own bytes (`split`'s `open`) carry [`RESTART_MEMBER`], so that its
/// link was made with no previous link. JSON escapes every `"` inside a string, so a field's
/// value cannot look like the member.
pub fn starts_new_chain(open: &[u8]) -> bool {
    open.windows(RESTART_MEMBER.len())
        .any(|window| window == RESTART_MEMBER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_splits_into_what_its_link_covers() {
        let own = br#"{"status":200}"#;
        let link = link(None, own, None);
        let mut line = own[..own.len() - 1].to_vec();
        line.extend_from_slice(MEMBER);
        line.extend_from_slice(&link);
        line.extend_from_slice(b"\"}");
        let (open, found) = split(&line).unwrap();
        assert_eq!(found, &link[..]);
        assert_eq!(link_of_parts(None, open, None), link);
    }

    #[test]
    fn links_depend_on_the_previous_link_the_bytes_and_the_key() {
        let own = br#"{"status":200}"#;
        let first = link(None, own, None);
        assert_ne!(link(Some(&first), own, None), first);
        assert_ne!(link(None, br#"{"status":201}"#, None), first);
        let key = IntegrityKey::from_file_bytes(b"k3y-of-the-audit\n").unwrap();
        let other = IntegrityKey::from_file_bytes(b"another-key").unwrap();
        assert_ne!(link(None, own, Some(&key)), first);
        assert_ne!(link(None, own, Some(&key)), link(None, own, Some(&other)));
        // SHA-256 of "\n" followed by the bytes, as the module documents.
        let plain = digest::digest(&digest::SHA256, b"\n{\"status\":200}");
        assert_eq!(first.to_vec(), hex::encode(plain).into_bytes());
    }

    #[test]
    fn lines_without_a_well_formed_chain_member_do_not_split() {
        assert!(split(br#"{"status":200}"#).is_none());
        let upper = format!("{{\"a\":1,\"chain\":\"{}\"}}", "A".repeat(64));
        assert!(split(upper.as_bytes()).is_none());
        let short = format!("{{\"a\":1,\"chain\":\"{}\"}}", "a".repeat(63));
        assert!(split(short.as_bytes()).is_none());
    }

    #[test]
    fn a_restart_is_the_member_not_a_value_that_names_it() {
        assert!(starts_new_chain(br#"{"status":200,"chain_restart":true"#));
        assert!(!starts_new_chain(
            br#"{"path":"/x\",\"chain_restart\":true"#
        ));
        assert!(!starts_new_chain(br#"{"status":200,"chain_restart":false"#));
    }

    #[test]
    fn the_key_is_not_in_debug_output() {
        let key = IntegrityKey::from_file_bytes(b"s3cret-integrity-key").unwrap();
        assert!(!format!("{key:?}").contains("s3cret"));
        assert!(IntegrityKey::from_file_bytes(b" \n").is_none());
    }
}
