//! The upstream connection pool against real TLS upstreams on loopback: keep-alive reuse, the
//! connection limit, HTTP/2 negotiation, and sending a request twice only when the upstream
//! provably never saw it.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use datafold_gateway::cli::standin::{StandIn, ThrowawayCa};
use datafold_gateway::config::{Http2Mode, Upstream};
use datafold_gateway::error::UpstreamFailure;
use datafold_gateway::pool::{Connector, Error, Pool};
use http::header::CONTENT_LENGTH;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

/// A pool to `url`, trusting `ca`; `customize` adjusts `[upstream]`. Also returns its retry
/// counter.
fn pool_to(
    dir: &Path,
    ca: &ThrowawayCa,
    url: &str,
    customize: impl FnOnce(&mut Upstream),
) -> (Pool, Counter) {
    let ca_file = dir.join("ca.pem");
    ca.write_cert(&ca_file).unwrap();
    let mut config = Upstream {
        url: url.parse().unwrap(),
        ca_file: Some(ca_file),
        connect_timeout: Duration::from_secs(2),
        ..Upstream::default()
    };
    customize(&mut config);
    let retries = Counter::default();
    let pool = Connector::new(&config).unwrap().pool(retries.clone());
    (pool, retries)
}

/// POSTs `{}` to `path` and reads the whole answer.
async fn post(pool: &Pool, path: &str) -> Result<(u16, Version, Bytes), Error> {
    let request = Request::post(path)
        .header(CONTENT_LENGTH, 2)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = pool.send(request).await?;
    let (status, version) = (response.status().as_u16(), response.version());
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, version, body))
}

fn server_tls(ca: &ThrowawayCa, alpn: &[&[u8]]) -> TlsAcceptor {
    TlsAcceptor::from(ca.server_config_offering(&["127.0.0.1"], alpn).unwrap())
}

/// What the HTTP/1.1 upstream does with a request, by its number (from 0, across connections).
#[derive(Clone, Copy)]
enum Reply {
    /// Answers and waits for the next request (or for [`Http1Upstream::close_idle`]).
    KeepAlive,
    /// Answers, without `Connection: close`, then closes the connection at once.
    ThenClose,
    /// Closes the connection without answering.
    Hangup,
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
    most_open: AtomicUsize,
    /// Request targets, in the order they arrived.
    requests: Mutex<Vec<String>>,
}

