//! The gateway put together: everything built once at start, the workers started, the
//! control tasks beside them, and the stop.
//!
//! [`prepare`] loads what can be checked without sockets (key, trust roots, TLS, the audit
//! file's folder): `check-config` stops there. [`Gateway::bind`] does everything else that can
//! fail at start (sockets, the audit file) so that a misconfigured gateway exits at once with a
//! message, and tests learn the bound addresses before anything runs. [`Gateway::run`] starts
//! one worker per core (see `server/`), the admin listener and the control tasks (limiter
//! sweep, refusal summaries, the key file's watch), serves until its shutdown future resolves,
//! then has the workers drain within `limits.shutdown_grace` and closes the audit file.
//! [`serve`] is `datafold-gateway serve`: the same, with the process's signals and the config
//! file's watch wired to the [`Control`] handle that changes a running gateway.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::admin::{self, Health};
use crate::audit::chain::{self, IntegrityKey};
use crate::audit::sampling::RefusalSampler;
use crate::audit::{AuditLog, WriterOptions};
use crate::callers::CallerBook;
use crate::config::{ApiKeySource, Config, OnAuditFailure};
pub use crate::error::GatewayError;
use crate::jobs::JobBook;
use crate::limits::Limiters;
use crate::metrics::Metrics;
use crate::middleware::overload::ShedOverloadLayer;
use crate::middleware::request_task::RequestTasks;
use crate::pool::Connector;
use crate::reload::{self, Control};
use crate::secret::ApiKey;
use crate::server::{bind_listeners, TlsListener, Worker, WorkerError};
use crate::stack::StackParts;
use crate::{telemetry, tls};

/// What `serve` needs besides sockets, each checked: `check-config` stops after this.
pub struct Prepared {
    pub key: ApiKey,
    /// What each worker's upstream pool is made from.
    pub upstream: Connector,
    /// TLS on the main listener, if `listen.tls_cert` is set.
    pub tls: Option<TlsAcceptor>,
    /// The key the audit chain is linked under, if `audit.integrity_key_file` is set.
    pub integrity_key: Option<IntegrityKey>,
}

/// Loads the key, the upstream trust roots and the audit's integrity key, and checks that the
/// audit file's folder exists.
pub fn prepare(config: &Config) -> Result<Prepared, GatewayError> {
    let key = ApiKey::load(&config.api_key)?;
    let upstream = Connector::new(&config.upstream).map_err(GatewayError::Upstream)?;
    let tls = tls::acceptor(&config.listen).map_err(GatewayError::ListenerTls)?;
    let audit_dir = match config.audit.file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    if !audit_dir.is_dir() {
        return Err(GatewayError::AuditFolderMissing {
            folder: audit_dir.to_owned(),
            file: config.audit.file.clone(),
        });
    }
    let integrity_key = match &config.audit.integrity_key_file {
        Some(path) => Some(chain::load_key(path)?),
        None => None,
    };
    Ok(Prepared {
        key,
        upstream,
        tls,
        integrity_key,
    })
}

/// A gateway with its sockets bound, ready to [`run`](Gateway::run).
pub struct Gateway {
    config: Arc<Config>,
    parts: StackParts,
    /// One for the signals and the folder watches alike, so that reloads never overlap.
    control: Control,
    tls: Option<TlsAcceptor>,
    /// What each worker makes its own upstream pool from.
    upstream: Connector,
    /// One listening socket per worker, all on `listen.addr` (see [`bind_listeners`]).
    listeners: Vec<std::net::TcpListener>,
    admin: TcpListener,
}

