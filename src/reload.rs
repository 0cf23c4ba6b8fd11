//! Changing a running gateway without a restart.
//!
//! - A new API key: on SIGHUP, and, with `[api_key] file`, whenever something changes in the
//!   key file's folder. A Kubernetes Secret update swaps the folder's `..data` symlink, which a
//!   watch on the file itself would miss. A new key that is empty or unreadable is refused: the
//!   old key stays, an error naming the file is logged and counted, `/readyz` stays 200.
//! - New `[callers]` and `[rate_limit]`: on SIGHUP, and whenever the config file changes in its
//!   folder (a ConfigMap update), from the config file. An invalid file is
//!   refused whole and the old settings stay. A limiter whose limit did not change keeps its
//!   state. Other sections are read at start only; a reload that changes them says so.
//! - The audit file reopened (after logrotate moved it): on SIGUSR1 and on SIGHUP.
//!
//! Each swap is atomic (`ArcSwap`): a request in flight finishes with what it started with.
//! The key and the config file are read on the blocking pool under a deadline
//! ([`files::off_runtime`]), so a FIFO, a device or a hung filesystem in their place fails the
//! reload instead of stopping the listeners, the probes or shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::audit::chain::{self, IntegrityKeyError};
use crate::audit::{AuditLog, ReopenError};
use crate::callers::{CallerBook, SharedCallers};
use crate::config::{ApiKeySource, CallerMode, Config, ConfigError};
use crate::files;
use crate::limits::{Limiters, SharedLimiters};
use crate::metrics::{Metrics, ResultLabels};
use crate::secret::{describe, ApiKey, KeyError, SharedKey};
use crate::stack::StackParts;

