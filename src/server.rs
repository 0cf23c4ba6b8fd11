//! Listeners, connections and graceful shutdown.
//!
//! [`Gateway::bind`] does everything that can fail at start (key, trust roots, audit file,
//! sockets) so that a misconfigured gateway exits at once with a message, and tests learn the
//! bound addresses before anything runs. [`Gateway::run`] serves until its shutdown future
//! resolves, then stops accepting, lets in-flight requests finish within
//! `limits.shutdown_grace`, and flushes the audit file.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceExt};

use crate::admin::{self, Health};
use crate::audit::{AuditLog, WriterOptions};
use crate::audit_sampling::RefusalSampler;
use crate::callers::{CallerBook, Peer};
use crate::config::{ApiKeySource, Config, OnAuditFailure};
use crate::jobs::JobBook;
use crate::limits::Limiters;
use crate::metrics::Metrics;
use crate::middleware::overload::ShedOverloadLayer;
use crate::middleware::request_task::RequestTasks;
use crate::pool::Connector;
use crate::reload::{self, Control};
use crate::secret::ApiKey;
use crate::stack::{self, StackParts};
use crate::tls;

/// Largest request head (request line and headers) accepted, in bytes.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields accepted in one request.
const MAX_HEADERS: usize = 100;

pub use crate::error::GatewayError;

/// What `serve` needs besides sockets, each checked: `check-config` stops after this.
pub struct Prepared {
    pub key: ApiKey,
    /// What each worker's upstream pool is made from.
    pub upstream: Connector,
    /// TLS on the main listener, if `listen.tls_cert` is set.
    pub tls: Option<TlsAcceptor>,
}

/// Loads the key and the upstream trust roots, and checks that the audit file's folder exists.
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
    Ok(Prepared { key, upstream, tls })
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
        let admin_task = tokio::spawn(serve_admin(admin, health.clone()));
        if failure.is_none() {
            health.ready.store(true, Ordering::Release);
            tracing::info!(
                addr = %listen_addr,
                admin = %admin_addr,
                upstream = ?config.upstream.url,
                tls = tls.is_some(),
                callers = ?config.callers.mode,
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
                        Ok(Ok(Ok(()))) => "it stopped".to_owned(),
                        Ok(Ok(Err(e))) => e,
                        _ => "it panicked".to_owned(),
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

/// Opens `count` listening sockets on `addr`. With more than one, each has `SO_REUSEPORT` and
/// the kernel spreads new connections across them, so that each worker accepts its own without
/// waking the others. The first socket's port is used for the rest (`addr` may ask for port 0).
fn bind_listeners(
    addr: SocketAddr,
    count: NonZeroUsize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::with_capacity(count.get());
    let mut addr = addr;
    for _ in 0..count.get() {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if count.get() > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        addr = listener.local_addr()?;
        // Handed to its worker's runtime when that starts (see `Worker::serve`).
        listeners.push(listener.into_std()?);
    }
    Ok(listeners)
}

/// Connections the kernel queues for each listening socket before the gateway accepts them.
const LISTEN_BACKLOG: u32 = 1024;

/// One worker: a thread running a single-threaded runtime with its own listening socket, its
/// own copy of the stack and its own connections. A request is handled from accept to answer on
/// one thread, without waking another.
struct Worker {
    index: usize,
    listener: std::net::TcpListener,
    parts: StackParts,
    upstream: Connector,
    tls: Option<TlsListener>,
    stop: watch::Receiver<bool>,
}

type WorkerEnded = Result<(), String>;

impl Worker {
    /// Starts the worker's thread and waits until it is serving; the returned future resolves
    /// when the worker has drained.
    async fn start(
        self,
    ) -> Result<impl Future<Output = Result<WorkerEnded, oneshot::error::RecvError>>, String> {
        let (ended_tx, ended) = oneshot::channel();
        let (ready_tx, ready) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("worker-{}", self.index))
            .spawn(move || {
                let outcome = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        let outcome = runtime.block_on(self.serve(ready_tx));
                        // Tasks left (idle upstream connections, the audit flush) end here.
                        runtime.shutdown_timeout(Duration::from_millis(100));
                        outcome
                    }
                    Err(e) => Err(format!("cannot start its runtime: {e}")),
                };
                let _ = ended_tx.send(outcome);
            })
            .map_err(|e| e.to_string())?;
        if ready.await.is_ok() {
            return Ok(ended);
        }
        // It ended before it could serve: say why.
        Err(match ended.await {
            Ok(Err(e)) => e,
            _ => "it stopped before serving".to_owned(),
        })
    }

    /// Accepts and serves connections until told to stop, then drains.
    async fn serve(self, ready: oneshot::Sender<()>) -> WorkerEnded {
        let Self {
            index: _,
            listener,
            parts,
            upstream,
            tls,
            stop: mut self_stop,
        } = self;
        let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let config = parts.config.clone();
        // The worker's own: shutdown waits for, and past its grace cancels, its requests only.
        let tasks = RequestTasks::default();
        let metrics = parts.metrics.for_worker(&tasks.tracker);
        let parts = StackParts {
            tasks: tasks.clone(),
            // Its connections are opened, and driven, on this worker's runtime.
            pool: upstream.pool(metrics.upstream_retries.clone()),
            metrics,
            ..parts
        };
        let stack = stack::build::<Incoming>(parts);
        let builder = Arc::new(connection_builder(&config));
        let deadlines = Deadlines {
            first_request: config.limits.header_read_timeout,
            idle: config.limits.idle_timeout,
        };
        let mut connections = JoinSet::new();
        // Every connection waits on the stop signal each time its task runs. The gateway's own
        // signal is one channel for all workers, whose lock the cores would then take turns
        // at; the worker relays it to a channel of its own, which only its thread touches.
        let (relay, mut stop) = watch::channel(*self_stop.borrow_and_update());
        let mut gateway_stop = self_stop;
        tokio::spawn(async move {
            let _ = gateway_stop.wait_for(|stopping| *stopping).await;
            let _ = relay.send(true);
        });
        let _ = ready.send(());
        if !*stop.borrow_and_update() {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            let (builder, service, stop) = (builder.clone(), stack.clone(), stop.clone());
                            match &tls {
                                None => connections.spawn(serve_connection(
                                    builder,
                                    stream,
                                    Peer::new(peer),
                                    service,
                                    deadlines,
                                    stop,
                                )),
                                Some(tls) => connections.spawn(serve_tls_connection(
                                    tls.clone(),
                                    builder,
                                    stream,
                                    peer,
                                    service,
                                    deadlines,
                                    stop,
                                )),
                            };
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    _ = stop.changed() => break,
                }
            }
        }
        if !connections.is_empty() {
            tracing::debug!(
                in_flight_connections = connections.len(),
                "worker draining its connections"
            );
        }
        drop(listener);
        drain(connections, &tasks, config.limits.shutdown_grace).await;
        Ok(())
    }
}