/// A hand-written HTTP/1.1 upstream over TLS, on a thread and runtime of its own so that it
/// acts while the test's runtime is held still. Stops when dropped.
struct Http1Upstream {
    url: String,
    counts: Arc<Counts>,
    close_idle: Arc<Notify>,
    closed: std::sync::mpsc::Receiver<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Http1Upstream {
    fn start(ca: &ThrowawayCa, alpn: &[&[u8]], delay: Duration, reply: fn(usize) -> Reply) -> Self {
        let acceptor = server_tls(ca, alpn);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let counts = Arc::new(Counts::default());
        let close_idle = Arc::new(Notify::new());
        let (closed_tx, closed) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn({
            let (counts, close_idle) = (counts.clone(), close_idle.clone());
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    let accept = async {
                        loop {
                            let (tcp, _) = listener.accept().await.unwrap();
                            counts.accepted.fetch_add(1, Ordering::SeqCst);
                            let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
                            counts.most_open.fetch_max(open, Ordering::SeqCst);
                            let connection = Connection {
                                counts: counts.clone(),
                                close_idle: close_idle.clone(),
                                closed: closed_tx.clone(),
                                delay,
                                reply,
                            };
                            let (acceptor, counts) = (acceptor.clone(), counts.clone());
                            tokio::spawn(async move {
                                if let Ok(tls) = acceptor.accept(tcp).await {
                                    connection.serve(tls).await;
                                }
                                counts.open.fetch_sub(1, Ordering::SeqCst);
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stopped => {}
                    }
                });
            }
        });
        Self {
            url,
            counts,
            close_idle,
            closed,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.counts.requests.lock().unwrap().clone()
    }

    fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Closes the one connection waiting for a request, and returns once it is closed. It
    /// blocks the calling thread on purpose: the test's runtime, held still, cannot notice the
    /// close before the pool tries the connection.
    fn close_idle(&self) {
        self.close_idle.notify_one();
        self.closed
            .recv_timeout(Duration::from_secs(10))
            .expect("the idle connection closed");
    }
}

impl Drop for Http1Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Connection {
    counts: Arc<Counts>,
    close_idle: Arc<Notify>,
    closed: std::sync::mpsc::Sender<()>,
    delay: Duration,
    reply: fn(usize) -> Reply,
}

impl Connection {
    async fn serve(self, mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>) {
        let mut buf = Vec::new();
        loop {
            // A whole request: the head, then as many bytes as its Content-Length says.
            let mut wanted = None;
            loop {
                if wanted.is_none() {
                    wanted = head_and_body_length(&buf);
                }
                if wanted.is_some_and(|n| buf.len() >= n) {
                    break;
                }
                let mut chunk = [0u8; 4096];
                let read = tokio::select! {
                    read = tls.read(&mut chunk) => read.unwrap_or(0),
                    () = self.close_idle.notified(), if buf.is_empty() => {
                        let _ = tls.shutdown().await;
                        let _ = self.closed.send(());
                        return;
                    }
                };
                if read == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..read]);
            }
            let length = wanted.unwrap_or_default();
            let head = String::from_utf8_lossy(&buf[..length]).into_owned();
            buf.drain(..length);
            let number = {
                let mut requests = self.counts.requests.lock().unwrap();
                requests.push(head.split(' ').nth(1).unwrap_or_default().to_owned());
                requests.len() - 1
            };
            let reply = (self.reply)(number);
            if let Reply::Hangup = reply {
                return;
            }
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let answer =
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
            if let Reply::ThenClose = reply {
                // The answer and TLS's close_notify leave together, as one write: the pool
                // cannot take the connection for another request between the two.
                let session = &mut tls.get_mut().1;
                let _ = std::io::Write::write_all(&mut session.writer(), answer);
                session.send_close_notify();
                let _ = tls.shutdown().await;
                return;
            }
            if tls.write_all(answer).await.is_err() || tls.flush().await.is_err() {
                return;
            }
        }
    }
}

/// The length of the first request in `buf`, head and body, once its head is complete.
fn head_and_body_length(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let body = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |n| n.trim().parse::<usize>().unwrap());
    Some(head_end + body)
}

#[tokio::test]
async fn sequential_requests_reuse_one_kept_alive_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let upstream = Http1Upstream::start(&ca, &[HTTP11], Duration::ZERO, |_| Reply::KeepAlive);
    let (pool, retries) = pool_to(dir.path(), &ca, &upstream.url, |_| {});
    for n in 0..5 {
        let (status, version, body) = post(&pool, &format!("/r/{n}")).await.unwrap();
        assert_eq!(
            (status, version, &body[..]),
            (200, Version::HTTP_11, &b"{}"[..])
        );
    }
    assert_eq!(upstream.accepted(), 1, "one connection for all five");
    assert_eq!(upstream.requests().len(), 5);
    assert_eq!(retries.get(), 0);
}

