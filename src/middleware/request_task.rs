//! How long a request lives, for the audit layer that wraps the whole of it.
//!
//! Each request runs to its end: in its connection's task while the caller waits, and in a task
//! of its own if the caller hangs up ([`RunToEnd`]). A test that Datafold may already have
//! started is not cancelled by a hang-up, and its record still says what happened. Every request
//! is counted by its worker's [`RequestTasks`] from the start: that count is what shutdown waits
//! for, and what `in_flight_requests` reports. Only shutdown cancels requests, once
//! `limits.shutdown_grace` has run out; they are answered 503 and audited with outcome
//! `aborted`. A panic in a handler is a bug, but the request it cut short is still answered (500)
//! and audited ([`guarded`]).
//!
//! Not tower-http's `CatchPanicLayer`: its answers have a boxed body type, which every answer
//! of the stack would then carry (an allocation per request) for the sake of a case that should
//! never happen; and the panic must be caught inside the audit step, with the shutdown cancel,
//! so that the answer it turns into is audited.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use http::Response;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{error, Body};

/// One worker's requests in flight, for shutdown to wait for or, past its grace, cancel.
#[derive(Debug, Clone, Default)]
pub struct RequestTasks {
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
}

/// The inner service's answer to a request, or 503 `shutting_down` once `cancel` fires, or 500
/// if the work panicked (`panicked` is called first, to say which request).
pub async fn guarded<F>(
    work: F,
    cancel: &CancellationToken,
    panicked: impl FnOnce(),
) -> Response<Body>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    let work = std::panic::AssertUnwindSafe(work).catch_unwind();
    tokio::select! {
        result = work => match result {
            Ok(Ok(response)) => response,
            Err(_) => {
                panicked();
                error::internal_error()
            }
        },
        () = cancel.cancelled() => error::shutting_down(),
    }
}

/// A request and its audit record, run in the connection's own task. Should the caller hang up
/// first (the future is dropped unfinished), the rest of the work moves to a task of its own,
/// still tracked: the request runs to its end and is audited. Running inline otherwise spares
/// every request a task of its own and the wake-ups between the two. The work is boxed because
/// that move needs it: a pinned future can only change hands behind a pointer.
pub struct RunToEnd {
    work: Option<Pin<Box<dyn Future<Output = Response<Body>> + Send>>>,
}

impl RunToEnd {
    /// Counted by `tasks` from now (without a task of its own), so that shutdown waits for
    /// every request: inline, moved to a task, or in an HTTP/2 stream's task.
    pub fn new(
        tasks: &RequestTasks,
        work: impl Future<Output = Response<Body>> + Send + 'static,
    ) -> Self {
        Self {
            work: Some(Box::pin(tasks.tracker.track_future(work))),
        }
    }
}

impl Future for RunToEnd {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(work) = self.work.as_mut() else {
            return Poll::Ready(Ok(error::internal_error()));
        };
        let response = std::task::ready!(work.as_mut().poll(cx));
        self.work = None;
        Poll::Ready(Ok(response))
    }
}

impl Drop for RunToEnd {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(work);
                }
                Err(_) => tracing::error!(
                    "a request cut off outside the runtime was dropped unfinished; its audit record is missing"
                ),
            }
        }
    }
}
