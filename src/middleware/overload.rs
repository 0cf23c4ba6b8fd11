//! Sheds load: past `limits.max_concurrent_requests` admitted requests in flight, answers 503
//! `overloaded` at once instead of queueing callers behind a slow upstream.
//!
//! tower's `ConcurrencyLimit` waits in `poll_ready` and `LoadShed` turns that into an error; the
//! refusal here must be an audited JSON answer, so the place is taken in `call`. Nobody ever
//! waits for a place, so a count is all it takes: one atomic add to enter and one to leave, where
//! a semaphore would take a lock to give its permit back.
//!
//! This is a count of its own on purpose. The gateway's count of requests in flight (the
//! workers' trackers: what shutdown drains and `in_flight_requests` reports) holds every request
//! from its first byte, strangers' refusals and bodies being read included. Shedding by it would
//! let requests that are not admitted (unauthenticated, or still trickling a body in) take the
//! places of callers' forwarded requests. The places here are taken only by requests that have
//! passed the caller check and the body read, where the layer sits in the stack.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{refuse, Refuse};
use crate::{error, Body};

#[derive(Debug, Clone)]
pub struct ShedOverloadLayer {
    in_flight: Arc<InFlight>,
}

/// The requests in flight, shared by every clone of the layer and its services.
#[derive(Debug)]
struct InFlight {
    count: AtomicUsize,
    max: usize,
}

impl InFlight {
    /// Takes a place, or `None` if all `max` are taken.
    fn enter(self: &Arc<Self>) -> Option<Place> {
        // Relaxed: the count guards no other memory, it only has to add up.
        if self.count.fetch_add(1, Ordering::Relaxed) < self.max {
            Some(Place(self.clone()))
        } else {
            self.count.fetch_sub(1, Ordering::Relaxed);
            None
        }
    }
}

/// One request's place among those in flight, given back when dropped.
#[derive(Debug)]
struct Place(Arc<InFlight>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ShedOverloadLayer {
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            in_flight: Arc::new(InFlight {
                count: AtomicUsize::new(0),
                max: max_in_flight,
            }),
        }
    }
}

impl<S> Layer<S> for ShedOverloadLayer {
    type Service = ShedOverload<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ShedOverload {
            inner,
            in_flight: self.in_flight.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ShedOverload<S> {
    inner: S,
    in_flight: Arc<InFlight>,
}

pin_project! {
    /// The inner future, holding its place among the requests in flight until it completes or
    /// is dropped.
    pub struct Holding<F> {
        #[pin]
        inner: F,
        place: Option<Place>,
    }
}

impl<F: Future> Future for Holding<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        this.place.take();
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
        match self.in_flight.enter() {
            Some(place) => Either::Right(Holding {
                inner: self.inner.call(request),
                place: Some(place),
            }),
            None => refuse(error::overloaded()),
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
        // `call` takes the only place; the future keeps it until the answer is ready.
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

    #[tokio::test]
    async fn a_dropped_request_gives_its_place_back() {
        // The first request never gets an answer; later ones at once.
        let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stuck_then_quick = tower::service_fn(move |_: Request<Body>| {
            let stuck = first.swap(false, Ordering::Relaxed);
            async move {
                if stuck {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(Response::new(Body::default()))
            }
        });
        let service = ShedOverloadLayer::new(1).layer(stuck_then_quick);
        let mut holder = service.clone();
        let stuck = holder
            .ready()
            .await
            .unwrap()
            .call(Request::new(Body::default()));
        let refused = service
            .clone()
            .oneshot(Request::new(Body::default()))
            .await
            .unwrap();
        assert_eq!(refused.status(), 503);
        // As when a caller hangs up: the request's future is dropped unfinished.
        drop(stuck);
        let after = service
            .oneshot(Request::new(Body::default()))
            .await
            .unwrap();
        assert_eq!(after.status(), 200);
    }
}
