//! Rate limits: global (the account's Datafold quota), per caller, and per data source (no
//! hammering one warehouse), each a GCRA limiter from governor.
//!
//! Limits are checked in `call` and a refusal is an immediate 429; nothing waits in
//! `poll_ready`, so one throttled caller never holds up another. The most specific limit is
//! checked first, so that a caller refused by its own limit does not use up the global quota that
//! everyone shares. The other way round, a request refused by a later limit has used a token of
//! the earlier ones: governor cannot look without taking, and an attempt is an attempt.
//! `Retry-After` is the time until the refusing limit would admit the request.
//!
//! Keyed limiters hold one small cell per caller or data source seen recently. A background
//! sweep ([`Limiters::sweep`]) drops the cells that have refilled, and `rate_limit.max_tracked_keys`
//! caps them outright: a caller spraying distinct data source ids cannot grow memory past it. At
//! the cap, requests needing a new cell are refused (fail closed) until a sweep frees room.

use std::convert::Infallible;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use governor::clock::Clock;
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
    per_caller: Option<Bounded<Arc<str>>>,
    per_data_source: Option<Bounded<i64>>,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (callers, data_sources) = self.tracked_keys();
        f.debug_struct("Limiters")
            .field("global", &self.global.is_some())
            .field("per_caller_keys", &callers)
            .field("per_data_source_keys", &data_sources)
            .finish()
    }
}

fn quota(limit: &RateLimit) -> Quota {
    Quota::with_period(limit.rate.replenish_interval())
        .expect("config validation keeps the interval above zero")
        .allow_burst(limit.burst)
}

/// How long a refused check waits before it would pass.
fn wait<P: governor::clock::Reference>(
    until: governor::NotUntil<P>,
    clock: &impl Clock<Instant = P>,
) -> Duration {
    until.wait_time_from(clock.now())
}

impl Limiters {
    pub fn new(config: &RateLimits) -> Self {
        let max_keys = config.max_tracked_keys;
        Self {
            global: config
                .global
                .as_ref()
                .map(|l| DefaultDirectRateLimiter::direct(quota(l))),
            per_caller: config
                .per_caller
                .as_ref()
                .map(|l| Bounded::new(quota(l), max_keys)),
            per_data_source: config
                .per_data_source
                .as_ref()
                .map(|l| Bounded::new(quota(l), max_keys)),
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
                .check(&caller.0)
                .map_err(|wait| (Limit::Caller, wait))?;
        }
        if let (Some(limiter), Some(Route::TestConnection { data_source_id })) =
            (&self.per_data_source, route)
        {
            limiter
                .check(data_source_id)
                .map_err(|wait| (Limit::DataSource, wait))?;
        }
        if let Some(limiter) = &self.global {
            limiter
                .check()
                .map_err(|until| (Limit::Global, wait(until, limiter.clock())))?;
        }
        Ok(())
    }

    /// Forgets keys whose limiter has refilled: they behave exactly like a key never seen.
    pub fn sweep(&self) {
        if let Some(limiter) = &self.per_caller {
            limiter.sweep();
        }
        if let Some(limiter) = &self.per_data_source {
            limiter.sweep();
        }
    }

    /// Keys currently tracked by the per-caller and per-data-source limiters.
    pub fn tracked_keys(&self) -> (usize, usize) {
        (
            self.per_caller.as_ref().map_or(0, |l| l.limiter.len()),
            self.per_data_source.as_ref().map_or(0, |l| l.limiter.len()),
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

/// How many checks may pass between two looks at a keyed limiter's size: counting its keys
/// takes every shard's lock, too dear for every request. The cap may be overshot by this many.
const SIZE_CHECK_EVERY: u64 = 256;
/// While at the cap, a sweep to make room runs at most this often: it walks every key.
const FORCED_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A keyed limiter whose number of keys is capped.
struct Bounded<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    max_keys: usize,
    checks: AtomicU64,
    full: AtomicBool,
    created: Instant,
    /// Milliseconds from `created` to the last sweep forced by the cap.
    last_forced_sweep_ms: AtomicU64,
}

impl<K: Hash + Eq + Clone> Bounded<K> {
    fn new(quota: Quota, max_keys: usize) -> Self {
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            max_keys,
            checks: AtomicU64::new(0),
            full: AtomicBool::new(false),
            created: Instant::now(),
            last_forced_sweep_ms: AtomicU64::new(0),
        }
    }

    fn check(&self, key: &K) -> Result<(), Duration> {
        let nth = self.checks.fetch_add(1, Ordering::Relaxed);
        if nth % SIZE_CHECK_EVERY == 0 || self.full.load(Ordering::Relaxed) {
            self.make_room();
        }
        if self.full.load(Ordering::Relaxed) {
            return Err(FORCED_SWEEP_EVERY);
        }
        self.limiter
            .check_key(key)
            .map_err(|until| wait(until, self.limiter.clock()))
    }

    /// At the cap, sweeps (at most once per [`FORCED_SWEEP_EVERY`]) and notes whether there is
    /// room again.
    fn make_room(&self) {
        if self.limiter.len() < self.max_keys {
            self.full.store(false, Ordering::Relaxed);
            return;
        }
        let now_ms = self.created.elapsed().as_millis() as u64;
        let last = self.last_forced_sweep_ms.load(Ordering::Relaxed);
        let due = now_ms.saturating_sub(last) >= FORCED_SWEEP_EVERY.as_millis() as u64 || last == 0;
        if due
            && self
                .last_forced_sweep_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.limiter.retain_recent();
        }
        let full = self.limiter.len() >= self.max_keys;
        if full && !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max_tracked_keys = self.max_keys,
                "a keyed rate limiter is full; refusing new keys until some refill"
            );
        }
        self.full.store(full, Ordering::Relaxed);
    }

    fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.make_room();
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
    fn distinct_keys_past_the_cap_are_refused_not_stored() {
        let limiters = Limiters::new(&RateLimits {
            per_data_source: limit("1/h", 1),
            max_tracked_keys: 1000,
            ..Default::default()
        });
        let mut refused = 0;
        for id in 0..20_000 {
            match limiters.check(None, Some(&Route::TestConnection { data_source_id: id })) {
                Ok(()) => {}
                Err((limit, wait)) => {
                    assert_eq!(limit, Limit::DataSource);
                    assert!(wait >= Duration::from_secs(1));
                    refused += 1;
                }
            }
        }
        let tracked = limiters.tracked_keys().1;
        assert!(
            tracked <= 1000 + SIZE_CHECK_EVERY as usize,
            "{tracked} keys"
        );
        assert!(refused >= 20_000 - tracked, "{refused} refused");
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
