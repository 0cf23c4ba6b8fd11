//! Prometheus metrics, served on the admin listener at `/metrics` (OpenMetrics text format,
//! encoded by `prometheus-client`).
//!
//! Label values come from small fixed sets (routes, statuses, outcomes, limits, error kinds) or,
//! for `caller`, from names the config lists (token entries, `callers.allow`). Peer addresses,
//! data source ids and unlisted certificate names never become labels: their number is unbounded.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio_util::task::TaskTracker;

use crate::audit::{Limit, Outcome};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabels {
    pub caller: String,
    pub outcome: &'static str,
}

/// Buckets for request and upstream durations, in seconds: 1 ms to 30 s (`upstream.timeout`).
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every worker's shard of the per-request metrics.
#[derive(Debug, Default)]
struct Shards(Mutex<Vec<Arc<Shard>>>);

impl Shards {
    fn add(&self, in_flight: TaskTracker) -> Arc<Shard> {
        let shard = Arc::new(Shard {
            in_flight,
            counts: Mutex::default(),
        });
        lock(&self.0).push(shard.clone());
        shard
    }

    /// All shards' counts added up, and the requests in flight.
    fn sum(&self) -> (Counts, i64) {
        let mut total = Counts::default();
        let mut in_flight = 0;
        for shard in lock(&self.0).iter() {
            in_flight += shard.in_flight.len() as i64;
            let counts = shard.lock();
            for (labels, n) in &counts.requests {
                *total.requests.entry(labels.clone()).or_default() += n;
            }
            for (mine, theirs) in [
                (&mut total.request_duration, &counts.request_duration),
                (&mut total.upstream_duration, &counts.upstream_duration),
            ] {
                for (route, buckets) in theirs {
                    mine.entry(route).or_default().add(buckets);
                }
            }
            for (direction, n) in &counts.headers_dropped {
                *total.headers_dropped.entry(direction).or_default() += n;
            }
            for (caller, outcomes) in &counts.callers {
                let mine = total.callers.entry(caller.clone()).or_default();
                for (outcome, n) in outcomes {
                    *mine.entry(outcome).or_default() += n;
                }
            }
        }
        (total, in_flight)
    }
}

/// One worker's per-request metrics. Its lock is taken by its worker once or twice per request
/// and by a scrape: never contended on the request path, and on the worker's own cache lines.
#[derive(Debug)]
struct Shard {
    /// The worker's requests in flight: the same count its shutdown drains (see
    /// `middleware/request_task.rs`), read here at scrape time.
    in_flight: TaskTracker,
    counts: Mutex<Counts>,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        lock(&self.counts)
    }
}

/// Counting cannot leave the counts half-updated: a poisoned lock's counts are still good.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Default)]
struct Counts {
    requests: HashMap<RequestLabels, u64>,
    request_duration: HashMap<&'static str, Buckets>,
    upstream_duration: HashMap<&'static str, Buckets>,
    /// By caller name, then outcome.
    callers: HashMap<Arc<str>, HashMap<&'static str, u64>>,
    /// By direction.
    headers_dropped: HashMap<&'static str, u64>,
}

/// A duration histogram over [`DURATION_BUCKETS`] (and +Inf), in seconds.
#[derive(Debug, Default, Clone)]
struct Buckets {
    sum: f64,
    count: u64,
    /// Observations per bucket (not cumulative); the last is +Inf.
    counts: [u64; DURATION_BUCKETS.len() + 1],
}

impl Buckets {
    fn observe(&mut self, took: Duration) {
        let seconds = took.as_secs_f64();
        self.sum += seconds;
        self.count += 1;
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.counts[bucket] += 1;
    }

    fn add(&mut self, other: &Self) {
        self.sum += other.sum;
        self.count += other.count;
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
    }

    fn encode(&self, encoder: &mut MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let bounds = DURATION_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(self.counts).collect();
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &buckets, None)
    }
}

/// Encodes the per-request metrics of every worker, summed, under the names and labels they
/// would have as plain prometheus-client metrics.
#[derive(Debug)]
struct PerRequest(Arc<Shards>);

