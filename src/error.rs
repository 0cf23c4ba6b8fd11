//! Every answer the gateway makes itself, in one place.
//!
//! Gateway-made errors are JSON `{"detail": "<human message>", "code": "<stable code>"}`; the
//! codes are an interface that callers match on. Invalid path parameters are the exception: they
//! get Datafold's own `HTTPValidationError` shape so that Datafold's clients parse them as usual.
//! Upstream failures are classified here too, from the error's chain of causes. The reasons the
//! gateway cannot start, or stops serving, are here as well: [`GatewayError`].

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::audit::{AuditError, AuditFacts, Limit, Outcome};
use crate::secret::KeyError;
use crate::server::WorkerError;
use crate::Body;

/// Why the gateway cannot start, or stopped serving. Each message names the setting at fault where
/// there is one; none holds the key or a caller's token.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// `api_key.env` or `api_key.file` does not give a usable key.
    #[error(transparent)]
    ApiKey(#[from] KeyError),
    /// The upstream's trust roots (`upstream.ca_file`) cannot be used, or `upstream.url` cannot
    /// be checked against a certificate.
    #[error(transparent)]
    Upstream(TlsError),
    /// The main listener's certificate, key or client CA (`listen.tls_cert` and the rest).
    #[error(transparent)]
    ListenerTls(TlsError),
    /// `audit.integrity_key_file` does not give a key.
    #[error("audit.integrity_key_file: {0}")]
    IntegrityKey(#[from] crate::audit::chain::IntegrityKeyError),
    /// The folder `audit.file` is to be created in does not exist.
    #[error("audit.file: the folder {} of {} does not exist", folder.display(), file.display())]
    AuditFolderMissing { folder: PathBuf, file: PathBuf },
    /// The audit file cannot be opened for appending.
    #[error(transparent)]
    AuditFile(#[from] AuditError),
    /// `key` is the setting that asked for the address: `listen.addr` or `admin.addr`.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    /// A bound socket could not tell its own address.
    #[error(transparent)]
    Socket(#[from] io::Error),
    /// A worker's thread or runtime could not be started.
    #[error("cannot start worker {index}: {reason}")]
    WorkerStart { index: usize, reason: WorkerError },
    /// A worker serves until told to stop; this one ended on its own.
    #[error("a worker ended unexpectedly: {0}")]
    WorkerEnded(WorkerError),
    /// Shutdown gave up waiting for the workers.
    #[error("workers did not stop within limits.shutdown_grace + {margin:?}; records of requests still in flight may be missing")]
    WorkersOverran { margin: Duration },
}

/// Why TLS cannot be set up: the upstream's side (`upstream.ca_file`, `upstream.url`) or the
/// main listener's (`listen.tls_cert`, `listen.tls_key`, `listen.client_ca`). Each message
/// names the setting and the file at fault; none quotes what a file holds.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file (`key` names the setting) cannot be read.
    #[error("{key}: cannot read {}: {source}", path.display())]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A certificate file is not valid PEM.
    #[error("{key}: {} is not valid PEM: {source}", path.display())]
    NotPem {
        key: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file holds no PEM certificate at all.
    #[error("{key}: {} holds no PEM certificate", path.display())]
    NoCertificate { key: &'static str, path: PathBuf },
    /// A trust root that rustls refuses; `what` says which kind ("certificate", "CA certificate").
    #[error("{key}: {} holds an unusable {what}: {source}", path.display())]
    UnusableRoot {
        key: &'static str,
        what: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    /// `listen.tls_key` holds no PEM private key that can be used.
    #[error("listen.tls_key: {} holds no usable PEM private key: {source}", path.display())]
    NoPrivateKey {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    /// `listen.tls_key` is not the key of the certificate in `listen.tls_cert`.
    #[error("listen.tls_key: {} does not fit the certificate in {}: {source}", key_path.display(), cert_path.display())]
    KeyMismatch {
        key_path: PathBuf,
        cert_path: PathBuf,
        source: rustls::Error,
    },
    /// No client-certificate verifier can be built from `listen.client_ca`.
    #[error("listen.client_ca: {}: {source}", path.display())]
    ClientVerifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    /// The upstream's TLS client cannot be set up with safe protocol versions (a build problem).
    #[error("TLS setup: {0}")]
    UpstreamProtocols(#[source] rustls::Error),
    /// The listener's TLS server cannot be set up with safe protocol versions (a build problem).
    #[error("listen.tls_cert: TLS setup: {0}")]
    ListenerProtocols(#[source] rustls::Error),
    /// `upstream.url`'s host is neither a DNS name nor an IP address a certificate can name.
    #[error("upstream.url: {host} cannot be checked against a certificate: {source}")]
    UpstreamName {
        host: String,
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// `upstream.url`'s authority, without its default port, is not an authority.
    #[error("upstream.url: {0}")]
    UpstreamAuthority(#[source] http::uri::InvalidUri),
    /// `upstream.url`'s authority cannot be sent as a `Host` header.
    #[error("upstream.url: {authority} cannot be a Host header: {source}")]
    HostHeader {
        authority: String,
        source: http::header::InvalidHeaderValue,
    },
}

/// Stable error codes in gateway-made error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    RequestTimeout,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    RateLimited,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamResponseTooLarge,
    UpstreamInvalidResponse,
    Overloaded,
    ShuttingDown,
    AuditUnavailable,
    InternalError,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    detail: &'a str,
    code: ErrorCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<Limit>,
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Body::from(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A gateway-made error answer, tagged for the audit record as refused by the gateway.
pub fn error_response(status: StatusCode, code: ErrorCode, detail: &str) -> Response<Body> {
    let body = serde_json::to_vec(&ErrorBody {
        detail,
        code,
        limit: None,
    })
    .unwrap_or_default();
    let mut response = json(status, body);
    response
        .extensions_mut()
        .insert(AuditFacts::outcome(Outcome::Rejected));
    response
}

pub fn not_found() -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "this gateway forwards only POST /api/v1/data_sources/{id}/test and GET /api/v1/data_sources/test/{job_id}",
    )
}

pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        &format!("this endpoint accepts only {allow}"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

pub fn payload_too_large(max: usize) -> Response<Body> {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::PayloadTooLarge,
        &format!("request body is larger than limits.max_body_bytes ({max} bytes)"),
    )
}

pub fn bad_request(detail: &str) -> Response<Body> {
    error_response(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, detail)
}

pub fn overloaded() -> Response<Body> {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Overloaded,
        "the gateway is handling limits.max_concurrent_requests requests already; retry shortly",
    )
}

/// The answer to a request still running when the shutdown grace ran out.
pub fn shutting_down() -> Response<Body> {
    let mut response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ShuttingDown,
        "the gateway is shutting down and could not finish this request; retry",
    );
    response
        .extensions_mut()
        .insert(AuditFacts::outcome(Outcome::Aborted));
    response
}

/// 401 for a caller without known credentials; `WWW-Authenticate` names the scheme to use.
pub fn unauthorized(detail: &str) -> Response<Body> {
    let mut response = error_response(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, detail);
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// 403 for an authenticated caller that `callers.allow` leaves out.
pub fn forbidden() -> Response<Body> {
    error_response(
        StatusCode::FORBIDDEN,
        ErrorCode::Forbidden,
        "this client certificate's identity is not in the gateway's callers.allow list",
    )
}

/// 503 while audit records cannot be written and `audit.on_failure = "refuse"`.
pub fn audit_unavailable() -> Response<Body> {
    let mut response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::AuditUnavailable,
        "the gateway cannot write its audit trail, so it forwards nothing; retry later",
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

/// A bug: something in the gateway failed. Never expected; logged where it happens.
pub fn internal_error() -> Response<Body> {
    let mut response = error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::InternalError,
        "the gateway failed to handle this request",
    );
    response
        .extensions_mut()
        .insert(AuditFacts::outcome(Outcome::Aborted));
    response
}

/// 429 with `Retry-After` in whole seconds, rounded up, at least 1.
pub fn rate_limited(limit: Limit, wait: Duration) -> Response<Body> {
    let detail = match limit {
        Limit::Global => "the gateway's global rate limit is reached",
        Limit::Caller => "your rate limit (rate_limit.per_caller) is reached",
        Limit::DataSource => "the rate limit for this data source is reached",
        Limit::Unauthenticated => {
            "too many requests without valid credentials from this address ([rate_limit.unauthenticated]); the connection is closed"
        }
    };
    let body = serde_json::to_vec(&ErrorBody {
        detail,
        code: ErrorCode::RateLimited,
        limit: Some(limit),
    })
    .unwrap_or_default();
    let mut response = json(StatusCode::TOO_MANY_REQUESTS, body);
    let secs = retry_after_secs(wait);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs));
    let facts = AuditFacts {
        outcome: Some(Outcome::RateLimited),
        limit: Some(limit),
        ..AuditFacts::default()
    };
    response.extensions_mut().insert(facts);
    response
}

fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Why a path parameter is not an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadInteger {
    /// Not an integer at all.
    NotInteger,
    /// An integer above the largest id (`i64::MAX`).
    TooLarge,
    /// An integer below the smallest id (`i64::MIN`).
    TooSmall,
}

/// 422 in Datafold's HTTPValidationError shape for a path parameter that is not an id; an
/// integer out of range says which bound it crossed, as Datafold's validation does.
pub fn invalid_integer(param: &'static str, why: BadInteger) -> Response<Body> {
    let entry = match why {
        BadInteger::NotInteger => serde_json::json!({
            "loc": ["path", param],
            "msg": "Input should be a valid integer, unable to parse string as an integer",
            "type": "int_parsing",
        }),
        BadInteger::TooLarge => serde_json::json!({
            "loc": ["path", param],
            "msg": format!("Input should be less than or equal to {}", i64::MAX),
            "type": "less_than_equal",
            "ctx": {"le": i64::MAX},
        }),
        BadInteger::TooSmall => serde_json::json!({
            "loc": ["path", param],
            "msg": format!("Input should be greater than or equal to {}", i64::MIN),
            "type": "greater_than_equal",
            "ctx": {"ge": i64::MIN},
        }),
    };
    let body = serde_json::json!({ "detail": [entry] });
    let mut response = json(
        StatusCode::UNPROCESSABLE_ENTITY,
        serde_json::to_vec(&body).unwrap_or_default(),
    );
    response
        .extensions_mut()
        .insert(AuditFacts::outcome(Outcome::Rejected));
    response
}

/// Why an upstream exchange failed, as far as the caller and the operator need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamFailure {
    /// TCP connect refused, unreachable, or DNS failed.
    Connect,
    /// The TLS handshake failed, e.g. an untrusted certificate.
    Tls,
    /// No complete answer within `upstream.timeout`.
    Timeout,
    /// The connection broke mid-exchange.
    Reset,
    /// The answer was larger than `limits.max_response_bytes`.
    TooLarge,
    /// The answer was not one a proxy can pass on (an interim 1xx status as the final answer).
    InvalidResponse,
}

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connect => "cannot connect",
            Self::Tls => "TLS failed",
            Self::Timeout => "timed out",
            Self::Reset => "connection broke",
            Self::TooLarge => "answer larger than limits.max_response_bytes",
            Self::InvalidResponse => "an interim (1xx) status as the final answer",
        })
    }
}

/// So that the exchange can fail with a kind it found itself, classified like any other error.
impl StdError for UpstreamFailure {}

impl UpstreamFailure {
    /// The `kind` label of `datafold_gateway_upstream_errors_total`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Tls => "tls",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::TooLarge => "too_large",
            Self::InvalidResponse => "invalid_response",
        }
    }

    /// Walks the error's causes to find what went wrong. Anything that kept a connection from
    /// opening is `Connect`, a timeout included, unless TLS is what failed.
    pub fn classify(error: &(dyn StdError + 'static)) -> Self {
        let mut connect = false;
        let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
        while let Some(e) = cause {
            if let Some(found) = e.downcast_ref::<Self>() {
                return *found;
            }
            if e.is::<rustls::Error>() {
                return Self::Tls;
            }
            connect |= e.is::<crate::pool::ConnectError>();
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if io.kind() == io::ErrorKind::TimedOut && !connect {
                    return Self::Timeout;
                }
            }
            cause = next_cause(e);
        }
        if connect {
            Self::Connect
        } else {
            Self::Reset
        }
    }

    pub fn response(self, upstream: &str) -> Response<Body> {
        let (status, code, detail) = match self {
            Self::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::UpstreamTimeout,
                format!("{upstream} did not answer within upstream.timeout"),
            ),
            Self::Connect => (
                StatusCode::BAD_GATEWAY,
                ErrorCode::UpstreamUnreachable,
                format!("cannot connect to {upstream}"),
            ),
            Self::Tls => (
                StatusCode::BAD_GATEWAY,
                ErrorCode::UpstreamUnreachable,
                format!(
                    "TLS with {upstream} failed (is its certificate trusted? see upstream.ca_file)"
                ),
            ),
            Self::Reset => (
                StatusCode::BAD_GATEWAY,
                ErrorCode::UpstreamUnreachable,
                format!("the connection to {upstream} broke before a complete answer"),
            ),
            Self::TooLarge => (
                StatusCode::BAD_GATEWAY,
                ErrorCode::UpstreamResponseTooLarge,
                format!("{upstream} answered with more than limits.max_response_bytes"),
            ),
            Self::InvalidResponse => (
                StatusCode::BAD_GATEWAY,
                ErrorCode::UpstreamInvalidResponse,
                format!("{upstream} answered with an interim (1xx) status as its final answer"),
            ),
        };
        let mut response = error_response(status, code, &detail);
        response
            .extensions_mut()
            .insert(AuditFacts::outcome(Outcome::UpstreamError));
        response
    }
}

