//! The connections to the upstream: one pool per worker, on that worker's runtime.
//!
//! A [`Connector`] is built once from `[upstream]` and holds what all workers share: the TLS
//! client settings (trust roots from [`root_store`], the ALPN offer `upstream.http2` allows),
//! the upstream's name and the limits. Each worker asks it for a [`Pool`] of its own. A pool
//! opens connections on the runtime of the request that needs one and spawns their tasks there,
//! so a worker's exchanges with the upstream never wake another thread; its bookkeeping sits
//! behind a mutex that only that worker takes, briefly and never across an `.await`.
//!
//! Over HTTP/1.1 a connection carries one exchange at a time. Once an answer has been read, its
//! connection waits idle for the next request; the most recently used is taken first, so that
//! the rest age out when traffic drops: one idle for over a minute is closed when a request
//! next looks for a connection (with no requests at all, idle connections stay open until the
//! upstream closes them, which its task sees at once). A request that finds none idle opens a
//! new one while the pool has fewer than `upstream.max_connections_per_worker` (idle, busy and
//! opening alike), and otherwise queues, first come first served, for the next one returned.
//! Over HTTP/2 the pool keeps one connection that all the worker's requests share, and opens
//! another once it closes. In `auto` mode the first connection's ALPN decides which of the two
//! the pool does, until a later connection says otherwise.
//!
//! A request is sent a second time only when the upstream provably never saw it: hyper gave it
//! back from a kept-alive HTTP/1.1 connection that turned out closed before a byte of it was
//! written, or HTTP/2 refused its stream (`REFUSED_STREAM`, or a graceful `GOAWAY` whose last
//! stream id is below it). The second attempt goes out on a new connection, and there is no third.
//! Anything that fails after the upstream may have read the request is the caller's error to
//! report: starting a Datafold connection test twice is not the gateway's call to make.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{Http2Mode, Upstream as UpstreamConfig};
use crate::error::TlsError;
use crate::upstream::root_store;
use crate::Body;

/// How long a kept-alive HTTP/1.1 connection may wait for its next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Quiet time on a connection before TCP starts probing whether the upstream is still there.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// What [`Pool::send`] fails with: a [`ConnectError`], or hyper's error for a broken exchange.
pub type Error = Box<dyn StdError + Send + Sync>;

/// Settings and TLS configuration shared by every worker's pool; cheap to clone.
#[derive(Clone)]
pub struct Connector {
    settings: Arc<Settings>,
}

struct Settings {
    tls: TlsConnector,
    server_name: ServerName<'static>,
    /// The host to resolve: the URL's, without the brackets of an IPv6 literal.
    host: Box<str>,
    port: u16,
    /// The URL's authority without a default `:443`, as HTTP/2's `:authority`...
    authority: Authority,
    /// ...and as HTTP/1.1's `Host`, which hyper's connection API leaves to us.
    host_header: HeaderValue,
    connect_timeout: Duration,
    max_connections: usize,
    http2: Http2Mode,
}

impl Connector {
    /// Checks `[upstream]` (trust roots, the URL's host as a TLS name); errors name the key.
    pub fn new(config: &UpstreamConfig) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::UpstreamProtocols)?
            .with_root_certificates(root_store(config.ca_file.as_deref())?)
            .with_no_client_auth();
        tls.alpn_protocols = match config.http2 {
            Http2Mode::Auto => vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()],
            Http2Mode::Never => vec![ALPN_HTTP11.to_vec()],
            Http2Mode::Always => vec![ALPN_H2.to_vec()],
        };
        let url = &config.url.authority;
        let port = url.port_u16().unwrap_or(443);
        let host = url.host();
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let server_name =
            ServerName::try_from(bare.to_owned()).map_err(|source| TlsError::UpstreamName {
                host: host.to_owned(),
                source,
            })?;
        let authority = if url.port_u16() == Some(443) {
            Authority::try_from(host).map_err(TlsError::UpstreamAuthority)?
        } else {
            url.clone()
        };
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|source| TlsError::HostHeader {
                authority: authority.to_string(),
                source,
            })?;
        Ok(Self {
            settings: Arc::new(Settings {
                tls: TlsConnector::from(Arc::new(tls)),
                server_name,
                host: bare.into(),
                port,
                authority,
                host_header,
                connect_timeout: config.connect_timeout,
                max_connections: config.max_connections_per_worker,
                http2: config.http2,
            }),
        })
    }

    /// A new, empty pool for one worker; `retries` counts the requests it sends a second time.
    pub fn pool(&self, retries: Counter) -> Pool {
        let protocol = match self.settings.http2 {
            Http2Mode::Never => Some(Protocol::Http1),
            Http2Mode::Always => Some(Protocol::Http2),
            Http2Mode::Auto => None,
        };
        Pool {
            shared: Arc::new(Shared {
                settings: self.settings.clone(),
                retries,
                state: Mutex::new(State {
                    protocol,
                    idle: VecDeque::new(),
                    http1: 0,
                    returning: 0,
                    http2: None,
                    opening_http2: false,
                    generation: 0,
                    waiting: VecDeque::new(),
                }),
            }),
        }
    }
}

