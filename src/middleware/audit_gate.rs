//! Forwards nothing that might go unaudited: while audit records cannot be written and
//! `audit.on_failure = "refuse"`, requests are answered 503 `audit_unavailable` here.
//!
//! It sits after the caller is identified, so that a stranger meets the same refusal (a sampled
//! 401, its per-address limit) whatever the state of the audit file, and a flood of strangers
//! cannot turn an audit outage into a record attempt per request. Each refusal made here is
//! itself a write attempt: once one succeeds, requests flow again.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};

use super::{refuse, Refuse};
use crate::audit::AuditLog;
use crate::config::OnAuditFailure;
use crate::{error, Body};

#[derive(Debug, Clone)]
pub struct AuditGateLayer {
    log: Option<AuditLog>,
}

impl AuditGateLayer {
    pub fn new(log: AuditLog, on_failure: OnAuditFailure) -> Self {
        Self {
            log: (on_failure == OnAuditFailure::Refuse).then_some(log),
        }
    }
}

impl<S> Layer<S> for AuditGateLayer {
    type Service = AuditGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuditGate {
            inner,
            log: self.log.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditGate<S> {
    inner: S,
    /// The log to watch; `None` with `on_failure = "continue"`.
    log: Option<AuditLog>,
}

impl<S, B> Service<Request<B>> for AuditGate<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Refuse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if self.log.as_ref().is_some_and(|log| !log.is_healthy()) {
            return refuse(error::audit_unavailable());
        }
        Either::Right(self.inner.call(request))
    }
}
