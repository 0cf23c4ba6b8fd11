//! The admin listener: liveness and readiness probes, and metrics. It never forwards anything.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::audit::AuditLog;
use crate::metrics;

/// Shared state the probes report on.
#[derive(Debug, Default)]
pub struct Health {
    /// A key is loaded and the main listener is accepting.
    pub ready: AtomicBool,
    /// What `/metrics` encodes.
    pub metrics: Registry,
    /// The audit log, when forwarding stops while it cannot be written
    /// (`audit.on_failure = "refuse"`): then readiness follows it.
    pub audit: Option<AuditLog>,
}

/// The content type of the OpenMetrics text `prometheus-client` writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const AUDIT_UNWRITABLE: &str = "not ready: the audit file cannot be written, and audit.on_failure = \"refuse\" stops forwarding until it can\n";

/// How long a readiness probe waits for the audit writer's answer.
const PROBE_LIMIT: Duration = Duration::from_secs(1);

/// Whether records can be written. While the last write failed, the probe asks the writer to
/// try again (without writing a record): with the replica out of rotation, no request would
/// otherwise find out that the disk has room again.
async fn audit_writable(audit: Option<&AuditLog>) -> bool {
    let Some(audit) = audit else {
        return true;
    };
    if audit.is_healthy() {
        return true;
    }
    tokio::time::timeout(PROBE_LIMIT, audit.probe())
        .await
        .unwrap_or(false)
}

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
            if !health.ready.load(Ordering::Acquire) {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            } else if !audit_writable(health.audit.as_ref()).await {
                (StatusCode::SERVICE_UNAVAILABLE, AUDIT_UNWRITABLE)
            } else {
                (StatusCode::OK, "ready\n")
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

/// Answers the probes and `/metrics` on the admin listener, one task per connection.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
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
            hyper::service::service_fn(move |request| handle(health.clone(), request)),
        );
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
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
    async fn readyz_is_503_while_the_audit_cannot_be_written_in_refuse_mode() {
        let log = AuditLog::open(
            std::path::Path::new("/dev/full"),
            crate::audit::WriterOptions::default(),
        )
        .unwrap();
        let health = Arc::new(Health {
            audit: Some(log.clone()),
            ..Health::default()
        });
        health.ready.store(true, Ordering::Release);
        assert_eq!(get(&health, "/readyz").await, StatusCode::OK);
        let record = crate::audit::Record::empty();
        assert!(!log.append(&record).await);
        assert_eq!(
            get(&health, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let request = Request::get("/readyz").body(()).unwrap();
        let response = handle(health.clone(), request).await.unwrap();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("audit"));
        log.close().await;
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
