//! One connection of the main listener: its TLS handshake, HTTP/1.1 or HTTP/2 by hyper-util's
//! auto builder, its deadlines (first request, idle), and its close (shutdown, or a layer asking
//! for it). The per-request step on the connection is `stack::PerConnection`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::Service;

use crate::callers::Peer;
use crate::config::Config;
use crate::stack::PerConnection;
use crate::tls;

/// The stack as a connection serves it (see `stack::build`): any service of HTTP requests that
/// always answers, with a body hyper can send.
pub(crate) trait Stack:
    Service<
        http::Request<Incoming>,
        Response = http::Response<Self::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
    type Body: http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static;
}

impl<S, B> Stack for S
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Body = B;
}

/// Largest request head (request line and headers) accepted, in bytes.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields accepted in one request.
const MAX_HEADERS: usize = 100;

pub(crate) fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// How long a connection may go without a request.
#[derive(Clone, Copy)]
pub(crate) struct Deadlines {
    /// From accept to the first request. hyper's own header timer only starts once it knows the
    /// protocol, so a client that sends nothing at all is caught here.
    pub(crate) first_request: Duration,
    /// From the end of one request to the start of the next.
    pub(crate) idle: Duration,
}

/// TLS on the main listener, and the count of handshakes that failed.
#[derive(Clone)]
pub(crate) struct TlsListener {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) handshake_failures: prometheus_client::metrics::counter::Counter,
}

/// Completes the TLS handshake (within the first-request deadline), then serves the connection.
/// A failed handshake (no or an untrusted client certificate, a plain-HTTP client) is the
/// client's problem: counted, and logged at debug in one line.
pub(crate) async fn serve_tls_connection<S>(
    tls: TlsListener,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    stack: S,
    deadlines: Deadlines,
    stop: watch::Receiver<bool>,
) where
    S: Stack,
{
    let failures = &tls.handshake_failures;
    let accept = tls.acceptor.accept(stream);
    let stream = match tokio::time::timeout(deadlines.first_request, accept).await {
        Ok(Ok(stream)) => stream,
        // Debug only: anyone who can connect can fail a handshake, as often as they like.
        Ok(Err(e)) => {
            failures.inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            failures.inc();
            tracing::debug!(%peer, "TLS handshake not completed in time; closing");
            return;
        }
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(tls::certificate_identity);
    let peer = Peer::new(peer).with_tls_identity(identity);
    serve_connection(builder, stream, peer, stack, deadlines, stop).await;
}

/// Serves one connection until it closes, sits idle past its deadline, or shutdown begins.
pub(crate) async fn serve_connection<I, S>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: I,
    peer: Peer,
    stack: S,
    deadlines: Deadlines,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Stack,
{
    let activity = Arc::new(Activity::new());
    let addr = peer.addr;
    let asked_to_close = peer.clone();
    let service = PerConnection::new(stack, peer, activity.clone());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut closing = false;
    // Once the gateway itself has asked the connection to close (idle, or a caller refused for
    // good), a client that neither reads nor closes (a zero HTTP/2 window, say) must not keep
    // it: it is dropped one `first_request` period later.
    let mut hard_stop_armed = false;
    let idle = tokio::time::sleep(deadlines.first_request.min(deadlines.idle));
    tokio::pin!(idle);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                // Shutdown: the grace period in `drain` bounds how long this may take.
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = asked_to_close.closing(), if !hard_stop_armed => {
                // A layer refused this connection's caller for good (see `Peer::close_connection`):
                // the answer goes out, then the connection closes, or is dropped.
                closing = true;
                hard_stop_armed = true;
                connection.as_mut().graceful_shutdown();
                idle.as_mut().reset(later(Instant::now(), deadlines.first_request).into());
            }
            () = idle.as_mut(), if !closing || hard_stop_armed => {
                if hard_stop_armed {
                    tracing::debug!(peer = %addr, "dropping a connection that did not close when asked");
                    return;
                }
                match activity.idle_until(deadlines) {
                    // Not one complete request within header_read_timeout of connecting: nothing
                    // is in flight to finish, and a graceful close would wait on a head still
                    // trickling in (hyper's own header timer starts only at its second byte).
                    None if !activity.served.load(Ordering::Acquire) => {
                        tracing::debug!(peer = %addr, "no complete request in time; closing");
                        return;
                    }
                    None => {
                        tracing::debug!(peer = %addr, "closing idle connection");
                        closing = true;
                        hard_stop_armed = true;
                        connection.as_mut().graceful_shutdown();
                        idle.as_mut().reset(later(Instant::now(), deadlines.first_request).into());
                    }
                    Some(deadline) => idle.as_mut().reset(deadline.into()),
                }
            }
        }
    }
}

/// Requests in flight on one connection, and when the last one finished: what the connection's
/// idle and first-request deadlines are measured from. A per-connection fact, kept on the
/// connection; the gateway's count of requests in flight is the workers' trackers.
pub(crate) struct Activity {
    opened: Instant,
    /// Whether any request has started on this connection yet.
    served: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last request.
    last_done_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            served: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
        }
    }

    /// `None` if the connection has sat past its deadline; else when to look again.
    fn idle_until(&self, deadlines: Deadlines) -> Option<Instant> {
        let now = Instant::now();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Some(later(now, deadlines.idle));
        }
        let deadline = if !self.served.load(Ordering::Acquire) {
            later(self.opened, deadlines.first_request)
        } else {
            let last_ms = self.last_done_ms.load(Ordering::Acquire);
            later(self.opened + Duration::from_millis(last_ms), deadlines.idle)
        };
        (deadline > now).then_some(deadline)
    }
}

/// `at + after`, or a day past `at` where that would overflow.
fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .unwrap_or_else(|| at + Duration::from_secs(86_400))
}

/// Marks a request in flight on its connection until dropped.
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    pub(crate) fn start(activity: &Arc<Activity>) -> Self {
        activity.served.store(true, Ordering::Release);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_done_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
