//! Bounds what strangers cost the audit trail.
//!
//! Requests refused for want of credentials (401, 403, and the 429 of
//! `[rate_limit.unauthenticated]`) come from peers the gateway cannot hold to account, as fast as
//! they like. Each still counts in the metrics, but the audit file gets at most one record per
//! peer address per second; the rest are counted and written as summary records, one per peer
//! and status, `{"outcome": ..., "status": ..., "suppressed": N, ...}`, about once a second and
//! at shutdown. Nothing vanishes: the records written and the `suppressed` counts add up to the
//! refusals made. Forwarded requests, and every answer to an authenticated caller, are never
//! sampled. A peer is an IPv4 address or an IPv6 /64 (see `Peer::block`), and the whole is
//! bounded too: at most [`MAX_WRITTEN_PER_SECOND`] records in full and [`MAX_SUMMARIES`]
//! summaries a second, however many addresses a flood comes from.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Limit, Outcome, Record};

/// Most peers tracked at once; refusals of peers past it share one bucket (`peer: null`).
const MAX_PEERS: usize = 10_000;

/// Most strangers' refusals written in full per second, all peers together: a flood from many
/// addresses (a botnet, an IPv6 prefix) is summarised too.
const MAX_WRITTEN_PER_SECOND: u32 = 20;

/// Most summary records one flush writes; the peers past it are summed into one record per
/// kind, `peer: null`.
const MAX_SUMMARIES: usize = 50;

/// How often summaries are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A refusal's kind, as its summary groups it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalKind {
    pub status: u16,
    pub outcome: Outcome,
    pub limit: Option<Limit>,
}

/// Refusals of one peer and kind that were counted instead of written.
#[derive(Debug, Clone, PartialEq)]
pub struct Suppressed {
    /// `None` for the bucket shared by peers past [`MAX_PEERS`].
    pub peer: Option<IpAddr>,
    pub kind: RefusalKind,
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
}

#[derive(Default)]
struct Window {
    /// The Unix second in which this peer's last individual record was written.
    second: Option<u64>,
    /// Counted since the last summary.
    suppressed: Vec<Suppressed>,
}

/// Decides which refusals of strangers get a record of their own; shared by every connection.
#[derive(Default)]
pub struct RefusalSampler {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    peers: HashMap<Option<IpAddr>, Window>,
    /// The Unix second `written` counts in.
    second: u64,
    /// Records written in full in `second`, all peers together.
    written: u32,
}

impl std::fmt::Debug for RefusalSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalSampler").finish_non_exhaustive()
    }
}

impl RefusalSampler {
    /// Whether this refusal gets a record of its own; if not, it is counted for a summary.
    /// `peer` is the address block the refusal came from.
    pub fn admit(&self, peer: Option<IpAddr>, kind: RefusalKind, at: SystemTime) -> bool {
        let second = unix_second(at);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Inner {
            peers,
            second: current,
            written,
        } = &mut *inner;
        if second > *current {
            *current = second;
            *written = 0;
        }
        let key = if peers.len() < MAX_PEERS || peers.contains_key(&peer) {
            peer
        } else {
            None
        };
        let window = peers.entry(key).or_default();
        // Only a later second opens a new window: a request that started earlier and ends late
        // must not reopen one.
        let fresh = window.second.is_none_or(|last| second > last);
        if fresh && *written < MAX_WRITTEN_PER_SECOND {
            window.second = Some(second);
            *written += 1;
            return true;
        }
        match window.suppressed.iter_mut().find(|s| s.kind == kind) {
            Some(counted) => {
                counted.count += 1;
                counted.first = counted.first.min(at);
                counted.last = counted.last.max(at);
            }
            None => window.suppressed.push(Suppressed {
                peer: key,
                kind,
                count: 1,
                first: at,
                last: at,
            }),
        }
        false
    }

    /// Takes every count not yet summarised (at most [`MAX_SUMMARIES`] of them, the smallest
    /// summed into one per kind), and forgets peers quiet since before `now`'s previous second
    /// (their next refusal is written in full again, as it would be anyway).
    pub fn take(&self, now: SystemTime) -> Vec<Suppressed> {
        let second = unix_second(now);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut taken = Vec::new();
        inner.peers.retain(|_, window| {
            taken.append(&mut window.suppressed);
            window.second.is_some_and(|s| s + 1 >= second)
        });
        drop(inner);
        if taken.len() > MAX_SUMMARIES {
            taken.sort_by_key(|s| std::cmp::Reverse(s.count));
            let rest = taken.split_off(MAX_SUMMARIES - 1);
            let mut merged: Vec<Suppressed> = Vec::new();
            for counted in rest {
                match merged.iter_mut().find(|m| m.kind == counted.kind) {
                    Some(m) => {
                        m.count += counted.count;
                        m.first = m.first.min(counted.first);
                        m.last = m.last.max(counted.last);
                    }
                    None => merged.push(Suppressed {
                        peer: None,
                        ..counted
                    }),
                }
            }
            taken.extend(merged);
        }
        taken
    }

