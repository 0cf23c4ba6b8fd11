//! The admin listener: liveness and readiness probes. It never forwards anything.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

/// Shared state the probes report on.
#[derive(Debug, Default)]
pub struct Health {
    /// A key is loaded and the main listener is accepting.
    pub ready: AtomicBool,
}

/// Answers one admin request.
pub async fn handle<B>(
    health: Arc<Health>,
    request: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if health.ready.load(Ordering::Acquire) {
                (StatusCode::OK, "ready\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(health: &Arc<Health>, path: &str) -> StatusCode {
        let request = Request::get(path).body(()).unwrap();
        handle(health.clone(), request).await.unwrap().status()
    }

    #[tokio::test]
    async fn readyz_follows_the_ready_flag_and_healthz_does_not() {
        let health = Arc::new(Health::default());
        assert_eq!(get(&health, "/healthz").await, StatusCode::OK);
        assert_eq!(
            get(&health, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.ready.store(true, Ordering::Release);
        assert_eq!(get(&health, "/readyz").await, StatusCode::OK);
        assert_eq!(
            get(&health, "/metrics-not-yet").await,
            StatusCode::NOT_FOUND
        );
    }
}
