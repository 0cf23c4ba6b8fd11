//! The whole request path, outermost layer first. Read this file to follow a request.
//!
//! Step 0 is per connection ([`PerConnection`], at the end of this file): the connection's
//! task hands each request to its one copy of the stack, with the peer (address, client
//! certificate name) in its extensions and counted as the connection's activity (its idle
//! deadline). [`build`] is every step after that, one layer each.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
use http::{Request, Response};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::audit::sampling::RefusalSampler;
use crate::audit::AuditLog;
use crate::callers::Peer;
use crate::callers::SharedCallers;
use crate::config::Config;
use crate::jobs::JobBook;
use crate::limits::SharedLimiters;
use crate::metrics::Metrics;
use crate::middleware::api_key::InjectApiKeyLayer;
use crate::middleware::audit::AuditLayer;
use crate::middleware::audit_gate::AuditGateLayer;
use crate::middleware::caller::IdentifyCallerLayer;
use crate::middleware::jobs::JobOwnershipLayer;
use crate::middleware::overload::ShedOverloadLayer;
use crate::middleware::rate_limit::RateLimitLayer;
use crate::middleware::read_body::ReadBodyLayer;
use crate::middleware::request_id::{drop_unusable_request_id, MakeUuid, X_REQUEST_ID};
use crate::middleware::request_task::RequestTasks;
use crate::middleware::route::AllowRoutesLayer;
use crate::pool::Pool;
use crate::secret::SharedKey;
use crate::server::{Activity, InFlight};
use crate::upstream::{strip_hop_by_hop, Forward};

/// Everything the stack is built from; made once at start.
#[derive(Clone)]
pub struct StackParts {
    pub config: Arc<Config>,
    pub key: SharedKey,
    pub audit: AuditLog,
    pub tasks: RequestTasks,
    pub metrics: Metrics,
    pub limiters: SharedLimiters,
    pub callers: SharedCallers,
    pub jobs: Arc<JobBook>,
    pub pool: Pool,
    pub refusals: Arc<RefusalSampler>,
    /// Shared by every worker's stack: `limits.max_concurrent_requests` counts the gateway's
    /// requests, not one worker's.
    pub overload: ShedOverloadLayer,
}

/// Builds the service that answers every request on the main listener. Call it on the runtime
/// that serves the stack: its audit batcher's flush task is spawned there.
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
        // Connection-level headers go first: nothing a caller names in `Connection` can take
        // away the request id or the key set further in.
        .map_request(strip_hop_by_hop)
        // A caller's request id is kept only if it is safe to write into logs and the audit...
        .map_request(drop_unusable_request_id)
        // ...otherwise one is made, then sent upstream, audited, and returned to the caller.
        .layer(SetRequestIdLayer::x_request_id(MakeUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        // A span per request, inside the request id so that the span can carry it. The path
        // only: a query string could carry anything, and is not forwarded anyway.
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<B>| {
                tracing::debug_span!(
                    "request",
                    method = %request.method(),
                    path = request.uri().path(),
                    request_id = ?request.headers().get(X_REQUEST_ID),
                )
            }),
        )
        // Every answer from here inward is audited, refusals included (a stranger's only
        // sampled, see `audit/sampling.rs`); each request runs to its end even if its caller
        // hangs up.
        .layer(AuditLayer::new(
            parts.audit.batcher(),
            parts.tasks,
            parts.metrics.clone(),
            parts.refusals,
        ))
        // Who is calling; authenticated modes refuse strangers here, before anything else, and
        // limit how often one address may be refused.
        .layer(IdentifyCallerLayer::new(
            parts.callers.clone(),
            parts.limiters.clone(),
        ))
        // Nothing is forwarded that might go unaudited (`audit.on_failure = "refuse"`). After
        // the caller: strangers meet their sampled, limited refusal whatever the audit's state.
        .layer(AuditGateLayer::new(parts.audit, config.audit.on_failure))
        // The allow-list: only the two test endpoints go further. Cheap, and it tells the body
        // reader which route it reads for.
        .layer(AllowRoutesLayer)
        // The body is read in full (bounded in size and time) before anything shared is taken:
        // a slow body holds only its own connection.
        .layer(ReadBodyLayer::new(
            config.limits.max_body_bytes,
            config.limits.body_read_timeout,
        ))
        // Shedding comes before any real work is done for the request.
        .layer(parts.overload)
        // Another caller's job is refused before it costs a token; started jobs are noted on
        // the way out.
        .layer(JobOwnershipLayer::new(parts.jobs, parts.callers))
        // Limits are the last refusal: only requests that will be forwarded count.
        .layer(RateLimitLayer::new(parts.limiters))
        // The key goes on last, after the caller's credentials are stripped.
        .layer(InjectApiKeyLayer::new(parts.key))
        // Only allow-listed headers cross, either way; the answer is read within its budget.
        .service(Forward::new(parts.pool, parts.metrics, config))
}

/// The stack as one connection sees it: each request learns its peer and counts as activity.
///
/// The connection keeps one copy of the stack and calls it in place: requests on a connection
/// are dispatched one at a time from its task (HTTP/2 streams included), and every layer is
/// always ready, so cloning the whole stack per request (a reference count per layer) buys
/// nothing. Should a layer ever not be ready, the request waits on a clone of its own.
pub struct PerConnection<S> {
    stack: std::cell::RefCell<S>,
    peer: Peer,
    activity: Arc<Activity>,
}

impl<S> PerConnection<S> {
    pub(crate) fn new(stack: S, peer: Peer, activity: Arc<Activity>) -> Self {
        Self {
            stack: std::cell::RefCell::new(stack),
            peer,
            activity,
        }
    }
}

pin_project! {
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        _in_flight: InFlight,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl<S, B> hyper::service::Service<http::Request<Incoming>> for PerConnection<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible> + Clone,
{
    type Response = http::Response<B>;
    type Error = Infallible;
    type Future = Tracked<Either<S::Future, tower::util::Oneshot<S, http::Request<Incoming>>>>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.peer.clone());
        let mut stack = self.stack.borrow_mut();
        let mut ready = Context::from_waker(futures_util::task::noop_waker_ref());
        let inner = match stack.poll_ready(&mut ready) {
            Poll::Ready(Ok(())) => Either::Left(stack.call(request)),
            Poll::Pending => Either::Right(stack.clone().oneshot(request)),
        };
        Tracked {
            _in_flight: InFlight::start(&self.activity),
            inner,
        }
    }
}
