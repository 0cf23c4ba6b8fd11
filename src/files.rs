//! Reading the key file and the config file without letting a bad file stop the gateway.
//!
//! A plain `read_to_string` trusts the path: a FIFO there blocks forever (at start, or on the
//! async runtime during a reload, where it stops the listeners and shutdown), and `/dev/zero`
//! fills memory. [`read_regular`] opens without blocking, refuses anything but a regular file
//! (after following symlinks, which Kubernetes Secrets and ConfigMaps are made of), and reads
//! at most a cap. [`off_runtime`] runs such a load on tokio's blocking pool under a deadline, so
//! a hung filesystem (NFS) costs a reload, not the gateway.

use std::fmt;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest API key file read. A key is well under 200 bytes; 4 KiB leaves room for comments
/// or a PEM-like wrapper someone may add, and refuses a wrong file at once.
pub const KEY_FILE_CAP: u64 = 4 * 1024;

/// Largest config file read. The shipped config is about 4 KiB; thousands of
/// `[[callers.token]]` entries still fit.
pub const CONFIG_FILE_CAP: u64 = 1024 * 1024;

/// How long a reload waits for a file before giving up on it. A local file answers in
/// microseconds; only a hung filesystem takes this long.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Why a file was not read; names the file, never quotes its contents.
#[derive(Debug)]
pub struct FileError {
    path: PathBuf,
    problem: String,
}

impl FileError {
    fn new(path: &Path, problem: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            problem: problem.into(),
        }
    }

    /// What is wrong, without the file's name (for messages that name it already).
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot read {}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for FileError {}

/// A file's bytes, and its permission bits and group as they were when it was read.
pub struct Contents {
    pub bytes: Vec<u8>,
    /// `st_mode & 0o7777` of the file itself (symlinks followed).
    pub mode: u32,
    pub gid: u32,
}

/// Reads `path`, which must be (or link to) a regular file of at most `cap` bytes.
///
/// Blocking: call it at start, or through [`off_runtime`] from async code.
pub fn read_regular(path: &Path, cap: u64) -> Result<Contents, FileError> {
    // O_NONBLOCK: opening a FIFO without it waits for a writer, forever. It changes nothing for
    // a regular file. O_NOCTTY: a terminal device must not become our controlling terminal.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match std::fs::metadata(path) {
            // A socket cannot be opened at all (ENXIO); saying what it is helps more.
            Ok(meta) if !meta.is_file() => not_regular(path, &meta),
            _ => FileError::new(path, e.to_string()),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| FileError::new(path, e.to_string()))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    if meta.len() > cap {
        return Err(too_large(path, cap));
    }
    // One byte past the cap, so that a file growing while it is read is still caught.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FileError::new(path, e.to_string()))?;
    if bytes.len() as u64 > cap {
        return Err(too_large(path, cap));
    }
    Ok(Contents {
        bytes,
        mode: meta.mode() & 0o7777,
        gid: meta.gid(),
    })
}

fn not_regular(path: &Path, meta: &Metadata) -> FileError {
    let kind = meta.file_type();
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "not a file"
    };
    FileError::new(
        path,
        format!(
            "is {what}, not a regular file; point it at a regular file (a symlink to one is fine)"
        ),
    )
}

fn too_large(path: &Path, cap: u64) -> FileError {
    FileError::new(
        path,
        format!(
            "is larger than {cap} bytes, more than such a file can hold; is it the right file?"
        ),
    )
}

/// Logs a warning if the key file can be read by users other than its owner and the
/// gateway's own groups. Not an error: a Kubernetes Secret volume mounts files 0644 unless it
/// sets `defaultMode`, and refusing to start there would help nobody.
pub fn warn_if_readable_by_others(path: &Path, contents: &Contents) {
    if readable_by_others(contents.mode, contents.gid) {
        tracing::warn!(
            file = %path.display(),
            mode = %format!("{:04o}", contents.mode),
            "the API key file can be read by other users; this is not an error, but the key \
             deserves better: run `chmod 600` on it, or in Kubernetes set `defaultMode: 0400` on \
             the Secret volume (Secrets are mounted 0644 by default), or 0440 with the pod's \
             `fsGroup` as the gateway's group, as deploy/k8s does"
        );
    }
}

/// Whether a file of `mode` and group `gid` can be read by someone besides its owner and the
/// gateway. Group read counts only for a group the gateway is not in: Kubernetes gives a
/// Secret's files the pod's `fsGroup`, and the shipped manifests need 0440 so that the
/// non-root gateway can read a key owned by root.
fn readable_by_others(mode: u32, gid: u32) -> bool {
    mode & 0o004 != 0 || (mode & 0o040 != 0 && !own_groups().contains(&gid))
}

/// The gateway's effective group and its supplementary groups.
fn own_groups() -> Vec<u32> {
    // SAFETY: getegid(2) cannot fail; getgroups(2) with a size of 0 only counts, then fills a
    // buffer of the size it reported (fewer if groups were dropped meanwhile).
    unsafe {
        let mut groups = vec![libc::getegid()];
        let count = libc::getgroups(0, std::ptr::null_mut());
        if let Ok(len) = usize::try_from(count) {
            let mut more: Vec<libc::gid_t> = vec![0; len];
            let filled = libc::getgroups(count, more.as_mut_ptr());
            more.truncate(usize::try_from(filled).unwrap_or(0));
            groups.extend(more);
        }
        groups
    }
}

