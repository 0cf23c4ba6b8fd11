//! Rate limits: global (the account's Datafold quota), per caller, and per data source (no
//! hammering one warehouse), each a GCRA limiter from governor.
//!
//! Limits are checked in `call` and a refusal is an immediate 429; nothing waits in
//! `poll_ready`, so one throttled caller never holds up another. The caller's own limit comes
//! first, so that a caller refused by it does not use up the global quota everyone shares; the
//! data source's comes last, so that ids sprayed past the other limits never get a cell. A
//! request refused by a later limit has used a token of the earlier ones: governor cannot look
//! without taking, and an attempt is an attempt. `Retry-After` is the time until the refusing
//! limit would admit the request.
//!
//! Keyed limiters hold one small cell per caller or data source seen recently. A background
//! sweep every [`SWEEP_EVERY`] drops the cells that have refilled, and
//! `rate_limit.max_tracked_keys` caps them (give or take [`SIZE_CHECK_EVERY`]): at the cap, keys
//! already tracked are limited as usual and new ones are refused (fail closed) until a sweep
//! makes room.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use futures_util::future::Either;
use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, StateStore};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{Request, Response};
use tower::{Layer, Service};

use super::caller::CallerId;
use super::route::Route;
use super::{refuse, Refuse};
use crate::audit::Limit;
use crate::config::{Per, RateLimit, RateLimits};
use crate::{error, Body};

/// How often keyed limiters forget the keys that have refilled.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The configured limiters; one set shared by every connection, swapped whole on reload.
pub struct Limiters {
    global: Option<Kept<DefaultDirectRateLimiter>>,
    per_caller: Option<Kept<Bounded<Arc<str>>>>,
    per_data_source: Option<Kept<Bounded<i64>>>,
    /// Refusals for want of credentials, per peer address (only asked in authenticated modes).
    unauthenticated: Kept<Bounded<IpAddr>>,
    /// Callers with a limit of their own (a token entry's `rate`/`burst`), instead of
    /// `per_caller`.
    own_limits: HashMap<Arc<str>, Kept<DefaultDirectRateLimiter>>,
}

/// The limiters in effect; SIGHUP swaps in new ones, requests in flight keep theirs.
pub type SharedLimiters = Arc<ArcSwap<Limiters>>;

/// A limiter with the settings it was made from, so that a reload with the same settings keeps
/// it, state and all.
struct Kept<L> {
    limit: RateLimit,
    max_keys: usize,
    limiter: Arc<L>,
}

impl<L> Kept<L> {
    /// `previous` if it was made from the same settings, else a new limiter from `make`.
    fn reuse_or(
        previous: Option<&Kept<L>>,
        limit: RateLimit,
        max_keys: usize,
        make: impl FnOnce(Quota, usize) -> L,
    ) -> Self {
        let limiter = match previous {
            Some(kept) if kept.limit == limit && kept.max_keys == max_keys => kept.limiter.clone(),
            _ => Arc::new(make(quota(&limit), max_keys)),
        };
        Self {
            limit,
            max_keys,
            limiter,
        }
    }
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (callers, data_sources) = self.tracked_keys();
        f.debug_struct("Limiters")
            .field("global", &self.global.is_some())
            .field("own_limits", &self.own_limits.len())
            .field("per_caller_keys", &callers)
            .field("per_data_source_keys", &data_sources)
            .finish()
    }
}

fn quota(limit: &RateLimit) -> Quota {
    let count = limit.rate.count();
    let quota = match limit.rate.per() {
        Per::Second => Quota::per_second(count),
        Per::Minute => Quota::per_minute(count),
        Per::Hour => Quota::per_hour(count),
    };
    quota.allow_burst(limit.burst)
}

/// How long a refused check waits before it would pass.
fn wait<P: governor::clock::Reference>(
    until: governor::NotUntil<P>,
    clock: &impl Clock<Instant = P>,
) -> Duration {
    until.wait_time_from(clock.now())
}

fn direct(quota: Quota, _: usize) -> DefaultDirectRateLimiter {
    DefaultDirectRateLimiter::direct(quota)
}

impl Limiters {
    /// The limiters of `[rate_limit]`, with `own_limits` (caller name and limit) replacing
    /// `per_caller` for those callers.
    pub fn new<'a>(
        config: &RateLimits,
        own_limits: impl IntoIterator<Item = (&'a str, RateLimit)>,
    ) -> Self {
        Self::reconfigure(None, config, own_limits)
    }

    /// New limiters for a reloaded config. Each limiter whose settings did not change is the
    /// same limiter, with the tokens its callers have already used.
    pub fn reconfigured<'a>(
        &self,
        config: &RateLimits,
        own_limits: impl IntoIterator<Item = (&'a str, RateLimit)>,
    ) -> Self {
        Self::reconfigure(Some(self), config, own_limits)
    }

