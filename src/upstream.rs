//! The way to Datafold: the service at the bottom of the stack that forwards an allowed request
//! through the worker's connection pool (`pool.rs`) and brings the answer back.
//!
//! The upstream's certificate is always verified, against the public web roots plus
//! `upstream.ca_file` ([`root_store`]); there is no switch to turn verification off.
//!
//! The caller's request body arrives here read in full (by `middleware/read_body.rs`) and is sent
//! with a `Content-Length` of the gateway's own counting, so however the caller framed its body,
//! the upstream sees exactly one well-framed request. The answer is read in full too, within
//! `upstream.timeout` and `limits.max_response_bytes`, so that what it says
//! can be read ([`Answered`], in `datafold.rs`) for the job book and the audit.
//!
//! Headers cross by allow-list, both ways ([`AllowedHeaders`]): only what the gateway chose
//! reaches Datafold (no `X-Forwarded-*`, method overrides or cookies), and only what it chose
//! reaches the caller (no `Set-Cookie` issued to the key's user). What is dropped is counted in
//! `datafold_gateway_headers_dropped_total{direction}`.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, ACCEPT_ENCODING, CONNECTION, CONTENT_LENGTH};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tower::Service;

use crate::config::{Config, UpstreamUrl};
use crate::datafold::Answered;
use crate::error::{self, TlsError, UpstreamFailure};
use crate::metrics::{KindLabels, Metrics};
use crate::middleware::request_id::X_REQUEST_ID;
use crate::middleware::route::Route;
use crate::pool::Pool;
use crate::Body;

/// Builds the TLS trust roots: the public web roots plus the PEM certificates in `ca_file`.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    const KEY: &str = "upstream.ca_file";
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| TlsError::Unreadable {
            key: KEY,
            path: path.to_owned(),
            source,
        })?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|source| TlsError::NotPem {
                key: KEY,
                path: path.to_owned(),
                source,
            })?;
            roots.add(cert).map_err(|source| TlsError::UnusableRoot {
                key: KEY,
                what: "certificate",
                path: path.to_owned(),
                source,
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsError::NoCertificate {
                key: KEY,
                path: path.to_owned(),
            });
        }
    }
    Ok(roots)
}

/// Forwards an allowed request (one with a [`Route`], its body read) to the upstream.
#[derive(Clone)]
pub struct Forward {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Pool,
    metrics: Metrics,
    url: UpstreamUrl,
    timeout: Duration,
    max_response_bytes: usize,
    request_headers: AllowedHeaders,
    response_headers: AllowedHeaders,
}

impl Forward {
    pub fn new(pool: Pool, metrics: Metrics, config: &Config) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool,
                metrics,
                url: config.upstream.url.clone(),
                timeout: config.upstream.timeout,
                max_response_bytes: config.limits.max_response_bytes,
                request_headers: AllowedHeaders::request(&config.upstream.forward_headers),
                response_headers: AllowedHeaders::response(&config.upstream.return_headers),
            }),
        }
    }
}

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.forward(request).await) })
    }
}

impl Shared {
    fn count_dropped(&self, direction: &'static str, dropped: u64) {
        if dropped > 0 {
            self.metrics.headers_dropped(direction, dropped);
        }
    }

    fn count_failure(&self, failure: UpstreamFailure) {
        self.metrics
            .upstream_errors
            .get_or_create(&KindLabels {
                kind: failure.kind(),
            })
            .inc();
    }

    async fn forward(&self, request: Request<Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let Some(route) = parts.extensions.get::<Route>().copied() else {
            // Only the route layer lets requests through, and it always says which route.
            tracing::error!("a request reached the upstream without a route");
            return error::internal_error();
        };
        let uri = match self.url.target(route.upstream_path()) {
            Ok(uri) => uri,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the upstream URI");
                return error::internal_error();
            }
        };
        let (mut headers, dropped) = self.request_headers.keep(parts.headers);
        self.count_dropped("request", dropped);
        // The body was read in full before the request got this far: its length is known.
        let length = http_body::Body::size_hint(&body).exact().unwrap_or(0);
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        // Every answer is read for its audit facts (job id, test status): ask for it plain.
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let mut upstream_request = Request::new(body);
        *upstream_request.method_mut() = parts.method;
        *upstream_request.uri_mut() = uri;
        *upstream_request.headers_mut() = headers;

