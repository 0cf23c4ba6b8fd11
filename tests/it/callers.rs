//! Authenticated callers over real TLS: bearer tokens, client certificates, per-caller limits
//! and job ownership.

use crate::common;

use std::num::NonZeroU32;

use bytes::Bytes;
use common::{json, send_with, tls_client, Harness, TlsClient, API_KEY};
use datafold_gateway::cli::standin::ThrowawayCa;
use datafold_gateway::config::{CallerMode, Config, RateLimit, TokenCaller, TokenDigest};
use http::{Request, Version};
use http_body_util::Full;

const ANALYTICS_TOKEN: &str = "dfgw_analytics_6c1e2b9f04d7a385";
const BILLING_TOKEN: &str = "dfgw_billing_0a9d8e7f6c5b4a39";

/// A gateway with TLS on its listener (certificate for 127.0.0.1 from the harness CA), set up
/// further by `customize`, which gets the folder to write files into.
async fn start_tls(customize: impl FnOnce(&std::path::Path, &ThrowawayCa, &mut Config)) -> Harness {
    Harness::start_in(|dir, ca, config| {
        let (cert, key) = (dir.join("gw.pem"), dir.join("gw-key.pem"));
        ca.issue(&["127.0.0.1"])
            .unwrap()
            .write(&cert, &key)
            .unwrap();
        config.listen.tls_cert = Some(cert);
        config.listen.tls_key = Some(key);
        customize(dir, ca, config);
    })
    .await
}

fn token_entry(name: &str, token: &str) -> TokenCaller {
    TokenCaller {
        name: name.into(),
        sha256: TokenDigest::of(token.as_bytes()),
        rate: None,
        burst: None,
    }
}

/// Token mode with two callers, `analytics` and `billing`.
async fn start_token(customize: impl FnOnce(&mut Config)) -> (Harness, TlsClient) {
    let gateway = start_tls(|_, _, config| {
        config.callers.mode = CallerMode::Token;
        config.callers.tokens = vec![
            token_entry("analytics", ANALYTICS_TOKEN),
            token_entry("billing", BILLING_TOKEN),
        ];
        customize(config);
    })
    .await;
    let client = tls_client(&gateway.ca, None, false);
    (gateway, client)
}

/// mTLS mode; client certificates come from the harness CA.
async fn start_mtls(allow: Option<&[&str]>) -> Harness {
    start_tls(|dir, ca, config| {
        let client_ca = dir.join("client-ca.pem");
        ca.write_cert(&client_ca).unwrap();
        config.listen.client_ca = Some(client_ca);
        config.callers.mode = CallerMode::Mtls;
        config.callers.allow = allow.map(|names| names.iter().map(|n| n.to_string()).collect());
    })
    .await
}

fn url(gateway: &Harness, path: &str) -> String {
    format!("https://{}{}", gateway.addr, path)
}

fn request(
    gateway: &Harness,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut request = Request::builder().method(method).uri(url(gateway, path));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = if method == "POST" {
        Bytes::from_static(b"{}")
    } else {
        Bytes::new()
    };
    request.body(Full::new(body)).unwrap()
}

async fn call(
    gateway: &Harness,
    client: &TlsClient,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let (response, body) = send_with(client, request(gateway, method, path, token))
        .await
        .unwrap();
    let value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        json(&body)
    };
    (response.status().as_u16(), value)
}

/// Starts a connection test with `client`'s certificate (if any) and no token.
async fn post_test(
    gateway: &Harness,
    client: &TlsClient,
) -> Result<(http::Response<()>, Bytes), hyper_util::client::legacy::Error> {
    let path = "/api/v1/data_sources/8/test";
    send_with(client, request(gateway, "POST", path, None)).await
}

