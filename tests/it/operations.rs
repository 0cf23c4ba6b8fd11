//! What an operator relies on: metrics that move, key rotation without a restart, audit file
//! reopening, and what happens while the audit cannot be written.

use crate::common;

use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{config_for, json, sample, Harness, API_KEY};
use datafold_gateway::audit::chain::{self, IntegrityKey};
use datafold_gateway::cli::standin::{StandIn, ThrowawayCa};
use datafold_gateway::config::{
    ApiKeySource, CallerMode, OnAuditFailure, RateLimit, TokenCaller, TokenDigest,
};

const NEW_KEY: &str = "dfk_live_ROTATED_0c4e8a2b6d1f9357";
const START: &str = "/api/v1/data_sources/42/test";

#[tokio::test]
async fn request_metrics_move_with_requests_and_name_no_peer() {
    let h = Harness::start(|c| {
        c.rate_limit.global = Some(RateLimit {
            rate: "1/h".parse().unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
        })
    })
    .await;
    let before = h.metrics().await;
    assert_eq!(
        sample(&before, "datafold_gateway_in_flight_requests"),
        Some(0.0)
    );
    assert!(
        before.contains("datafold_gateway_build_info{version=\""),
        "{before}"
    );

    assert_eq!(h.post(START).await.0.status(), 200);
    assert_eq!(h.post(START).await.0.status(), 429);
    assert_eq!(h.get("/api/v1/data_sources").await.0.status(), 404);
    let after = h.metrics().await;
    for (name, value) in [
        (
            r#"datafold_gateway_requests_total{route="test_connection",status="200",outcome="forwarded"}"#,
            1.0,
        ),
        (
            r#"datafold_gateway_requests_total{route="test_connection",status="429",outcome="rate_limited"}"#,
            1.0,
        ),
        (
            r#"datafold_gateway_requests_total{route="none",status="404",outcome="rejected"}"#,
            1.0,
        ),
        (
            r#"datafold_gateway_rate_limited_total{limit="global"}"#,
            1.0,
        ),
        (
            r#"datafold_gateway_request_duration_seconds_count{route="test_connection"}"#,
            2.0,
        ),
        (
            r#"datafold_gateway_upstream_duration_seconds_count{route="test_connection"}"#,
            1.0,
        ),
        ("datafold_gateway_in_flight_requests", 0.0),
        ("datafold_gateway_audit_write_errors_total", 0.0),
    ] {
        assert_eq!(sample(&after, name), Some(value), "{name} in:\n{after}");
    }
    // Open mode: callers are peer addresses, whose number has no bound; never a label.
    assert!(!after.contains("127.0.0.1"), "{after}");
    assert!(!after.contains("caller_requests_total{"), "{after}");
}

