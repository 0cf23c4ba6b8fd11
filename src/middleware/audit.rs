//! Writes one audit record for every request the main listener answers, before the answer is
//! released to the caller.
//!
//! The record is made from what this layer saw of the request (time, peer, method, path,
//! request id), the [`AuditFacts`] the inner layers attached to the response (caller, route,
//! ids, outcome, limit), and, for a forwarded request, what Datafold answered ([`Answered`]:
//! upstream status, job id, test status and steps; its presence is what makes the outcome
//! `forwarded`). Both are taken off the response: they are internal and never leave the gateway.
//!
//! How long a request lives (to its end even if the caller hangs up, tracked for shutdown,
//! cancelled only past the shutdown grace, a panic answered) is `request_task.rs`: this layer
//! hands it the request's work and the writing of its record as one future.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use std::net::IpAddr;

use http::{HeaderValue, Method, Request, Response, Uri, Version};
use tower::{Layer, Service};

use super::request_id::X_REQUEST_ID;
use super::request_task::{guarded, RequestTasks, RunToEnd};
use crate::audit::sampling::{RefusalKind, RefusalSampler};
use crate::audit::{bounded_path, AuditBatcher, AuditFacts, Outcome, Record};
use crate::callers::Peer;
use crate::datafold::Answered;
use crate::metrics::{self, Metrics, RequestLabels};
use crate::Body;

#[derive(Debug, Clone)]
pub struct AuditLayer {
    shared: Arc<Shared>,
}

/// What every request's audit step uses; one `Arc`, so that the per-request clone of the stack
/// costs one reference count here, not one per handle.
#[derive(Debug)]
struct Shared {
    /// This worker's way into the audit file.
    log: AuditBatcher,
    tasks: RequestTasks,
    metrics: Metrics,
    /// Which refusals of strangers get a record of their own.
    refusals: Arc<RefusalSampler>,
}

impl AuditLayer {
    pub fn new(
        log: AuditBatcher,
        tasks: RequestTasks,
        metrics: Metrics,
        refusals: Arc<RefusalSampler>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                log,
                tasks,
                metrics,
                refusals,
            }),
        }
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Audit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Audit<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What the audit record needs from the request, taken before the request moves inward.
/// Cheap clones: the header value and the URI share the request's bytes (a reference count),
/// and the audited path is only made from them when the record is written.
struct Seen {
    ts: SystemTime,
    started: Instant,
    request_id: Option<HeaderValue>,
    peer: Option<Arc<str>>,
    /// The address block a stranger's refusals are counted by (see `Peer::block`).
    peer_block: Option<IpAddr>,
    method: Method,
    version: Version,
    uri: Uri,
}

impl Seen {
    /// See [`audited_target`].
    fn target(&self) -> Cow<'_, str> {
        audited_target(&self.method, self.version, &self.uri)
    }
}

/// What a record says was asked for: the path, without the query (it could carry anything, and
/// is never forwarded). A CONNECT request has no path: its `host:port` is recorded; an
/// HTTP/1 request in absolute form is recorded as the URL it named. User information
/// (`user:password@`) never reaches the record. Only the absolute form needs a new string.
fn audited_target<'a>(method: &Method, version: Version, uri: &'a Uri) -> Cow<'a, str> {
    let authority = uri.authority().and_then(|a| a.as_str().rsplit('@').next());
    if *method == Method::CONNECT {
        return Cow::Borrowed(authority.unwrap_or(uri.path()));
    }
    match (version < Version::HTTP_2, uri.scheme_str(), authority) {
        (true, Some(scheme), Some(authority)) => {
            Cow::Owned(format!("{scheme}://{authority}{}", uri.path()))
        }
        _ => Cow::Borrowed(uri.path()),
    }
}

