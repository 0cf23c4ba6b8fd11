//! Prometheus metrics, served on the admin listener at `/metrics` (OpenMetrics text format,
//! encoded by `prometheus-client`).
//!
//! Label values come from small fixed sets (routes, statuses, outcomes, limits, error kinds) or,
//! for `caller`, from names the config lists (token entries, `callers.allow`). Peer addresses,
//! data source ids and unlisted certificate names never become labels: their number is unbounded.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

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

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

type DurationFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Every metric the gateway keeps; cheap to clone (each metric is shared inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: DurationFamily,
    pub upstream_duration: DurationFamily,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub key_reloads: Family<ResultLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub audit_write_errors: Counter,
    pub in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub caller_requests: Family<CallerLabels, Counter>,
    pub headers_dropped: Family<DirectionLabels, Counter>,
    pub audit_suppressed: Counter,
    pub tls_handshake_failures: Counter,
    pub upstream_retries: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            upstream_duration: Family::new_with_constructor(duration_histogram),
            rate_limited: Family::default(),
            upstream_errors: Family::default(),
            key_reloads: Family::default(),
            config_reloads: Family::default(),
            audit_write_errors: Counter::<u64, AtomicU64>::default(),
            in_flight: Gauge::default(),
            caller_requests: Family::default(),
            headers_dropped: Family::default(),
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
            "requests",
            "Requests answered on the main listener",
            self.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its answer",
            self.request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time of the exchange with Datafold, for forwarded requests",
            self.upstream_duration.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit",
            self.rate_limited.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed exchanges with Datafold, by kind",
            self.upstream_errors.clone(),
        );
        registry.register(
            "key_reloads",
            "Attempts to load a new API key (SIGHUP or a change in the key file's folder)",
            self.key_reloads.clone(),
        );
        registry.register(
            "config_reloads",
            "Attempts to reload [callers] and [rate_limit] on SIGHUP",
            self.config_reloads.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Batches of audit records that could not be written",
            self.audit_write_errors.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being handled now",
            self.in_flight.clone(),
        );
        registry.register(
            "caller_requests",
            "Requests by authenticated caller (names from the config only)",
            self.caller_requests.clone(),
        );
        registry.register(
            "headers_dropped",
            "Header values not on an allow-list, dropped; direction is request (to Datafold) or response (to the caller)",
            self.headers_dropped.clone(),
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
        metrics
            .requests
            .get_or_create(&RequestLabels {
                route: "test_connection",
                status: 200,
                outcome: "forwarded",
            })
            .inc();
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
}