#[tokio::test]
async fn upstream_errors_are_counted_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("test CA").unwrap();
    let upstream = StandIn::start(ca.server_config(&["127.0.0.1"]).unwrap(), API_KEY)
        .await
        .unwrap();
    // A port nothing listens on: bind one, note it, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = config_for(dir.path(), &ca, &format!("https://{closed}"));
    let h = Harness::start_with(dir, ca, upstream, config).await;
    assert_eq!(h.post(START).await.0.status(), 502);
    let text = h.metrics().await;
    assert_eq!(
        sample(
            &text,
            r#"datafold_gateway_upstream_errors_total{kind="connect"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"datafold_gateway_requests_total{route="test_connection",status="502",outcome="upstream_error"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn token_caller_names_are_metric_labels() {
    let h = Harness::start(|c| {
        c.callers.mode = CallerMode::Token;
        c.callers.tokens = vec![TokenCaller {
            name: "analytics".into(),
            sha256: TokenDigest::of(b"dfgw_metrics_token"),
            rate: None,
            burst: None,
        }];
    })
    .await;
    let request = http::Request::post(h.url(START))
        .header("authorization", "Bearer dfgw_metrics_token")
        .body(Default::default())
        .unwrap();
    assert_eq!(h.send(request).await.0.status(), 200);
    let text = h.metrics().await;
    assert_eq!(
        sample(
            &text,
            r#"datafold_gateway_caller_requests_total{caller="analytics",outcome="forwarded"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("dfgw_metrics_token"));
}

/// A stand-in that accepts only `NEW_KEY`, and a gateway that starts with `API_KEY` from the
/// file `key_file` (relative to the test folder) that `prepare` set up.
async fn rotation_setup(prepare: impl FnOnce(&Path) -> std::path::PathBuf) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("test CA").unwrap();
    let upstream = StandIn::start(ca.server_config(&["127.0.0.1"]).unwrap(), NEW_KEY)
        .await
        .unwrap();
    let mut config = config_for(dir.path(), &ca, &upstream.url());
    config.api_key = ApiKeySource::File(prepare(dir.path()));
    Harness::start_with(dir, ca, upstream, config).await
}

/// `datafold_gateway_key_reloads_total` for `result`.
async fn key_reloads(h: &Harness, result: &str) -> Option<f64> {
    let text = h.metrics().await;
    sample(
        &text,
        &format!(r#"datafold_gateway_key_reloads_total{{result="{result}"}}"#),
    )
}

/// The upstream's answer to a test start: 401 while the old key is in use, 200 with the new.
async fn upstream_status(h: &Harness) -> u16 {
    h.post(START).await.0.status().as_u16()
}

async fn ready(h: &Harness) -> u16 {
    let request = http::Request::get(format!("http://{}/readyz", h.admin))
        .body(Default::default())
        .unwrap();
    h.send(request).await.0.status().as_u16()
}

#[tokio::test]
async fn reload_puts_a_new_key_in_effect_and_counts_it() {
    let h = rotation_setup(|dir| {
        let path = dir.join("api-key");
        std::fs::write(&path, format!("{API_KEY}\n")).unwrap();
        path
    })
    .await;
    assert_eq!(
        upstream_status(&h).await,
        401,
        "the old key is refused upstream"
    );
    // Written in place, then reloaded as SIGHUP does it (the folder watch may beat us to it).
    std::fs::write(h.dir.path().join("api-key"), format!("{NEW_KEY}\n")).unwrap();
    h.control.reload_key().await.unwrap();
    assert_eq!(upstream_status(&h).await, 200);
    assert_eq!(key_reloads(&h, "success").await, Some(1.0));
}

#[tokio::test]
async fn an_empty_or_missing_new_key_is_refused_and_the_old_one_kept() {
    let h = rotation_setup(|dir| {
        let path = dir.join("api-key");
        std::fs::write(&path, format!("{NEW_KEY}\n")).unwrap();
        path
    })
    .await;
    let key_file = h.dir.path().join("api-key");
    std::fs::write(&key_file, "\n").unwrap();
    let err = h.control.reload_key().await.unwrap_err().to_string();
    assert!(err.contains("api-key") && err.contains("empty"), "{err}");
    assert!(!err.contains(NEW_KEY));
    std::fs::remove_file(&key_file).unwrap();
    let err = h.control.reload_key().await.unwrap_err().to_string();
    assert!(err.contains("api-key"), "{err}");
    assert_eq!(
        upstream_status(&h).await,
        200,
        "the old key is still in use"
    );
    assert_eq!(ready(&h).await, 200);
    let text = h.metrics().await;
    let failures = sample(
        &text,
        r#"datafold_gateway_key_reloads_total{result="failure"}"#,
    );
    // The folder watch may have tried too; each attempt counts.
    assert!(failures.is_some_and(|n| n >= 2.0), "{text}");
}

/// Lays out a folder the way the kubelet mounts a Secret: the key is a symlink through
/// `..data`, itself a symlink to a timestamped folder.
fn kubelet_secret(folder: &Path, version: &str, key: &str) {
    let versioned = folder.join(format!("..{version}"));
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("api-key"), format!("{key}\n")).unwrap();
    let tmp = folder.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    // The swap itself: one rename over the old `..data` link.
    std::fs::rename(&tmp, folder.join("..data")).unwrap();
    let link = folder.join("api-key");
    if !link.exists() {
        std::os::unix::fs::symlink("..data/api-key", &link).unwrap();
    }
}

#[tokio::test]
async fn a_kubelet_style_symlink_swap_is_picked_up_without_a_signal() {
    let h = rotation_setup(|dir| {
        let secret = dir.join("secret");
        std::fs::create_dir(&secret).unwrap();
        kubelet_secret(&secret, "2026_12_01_10_00_00.1", API_KEY);
        secret.join("api-key")
    })
    .await;
    assert_eq!(upstream_status(&h).await, 401);
    kubelet_secret(
        &h.dir.path().join("secret"),
        "2026_12_01_11_00_00.2",
        NEW_KEY,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream_status(&h).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the swapped key was not picked up within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(key_reloads(&h, "success").await, Some(1.0));
}

#[tokio::test]
async fn refuse_mode_stops_forwarding_while_the_audit_cannot_be_written() {
    let mut h = Harness::start(|c| {
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        c.audit.file = "/dev/full".into();
        c.audit.on_failure = OnAuditFailure::Refuse;
    })
    .await;
    // The first request's record is the first to fail: it was forwarded already.
    assert_eq!(h.post(START).await.0.status(), 200);
    let (response, body) = h.post(START).await;
    assert_eq!(response.status(), 503);
    assert_eq!(json(&body)["code"], "audit_unavailable");
    assert_eq!(
        h.upstream.received().len(),
        1,
        "nothing forwarded unaudited"
    );
    // Out of rotation until records can be written again.
    assert_eq!(ready(&h).await, 503);
    let text = h.metrics().await;
    assert!(sample(&text, "datafold_gateway_audit_write_errors_total").is_some_and(|n| n >= 2.0));
    h.shutdown().await;
}

#[tokio::test]
async fn continue_mode_forwards_and_counts_failed_writes() {
    let mut h = Harness::start(|c| {
        c.audit.file = "/dev/full".into();
        c.audit.on_failure = OnAuditFailure::Continue;
    })
    .await;
    for _ in 0..3 {
        assert_eq!(h.post(START).await.0.status(), 200);
    }
    assert_eq!(h.upstream.received().len(), 3);
    let text = h.metrics().await;
    assert_eq!(
        sample(&text, "datafold_gateway_audit_write_errors_total"),
        Some(3.0),
        "{text}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn forwarding_resumes_once_a_reopened_audit_file_takes_records() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("audit.jsonl");
    std::os::unix::fs::symlink("/dev/full", &link).unwrap();
    let mut h = Harness::start(|c| c.audit.file = link.clone()).await;
    assert_eq!(h.post(START).await.0.status(), 200);
    assert_eq!(h.post(START).await.0.status(), 503);
    // The disk is fixed: the path now leads to a real file, and the file is reopened.
    std::fs::remove_file(&link).unwrap();
    h.control.reopen_audit().await.unwrap();
    // The first request after the failure is refused, but its record is written...
    assert_eq!(h.post(START).await.0.status(), 503);
    // ...and from then on requests are forwarded again.
    assert_eq!(h.post(START).await.0.status(), 200);
    h.shutdown().await;
    let records = common::read_audit(&link);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["status"], 503);
    assert_eq!(records[1]["status"], 200);
}

#[tokio::test]
async fn a_request_in_flight_keeps_the_key_it_started_with() {
    let h = Harness::start(|_| {}).await;
    h.upstream.close_gate();
    let in_flight = h.spawn_post(START);
    common::held_at_gate(&h.upstream, 1).await;
    // Rotated while the request waits on Datafold; the stand-in only knows the old key.
    let key_file = h.dir.path().join("datafold-api-key");
    std::fs::write(&key_file, format!("{NEW_KEY}\n")).unwrap();
    // (The folder watch may get there first; either way the new key is in effect after this.)
    h.control.reload_key().await.unwrap();
    h.upstream.open_gate();
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    assert_eq!(
        upstream_status(&h).await,
        401,
        "new requests carry the new key"
    );
    let received = h.upstream.received();
    assert_eq!(
        received[0].headers["authorization"],
        format!("Key {API_KEY}").as_str()
    );
    assert_eq!(
        received[1].headers["authorization"],
        format!("Key {NEW_KEY}").as_str()
    );
}

const AUDIT_KEY: &str = "audit-integrity-FIRST-5b1d";
const NEXT_AUDIT_KEY: &str = "audit-integrity-NEXT-93c0";

/// The link each line of the audit file holds, and the one its own bytes give after the line
/// before under `key`.
fn links(path: &Path, key: &IntegrityKey) -> Vec<(Vec<u8>, Vec<u8>)> {
    let text = std::fs::read(path).unwrap();
    let mut prev: Option<Vec<u8>> = None;
    let mut found = Vec::new();
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let (open, link) = chain::split(line).expect("every record carries a chain link");
        let expected = chain::link_of_parts(prev.as_deref(), open, Some(key));
        found.push((link.to_vec(), expected.to_vec()));
        prev = Some(link.to_vec());
    }
    found
}

#[tokio::test]
async fn the_audit_chain_is_keyed_by_its_key_file_and_a_new_key_is_taken_on_reload() {
    let h = Harness::start_in(|dir, _, config| {
        let key_file = dir.join("audit-integrity.key");
        std::fs::write(&key_file, format!("{AUDIT_KEY}\n")).unwrap();
        config.audit.integrity_key_file = Some(key_file);
    })
    .await;
    assert_eq!(h.post(START).await.0.status(), 200);
    let key_file = h.dir.path().join("audit-integrity.key");
    std::fs::write(&key_file, "  \n").unwrap();
    let err = h
        .control
        .reload_integrity_key()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("audit.integrity_key_file") && err.contains("empty"),
        "{err}"
    );
    std::fs::write(&key_file, NEXT_AUDIT_KEY).unwrap();
    h.control.reload_integrity_key().await.unwrap();
    assert_eq!(h.post(START).await.0.status(), 200);

    let first = IntegrityKey::from_file_bytes(AUDIT_KEY.as_bytes()).unwrap();
    let next = IntegrityKey::from_file_bytes(NEXT_AUDIT_KEY.as_bytes()).unwrap();
    let under_first = links(&h.audit_file, &first);
    let under_next = links(&h.audit_file, &next);
    assert_eq!(under_first.len(), 2);
    // The first record under the first key; the second under the new key, linked to the first.
    assert_eq!(under_first[0].0, under_first[0].1);
    assert_ne!(under_first[1].0, under_first[1].1);
    assert_eq!(under_next[1].0, under_next[1].1);
    let text = std::fs::read_to_string(&h.audit_file).unwrap();
    assert!(!text.contains(AUDIT_KEY) && !text.contains(NEXT_AUDIT_KEY));
}

#[test]
fn a_missing_or_empty_integrity_key_file_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("test CA").unwrap();
    let mut config = config_for(dir.path(), &ca, "https://127.0.0.1:1");
    let key_file = dir.path().join("audit-integrity.key");
    config.audit.integrity_key_file = Some(key_file.clone());
    let err = datafold_gateway::gateway::prepare(&config)
        .err()
        .unwrap()
        .to_string();
    assert!(err.starts_with("audit.integrity_key_file:"), "{err}");
    assert!(err.contains("audit-integrity.key"), "{err}");
    std::fs::write(&key_file, "\n").unwrap();
    let err = datafold_gateway::gateway::prepare(&config)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is empty"), "{err}");
}