/// The next error in the chain. An `io::Error` wrapping another error reports that error's
/// source as its own, skipping the wrapped error itself (where TLS failures hide), so it is
/// unwrapped here instead.
fn next_cause<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    if let Some(inner) = error
        .downcast_ref::<io::Error>()
        .and_then(|io| io.get_ref())
    {
        return Some(inner);
    }
    error.source()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one_second() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }

    #[test]
    fn invalid_integer_matches_datafold_shape() {
        let response = invalid_integer("job_id", BadInteger::NotInteger);
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
            response.into_body(),
        ))
        .unwrap()
        .unwrap()
        .to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value["detail"][0]["loc"],
            serde_json::json!(["path", "job_id"])
        );
        assert_eq!(value["detail"][0]["type"], "int_parsing");
    }

    #[test]
    fn tls_failure_is_found_inside_nested_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let inner = io::Error::new(io::ErrorKind::InvalidData, tls);
        let outer = io::Error::other(inner);
        assert_eq!(UpstreamFailure::classify(&outer), UpstreamFailure::Tls);
    }

    #[test]
    fn timed_out_io_is_a_timeout() {
        let e = io::Error::new(io::ErrorKind::TimedOut, "slow");
        assert_eq!(UpstreamFailure::classify(&e), UpstreamFailure::Timeout);
        let e = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(UpstreamFailure::classify(&e), UpstreamFailure::Reset);
    }
}