#[tokio::test]
async fn a_kept_alive_connection_closed_while_idle_is_retried_once_on_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let upstream = Http1Upstream::start(&ca, &[HTTP11], Duration::ZERO, |_| Reply::KeepAlive);
    let (pool, retries) = pool_to(dir.path(), &ca, &upstream.url, |_| {});
    assert_eq!(post(&pool, "/first").await.unwrap().0, 200);
    while pool.idle_connections() == 0 {
        tokio::task::yield_now().await;
    }
    // The upstream closes the kept-alive connection. One turn of this (single-threaded)
    // runtime lets its I/O driver see the close, and resumes the test before the connection's
    // task runs: the pool takes the connection as idle and healthy, and hyper finds it closed
    // before writing the request. (Should a tokio release run woken tasks first, the pool
    // would drop the closed connection instead, and the retry count below fails the test.)
    upstream.close_idle();
    tokio::task::yield_now().await;
    assert_eq!(post(&pool, "/second").await.unwrap().0, 200);
    assert_eq!(retries.get(), 1);
    assert_eq!(upstream.requests(), ["/first", "/second"]);
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn an_upstream_closing_after_every_answer_costs_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let upstream = Http1Upstream::start(&ca, &[HTTP11], Duration::ZERO, |_| Reply::ThenClose);
    let (pool, _retries) = pool_to(dir.path(), &ca, &upstream.url, |_| {});
    for round in 0..5 {
        let sent: Vec<_> = (0..4)
            .map(|n| {
                let pool = pool.clone();
                tokio::spawn(async move { post(&pool, &format!("/r/{round}/{n}")).await })
            })
            .collect();
        for request in sent {
            assert_eq!(request.await.unwrap().unwrap().0, 200);
        }
    }
    let mut requests = upstream.requests();
    requests.sort();
    requests.dedup();
    assert_eq!(requests.len(), 20, "each request reached the upstream once");
    assert_eq!(upstream.requests().len(), 20);
    // Whether a closed connection is noticed while idle (dropped) or only when tried (retried)
    // is a race, so the retries are not counted here; the test above pins one.
}

#[tokio::test]
async fn a_request_the_upstream_read_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let upstream = Http1Upstream::start(&ca, &[HTTP11], Duration::ZERO, |n| match n {
        0 => Reply::KeepAlive,
        _ => Reply::Hangup,
    });
    let (pool, retries) = pool_to(dir.path(), &ca, &upstream.url, |_| {});
    assert_eq!(post(&pool, "/first").await.unwrap().0, 200);
    while pool.idle_connections() == 0 {
        tokio::task::yield_now().await;
    }
    // On the kept-alive connection: read by the upstream, then no answer.
    let error = post(&pool, "/second").await.unwrap_err();
    assert_eq!(
        UpstreamFailure::classify(error.as_ref()),
        UpstreamFailure::Reset
    );
    assert_eq!(upstream.requests(), ["/first", "/second"]);
    assert_eq!(retries.get(), 0);
    // On a new connection too.
    let error = post(&pool, "/third").await.unwrap_err();
    assert_eq!(
        UpstreamFailure::classify(error.as_ref()),
        UpstreamFailure::Reset
    );
    assert_eq!(upstream.requests(), ["/first", "/second", "/third"]);
    assert_eq!(retries.get(), 0);
}

#[tokio::test]
async fn no_more_than_max_connections_per_worker_are_open_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let slow = Duration::from_millis(50);
    let upstream = Http1Upstream::start(&ca, &[HTTP11], slow, |_| Reply::KeepAlive);
    let (pool, _) = pool_to(dir.path(), &ca, &upstream.url, |c| {
        c.max_connections_per_worker = 2;
    });
    let sent: Vec<_> = (0..10)
        .map(|n| {
            let pool = pool.clone();
            tokio::spawn(async move { post(&pool, &format!("/r/{n}")).await })
        })
        .collect();
    for request in sent {
        assert_eq!(request.await.unwrap().unwrap().0, 200);
    }
    assert_eq!(upstream.requests().len(), 10);
    assert_eq!(upstream.counts.most_open.load(Ordering::SeqCst), 2);
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn http2_never_speaks_http11_to_an_upstream_that_offers_h2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let upstream = StandIn::start(ca.server_config(&["127.0.0.1"]).unwrap(), "key")
        .await
        .unwrap();
    let (pool, _) = pool_to(dir.path(), &ca, &upstream.url(), |c| {
        c.http2 = Http2Mode::Never;
    });
    for _ in 0..2 {
        let (_, version, _) = post(&pool, "/api/v1/data_sources/1/test").await.unwrap();
        assert_eq!(version, Version::HTTP_11);
    }
    let received = upstream.received();
    assert!(received.iter().all(|r| r.version == Version::HTTP_11));
    assert_eq!(received[0].target, "/api/v1/data_sources/1/test");
    assert_eq!(
        received[0].host.as_deref(),
        Some(upstream.addr().to_string().as_str())
    );
}