/// How long cancelled requests get to deliver their 503 before connections are closed.
const DELIVER_LIMIT: Duration = Duration::from_millis(500);
/// How long past `limits.shutdown_grace` the workers may take to stop: the cancelled requests'
/// 503s and their records, and the connections' close.
const WORKER_STOP_MARGIN: Duration = Duration::from_secs(5);
/// How long closing the audit file may take before the gateway exits regardless.
const AUDIT_CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// Lets connections and requests finish within `grace`; past it, cancels the requests still
/// running (each answered 503 and audited as `aborted`), then closes what is left.
async fn drain(mut connections: JoinSet<()>, tasks: &RequestTasks, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    let drained = tokio::time::timeout_at(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    // Requests whose callers hung up run on in their tasks; they get the same grace.
    tasks.tracker.close();
    if drained.is_ok()
        && tokio::time::timeout_at(deadline, tasks.tracker.wait())
            .await
            .is_ok()
    {
        return;
    }
    tracing::warn!(
        connections = connections.len(),
        requests = tasks.tracker.len(),
        "shutdown grace ran out; cancelling the requests still running"
    );
    tasks.cancel.cancel();
    // Give the cancelled requests' 503s a moment to reach callers still connected.
    let _ = tokio::time::timeout(DELIVER_LIMIT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
    // Connections are gone, so no request can start now; wait for the last records.
    if tokio::time::timeout(DELIVER_LIMIT, tasks.tracker.wait())
        .await
        .is_err()
    {
        tracing::error!(
            requests = tasks.tracker.len(),
            "requests did not end after cancellation; their records may be missing"
        );
    }
}

fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// How long a connection may go without a request.
#[derive(Clone, Copy)]
struct Deadlines {
    /// From accept to the first request. hyper's own header timer only starts once it knows the
    /// protocol, so a client that sends nothing at all is caught here.
    first_request: Duration,
    /// From the end of one request to the start of the next.
    idle: Duration,
}

/// TLS on the main listener, and the count of handshakes that failed.
#[derive(Clone)]
struct TlsListener {
    acceptor: TlsAcceptor,
    handshake_failures: prometheus_client::metrics::counter::Counter,
}

/// Completes the TLS handshake (within the first-request deadline), then serves the connection.
/// A failed handshake (no or an untrusted client certificate, a plain-HTTP client) is the
/// client's problem: counted, and logged at debug in one line.
async fn serve_tls_connection<S, B>(
    tls: TlsListener,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    stack: S,
    deadlines: Deadlines,
    stop: watch::Receiver<bool>,
) where
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let failures = &tls.handshake_failures;
    let accept = tls.acceptor.accept(stream);
    let stream = match tokio::time::timeout(deadlines.first_request, accept).await {
        Ok(Ok(stream)) => stream,
        // Debug only: anyone who can connect can fail a handshake, as often as they like.
        Ok(Err(e)) => {
            failures.inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            failures.inc();
            tracing::debug!(%peer, "TLS handshake not completed in time; closing");
            return;
        }
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(tls::certificate_identity);
    let peer = Peer::new(peer).with_tls_identity(identity);
    serve_connection(builder, stream, peer, stack, deadlines, stop).await;
}

/// Serves one connection until it closes, sits idle past its deadline, or shutdown begins.
async fn serve_connection<I, S, B>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: I,
    peer: Peer,
    stack: S,
    deadlines: Deadlines,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new());
    let addr = peer.addr;
    let asked_to_close = peer.clone();
    let service = PerConnection {
        stack: std::cell::RefCell::new(stack),
        peer,
        activity: activity.clone(),
    };
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut closing = false;
    // Once the gateway itself has asked the connection to close (idle, or a caller refused for
    // good), a client that neither reads nor closes (a zero HTTP/2 window, say) must not keep
    // it: it is dropped one `first_request` period later.
    let mut hard_stop_armed = false;
    let idle = tokio::time::sleep(deadlines.first_request.min(deadlines.idle));
    tokio::pin!(idle);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                // Shutdown: the grace period in `drain` bounds how long this may take.
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = asked_to_close.closing(), if !hard_stop_armed => {
                // A layer refused this connection's caller for good (see `Peer::close_connection`):
                // the answer goes out, then the connection closes, or is dropped.
                closing = true;
                hard_stop_armed = true;
                connection.as_mut().graceful_shutdown();
                idle.as_mut().reset(later(Instant::now(), deadlines.first_request).into());
            }
            () = idle.as_mut(), if !closing || hard_stop_armed => {
                if hard_stop_armed {
                    tracing::debug!(peer = %addr, "dropping a connection that did not close when asked");
                    return;
                }
                match activity.idle_until(deadlines) {
                    // Not one complete request within header_read_timeout of connecting: nothing
                    // is in flight to finish, and a graceful close would wait on a head still
                    // trickling in (hyper's own header timer starts only at its second byte).
                    None if !activity.served.load(Ordering::Acquire) => {
                        tracing::debug!(peer = %addr, "no complete request in time; closing");
                        return;
                    }
                    None => {
                        tracing::debug!(peer = %addr, "closing idle connection");
                        closing = true;
                        hard_stop_armed = true;
                        connection.as_mut().graceful_shutdown();
                        idle.as_mut().reset(later(Instant::now(), deadlines.first_request).into());
                    }
                    Some(deadline) => idle.as_mut().reset(deadline.into()),
                }
            }
        }
    }
}

