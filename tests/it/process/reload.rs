//! Changes while running: SIGHUP reloads callers and the key, SIGUSR1 reopens the audit file,
//! and a replaced config file is picked up without a signal.

use std::path::Path;
use std::time::Duration;

use super::harness::{rewrite_config, send, setup, token_callers};
use crate::common::serve::Served;
use crate::common::{read_audit, API_KEY};

#[tokio::test]
async fn sighup_adds_and_revokes_token_callers() {
    const ANALYTICS: &str = "dfgw_sighup_analytics_token";
    const BILLING: &str = "dfgw_sighup_billing_token";
    let before = token_callers(&[("analytics", ANALYTICS)]);
    let setup = setup(&before).await;
    let served = Served::start(&setup.config, &[]);
    let start = |token: &'static str| {
        let addr = served.addr.clone();
        async move {
            let bearer = format!("Bearer {token}");
            send(
                &addr,
                "POST",
                "/api/v1/data_sources/1/test",
                &[("authorization", &bearer)],
            )
            .await
        }
    };
    assert_eq!(start(ANALYTICS).await, 200);
    assert_eq!(start(BILLING).await, 401);

    // billing added, analytics revoked.
    rewrite_config(&setup, &before, &token_callers(&[("billing", BILLING)]));
    served.signal(libc::SIGHUP);
    // The folder watch may reload first; the signal's own reload follows its log line.
    served.wait_for_log("reloading (SIGHUP)");
    served.wait_for_log("[callers] and [rate_limit] reloaded");
    assert_eq!(start(BILLING).await, 200);
    assert_eq!(start(ANALYTICS).await, 401);

    // A broken file is refused whole: billing stays in.
    rewrite_config(
        &setup,
        &token_callers(&[("billing", BILLING)]),
        "[callers]\nmode = \"token\"\n[[callers.token]]\nname = \"x\"\nsha256 = \"not hex\"\n",
    );
    served.signal(libc::SIGHUP);
    served.wait_for_log("reloading (SIGHUP)");
    let refused =
        served.wait_for_log("configuration not reloaded; the previous one stays in effect");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("callers.token[0].sha256")),
        "{refused}"
    );
    assert_eq!(start(BILLING).await, 200);
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success(), "{status}");
    assert!(!log.contains(BILLING) && !log.contains(ANALYTICS));
}

#[tokio::test]
async fn sighup_rotates_the_key_from_its_file() {
    const NEW_KEY: &str = "dfk_live_SIGHUP_ROTATED_5e7a1c";
    let setup = setup("").await;
    let key_file = setup.dir.path().join("datafold-api-key");
    let served = Served::start(&setup.config, &[]);
    assert_eq!(
        send(&served.addr, "POST", "/api/v1/data_sources/1/test", &[]).await,
        200
    );
    // The stand-in only knows API_KEY: after the rotation, Datafold itself refuses (401).
    std::fs::write(&key_file, format!("{NEW_KEY}\n")).unwrap();
    served.signal(libc::SIGHUP);
    // The folder watch may get to the key first; either way it is in effect once the
    // signal's reload, which does the key first, has moved on to the config.
    served.wait_for_log("reloading (SIGHUP)");
    served.wait_for_log("[callers] and [rate_limit] reloaded");
    assert_eq!(
        send(&served.addr, "POST", "/api/v1/data_sources/1/test", &[]).await,
        401
    );
    let received = setup.upstream.received();
    assert_eq!(
        received.last().unwrap().headers["authorization"],
        format!("Key {NEW_KEY}").as_str()
    );
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success());
    assert!(!log.contains(NEW_KEY) && !log.contains(API_KEY));
}

#[tokio::test]
async fn sigusr1_reopens_the_audit_file_without_losing_records_in_flight() {
    let setup = setup("").await;
    let served = Served::start(&setup.config, &[]);
    let audit = setup.dir.path().join("audit.jsonl");
    let rotated = setup.dir.path().join("audit.jsonl.1");
    // Requests keep flowing from four callers while the file is rotated under them.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let addr = served.addr.clone();
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut answered = 0u32;
                while !*stop.borrow() {
                    assert_eq!(
                        send(&addr, "POST", "/api/v1/data_sources/5/test", &[]).await,
                        200
                    );
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    // Whole lines only: a line being written is not counted, nor parsed.
    let lines = |path: &Path| {
        std::fs::read(path).map_or(0, |bytes| bytes.iter().filter(|b| **b == b'\n').count())
    };
    while lines(&audit) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::rename(&audit, &rotated).unwrap();
    served.signal(libc::SIGUSR1);
    served.wait_for_log("audit file reopened");
    while lines(&audit) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send(true).unwrap();
    let mut answered = 0;
    for sender in senders {
        answered += sender.await.unwrap();
    }
    served.terminate();
    let (status, _) = served.wait();
    assert!(status.success());
    let (old, new) = (read_audit(&rotated).len(), read_audit(&audit).len());
    assert!(old >= 20 && new >= 20, "{old} + {new}");
    assert_eq!(
        old + new,
        answered as usize,
        "every answered request has its record"
    );
}

#[tokio::test]
async fn a_changed_config_file_is_reloaded_without_a_signal() {
    const OPS: &str = "dfgw_watch_ops_token";
    let before = token_callers(&[("analytics", "dfgw_watch_analytics_token")]);
    let setup = setup(&before).await;
    let served = Served::start(&setup.config, &[]);
    let bearer = format!("Bearer {OPS}");
    let headers = [("authorization", bearer.as_str())];
    let path = "/api/v1/data_sources/1/test";
    assert_eq!(send(&served.addr, "POST", path, &headers).await, 401);
    // Written aside, then renamed over the config: how editors and ConfigMaps replace a file.
    let staged = setup.dir.path().join("gateway.toml.new");
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let text = text.replace(&before, &token_callers(&[("ops", OPS)]));
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, &setup.config).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while send(&served.addr, "POST", path, &headers).await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new caller was not let in within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    served.terminate();
    assert!(served.wait().0.success());
}
