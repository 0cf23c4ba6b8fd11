//! Rate limits and the audit trail, seen from a caller and from the audit file.

use crate::common;

use std::num::NonZeroU32;

use common::{json, Harness, API_KEY};
use datafold_gateway::config::RateLimit;

fn limit(rate: &str, burst: u32) -> Option<RateLimit> {
    Some(RateLimit {
        rate: rate.parse().unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
    })
}

fn retry_after(response: &http::Response<()>) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn global_limit_answers_429_with_retry_after_and_does_not_forward() {
    let mut h = Harness::start(|c| c.rate_limit.global = limit("2/min", 2)).await;
    assert_eq!(h.post("/api/v1/data_sources/1/test").await.0.status(), 200);
    assert_eq!(
        h.get("/api/v1/data_sources/test/1001").await.0.status(),
        200
    );
    let (response, body) = h.post("/api/v1/data_sources/2/test").await;
    assert_eq!(response.status(), 429);
    // One request earns back every 30 s: that, not the minute, is the wait.
    assert!(
        (1..=30).contains(&retry_after(&response)),
        "{:?}",
        response.headers()
    );
    let body = json(&body);
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["limit"], "global");
    assert_eq!(h.upstream.received().len(), 2);
    h.shutdown().await;
    let refused = h.audit().pop().unwrap();
    assert_eq!(refused["status"], 429);
    assert_eq!(refused["outcome"], "rate_limited");
    assert_eq!(refused["limit"], "global");
    assert_eq!(refused["upstream_status"], serde_json::Value::Null);
}

#[tokio::test]
async fn per_caller_limit_refuses_the_caller_by_name() {
    let mut h = Harness::start(|c| c.rate_limit.per_caller = limit("1/h", 1)).await;
    assert_eq!(h.post("/api/v1/data_sources/1/test").await.0.status(), 200);
    let (response, body) = h.get("/api/v1/data_sources/test/1001").await;
    assert_eq!(response.status(), 429);
    assert!((3590..=3600).contains(&retry_after(&response)));
    assert_eq!(json(&body)["limit"], "caller");
    h.shutdown().await;
    let refused = h.audit().pop().unwrap();
    assert_eq!(refused["limit"], "caller");
    assert_eq!(refused["caller"], "127.0.0.1");
}

#[tokio::test]
async fn per_data_source_limit_counts_test_starts_of_that_source_only() {
    let mut h = Harness::start(|c| c.rate_limit.per_data_source = limit("1/h", 1)).await;
    assert_eq!(h.post("/api/v1/data_sources/42/test").await.0.status(), 200);
    assert_eq!(h.post("/api/v1/data_sources/43/test").await.0.status(), 200);
    assert_eq!(
        h.get("/api/v1/data_sources/test/1001").await.0.status(),
        200
    );
    assert_eq!(
        h.get("/api/v1/data_sources/test/1001").await.0.status(),
        200
    );
    let (response, body) = h.post("/api/v1/data_sources/42/test").await;
    assert_eq!(response.status(), 429);
    assert!((3590..=3600).contains(&retry_after(&response)));
    assert_eq!(json(&body)["limit"], "data_source");
    assert_eq!(h.upstream.received().len(), 4);
    h.shutdown().await;
    let refused = h.audit().pop().unwrap();
    assert_eq!(refused["limit"], "data_source");
    assert_eq!(refused["data_source_id"], 42);
}