impl Collector for PerRequest {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (counts, in_flight) = self.0.sum();
        let mut requests = encoder.encode_descriptor(
            "requests",
            "Requests answered on the main listener",
            None,
            MetricType::Counter,
        )?;
        for (labels, n) in &counts.requests {
            requests
                .encode_family(labels)?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        for (name, help, histograms) in [
            (
                "request_duration_seconds",
                "Time from a request's arrival to its answer",
                &counts.request_duration,
            ),
            (
                "upstream_duration_seconds",
                "Time of the exchange with Datafold, for forwarded requests",
                &counts.upstream_duration,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (route, buckets) in histograms {
                buckets.encode(&mut family.encode_family(&RouteLabels { route })?)?;
            }
        }
        encoder
            .encode_descriptor(
                "in_flight_requests",
                "Requests being handled now",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&in_flight)?;
        let mut dropped = encoder.encode_descriptor(
            "headers_dropped",
            "Header values not on an allow-list, dropped; direction is request (to Datafold) or response (to the caller)",
            None,
            MetricType::Counter,
        )?;
        for (direction, n) in &counts.headers_dropped {
            dropped
                .encode_family(&DirectionLabels { direction })?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        let mut callers = encoder.encode_descriptor(
            "caller_requests",
            "Requests by authenticated caller (names from the config only)",
            None,
            MetricType::Counter,
        )?;
        for (caller, outcomes) in &counts.callers {
            for (outcome, n) in outcomes {
                let labels = CallerLabels {
                    caller: caller.to_string(),
                    outcome,
                };
                callers
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        Ok(())
    }
}

/// A family whose HELP and TYPE lines are listed before its first sample too, as they were
/// before prometheus-client 0.24.1 (which leaves empty families out of the text).
#[derive(Debug)]
struct Listed<M>(M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// Every metric the gateway keeps; cheap to clone (each metric is shared inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// What every request counts, in this worker's shard (see [`PerRequest`]).
    per_request: Arc<Shard>,
    shards: Arc<Shards>,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub key_reloads: Family<ResultLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub audit_write_errors: Counter,
    pub audit_suppressed: Counter,
    pub tls_handshake_failures: Counter,
    pub upstream_retries: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let shards = Arc::new(Shards::default());
        Self {
            per_request: shards.add(TaskTracker::new()),
            shards,
            rate_limited: Family::default(),
            upstream_errors: Family::default(),
            key_reloads: Family::default(),
            config_reloads: Family::default(),
            audit_write_errors: Counter::<u64, AtomicU64>::default(),
            audit_suppressed: Counter::default(),
            tls_handshake_failures: Counter::default(),
            upstream_retries: Counter::default(),
        }
    }
}

impl Metrics {
    /// The registry `/metrics` encodes, with every metric of `self` in it.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("datafold_gateway");
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit",
            Listed(self.rate_limited.clone()),
        );
        registry.register(
            "upstream_errors",
            "Failed exchanges with Datafold, by kind",
            Listed(self.upstream_errors.clone()),
        );
        registry.register(
            "key_reloads",
            "Attempts to load a new API key (SIGHUP or a change in the key file's folder)",
            Listed(self.key_reloads.clone()),
        );
        registry.register(
            "config_reloads",
            "Attempts to reload [callers] and [rate_limit] on SIGHUP",
            Listed(self.config_reloads.clone()),
        );
        registry.register(
            "audit_write_errors",
            "Batches of audit records that could not be written",
            self.audit_write_errors.clone(),
        );
        registry.register(
            "audit_records_suppressed",
            "Refusals of unauthenticated peers counted in a summary audit record instead of a record each",
            self.audit_suppressed.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the main listener that failed or did not finish in time",
            self.tls_handshake_failures.clone(),
        );
        registry.register_collector(Box::new(PerRequest(self.shards.clone())));
        registry.register(
            "upstream_retries",
            "Requests sent again because the upstream provably never saw them",
            self.upstream_retries.clone(),
        );
        registry.register(
            "build",
            "The gateway's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry
    }

    /// A copy of these metrics for one worker: what every request counts goes to a shard of
    /// its own, which only that worker writes (and `/metrics` reads, summing all shards).
    /// `in_flight_requests` is the sum of the workers' `requests`, the trackers their shutdown
    /// waits on: one count of requests in flight, not a second one kept beside it.
    pub fn for_worker(&self, requests: &TaskTracker) -> Self {
        Self {
            per_request: self.shards.add(requests.clone()),
            ..self.clone()
        }
    }

    /// Counts an answered request: `requests`, `request_duration_seconds` and, for a caller
    /// named in the config, `caller_requests`.
    pub fn request_done(
        &self,
        labels: RequestLabels,
        took: Duration,
        listed_caller: Option<&Arc<str>>,
    ) {
        let mut counts = self.per_request.lock();
        counts
            .request_duration
            .entry(labels.route)
            .or_default()
            .observe(took);
        if let Some(caller) = listed_caller {
            let outcomes = match counts.callers.get_mut(&**caller) {
                Some(outcomes) => outcomes,
                None => counts.callers.entry(caller.clone()).or_default(),
            };
            *outcomes.entry(labels.outcome).or_default() += 1;
        }
        *counts.requests.entry(labels).or_default() += 1;
    }

    /// Counts header values dropped by an allow-list in `headers_dropped`; `direction` is
    /// `request` (to Datafold) or `response` (to the caller).
    pub fn headers_dropped(&self, direction: &'static str, dropped: u64) {
        *self
            .per_request
            .lock()
            .headers_dropped
            .entry(direction)
            .or_default() += dropped;
    }

    /// Counts an exchange with Datafold in `upstream_duration_seconds`.
    pub fn upstream_done(&self, route: &'static str, took: Duration) {
        self.per_request
            .lock()
            .upstream_duration
            .entry(route)
            .or_default()
            .observe(took);
    }

    pub fn rate_limited(&self, limit: Limit) {
        let limit = match limit {
            Limit::Global => "global",
            Limit::Caller => "caller",
            Limit::DataSource => "data_source",
            Limit::Unauthenticated => "unauthenticated",
        };
        self.rate_limited
            .get_or_create(&LimitLabels { limit })
            .inc();
    }
}

/// The label value of an outcome, as the audit trail spells it.
pub fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Forwarded => "forwarded",
        Outcome::Rejected => "rejected",
        Outcome::RateLimited => "rate_limited",
        Outcome::UpstreamError => "upstream_error",
        Outcome::Aborted => "aborted",
    }
}

