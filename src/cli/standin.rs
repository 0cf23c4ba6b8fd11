//! A local stand-in for Datafold, for the demo and the integration tests.
//!
//! It speaks real TLS with a certificate from a throwaway CA made at start ([`ThrowawayCa`]),
//! answers the two connection-test endpoints the way Datafold documents them, refuses any
//! request without the expected `Authorization: Key <key>` with 401 (so a broken key injection
//! shows at once), and records every request it receives so tests can check what reached it.
//! Data source 13 is the one whose connection fails, to have something to show.
//!
//! A test that needs requests in flight closes the stand-in's gate ([`StandIn::close_gate`]):
//! requests are then recorded and held until the test opens it, and the test can wait until a
//! given number are held ([`StandIn::held`]) instead of sleeping and hoping.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A certificate authority that lives as long as the process, for local TLS only.
pub struct ThrowawayCa {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

/// A certificate and its private key, issued by a [`ThrowawayCa`].
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The same certificate and key as PEM, to write files a config can name.
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes the certificate and key as PEM files.
    pub fn write(&self, cert: &Path, key: &Path) -> std::io::Result<()> {
        std::fs::write(cert, &self.cert_pem)?;
        std::fs::write(key, &self.key_pem)
    }
}

impl ThrowawayCa {
    pub fn new(name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let issuer = rcgen::Issuer::new(params, key);
        Ok(Self { cert, issuer })
    }

    /// The CA certificate, PEM, for a trust store (`upstream.ca_file`).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn write_cert(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.cert_pem())
    }

    /// Issues a certificate for `names`: DNS names, IP addresses, or a client's name.
    pub fn issue(&self, names: &[&str]) -> Result<Issued, Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        self.sign(params)
    }

    /// Issues a client certificate with `dns_names` as its DNS names and `common_name`, if any,
    /// as its subject.
    pub fn issue_client(
        &self,
        dns_names: &[&str],
        common_name: Option<&str>,
    ) -> Result<Issued, Error> {
        let mut params =
            CertificateParams::new(dns_names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = DistinguishedName::new();
        if let Some(name) = common_name {
            params.distinguished_name.push(DnType::CommonName, name);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Issued, Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A rustls server configuration for `names`, offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self, names: &[&str]) -> Result<Arc<ServerConfig>, Error> {
        self.server_config_offering(names, &[b"h2", b"http/1.1"])
    }

    /// A rustls server configuration for `names`, offering the `alpn` protocols.
    pub fn server_config_offering(
        &self,
        names: &[&str],
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, Error> {
        let issued = self.issue(names)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(issued.chain, issued.key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// One request as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    /// Path and query as sent.
    pub target: String,
    pub version: Version,
    /// The `Host` header, or the `:authority` of an HTTP/2 request.
    pub host: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A running stand-in; stops when dropped.
pub struct StandIn {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    expected_authorization: String,
    received: Mutex<Vec<Received>>,
    jobs: Mutex<HashMap<i64, i64>>,
    next_job: AtomicI64,
    delay_ms: AtomicU64,
    connections: AtomicU64,
    /// Whether requests may be answered (`true`) or must wait at the gate.
    gate_open: watch::Sender<bool>,
    /// How many requests are waiting at the gate now.
    held: watch::Sender<usize>,
}

impl StandIn {
    /// Listens on an ephemeral loopback port and serves until dropped.
    pub async fn start(tls: Arc<ServerConfig>, api_key: &str) -> Result<Self, Error> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            expected_authorization: format!("Key {api_key}"),
            received: Mutex::new(Vec::new()),
            jobs: Mutex::new(HashMap::new()),
            next_job: AtomicI64::new(1001),
            delay_ms: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            gate_open: watch::Sender::new(true),
            held: watch::Sender::new(0),
        });
        let acceptor = TlsAcceptor::from(tls);
        let task = tokio::spawn(accept_loop(listener, acceptor, state.clone()));
        Ok(Self { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as `upstream.url` (its certificate names 127.0.0.1).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Every request received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("not poisoned").clone()
    }

    /// TLS connections accepted so far: one per handshake.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// Holds every request received from now on, once recorded, until [`open_gate`](Self::open_gate).
    pub fn close_gate(&self) {
        self.state.gate_open.send_replace(false);
    }

    /// Lets the held requests, and every later one, be answered.
    pub fn open_gate(&self) {
        self.state.gate_open.send_replace(true);
    }

    /// Resolves once at least `count` requests are waiting at the closed gate.
    pub async fn held(&self, count: usize) {
        let mut held = self.state.held.subscribe();
        // The sender lives in `state`, which `self` keeps: this cannot fail.
        let _ = held.wait_for(|held| *held >= count).await;
    }

    /// Makes every answer wait this long first, to stand in for an upstream slower than the
    /// gateway's timeout. To keep requests in flight for as long as a test needs, use the gate.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<State>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        connections.spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            state.connections.fetch_add(1, Ordering::Relaxed);
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, request).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn answer(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    state.received.lock().expect("not poisoned").push(Received {
        method: parts.method.clone(),
        target: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        version: parts.version,
        host: parts
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string())),
        headers: parts.headers.clone(),
        body,
    });
    wait_at_gate(state).await;
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    let authorized = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == state.expected_authorization.as_bytes());
    if !authorized {
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"detail": "Invalid API key"}),
        );
    }
    let segments: Vec<&str> = parts.uri.path().split('/').collect();
    match (&parts.method, segments.as_slice()) {
        (&Method::POST, ["", "api", "v1", "data_sources", id, "test"]) => match id.parse::<i64>() {
            Ok(data_source_id) => {
                let job_id = state.next_job.fetch_add(1, Ordering::Relaxed);
                state
                    .jobs
                    .lock()
                    .expect("not poisoned")
                    .insert(job_id, data_source_id);
                json(StatusCode::OK, serde_json::json!({ "job_id": job_id }))
            }
            Err(_) => invalid("data_source_id"),
        },
        (&Method::GET, ["", "api", "v1", "data_sources", "test", job]) => {
            match job.parse::<i64>() {
                Ok(job_id) => {
                    let data_source_id = state
                        .jobs
                        .lock()
                        .expect("not poisoned")
                        .get(&job_id)
                        .copied();
                    match data_source_id {
                        Some(id) => json(StatusCode::OK, results(job_id, id)),
                        None => json(
                            StatusCode::NOT_FOUND,
                            serde_json::json!({"detail": "Job not found"}),
                        ),
                    }
                }
                Err(_) => invalid("job_id"),
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"detail": "Not Found"}),
        ),
    }
}

