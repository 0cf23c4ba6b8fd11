//! Asks the rate limits (see `limits.rs`) about every request that would be forwarded.
//!
//! Limits are checked in `call` and a refusal is an immediate 429; nothing waits in
//! `poll_ready`, so one throttled caller never holds up another. `Retry-After` is the time until
//! the refusing limit would admit the request.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};

use super::route::Route;
use super::{refuse, Refuse};
use crate::callers::CallerId;
use crate::limits::SharedLimiters;
use crate::{error, Body};

#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiters: SharedLimiters,
}

impl RateLimitLayer {
    pub fn new(limiters: SharedLimiters) -> Self {
        Self { limiters }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiters: self.limiters.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RateLimitService<S> {
    inner: S,
    limiters: SharedLimiters,
}

impl<S, B> Service<Request<B>> for RateLimitService<S>
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
        let caller = request.extensions().get::<CallerId>();
        let route = request.extensions().get::<Route>();
        let started = match route {
            Some(Route::TestConnection { data_source_id }) => Some(*data_source_id),
            _ => None,
        };
        match self.limiters.load().check(caller.map(|c| &c.0), started) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err((limit, wait)) => refuse(error::rate_limited(limit, wait)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditFacts, Limit, Outcome};
    use crate::config::Rate;
    use crate::config::{RateLimit, RateLimits};
    use crate::limits::Limiters;
    use crate::test_support::Recorder;
    use arc_swap::ArcSwap;
    use http::Method;
    use http_body_util::BodyExt;
    use std::num::NonZeroU32;
    use std::sync::Arc;
    use tower::ServiceExt;

    fn method_of(route: &Route) -> Method {
        match route {
            Route::TestConnection { .. } => Method::POST,
            Route::TestResult { .. } => Method::GET,
        }
    }

    fn limit(rate: &str, burst: u32) -> Option<RateLimit> {
        Some(RateLimit {
            rate: rate.parse::<Rate>().unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        })
    }

    fn request(caller: &str, route: Route) -> Request<Body> {
        let mut request = Request::builder()
            .method(method_of(&route))
            .body(Body::default())
            .unwrap();
        request.extensions_mut().insert(CallerId(caller.into()));
        request.extensions_mut().insert(route);
        request
    }

    const START_1: Route = Route::TestConnection { data_source_id: 1 };
    const START_2: Route = Route::TestConnection { data_source_id: 2 };
    const POLL: Route = Route::TestResult { job_id: 9 };

    async fn send(
        service: &RateLimitService<
            impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
        >,
        caller: &str,
        route: Route,
    ) -> Response<Body> {
        service
            .clone()
            .oneshot(request(caller, route))
            .await
            .unwrap()
    }

    fn service(
        config: RateLimits,
        recorder: &Recorder,
    ) -> RateLimitService<
        impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
    > {
        RateLimitLayer::new(Arc::new(ArcSwap::from_pointee(Limiters::new(&config, []))))
            .layer(recorder.service())
    }

    #[tokio::test]
    async fn global_limit_refuses_with_429_naming_it() {
        let recorder = Recorder::default();
        let service = service(
            RateLimits {
                global: limit("1/h", 2),
                ..Default::default()
            },
            &recorder,
        );
        assert_eq!(send(&service, "a", START_1).await.status(), 200);
        assert_eq!(send(&service, "b", POLL).await.status(), 200);
        let refused = send(&service, "c", START_2).await;
        assert_eq!(refused.status(), 429);
        let facts = refused.extensions().get::<AuditFacts>().unwrap().clone();
        assert_eq!(facts.outcome, Some(Outcome::RateLimited));
        assert_eq!(facts.limit, Some(Limit::Global));
        let body: serde_json::Value =
            serde_json::from_slice(&refused.into_body().collect().await.unwrap().to_bytes())
                .unwrap();
        assert_eq!(body["code"], "rate_limited");
        assert_eq!(body["limit"], "global");
        assert_eq!(recorder.calls(), 2);
    }

    #[tokio::test]
    async fn per_caller_limit_counts_each_caller_apart() {
        let recorder = Recorder::default();
        let service = service(
            RateLimits {
                per_caller: limit("1/h", 1),
                ..Default::default()
            },
            &recorder,
        );
        assert_eq!(send(&service, "a", START_1).await.status(), 200);
        assert_eq!(send(&service, "b", START_1).await.status(), 200);
        let refused = send(&service, "a", POLL).await;
        assert_eq!(refused.status(), 429);
        assert_eq!(
            refused.extensions().get::<AuditFacts>().unwrap().limit,
            Some(Limit::Caller)
        );
    }

    #[tokio::test]
    async fn per_data_source_limit_counts_only_test_starts() {
        let recorder = Recorder::default();
        let service = service(
            RateLimits {
                per_data_source: limit("1/h", 1),
                ..Default::default()
            },
            &recorder,
        );
        assert_eq!(send(&service, "a", START_1).await.status(), 200);
        assert_eq!(send(&service, "a", POLL).await.status(), 200);
        assert_eq!(send(&service, "a", POLL).await.status(), 200);
        assert_eq!(send(&service, "b", START_2).await.status(), 200);
        let refused = send(&service, "b", START_1).await;
        assert_eq!(refused.status(), 429);
        assert_eq!(
            refused.extensions().get::<AuditFacts>().unwrap().limit,
            Some(Limit::DataSource)
        );
    }

    #[tokio::test]
    async fn retry_after_is_time_until_next_token_not_the_window() {
        let recorder = Recorder::default();
        // 60 per hour: one request earns back every 60 s, though the window is an hour.
        let service = service(
            RateLimits {
                global: limit("60/h", 1),
                ..Default::default()
            },
            &recorder,
        );
        assert_eq!(send(&service, "a", START_1).await.status(), 200);
        let refused = send(&service, "a", START_1).await;
        let retry_after: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (59..=60).contains(&retry_after),
            "Retry-After {retry_after}"
        );
    }

    #[tokio::test]
    async fn caller_refused_by_its_own_limit_leaves_the_global_quota() {
        let recorder = Recorder::default();
        let config = RateLimits {
            global: limit("1/h", 2),
            per_caller: limit("1/h", 1),
            ..Default::default()
        };
        let service = service(config, &recorder);
        assert_eq!(send(&service, "noisy", START_1).await.status(), 200);
        for _ in 0..5 {
            assert_eq!(send(&service, "noisy", START_1).await.status(), 429);
        }
        assert_eq!(send(&service, "quiet", START_1).await.status(), 200);
    }
}
