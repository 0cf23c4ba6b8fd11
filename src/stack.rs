//! The whole request path, outermost layer first. Read this file to follow a request.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
use http::{Request, Response};
use tower::{Service, ServiceBuilder};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::middleware::api_key::InjectApiKeyLayer;
use crate::middleware::audit::AuditLayer;
use crate::middleware::body_limit::BodyLimitLayer;
use crate::middleware::caller::IdentifyCallerLayer;
use crate::middleware::overload::ShedOverloadLayer;
use crate::middleware::rate_limit::{Limiters, RateLimitLayer};
use crate::middleware::request_id::drop_unusable_request_id;
use crate::middleware::route::AllowRoutesLayer;
use crate::secret::ApiKey;
use crate::upstream::{Forward, HttpsClient};

/// Everything the stack is built from; made once at start.
pub struct StackParts {
    pub config: Arc<Config>,
    pub key: ApiKey,
    pub audit: AuditLog,
    pub limiters: Arc<Limiters>,
    pub client: HttpsClient,
}

/// Builds the service that answers every request on the main listener.
pub fn build<B>(
    parts: StackParts,
) -> impl Service<
    Request<B>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Send + 'static>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let config = &parts.config;
    ServiceBuilder::new()
        // Credentials are marked sensitive before anything can log the request.
        .layer(SetSensitiveRequestHeadersLayer::new([
            AUTHORIZATION,
            COOKIE,
            PROXY_AUTHORIZATION,
        ]))
        // A caller's request id is kept only if it is safe to write into logs and the audit...
        .map_request(drop_unusable_request_id)
        // ...otherwise one is made, then sent upstream, audited, and returned to the caller.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        // A span per request, inside the request id so that the span can carry it.
        .layer(TraceLayer::new_for_http())
        // Every answer from here inward is audited, refusals included.
        .layer(AuditLayer::new(parts.audit))
        // Shedding comes before any work is done for the request.
        .layer(ShedOverloadLayer::new(
            config.limits.max_concurrent_requests,
        ))
        // Who is calling; authenticated modes refuse strangers here, before anything else.
        .layer(IdentifyCallerLayer::new(config.callers.mode))
        // The allow-list: only the two test endpoints go further.
        .layer(AllowRoutesLayer)
        // An oversized body is refused before it costs a rate-limit token.
        .layer(BodyLimitLayer::new(config.limits.max_body_bytes))
        // Limits are the last refusal: only requests that will be forwarded count.
        .layer(RateLimitLayer::new(parts.limiters))
        // The key goes on last, after the caller's credentials are stripped.
        .layer(InjectApiKeyLayer::new(parts.key))
        .service(Forward::new(
            parts.client,
            config.upstream.url.clone(),
            config.upstream.timeout,
            config.limits.max_body_bytes,
            config.limits.header_read_timeout,
        ))
}
