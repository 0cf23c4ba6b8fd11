//! Who is calling: attaches a [`CallerId`] to each request, or refuses a stranger. Who counts as
//! a caller, in each of the three modes, is `callers.rs`.
//!
//! The caller's own `Authorization` header never goes further than this layer: the key layer
//! sets the Datafold key in its place.
//!
//! Strangers cost the callers nothing: their refusals are logged at debug only, sampled in the
//! audit (see `audit/sampling.rs`), and limited per peer address by
//! `[rate_limit.unauthenticated]`. Past that limit the answer is 429 and the connection is closed,
//! so a flood pays a new handshake per few requests. A request with valid credentials is never
//! counted against that limit, even from an address strangers also use (a NAT, an ingress).

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::{AUTHORIZATION, CONNECTION};
use http::{HeaderValue, Request, Response, Version};
use tower::{Layer, Service};

use super::{record_fact, refuse, Fact, Refuse, Stamped};
use crate::audit::{AuditFacts, Limit};
use crate::callers::{CallerId, Peer, Refusal, SharedCallers};
use crate::limits::SharedLimiters;
use crate::{error, Body};

impl Fact for CallerId {
    fn record(self, facts: &mut AuditFacts) {
        facts.caller = Some(self.0);
    }
}

/// A caller as the audit learns it: its name, and whether the config lists it.
pub struct Identified {
    id: CallerId,
    listed: bool,
}

/// A request refused for want of credentials.
struct Stranger(Option<CallerId>);

impl Fact for Stranger {
    fn record(self, facts: &mut AuditFacts) {
        facts.stranger = true;
        if let Some(caller) = self.0 {
            caller.record(facts);
        }
    }
}

impl Fact for Identified {
    fn record(self, facts: &mut AuditFacts) {
        facts.caller_listed = self.listed;
        self.id.record(facts);
    }
}

#[derive(Debug, Clone)]
pub struct IdentifyCallerLayer {
    book: SharedCallers,
    limiters: SharedLimiters,
}

impl IdentifyCallerLayer {
    pub fn new(book: SharedCallers, limiters: SharedLimiters) -> Self {
        Self { book, limiters }
    }
}

impl<S> Layer<S> for IdentifyCallerLayer {
    type Service = IdentifyCaller<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdentifyCaller {
            inner,
            book: self.book.clone(),
            limiters: self.limiters.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct IdentifyCaller<S> {
    inner: S,
    book: SharedCallers,
    limiters: SharedLimiters,
}

impl<S, B> Service<Request<B>> for IdentifyCaller<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Refuse<Stamped<S::Future, Identified>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let peer = request.extensions().get::<Peer>();
        let book = self.book.load();
        match book.identify(request.headers(), peer) {
            Ok(caller) => {
                request.headers_mut().remove(AUTHORIZATION);
                request.extensions_mut().insert(caller.clone());
                let identified = Identified {
                    id: caller,
                    listed: book.lists_callers(),
                };
                Either::Right(Stamped::new(self.inner.call(request), identified))
            }
            Err(refusal) => {
                let limited =
                    peer.and_then(|p| self.limiters.load().check_stranger(p.block()).err());
                let (mut response, caller) = match (limited, refusal) {
                    (Some(wait), refusal) => {
                        tracing::debug!("caller refused: too many requests without valid credentials; closing the connection");
                        if let Some(peer) = peer {
                            peer.close_connection();
                        }
                        let mut response = error::rate_limited(Limit::Unauthenticated, wait);
                        if request.version() < Version::HTTP_2 {
                            response
                                .headers_mut()
                                .insert(CONNECTION, HeaderValue::from_static("close"));
                        }
                        let caller = match refusal {
                            Refusal::Forbidden(caller) => Some(caller),
                            Refusal::Unauthorized(_) => None,
                        };
                        (response, caller)
                    }
                    (None, Refusal::Unauthorized(why)) => {
                        tracing::debug!(reason = why, "caller refused: not authenticated");
                        (error::unauthorized(why), None)
                    }
                    (None, Refusal::Forbidden(caller)) => {
                        tracing::debug!(
                            caller = &*caller.0,
                            "caller refused: not in callers.allow"
                        );
                        (error::forbidden(), Some(caller))
                    }
                };
                record_fact(&mut response, Stranger(caller));
                refuse(response)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callers::CallerBook;
    use crate::config::Callers;
    use crate::test_support::Recorder;
    use arc_swap::ArcSwap;
    use std::sync::Arc;
    use tower::ServiceExt;

    #[tokio::test]
    async fn open_mode_caller_is_the_peer_ip() {
        let recorder = Recorder::default();
        let book = Arc::new(ArcSwap::from_pointee(CallerBook::new(&Callers::default())));
        let limiters = Arc::new(ArcSwap::from_pointee(crate::limits::Limiters::new(
            &Default::default(),
            [],
        )));
        let service = IdentifyCallerLayer::new(book, limiters).layer(recorder.service());
        let mut request = Request::new(Body::default());
        request
            .extensions_mut()
            .insert(Peer::new("10.1.2.3:55000".parse().unwrap()));
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(
            recorder.last_extension::<CallerId>(),
            Some(CallerId("10.1.2.3".into()))
        );
        let facts = response.extensions().get::<AuditFacts>().unwrap();
        assert_eq!(facts.caller.as_deref(), Some("10.1.2.3"));
    }
}