    fn reconfigure<'a>(
        previous: Option<&Self>,
        config: &RateLimits,
        own_limits: impl IntoIterator<Item = (&'a str, RateLimit)>,
    ) -> Self {
        let max_keys = config.max_tracked_keys;
        Self {
            global: config
                .global
                .map(|l| Kept::reuse_or(previous.and_then(|p| p.global.as_ref()), l, 0, direct)),
            per_caller: config.per_caller.map(|l| {
                let kept = previous.and_then(|p| p.per_caller.as_ref());
                Kept::reuse_or(kept, l, max_keys, Bounded::new)
            }),
            per_data_source: config.per_data_source.map(|l| {
                let kept = previous.and_then(|p| p.per_data_source.as_ref());
                Kept::reuse_or(kept, l, max_keys, Bounded::new)
            }),
            unauthenticated: Kept::reuse_or(
                previous.map(|p| &p.unauthenticated),
                config.unauthenticated,
                max_keys,
                Bounded::new,
            ),
            own_limits: own_limits
                .into_iter()
                .map(|(name, limit)| {
                    let kept = previous.and_then(|p| p.own_limits.get(name));
                    (Arc::from(name), Kept::reuse_or(kept, limit, 0, direct))
                })
                .collect(),
        }
    }

    /// Counts a refusal of a request without valid credentials from `peer`; `Err` (with the
    /// time until it would pass) once that address has been refused too often.
    pub fn check_stranger(&self, peer: IpAddr) -> Result<(), Duration> {
        self.unauthenticated.limiter.check(&peer)
    }

    /// Admits a request or says which limit refused it and how long until it would admit it.
    /// Both routes count against the global and per-caller limits; only starting a test counts
    /// against its data source.
    pub fn check(
        &self,
        caller: Option<&CallerId>,
        route: Option<&Route>,
    ) -> Result<(), (Limit, Duration)> {
        if let Some(caller) = caller {
            if let Some(own) = self.own_limits.get(&caller.0) {
                let limiter = &own.limiter;
                limiter
                    .check()
                    .map_err(|until| (Limit::Caller, wait(until, limiter.clock())))?;
            } else if let Some(kept) = &self.per_caller {
                kept.limiter
                    .check(&caller.0)
                    .map_err(|wait| (Limit::Caller, wait))?;
            }
        }
        if let Some(kept) = &self.global {
            let limiter = &kept.limiter;
            limiter
                .check()
                .map_err(|until| (Limit::Global, wait(until, limiter.clock())))?;
        }
        // Last, so that ids sprayed past the other limits never get a cell.
        if let (Some(kept), Some(Route::TestConnection { data_source_id })) =
            (&self.per_data_source, route)
        {
            kept.limiter
                .check(data_source_id)
                .map_err(|wait| (Limit::DataSource, wait))?;
        }
        Ok(())
    }

    /// Forgets keys whose limiter has refilled: they behave exactly like a key never seen.
    pub fn sweep(&self) {
        self.unauthenticated.limiter.sweep();
        if let Some(kept) = &self.per_caller {
            kept.limiter.sweep();
        }
        if let Some(kept) = &self.per_data_source {
            kept.limiter.sweep();
        }
    }

    /// Keys currently tracked by the per-caller and per-data-source limiters.
    pub fn tracked_keys(&self) -> (usize, usize) {
        (
            self.per_caller
                .as_ref()
                .map_or(0, |k| k.limiter.cells.len()),
            self.per_data_source
                .as_ref()
                .map_or(0, |k| k.limiter.cells.len()),
        )
    }

    /// Sweeps every [`SWEEP_EVERY`] for as long as the limiters are in use, on a blocking
    /// thread: a sweep walks every key.
    pub async fn sweep_every(limiters: Weak<ArcSwap<Self>>) {
        let mut ticks = tokio::time::interval(SWEEP_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(limiters) = limiters.upgrade() else {
                return;
            };
            let current = limiters.load_full();
            let _ = tokio::task::spawn_blocking(move || current.sweep()).await;
        }
    }
}

/// How many checks may pass between two looks at a keyed limiter's size: counting its keys
/// takes every shard's lock, too dear for every request. The cap may be overshot by this many.
const SIZE_CHECK_EVERY: u64 = 256;

/// The cells of a keyed limiter, shared with [`Bounded`] so that it can ask whether a key is
/// tracked without touching its limit.
struct SharedCells<K: Hash + Eq>(Arc<DashMap<K, InMemoryState>>);

