//! Bounds what strangers cost the audit trail.
//!
//! Requests refused for want of credentials (401, 403, and the 429 of
//! `[rate_limit.unauthenticated]`) come from peers the gateway cannot hold to account, as fast as
//! they like. Each still counts in the metrics, but the audit file gets at most one record per
//! peer address per second; the rest are counted and written as summary records, one per peer
//! and status, `{"outcome": ..., "status": ..., "suppressed": N, ...}`, about once a second and
//! at shutdown. Nothing vanishes: the records written and the `suppressed` counts add up to the
//! refusals made. Forwarded requests, and every answer to an authenticated caller, are never
//! sampled.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::audit::{AuditLog, Limit, Outcome, Record};

/// Most peers tracked at once; refusals of peers past it share one bucket (`peer: null`).
const MAX_PEERS: usize = 10_000;

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
    peers: Mutex<HashMap<Option<IpAddr>, Window>>,
}

impl std::fmt::Debug for RefusalSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalSampler").finish_non_exhaustive()
    }
}

impl RefusalSampler {
    /// Whether this refusal gets a record of its own; if not, it is counted for a summary.
    pub fn admit(&self, peer: Option<IpAddr>, kind: RefusalKind, at: SystemTime) -> bool {
        let second = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let key = if peers.len() < MAX_PEERS || peers.contains_key(&peer) {
            peer
        } else {
            None
        };
        let window = peers.entry(key).or_default();
        if window.second != Some(second) {
            window.second = Some(second);
            return true;
        }
        match window.suppressed.iter_mut().find(|s| s.kind == kind) {
            Some(counted) => {
                counted.count += 1;
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

    /// Takes every count not yet summarised, and forgets peers quiet since before `now`'s
    /// previous second (their next refusal is written in full again, as it would be anyway).
    pub fn take(&self, now: SystemTime) -> Vec<Suppressed> {
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut taken = Vec::new();
        peers.retain(|_, window| {
            taken.append(&mut window.suppressed);
            window.second.is_some_and(|s| s + 1 >= second)
        });
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
                ts: humantime::format_rfc3339_micros(counted.first).to_string(),
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

    /// Writes summaries every [`FLUSH_EVERY`] for as long as the sampler is in use.
    pub async fn flush_every(sampler: std::sync::Weak<Self>, log: AuditLog) {
        let mut ticks = tokio::time::interval(FLUSH_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(sampler) = sampler.upgrade() else {
                return;
            };
            sampler.flush(&log).await;
        }
    }
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
        assert!(sampler.peers.lock().unwrap().is_empty());
    }
}
