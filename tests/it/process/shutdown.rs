//! Stopping: SIGTERM and SIGINT end the process cleanly with exit 0, requests in flight
//! finished, even right after start or with an audit file that hangs.

use std::time::Duration;

use super::harness::{send, setup};
use crate::common::serve::Served;
use crate::common::{held_at_gate, read_audit};

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let setup = setup("[limits]\nshutdown_grace = \"20s\"\n").await;
    setup.upstream.close_gate();
    let served = Served::start(&setup.config, &[]);
    let addr = served.addr.clone();
    let in_flight =
        tokio::spawn(async move { send(&addr, "POST", "/api/v1/data_sources/7/test", &[]).await });
    // SIGTERM only once the request is in flight: it is held at the upstream...
    held_at_gate(&setup.upstream, 1).await;
    served.terminate();
    // ...and answered only once the gateway has begun to shut down.
    served.wait_for_line("shutting down", |line| {
        line["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shutting down"))
    });
    setup.upstream.open_gate();
    assert_eq!(in_flight.await.unwrap(), 200);
    let (status, log) = served.wait();
    assert!(status.success(), "exit {status}; log:\n{log}");
    let audit = read_audit(&setup.dir.path().join("audit.jsonl"));
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["status"], 200);
    assert_eq!(audit[0]["data_source_id"], 7);
}

#[tokio::test]
async fn sigterm_ends_a_gateway_whose_audit_file_hangs() {
    // A FIFO nobody reads: the gateway opens it read-write, so the opening succeeds, and its
    // writes block for good once the pipe's buffer is full, as on a stuck network volume.
    let setup = setup("[limits]\nshutdown_grace = \"1s\"\n").await;
    let fifo = setup.dir.path().join("audit.jsonl");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let served = Served::start(&setup.config, &[]);
    // Requests until the workers stop answering: each record is a few hundred bytes, the pipe
    // holds 64 KiB.
    let mut hung = false;
    for batch in 0..40 {
        let sends: Vec<_> = (0..16)
            .map(|n| {
                let addr = served.addr.clone();
                let path = format!("/api/v1/data_sources/{}/test", batch * 16 + n);
                tokio::spawn(async move {
                    tokio::time::timeout(Duration::from_secs(2), send(&addr, "POST", &path, &[]))
                        .await
                })
            })
            .collect();
        for sent in sends {
            hung |= sent.await.unwrap().is_err();
        }
        if hung {
            break;
        }
    }
    assert!(hung, "the audit FIFO never filled up");
    served.terminate();
    // Grace (1 s), the workers' margin (5 s), the audit file's close (10 s), the runtime (1 s).
    let (status, log) = served.exit_within(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("workers did not stop in time"), "{log}");
}

#[tokio::test]
async fn sigterm_right_after_start_is_a_clean_stop() {
    let setup = setup("").await;
    let served = Served::start(&setup.config, &[]);
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success(), "exit {status}; log:\n{log}");
}

#[tokio::test]
async fn sigint_stops_it_cleanly_too() {
    let setup = setup("[log]\nformat = \"json\"\n").await;
    let served = Served::start(&setup.config, &[]);
    assert_eq!(
        send(&served.addr, "POST", "/api/v1/data_sources/1/test", &[]).await,
        200
    );
    served.signal(libc::SIGINT);
    let (status, log) = served.wait();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(log.contains("\"stopped\""), "{log}");
    assert_eq!(read_audit(&setup.dir.path().join("audit.jsonl")).len(), 1);
}
