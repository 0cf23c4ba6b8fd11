//! The gateway's own layers, one per file, each accepting or refusing a request on one ground.
//!
//! The order they are stacked in, and why, is in `stack.rs`. What a layer learns about a request
//! (its route, its caller) travels back to the audit layer in the response's extensions, as
//! [`AuditFacts`]: refusals carry their facts, and [`Stamped`] adds a layer's fact to the answer
//! of the layers inside it.

pub mod api_key;
pub mod audit;
pub mod audit_gate;
pub mod caller;
pub mod jobs;
pub mod overload;
pub mod rate_limit;
pub mod read_body;
pub mod request_id;
pub mod request_task;
pub mod route;

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::task::{ready as ready_poll, Context, Poll};

use futures_util::future::Either;
use http::Response;
use pin_project_lite::pin_project;

use crate::audit::AuditFacts;
use crate::Body;

/// The future of a layer that either refuses at once or hands the request on.
pub type Refuse<F> = Either<Ready<Result<Response<Body>, Infallible>>, F>;

/// Refuses with `response`, without calling the inner service.
pub fn refuse<F>(response: Response<Body>) -> Refuse<F> {
    Either::Left(ready(Ok(response)))
}

/// Something a layer knows about a request that belongs in its audit record.
pub trait Fact {
    fn record(self, facts: &mut AuditFacts);
}

/// Adds `fact` to a response's [`AuditFacts`].
pub fn record_fact(response: &mut Response<Body>, fact: impl Fact) {
    fact.record(
        response
            .extensions_mut()
            .get_or_insert_default::<AuditFacts>(),
    );
}

pin_project! {
    /// The inner service's future, whose response gets `fact` added on the way out.
    pub struct Stamped<F, T> {
        #[pin]
        inner: F,
        fact: Option<T>,
    }
}

impl<F, T> Stamped<F, T> {
    pub fn new(inner: F, fact: T) -> Self {
        Self {
            inner,
            fact: Some(fact),
        }
    }
}

impl<F, T> Future for Stamped<F, T>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
    T: Fact,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready_poll!(this.inner.poll(cx));
        if let Some(fact) = this.fact.take() {
            record_fact(&mut response, fact);
        }
        Poll::Ready(Ok(response))
    }
}