/// Requests in flight on one connection, and when the last one finished: what the connection's
/// idle and first-request deadlines are measured from. A per-connection fact, kept on the
/// connection; the gateway's count of requests in flight is the workers' trackers.
struct Activity {
    opened: Instant,
    /// Whether any request has started on this connection yet.
    served: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last request.
    last_done_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            served: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
        }
    }

    /// `None` if the connection has sat past its deadline; else when to look again.
    fn idle_until(&self, deadlines: Deadlines) -> Option<Instant> {
        let now = Instant::now();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Some(later(now, deadlines.idle));
        }
        let deadline = if !self.served.load(Ordering::Acquire) {
            later(self.opened, deadlines.first_request)
        } else {
            let last_ms = self.last_done_ms.load(Ordering::Acquire);
            later(self.opened + Duration::from_millis(last_ms), deadlines.idle)
        };
        (deadline > now).then_some(deadline)
    }
}

/// `at + after`, or a day past `at` where that would overflow.
fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .unwrap_or_else(|| at + Duration::from_secs(86_400))
}

/// Marks a request in flight on its connection until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.served.store(true, Ordering::Release);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_done_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The stack as one connection sees it: each request learns its peer and counts as activity.
///
/// The connection keeps one copy of the stack and calls it in place: requests on a connection
/// are dispatched one at a time from its task (HTTP/2 streams included), and every layer is
/// always ready, so cloning the whole stack per request (a reference count per layer) buys
/// nothing. Should a layer ever not be ready, the request waits on a clone of its own.
struct PerConnection<S> {
    stack: std::cell::RefCell<S>,
    peer: Peer,
    activity: Arc<Activity>,
}

pin_project! {
    struct Tracked<F> {
        #[pin]
        inner: F,
        _in_flight: InFlight,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl<S, B> hyper::service::Service<http::Request<Incoming>> for PerConnection<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible> + Clone,
{
    type Response = http::Response<B>;
    type Error = Infallible;
    type Future = Tracked<Either<S::Future, tower::util::Oneshot<S, http::Request<Incoming>>>>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.peer.clone());
        let mut stack = self.stack.borrow_mut();
        let mut ready = Context::from_waker(futures_util::task::noop_waker_ref());
        let inner = match stack.poll_ready(&mut ready) {
            Poll::Ready(Ok(())) => Either::Left(stack.call(request)),
            Poll::Pending => Either::Right(stack.clone().oneshot(request)),
        };
        Tracked {
            _in_flight: InFlight::start(&self.activity),
            inner,
        }
    }
}

async fn serve_admin(listener: TcpListener, health: Arc<Health>) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request| admin::handle(health.clone(), request)),
        );
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}