/// Runs `load` (which reads `path`) on tokio's blocking pool and waits at most
/// [`READ_DEADLINE`] for it, so that async code never blocks on a file.
///
/// On timeout the blocking thread stays stuck in its read until the filesystem answers; that
/// costs one thread of the blocking pool, while the listeners, probes and shutdown go on.
pub async fn off_runtime<T, F>(path: &Path, load: F) -> Result<T, FileError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    within(READ_DEADLINE, path, load).await
}

async fn within<T, F>(deadline: Duration, path: &Path, load: F) -> Result<T, FileError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(load)).await {
        Ok(Ok(loaded)) => Ok(loaded),
        Ok(Err(e)) => Err(FileError::new(path, format!("the read failed: {e}"))),
        Err(_) => Err(FileError::new(
            path,
            format!(
                "did not answer within {}; is its filesystem (NFS?) hung?",
                humantime::format_duration(deadline)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo(3) only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    fn refusal(path: &Path, cap: u64) -> String {
        match read_regular(path, cap) {
            Ok(_) => panic!("{} was read", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_fifo_is_refused_at_once_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("key-fifo");
        mkfifo(&fifo);
        // No writer ever opens it: a blocking open would never return.
        let err = refusal(&fifo, KEY_FILE_CAP);
        assert!(err.contains("key-fifo"), "{err}");
        assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    }

    #[test]
    fn dev_zero_and_a_symlink_to_it_are_refused_as_devices() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("config.toml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        for path in [Path::new("/dev/zero"), &link] {
            let err = refusal(path, CONFIG_FILE_CAP);
            assert!(err.contains(&*path.to_string_lossy()), "{err}");
            assert!(err.contains("is a character device"), "{err}");
        }
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = refusal(dir.path(), KEY_FILE_CAP);
        assert!(err.contains("is a directory, not a regular file"), "{err}");
    }

    #[test]
    fn a_socket_is_refused_as_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.sock");
        let _socket = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = refusal(&path, KEY_FILE_CAP);
        assert!(
            err.contains("key.sock") && err.contains("is a socket"),
            "{err}"
        );
    }

    #[test]
    fn a_file_over_the_cap_is_refused_naming_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big-key");
        std::fs::write(&path, vec![b'k'; KEY_FILE_CAP as usize + 1]).unwrap();
        let err = refusal(&path, KEY_FILE_CAP);
        assert!(
            err.contains("big-key") && err.contains("4096 bytes"),
            "{err}"
        );
        // Exactly the cap is fine.
        std::fs::write(&path, vec![b'k'; KEY_FILE_CAP as usize]).unwrap();
        assert_eq!(
            read_regular(&path, KEY_FILE_CAP).unwrap().bytes.len(),
            KEY_FILE_CAP as usize
        );
    }

    #[test]
    fn a_regular_file_and_a_symlink_to_one_are_read() {
        let dir = tempfile::tempdir().unwrap();
        // Laid out as a Kubernetes Secret volume: key -> ..data/key, ..data -> ..2024_01_01.
        let stamped = dir.path().join("..2024_01_01");
        std::fs::create_dir(&stamped).unwrap();
        std::fs::write(stamped.join("key"), b"dfk_test\n").unwrap();
        std::fs::set_permissions(
            stamped.join("key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o640),
        )
        .unwrap();
        std::os::unix::fs::symlink("..2024_01_01", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/key", dir.path().join("key")).unwrap();
        for path in [stamped.join("key"), dir.path().join("key")] {
            let contents = read_regular(&path, KEY_FILE_CAP).unwrap();
            assert_eq!(contents.bytes, b"dfk_test\n");
            // The target's mode, not the symlink's 0777.
            assert_eq!(contents.mode, 0o640);
        }
    }

    #[test]
    fn others_or_a_foreign_group_reading_the_key_is_worth_a_warning() {
        let own = own_groups()[0];
        let foreign = (1..).find(|gid| !own_groups().contains(gid)).unwrap();
        assert!(!readable_by_others(0o600, foreign));
        assert!(!readable_by_others(0o400, foreign));
        // 0440 with the pod's fsGroup, which the gateway runs in: the shipped manifests.
        assert!(!readable_by_others(0o440, own));
        assert!(readable_by_others(0o440, foreign));
        assert!(readable_by_others(0o644, own));
        assert!(readable_by_others(0o604, own));
    }

    #[tokio::test]
    async fn off_runtime_gives_up_after_its_deadline_naming_the_file() {
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        // Stands in for a read on a hung filesystem: blocks until the test lets it go.
        let load = move || stuck.recv().is_ok();
        let err = within(
            Duration::from_millis(50),
            Path::new("/nfs/datafold-key"),
            load,
        )
        .await
        .expect_err("a stuck read must time out")
        .to_string();
        assert!(err.contains("/nfs/datafold-key"), "{err}");
        assert!(err.contains("did not answer within 50ms"), "{err}");
        release.send(()).unwrap();
    }

    #[tokio::test]
    async fn off_runtime_returns_what_the_load_returns() {
        let loaded = off_runtime(Path::new("unused"), || 42).await.unwrap();
        assert_eq!(loaded, 42);
    }
}
