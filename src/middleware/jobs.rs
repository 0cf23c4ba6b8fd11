//! Which caller started which job, so that one team cannot read another's test results.
//!
//! Every connection test started through the gateway is remembered with its caller and data
//! source ([`JobBook`]), the oldest forgotten first past `callers.max_tracked_jobs` (oldest within
//! a shard of the book, see there). A result
//! poll is then audited with the job's data source. With authenticated callers (`token`,
//! `mtls`) a poll is only forwarded for the caller's own job: another caller's job, or a job the
//! gateway does not know, gets the same 404 as a path that does not exist, so the answer does not
//! say whether the job exists. `callers.share_results = true` turns the check off.

use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use lru::LruCache;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::caller::{CallerId, SharedCallers};
use super::route::Route;
use super::{record_fact, refuse, Fact, Refuse};
use crate::audit::{AuditFacts, Outcome};
use crate::{error, Body};

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

#[derive(Debug, Clone)]
pub struct JobOwnershipLayer {
    book: Arc<JobBook>,
    /// Says whether a result poll must come from the job's own caller.
    callers: SharedCallers,
}

impl JobOwnershipLayer {
    pub fn new(book: Arc<JobBook>, callers: SharedCallers) -> Self {
        Self { book, callers }
    }
}

impl<S> Layer<S> for JobOwnershipLayer {
    type Service = JobOwnership<S>;

    fn layer(&self, inner: S) -> Self::Service {
        JobOwnership {
            inner,
            book: self.book.clone(),
            callers: self.callers.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobOwnership<S> {
    inner: S,
    book: Arc<JobBook>,
    callers: SharedCallers,
}

/// The data source of the job a result poll asks for.
struct JobDataSource(i64);

impl Fact for JobDataSource {
    fn record(self, facts: &mut AuditFacts) {
        facts.data_source_id = Some(self.0);
    }
}

impl<S, B> Service<Request<B>> for JobOwnership<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Refuse<Noted<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let caller = request.extensions().get::<CallerId>().map(|c| c.0.clone());
        let mut start = None;
        let mut polled_data_source = None;
        match request.extensions().get::<Route>().copied() {
            Some(Route::TestConnection { data_source_id }) => {
                start = caller.map(|caller| {
                    (
                        self.book.clone(),
                        JobOwner {
                            caller,
                            data_source_id,
                        },
                    )
                });
            }
            Some(Route::TestResult { job_id }) => {
                let owner = self.book.owner(job_id);
                let own = matches!((&owner, &caller), (Some(o), Some(c)) if o.caller == *c);
                if !own && self.callers.load().owners_only() {
                    let mut response = error::not_found();
                    if let Some(owner) = owner {
                        // The caller is not told, but the auditor is: whose job was asked for.
                        record_fact(&mut response, JobDataSource(owner.data_source_id));
                    }
                    return refuse(response);
                }
                polled_data_source = owner.map(|o| o.data_source_id);
            }
            None => {}
        }
        Either::Right(Noted {
            inner: self.inner.call(request),
            start,
            data_source_id: polled_data_source,
        })
    }
}

pin_project! {
    /// The inner answer; a started job is remembered, a polled job's data source audited.
    pub struct Noted<F> {
        #[pin]
        inner: F,
        start: Option<(Arc<JobBook>, JobOwner)>,
        data_source_id: Option<i64>,
    }
}

impl<F> Future for Noted<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        if let Some(data_source_id) = this.data_source_id.take() {
            record_fact(&mut response, JobDataSource(data_source_id));
        }
        if let Some((book, owner)) = this.start.take() {
            let facts = response.extensions().get::<AuditFacts>();
            if let Some(AuditFacts {
                job_id: Some(job_id),
                outcome: Some(Outcome::Forwarded),
                ..
            }) = facts
            {
                book.insert(*job_id, owner);
            }
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::middleware::caller::CallerBook;
    use tower::ServiceExt;

    /// An upstream that starts job 7 for every test and answers every poll 200.
    fn upstream(request: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
        let mut response = Response::new(Body::default());
        let facts = response
            .extensions_mut()
            .get_or_insert_default::<AuditFacts>();
        facts.outcome = Some(Outcome::Forwarded);
        if let Some(Route::TestConnection { .. }) = request.extensions().get::<Route>() {
            facts.job_id = Some(7);
        }
        std::future::ready(Ok(response))
    }

    async fn send(
        book: &Arc<JobBook>,
        owners_only: bool,
        caller: &str,
        route: Route,
    ) -> Response<Body> {
        let callers = crate::config::Callers {
            mode: crate::config::CallerMode::Token,
            share_results: !owners_only,
            ..Default::default()
        };
        let callers = Arc::new(arc_swap::ArcSwap::from_pointee(CallerBook::new(&callers)));
        let service =
            JobOwnershipLayer::new(book.clone(), callers).layer(tower::service_fn(upstream));
        let mut request = Request::new(Body::default());
        request.extensions_mut().insert(CallerId(caller.into()));
        request.extensions_mut().insert(route);
        service.oneshot(request).await.unwrap()
    }

    fn book(capacity: usize) -> Arc<JobBook> {
        Arc::new(JobBook::new(NonZeroUsize::new(capacity).unwrap()))
    }

    fn data_source_of(response: &Response<Body>) -> Option<i64> {
        response.extensions().get::<AuditFacts>()?.data_source_id
    }

    #[tokio::test]
    async fn started_jobs_are_remembered_with_caller_and_data_source() {
        let book = book(10);
        send(
            &book,
            true,
            "analytics",
            Route::TestConnection { data_source_id: 42 },
        )
        .await;
        assert_eq!(
            book.owner(7),
            Some(JobOwner {
                caller: "analytics".into(),
                data_source_id: 42
            })
        );
    }

    #[tokio::test]
    async fn only_the_owner_reads_a_job() {
        let book = book(10);
        send(
            &book,
            true,
            "analytics",
            Route::TestConnection { data_source_id: 42 },
        )
        .await;
        let own = send(&book, true, "analytics", Route::TestResult { job_id: 7 }).await;
        assert_eq!(own.status(), 200);
        assert_eq!(data_source_of(&own), Some(42));
        let other = send(&book, true, "billing", Route::TestResult { job_id: 7 }).await;
        assert_eq!(other.status(), 404);
        assert_eq!(data_source_of(&other), Some(42));
        let unknown = send(&book, true, "analytics", Route::TestResult { job_id: 8 }).await;
        assert_eq!(unknown.status(), 404);
    }

    #[tokio::test]
    async fn shared_results_are_read_by_anyone_and_still_audited() {
        let book = book(10);
        send(
            &book,
            false,
            "analytics",
            Route::TestConnection { data_source_id: 42 },
        )
        .await;
        let other = send(&book, false, "billing", Route::TestResult { job_id: 7 }).await;
        assert_eq!(other.status(), 200);
        assert_eq!(data_source_of(&other), Some(42));
        let unknown = send(&book, false, "billing", Route::TestResult { job_id: 8 }).await;
        assert_eq!(unknown.status(), 200);
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
