//! The way to Datafold: a pooled HTTPS client and the service at the bottom of the stack that
//! forwards an allowed request and brings the answer back.
//!
//! The client always verifies the upstream's certificate, against the public web roots plus
//! `upstream.ca_file`; there is no switch to turn verification off. Connections are pooled and
//! reused, over HTTP/2 where the upstream offers it by ALPN.
//!
//! The caller's request body is read in full (it is `{}` in practice, capped by
//! `limits.max_body_bytes`) and sent with a `Content-Length` of the gateway's own counting, so
//! however the caller framed its body, the upstream sees exactly one well-framed request. The
//! answer is read in full too, within `upstream.timeout`, so that its `job_id` can be audited.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, CONNECTION, CONTENT_LENGTH, HOST};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use tower::Service;

use crate::audit::{AuditFacts, Outcome, TestSteps};
use crate::config::{Upstream as UpstreamConfig, UpstreamUrl};
use crate::error::{self, UpstreamFailure};
use crate::metrics::{KindLabels, Metrics, RouteLabels};
use crate::middleware::request_id::X_REQUEST_ID;
use crate::middleware::route::Route;
use crate::Body;

pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Largest upstream answer read; Datafold's answers to these two endpoints are a few KiB.
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Builds the TLS trust roots: the public web roots plus the PEM certificates in `ca_file`.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("upstream.ca_file: cannot read {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                format!("upstream.ca_file: {} is not valid PEM: {e}", path.display())
            })?;
            roots.add(cert).map_err(|e| {
                format!(
                    "upstream.ca_file: {} holds an unusable certificate: {e}",
                    path.display()
                )
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "upstream.ca_file: {} holds no PEM certificate",
                path.display()
            ));
        }
    }
    Ok(roots)
}

/// The pooled HTTPS client to the upstream.
pub fn client(config: &UpstreamConfig) -> Result<HttpsClient, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(root_store(config.ca_file.as_deref())?)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(https))
}

/// Forwards an allowed request (one with a [`Route`]) to the upstream.
#[derive(Clone)]
pub struct Forward {
    shared: Arc<Shared>,
}

struct Shared {
    client: HttpsClient,
    metrics: Metrics,
    url: UpstreamUrl,
    timeout: Duration,
    max_body_bytes: usize,
    body_read_timeout: Duration,
}

impl Forward {
    pub fn new(
        client: HttpsClient,
        metrics: Metrics,
        url: UpstreamUrl,
        timeout: Duration,
        max_body_bytes: usize,
        body_read_timeout: Duration,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                metrics,
                url,
                timeout,
                max_body_bytes,
                body_read_timeout,
            }),
        }
    }
}

impl<B> Service<Request<B>> for Forward
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.forward(request).await) })
    }
}

/// The start of a connection test, as Datafold answers it.
#[derive(Deserialize)]
struct TestStarted {
    job_id: i64,
}

/// A connection test's results, as Datafold answers a poll; only what the audit needs.
#[derive(Deserialize)]
struct TestResults {
    status: Box<str>,
    #[serde(default)]
    results: Vec<TestStep>,
}

#[derive(Deserialize)]
struct TestStep {
    step: Box<str>,
    status: Box<str>,
}

impl TestResults {
    fn into_facts(self, facts: &mut AuditFacts) {
        facts.test_status = Some(self.status);
        if !self.results.is_empty() {
            facts.test_steps = Some(TestSteps(
                self.results
                    .into_iter()
                    .map(|step| (step.step, step.status))
                    .collect(),
            ));
        }
    }
}

impl Shared {
    fn count_failure(&self, failure: UpstreamFailure) {
        self.metrics
            .upstream_errors
            .get_or_create(&KindLabels {
                kind: failure.kind(),
            })
            .inc();
    }