impl<K: Hash + Eq + Clone> StateStore for SharedCells<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        StateStore::measure_and_replace(&*self.0, key, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for SharedCells<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below);
    }

    fn shrink_to_fit(&self) {
        self.0.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A keyed limiter whose number of keys is capped. Keys it already tracks are always checked
/// as usual; at the cap, a key it does not track is refused until a sweep makes room.
struct Bounded<K: Hash + Eq + Clone> {
    limiter: RateLimiter<K, SharedCells<K>, DefaultClock>,
    cells: Arc<DashMap<K, InMemoryState>>,
    max_keys: usize,
    checks: AtomicU64,
    full: AtomicBool,
}

impl<K: Hash + Eq + Clone> Bounded<K> {
    fn new(quota: Quota, max_keys: usize) -> Self {
        let cells = Arc::new(DashMap::new());
        Self {
            limiter: RateLimiter::new(quota, SharedCells(cells.clone()), DefaultClock::default()),
            cells,
            max_keys,
            checks: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    fn check(&self, key: &K) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SIZE_CHECK_EVERY == 0 {
            self.note_size();
        }
        if self.full.load(Ordering::Relaxed) && !self.cells.contains_key(key) {
            return Err(SWEEP_EVERY);
        }
        self.limiter
            .check_key(key)
            .map_err(|until| wait(until, self.limiter.clock()))
    }

    fn note_size(&self) {
        let full = self.cells.len() >= self.max_keys;
        if full != self.full.swap(full, Ordering::Relaxed) && full {
            tracing::warn!(
                max_tracked_keys = self.max_keys,
                "a keyed rate limit is tracking its most keys; new callers, data sources or stranger addresses are refused until some refill"
            );
        }
    }

    fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.note_size();
    }
}

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
        match self.limiters.load().check(caller, route) {
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

    #[test]
    fn at_the_cap_new_keys_are_refused_and_tracked_keys_still_served() {
        let limiters = Limiters::new(
            &RateLimits {
                per_data_source: limit("1/s", 3),
                max_tracked_keys: 1000,
                ..Default::default()
            },
            [],
        );
        let start = |id| limiters.check(None, Some(&Route::TestConnection { data_source_id: id }));
        let mut refused = 0;
        for id in 0..20_000 {
            if let Err((limit, wait)) = start(id) {
                assert_eq!(limit, Limit::DataSource);
                assert_eq!(wait, SWEEP_EVERY);
                refused += 1;
            }
        }
        let tracked = limiters.tracked_keys().1;
        assert!(
            tracked <= 1000 + SIZE_CHECK_EVERY as usize,
            "{tracked} keys"
        );
        assert_eq!(refused, 20_000 - tracked);
        // Data source 0 got a cell early and has tokens left: it is still served.
        assert!(start(0).is_ok());
    }

    #[test]
    fn ids_refused_by_the_global_limit_get_no_cell() {
        let limiters = Limiters::new(
            &RateLimits {
                global: limit("1/h", 1),
                per_data_source: limit("1/h", 1),
                ..Default::default()
            },
            [],
        );
        for id in 0..1000 {
            let _ = limiters.check(None, Some(&Route::TestConnection { data_source_id: id }));
        }
        assert_eq!(limiters.tracked_keys().1, 1);
    }

    #[test]
    fn a_callers_own_limit_replaces_per_caller() {
        let limiters = Limiters::new(
            &RateLimits {
                per_caller: limit("1/h", 1),
                ..Default::default()
            },
            [("ci", limit("1/h", 3).unwrap())],
        );
        let ci = CallerId("ci".into());
        let other = CallerId("other".into());
        for _ in 0..3 {
            assert!(limiters.check(Some(&ci), None).is_ok());
        }
        assert_eq!(
            limiters.check(Some(&ci), None).unwrap_err().0,
            Limit::Caller
        );
        assert!(limiters.check(Some(&other), None).is_ok());
        assert_eq!(
            limiters.check(Some(&other), None).unwrap_err().0,
            Limit::Caller
        );
        // The own limit is not a key of the shared per-caller limiter.
        assert_eq!(limiters.tracked_keys().0, 1);
    }

    #[test]
    fn reload_keeps_the_state_of_unchanged_limits_only() {
        let config = RateLimits {
            global: limit("1/h", 1),
            per_caller: limit("1/h", 1),
            ..Default::default()
        };
        let limiters = Limiters::new(&config, [("ci", limit("1/h", 1).unwrap())]);
        let ci = CallerId("ci".into());
        let other = CallerId("other".into());
        assert!(limiters.check(Some(&ci), None).is_ok());
        // Spent: ci's own limit and the global one.
        let same = limiters.reconfigured(&config, [("ci", limit("1/h", 1).unwrap())]);
        assert_eq!(same.check(Some(&ci), None).unwrap_err().0, Limit::Caller);
        assert_eq!(same.check(Some(&other), None).unwrap_err().0, Limit::Global);
        let raised = RateLimits {
            global: limit("1/h", 5),
            ..config
        };
        let changed = same.reconfigured(&raised, [("ci", limit("1/h", 2).unwrap())]);
        assert!(
            changed.check(Some(&ci), None).is_ok(),
            "a changed limit starts afresh"
        );
        // other's per-caller cell survived both reloads: the token it spent is still spent,
        // though the global limit that refused it then now has room.
        assert_eq!(
            changed.check(Some(&other), None).unwrap_err().0,
            Limit::Caller
        );
    }

    #[test]
    fn sweep_forgets_refilled_keys() {
        let limiters = Limiters::new(
            &RateLimits {
                per_data_source: limit("1000/s", 1),
                ..Default::default()
            },
            [],
        );
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
