//! Refuses a request whose declared `Content-Length` exceeds `limits.max_body_bytes`, before it
//! costs a rate-limit token or an upstream connection.
//!
//! A body sent without a length (chunked, or HTTP/2 without `content-length`) is capped while it
//! is read, in `upstream.rs`, with the same limit. tower-http's `RequestBodyLimitLayer` does both
//! jobs but answers with its own plain-text 413 and its own body type; callers here get the
//! gateway's JSON error with code `payload_too_large`.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use tower::{Layer, Service};

use super::{refuse, Refuse};
use crate::{error, Body};

#[derive(Debug, Clone)]
pub struct BodyLimitLayer {
    max: usize,
}

impl BodyLimitLayer {
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: usize,
}

impl<S, B> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Refuse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max as u64) {
            return refuse(error::payload_too_large(self.max));
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Recorder;
    use tower::ServiceExt;

    fn with_length(len: u64) -> Request<Body> {
        Request::builder()
            .header(CONTENT_LENGTH, len)
            .body(Body::default())
            .unwrap()
    }

    #[tokio::test]
    async fn declared_length_over_the_limit_is_refused_413() {
        let recorder = Recorder::default();
        let service = BodyLimitLayer::new(1024).layer(recorder.service());
        let response = service.oneshot(with_length(4 << 20)).await.unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(recorder.calls(), 0);
    }

    #[tokio::test]
    async fn declared_length_at_the_limit_passes() {
        let recorder = Recorder::default();
        let service = BodyLimitLayer::new(1024).layer(recorder.service());
        let response = service.oneshot(with_length(1024)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(recorder.calls(), 1);
    }
}
