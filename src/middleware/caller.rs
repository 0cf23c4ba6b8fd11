//! Who is calling: attaches a [`CallerId`] to each request, or refuses a stranger.
//!
//! In `open` mode (the sidecar case: only the app next to the gateway can reach its loopback
//! listener) the caller is its peer IP address. Authenticated modes slot in as further
//! [`CallerMode`] arms: they get the request's headers and connection to decide.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};

use super::{Fact, Refuse, Stamped};
use crate::audit::AuditFacts;
use crate::config::CallerMode;
use crate::Body;

/// The connection a request came in on; inserted by the server into every request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The address and port as text, made once per connection for the audit records.
    pub addr_text: Arc<str>,
    /// The IP address as text, made once per connection.
    pub ip: Arc<str>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            addr_text: addr.to_string().into(),
            ip: addr.ip().to_string().into(),
        }
    }
}

/// The caller's identity: the name rate limits and the audit trail know it by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerId(pub Arc<str>);

impl Fact for CallerId {
    fn record(self, facts: &mut AuditFacts) {
        facts.caller = Some(self.0);
    }
}

#[derive(Debug, Clone)]
pub struct IdentifyCallerLayer {
    mode: CallerMode,
}

impl IdentifyCallerLayer {
    pub fn new(mode: CallerMode) -> Self {
        Self { mode }
    }
}

impl<S> Layer<S> for IdentifyCallerLayer {
    type Service = IdentifyCaller<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdentifyCaller {
            inner,
            mode: self.mode,
        }
    }
}

#[derive(Debug, Clone)]
pub struct IdentifyCaller<S> {
    inner: S,
    mode: CallerMode,
}

impl<S, B> Service<Request<B>> for IdentifyCaller<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Refuse<Stamped<S::Future, CallerId>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let caller = match self.mode {
            CallerMode::Open => {
                let ip = request
                    .extensions()
                    .get::<Peer>()
                    .map(|peer| peer.ip.clone());
                CallerId(ip.unwrap_or_else(|| Arc::from("unknown")))
            }
        };
        request.extensions_mut().insert(caller.clone());
        Either::Right(Stamped::new(self.inner.call(request), caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Recorder;
    use tower::ServiceExt;

    #[tokio::test]
    async fn open_mode_caller_is_the_peer_ip() {
        let recorder = Recorder::default();
        let service = IdentifyCallerLayer::new(CallerMode::Open).layer(recorder.service());
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