/// Waits while the gate is closed, counted in `held` until it opens or the request is dropped
/// (the gateway gave up on it).
async fn wait_at_gate(state: &State) {
    let mut open = state.gate_open.subscribe();
    if *open.borrow_and_update() {
        return;
    }
    struct Held<'a>(&'a watch::Sender<usize>);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.send_modify(|held| *held -= 1);
        }
    }
    state.held.send_modify(|held| *held += 1);
    let _held = Held(&state.held);
    let _ = open.wait_for(|open| *open).await;
}

/// A finished test's results: connection fails for data source 13, succeeds otherwise.
fn results(job_id: i64, data_source_id: i64) -> serde_json::Value {
    let connected = data_source_id != 13;
    let connection = if connected {
        serde_json::json!({"code": "OK", "message": "Connected to the data source", "outcome": "success"})
    } else {
        serde_json::json!({"code": "CONNECTION_FAILED", "message": "password authentication failed", "outcome": "failed"})
    };
    serde_json::json!({
        "id": job_id,
        "status": if connected { "done" } else { "failed" },
        "results": [
            {"step": "connection", "status": if connected { "done" } else { "failed" }, "result": connection},
            {"step": "temp_schema", "status": if connected { "done" } else { "cancelled" }, "result": null},
        ]
    })
}

fn invalid(param: &str) -> Response<Full<Bytes>> {
    json(
        StatusCode::UNPROCESSABLE_ENTITY,
        serde_json::json!({"detail": [{"loc": ["path", param], "msg": "Input should be a valid integer, unable to parse string as an integer", "type": "int_parsing"}]}),
    )
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    // Datafold's quota (which the gateway passes back to callers), and headers it does not
    // pass: one of the upstream's own, a cookie for the key's user, and the upstream's own
    // request id (the caller must get the gateway's).
    let headers = [
        ("content-type", "application/json"),
        ("x-ratelimit-remaining", "99"),
        ("x-datafold-request", "standin"),
        ("set-cookie", "session=standin-session; Secure; HttpOnly"),
        ("x-request-id", "standin-side-id"),
    ];
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(name, http::HeaderValue::from_static(value));
    }
    response
}
