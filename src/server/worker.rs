//! A worker: its thread and runtime, its accept loop, and its drain at shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use super::connection::{
    connection_builder, serve_connection, serve_tls_connection, Deadlines, TlsListener,
};
use crate::callers::Peer;
use crate::middleware::request_task::RequestTasks;
use crate::pool::Connector;
use crate::stack::{self, StackParts};

/// One worker: a thread running a single-threaded runtime with its own listening socket, its
/// own copy of the stack and its own connections. A request is handled from accept to answer on
/// one thread, without waking another.
pub(crate) struct Worker {
    pub(crate) index: usize,
    pub(crate) listener: std::net::TcpListener,
    pub(crate) parts: StackParts,
    pub(crate) upstream: Connector,
    pub(crate) tls: Option<TlsListener>,
    pub(crate) stop: watch::Receiver<bool>,
}

/// How a worker's serving ended: `Ok` once told to stop and drained.
pub(crate) type WorkerEnded = Result<(), WorkerError>;

/// Why a worker could not start, or stopped serving before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Its thread could not be started.
    #[error("{0}")]
    Thread(#[source] std::io::Error),
    /// Its single-threaded runtime could not be built.
    #[error("cannot start its runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Its listening socket could not be registered with its runtime.
    #[error("{0}")]
    Listener(#[source] std::io::Error),
    /// It ended before it was serving, without saying why.
    #[error("it stopped before serving")]
    StoppedBeforeServing,
    /// It returned without being told to stop.
    #[error("it stopped")]
    Stopped,
    /// It panicked, or its end could not be heard of.
    #[error("it panicked")]
    Panicked,
}

impl Worker {
    /// Starts the worker's thread and waits until it is serving; the returned future resolves
    /// when the worker has drained.
    pub(crate) async fn start(
        self,
    ) -> Result<impl Future<Output = Result<WorkerEnded, oneshot::error::RecvError>>, WorkerError>
    {
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
                    Err(e) => Err(WorkerError::Runtime(e)),
                };
                let _ = ended_tx.send(outcome);
            })
            .map_err(WorkerError::Thread)?;
        if ready.await.is_ok() {
            return Ok(ended);
        }
        // It ended before it could serve: say why.
        Err(match ended.await {
            Ok(Err(e)) => e,
            _ => WorkerError::StoppedBeforeServing,
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
        let listener = TcpListener::from_std(listener).map_err(WorkerError::Listener)?;
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