/// The registry's text, as `/metrics` serves it.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_named_with_the_gateway_prefix() {
        let metrics = Metrics::default();
        metrics.request_done(
            RequestLabels {
                route: "test_connection",
                status: 200,
                outcome: "forwarded",
            },
            Duration::from_millis(3),
            None,
        );
        metrics.rate_limited(Limit::DataSource);
        let text = encode(&metrics.registry());
        for line in [
            "datafold_gateway_requests_total{route=\"test_connection\",status=\"200\",outcome=\"forwarded\"} 1",
            "datafold_gateway_rate_limited_total{limit=\"data_source\"} 1",
            "datafold_gateway_audit_write_errors_total 0",
            "datafold_gateway_in_flight_requests 0",
            "datafold_gateway_upstream_retries_total 0",
            "datafold_gateway_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn workers_count_apart_and_the_scrape_adds_them_up() {
        let metrics = Metrics::default();
        let (tasks_one, tasks_two) = (TaskTracker::new(), TaskTracker::new());
        let (one, two) = (
            metrics.for_worker(&tasks_one),
            metrics.for_worker(&tasks_two),
        );
        let labels = RequestLabels {
            route: "test_result",
            status: 200,
            outcome: "forwarded",
        };
        let caller: Arc<str> = Arc::from("team-a");
        one.request_done(labels.clone(), Duration::from_millis(2), Some(&caller));
        two.request_done(labels.clone(), Duration::from_millis(40), Some(&caller));
        two.request_done(labels, Duration::from_secs(60), None);
        two.upstream_done("test_result", Duration::from_millis(30));
        one.headers_dropped("request", 2);
        two.headers_dropped("request", 1);
        // Two requests in flight on one worker, one on the other, one of them over.
        let _busy = [
            tasks_one.track_future(std::future::pending::<()>()),
            tasks_one.track_future(std::future::pending::<()>()),
            tasks_two.track_future(std::future::pending::<()>()),
        ];
        drop(tasks_two.track_future(std::future::pending::<()>()));
        let text = encode(&metrics.registry());
        for line in [
            "datafold_gateway_requests_total{route=\"test_result\",status=\"200\",outcome=\"forwarded\"} 3",
            "datafold_gateway_request_duration_seconds_count{route=\"test_result\"} 3",
            "datafold_gateway_request_duration_seconds_bucket{le=\"0.0025\",route=\"test_result\"} 1",
            "datafold_gateway_request_duration_seconds_bucket{le=\"0.05\",route=\"test_result\"} 2",
            "datafold_gateway_request_duration_seconds_bucket{le=\"+Inf\",route=\"test_result\"} 3",
            "datafold_gateway_upstream_duration_seconds_count{route=\"test_result\"} 1",
            "datafold_gateway_caller_requests_total{caller=\"team-a\",outcome=\"forwarded\"} 2",
            "datafold_gateway_in_flight_requests 3",
            "datafold_gateway_headers_dropped_total{direction=\"request\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }
}