impl<S, B> Service<Request<B>> for Audit<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RunToEnd;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let peer = request.extensions().get::<Peer>();
        let seen = Seen {
            ts: SystemTime::now(),
            started: Instant::now(),
            request_id: request.headers().get(X_REQUEST_ID).cloned(),
            peer: peer.map(|p| p.addr_text.clone()),
            peer_block: peer.map(Peer::block),
            method: request.method().clone(),
            version: request.version(),
            uri: request.uri().clone(),
        };
        let work = self.inner.call(request);
        let shared = self.shared.clone();
        RunToEnd::new(&self.shared.tasks, async move {
            let response = guarded(work, &shared.tasks.cancel, || {
                let target = seen.target();
                let (path, _) = bounded_path(&target);
                tracing::error!(path, "a request handler panicked");
            })
            .await;
            write_record(seen, response, &shared).await
        })
    }
}

/// Appends the request's record (or, for a stranger, counts it towards a summary) and counts
/// it in the metrics; returns the response, its facts removed.
async fn write_record(seen: Seen, mut response: Response<Body>, shared: &Shared) -> Response<Body> {
    let facts = response
        .extensions_mut()
        .remove::<AuditFacts>()
        .unwrap_or_default();
    // Present when the request was forwarded and Datafold answered.
    let answered = response.extensions_mut().remove::<Answered>();
    let test = answered.as_ref().and_then(|a| a.test.as_ref());
    let target = seen.target();
    let (path, path_truncated) = bounded_path(&target);
    let record = Record {
        ts: seen.ts,
        request_id: seen.request_id.as_ref().and_then(|v| v.to_str().ok()),
        caller: facts.caller.as_deref(),
        peer: seen.peer.as_deref(),
        method: Some(seen.method.as_str()),
        path: Some(path),
        path_truncated,
        route: facts.route,
        data_source_id: facts.data_source_id,
        job_id: facts.job_id.or(answered.as_ref().and_then(|a| a.job_id)),
        status: response.status().as_u16(),
        outcome: match (facts.outcome, &answered) {
            (Some(outcome), _) => outcome,
            (None, Some(_)) => Outcome::Forwarded,
            (None, None) => Outcome::Rejected,
        },
        limit: facts.limit,
        upstream_status: answered.as_ref().map(|a| a.status),
        test_status: test.map(|t| &*t.status),
        test_steps: test.map(|t| &t.steps).filter(|steps| !steps.0.is_empty()),
        duration_ms: (seen.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        suppressed: None,
    };
    count(
        &shared.metrics,
        &record,
        facts.caller.as_ref().filter(|_| facts.caller_listed),
        seen.started.elapsed(),
    );
    if facts.stranger {
        let kind = RefusalKind {
            status: record.status,
            outcome: record.outcome,
            limit: record.limit,
        };
        if !shared.refusals.admit(seen.peer_block, kind, seen.ts) {
            shared.metrics.audit_suppressed.inc();
            return response;
        }
    }
    shared.log.append(&record).await;
    response
}

fn count(metrics: &Metrics, record: &Record<'_>, listed_caller: Option<&Arc<str>>, took: Duration) {
    let route = record.route.unwrap_or("none");
    let labels = RequestLabels {
        route,
        status: record.status,
        outcome: metrics::outcome_label(record.outcome),
    };
    metrics.request_done(labels, took, listed_caller);
    if let Some(limit) = record.limit {
        metrics.rate_limited(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditLog, Limit};
    use http::StatusCode;
    use tower::ServiceExt;

    /// `inner` behind the audit layer, writing to a fresh audit file; the file's folder must be
    /// kept for as long as the file is used.
    fn audited<S>(inner: S) -> (tempfile::TempDir, std::path::PathBuf, AuditLog, Audit<S>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, crate::audit::WriterOptions::default()).unwrap();
        let service = AuditLayer::new(
            log.batcher(),
            RequestTasks::default(),
            Metrics::default(),
            Arc::default(),
        )
        .layer(inner);
        (dir, path, log, service)
    }

    #[tokio::test]
    async fn record_combines_request_and_inner_facts() {
        let inner = tower::service_fn(|_: Request<Body>| async {
            let mut response = Response::new(Body::default());
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response.extensions_mut().insert(AuditFacts {
                caller: Some("10.0.0.7".into()),
                route: Some("test_connection"),
                data_source_id: Some(42),
                outcome: Some(Outcome::RateLimited),
                limit: Some(Limit::DataSource),
                ..AuditFacts::default()
            });
            Ok::<_, Infallible>(response)
        });
        let (_dir, path, log, service) = audited(inner);
        let mut request = Request::builder()
            .method("POST")
            .uri("/api/v1/data_sources/42/test?x=1")
            .header(X_REQUEST_ID, "req-1")
            .body(Body::default())
            .unwrap();
        request
            .extensions_mut()
            .insert(Peer::new("10.0.0.7:40000".parse().unwrap()));
        let response = service.oneshot(request).await.unwrap();
        assert!(response.extensions().get::<AuditFacts>().is_none());

        let line = std::fs::read_to_string(&path).unwrap();
        let record: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(record["request_id"], "req-1");
        assert_eq!(record["caller"], "10.0.0.7");
        assert_eq!(record["peer"], "10.0.0.7:40000");
        assert_eq!(record["method"], "POST");
        assert_eq!(record["path"], "/api/v1/data_sources/42/test");
        assert_eq!(record["route"], "test_connection");
        assert_eq!(record["data_source_id"], 42);
        assert_eq!(record["job_id"], serde_json::Value::Null);
        assert_eq!(record["status"], 429);
        assert_eq!(record["outcome"], "rate_limited");
        assert_eq!(record["limit"], "data_source");
        assert_eq!(record["upstream_status"], serde_json::Value::Null);
        assert!(record["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(record["ts"].as_str().unwrap().ends_with('Z'));
        log.close().await;
    }

    /// The record of a request whose inner answer carries `answered`, as the upstream service
    /// leaves it, beside the route layer's facts.
    async fn record_of_forwarded(answered: Answered) -> serde_json::Value {
        let inner = tower::service_fn(move |_: Request<Body>| {
            let answered = answered.clone();
            async move {
                let mut response = Response::new(Body::default());
                response.extensions_mut().insert(answered);
                response.extensions_mut().insert(AuditFacts {
                    route: Some("test_result"),
                    job_id: None,
                    ..AuditFacts::default()
                });
                Ok::<_, Infallible>(response)
            }
        });
        let (_dir, path, log, service) = audited(inner);
        let response = service
            .oneshot(Request::new(Body::default()))
            .await
            .unwrap();
        assert!(response.extensions().get::<Answered>().is_none());
        log.close().await;
        let line = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str(line.trim_end()).unwrap()
    }

    #[tokio::test]
    async fn what_datafold_answered_is_audited_and_makes_the_outcome_forwarded() {
        let started = record_of_forwarded(Answered::read(true, 200, br#"{"job_id": 9}"#)).await;
        assert_eq!(started["outcome"], "forwarded");
        assert_eq!(started["upstream_status"], 200);
        assert_eq!(started["job_id"], 9);
        assert_eq!(started["test_status"], serde_json::Value::Null);

        let body =
            br#"{"status": "failed", "results": [{"step": "connection", "status": "failed"}]}"#;
        let polled = record_of_forwarded(Answered::read(false, 200, body)).await;
        assert_eq!(polled["test_status"], "failed");
        assert_eq!(
            polled["test_steps"],
            serde_json::json!({"connection": "failed"})
        );

        // A result without steps has none in the record; an error answer is still forwarded.
        let bare =
            record_of_forwarded(Answered::read(false, 200, br#"{"status": "running"}"#)).await;
        assert_eq!(bare["test_status"], "running");
        assert_eq!(bare["test_steps"], serde_json::Value::Null);
        let failed = record_of_forwarded(Answered::read(true, 500, b"oops")).await;
        assert_eq!(failed["outcome"], "forwarded");
        assert_eq!(failed["upstream_status"], 500);
        assert_eq!(failed["job_id"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn a_panicking_request_is_answered_500_and_still_audited() {
        let inner = tower::service_fn(|_: Request<Body>| async {
            if true {
                panic!("a bug");
            }
            Ok::<_, Infallible>(Response::new(Body::default()))
        });
        let (_dir, path, log, service) = audited(inner);
        let response = service
            .oneshot(Request::new(Body::default()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        log.close().await;
        let line = std::fs::read_to_string(&path).unwrap();
        let record: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(record["status"], 500);
        assert_eq!(record["outcome"], "aborted");
    }
}
