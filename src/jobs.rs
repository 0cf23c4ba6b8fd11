//! Which caller started which job: every connection test started through the gateway is
//! remembered with its caller and data source, the oldest forgotten first past
//! `callers.max_tracked_jobs`. The layer that notes starts and checks polls against it is
//! `middleware/jobs.rs`.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

/// Who started a job, and on which data source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOwner {
    pub caller: Arc<str>,
    pub data_source_id: i64,
}

/// The jobs started through this gateway, bounded in memory.
///
/// Split into shards by job id, each with its own lock, so that workers starting and polling
/// different jobs do not queue on one lock. Each shard holds an equal part of the capacity
/// (rounded up) and forgets its own oldest job when full: the job forgotten is the oldest of
/// its shard, not always of the whole book, and the book may hold a few more jobs than the
/// capacity (less than one per shard). Job ids spread evenly over the shards, so this is close
/// to one book of that capacity.
#[derive(Debug)]
pub struct JobBook {
    shards: Box<[Mutex<LruCache<i64, JobOwner>>]>,
}

/// Shards at most; a smaller capacity gets one shard per job it may hold.
const SHARDS: usize = 16;

impl JobBook {
    pub fn new(capacity: NonZeroUsize) -> Self {
        let shards = capacity.get().min(SHARDS);
        let per_shard = NonZeroUsize::new(capacity.get().div_ceil(shards))
            .expect("a positive capacity over at most as many shards");
        Self {
            shards: (0..shards)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
        }
    }

    /// Remembers a job; past its shard's capacity, the job that shard remembered longest ago
    /// is forgotten.
    pub fn insert(&self, job_id: i64, owner: JobOwner) {
        self.lock(job_id).put(job_id, owner);
    }

    /// The owner of a job, without making it any younger: eviction stays oldest-started first.
    pub fn owner(&self, job_id: i64) -> Option<JobOwner> {
        self.lock(job_id).peek(&job_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Which shard holds `job_id`: a multiplicative hash, so that ids counting up in any step
    /// still spread over every shard.
    fn shard(&self, job_id: i64) -> usize {
        let hash = (job_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((hash >> 32) % self.shards.len() as u64) as usize
    }

    fn lock(&self, job_id: i64) -> MutexGuard<'_, LruCache<i64, JobOwner>> {
        lock(&self.shards[self.shard(job_id)])
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing can panic while the lock is held; a poisoned map is still a valid map.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(capacity: usize) -> JobBook {
        JobBook::new(NonZeroUsize::new(capacity).unwrap())
    }

    fn owner(data_source_id: i64) -> JobOwner {
        JobOwner {
            caller: "a".into(),
            data_source_id,
        }
    }

    /// The first `n` job ids that land in the same shard as job 0.
    fn one_shard(book: &JobBook, n: usize) -> Vec<i64> {
        let shard = book.shard(0);
        (0..)
            .filter(|&id| book.shard(id) == shard)
            .take(n)
            .collect()
    }

    #[test]
    fn the_oldest_job_is_forgotten_first_even_if_polled() {
        // 16 shards of 2.
        let book = book(32);
        let [a, b, c] = one_shard(&book, 3)[..] else {
            unreachable!()
        };
        book.insert(a, owner(1));
        book.insert(b, owner(2));
        assert!(book.owner(a).is_some());
        book.insert(c, owner(3));
        assert_eq!(book.owner(a), None);
        assert_eq!(book.owner(b), Some(owner(2)));
        assert_eq!(book.owner(c), Some(owner(3)));
        assert_eq!(book.len(), 2);
    }

    #[test]
    fn a_small_book_holds_exactly_its_capacity() {
        let book = book(2);
        for id in 0..100 {
            book.insert(id, owner(id));
        }
        assert_eq!(book.len(), 2);
        assert_eq!(book.owner(99), Some(owner(99)));
    }

    #[test]
    fn the_book_stays_within_its_capacity_rounded_up_per_shard() {
        // 16 shards of 7: at most 112.
        let book = book(100);
        for id in 0..10_000 {
            book.insert(id, owner(id));
        }
        assert!((100..=112).contains(&book.len()), "{}", book.len());
        assert_eq!(book.owner(9_999), Some(owner(9_999)));
    }

    #[test]
    fn consecutive_job_ids_spread_over_every_shard() {
        let book = book(1_600);
        let mut per_shard = [0usize; SHARDS];
        for id in 1_000..2_600 {
            per_shard[book.shard(id)] += 1;
        }
        assert!(
            per_shard.iter().all(|&n| (80..=120).contains(&n)),
            "{per_shard:?}"
        );
    }
}
