//! Shared harness for the integration tests: a Datafold stand-in over real TLS with a throwaway
//! CA, and the gateway in front of it, both on ephemeral loopback ports.

pub mod serve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use datafold_gateway::cli::standin::{StandIn, ThrowawayCa};
use datafold_gateway::config::{ApiKeySource, Config};
use datafold_gateway::gateway::Gateway;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The Datafold key the gateway holds in tests; checked for in logs and audit lines.
pub const API_KEY: &str = "dfk_live_TESTKEY_7f3a9c2e51d04b8a";

pub struct Harness {
    pub dir: tempfile::TempDir,
    /// Reloads and reopens, as SIGHUP and SIGUSR1 do in the binary.
    pub control: datafold_gateway::reload::Control,
    pub ca: ThrowawayCa,
    pub upstream: StandIn,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub audit_file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    run: Option<tokio::task::JoinHandle<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// The key file's name in the folder [`config_for`] writes into.
pub const API_KEY_FILE: &str = "datafold-api-key";

/// A config pointing at `upstream`, with everything written into `dir`.
pub fn config_for(dir: &Path, ca: &ThrowawayCa, upstream_url: &str) -> Config {
    let ca_file = dir.join("ca.pem");
    ca.write_cert(&ca_file).unwrap();
    let key_file = dir.join(API_KEY_FILE);
    std::fs::write(&key_file, format!("{API_KEY}\n")).unwrap();
    let mut config = Config::default();
    config.listen.addr = "127.0.0.1:0".parse().unwrap();
    config.admin.addr = "127.0.0.1:0".parse().unwrap();
    config.upstream.url = upstream_url.parse().unwrap();
    config.upstream.ca_file = Some(ca_file);
    config.upstream.timeout = Duration::from_secs(5);
    config.api_key = ApiKeySource::File(key_file);
    config.audit.file = dir.join("audit.jsonl");
    config
}

impl Harness {
    /// Starts a stand-in and a gateway in front of it; `customize` adjusts the config.
    pub async fn start(customize: impl FnOnce(&mut Config)) -> Self {
        Self::start_in(|_, _, config| customize(config)).await
    }

    /// As [`start`](Self::start); `customize` also gets the test folder, to write files into,
    /// and the CA, to issue certificates from.
    pub async fn start_in(customize: impl FnOnce(&Path, &ThrowawayCa, &mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = ThrowawayCa::new("test CA").unwrap();
        let upstream = StandIn::start(ca.server_config(&["127.0.0.1"]).unwrap(), API_KEY)
            .await
            .unwrap();
        let mut config = config_for(dir.path(), &ca, &upstream.url());
        customize(dir.path(), &ca, &mut config);
        Self::start_with(dir, ca, upstream, config).await
    }

    pub async fn start_with(
        dir: tempfile::TempDir,
        ca: ThrowawayCa,
        upstream: StandIn,
        config: Config,
    ) -> Self {
        let audit_file = config.audit.file.clone();
        let gateway = Gateway::bind(config).await.unwrap();
        let control = gateway.control(None);
        let addr = gateway.listen_addr();
        let admin = gateway.admin_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(async move {
            gateway
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            dir,
            control,
            ca,
            upstream,
            addr,
            admin,
            audit_file,
            stop: Some(stop),
            run: Some(run),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends a request to the gateway and reads the whole answer.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
        let response = self.client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (Response::from_parts(parts, ()), body)
    }

    pub async fn post(&self, path: &str) -> (Response<()>, Bytes) {
        let request = Request::post(self.url(path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        self.send(request).await
    }

    /// Starts a POST in the background; resolves to its status, or the client's error.
    pub fn spawn_post(
        &self,
        path: &str,
    ) -> tokio::task::JoinHandle<Result<u16, hyper_util::client::legacy::Error>> {
        let client = self.client.clone();
        let request = Request::post(self.url(path))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        tokio::spawn(async move { Ok(client.request(request).await?.status().as_u16()) })
    }

    pub async fn get(&self, path: &str) -> (Response<()>, Bytes) {
        let request = Request::get(self.url(path)).body(Full::default()).unwrap();
        self.send(request).await
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let request = Request::get(format!("http://{}/metrics", self.admin))
            .body(Full::default())
            .unwrap();
        let (response, body) = self.send(request).await;
        assert_eq!(response.status(), 200);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Audit records written so far, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        read_audit(&self.audit_file)
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the gateway gracefully and waits until it has finished.
    pub async fn shutdown(&mut self) {
        self.begin_shutdown();
        if let Some(run) = self.run.take() {
            run.await.unwrap();
        }
    }
}

/// Waits (up to 10 s) until `count` requests are held at the upstream's closed gate
/// ([`StandIn::close_gate`]): they are in flight, and stay so until the test opens it.
pub async fn held_at_gate(upstream: &StandIn, count: usize) {
    tokio::time::timeout(Duration::from_secs(10), upstream.held(count))
        .await
        .unwrap_or_else(|_| panic!("{count} requests were not held at the upstream within 10 s"));
}

pub fn read_audit(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each audit line is JSON"))
        .collect()
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// An HTTPS client for the gateway's TLS listener: trusts `ca`, presents `identity` as its
/// client certificate if given, and offers the given ALPN protocols (`h2`, `http/1.1`).
pub fn tls_client(
    ca: &ThrowawayCa,
    identity: Option<&datafold_gateway::cli::standin::Issued>,
    http2: bool,
) -> TlsClient {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let tls = match identity {
        Some(issued) => builder
            .with_client_auth_cert(issued.chain.clone(), issued.key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if http2 {
        connector.enable_http2().build()
    } else {
        connector.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

pub type TlsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Sends a request with `client` and reads the whole answer.
pub async fn send_with(
    client: &TlsClient,
    request: Request<Full<Bytes>>,
) -> Result<(Response<()>, Bytes), hyper_util::client::legacy::Error> {
    let response = client.request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Ok((Response::from_parts(parts, ()), body))
}

/// The value of the sample `name` (with its labels, exactly as exposed) in metrics `text`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}
