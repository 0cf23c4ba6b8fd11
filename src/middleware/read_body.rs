//! Reads the request body in full before the request may take anything shared: a concurrency
//! slot, a rate-limit token, an upstream connection.
//!
//! A caller that sends its headers and then trickles its body (or never sends it) would
//! otherwise hold a slot and the tokens it took for as long as it likes. Here it holds only its
//! own connection, for at most `limits.body_read_timeout`: past it the answer is 408.
//!
//! A declared `Content-Length` over `limits.max_body_bytes` is refused 413 before anything is
//! read; a body without a length (chunked, or HTTP/2 without `content-length`) is capped while
//! it is read, with the same 413. A result poll (`GET`) carries no body: one that does is 400.
//! tower-http's `RequestBodyLimitLayer` answers with its own plain-text 413; callers here get
//! the gateway's JSON error, and the inner layers get the body as bytes in memory.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, EXPECT};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service};

use super::route::Route;
use crate::error::{self, ErrorCode};
use crate::Body;

#[derive(Debug, Clone)]
pub struct ReadBodyLayer {
    max: usize,
    timeout: Duration,
}

impl ReadBodyLayer {
    pub fn new(max: usize, timeout: Duration) -> Self {
        Self { max, timeout }
    }
}

impl<S> Layer<S> for ReadBodyLayer {
    type Service = ReadBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadBody {
            inner,
            max: self.max,
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReadBody<S> {
    inner: S,
    max: usize,
    timeout: Duration,
}

impl<S, B> Service<Request<B>> for ReadBody<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The inner service was made ready for this call; take it and leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (max, timeout) = (self.max, self.timeout);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let declared = parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(len) = declared.filter(|&len| len > max as u64) {
                // A client waiting for `100 Continue` has sent nothing yet; reading would ask it
                // for the body (hyper sends the 100 when the body is first read).
                let waits_to_send = parts
                    .headers
                    .get(EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                if len <= DISCARD_LIMIT as u64 && !waits_to_send {
                    discard(std::pin::pin!(body), timeout).await;
                }
                return Ok(too_large(max, parts.version));
            }
            let bytes = match read(body, max, timeout, parts.version).await {
                Ok(bytes) => bytes,
                Err(refusal) => return Ok(refusal),
            };
            let poll = matches!(
                parts.extensions.get::<Route>(),
                Some(Route::TestResult { .. })
            );
            if poll && !bytes.is_empty() {
                return Ok(error::bad_request(
                    "a result poll (GET) carries no body; send the request without one",
                ));
            }
            inner
                .call(Request::from_parts(parts, Full::new(bytes)))
                .await
        })
    }
}

/// How much of a refused body is read and thrown away before the 413, at most. A connection
/// closed with unread data in it is reset, and a client still sending its body may then lose
/// the answer that says why (it sees a broken pipe, not the 413); reading the rest first lets
/// it read the 413. Past this (or `limits.body_read_timeout`), the answer goes out regardless.
const DISCARD_LIMIT: usize = 8 * 1024 * 1024;

/// The 413, closing the connection: what is left of a body past the discard limit must not be
/// read as the next request, and a client that sends too much once is better off starting anew.
/// (HTTP/1 only: HTTP/2 has no such header, and a stream ends on its own.)
fn too_large(max: usize, version: Version) -> Response<Body> {
    let mut response = error::payload_too_large(max);
    if version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads and drops what is left of `body`, up to [`DISCARD_LIMIT`] bytes within `timeout`.
async fn discard<B>(mut body: Pin<&mut B>, timeout: Duration)
where
    B: http_body::Body<Data = Bytes>,
{
    let drain = async {
        let mut read = 0;
        while let Some(Ok(frame)) = body.as_mut().frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > DISCARD_LIMIT {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, drain).await;
}

/// How reading a body ended.
enum Read {
    Whole(Bytes),
    TooLarge,
    Failed,
}

/// The whole body, or the answer refusing it.
async fn read<B>(
    body: B,
    max: usize,
    timeout: Duration,
    version: Version,
) -> Result<Bytes, Response<Body>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = tokio::time::Instant::now();
    let mut body = std::pin::pin!(body);
    let reading = async {
        // A body in one frame (the usual `{}`) is passed on as it came, without a copy.
        let mut first: Option<Bytes> = None;
        let mut joined: Vec<u8> = Vec::new();
        let mut len = 0;
        while let Some(frame) = body.as_mut().frame().await {
            let Ok(frame) = frame else {
                return Read::Failed;
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers: nothing the gateway forwards
            };
            len += data.len();
            if len > max {
                return Read::TooLarge;
            }
            if first.is_none() && joined.is_empty() {
                first = Some(data);
            } else {
                if let Some(first) = first.take() {
                    joined.extend_from_slice(&first);
                }
                joined.extend_from_slice(&data);
            }
        }
        Read::Whole(first.unwrap_or_else(|| Bytes::from(joined)))
    };
    match tokio::time::timeout(timeout, reading).await {
        Ok(Read::Whole(bytes)) => Ok(bytes),
        Ok(Read::TooLarge) => {
            discard(body, timeout.saturating_sub(started.elapsed())).await;
            Err(too_large(max, version))
        }
        Ok(Read::Failed) => Err(error::bad_request("the request body could not be read")),
        Err(_) => Err(error::error_response(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RequestTimeout,
            "the request body was not received within limits.body_read_timeout",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Recorder;
    use tower::ServiceExt;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn with_length(len: u64) -> Request<Body> {
        Request::builder()
            .header(CONTENT_LENGTH, len)
            .body(Body::default())
            .unwrap()
    }

    #[tokio::test]
    async fn declared_length_over_the_limit_is_refused_413() {
        let recorder = Recorder::default();
        let service = ReadBodyLayer::new(1024, TIMEOUT).layer(recorder.service());
        let response = service.oneshot(with_length(4 << 20)).await.unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(recorder.calls(), 0);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_without_a_length_is_refused_413() {
        let recorder = Recorder::default();
        let service = ReadBodyLayer::new(4, TIMEOUT).layer(recorder.service());
        let request = Request::new(Full::new(Bytes::from_static(b"0123456789")));
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(recorder.calls(), 0);
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_passed_on_read() {
        let recorder = Recorder::default();
        let service = ReadBodyLayer::new(1024, TIMEOUT).layer(recorder.service());
        let request = Request::new(Full::new(Bytes::from_static(b"{}")));
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(recorder.calls(), 1);
    }

    #[tokio::test]
    async fn a_result_poll_with_a_body_is_refused_400() {
        let recorder = Recorder::default();
        let service = ReadBodyLayer::new(1024, TIMEOUT).layer(recorder.service());
        let mut request = Request::new(Full::new(Bytes::from_static(b"{}")));
        request
            .extensions_mut()
            .insert(Route::TestResult { job_id: 1 });
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(recorder.calls(), 0);
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_408() {
        let recorder = Recorder::default();
        let short = Duration::from_millis(50);
        let service = ReadBodyLayer::new(1024, short).layer(recorder.service());
        let never = futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
        let body = http_body_util::StreamBody::new(never);
        let response = service.oneshot(Request::new(body)).await.unwrap();
        assert_eq!(response.status(), 408);
        assert_eq!(recorder.calls(), 0);
    }
}