/// One worker's connections to the upstream; cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// Sends `request` (its target in origin form or absolute) and returns the answer's head,
    /// its body still streaming from the connection. Not bounded in time: the caller is.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Incoming>, Error> {
        let pool = &self.shared;
        let mut retry = None;
        loop {
            let sent = match pool.checkout(retry).await? {
                Conn::Http1(lease) => pool.send_http1(lease, request, retry.is_some()).await?,
                Conn::Http2(conn) => pool.send_http2(conn, request, retry.is_some()).await?,
            };
            match sent {
                Sent::Answered(response) => return Ok(response),
                Sent::Unseen {
                    request: unseen,
                    error,
                    stale,
                } => {
                    if retry.is_some() {
                        return Err(error.into());
                    }
                    pool.retries.inc();
                    tracing::debug!(
                        upstream = %pool.settings.authority,
                        error = %error,
                        "the upstream never saw the request; sending it again on a new connection"
                    );
                    retry = Some(stale);
                    request = unseen;
                }
            }
        }
    }

    /// Kept-alive HTTP/1.1 connections waiting for a request at this moment.
    pub fn idle_connections(&self) -> usize {
        self.shared.lock().idle.len()
    }
}

/// Why a connection to the upstream could not be opened. Cheap to clone: every request waiting
/// for the same HTTP/2 connection gets the same error.
#[derive(Debug, Clone)]
pub struct ConnectError {
    message: Arc<str>,
    cause: Option<Arc<dyn StdError + Send + Sync>>,
}

impl ConnectError {
    fn new(message: String) -> Self {
        Self {
            message: message.into(),
            cause: None,
        }
    }

