//! A shared gateway against a hostile client or a misbehaving upstream: strangers cost the
//! callers nothing, and only what the gateway chose crosses it, either way.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{config_for, json, sample, Harness, API_KEY};
use datafold_gateway::cli::standin::{StandIn, ThrowawayCa};
use datafold_gateway::config::{Config, HeaderName, TokenCaller, TokenDigest};
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const START: &str = "/api/v1/data_sources/1/test";
const TOKEN: &str = "dfgw_hardening_caller_token_5b1f0c";

/// An upstream that answers every request with `answer`, over TLS speaking HTTP/1.1 only.
async fn raw_upstream(ca: &ThrowawayCa, answer: Vec<u8>) -> String {
    let tls = ca.server_config_offering(&["127.0.0.1"], &[b"http/1.1"]);
    let acceptor = TlsAcceptor::from(tls.unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, answer) = (acceptor.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                // The gateway's requests are small: one read takes the head and the `{}`.
                let mut buf = [0u8; 8192];
                if tls.read(&mut buf).await.unwrap_or(0) > 0 {
                    let _ = tls.write_all(&answer).await;
                    let _ = tls.flush().await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    url
}

/// A gateway in front of `upstream_url` (trusting `ca`), adjusted by `customize`.
async fn gateway_to(url: &str, ca: ThrowawayCa, customize: impl FnOnce(&mut Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let unused = StandIn::start(ca.server_config(&["127.0.0.1"]).unwrap(), API_KEY)
        .await
        .unwrap();
    let mut config = config_for(dir.path(), &ca, url);
    customize(&mut config);
    Harness::start_with(dir, ca, unused, config).await
}

/// A limit of `burst` requests, refilled at one an hour: within a test, exactly `burst` pass.
fn per_hour(burst: u32) -> datafold_gateway::config::RateLimit {
    datafold_gateway::config::RateLimit {
        rate: "1/h".parse().unwrap(),
        burst: std::num::NonZeroU32::new(burst).unwrap(),
    }
}

/// A gateway in `token` mode whose one caller, `analytics`, holds [`TOKEN`].
async fn token_gateway(customize: impl FnOnce(&mut Config)) -> Harness {
    Harness::start(|c| {
        c.callers.mode = datafold_gateway::config::CallerMode::Token;
        c.callers.tokens = vec![TokenCaller {
            name: "analytics".into(),
            sha256: TokenDigest::of(TOKEN.as_bytes()),
            rate: None,
            burst: None,
        }];
        customize(c);
    })
    .await
}

fn post(h: &Harness, path: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    let mut request = Request::post(h.url(path));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

/// Writes `head` on a new connection and reads until the gateway closes it or 10 s pass.
async fn raw_exchange(h: &Harness, head: &[u8]) -> String {
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(head).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn only_allowed_caller_headers_reach_datafold() {
    let mut h = Harness::start(|c| {
        c.upstream.forward_headers = vec![HeaderName("x-team".parse().unwrap())];
    })
    .await;
    let mut request = Request::post(h.url(START))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("user-agent", "ci-job/2")
        .header("x-team", "analytics")
        .header("accept-encoding", "br");
    let refused = [
        "x-http-method-override",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "x-api-key",
        "x_forwarded_for",
        "origin",
    ];
    for name in refused {
        request = request.header(name, "/api/v1/data_sources");
    }
    let (response, _) = h
        .send(request.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
        .await;
    assert_eq!(response.status(), 200);
    let seen = &h.upstream.received()[0].headers;
    let mut names: Vec<&str> = seen.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "accept",
            "accept-encoding",
            "authorization",
            "content-length",
            "content-type",
            "user-agent",
            "x-request-id",
            "x-team",
        ]
    );
    // Every answer is read for the audit: the gateway asks for it uncompressed.
    assert_eq!(seen["accept-encoding"], "identity");
    assert_eq!(seen["x-team"], "analytics");
    let text = h.metrics().await;
    // The refused ones, and the caller's own Host, Content-Length and Accept-Encoding, which the
    // gateway replaces with its own.
    assert_eq!(
        sample(
            &text,
            "datafold_gateway_headers_dropped_total{direction=\"request\"}"
        ),
        Some(refused.len() as f64 + 3.0),
        "{text}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn only_allowed_datafold_headers_reach_the_caller() {
    let ca = ThrowawayCa::new("ca").unwrap();
    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\
set-cookie: session=for-the-key-user; Secure\r\nwww-authenticate: Key\r\n\
alt-svc: h3=\":443\"\r\nstrict-transport-security: max-age=63072000\r\nx-request-id: upstream-id\r\n\
ratelimit-remaining: 9\r\nx-ratelimit-limit: 600\r\ncache-control: no-store\r\nretry-after: 3\r\n\
vary: accept\r\nx-datafold-debug: internal\r\nconnection: close\r\n\r\n{\"job_id\": 77}"
        .to_vec();
    let url = raw_upstream(&ca, answer).await;
    let mut h = gateway_to(&url, ca, |c| {
        c.upstream.return_headers = vec![HeaderName("x-datafold-debug".parse().unwrap())];
    })
    .await;
    let (response, body) = h.post(START).await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(&body)["job_id"], 77);
    let headers = response.headers();
    for dropped in [
        "set-cookie",
        "www-authenticate",
        "alt-svc",
        "strict-transport-security",
    ] {
        assert!(
            headers.get(dropped).is_none(),
            "{dropped} reached the caller"
        );
    }
    assert_eq!(headers["ratelimit-remaining"], "9");
    assert_eq!(headers["x-ratelimit-limit"], "600");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["retry-after"], "3");
    assert_eq!(headers["vary"], "accept");
    assert_eq!(headers["x-datafold-debug"], "internal");
    assert_eq!(headers["content-length"], "14");
    assert_ne!(headers["x-request-id"], "upstream-id");
    let text = h.metrics().await;
    // set-cookie, www-authenticate, alt-svc, strict-transport-security, x-request-id,
    // content-length (the gateway frames the answer itself) and connection.
    assert_eq!(
        sample(
            &text,
            "datafold_gateway_headers_dropped_total{direction=\"response\"}"
        ),
        Some(7.0),
        "{text}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn an_answer_over_max_response_bytes_is_502_too_large() {
    // Declared too large, and too large without a declared length.
    let declared = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n".to_vec();
    let mut chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..10 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'x'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    for answer in [declared, chunked] {
        let ca = ThrowawayCa::new("ca").unwrap();
        let url = raw_upstream(&ca, answer).await;
        let mut h = gateway_to(&url, ca, |c| c.limits.max_response_bytes = 1024).await;
        let (response, body) = h.post(START).await;
        assert_eq!(response.status(), 502);
        assert_eq!(json(&body)["code"], "upstream_response_too_large");
        let text = h.metrics().await;
        assert_eq!(
            sample(
                &text,
                "datafold_gateway_upstream_errors_total{kind=\"too_large\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert!(!text.contains("kind=\"reset\""), "{text}");
        h.shutdown().await;
        assert_eq!(h.audit()[0]["outcome"], "upstream_error");
    }
}

#[tokio::test]
async fn switching_protocols_from_datafold_is_502() {
    let ca = ThrowawayCa::new("ca").unwrap();
    let answer =
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
            .to_vec();
    let url = raw_upstream(&ca, answer).await;
    let mut h = gateway_to(&url, ca, |_| {}).await;
    let (response, body) = h.post(START).await;
    assert_eq!(response.status(), 502, "{}", String::from_utf8_lossy(&body));
    assert!(response.headers().get("upgrade").is_none());
    h.shutdown().await;
    assert_eq!(h.audit()[0]["outcome"], "upstream_error");
}

#[tokio::test]
async fn a_slow_body_holds_no_concurrency_slot_and_no_rate_limit_token() {
    let mut h = Harness::start(|c| {
        c.limits.max_concurrent_requests = 2;
        c.limits.body_read_timeout = Duration::from_secs(5);
        c.rate_limit.global = Some(per_hour(1));
    })
    .await;
    // More slow bodies than there are slots, each one byte short of what it declared.
    let mut slow = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        stream
            .write_all(
                format!("POST {START} HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{{")
                    .as_bytes(),
            )
            .await
            .unwrap();
        slow.push(stream);
    }
    // Wait until each has been seen reading its body (the gauge counts requests in flight).
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&h.metrics().await, "datafold_gateway_in_flight_requests") != Some(5.0) {
        assert!(Instant::now() < deadline, "the slow requests never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Neither the two slots nor the one token of the hour went to them.
    let (response, body) = h.post(START).await;
    assert_eq!(response.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(h.upstream.received().len(), 1);
    drop(slow);
    h.shutdown().await;
}

#[tokio::test]
async fn a_result_poll_with_a_body_is_400_and_not_forwarded() {
    let mut h = Harness::start(|_| {}).await;
    let request = Request::get(h.url("/api/v1/data_sources/test/1001"))
        .body(Full::new(Bytes::from_static(b"{\"smuggled\": true}")))
        .unwrap();
    let (response, body) = h.send(request).await;
    assert_eq!(response.status(), 400);
    assert_eq!(json(&body)["code"], "bad_request");
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn http11_without_host_is_400() {
    let mut h = Harness::start(|_| {}).await;
    let answer = raw_exchange(
        &h,
        format!("POST {START} HTTP/1.1\r\ncontent-length: 2\r\n\r\n{{}}").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("Host"), "{answer}");
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn an_id_beyond_i64_is_422_saying_which_bound() {
    let mut h = Harness::start(|_| {}).await;
    let (response, body) = h
        .post("/api/v1/data_sources/9223372036854775808/test")
        .await;
    assert_eq!(response.status(), 422);
    let detail = &json(&body)["detail"][0];
    assert_eq!(detail["type"], "less_than_equal");
    assert_eq!(detail["loc"], serde_json::json!(["path", "data_source_id"]));
    assert_eq!(detail["ctx"]["le"], i64::MAX);
    let (response, body) = h
        .get("/api/v1/data_sources/test/-9223372036854775809")
        .await;
    assert_eq!(response.status(), 422);
    assert_eq!(json(&body)["detail"][0]["type"], "greater_than_equal");
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn connect_is_audited_with_its_target_and_long_paths_are_cut() {
    let mut h = Harness::start(|_| {}).await;
    let answer = raw_exchange(
        &h,
        b"CONNECT internal.example:5432 HTTP/1.1\r\nhost: internal.example:5432\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let long = format!("/{}", "a".repeat(60_000));
    let (response, _) = h.get(&long).await;
    assert_eq!(response.status(), 404);
    h.shutdown().await;
    let audit = h.audit();
    assert_eq!(audit[0]["method"], "CONNECT");
    assert_eq!(audit[0]["path"], "internal.example:5432");
    assert!(audit[0].get("path_truncated").is_none());
    assert_eq!(audit[1]["path"].as_str().unwrap().len(), 256);
    assert_eq!(audit[1]["path_truncated"], true);
    let size = std::fs::metadata(&h.audit_file).unwrap().len();
    assert!(size < 2048, "{size} bytes for two refusals");
}

#[tokio::test]
async fn strangers_are_limited_per_address_and_their_connections_closed() {
    let mut h = token_gateway(|c| {
        c.rate_limit.unauthenticated = per_hour(2);
    })
    .await;
    let stranger = format!("POST {START} HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{{}}");
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    for _ in 0..2 {
        stream.write_all(stranger.as_bytes()).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 401"));
    }
    // The third: 429, and the gateway closes the connection after it.
    stream.write_all(stranger.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the connection was left open")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("\"limit\":\"unauthenticated\""), "{answer}");
    assert!(answer.contains("\"code\":\"rate_limited\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after"),
        "{answer}"
    );
    // A caller with a valid token from the same address is neither counted nor refused.
    for _ in 0..5 {
        let (response, _) = h.send(post(&h, START, Some(TOKEN))).await;
        assert_eq!(response.status(), 200);
    }
    let text = h.metrics().await;
    assert_eq!(
        sample(
            &text,
            "datafold_gateway_rate_limited_total{limit=\"unauthenticated\"}"
        ),
        Some(1.0),
        "{text}"
    );
    h.shutdown().await;
}

/// Sends one request without credentials from `source` (any 127.0.0.0/8 address is loopback)
/// and returns the status line.
async fn stranger_from(h: &Harness, source: [u8; 4]) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let mut stream = socket.connect(h.addr).await.unwrap();
    let head = format!("POST {START} HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{{}}");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn each_address_has_its_own_stranger_limit() {
    let mut h = token_gateway(|c| {
        c.rate_limit.unauthenticated = per_hour(1);
    })
    .await;
    assert!(stranger_from(&h, [127, 0, 0, 2])
        .await
        .starts_with("HTTP/1.1 401"));
    assert!(stranger_from(&h, [127, 0, 0, 2])
        .await
        .starts_with("HTTP/1.1 429"));
    // Another address is a stranger of its own, with its own allowance.
    assert!(stranger_from(&h, [127, 0, 0, 3])
        .await
        .starts_with("HTTP/1.1 401"));
    assert!(stranger_from(&h, [127, 0, 0, 3])
        .await
        .starts_with("HTTP/1.1 429"));
    h.shutdown().await;
    // And its own records: a record of its own for the first, the second written too only if the
    // two fell in different seconds, else in that address's summary.
    let audit = h.audit();
    for peer in ["127.0.0.2", "127.0.0.3"] {
        let written = audit
            .iter()
            .filter(|r| {
                r["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("{peer}:")))
            })
            .count();
        let summarised: u64 = audit
            .iter()
            .filter(|r| r["peer"] == peer)
            .map(|r| r["suppressed"].as_u64().unwrap())
            .sum();
        assert!(written >= 1, "{peer}: {audit:?}");
        assert_eq!(written as u64 + summarised, 2, "{peer}: {audit:?}");
    }
}

#[tokio::test]
async fn a_stranger_refused_for_good_cannot_keep_its_connection_by_not_reading() {
    let mut h = token_gateway(|c| {
        c.rate_limit.unauthenticated = per_hour(1);
        c.limits.idle_timeout = Duration::from_secs(1);
        c.limits.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    // HTTP/2 with a receive window of zero: the gateway can send no body, so its GOAWAY never
    // completes on its own.
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut unread = Vec::new();
    for expected in [401, 429] {
        let request = Request::post(format!("http://{}{START}", h.addr))
            .body(())
            .unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), expected);
        unread.push(response);
    }
    // Asked to close after the 429, then dropped one header_read_timeout later.
    let ended = tokio::time::timeout(Duration::from_secs(8), connection).await;
    assert!(ended.is_ok(), "the gateway kept the connection open");
    drop(unread);
    h.shutdown().await;
}

/// Floods the gateway with requests without credentials from one address for `period`, as fast
/// as one client can; returns how many were answered, by status.
async fn flood(h: &Harness, period: Duration) -> (u64, u64) {
    let (unauthorized, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let until = Instant::now() + period;
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (unauthorized, limited) = (unauthorized.clone(), limited.clone());
        let addr = h.addr;
        // Long paths: each refusal would have been a 60 KB audit record.
        let path = format!("/api/v1/data_sources/{}/test", "9".repeat(8_000));
        workers.push(tokio::spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Full<Bytes>>();
            while Instant::now() < until {
                let request = Request::post(format!("http://{addr}{path}"))
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap();
                let Ok(response) = client.request(request).await else {
                    continue;
                };
                match response.status().as_u16() {
                    401 => unauthorized.fetch_add(1, Ordering::Relaxed),
                    429 => limited.fetch_add(1, Ordering::Relaxed),
                    other => panic!("a stranger got {other}"),
                };
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    (
        unauthorized.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
    )
}

#[tokio::test]
async fn a_flood_of_strangers_costs_the_audit_little_and_the_callers_nothing() {
    const PERIOD: Duration = Duration::from_secs(10);
    let mut h = token_gateway(|_| {}).await;
    let caller = async {
        let until = Instant::now() + PERIOD;
        let mut sent = 0;
        while Instant::now() < until {
            let (response, body) = h.send(post(&h, START, Some(TOKEN))).await;
            assert_eq!(response.status(), 200, "{}", String::from_utf8_lossy(&body));
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    };
    let ((unauthorized, limited), sent) = tokio::join!(flood(&h, PERIOD), caller);
    assert!(
        unauthorized + limited > 1000,
        "the flood was too slow to show anything"
    );
    assert!(limited > 0);
    assert_eq!(
        h.upstream.received().len(),
        sent,
        "every caller request was forwarded"
    );
    let metrics = h.metrics().await;
    h.shutdown().await;

    // What the strangers cost the audit file: their records and summaries.
    let text = std::fs::read_to_string(&h.audit_file).unwrap();
    let strangers: usize = text
        .lines()
        .filter(|line| line.contains("\"caller\":null"))
        .map(|line| line.len() + 1)
        .sum();
    assert!(
        strangers < 3 * 1024 * PERIOD.as_secs() as usize,
        "{strangers} bytes of audit for {} refusals",
        unauthorized + limited
    );
    // Nothing vanished: the strangers' records and summaries add up to what they were refused.
    let audit = h.audit();
    let count = |status: u64| -> u64 {
        audit
            .iter()
            .filter(|r| r["caller"].is_null() && r["status"] == status)
            .map(|r| r["suppressed"].as_u64().unwrap_or(1))
            .sum()
    };
    assert_eq!(count(401), unauthorized);
    assert_eq!(count(429), limited);
    let summaries: Vec<_> = audit.iter().filter(|r| r["suppressed"].is_u64()).collect();
    assert!(!summaries.is_empty());
    for summary in summaries {
        assert_eq!(summary["peer"], "127.0.0.1");
        assert!(summary["outcome"] == "rejected" || summary["limit"] == "unauthenticated");
    }
    for record in audit
        .iter()
        .filter(|r| r["caller"].is_null() && r["path"].is_string())
    {
        assert!(record["path"].as_str().unwrap().len() <= 256);
        assert_eq!(record["path_truncated"], true);
    }
    let forwarded = audit.iter().filter(|r| r["outcome"] == "forwarded").count();
    assert_eq!(forwarded, sent, "forwarded requests are never sampled");
    let counted = sample(
        &metrics,
        "datafold_gateway_requests_total{route=\"none\",status=\"401\",outcome=\"rejected\"}",
    );
    assert_eq!(
        counted,
        Some(unauthorized as f64),
        "the metrics count every one"
    );
}

#[tokio::test]
async fn strangers_meet_their_own_refusal_while_the_audit_is_down() {
    let mut h = token_gateway(|c| c.audit.file = "/dev/full".into()).await;
    // The first caller's record is the first to fail; from then on callers get 503...
    assert_eq!(h.send(post(&h, START, Some(TOKEN))).await.0.status(), 200);
    let (response, body) = h.send(post(&h, START, Some(TOKEN))).await;
    assert_eq!(response.status(), 503);
    assert_eq!(json(&body)["code"], "audit_unavailable");
    // ...but a stranger still gets its 401, limited and sampled like any other.
    let (response, body) = h.send(post(&h, START, None)).await;
    assert_eq!(response.status(), 401);
    assert_eq!(json(&body)["code"], "unauthorized");
    assert_eq!(h.upstream.received().len(), 1);
    h.shutdown().await;
}

async fn ready(h: &Harness) -> (u16, String) {
    let request = Request::get(format!("http://{}/readyz", h.admin))
        .body(Full::default())
        .unwrap();
    let (response, body) = h.send(request).await;
    (
        response.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn readyz_recovers_once_the_audit_file_takes_writes_again() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("audit.jsonl");
    std::os::unix::fs::symlink("/dev/full", &link).unwrap();
    let mut h = Harness::start(|c| c.audit.file = link.clone()).await;
    assert_eq!(ready(&h).await.0, 200);
    assert_eq!(h.post(START).await.0.status(), 200);
    let (status, reason) = ready(&h).await;
    assert_eq!(status, 503);
    assert!(reason.contains("audit"), "{reason}");
    // The disk is fixed and the file reopened: the probe finds out without a request.
    std::fs::remove_file(&link).unwrap();
    h.control.reopen_audit().await.unwrap();
    assert_eq!(ready(&h).await.0, 200);
    assert_eq!(h.post(START).await.0.status(), 200);
    h.shutdown().await;
}
