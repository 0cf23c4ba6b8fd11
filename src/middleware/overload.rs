//! Sheds load: past `limits.max_concurrent_requests` requests in flight, answers 503
//! `overloaded` at once instead of queueing callers behind a slow upstream.
//!
//! tower's `ConcurrencyLimit` waits in `poll_ready` and `LoadShed` turns that into an error; the
//! refusal here must be an audited JSON answer, so the permit is taken in `call`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use super::{refuse, Refuse};
use crate::{error, Body};

#[derive(Debug, Clone)]
pub struct ShedOverloadLayer {
    permits: Arc<Semaphore>,
}

impl ShedOverloadLayer {
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
        }
    }
}

impl<S> Layer<S> for ShedOverloadLayer {
    type Service = ShedOverload<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ShedOverload {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ShedOverload<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

pin_project! {
    /// The inner future, holding its place among the requests in flight until it completes.
    pub struct Holding<F> {
        #[pin]
        inner: F,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F: Future> Future for Holding<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        this.permit.take();
        Poll::Ready(output)
    }
}

impl<S, B> Service<Request<B>> for ShedOverload<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Refuse<Holding<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Either::Right(Holding {
                inner: self.inner.call(request),
                permit: Some(permit),
            }),
            Err(_) => refuse(error::overloaded()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn requests_past_the_limit_are_refused_503_while_others_are_in_flight() {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(std::sync::Mutex::new(Some(released)));
        let slow = tower::service_fn(move |_: Request<Body>| {
            let wait = released.lock().unwrap().take();
            async move {
                if let Some(rx) = wait {
                    let _ = rx.await;
                }
                Ok::<_, Infallible>(Response::new(Body::default()))
            }
        });
        let service = ShedOverloadLayer::new(1).layer(slow);
        let mut holder = service.clone();
        // `call` takes the only permit; the future keeps it until the answer is ready.
        let first = holder
            .ready()
            .await
            .unwrap()
            .call(Request::new(Body::default()));
        let second = service
            .clone()
            .oneshot(Request::new(Body::default()))
            .await
            .unwrap();
        assert_eq!(second.status(), 503);
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().status(), 200);
        let after = service
            .oneshot(Request::new(Body::default()))
            .await
            .unwrap();
        assert_eq!(after.status(), 200);
    }
}