/// Starts a test as `token`'s caller and returns its job id.
async fn start_job(gateway: &Harness, client: &TlsClient, data_source: i64, token: &str) -> i64 {
    let (status, body) = call(
        gateway,
        client,
        "POST",
        &format!("/api/v1/data_sources/{data_source}/test"),
        Some(token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["job_id"].as_i64().unwrap()
}

#[tokio::test]
async fn known_token_is_forwarded_with_the_key_and_audited_by_name() {
    let (gateway, client) = start_token(|_| {}).await;
    start_job(&gateway, &client, 42, ANALYTICS_TOKEN).await;
    let received = gateway.upstream.received();
    assert_eq!(received.len(), 1);
    let authorization: Vec<_> = received[0]
        .headers
        .get_all("authorization")
        .iter()
        .collect();
    assert_eq!(authorization, [format!("Key {API_KEY}").as_str()]);
    let upstream_request = format!("{:?}", received[0].headers);
    assert!(
        !upstream_request.contains(ANALYTICS_TOKEN),
        "{upstream_request}"
    );
    let audit = gateway.audit();
    assert_eq!(audit[0]["caller"], "analytics");
    assert_eq!(audit[0]["outcome"], "forwarded");
    assert_eq!(audit[0]["data_source_id"], 42);
}

#[tokio::test]
async fn missing_or_unknown_token_is_401_with_www_authenticate_and_goes_nowhere() {
    let (mut gateway, client) = start_token(|_| {}).await;
    let path = "/api/v1/data_sources/42/test";
    let scheme_only = request(&gateway, "POST", path, None);
    let mut basic = request(&gateway, "POST", path, None);
    basic
        .headers_mut()
        .insert("authorization", "Basic YW5hbHl0aWNzOnB3".parse().unwrap());
    for (request, what) in [
        (scheme_only, "no token"),
        (
            request(&gateway, "POST", path, Some("dfgw_not_a_known_token")),
            "unknown token",
        ),
        (
            request(&gateway, "POST", path, Some(&ANALYTICS_TOKEN[..10])),
            "token prefix",
        ),
        (basic, "basic credentials"),
    ] {
        let (response, body) = send_with(&client, request).await.unwrap();
        assert_eq!(response.status(), 401, "{what}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{what}");
        assert_eq!(json(&body)["code"], "unauthorized", "{what}");
    }
    assert!(gateway.upstream.received().is_empty());
    // Strangers' refusals are sampled: one record of their own per peer and second, the rest
    // in a summary (written at the latest at shutdown). Together they count every refusal.
    gateway.shutdown().await;
    let audit = gateway.audit();
    let refusals: u64 = audit
        .iter()
        .map(|r| r["suppressed"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(refusals, 4, "{audit:?}");
    for record in audit {
        assert_eq!(record["caller"], serde_json::Value::Null);
        assert_eq!(record["outcome"], "rejected");
        assert_eq!(record["status"], 401);
    }
}

#[tokio::test]
async fn a_token_callers_own_rate_overrides_per_caller() {
    let (gateway, client) = start_token(|config| {
        config.rate_limit.per_caller = Some(RateLimit {
            rate: "1/h".parse().unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
        });
        config.callers.tokens[0].burst = NonZeroU32::new(3);
    })
    .await;
    let path = "/api/v1/data_sources/1/test";
    for _ in 0..3 {
        assert_eq!(
            call(&gateway, &client, "POST", path, Some(ANALYTICS_TOKEN))
                .await
                .0,
            200
        );
    }
    let (status, body) = call(&gateway, &client, "POST", path, Some(ANALYTICS_TOKEN)).await;
    assert_eq!((status, body["limit"].as_str()), (429, Some("caller")));
    // billing has the shared per_caller limit: a burst of one.
    assert_eq!(
        call(&gateway, &client, "POST", path, Some(BILLING_TOKEN))
            .await
            .0,
        200
    );
    assert_eq!(
        call(&gateway, &client, "POST", path, Some(BILLING_TOKEN))
            .await
            .0,
        429
    );
}

#[tokio::test]
async fn callers_read_their_own_jobs_with_test_outcome_audited() {
    let (gateway, client) = start_token(|_| {}).await;
    let good = start_job(&gateway, &client, 42, ANALYTICS_TOKEN).await;
    let broken = start_job(&gateway, &client, 13, ANALYTICS_TOKEN).await;
    for (job, status) in [(good, "done"), (broken, "failed")] {
        let path = format!("/api/v1/data_sources/test/{job}");
        let (code, body) = call(&gateway, &client, "GET", &path, Some(ANALYTICS_TOKEN)).await;
        assert_eq!(code, 200);
        assert_eq!(body["status"], status);
    }
    let audit = gateway.audit();
    let polls: Vec<_> = audit
        .iter()
        .filter(|r| r["route"] == "test_result")
        .collect();
    assert_eq!(polls.len(), 2);
    assert_eq!(polls[0]["caller"], "analytics");
    assert_eq!(polls[0]["job_id"], good);
    assert_eq!(polls[0]["data_source_id"], 42);
    assert_eq!(polls[0]["test_status"], "done");
    assert_eq!(
        polls[0]["test_steps"],
        serde_json::json!({"connection": "done", "temp_schema": "done"})
    );
    assert_eq!(polls[1]["data_source_id"], 13);
    assert_eq!(polls[1]["test_status"], "failed");
    assert_eq!(polls[1]["test_steps"]["connection"], "failed");
    // A test start has no test outcome yet.
    assert_eq!(audit[0]["test_status"], serde_json::Value::Null);
    assert_eq!(audit[0]["test_steps"], serde_json::Value::Null);
}

#[tokio::test]
async fn another_callers_job_and_an_unknown_job_are_both_404() {
    let (gateway, client) = start_token(|_| {}).await;
    let job = start_job(&gateway, &client, 42, ANALYTICS_TOKEN).await;
    let others = call(
        &gateway,
        &client,
        "GET",
        &format!("/api/v1/data_sources/test/{job}"),
        Some(BILLING_TOKEN),
    )
    .await;
    let unknown = call(
        &gateway,
        &client,
        "GET",
        &format!("/api/v1/data_sources/test/{}", job + 1000),
        Some(BILLING_TOKEN),
    )
    .await;
    assert_eq!(others.0, 404);
    assert_eq!(others.1["code"], "not_found");
    // The two answers are the same: nothing says the first job exists.
    assert_eq!(others, unknown);
    assert_eq!(
        gateway.upstream.received().len(),
        1,
        "only the test start went upstream"
    );
    let audit = gateway.audit();
    assert_eq!(audit[1]["caller"], "billing");
    assert_eq!(audit[1]["outcome"], "rejected");
    assert_eq!(audit[1]["job_id"], job);
    assert_eq!(
        audit[1]["data_source_id"], 42,
        "the auditor learns whose job it was"
    );
    assert_eq!(audit[2]["outcome"], "rejected");
    assert_eq!(audit[2]["data_source_id"], serde_json::Value::Null);
}

#[tokio::test]
async fn share_results_lets_any_caller_read_any_job() {
    let (gateway, client) = start_token(|config| config.callers.share_results = true).await;
    let job = start_job(&gateway, &client, 42, ANALYTICS_TOKEN).await;
    let path = format!("/api/v1/data_sources/test/{job}");
    let (status, body) = call(&gateway, &client, "GET", &path, Some(BILLING_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "done");
    let audit = gateway.audit();
    assert_eq!(audit[1]["caller"], "billing");
    assert_eq!(audit[1]["data_source_id"], 42);
}

#[tokio::test]
async fn tls_listener_speaks_http1_and_h2_by_alpn() {
    let gateway = start_tls(|_, _, _| {}).await;
    for (http2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let client = tls_client(&gateway.ca, None, http2);
        let (response, _) = send_with(
            &client,
            request(&gateway, "POST", "/api/v1/data_sources/5/test", None),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
    }
    assert_eq!(
        gateway.audit()[0]["caller"],
        "127.0.0.1",
        "open mode: the peer IP"
    );
}

#[tokio::test]
async fn client_certificate_names_the_caller_by_dns_name_else_cn() {
    let gateway = start_mtls(None).await;
    for (dns, cn, expected) in [
        (
            &["analytics", "analytics.corp"][..],
            Some("ignored"),
            "analytics",
        ),
        (&[][..], Some("ci-runner"), "ci-runner"),
    ] {
        let identity = gateway.ca.issue_client(dns, cn).unwrap();
        let client = tls_client(&gateway.ca, Some(&identity), false);
        let (response, _) = post_test(&gateway, &client).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(gateway.audit().last().unwrap()["caller"], expected);
    }
}

#[tokio::test]
async fn handshake_without_a_trusted_client_certificate_fails() {
    let gateway = start_mtls(None).await;
    let stranger_ca = ThrowawayCa::new("someone else's CA").unwrap();
    let untrusted = stranger_ca.issue_client(&["analytics"], None).unwrap();
    for identity in [None, Some(&untrusted)] {
        let client = tls_client(&gateway.ca, identity, false);
        let result = post_test(&gateway, &client).await;
        assert!(result.is_err(), "served without a trusted certificate");
    }
    assert!(gateway.upstream.received().is_empty());
    // With TLS 1.3 the client may read the server's alert before the server has counted the
    // failure: wait for the count, within a bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = gateway.metrics().await;
        let failures = common::sample(&text, "datafold_gateway_tls_handshake_failures_total");
        if failures == Some(2.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && failures < Some(2.0),
            "{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn identities_outside_allow_are_403() {
    let gateway = start_mtls(Some(&["analytics"])).await;
    let billing = gateway.ca.issue_client(&["billing"], None).unwrap();
    let client = tls_client(&gateway.ca, Some(&billing), false);
    let (response, body) = post_test(&gateway, &client).await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(json(&body)["code"], "forbidden");
    assert!(gateway.upstream.received().is_empty());
    let audit = gateway.audit();
    assert_eq!(audit[0]["caller"], "billing");
    assert_eq!(audit[0]["outcome"], "rejected");

    let analytics = gateway.ca.issue_client(&["analytics"], None).unwrap();
    let client = tls_client(&gateway.ca, Some(&analytics), false);
    let (response, _) = post_test(&gateway, &client).await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn mtls_callers_own_their_jobs() {
    let gateway = start_mtls(None).await;
    let analytics = tls_client(
        &gateway.ca,
        Some(&gateway.ca.issue_client(&["analytics"], None).unwrap()),
        false,
    );
    let billing = tls_client(
        &gateway.ca,
        Some(&gateway.ca.issue_client(&["billing"], None).unwrap()),
        false,
    );
    let (_, body) = call(
        &gateway,
        &analytics,
        "POST",
        "/api/v1/data_sources/3/test",
        None,
    )
    .await;
    let path = format!("/api/v1/data_sources/test/{}", body["job_id"]);
    assert_eq!(call(&gateway, &analytics, "GET", &path, None).await.0, 200);
    assert_eq!(call(&gateway, &billing, "GET", &path, None).await.0, 404);
}
