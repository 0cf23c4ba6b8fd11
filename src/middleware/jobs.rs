//! Which caller started which job, so that one team cannot read another's test results.
//!
//! Every connection test started through the gateway is remembered in the [`JobBook`]
//! (`jobs.rs`) with its caller and data source, once Datafold has answered with its job id
//! ([`Answered`](crate::datafold::Answered)). A result poll is then audited with the job's data source. With authenticated callers (`token`,
//! `mtls`) a poll is only forwarded for the caller's own job: another caller's job, or a job the
//! gateway does not know, gets the same 404 as a path that does not exist, so the answer does not
//! say whether the job exists. `callers.share_results = true` turns the check off.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::route::Route;
use super::{record_fact, refuse, Fact, Refuse};
use crate::audit::AuditFacts;
use crate::callers::{CallerId, SharedCallers};
use crate::datafold::Answered;
use crate::jobs::{JobBook, JobOwner};
use crate::{error, Body};

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
            if let Some(job_id) = response
                .extensions()
                .get::<Answered>()
                .and_then(|a| a.job_id)
            {
                book.insert(job_id, owner);
            }
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callers::CallerBook;
    use std::num::NonZeroUsize;
    use tower::ServiceExt;

    /// The data source whose test starts Datafold refuses (500, no job).
    const REFUSED_BY_DATAFOLD: i64 = 500;

    /// An upstream that starts job 7 for every test (but those of [`REFUSED_BY_DATAFOLD`]) and
    /// answers every poll 200.
    fn upstream(request: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
        let mut response = Response::new(Body::default());
        let answered = match request.extensions().get::<Route>() {
            Some(Route::TestConnection { data_source_id })
                if *data_source_id == REFUSED_BY_DATAFOLD =>
            {
                Answered::read(true, 500, br#"{"detail": "internal error"}"#)
            }
            Some(Route::TestConnection { .. }) => Answered::read(true, 200, br#"{"job_id": 7}"#),
            _ => Answered::read(false, 200, br#"{"status": "done"}"#),
        };
        response.extensions_mut().insert(answered);
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
    async fn a_start_datafold_refused_books_no_job() {
        let book = book(10);
        let start = Route::TestConnection {
            data_source_id: REFUSED_BY_DATAFOLD,
        };
        send(&book, true, "analytics", start).await;
        assert!(book.is_empty());
    }

    /// After analytics started job 7 on data source 42: the statuses of a poll of job 7 by
    /// analytics and by billing, and of unknown job 8 by billing, each with the data source
    /// its audit record names.
    async fn polls_after_a_start(owners_only: bool) -> [(u16, Option<i64>); 3] {
        let book = book(10);
        let start = Route::TestConnection { data_source_id: 42 };
        send(&book, owners_only, "analytics", start).await;
        let mut answers = [(0, None); 3];
        for (answer, (caller, job_id)) in
            answers
                .iter_mut()
                .zip([("analytics", 7), ("billing", 7), ("billing", 8)])
        {
            let response = send(&book, owners_only, caller, Route::TestResult { job_id }).await;
            *answer = (response.status().as_u16(), data_source_of(&response));
        }
        answers
    }

    #[tokio::test]
    async fn only_the_owner_reads_a_job() {
        assert_eq!(
            polls_after_a_start(true).await,
            [(200, Some(42)), (404, Some(42)), (404, None)]
        );
    }

    #[tokio::test]
    async fn shared_results_are_read_by_anyone_and_still_audited() {
        assert_eq!(
            polls_after_a_start(false).await,
            [(200, Some(42)), (200, Some(42)), (200, None)]
        );
    }
}
