//! Broken upstreams and hostile clients: the gateway answers, never hangs, never dies.

use crate::common;

use std::time::{Duration, Instant};

use common::{config_for, held_at_gate, json, Harness, API_KEY};
use datafold_gateway::cli::standin::{StandIn, ThrowawayCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Starts a gateway whose upstream is `url`, trusting `ca`.
async fn gateway_to(
    url: &str,
    ca: ThrowawayCa,
    customize: impl FnOnce(&mut datafold_gateway::config::Config),
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    // A stand-in is needed by the harness; this one is never called.
    let unused = StandIn::start(ca.server_config(&["127.0.0.1"]).unwrap(), API_KEY)
        .await
        .unwrap();
    let mut config = config_for(dir.path(), &ca, url);
    config.upstream.connect_timeout = Duration::from_secs(2);
    customize(&mut config);
    Harness::start_with(dir, ca, unused, config).await
}

/// Asserts that the gateway closes `stream`, no sooner than `at_least` from now (and within
/// a 10 s bound on the test itself).
async fn assert_closed_no_sooner_than(stream: &mut TcpStream, at_least: Duration, what: &str) {
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "{what}");
    assert!(
        started.elapsed() >= at_least,
        "closed after {:?}",
        started.elapsed()
    );
}

/// Asserts the answer to a test start, `detail` naming the kind of failure, and its record.
/// Sends the start of a request head and never the rest: the gateway (whose
/// `header_read_timeout` is 300 ms) must close the connection without forwarding anything.
async fn assert_half_sent_head_is_dropped(h: &mut Harness, mut stream: TcpStream, what: &str) {
    stream
        .write_all(b"POST /api/v1/data_sources/1/test HTTP/1.1\r\nhost: gw\r\nx-slow: ")
        .await
        .unwrap();
    assert_closed_no_sooner_than(&mut stream, Duration::from_millis(250), what).await;
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

/// Sends one request that the gateway answers itself and reads the answer, leaving the
/// connection kept alive.
async fn complete_one_request(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /not-a-route HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 404"));
}

async fn assert_upstream_error(h: &mut Harness, status: u16, code: &str, detail: &str) {
    let started = Instant::now();
    let (response, body) = h.post("/api/v1/data_sources/1/test").await;
    assert_eq!(
        response.status(),
        status,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(json(&body)["code"], code);
    let said = json(&body)["detail"].as_str().unwrap().to_owned();
    assert!(said.contains(detail), "{said}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The gateway is still serving after the failure.
    let (response, _) = h.get("/api/v1/nothing-here").await;
    assert_eq!(response.status(), 404);
    h.shutdown().await;
    let audit = h.audit();
    assert_eq!(audit[0]["status"], status);
    assert_eq!(audit[0]["outcome"], "upstream_error");
    assert_eq!(audit[0]["upstream_status"], serde_json::Value::Null);
}

#[tokio::test]
async fn upstream_down_is_502() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut h = gateway_to(&url, ThrowawayCa::new("ca").unwrap(), |_| {}).await;
    assert_upstream_error(&mut h, 502, "upstream_unreachable", "cannot connect").await;
}

#[tokio::test]
async fn upstream_reset_mid_request_is_502() {
    let ca = ThrowawayCa::new("ca").unwrap();
    let acceptor = TlsAcceptor::from(ca.server_config(&["127.0.0.1"]).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Complete TLS, take the request, then drop the connection without answering.
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                }
            });
        }
    });
    let mut h = gateway_to(&url, ca, |_| {}).await;
    assert_upstream_error(&mut h, 502, "upstream_unreachable", "broke").await;
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_502_and_nothing_is_sent() {
    let trusted = ThrowawayCa::new("the CA the gateway trusts").unwrap();
    let other = ThrowawayCa::new("some other CA").unwrap();
    let impostor = StandIn::start(other.server_config(&["127.0.0.1"]).unwrap(), API_KEY)
        .await
        .unwrap();
    let mut h = gateway_to(&impostor.url(), trusted, |_| {}).await;
    let (response, body) = h.post("/api/v1/data_sources/1/test").await;
    assert_eq!(response.status(), 502);
    assert_eq!(json(&body)["code"], "upstream_unreachable");
    assert!(
        json(&body)["detail"].as_str().unwrap().contains("TLS"),
        "{}",
        json(&body)
    );
    assert!(
        impostor.received().is_empty(),
        "the key went to an untrusted host"
    );
    h.shutdown().await;
    assert_eq!(h.audit()[0]["outcome"], "upstream_error");
}