#[tokio::test]
async fn http2_auto_speaks_h2_when_offered_over_one_shared_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let upstream = StandIn::start(ca.server_config(&["127.0.0.1"]).unwrap(), "key")
        .await
        .unwrap();
    let (pool, _) = pool_to(dir.path(), &ca, &upstream.url(), |_| {});
    let sent: Vec<_> = (0..5)
        .map(|n| {
            let pool = pool.clone();
            tokio::spawn(async move { post(&pool, &format!("/r/{n}")).await })
        })
        .collect();
    for request in sent {
        assert_eq!(request.await.unwrap().unwrap().1, Version::HTTP_2);
    }
    assert_eq!(upstream.connections(), 1);
    let received = upstream.received();
    assert!(received.iter().all(|r| r.version == Version::HTTP_2));
    assert_eq!(
        received[0].host.as_deref(),
        Some(upstream.addr().to_string().as_str())
    );
}

#[tokio::test]
async fn http2_always_fails_against_an_http11_upstream_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    // One upstream refuses the offer of h2 alone; the other ignores ALPN and would speak 1.1.
    for alpn in [&[HTTP11][..], &[]] {
        let upstream = Http1Upstream::start(&ca, alpn, Duration::ZERO, |_| Reply::KeepAlive);
        let (pool, _) = pool_to(dir.path(), &ca, &upstream.url, |c| {
            c.http2 = Http2Mode::Always;
        });
        let error = post(&pool, "/r").await.unwrap_err();
        let said = error.to_string();
        assert!(said.contains("upstream.http2 = \"always\""), "{said}");
        assert!(
            said.contains(upstream.url.trim_start_matches("https://")),
            "{said}"
        );
        assert_eq!(
            UpstreamFailure::classify(error.as_ref()),
            UpstreamFailure::Connect
        );
        assert!(upstream.requests().is_empty());
    }
}

#[tokio::test]
async fn a_refused_http2_stream_is_sent_again_once_and_answered() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let acceptor = server_tls(&ca, &[H2]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let streams = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let (streams, connections) = (streams.clone(), connections.clone());
        async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, streams) = (acceptor.clone(), streams.clone());
                connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let tls = acceptor.accept(tcp).await.unwrap();
                    let mut h2 = h2::server::handshake(tls).await.unwrap();
                    while let Some(Ok((_, mut respond))) = h2.accept().await {
                        // The very first stream is refused unprocessed; the rest are answered.
                        if streams.fetch_add(1, Ordering::SeqCst) == 0 {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        let head = http::Response::builder()
                            .header(CONTENT_LENGTH, 2)
                            .body(())
                            .unwrap();
                        let mut body = respond.send_response(head, false).unwrap();
                        body.send_data(Bytes::from_static(b"{}"), true).unwrap();
                    }
                });
            }
        }
    });
    let (pool, retries) = pool_to(dir.path(), &ca, &url, |_| {});
    let (status, version, body) = post(&pool, "/r").await.unwrap();
    assert_eq!(
        (status, version, &body[..]),
        (200, Version::HTTP_2, &b"{}"[..])
    );
    assert_eq!(retries.get(), 1);
    assert_eq!(streams.load(Ordering::SeqCst), 2);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "the retry used a new connection"
    );
}