    async fn forward<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (mut parts, body) = request.into_parts();
        let Some(route) = parts.extensions.get::<Route>().copied() else {
            // Only the route layer lets requests through, and it always says which route.
            tracing::error!("a request reached the upstream without a route");
            return error::internal_error();
        };
        let body = match tokio::time::timeout(
            self.body_read_timeout,
            Limited::new(body, self.max_body_bytes).collect(),
        )
        .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return error::payload_too_large(self.max_body_bytes)
            }
            Ok(Err(_)) => return error::bad_request("the request body could not be read"),
            Err(_) => {
                return error::error_response(
                    StatusCode::REQUEST_TIMEOUT,
                    error::ErrorCode::RequestTimeout,
                    "the request body was not received within limits.header_read_timeout",
                )
            }
        };

        let uri = match self.url.join(&route.upstream_path()) {
            Ok(uri) => uri,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the upstream URI");
                return error::internal_error();
            }
        };
        // Hop-by-hop headers were stripped at the edge of the stack (see `stack.rs`).
        parts.headers.remove(HOST);
        // The body is already here in full: nothing for the upstream to say "continue" to.
        parts.headers.remove(header::EXPECT);
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        let mut upstream_request = Request::new(Full::new(body));
        *upstream_request.method_mut() = parts.method;
        *upstream_request.uri_mut() = uri;
        *upstream_request.version_mut() = Version::HTTP_11;
        *upstream_request.headers_mut() = parts.headers;

        let exchange = async {
            let response = self.client.request(upstream_request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, exchange).await;
        self.metrics
            .upstream_duration
            .get_or_create(&RouteLabels {
                route: route.name(),
            })
            .observe(started.elapsed().as_secs_f64());
        let (mut parts, body) = match result {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                let failure = UpstreamFailure::classify(e.as_ref());
                self.count_failure(failure);
                // Debug shows the whole chain of causes; Display only the outermost.
                tracing::warn!(upstream = %self.url.authority, ?failure, error = ?e, "upstream exchange failed");
                return failure.response(self.url.authority.as_str());
            }
            Err(_) => {
                self.count_failure(UpstreamFailure::Timeout);
                tracing::warn!(upstream = %self.url.authority, timeout = ?self.timeout, "upstream did not answer in time");
                return UpstreamFailure::Timeout.response(self.url.authority.as_str());
            }
        };

        let ok = parts.status == StatusCode::OK;
        let job_id = match route {
            Route::TestConnection { .. } if ok => serde_json::from_slice::<TestStarted>(&body)
                .ok()
                .map(|t| t.job_id),
            _ => None,
        };
        let results = match route {
            Route::TestResult { .. } if ok => serde_json::from_slice::<TestResults>(&body).ok(),
            _ => None,
        };
        remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(CONTENT_LENGTH);
        // The request id is the gateway's: the caller's or the one it made, never Datafold's.
        parts.headers.remove(X_REQUEST_ID);
        parts.extensions = http::Extensions::new();
        let status = parts.status.as_u16();
        let mut response = Response::from_parts(parts, Body::from(body));
        let facts = response
            .extensions_mut()
            .get_or_insert_default::<AuditFacts>();
        facts.outcome = Some(Outcome::Forwarded);
        facts.upstream_status = Some(status);
        if job_id.is_some() {
            facts.job_id = job_id;
        }
        if let Some(results) = results {
            results.into_facts(facts);
        }
        response
    }
}

/// Headers that describe one connection, not the message: never passed on, either way.
static HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes a request's hop-by-hop headers; see [`remove_hop_by_hop`].
pub fn strip_hop_by_hop<B>(mut request: Request<B>) -> Request<B> {
    remove_hop_by_hop(request.headers_mut());
    request
}

/// Removes hop-by-hop headers, including any that `Connection` names. One pass over the
/// headers present: most messages carry none of these, and then nothing is looked up or removed.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        if name == CONNECTION {
            let named = value.to_str().ok().into_iter().flat_map(|v| v.split(','));
            doomed.extend(named.filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()));
        }
        if (HOP_BY_HOP.contains(name) || name == header::UPGRADE) && !doomed.contains(name) {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        remove_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = root_store(Some(&path)).unwrap_err();
        assert!(
            err.contains("upstream.ca_file") && err.contains("empty.pem"),
            "{err}"
        );
    }
}
