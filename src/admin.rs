//! The admin listener: liveness and readiness probes, and metrics. It never forwards anything.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::registry::Registry;

use crate::metrics;

/// Shared state the probes report on.
#[derive(Debug, Default)]
pub struct Health {
    /// A key is loaded and the main listener is accepting.
    pub ready: AtomicBool,
    /// What `/metrics` encodes.
    pub metrics: Registry,
}

/// The content type of the OpenMetrics text `prometheus-client` writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers one admin request.
pub async fn handle<B>(
    health: Arc<Health>,
    request: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let (&Method::GET, "/metrics") = (request.method(), request.uri().path()) {
        let mut response = Response::new(Full::new(Bytes::from(metrics::encode(&health.metrics))));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(OPENMETRICS),
        );
        return Ok(response);
    }
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
        assert_eq!(get(&health, "/nothing-here").await, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics_text() {
        let metrics = crate::metrics::Metrics::default();
        metrics.audit_write_errors.inc();
        let health = Arc::new(Health {
            metrics: metrics.registry(),
            ..Health::default()
        });
        let request = Request::get("/metrics").body(()).unwrap();
        let response = handle(health, request).await.unwrap();
        assert_eq!(response.headers()["content-type"], OPENMETRICS);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.contains("datafold_gateway_audit_write_errors_total 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