impl Gateway {
    pub async fn bind(config: Config) -> Result<Self, GatewayError> {
        let prepared = prepare(&config)?;
        let listeners = bind_listeners(config.listen.addr, config.runtime.worker_count()).map_err(
            |source| GatewayError::Listen {
                key: "listen.addr",
                addr: config.listen.addr,
                source,
            },
        )?;
        let admin = TcpListener::bind(config.admin.addr)
            .await
            .map_err(|source| GatewayError::Listen {
                key: "admin.addr",
                addr: config.admin.addr,
                source,
            })?;
        let metrics = Metrics::default();
        let audit = AuditLog::open(
            &config.audit.file,
            WriterOptions {
                stdout: config.audit.stdout,
                errors: metrics.audit_write_errors.clone(),
                integrity_key: prepared.integrity_key,
            },
        )?;
        let config = Arc::new(config);
        // Each worker makes its own (see `Worker::serve`); this one only until then.
        let pool = prepared.upstream.pool(metrics.upstream_retries.clone());
        let parts = StackParts {
            config: config.clone(),
            key: Arc::new(ArcSwap::from_pointee(prepared.key)),
            audit,
            tasks: RequestTasks::default(),
            metrics,
            limiters: Arc::new(ArcSwap::from_pointee(reload::limiters_for(&config, None))),
            callers: Arc::new(ArcSwap::from_pointee(CallerBook::new(&config.callers))),
            jobs: Arc::new(JobBook::new(config.callers.max_tracked_jobs.get())),
            pool,
            refusals: Arc::default(),
            overload: ShedOverloadLayer::new(config.limits.max_concurrent_requests),
        };
        let control = Control::new(&parts);
        Ok(Self {
            config,
            parts,
            control,
            tls: prepared.tls,
            upstream: prepared.upstream,
            listeners,
            admin,
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listeners[0]
            .local_addr()
            .expect("a bound socket has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// The handle that changes this gateway while it runs (reloads, audit reopen).
    /// `config_path` is the file `[callers]` and `[rate_limit]` are reloaded from.
    pub fn control(&self, config_path: Option<PathBuf>) -> Control {
        if let Some(path) = config_path {
            self.control.set_config_path(path);
        }
        self.control.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    ///
    /// The requests are served by the workers, each a thread with a single-threaded runtime of
    /// its own (see [`Worker`]); this future, on the caller's runtime, keeps what is not on the
    /// request path: the admin listener, the limiters' sweep, the refusal summaries, the key
    /// file's watch, and the audit file's closing.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), GatewayError> {
        let Self {
            config,
            parts,
            control,
            tls,
            upstream,
            listeners,
            admin,
        } = self;
        let audit = parts.audit.clone();
        let refusals = parts.refusals.clone();
        tokio::spawn(Limiters::sweep_every(Arc::downgrade(&parts.limiters)));
        let stop_flushing = tokio_util::sync::CancellationToken::new();
        let flushing = tokio::spawn(RefusalSampler::flush_every(
            refusals.clone(),
            audit.clone(),
            stop_flushing.clone(),
        ));
        // With the key in a file, a change in its folder (a Secret update) loads it anew.
        let _key_watch = match &config.api_key {
            ApiKeySource::File(path) => match reload::watch_key_file(path, control) {
                Ok(watch) => Some(watch),
                Err(e) => {
                    tracing::warn!(error = %e, "key file changes will be picked up on SIGHUP only");
                    None
                }
            },
            ApiKeySource::Env(_) => None,
        };
        let registry = parts.metrics.registry();
        let tls = tls.map(|acceptor| TlsListener {
            acceptor,
            handshake_failures: parts.metrics.tls_handshake_failures.clone(),
        });
        let health = Arc::new(Health {
            metrics: registry,
            audit: (config.audit.on_failure == OnAuditFailure::Refuse).then(|| audit.clone()),
            ..Health::default()
        });
        let listen_addr = listeners[0].local_addr()?;
        let admin_addr = admin.local_addr()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let worker_count = listeners.len();
        let mut workers = JoinSet::new();
        let mut failure = None;
        for (index, listener) in listeners.into_iter().enumerate() {
            let worker = Worker {
                index,
                listener,
                parts: parts.clone(),
                upstream: upstream.clone(),
                tls: tls.clone(),
                stop: stop_rx.clone(),
            };
            match worker.start().await {
                Ok(ended) => {
                    workers.spawn(ended);
                }
                Err(e) => {
                    failure = Some(GatewayError::WorkerStart { index, reason: e });
                    break;
                }
            }
        }
        drop(parts);
        // Probes are answered once the workers serve (until then they wait in the backlog), and
        // go on being answered (readyz: 503) while requests drain.
        let admin_task = tokio::spawn(admin::serve(admin, health.clone()));
        if failure.is_none() {
            health.ready.store(true, Ordering::Release);
            tracing::info!(
                addr = %listen_addr,
                admin = %admin_addr,
                upstream = ?config.upstream.url,
                tls = tls.is_some(),
                callers = config.callers.mode.name(),
                workers = worker_count,
                "listening"
            );
            tokio::pin!(shutdown);
            tokio::select! {
                () = &mut shutdown => {}
                // A worker serves until told to stop: one that ends on its own has failed, and
                // a gateway short of a worker would leave its socket's callers unanswered.
                Some(ended) = workers.join_next() => {
                    let why = match ended {
                        Ok(Ok(Ok(()))) => WorkerError::Stopped,
                        Ok(Ok(Err(e))) => e,
                        _ => WorkerError::Panicked,
                    };
                    tracing::error!(error = %why, "a worker ended unexpectedly; shutting down");
                    failure = Some(GatewayError::WorkerEnded(why));
                }
            }
        }

        tracing::info!(
            grace = ?config.limits.shutdown_grace,
            "shutting down: no new connections, finishing requests in flight"
        );
        health.ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        // Each worker bounds its own drain (grace, then cancellation). A worker stuck in a write
        // to a volume that hangs cannot, and must not hold up the exit forever.
        let workers_done = async {
            while let Some(ended) = workers.join_next().await {
                match ended {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => tracing::error!(error = %e, "a worker failed"),
                    _ => {
                        tracing::error!("a worker panicked; its requests' records may be missing")
                    }
                }
            }
        };
        let drain_limit = config.limits.shutdown_grace + WORKER_STOP_MARGIN;
        if tokio::time::timeout(drain_limit, workers_done)
            .await
            .is_err()
        {
            tracing::error!(
                limit = ?drain_limit,
                "workers did not stop in time (is the audit volume hanging?); exiting without them"
            );
            failure.get_or_insert(GatewayError::WorkersOverran {
                margin: WORKER_STOP_MARGIN,
            });
        }
        admin_task.abort();
        // The last refusals counted but not yet summarised: the periodic flush finishes what it
        // took (a summary it has taken must not meet a closed file), then the rest is written.
        stop_flushing.cancel();
        let summaries = async {
            let _ = flushing.await;
            refusals.flush(&audit).await;
        };
        if tokio::time::timeout(AUDIT_CLOSE_LIMIT, summaries)
            .await
            .is_err()
        {
            tracing::error!(file = %config.audit.file.display(), "the last refusal summaries were not written in time");
        }
        // Past this, every record is in the file; a disk that stalls must not stall the exit.
        if tokio::time::timeout(AUDIT_CLOSE_LIMIT, audit.close())
            .await
            .is_err()
        {
            tracing::error!(file = %config.audit.file.display(), "the audit file did not sync in time");
        }
        tracing::info!("stopped");
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// How long past `limits.shutdown_grace` the workers may take to stop: the cancelled requests'
/// 503s and their records, and the connections' close.
const WORKER_STOP_MARGIN: Duration = Duration::from_secs(5);
/// How long closing the audit file may take before the gateway exits regardless.
const AUDIT_CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// Runs the gateway of the config file at `path` until SIGTERM or SIGINT: SIGHUP and a change
/// of the config file reload it, SIGUSR1 reopens the audit file.
pub async fn serve(path: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(&path)?;
    telemetry::init(&config.log);
    // Installed before anything slow: SIGHUP's default action would end the process.
    let stop = shutdown_signal()?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut user1 = signal(SignalKind::user_defined1())?;
    let in_file = |e: GatewayError| format!("{}: {e}", path.display());
    let gateway = Gateway::bind(config).await.map_err(in_file)?;
    let control = gateway.control(Some(path.clone()));
    // A changed config file (a ConfigMap update, where nobody can send SIGHUP) is reloaded too.
    let _config_watch = reload::watch_config_file(&path, control.clone())
        .map_err(|e| tracing::warn!(error = %e, "config changes will be picked up on SIGHUP only"))
        .ok();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = hangup.recv() => control.reload().await,
                Some(()) = user1.recv() => {
                    tracing::info!("reopening the audit file (SIGUSR1)");
                    let _ = control.reopen_audit().await;
                }
                else => return,
            }
        }
    });
    gateway.run(stop).await.map_err(in_file)?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this returns, so a
/// signal that arrives while the gateway is still starting is not lost (nor fatal).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}