    fn caused_by(message: String, cause: impl StdError + Send + Sync + 'static) -> Self {
        Self {
            message: message.into(),
            cause: Some(Arc::new(cause)),
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for ConnectError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.cause
            .as_deref()
            .map(|cause| cause as &(dyn StdError + 'static))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

struct Shared {
    settings: Arc<Settings>,
    retries: Counter,
    state: Mutex<State>,
}

struct State {
    /// What the upstream spoke on the latest connection; `None` until one is open (`auto`).
    protocol: Option<Protocol>,
    /// Kept-alive HTTP/1.1 connections, the most recently used at the back.
    idle: VecDeque<Idle>,
    /// HTTP/1.1 connections counted against the limit: idle, busy and being opened.
    http1: usize,
    /// Of those, the ones whose answer is still being read; idle again soon.
    returning: usize,
    /// The HTTP/2 connection all requests share, once open.
    http2: Option<Http2Conn>,
    opening_http2: bool,
    /// Numbers HTTP/2 connections, so that a retry can ask for another than the one it left.
    generation: u64,
    /// Requests waiting for a connection, oldest first.
    waiting: VecDeque<oneshot::Sender<Grant>>,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

#[derive(Clone)]
struct Http2Conn {
    generation: u64,
    sender: http2::SendRequest<Body>,
}

/// What a request is given to send on.
enum Conn {
    Http1(Lease),
    Http2(Http2Conn),
}

/// What a waiting request receives.
enum Grant {
    Http1(Lease),
    Http2(Http2Conn),
    Failed(ConnectError),
}

/// The connection a retry must not go out on again.
#[derive(Debug, Clone, Copy)]
enum Stale {
    Http1,
    Http2(u64),
}

/// How one attempt ended, short of an error to report.
enum Sent {
    Answered(Response<Incoming>),
    /// The upstream never saw the request, given back to try once more.
    Unseen {
        request: Request<Body>,
        error: hyper::Error,
        stale: Stale,
    },
}

/// One HTTP/1.1 connection counted against the limit, held by a request: a kept-alive
/// connection to reuse, or (`sender` empty) room to open one. Dropped, it goes back to the
/// pool, idle if its connection can carry another request, or else as room for a new one.
struct Lease {
    pool: Arc<Shared>,
    sender: Option<http1::SendRequest<Body>>,
    /// The connection has carried an exchange before: closed on arrival, it was stale.
    reused: bool,
    /// Counted in `State::returning` until given back.
    returning: bool,
    /// Still counted in `State::http1`: cleared once the pool has taken it back by hand.
    counted: bool,
}

impl Lease {
    /// Takes the connection out without giving it back; for the pool, holding its lock.
    fn defuse(mut self) -> Option<http1::SendRequest<Body>> {
        self.counted = false;
        self.sender.take()
    }

    /// Gives the connection back once it can take another request: at once if it already can,
    /// otherwise from a task that waits while the caller reads the answer's body.
    fn return_when_ready(mut self) {
        if self.sender.as_ref().is_some_and(|s| s.is_ready()) {
            return;
        }
        self.pool.lock().returning += 1;
        self.returning = true;
        tokio::spawn(async move {
            let mut lease = self;
            if let Some(sender) = lease.sender.as_mut() {
                // An error means the connection is gone: dropping the lease then frees its room.
                let _ = sender.ready().await;
            }
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.counted {
            self.pool.give_back(self.sender.take(), self.returning);
        }
    }
}

/// Takes back a lease refused by a request that stopped waiting, without dropping it (which
/// would take the pool's lock again).
fn defused(grant: Grant) -> Option<http1::SendRequest<Body>> {
    match grant {
        Grant::Http1(lease) => lease.defuse(),
        Grant::Http2(_) | Grant::Failed(_) => None,
    }
}

/// Whether a kept-alive HTTP/1.1 connection can take a request now.
fn usable(sender: &http1::SendRequest<Body>) -> bool {
    !sender.is_closed() && sender.is_ready()
}

/// What a checkout comes to, decided under the lock.
enum Step {
    Use(Conn),
    Wait(oneshot::Receiver<Grant>),
    /// An answer is being read on a connection that will be idle in a moment: let its task
    /// run once before opening another.
    Yield,
}

impl State {
    /// The most recently used healthy idle connection; the stale and the closed are dropped.
    fn take_idle(&mut self) -> Option<http1::SendRequest<Body>> {
        let now = Instant::now();
        while let Some(oldest) = self.idle.front() {
            if now.duration_since(oldest.since) < IDLE_TIMEOUT {
                break;
            }
            self.idle.pop_front();
            self.http1 -= 1;
        }
        while let Some(idle) = self.idle.pop_back() {
            if usable(&idle.sender) {
                return Some(idle.sender);
            }
            self.http1 -= 1;
        }
        None
    }

    fn wait(&mut self) -> oneshot::Receiver<Grant> {
        while self.waiting.front().is_some_and(|w| w.is_closed()) {
            self.waiting.pop_front();
        }
        let (tx, rx) = oneshot::channel();
        self.waiting.push_back(tx);
        rx
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lease(self: &Arc<Self>, sender: Option<http1::SendRequest<Body>>, reused: bool) -> Lease {
        Lease {
            pool: self.clone(),
            sender,
            reused,
            returning: false,
            counted: true,
        }
    }

    /// A connection for one attempt: idle or shared if there is one, otherwise room to open
    /// one, otherwise a place in the queue.
    async fn checkout(self: &Arc<Self>, retry: Option<Stale>) -> Result<Conn, Error> {
        let mut may_yield = true;
        loop {
            let waiting = match self.checkout_now(retry, may_yield) {
                Step::Use(conn) => return Ok(conn),
                Step::Yield => {
                    may_yield = false;
                    tokio::task::yield_now().await;
                    continue;
                }
                Step::Wait(waiting) => waiting,
            };
            match waiting.await {
                Ok(Grant::Http1(lease)) => return Ok(Conn::Http1(lease)),
                Ok(Grant::Http2(conn)) => return Ok(Conn::Http2(conn)),
                Ok(Grant::Failed(error)) => return Err(error.into()),
                // Let go of without an answer: ask again.
                Err(_) => {}
            }
        }
    }

    fn checkout_now(self: &Arc<Self>, retry: Option<Stale>, may_yield: bool) -> Step {
        let mut state = self.lock();
        match state.protocol {
            Some(Protocol::Http1) => {
                // A retry never goes out on a kept-alive connection: it is one of those that
                // just turned out stale.
                if retry.is_none() {
                    if let Some(sender) = state.take_idle() {
                        return Step::Use(Conn::Http1(self.lease(Some(sender), true)));
                    }
                    if may_yield && state.returning > 0 {
                        return Step::Yield;
                    }
                }
                if state.http1 < self.settings.max_connections {
                    state.http1 += 1;
                    return Step::Use(Conn::Http1(self.lease(None, false)));
                }
                // At the limit, a retry takes the room of the oldest idle connection (closed
                // on the way) rather than wait for a busy one.
                if retry.is_some() {
                    if let Some(oldest) = state.idle.pop_front() {
                        return Step::Use(Conn::Http1(self.lease(Some(oldest.sender), true)));
                    }
                }
                Step::Wait(state.wait())
            }
            None | Some(Protocol::Http2) => {
                if let Some(conn) = &state.http2 {
                    let left = matches!(retry, Some(Stale::Http2(g)) if g == conn.generation);
                    if !left && !conn.sender.is_closed() {
                        return Step::Use(Conn::Http2(conn.clone()));
                    }
                    state.http2 = None;
                }
                // Opened apart from any one request, so that the requests waiting for it get
                // it even if the one that asked first stops waiting.
                if !state.opening_http2 {
                    state.opening_http2 = true;
                    tokio::spawn(open_shared(self.clone()));
                }
                Step::Wait(state.wait())
            }
        }
    }

    /// Takes back an HTTP/1.1 connection (or, `None`, the room for one).
    fn give_back(self: &Arc<Self>, sender: Option<http1::SendRequest<Body>>, returning: bool) {
        let mut state = self.lock();
        if returning {
            state.returning -= 1;
        }
        let keep = state.protocol == Some(Protocol::Http1);
        match sender.filter(|s| keep && usable(s)) {
            Some(sender) => self.hand_over(&mut state, sender, true),
            None => {
                state.http1 -= 1;
                self.grant_room(&mut state);
            }
        }
    }

    /// Gives a ready HTTP/1.1 connection to the request that has waited longest, or keeps it.
    fn hand_over(
        self: &Arc<Self>,
        state: &mut State,
        mut sender: http1::SendRequest<Body>,
        reused: bool,
    ) {
        while let Some(waiter) = state.waiting.pop_front() {
            match waiter.send(Grant::Http1(self.lease(Some(sender), reused))) {
                Ok(()) => return,
                Err(refused) => match defused(refused) {
                    Some(back) => sender = back,
                    None => return,
                },
            }
        }
        state.idle.push_back(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// Lets waiting requests open HTTP/1.1 connections while there is room.
    fn grant_room(self: &Arc<Self>, state: &mut State) {
        if state.protocol != Some(Protocol::Http1) {
            return;
        }
        while state.http1 < self.settings.max_connections {
            let Some(waiter) = state.waiting.pop_front() else {
                return;
            };
            state.http1 += 1;
            if let Err(refused) = waiter.send(Grant::Http1(self.lease(None, false))) {
                defused(refused);
                state.http1 -= 1;
            }
        }
    }

    /// Makes `sender` the connection all requests share, and hands it to those waiting.
    fn install_http2(
        self: &Arc<Self>,
        state: &mut State,
        sender: http2::SendRequest<Body>,
    ) -> Http2Conn {
        state.protocol = Some(Protocol::Http2);
        state.generation += 1;
        let conn = Http2Conn {
            generation: state.generation,
            sender,
        };
        state.http2 = Some(conn.clone());
        // Kept-alive HTTP/1.1 connections will not be asked for any more.
        state.http1 -= state.idle.len();
        state.idle.clear();
        for waiter in state.waiting.drain(..) {
            if let Err(refused) = waiter.send(Grant::Http2(conn.clone())) {
                defused(refused);
            }
        }
        conn
    }

    async fn send_http1(
        self: &Arc<Self>,
        mut lease: Lease,
        mut request: Request<Body>,
        retry: bool,
    ) -> Result<Sent, Error> {
        if retry {
            lease.sender = None;
            lease.reused = false;
        }
        let mut sender = match lease.sender.take() {
            Some(sender) => sender,
            None => match self.settings.connect().await? {
                Opened::Http1(sender) => sender,
                Opened::Http2(sender) => {
                    // The upstream speaks HTTP/2 now: this room is not needed.
                    let conn = self.install_http2(&mut self.lock(), sender);
                    drop(lease);
                    return self.send_http2(conn, request, retry).await;
                }
            },
        };
        self.settings.http1_form(&mut request);
        match sender.try_send_request(request).await {
            Ok(response) => {
                lease.sender = Some(sender);
                lease.return_when_ready();
                Ok(Sent::Answered(response))
            }
            Err(mut failed) => {
                let unseen = failed.take_message();
                let error = failed.into_error();
                match unseen {
                    Some(request) if lease.reused => Ok(Sent::Unseen {
                        request,
                        error,
                        stale: Stale::Http1,
                    }),
                    _ => Err(error.into()),
                }
            }
        }
    }

    async fn send_http2(
        &self,
        conn: Http2Conn,
        mut request: Request<Body>,
        retry: bool,
    ) -> Result<Sent, Error> {
        self.settings.http2_form(&mut request);
        // hyper keeps the request once HTTP/2 has taken it, even if the stream is then
        // refused: a copy (the body is shared, not copied) is what a retry would send.
        let copy = (!retry).then(|| request.clone());
        let stale = Stale::Http2(conn.generation);
        let mut sender = conn.sender;
        match sender.try_send_request(request).await {
            Ok(response) => Ok(Sent::Answered(response)),
            Err(mut failed) => {
                let unseen = failed.take_message();
                let error = failed.into_error();
                match unseen.or_else(|| copy.filter(|_| never_processed(&error))) {
                    Some(request) => Ok(Sent::Unseen {
                        request,
                        error,
                        stale,
                    }),
                    None => Err(error.into()),
                }
            }
        }
    }
}

/// Opens the HTTP/2 connection the pool will share (or, in `auto` mode against an upstream
/// that chose HTTP/1.1, its first HTTP/1.1 connection), then serves the requests waiting.
async fn open_shared(pool: Arc<Shared>) {
    let opened = pool.settings.connect().await;
    let mut state = pool.lock();
    state.opening_http2 = false;
    match opened {
        Ok(Opened::Http2(sender)) => {
            pool.install_http2(&mut state, sender);
        }
        Ok(Opened::Http1(sender)) => {
            state.protocol = Some(Protocol::Http1);
            state.http1 += 1;
            pool.hand_over(&mut state, sender, false);
            pool.grant_room(&mut state);
        }
        Err(error) => {
            for waiter in state.waiting.drain(..) {
                if let Err(refused) = waiter.send(Grant::Failed(error.clone())) {
                    defused(refused);
                }
            }
        }
    }
}

/// Whether HTTP/2 says the upstream never processed the request: its stream was refused, or
/// a graceful `GOAWAY` excluded it. The h2 crate hands such a GOAWAY to exactly the streams
/// above its last stream id, and to requests not yet given a stream; the streams the upstream
/// may have started on end with other errors.
fn never_processed(error: &hyper::Error) -> bool {
    let mut cause = error.source();
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            let refused = h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            // Only a graceful GOAWAY: after one with an error code, h2 ends the streams the
            // upstream had started with that same error, and those may have been processed.
            let left = h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR);
            return h2.is_remote() && (left || refused);
        }
        cause = e.source();
    }
    false
}

/// A new connection, its task spawned on the current runtime.
enum Opened {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

impl Settings {
    /// Opens a connection: TCP, TLS, then the HTTP handshake, all within `connect_timeout`.
    async fn connect(&self) -> Result<Opened, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Ok(opened) => opened,
            Err(_) => Err(ConnectError::new(format!(
                "no connection to {} within upstream.connect_timeout ({})",
                self.authority,
                humantime::format_duration(self.connect_timeout)
            ))),
        }
    }

    async fn open(&self) -> Result<Opened, ConnectError> {
        let stream = self.open_tls().await?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
        if self.http2 == Http2Mode::Always && !h2 {
            return Err(ConnectError::new(format!(
                "{} did not choose HTTP/2 in the TLS handshake, and upstream.http2 = \"always\"",
                self.authority
            )));
        }
        let io = TokioIo::new(stream);
        let handshake_failed = |e| {
            ConnectError::caused_by(format!("HTTP handshake with {} failed", self.authority), e)
        };
        if h2 {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(handshake_failed)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            Ok(Opened::Http2(sender))
        } else {
            let (sender, connection) = http1::handshake(io).await.map_err(handshake_failed)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Opened::Http1(sender))
        }
    }

    async fn open_tls(&self) -> Result<TlsStream<TcpStream>, ConnectError> {
        let tcp = TcpStream::connect((&*self.host, self.port))
            .await
            .map_err(|e| {
                ConnectError::caused_by(format!("cannot connect to {}", self.authority), e)
            })?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        if let Err(e) = tcp
            .set_nodelay(true)
            .and_then(|()| socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive))
        {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY and keepalive on an upstream connection");
        }
        self.tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| self.tls_failed(e))
    }

    fn tls_failed(&self, error: std::io::Error) -> ConnectError {
        let no_common_protocol = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .is_some_and(|e| {
                matches!(
                    e,
                    rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
                )
            });
        if no_common_protocol {
            // Not a certificate problem: said without the TLS error, so that it is not
            // classified as one.
            let allowed = match self.http2 {
                Http2Mode::Auto => "auto",
                Http2Mode::Never => "never",
                Http2Mode::Always => "always",
            };
            return ConnectError::new(format!(
                "{} accepts none of the protocols upstream.http2 = \"{allowed}\" offers in the TLS handshake",
                self.authority
            ));
        }
        ConnectError::caused_by(
            format!("TLS handshake with {} failed", self.authority),
            error,
        )
    }

    /// HTTP/1.1 wants the target in origin form and the upstream's name in `Host`.
    fn http1_form(&self, request: &mut Request<Body>) {
        let uri = request.uri_mut();
        if uri.scheme().is_some() || uri.authority().is_some() {
            let mut parts = std::mem::take(uri).into_parts();
            parts.scheme = None;
            parts.authority = None;
            *uri = Uri::from_parts(parts).expect("a path alone is a URI");
        }
        request.headers_mut().insert(HOST, self.host_header.clone());
        *request.version_mut() = Version::HTTP_11;
    }

    /// HTTP/2 takes the upstream's name from the target, which must be absolute.
    fn http2_form(&self, request: &mut Request<Body>) {
        let uri = request.uri_mut();
        let mut parts = std::mem::take(uri).into_parts();
        parts.scheme = Some(Scheme::HTTPS);
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        *uri = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
        request.headers_mut().remove(HOST);
        *request.version_mut() = Version::HTTP_2;
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::error::UpstreamFailure;

    fn connector(url: &str, customize: impl FnOnce(&mut UpstreamConfig)) -> Connector {
        let mut config = UpstreamConfig {
            url: url.parse().unwrap(),
            ..UpstreamConfig::default()
        };
        customize(&mut config);
        Connector::new(&config).unwrap()
    }

    fn request(uri: &str) -> Request<Body> {
        Request::post(uri).body(Body::default()).unwrap()
    }

    #[test]
    fn alpn_offer_follows_upstream_http2() {
        for (mode, offer) in [
            (Http2Mode::Auto, vec![b"h2".to_vec(), b"http/1.1".to_vec()]),
            (Http2Mode::Never, vec![b"http/1.1".to_vec()]),
            (Http2Mode::Always, vec![b"h2".to_vec()]),
        ] {
            let connector = connector("https://datafold.example", |c| c.http2 = mode);
            assert_eq!(connector.settings.tls.config().alpn_protocols, offer);
        }
    }

    #[test]
    fn the_upstream_is_named_without_its_default_port() {
        let default_port = connector("https://datafold.example:443/prefix", |_| {});
        assert_eq!(default_port.settings.authority, "datafold.example");
        assert_eq!(default_port.settings.host_header, "datafold.example");
        assert_eq!(default_port.settings.port, 443);
        let other_port = connector("https://[::1]:8443", |_| {});
        assert_eq!(other_port.settings.authority, "[::1]:8443");
        assert_eq!(&*other_port.settings.host, "::1");
        assert!(matches!(
            other_port.settings.server_name,
            ServerName::IpAddress(_)
        ));
    }

    #[test]
    fn an_unreadable_ca_file_is_named_by_its_key() {
        let mut config = UpstreamConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..UpstreamConfig::default()
        };
        config.http2 = Http2Mode::Never;
        let err = Connector::new(&config).err().unwrap().to_string();
        assert!(err.starts_with("upstream.ca_file:"), "{err}");
    }

    #[test]
    fn http1_requests_go_out_in_origin_form_with_host() {
        let settings = connector("https://datafold.example:8443", |_| {}).settings;
        for uri in ["/api/v1/x?y=1", "https://elsewhere.example/api/v1/x?y=1"] {
            let mut request = request(uri);
            request
                .headers_mut()
                .insert(HOST, "caller".parse().unwrap());
            settings.http1_form(&mut request);
            assert_eq!(request.uri(), "/api/v1/x?y=1");
            assert_eq!(request.headers()[HOST], "datafold.example:8443");
            assert_eq!(request.version(), Version::HTTP_11);
        }
    }

    #[test]
    fn http2_requests_carry_the_upstream_in_an_absolute_target() {
        let settings = connector("https://datafold.example", |_| {}).settings;
        let mut request = request("/api/v1/x");
        request
            .headers_mut()
            .insert(HOST, "caller".parse().unwrap());
        settings.http2_form(&mut request);
        assert_eq!(request.uri(), "https://datafold.example/api/v1/x");
        assert!(request.headers().get(HOST).is_none());
        assert_eq!(request.version(), Version::HTTP_2);
    }

    #[test]
    fn failing_to_connect_is_classified_as_connect_even_when_timed_out() {
        let refused = ConnectError::caused_by(
            "cannot connect".into(),
            io::Error::from(io::ErrorKind::ConnectionRefused),
        );
        let timed_out = ConnectError::caused_by(
            "cannot connect".into(),
            io::Error::from(io::ErrorKind::TimedOut),
        );
        let deadline = ConnectError::new("no connection within upstream.connect_timeout".into());
        for error in [refused, timed_out, deadline] {
            assert_eq!(UpstreamFailure::classify(&error), UpstreamFailure::Connect);
        }
        let untrusted = ConnectError::caused_by(
            "TLS handshake failed".into(),
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            ),
        );
        assert_eq!(UpstreamFailure::classify(&untrusted), UpstreamFailure::Tls);
    }

    /// A pool of HTTP/1.1 connections at most `max`, never opened: the accounting alone.
    fn http1_pool(max: usize) -> Arc<Shared> {
        connector("https://127.0.0.1:9", |c| {
            c.http2 = Http2Mode::Never;
            c.max_connections_per_worker = max;
        })
        .pool(Counter::default())
        .shared
    }

    async fn room(pool: &Arc<Shared>) -> Lease {
        match pool.checkout(None).await.unwrap() {
            Conn::Http1(lease) => lease,
            Conn::Http2(_) => panic!("an HTTP/1.1 pool gave an HTTP/2 connection"),
        }
    }

    #[tokio::test]
    async fn past_the_limit_requests_wait_in_order_for_room() {
        let pool = http1_pool(1);
        let first = room(&pool).await;
        let granted = Arc::new(Mutex::new(Vec::new()));
        // Spawned in this order on a single-threaded runtime: they queue in this order.
        let waiting: Vec<_> = ["second", "third"]
            .into_iter()
            .map(|name| {
                let (pool, granted) = (pool.clone(), granted.clone());
                tokio::spawn(async move {
                    let lease = room(&pool).await;
                    granted.lock().unwrap().push(name);
                    drop(lease);
                })
            })
            .collect();
        while pool.lock().waiting.len() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.lock().http1, 1);
        // Room for a connection that never opened: the first in line may open one, then the
        // next once that room is given back.
        drop(first);
        for task in waiting {
            task.await.unwrap();
        }
        assert_eq!(*granted.lock().unwrap(), ["second", "third"]);
        assert_eq!(pool.lock().http1, 0);
    }

    #[tokio::test]
    async fn room_given_to_a_request_that_stopped_waiting_is_not_lost() {
        // Whether the request gives up before the room is handed to it or just after.
        for handed_first in [false, true] {
            let pool = http1_pool(1);
            let first = room(&pool).await;
            let gave_up = tokio::spawn({
                let pool = pool.clone();
                async move { drop(room(&pool).await) }
            });
            while pool.lock().waiting.is_empty() {
                tokio::task::yield_now().await;
            }
            if handed_first {
                drop(first);
                gave_up.abort();
            } else {
                gave_up.abort();
                drop(first);
            }
            let _ = gave_up.await;
            assert_eq!(pool.lock().http1, 0, "handed first: {handed_first}");
            drop(room(&pool).await);
            assert_eq!(pool.lock().http1, 0);
        }
    }
}