#[tokio::test]
async fn every_answer_is_audited_with_all_fields() {
    let mut h = Harness::start(|c| c.rate_limit.global = limit("1/h", 3)).await;
    let (_, body) = h.post("/api/v1/data_sources/42/test").await;
    let job_id = json(&body)["job_id"].as_i64().unwrap();
    h.get(&format!("/api/v1/data_sources/test/{job_id}")).await;
    h.get("/api/v1/data_sources/42").await; // 404
    h.get("/api/v1/data_sources/42/test").await; // 405
    h.post("/api/v1/data_sources/x/test").await; // 422
    h.post("/api/v1/data_sources/43/test").await; // third token
    h.post("/api/v1/data_sources/44/test").await; // 429
    h.shutdown().await;

    let audit = h.audit();
    assert_eq!(audit.len(), 7);
    let fields = [
        "ts",
        "request_id",
        "caller",
        "peer",
        "method",
        "path",
        "route",
        "data_source_id",
        "job_id",
        "status",
        "outcome",
        "limit",
        "upstream_status",
        "test_status",
        "test_steps",
        "duration_ms",
    ];
    for record in &audit {
        let object = record.as_object().unwrap();
        for field in fields {
            assert!(object.contains_key(field), "{field} missing in {record}");
        }
        assert_eq!(record["caller"], "127.0.0.1");
        assert!(record["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(record["ts"].as_str().unwrap().ends_with('Z'));
        assert!(record["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()));
        assert!(record["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(!record.to_string().contains(API_KEY));
    }
    let summary: Vec<_> = audit
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_owned(),
                r["route"].clone(),
                r["data_source_id"].clone(),
                r["job_id"].clone(),
                r["status"].as_u64().unwrap(),
                r["outcome"].as_str().unwrap().to_owned(),
                r["upstream_status"].clone(),
            )
        })
        .collect();
    use serde_json::json as j;
    let expected = vec![
        (
            "POST".into(),
            j!("test_connection"),
            j!(42),
            j!(job_id),
            200,
            "forwarded".into(),
            j!(200),
        ),
        (
            "GET".into(),
            j!("test_result"),
            // The poll carries the data source of the job it asks about.
            j!(42),
            j!(job_id),
            200,
            "forwarded".into(),
            j!(200),
        ),
        (
            "GET".into(),
            j!(null),
            j!(null),
            j!(null),
            404,
            "rejected".into(),
            j!(null),
        ),
        (
            "GET".into(),
            j!(null),
            j!(null),
            j!(null),
            405,
            "rejected".into(),
            j!(null),
        ),
        (
            "POST".into(),
            j!("test_connection"),
            j!(null),
            j!(null),
            422,
            "rejected".into(),
            j!(null),
        ),
        (
            "POST".into(),
            j!("test_connection"),
            j!(43),
            j!(job_id + 1),
            200,
            "forwarded".into(),
            j!(200),
        ),
        (
            "POST".into(),
            j!("test_connection"),
            j!(44),
            j!(null),
            429,
            "rate_limited".into(),
            j!(null),
        ),
    ];
    assert_eq!(summary, expected);
    assert_eq!(audit[2]["path"], "/api/v1/data_sources/42");
    assert_eq!(audit[6]["limit"], "global");
}

#[tokio::test]
async fn audit_record_is_written_before_the_answer_is_released() {
    let mut h = Harness::start(|_| {}).await;
    for i in 0..20 {
        h.post(&format!("/api/v1/data_sources/{i}/test")).await;
        // Read right after each answer, without shutting down: the record must be there.
        assert_eq!(h.audit().len(), i + 1);
    }
    h.shutdown().await;
}

#[tokio::test]
async fn oversized_and_shed_requests_are_audited_with_their_caller() {
    let mut h = Harness::start(|c| {
        c.limits.max_body_bytes = 16;
        c.limits.max_concurrent_requests = 1;
    })
    .await;
    let request = http::Request::post(h.url("/api/v1/data_sources/9/test"))
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            b'x';
            64
        ])))
        .unwrap();
    assert_eq!(h.send(request).await.0.status(), 413);
    // One request held at the upstream takes the only slot, so the next one is shed.
    h.upstream.close_gate();
    let holding = h.spawn_post("/api/v1/data_sources/10/test");
    common::held_at_gate(&h.upstream, 1).await;
    assert_eq!(h.post("/api/v1/data_sources/11/test").await.0.status(), 503);
    h.upstream.open_gate();
    assert_eq!(holding.await.unwrap().unwrap(), 200);
    h.shutdown().await;
    let audit = h.audit();
    for (status, data_source_id) in [(413, 9), (503, 11)] {
        let record = audit
            .iter()
            .find(|r| r["status"] == status)
            .unwrap_or_else(|| panic!("no {status} record: {audit:?}"));
        assert_eq!(record["outcome"], "rejected", "{record}");
        assert_eq!(record["caller"], "127.0.0.1", "{record}");
        assert_eq!(record["route"], "test_connection", "{record}");
        assert_eq!(record["data_source_id"], data_source_id, "{record}");
    }
}