#[tokio::test]
async fn slow_upstream_is_504_after_upstream_timeout() {
    let mut h = Harness::start(|c| c.upstream.timeout = Duration::from_millis(300)).await;
    h.upstream.set_delay(Duration::from_secs(30));
    let started = Instant::now();
    let (response, body) = h.post("/api/v1/data_sources/1/test").await;
    assert_eq!(response.status(), 504);
    assert_eq!(json(&body)["code"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    h.shutdown().await;
    assert_eq!(h.audit()[0]["outcome"], "upstream_error");
    assert_eq!(h.audit()[0]["status"], 504);
}

#[tokio::test]
async fn half_sent_request_is_disconnected_after_header_read_timeout() {
    let mut h = Harness::start(|c| c.limits.header_read_timeout = Duration::from_millis(300)).await;
    let stream = TcpStream::connect(h.addr).await.unwrap();
    assert_half_sent_head_is_dropped(&mut h, stream, "the gateway kept a half-sent request open")
        .await;
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let mut h = Harness::start(|c| c.limits.idle_timeout = Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    complete_one_request(&mut stream).await;
    assert_closed_no_sooner_than(
        &mut stream,
        Duration::from_millis(200),
        "idle connection was kept open",
    )
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn requests_past_max_concurrent_are_shed_with_503() {
    let mut h = Harness::start(|c| c.limits.max_concurrent_requests = 1).await;
    h.upstream.close_gate();
    let slow = h.spawn_post("/api/v1/data_sources/1/test");
    // While the first request is held at the upstream, it holds the only slot.
    held_at_gate(&h.upstream, 1).await;
    let (response, body) = h.post("/api/v1/data_sources/2/test").await;
    assert_eq!(response.status(), 503);
    assert_eq!(json(&body)["code"], "overloaded");
    h.upstream.open_gate();
    assert_eq!(slow.await.unwrap().unwrap(), 200);
    h.shutdown().await;
    let shed = h.audit().into_iter().find(|r| r["status"] == 503).unwrap();
    assert_eq!(shed["caller"], "127.0.0.1");
    assert_eq!(shed["outcome"], "rejected");
}

#[tokio::test]
async fn admin_probes_report_health_and_readiness() {
    let mut h = Harness::start(|_| {}).await;
    for path in ["/healthz", "/readyz"] {
        let mut stream = TcpStream::connect(h.admin).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
    // The admin listener never forwards.
    let mut stream = TcpStream::connect(h.admin).await.unwrap();
    stream
        .write_all(
            b"POST /api/v1/data_sources/1/test HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn oversized_request_headers_are_refused_without_forwarding() {
    let mut h = Harness::start(|_| {}).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let huge = "a".repeat(80 * 1024);
    let request = format!(
        "POST /api/v1/data_sources/1/test HTTP/1.1\r\nhost: gw\r\nx-huge: {huge}\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the gateway kept reading an oversized head");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn silent_connection_is_disconnected_after_header_read_timeout() {
    let mut h = Harness::start(|c| c.limits.header_read_timeout = Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    // Not one byte sent; the default idle timeout (60 s) is far past the bound below.
    assert_closed_no_sooner_than(
        &mut stream,
        Duration::from_millis(250),
        "the gateway kept a silent connection open",
    )
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn body_that_never_arrives_is_answered_408_after_body_read_timeout() {
    let mut h = Harness::start(|c| c.limits.body_read_timeout = Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"POST /api/v1/data_sources/1/test HTTP/1.1\r\nhost: gw\r\ncontent-length: 10\r\n\r\n{}")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
    assert_eq!(h.audit()[0]["status"], 408);
}

#[tokio::test]
async fn a_first_head_trickled_in_is_cut_at_header_read_timeout_not_twice_it() {
    let mut h = Harness::start(|c| c.limits.header_read_timeout = Duration::from_secs(1)).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let started = Instant::now();
    // One byte now and one just before the deadline: hyper's own header timer would start at
    // the second byte and run a full period from there.
    stream.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let _ = stream.write_all(b"O").await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was left open");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1600),
        "closed after {took:?}"
    );
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn half_sent_second_request_on_a_kept_alive_connection_is_disconnected() {
    let mut h = Harness::start(|c| c.limits.header_read_timeout = Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    complete_one_request(&mut stream).await;
    assert_half_sent_head_is_dropped(
        &mut h,
        stream,
        "the gateway kept a half-sent second request open",
    )
    .await;
}

#[tokio::test]
async fn a_caller_hanging_up_does_not_lose_the_audit_record() {
    let mut h = Harness::start(|_| {}).await;
    h.upstream.close_gate();
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"POST /api/v1/data_sources/21/test HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    held_at_gate(&h.upstream, 1).await;
    // Datafold has the request; the caller leaves before the answer, and the gateway sees it go:
    // it closes the connection without a word.
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the gateway kept the connection of a caller that left"
    );
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    h.upstream.open_gate();
    h.shutdown().await;
    let audit = h.audit();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["data_source_id"], 21);
    assert_eq!(audit[0]["upstream_status"], 200);
    assert!(audit[0]["job_id"].as_i64().is_some(), "{}", audit[0]);
}

#[tokio::test]
async fn requests_still_running_when_the_grace_ends_are_audited_as_aborted() {
    let mut h = Harness::start(|c| c.limits.shutdown_grace = Duration::from_millis(300)).await;
    // Held at the upstream for good: the gate is never opened.
    h.upstream.close_gate();
    let caller = h.spawn_post("/api/v1/data_sources/5/test");
    held_at_gate(&h.upstream, 1).await;
    let started = Instant::now();
    h.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The caller, still connected, is told why instead of seeing the connection drop.
    assert_eq!(caller.await.unwrap().unwrap(), 503);
    let audit = h.audit();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["outcome"], "aborted");
    assert_eq!(audit[0]["status"], 503);
}

#[tokio::test]
async fn readyz_turns_503_while_requests_drain() {
    let mut h = Harness::start(|_| {}).await;
    h.upstream.close_gate();
    let in_flight = h.spawn_post("/api/v1/data_sources/5/test");
    held_at_gate(&h.upstream, 1).await;
    h.begin_shutdown();
    let mut status = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let mut stream = TcpStream::connect(h.admin).await.unwrap();
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        status.clear();
        stream.read_to_string(&mut status).await.unwrap();
        if status.starts_with("HTTP/1.1 503") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    h.upstream.open_gate();
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    h.shutdown().await;
}

#[tokio::test]
async fn more_than_100_header_fields_are_refused_without_forwarding() {
    let mut h = Harness::start(|_| {}).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let fields: String = (0..120).map(|i| format!("x-field-{i}: {i}\r\n")).collect();
    let request = format!(
        "POST /api/v1/data_sources/1/test HTTP/1.1\r\nhost: gw\r\n{fields}content-length: 2\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the gateway kept reading");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}