        let max = self.max_response_bytes;
        let exchange = async {
            let response = self.pool.send(upstream_request).await?;
            let (parts, body) = response.into_parts();
            if parts.status.is_informational() {
                return Err(UpstreamFailure::InvalidResponse.into());
            }
            let declared = parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|len| len > max as u64) {
                return Err(UpstreamFailure::TooLarge.into());
            }
            let body = match Limited::new(body, max).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(UpstreamFailure::TooLarge.into())
                }
                Err(e) => return Err(e),
            };
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, exchange).await;
        self.metrics.upstream_done(route.name(), started.elapsed());
        let (parts, body) = match result {
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

        let started_test = matches!(route, Route::TestConnection { .. });
        let answered = Answered::read(started_test, parts.status.as_u16(), &body);
        let status = parts.status;
        let (headers, dropped) = self.response_headers.keep(parts.headers);
        self.count_dropped("response", dropped);
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response.extensions_mut().insert(answered);
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

/// Caller headers that reach Datafold, besides `upstream.forward_headers`. `Authorization` is
/// the gateway's by now (the key layer set it); `Content-Length` and `Accept-Encoding` are set
/// by the gateway after this list is applied.
const FORWARDED: [HeaderName; 5] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::USER_AGENT,
    HeaderName::from_static(X_REQUEST_ID),
];

/// Datafold headers that reach the caller, besides `upstream.return_headers` and the
/// `RateLimit-*` and `X-RateLimit-*` families (Datafold's quota, useful to callers; the IETF
/// draft's own field is a bare `RateLimit`). `Content-Length` is the gateway's, and so is
/// `X-Request-Id`, set further out.
const RETURNED: [HeaderName; 7] = [
    HeaderName::from_static("ratelimit"),
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CACHE_CONTROL,
    header::DATE,
    header::RETRY_AFTER,
    header::VARY,
];

/// Prefixes of header families passed back to callers.
const RETURNED_PREFIXES: [&str; 2] = ["ratelimit-", "x-ratelimit-"];

/// The headers allowed across the gateway in one direction; everything else is dropped.
#[derive(Debug, Clone)]
pub struct AllowedHeaders {
    names: Vec<HeaderName>,
    prefixes: &'static [&'static str],
}

impl AllowedHeaders {
    /// What goes from callers to Datafold: [`FORWARDED`] and `extra`.
    pub fn request(extra: &[crate::config::HeaderName]) -> Self {
        Self {
            names: FORWARDED
                .iter()
                .cloned()
                .chain(extra.iter().map(|n| n.0.clone()))
                .collect(),
            prefixes: &[],
        }
    }

    /// What goes from Datafold back to callers: [`RETURNED`], the quota families and `extra`.
    pub fn response(extra: &[crate::config::HeaderName]) -> Self {
        Self {
            names: RETURNED
                .iter()
                .cloned()
                .chain(extra.iter().map(|n| n.0.clone()))
                .collect(),
            prefixes: &RETURNED_PREFIXES,
        }
    }

    pub fn allows(&self, name: &HeaderName) -> bool {
        self.names.contains(name) || self.prefixes.iter().any(|p| name.as_str().starts_with(p))
    }

    /// The allowed headers of `headers` (all their values), and how many values were dropped.
    pub fn keep(&self, headers: HeaderMap) -> (HeaderMap, u64) {
        let mut kept = HeaderMap::with_capacity(headers.keys_len().min(self.names.len() + 4));
        let mut dropped = 0;
        let mut current: Option<HeaderName> = None;
        for (name, value) in headers {
            // Later values of a name come without it: they follow their first.
            if let Some(name) = name {
                current = self.allows(&name).then_some(name);
            }
            match &current {
                Some(name) => {
                    kept.append(name.clone(), value);
                }
                None => dropped += 1,
            }
        }
        (kept, dropped)
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
        let err = root_store(Some(&path)).unwrap_err().to_string();
        assert!(
            err.contains("upstream.ca_file") && err.contains("empty.pem"),
            "{err}"
        );
    }
}
