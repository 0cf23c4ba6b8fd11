//! What reaches Datafold, and what never does: over real sockets, with the stand-in behind TLS.

use crate::common;

use bytes::Bytes;
use common::{json, Harness, API_KEY};
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn test_start_is_forwarded_with_the_key_and_its_answer_passes_through() {
    let mut h = Harness::start(|_| {}).await;
    let (response, body) = h.post("/api/v1/data_sources/42/test").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-ratelimit-remaining"], "99");
    let job_id = json(&body)["job_id"].as_i64().unwrap();

    let (response, body) = h.get(&format!("/api/v1/data_sources/test/{job_id}")).await;
    assert_eq!(response.status(), 200);
    let results = json(&body);
    assert_eq!(results["id"], job_id);
    assert_eq!(results["status"], "done");
    assert_eq!(results["results"][0]["step"], "connection");

    let received = h.upstream.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].method, "POST");
    assert_eq!(received[0].target, "/api/v1/data_sources/42/test");
    assert_eq!(received[0].body, Bytes::from_static(b"{}"));
    assert_eq!(
        received[0].headers["authorization"],
        format!("Key {API_KEY}")
    );
    assert_eq!(
        received[1].target,
        format!("/api/v1/data_sources/test/{job_id}")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn upstream_connection_is_reused_over_http2() {
    let mut h = Harness::start(|_| {}).await;
    for id in 0..10 {
        let (response, _) = h.post(&format!("/api/v1/data_sources/{id}/test")).await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        h.upstream.connections(),
        1,
        "one TLS handshake for all requests"
    );
    assert!(h
        .upstream
        .received()
        .iter()
        .all(|r| r.version == http::Version::HTTP_2));
    h.shutdown().await;
}

#[tokio::test]
async fn caller_credentials_are_removed_and_never_win() {
    let mut h = Harness::start(|_| {}).await;
    let request = Request::post(h.url("/api/v1/data_sources/1/test"))
        .header("authorization", "Key caller-supplied-key")
        .header("cookie", "session=caller")
        .header("proxy-authorization", "Basic Y2FsbGVyOnB3")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (response, _) = h.send(request).await;
    // The stand-in answers 401 unless the gateway's key, and only it, arrived.
    assert_eq!(response.status(), 200);
    let seen = &h.upstream.received()[0].headers;
    let auth: Vec<_> = seen.get_all("authorization").iter().collect();
    assert_eq!(auth, [&format!("Key {API_KEY}")]);
    assert!(seen.get("cookie").is_none());
    assert!(seen.get("proxy-authorization").is_none());
    h.shutdown().await;
}

#[tokio::test]
async fn connection_header_cannot_remove_the_key() {
    let mut h = Harness::start(|_| {}).await;
    let request = Request::post(h.url("/api/v1/data_sources/1/test"))
        .header("connection", "authorization, x-request-id")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (response, _) = h.send(request).await;
    assert_eq!(response.status(), 200);
    let seen = &h.upstream.received()[0].headers;
    assert_eq!(seen["authorization"], format!("Key {API_KEY}"));
    let sent_id = seen.get("x-request-id").expect("a request id upstream");
    assert_eq!(sent_id, &response.headers()["x-request-id"]);
    h.shutdown().await;
}

#[tokio::test]
async fn host_is_the_upstreams_and_query_and_hop_by_hop_headers_are_dropped() {
    let mut h = Harness::start(|_| {}).await;
    let request = Request::post(h.url("/api/v1/data_sources/5/test?debug=1&token=x"))
        .header("host", "gateway.internal")
        .header("connection", "x-private-hop")
        .header("x-private-hop", "1")
        .header("te", "trailers")
        .header("user-agent", "ci-job/1.0")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (response, _) = h.send(request).await;
    assert_eq!(response.status(), 200);
    let seen = &h.upstream.received()[0];
    assert_eq!(seen.target, "/api/v1/data_sources/5/test");
    assert_eq!(
        seen.host.as_deref(),
        Some(h.upstream.addr().to_string().as_str())
    );
    assert!(seen.headers.get("x-private-hop").is_none());
    assert!(seen.headers.get("connection").is_none());
    assert!(seen.headers.get("te").is_none());
    assert_eq!(seen.headers["user-agent"], "ci-job/1.0");
    h.shutdown().await;
}

#[tokio::test]
async fn refused_requests_never_reach_upstream() {
    let mut h = Harness::start(|c| c.limits.max_body_bytes = 1024).await;
    let cases: Vec<(Request<Full<Bytes>>, u16, &str)> = vec![
        (
            Request::get(h.url("/api/v1/data_sources"))
                .body(Full::default())
                .unwrap(),
            404,
            "not_found",
        ),
        (
            Request::post(h.url("/api/v1/data_sources/1/query"))
                .body(Full::default())
                .unwrap(),
            404,
            "not_found",
        ),
        (
            Request::get(h.url("/api/v1/data_sources/1"))
                .body(Full::default())
                .unwrap(),
            404,
            "not_found",
        ),
        (
            Request::get(h.url("/api/v1/audit_logs"))
                .body(Full::default())
                .unwrap(),
            404,
            "not_found",
        ),
        (
            Request::post(h.url("/api/v1/data_sources/1/test/"))
                .body(Full::default())
                .unwrap(),
            404,
            "not_found",
        ),
        (
            Request::post(h.url("/api/v1/data_sources/1%2Fquery/test"))
                .body(Full::default())
                .unwrap(),
            404,
            "not_found",
        ),
        (
            Request::get(h.url("/api/v1/data_sources/1/test"))
                .body(Full::default())
                .unwrap(),
            405,
            "method_not_allowed",
        ),
        (
            Request::post(h.url("/api/v1/data_sources/test/9"))
                .body(Full::default())
                .unwrap(),
            405,
            "method_not_allowed",
        ),
        (
            Request::post(h.url("/api/v1/data_sources/1/test"))
                .body(Full::new(Bytes::from(vec![b'x'; 2048])))
                .unwrap(),
            413,
            "payload_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let target = request.uri().to_string();
        let (response, body) = h.send(request).await;
        assert_eq!(response.status(), status, "{target}");
        assert_eq!(json(&body)["code"], code, "{target}");
        assert_eq!(response.headers()["content-type"], "application/json");
    }
    assert!(
        h.upstream.received().is_empty(),
        "{:?}",
        h.upstream.received()
    );
    h.shutdown().await;
}

#[tokio::test]
async fn method_not_allowed_names_the_allowed_method() {
    let mut h = Harness::start(|_| {}).await;
    let (response, _) = h.get("/api/v1/data_sources/1/test").await;
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let (response, _) = h.post("/api/v1/data_sources/test/1").await;
    assert_eq!(response.headers()["allow"], "GET");
    h.shutdown().await;
}

#[tokio::test]
async fn non_integer_ids_get_datafolds_422_without_calling_upstream() {
    let mut h = Harness::start(|_| {}).await;
    let (response, body) = h.post("/api/v1/data_sources/warehouse/test").await;
    assert_eq!(response.status(), 422);
    assert_eq!(
        json(&body),
        serde_json::json!({"detail":[{"loc":["path","data_source_id"],"msg":"Input should be a valid integer, unable to parse string as an integer","type":"int_parsing"}]})
    );
    let (response, body) = h
        .get("/api/v1/data_sources/test/99999999999999999999")
        .await;
    assert_eq!(response.status(), 422);
    assert_eq!(
        json(&body)["detail"][0]["loc"],
        serde_json::json!(["path", "job_id"])
    );
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn four_mib_body_is_refused_413_declared_or_chunked() {
    let mut h = Harness::start(|_| {}).await;
    let big = Bytes::from(vec![b' '; 4 << 20]);
    let request = Request::post(h.url("/api/v1/data_sources/1/test"))
        .body(Full::new(big.clone()))
        .unwrap();
    let (response, body) = h.send(request).await;
    assert_eq!(response.status(), 413);
    assert_eq!(json(&body)["code"], "payload_too_large");

    // Chunked: no length to check up front, so the limit applies while reading.
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let head = "POST /api/v1/data_sources/1/test HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut answer = Vec::new();
    for _ in 0..64 {
        let framed = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        if stream.write_all(&framed).await.is_err() {
            break; // the gateway answered and closed; read what it said
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn a_too_large_body_announced_with_expect_100_continue_is_refused_before_it_is_sent() {
    let mut h = Harness::start(|_| {}).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let head = "POST /api/v1/data_sources/1/test HTTP/1.1\r\nhost: gw\r\n\
                content-length: 1048576\r\nexpect: 100-continue\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    // No byte of the body is sent: the answer must come without it, and must not be the 100
    // that would ask for it.
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the gateway waited for a body it was going to refuse")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(h.upstream.received().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_second_request() {
    let mut h = Harness::start(|_| {}).await;
    let smuggled = "GET /api/v1/data_sources/1 HTTP/1.1\r\nhost: x\r\n\r\n";
    let body = format!("0\r\n\r\n{smuggled}");
    let request = format!(
        "POST /api/v1/data_sources/1/test HTTP/1.1\r\nhost: gw\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    // hyper lets Transfer-Encoding win, reads the empty chunked body, and closes the
    // connection instead of reading on: the smuggled bytes are never parsed as a request.
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    let received = h.upstream.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].target, "/api/v1/data_sources/1/test");
    assert!(received[0].body.is_empty(), "{:?}", received[0]);
    h.shutdown().await;
    assert_eq!(h.audit().len(), 1);
}

#[tokio::test]
async fn request_id_is_kept_when_sane_and_made_when_not() {
    let mut h = Harness::start(|_| {}).await;
    let request = Request::post(h.url("/api/v1/data_sources/3/test"))
        .header("x-request-id", "ci-build-1234.5")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (response, _) = h.send(request).await;
    assert_eq!(response.headers()["x-request-id"], "ci-build-1234.5");
    assert_eq!(
        h.upstream.received()[0].headers["x-request-id"],
        "ci-build-1234.5"
    );

    let request = Request::post(h.url("/api/v1/data_sources/3/test"))
        .header("x-request-id", "bad id\" with quotes")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (response, _) = h.send(request).await;
    let made = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(made, "bad id\" with quotes");
    assert_eq!(made.len(), 36, "a UUID: {made}");
    assert_eq!(
        h.upstream.received()[1].headers["x-request-id"],
        made.as_str()
    );

    let (response, _) = h.get("/not/a/route").await;
    let refused_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();

    h.shutdown().await;
    let audit = h.audit();
    assert_eq!(audit[0]["request_id"], "ci-build-1234.5");
    assert_eq!(audit[1]["request_id"], made.as_str());
    assert_eq!(audit[2]["request_id"], refused_id.as_str());
}

#[tokio::test]
async fn upstream_errors_pass_through_untouched() {
    let mut h = Harness::start(|_| {}).await;
    // An unknown job: the stand-in answers 404 with its own body, which the caller gets as is.
    let (response, body) = h.get("/api/v1/data_sources/test/777").await;
    assert_eq!(response.status(), 404);
    assert_eq!(json(&body), serde_json::json!({"detail": "Job not found"}));
    h.shutdown().await;
    let audit = h.audit();
    assert_eq!(audit[0]["outcome"], "forwarded");
    assert_eq!(audit[0]["upstream_status"], 404);
    assert_eq!(audit[0]["job_id"], 777);
}

#[tokio::test]
async fn http2_callers_are_served_too() {
    let mut h = Harness::start(|_| {}).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = Request::post(h.url("/api/v1/data_sources/8/test"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(
        h.upstream.received()[0].headers["authorization"],
        format!("Key {API_KEY}")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn chunked_caller_body_is_sent_upstream_with_a_content_length() {
    let mut h = Harness::start(|_| {}).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/v1/data_sources/4/test HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
              expect: 100-continue\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n1\r\n{\r\n1\r\n}\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains(" 200 OK"), "{answer}");
    let seen = &h.upstream.received()[0];
    assert_eq!(seen.body, Bytes::from_static(b"{}"));
    assert_eq!(seen.headers["content-length"], "2");
    assert!(seen.headers.get("transfer-encoding").is_none());
    assert!(seen.headers.get("expect").is_none());
    assert_eq!(seen.headers["content-type"], "application/json");
    h.shutdown().await;
}