/// Why a reload, a reopen or a watch did not happen; what was in effect stays in effect. Names
/// the file and the setting at fault; never holds the key.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new key was refused: unreadable, empty, or not a key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The config file could not be read in time (a FIFO, a device, a hung filesystem).
    #[error("the config file: {0}")]
    ConfigFile(#[source] files::FileError),
    /// The config file was read but is not a valid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The config file changes `callers.mode`, which only a restart can do.
    #[error("{}: callers.mode: changing the mode ({from:?} to {to:?}) needs a restart", file.display())]
    ModeChange {
        file: PathBuf,
        from: CallerMode,
        to: CallerMode,
    },
    /// The new audit integrity key was refused; the key in use before is kept.
    #[error("audit.integrity_key_file: {0}")]
    IntegrityKey(#[from] IntegrityKeyError),
    /// The audit file could not be reopened; the file open before is kept.
    #[error(transparent)]
    AuditReopen(#[from] ReopenError),
    /// The folder of `what` (the key file, the config file) cannot be watched.
    #[error("{what}: cannot watch {}: {source}", folder.display())]
    Watch {
        what: &'static str,
        folder: PathBuf,
        source: std::io::Error,
    },
    /// Watching a folder needs inotify, which only Linux has.
    #[error("{what}: watching a folder needs Linux (inotify)")]
    WatchUnsupported { what: &'static str },
}

/// How long a burst of changes in the key's folder is let settle before the key is read.
const SETTLE: Duration = Duration::from_millis(200);

/// The rate limiters for `config`, keeping the state of those in `previous` that did not
/// change.
pub fn limiters_for(config: &Config, previous: Option<&Limiters>) -> Limiters {
    let own_limits = config.callers.tokens.iter().filter_map(|entry| {
        let limit = config.token_caller_limit(entry)?;
        Some((entry.name.as_str(), limit))
    });
    match previous {
        Some(previous) => previous.reconfigured(&config.rate_limit, own_limits),
        None => Limiters::new(&config.rate_limit, own_limits),
    }
}

/// The handle that reloads a running gateway; cheap to clone.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

struct Inner {
    /// Set once by whoever knows the file (`serve`); without it, only the key is reloaded.
    config_path: std::sync::OnceLock<PathBuf>,
    /// The configuration in effect, with the reloadable sections as last reloaded.
    config: Mutex<Arc<Config>>,
    key: SharedKey,
    callers: SharedCallers,
    limiters: SharedLimiters,
    audit: AuditLog,
    metrics: Metrics,
}

impl Control {
    pub(crate) fn new(parts: &StackParts) -> Self {
        Self {
            inner: Arc::new(Inner {
                config_path: std::sync::OnceLock::new(),
                config: Mutex::new(parts.config.clone()),
                key: parts.key.clone(),
                callers: parts.callers.clone(),
                limiters: parts.limiters.clone(),
                audit: parts.audit.clone(),
                metrics: parts.metrics.clone(),
            }),
        }
    }

    /// The config file that [`reload_config`](Self::reload_config) reads; the first one set stays.
    pub(crate) fn set_config_path(&self, path: PathBuf) {
        let _ = self.inner.config_path.set(path);
    }

    /// What SIGHUP does: the key, then `[callers]` and `[rate_limit]`, then the audit integrity
    /// key, then the audit file.
    pub async fn reload(&self) {
        tracing::info!("reloading (SIGHUP)");
        let _ = self.reload_key().await;
        if let Err(e) = self.reload_config().await {
            tracing::error!(error = %e, "configuration not reloaded; the previous one stays in effect");
        }
        if let Err(e) = self.reload_integrity_key().await {
            tracing::error!(error = %e, "audit integrity key not reloaded; the key in use before stays");
        }
        let _ = self.reopen_audit().await;
    }

    /// Reads `audit.integrity_key_file` again: the records after this are linked under the new
    /// key, still after the last one linked under the old key. A verifier then needs both keys.
    pub async fn reload_integrity_key(&self) -> Result<(), ReloadError> {
        let config = self.inner.config.lock().await.clone();
        let Some(path) = &config.audit.integrity_key_file else {
            return Ok(());
        };
        let load = {
            let path = path.clone();
            move || chain::load_key(&path)
        };
        let key = files::off_runtime(path, load)
            .await
            .map_err(IntegrityKeyError::File)??;
        self.inner.audit.set_integrity_key(Some(key)).await;
        tracing::info!(file = %path.display(), "audit integrity key reloaded");
        Ok(())
    }

    /// Loads the key again from its source. `Ok(true)` if a different key is now in effect.
    /// An environment variable is read at start only, so it never changes.
    pub async fn reload_key(&self) -> Result<bool, ReloadError> {
        let config = self.inner.config.lock().await;
        let source = &config.api_key;
        let path = match source {
            ApiKeySource::Env(name) => {
                tracing::info!(variable = %name, "the key comes from an environment variable, read at start only; not reloaded");
                return Ok(false);
            }
            ApiKeySource::File(path) => path,
        };
        // On the blocking pool, under a deadline: a FIFO or a hung filesystem in the key's place
        // must not stop the listeners, the probes or shutdown.
        let load = {
            let source = source.clone();
            move || ApiKey::load(&source)
        };
        let loaded = match files::off_runtime(path, load).await {
            Ok(loaded) => loaded,
            Err(e) => Err(KeyError::File(e)),
        };
        match loaded {
            Ok(key) if key.same_as(&self.inner.key.load()) => {
                tracing::debug!("the key file holds the key already in use");
                Ok(false)
            }
            Ok(key) => {
                self.inner.key.store(Arc::new(key));
                self.count_key_reload("success");
                tracing::info!(source = %describe(source), "new API key in effect");
                Ok(true)
            }
            Err(e) => {
                self.count_key_reload("failure");
                tracing::error!(error = %e, "new API key refused; the previous key stays in effect");
                Err(e.into())
            }
        }
    }

    /// Reads the config file again and puts its `[callers]` and `[rate_limit]` in effect.
    pub async fn reload_config(&self) -> Result<(), ReloadError> {
        let Some(path) = self.inner.config_path.get() else {
            return Ok(());
        };
        let mut current = self.inner.config.lock().await;
        // On the blocking pool, under a deadline, as for the key.
        let load = {
            let path = path.clone();
            move || Config::load(&path)
        };
        let result = match files::off_runtime(path, load).await {
            Ok(loaded) => loaded
                .map_err(ReloadError::from)
                .and_then(|new| self.swap_config(path, &current, new)),
            Err(e) => Err(ReloadError::ConfigFile(e)),
        };
        let label = if result.is_ok() { "success" } else { "failure" };
        self.inner
            .metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: label })
            .inc();
        *current = result?;
        Ok(())
    }

    fn swap_config(
        &self,
        path: &Path,
        current: &Arc<Config>,
        new: Config,
    ) -> Result<Arc<Config>, ReloadError> {
        if new.callers.mode != current.callers.mode {
            return Err(ReloadError::ModeChange {
                file: path.to_owned(),
                from: current.callers.mode,
                to: new.callers.mode,
            });
        }
        // What is not reloaded: kept as it is, and said if the file now differs.
        let mut in_effect = (**current).clone();
        in_effect.callers = new.callers.clone();
        in_effect.callers.max_tracked_jobs = current.callers.max_tracked_jobs;
        in_effect.rate_limit = new.rate_limit.clone();
        if in_effect.redacted_toml() != new.redacted_toml() {
            tracing::warn!(
                file = %path.display(),
                "changes outside [callers] and [rate_limit] (and callers.max_tracked_jobs) take effect at the next restart"
            );
        }
        let limiters = limiters_for(&in_effect, Some(&self.inner.limiters.load()));
        self.inner.limiters.store(Arc::new(limiters));
        self.inner
            .callers
            .store(Arc::new(CallerBook::new(&in_effect.callers)));
        tracing::info!(
            file = %path.display(),
            callers = in_effect.callers.tokens.len(),
            "[callers] and [rate_limit] reloaded"
        );
        Ok(Arc::new(in_effect))
    }

    /// Opens the audit file again at its configured path (SIGUSR1, SIGHUP).
    pub async fn reopen_audit(&self) -> Result<(), ReloadError> {
        Ok(self.inner.audit.reopen().await?)
    }

    fn count_key_reload(&self, result: &'static str) {
        self.inner
            .metrics
            .key_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

/// Watches a file's folder for as long as it is kept.
pub struct FolderWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FolderWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reloads the key whenever it changes in `key_file`'s folder.
pub fn watch_key_file(key_file: &Path, control: Control) -> Result<FolderWatch, ReloadError> {
    watch_file("api_key.file", key_file, move || {
        let control = control.clone();
        async move {
            let _ = control.reload_key().await;
        }
    })
}

/// Reloads `[callers]` and `[rate_limit]` whenever the config file changes in its folder (a
/// Kubernetes ConfigMap update, which cannot send SIGHUP).
pub fn watch_config_file(config_file: &Path, control: Control) -> Result<FolderWatch, ReloadError> {
    watch_file("the config file", config_file, move || {
        let control = control.clone();
        async move {
            if let Err(e) = control.reload_config().await {
                tracing::error!(error = %e, "configuration not reloaded; the previous one stays in effect");
            }
        }
    })
}

/// Runs `on_change` after something replaces `file` in its folder. Watching the folder, not the
/// file, catches a Kubernetes Secret or ConfigMap update, which swaps a `..data` symlink beside
/// the file. Only events that can replace a file are asked for (created, moved, deleted, closed
/// after writing), not every write: an audit file in the same folder must not wake this. Changes
/// come in bursts; `on_change` runs once a burst has settled.
#[cfg(target_os = "linux")]
fn watch_file<F, Fut>(
    what: &'static str,
    file: &Path,
    on_change: F,
) -> Result<FolderWatch, ReloadError>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use futures_util::StreamExt;
    use inotify::{Inotify, WatchMask};

    let folder = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let cannot = |source: std::io::Error| ReloadError::Watch {
        what,
        folder: folder.clone(),
        source,
    };
    let inotify = Inotify::init().map_err(cannot)?;
    inotify
        .watches()
        .add(
            &folder,
            WatchMask::CREATE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::DELETE
                | WatchMask::CLOSE_WRITE,
        )
        .map_err(cannot)?;
    let mut events = inotify.into_event_stream([0u8; 4096]).map_err(cannot)?;
    let name = file.file_name().map(|n| n.to_owned());
    // Only the file itself, or the kubelet's `..data` and `..<timestamp>` entries.
    let relevant = move |changed: Option<&std::ffi::OsStr>| {
        changed == name.as_deref()
            || changed.is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
    };
    tracing::debug!(folder = %folder.display(), "watching {}'s folder", what);
    let task = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Ok(event) if event.mask.contains(inotify::EventMask::IGNORED) => {
                    tracing::warn!(
                        "the folder of {what} is gone; changes will be picked up on SIGHUP only"
                    );
                    return;
                }
                // An overflowed queue names no file: anything may have changed.
                Ok(event) if event.name.is_none() || relevant(event.name.as_deref()) => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "stopped watching {what}'s folder; use SIGHUP");
                    return;
                }
            }
            // Let the burst settle, then take whatever else has arrived meanwhile.
            tokio::time::sleep(SETTLE).await;
            while let Some(Some(_)) = futures_util::FutureExt::now_or_never(events.next()) {}
            on_change().await;
        }
    });
    Ok(FolderWatch { task })
}

#[cfg(not(target_os = "linux"))]
fn watch_file<F, Fut>(what: &'static str, _: &Path, _: F) -> Result<FolderWatch, ReloadError>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    Err(ReloadError::WatchUnsupported { what })
}
