//! Rate limits: global (the account's Datafold quota), per caller, and per data source (no
//! hammering one warehouse), each a GCRA limiter from governor; and the limit on refusals of
//! strangers per address. The layer that asks them is `middleware/rate_limit.rs`.
//!
//! The caller's own limit comes first, so that a caller refused by it does not use up the global
//! quota everyone shares; the data source's comes last, so that ids sprayed past the other limits
//! never get a cell. A request refused by a later limit has used a token of the earlier ones:
//! governor cannot look without taking, and an attempt is an attempt. The wait returned with a
//! refusal is the time until the refusing limit would admit the request.
//!
//! Keyed limiters hold one small cell per caller or data source seen recently. A background
//! sweep every [`SWEEP_EVERY`] drops the cells that have refilled, and
//! `rate_limit.max_tracked_keys` caps them (give or take [`SIZE_CHECK_EVERY`]): at the cap, keys
//! already tracked are limited as usual and new ones are refused (fail closed) until a sweep
//! makes room.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, StateStore};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::audit::Limit;
use crate::config::{Per, RateLimit, RateLimits};

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

    /// Admits a request of `caller` (if known) or says which limit refused it and how long until
    /// it would admit it. Every request counts against the global and per-caller limits; only a
    /// test start counts against its data source, `started`.
    pub fn check(
        &self,
        caller: Option<&Arc<str>>,
        started: Option<i64>,
    ) -> Result<(), (Limit, Duration)> {
        if let Some(caller) = caller {
            if let Some(own) = self.own_limits.get(caller) {
                let limiter = &own.limiter;
                limiter
                    .check()
                    .map_err(|until| (Limit::Caller, wait(until, limiter.clock())))?;
            } else if let Some(kept) = &self.per_caller {
                kept.limiter
                    .check(caller)
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
        if let (Some(kept), Some(data_source_id)) = (&self.per_data_source, started) {
            kept.limiter
                .check(&data_source_id)
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
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SIZE_CHECK_EVERY)
        {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use std::num::NonZeroU32;

    fn limit(rate: &str, burst: u32) -> Option<RateLimit> {
        Some(RateLimit {
            rate: rate.parse::<Rate>().unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        })
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
        let start = |id| limiters.check(None, Some(id));
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
            let _ = limiters.check(None, Some(id));
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
        let ci: Arc<str> = "ci".into();
        let other: Arc<str> = "other".into();
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
        let ci: Arc<str> = "ci".into();
        let other: Arc<str> = "other".into();
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
            limiters.check(None, Some(id)).unwrap();
        }
        assert_eq!(limiters.tracked_keys().1, 10_000);
        std::thread::sleep(Duration::from_millis(5));
        limiters.sweep();
        assert_eq!(limiters.tracked_keys().1, 0);
    }
}
