//! Rate limits: global (the account's Datafold quota), per caller, and per data source (no
//! hammering one warehouse), each a GCRA limiter from governor.
//!
//! Limits are checked in `call` and a refusal is an immediate 429; nothing waits in
//! `poll_ready`, so one throttled caller never holds up another. The most specific limit is
//! checked first, so that a caller refused by its own limit does not use up the global quota that
//! everyone shares. `Retry-After` is the time until the refusing limit would admit the request.
//!
//! Keyed limiters hold one small cell per caller or data source seen recently; a background
//! sweep ([`Limiters::sweep`]) drops the cells that have refilled, which bounds their memory by
//! the keys active within one refill period.

use std::convert::Infallible;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use http::{Request, Response};
use tower::{Layer, Service};

use super::caller::CallerId;
use super::route::Route;
use super::{refuse, Refuse};
use crate::audit::Limit;
use crate::config::{RateLimit, RateLimits};
use crate::{error, Body};

/// The configured limiters; one set shared by every connection.
pub struct Limiters {
    global: Option<DefaultDirectRateLimiter>,
    per_caller: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    per_data_source: Option<DefaultKeyedRateLimiter<i64>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiters")
            .field("global", &self.global.is_some())
            .field("per_caller", &self.per_caller.as_ref().map(|l| l.len()))
            .field(
                "per_data_source",
                &self.per_data_source.as_ref().map(|l| l.len()),
            )
            .finish()
    }
}

fn quota(limit: &RateLimit) -> Quota {
    Quota::with_period(limit.rate.replenish_interval())
        .expect("config validation keeps the interval above zero")
        .allow_burst(limit.burst)
}

impl Limiters {
    pub fn new(config: &RateLimits) -> Self {
        Self {
            global: config
                .global
                .as_ref()
                .map(|l| DefaultDirectRateLimiter::direct(quota(l))),
            per_caller: config
                .per_caller
                .as_ref()
                .map(|l| DefaultKeyedRateLimiter::keyed(quota(l))),
            per_data_source: config
                .per_data_source
                .as_ref()
                .map(|l| DefaultKeyedRateLimiter::keyed(quota(l))),
            clock: DefaultClock::default(),
        }
    }

    /// Admits a request or says which limit refused it and how long until it would admit it.
    /// Both routes count against the global and per-caller limits; only starting a test counts
    /// against its data source.
    pub fn check(
        &self,
        caller: Option<&CallerId>,
        route: Option<&Route>,
    ) -> Result<(), (Limit, Duration)> {
        if let (Some(limiter), Some(caller)) = (&self.per_caller, caller) {
            limiter
                .check_key(&caller.0)
                .map_err(|until| (Limit::Caller, until.wait_time_from(self.clock.now())))?;
        }
        if let (Some(limiter), Some(Route::TestConnection { data_source_id })) =
            (&self.per_data_source, route)
        {
            limiter
                .check_key(data_source_id)
                .map_err(|until| (Limit::DataSource, until.wait_time_from(self.clock.now())))?;
        }
        if let Some(limiter) = &self.global {
            limiter
                .check()
                .map_err(|until| (Limit::Global, until.wait_time_from(self.clock.now())))?;
        }
        Ok(())
    }

    /// Forgets keys whose limiter has refilled: they behave exactly like a key never seen.
    pub fn sweep(&self) {
        if let Some(limiter) = &self.per_caller {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.per_data_source {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys currently tracked by the per-caller and per-data-source limiters.
    pub fn tracked_keys(&self) -> (usize, usize) {
        (
            self.per_caller.as_ref().map_or(0, |l| l.len()),
            self.per_data_source.as_ref().map_or(0, |l| l.len()),
        )
    }

    /// Sweeps every `period` for as long as the limiters are in use.
    pub async fn sweep_every(limiters: Weak<Self>, period: Duration) {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            match limiters.upgrade() {
                Some(limiters) => limiters.sweep(),
                None => return,
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiters: Arc<Limiters>,
}

impl RateLimitLayer {
    pub fn new(limiters: Arc<Limiters>) -> Self {
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
    limiters: Arc<Limiters>,
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
        match self.limiters.check(caller, route) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err((limit, wait)) => refuse(error::rate_limited(limit, wait)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditFacts, Outcome};
    use crate::config::Rate;
    use crate::test_support::Recorder;
    use http::Method;
    use http_body_util::BodyExt;
    use std::num::NonZeroU32;
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
        RateLimitLayer::new(Arc::new(Limiters::new(&config))).layer(recorder.service())
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

    #[test]
    fn sweep_forgets_refilled_keys() {
        let limiters = Limiters::new(&RateLimits {
            per_data_source: limit("1000/s", 1),
            ..Default::default()
        });
        for id in 0..10_000 {
            limiters
                .check(None, Some(&Route::TestConnection { data_source_id: id }))
                .unwrap();
        }
        assert_eq!(limiters.tracked_keys().1, 10_000);
        std::thread::sleep(Duration::from_millis(5));
        limiters.sweep();
        assert_eq!(limiters.tracked_keys().1, 0);
    }
}