    /// Writes a summary record for each count not yet summarised.
    pub async fn flush(&self, log: &AuditLog) {
        for counted in self.take(SystemTime::now()) {
            let peer = counted.peer.map(|ip| ip.to_string());
            let span = counted
                .last
                .duration_since(counted.first)
                .unwrap_or_default();
            let record = Record {
                ts: counted.first,
                peer: peer.as_deref(),
                status: counted.kind.status,
                outcome: counted.kind.outcome,
                limit: counted.kind.limit,
                suppressed: Some(counted.count),
                duration_ms: (span.as_secs_f64() * 1e6).round() / 1e3,
                ..Record::empty()
            };
            log.append(&record).await;
        }
    }

    /// Writes summaries every [`FLUSH_EVERY`] until `stop`. A flush that has begun is finished
    /// first: the counts it took are nowhere else.
    pub async fn flush_every(sampler: Arc<Self>, log: AuditLog, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(FLUSH_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            sampler.flush(&log).await;
        }
    }
}

fn unix_second(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNAUTHORIZED: RefusalKind = RefusalKind {
        status: 401,
        outcome: Outcome::Rejected,
        limit: None,
    };
    const LIMITED: RefusalKind = RefusalKind {
        status: 429,
        outcome: Outcome::RateLimited,
        limit: Some(Limit::Unauthenticated),
    };

    fn at(secs: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs_f64(1_700_000_000.0 + secs)
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn one_record_per_peer_per_second_and_the_rest_counted_by_kind() {
        let sampler = RefusalSampler::default();
        assert!(sampler.admit(ip(1), UNAUTHORIZED, at(0.1)));
        assert!(!sampler.admit(ip(1), UNAUTHORIZED, at(0.2)));
        assert!(!sampler.admit(ip(1), LIMITED, at(0.3)));
        assert!(!sampler.admit(ip(1), LIMITED, at(0.4)));
        // Another peer in the same second has a record of its own.
        assert!(sampler.admit(ip(2), UNAUTHORIZED, at(0.5)));
        // The next second, the first peer gets one again.
        assert!(sampler.admit(ip(1), LIMITED, at(1.1)));
        let mut taken = sampler.take(at(1.2));
        taken.sort_by_key(|s| s.kind.status);
        assert_eq!(taken.len(), 2);
        assert_eq!((taken[0].kind, taken[0].count), (UNAUTHORIZED, 1));
        assert_eq!((taken[1].kind, taken[1].count), (LIMITED, 2));
        assert_eq!((taken[1].first, taken[1].last), (at(0.3), at(0.4)));
        assert!(sampler.take(at(1.3)).is_empty(), "each count is taken once");
    }

    #[test]
    fn written_and_suppressed_add_up_to_every_refusal() {
        let sampler = RefusalSampler::default();
        let mut written = 0;
        let mut summed = 0;
        for i in 0..10_000u32 {
            let when = at(f64::from(i) / 1000.0);
            written += u64::from(sampler.admit(ip((i % 3) as u8), UNAUTHORIZED, when));
            if i % 1500 == 0 {
                summed += sampler.take(when).iter().map(|s| s.count).sum::<u64>();
            }
        }
        summed += sampler.take(at(100.0)).iter().map(|s| s.count).sum::<u64>();
        assert_eq!(written + summed, 10_000);
        assert_eq!(written, 30, "three peers, ten seconds");
    }

    #[test]
    fn quiet_peers_are_forgotten() {
        let sampler = RefusalSampler::default();
        assert!(sampler.admit(ip(1), UNAUTHORIZED, at(0.0)));
        sampler.take(at(5.0));
        assert!(sampler.inner.lock().unwrap().peers.is_empty());
    }

    #[test]
    fn a_late_finisher_does_not_reopen_an_earlier_second() {
        let sampler = RefusalSampler::default();
        assert!(sampler.admit(ip(1), UNAUTHORIZED, at(1.1)));
        // Started in the second before, finished after: counted, not written.
        assert!(!sampler.admit(ip(1), UNAUTHORIZED, at(0.9)));
        assert!(!sampler.admit(ip(1), UNAUTHORIZED, at(1.2)));
    }

    #[test]
    fn many_addresses_share_one_budget_of_records_and_summaries() {
        let sampler = RefusalSampler::default();
        let mut written = 0;
        for peer in 0..2_000u32 {
            let address = Some(IpAddr::from(peer.to_be_bytes()));
            for n in 0..3 {
                written +=
                    u32::from(sampler.admit(address, UNAUTHORIZED, at(0.1 + f64::from(n) * 0.01)));
            }
        }
        assert_eq!(written, MAX_WRITTEN_PER_SECOND);
        let taken = sampler.take(at(0.5));
        assert_eq!(taken.len(), MAX_SUMMARIES);
        let summed: u64 = taken.iter().map(|s| s.count).sum();
        assert_eq!(u64::from(written) + summed, 6_000);
        assert_eq!(taken.iter().filter(|s| s.peer.is_none()).count(), 1);
    }
}
