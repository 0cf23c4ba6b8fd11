//! The configuration file, parsed once at start into typed settings.
//!
//! Every section and key has a default except the ones a deployment must decide; unknown keys are
//! an error so that a typo (`[rate_limit.globl]`) cannot silently switch a limit off. Errors name
//! the file and the key path (`rate_limit.global.rate`) and say what is wrong with it.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The validated contents of a configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: Listen,
    pub admin: Admin,
    pub upstream: Upstream,
    pub api_key: ApiKeySource,
    pub callers: Callers,
    pub rate_limit: RateLimits,
    pub audit: Audit,
    pub log: Log,
    pub limits: Limits,
    pub runtime: Runtime,
}

/// How the gateway uses the machine's cores.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Worker threads, each with its own event loop, listener socket (`SO_REUSEPORT`) and
    /// upstream connections. Unset: one per available core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
}

impl Runtime {
    /// How many workers to run: `workers`, or one per core the process may use.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Where callers connect. Loopback by default: the sidecar case.
    pub addr: SocketAddr,
    /// Certificate chain (PEM) for TLS on the listener; with `tls_key`. Plain HTTP without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that callers' client certificates must chain to; `mtls` mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Health and readiness probes; never forwards anything.
    pub addr: SocketAddr,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// Datafold's base URL; a dedicated or self-hosted install has its own.
    pub url: UpstreamUrl,
    /// Extra trust roots (PEM) on top of the public web roots, for a private CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Covers the whole upstream exchange: connect, send, and reading the full answer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Caller headers passed to Datafold besides the built-in allow-list (see `upstream.rs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forward_headers: Vec<HeaderName>,
    /// Datafold headers passed back to callers besides the built-in allow-list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub return_headers: Vec<HeaderName>,
    /// HTTP/1.1 connections each worker keeps to the upstream at most; a request finding all
    /// of them busy waits for one (within `upstream.timeout`).
    pub max_connections_per_worker: usize,
    /// Whether to speak HTTP/2 to the upstream: `auto` (if it offers it by ALPN), `never`, or
    /// `always` (fail if it does not). Over HTTP/2 each worker keeps one connection.
    pub http2: Http2Mode,
}

/// See [`Upstream::http2`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Http2Mode {
    #[default]
    Auto,
    Never,
    Always,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            url: UpstreamUrl::from_str("https://app.datafold.com").expect("default URL is valid"),
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            forward_headers: Vec::new(),
            return_headers: Vec::new(),
            max_connections_per_worker: 64,
            http2: Http2Mode::Auto,
        }
    }
}

/// An `https://` base URL, split once so that building each upstream URI is a concatenation.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub authority: Authority,
    /// Path prefix without a trailing slash; empty for a bare host.
    pub prefix: String,
    original: String,
}

impl UpstreamUrl {
    /// The upstream request target, in origin form, for a gateway path such as
    /// `/api/v1/data_sources/1/test`: the prefix, then the path. The connection pool adds the
    /// upstream's name in the form each HTTP version wants.
    pub fn target(&self, mut path: String) -> Result<Uri, http::uri::InvalidUri> {
        if !self.prefix.is_empty() {
            path.insert_str(0, &self.prefix);
        }
        PathAndQuery::try_from(path).map(Uri::from)
    }
}

impl fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uri: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTPS) {
            return Err(format!(
                "`{s}` must start with https:// (the API key is never sent in clear text)"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{s}` has no host"))?;
        if authority.as_str().contains('@') {
            // Not quoted: the user information may be a password.
            return Err("the URL must not carry user information (user:password@)".to_owned());
        }
        if uri.query().is_some() {
            return Err(format!("`{s}` must not carry a query string"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            authority,
            prefix,
            original: s.to_owned(),
        })
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.original)
    }
}

/// A header name an operator adds to an allow-list, lower-cased once here.
#[derive(Clone, PartialEq, Eq)]
pub struct HeaderName(pub http::HeaderName);

impl fmt::Debug for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        http::HeaderName::from_bytes(s.as_bytes())
            .map(Self)
            .map_err(|_| {
                serde::de::Error::custom(format!("`{}` is not a header name", s.escape_debug()))
            })
    }
}

impl Serialize for HeaderName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// Where the Datafold API key comes from: exactly one of `env` and `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeySource {
    Env(String),
    File(PathBuf),
}

impl Default for ApiKeySource {
    fn default() -> Self {
        Self::Env("DATAFOLD_API_KEY".to_owned())
    }
}

impl<'de> Deserialize<'de> for ApiKeySource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            env: Option<String>,
            file: Option<PathBuf>,
        }
        match Raw::deserialize(d)? {
            Raw {
                env: Some(name),
                file: None,
            } if is_variable_name(&name) => Ok(Self::Env(name)),
            Raw {
                env: Some(_),
                file: None,
            } => Err(serde::de::Error::custom(
                "`env` must name an environment variable (capitals, digits and _, like DATAFOLD_API_KEY), not hold the key itself",
            )),
            Raw {
                env: None,
                file: Some(path),
            } if !path.as_os_str().is_empty() => Ok(Self::File(path)),
            Raw {
                env: Some(_),
                file: Some(_),
            } => Err(serde::de::Error::custom(
                "set either `env` or `file`, not both",
            )),
            _ => Err(serde::de::Error::custom(
                "set `env = \"VARIABLE\"` or `file = \"/path/to/key\"` (non-empty)",
            )),
        }
    }
}

/// A conventional environment variable name: capitals, digits and `_`. Anything else is refused
/// without being quoted, since the likeliest mistake is the key itself pasted in its place.
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Callers {
    pub mode: CallerMode,
    /// The callers of `token` mode, each known by the SHA-256 digest of its token.
    #[serde(rename = "token", skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenCaller>,
    /// `mtls` mode: the certificate identities let through; any other gets 403. All if unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// Let every authenticated caller read every job's result, not only its own.
    pub share_results: bool,
    /// Most jobs remembered (with their caller and data source) for result polls; the oldest
    /// are forgotten first (oldest of their shard: see `JobBook`).
    pub max_tracked_jobs: usize,
}

impl Default for Callers {
    fn default() -> Self {
        Self {
            mode: CallerMode::Open,
            tokens: Vec::new(),
            allow: None,
            share_results: false,
            max_tracked_jobs: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallerMode {
    /// Anyone who can reach the listener; identity is the peer IP address.
    #[default]
    Open,
    /// `Authorization: Bearer <token>`; identity is the name of the token's entry.
    Token,
    /// A client certificate from `listen.client_ca`; identity is its first DNS name, else its CN.
    Mtls,
}

impl CallerMode {
    /// Whether callers prove who they are (and so may own jobs).
    pub fn is_authenticated(self) -> bool {
        !matches!(self, Self::Open)
    }
}

/// One `[[callers.token]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCaller {
    /// The caller's name in the audit trail, rate limits and metrics.
    pub name: String,
    /// SHA-256 of the token, hex (`datafold-gateway hash-token` prints it).
    pub sha256: TokenDigest,
    /// Overrides `rate_limit.per_caller.rate` for this caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Overrides `rate_limit.per_caller.burst` for this caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<NonZeroU32>,
}

/// The SHA-256 digest of a caller token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest(pub [u8; 32]);

impl TokenDigest {
    /// The digest of `token`.
    pub fn of(token: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token);
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Only the digest is printed, never a token; it is what the config file holds anyway.
impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for TokenDigest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The value is never quoted: a token pasted here by mistake must not reach a log.
        let bad = || {
            format!(
                "not a SHA-256 digest ({} characters): write the 64 hex characters that datafold-gateway hash-token prints, never the token itself",
                s.chars().count()
            )
        };
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut bytes = [0; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| bad())?;
        Ok(Self(bytes))
    }
}

impl<'de> Deserialize<'de> for TokenDigest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TokenDigest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Most callers, or data sources, a keyed limiter tracks at once; bounds its memory.
    pub max_tracked_keys: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global: Option<RateLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_caller: Option<RateLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_data_source: Option<RateLimit>,
    /// Requests refused for want of credentials (401/403 in `token` and `mtls` modes), per peer
    /// IP address. Always on: a stranger must not be able to cost the callers anything.
    pub unauthenticated: RateLimit,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            max_tracked_keys: 100_000,
            global: None,
            per_caller: None,
            per_data_source: None,
            unauthenticated: RateLimit {
                rate: Rate {
                    count: NonZeroU32::new(10).expect("not zero"),
                    per: Duration::from_secs(1),
                },
                burst: NonZeroU32::new(20).expect("not zero"),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub rate: Rate,
    pub burst: NonZeroU32,
}

/// `N/s`, `N/min` or `N/h`: N requests admitted per unit of time on average.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl Rate {
    /// The time it takes to earn back one request.
    pub fn replenish_interval(&self) -> Duration {
        self.per / self.count.get()
    }
}

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a rate: write N/s, N/min or N/h with N ≥ 1");
        let (count, unit) = s.split_once('/').ok_or_else(bad)?;
        let count: NonZeroU32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if per.as_nanos() < u128::from(count.get()) {
            return Err(format!("`{s}` is faster than one request per nanosecond"));
        }
        Ok(Self { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{self:?}"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// JSON lines, appended; one record per request the main listener answers.
    pub file: PathBuf,
    /// Also write each record to stdout, for log shippers.
    pub stdout: bool,
    /// What to do while records cannot be written (disk full, say).
    pub on_failure: OnAuditFailure,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            file: PathBuf::from("audit.jsonl"),
            stdout: false,
            on_failure: OnAuditFailure::Refuse,
        }
    }
}

/// `audit.on_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAuditFailure {
    /// Answer 503 `audit_unavailable` without forwarding until a record is written again: an
    /// unaudited test is a compliance hole.
    #[default]
    Refuse,
    /// Forward anyway; failures are still logged and counted.
    Continue,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter (`info`, `datafold_gateway=debug`); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted (Datafold's client sends `{}`).
    pub max_body_bytes: usize,
    /// A client must send its complete request headers (and body) within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Requests handled at once; more are answered 503 `overloaded` at once.
    pub max_concurrent_requests: usize,
    /// A request body must arrive in full within this time, read before the request takes a
    /// concurrency slot or a rate-limit token.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Largest answer read from Datafold; a larger one is 502 `upstream_response_too_large`.
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            max_concurrent_requests: 1024,
            body_read_timeout: Duration::from_secs(10),
            max_response_bytes: 1024 * 1024,
        }
    }
}

/// Headers `upstream.forward_headers` may not name, and why.
const NEVER_FORWARDED: &[(&str, &str)] = &[
    ("authorization", "the gateway sets Datafold's key itself"),
    ("proxy-authorization", "it is a credential"),
    ("cookie", "it is a credential"),
    ("x-api-key", "it is a credential"),
    ("host", "the gateway sets it to Datafold's host"),
    ("content-length", "the gateway frames the body itself"),
    (
        "transfer-encoding",
        "it describes one connection, not the request",
    ),
    ("connection", "it describes one connection, not the request"),
    ("keep-alive", "it describes one connection, not the request"),
    (
        "proxy-connection",
        "it describes one connection, not the request",
    ),
    ("te", "it describes one connection, not the request"),
    ("trailer", "it describes one connection, not the request"),
    ("upgrade", "it describes one connection, not the request"),
    ("expect", "the gateway reads the body before forwarding"),
];

/// Headers `upstream.return_headers` may not name, and why.
const NEVER_RETURNED: &[(&str, &str)] = &[
    (
        "set-cookie",
        "a cookie Datafold issues belongs to the key's user, not the caller",
    ),
    (
        "set-cookie2",
        "a cookie Datafold issues belongs to the key's user, not the caller",
    ),
    (
        "www-authenticate",
        "it describes Datafold's authentication, not the gateway's",
    ),
    (
        "proxy-authenticate",
        "it describes one connection, not the answer",
    ),
    ("content-length", "the gateway frames the answer itself"),
    (
        "transfer-encoding",
        "it describes one connection, not the answer",
    ),
    ("connection", "it describes one connection, not the answer"),
    ("keep-alive", "it describes one connection, not the answer"),
    (
        "proxy-connection",
        "it describes one connection, not the answer",
    ),
    ("trailer", "it describes one connection, not the answer"),
    ("upgrade", "it describes one connection, not the answer"),
    ("x-request-id", "the request id is the gateway's"),
];

/// Upper bounds: far beyond any sensible setting, low enough that nothing overflows.
const MAX_BODY_BYTES: usize = 1 << 30;
const MAX_CONCURRENT_REQUESTS: usize = 1_000_000;
const MAX_TRACKED_KEYS: usize = 100_000_000;
const MAX_TRACKED_JOBS: usize = 100_000_000;
const MAX_CONNECTIONS_PER_WORKER: usize = 10_000;
const MAX_WORKERS: usize = 1024;
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// A configuration problem, naming the file and, where there is one, the key at fault.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        // Not `read_to_string`: a FIFO or a device in the file's place must not hang or
        // exhaust the gateway.
        let cannot_read = |problem: &str| ConfigError {
            file: path.to_owned(),
            key: None,
            message: format!("cannot read the configuration file: {problem}"),
        };
        let contents = crate::files::read_regular(path, crate::files::CONFIG_FILE_CAP)
            .map_err(|e| cannot_read(e.problem()))?;
        let text = String::from_utf8(contents.bytes)
            .map_err(|_| cannot_read("stream did not contain valid UTF-8"))?;
        Self::parse(path, &text)
    }

    /// Parses configuration text; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        // A syntax error comes before deserialization, from a parse of the whole text: no key.
        let de = toml::Deserializer::parse(text).map_err(|e| {
            serde_path_to_error::Error::new(serde_path_to_error::Track::new().path(), e)
        });
        let config: Config = de.and_then(serde_path_to_error::deserialize).map_err(|e| {
            let key = e.path().to_string();
            let error = e.into_inner();
            // The position, not the offending line: that line may hold a secret pasted into
            // the wrong key.
            let message = match error.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    format!(
                        "line {line}, column {column}: {}",
                        error.message().trim_end()
                    )
                }
                None => error.message().trim_end().to_owned(),
            };
            ConfigError {
                file: path.to_owned(),
                key: (key != ".").then_some(key),
                message,
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// The effective configuration as TOML, as `check-config` prints it. The config holds only
    /// where the key comes from, never the key itself.
    pub fn redacted_toml(&self) -> String {
        let mut text =
            toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"));
        text.push_str("# api key: <redacted>\n");
        text
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| ConfigError {
            file: path.to_owned(),
            key: Some(key.to_owned()),
            message,
        };
        for (key, value, max) in [
            (
                "limits.max_body_bytes",
                self.limits.max_body_bytes,
                MAX_BODY_BYTES,
            ),
            (
                "limits.max_concurrent_requests",
                self.limits.max_concurrent_requests,
                MAX_CONCURRENT_REQUESTS,
            ),
            (
                "limits.max_response_bytes",
                self.limits.max_response_bytes,
                MAX_BODY_BYTES,
            ),
            (
                "rate_limit.max_tracked_keys",
                self.rate_limit.max_tracked_keys,
                MAX_TRACKED_KEYS,
            ),
            (
                "callers.max_tracked_jobs",
                self.callers.max_tracked_jobs,
                MAX_TRACKED_JOBS,
            ),
            (
                "upstream.max_connections_per_worker",
                self.upstream.max_connections_per_worker,
                MAX_CONNECTIONS_PER_WORKER,
            ),
            (
                "runtime.workers",
                self.runtime.workers.unwrap_or(1),
                MAX_WORKERS,
            ),
        ] {
            if !(1..=max).contains(&value) {
                return Err(fail(key, format!("must be between 1 and {max}")));
            }
        }
        for (key, value, may_be_zero) in [
            (
                "upstream.connect_timeout",
                self.upstream.connect_timeout,
                false,
            ),
            ("upstream.timeout", self.upstream.timeout, false),
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout,
                false,
            ),
            ("limits.idle_timeout", self.limits.idle_timeout, false),
            (
                "limits.body_read_timeout",
                self.limits.body_read_timeout,
                false,
            ),
            ("limits.shutdown_grace", self.limits.shutdown_grace, true),
        ] {
            if value.is_zero() && !may_be_zero {
                return Err(fail(key, "must be longer than zero".into()));
            }
            if value > MAX_DURATION {
                return Err(fail(key, "must be at most 24h".into()));
            }
        }
        if self.listen.addr == self.admin.addr && self.listen.addr.port() != 0 {
            return Err(fail(
                "admin.addr",
                format!(
                    "{} is also listen.addr; give the admin listener its own port",
                    self.admin.addr
                ),
            ));
        }
        self.validate_listener_tls(&fail)?;
        self.validate_callers(&fail)?;
        self.validate_header_lists(&fail)?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            fail(
                "log.level",
                format!("`{}` is not a log filter: {e}", self.log.level),
            )
        })?;
        Ok(())
    }
}

impl Config {
    fn validate_listener_tls(
        &self,
        fail: &impl Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let listen = &self.listen;
        match (&listen.tls_cert, &listen.tls_key) {
            (Some(_), None) => {
                return Err(fail(
                    "listen.tls_key",
                    "listen.tls_cert is set without its private key; set listen.tls_key too".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(fail(
                    "listen.tls_cert",
                    "listen.tls_key is set without its certificate; set listen.tls_cert too".into(),
                ))
            }
            _ => {}
        }
        let mtls = self.callers.mode == CallerMode::Mtls;
        if mtls && (listen.tls_cert.is_none() || listen.client_ca.is_none()) {
            return Err(fail(
                "callers.mode",
                "mode = \"mtls\" needs TLS on the listener: set listen.tls_cert, listen.tls_key and listen.client_ca".into(),
            ));
        }
        if !mtls && listen.client_ca.is_some() {
            return Err(fail(
                "listen.client_ca",
                "client certificates are only checked with callers.mode = \"mtls\"; remove listen.client_ca or change the mode".into(),
            ));
        }
        Ok(())
    }

    /// An operator may widen the header allow-lists, but never to a credential, a header that
    /// describes the connection rather than the message, or one the gateway sets itself.
    fn validate_header_lists(
        &self,
        fail: &impl Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        for (key, names, never) in [
            (
                "upstream.forward_headers",
                &self.upstream.forward_headers,
                NEVER_FORWARDED,
            ),
            (
                "upstream.return_headers",
                &self.upstream.return_headers,
                NEVER_RETURNED,
            ),
        ] {
            for (i, name) in names.iter().enumerate() {
                if let Some((_, why)) = never.iter().find(|(n, _)| *n == name.0.as_str()) {
                    return Err(fail(
                        &format!("{key}[{i}]"),
                        format!("`{}` cannot be allowed: {why}", name.0),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_callers(
        &self,
        fail: &impl Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let callers = &self.callers;
        if callers.mode != CallerMode::Token && !callers.tokens.is_empty() {
            return Err(fail(
                "callers.token",
                format!(
                    "token entries are only used with mode = \"token\" (the mode is {:?})",
                    callers.mode
                ),
            ));
        }
        if callers.mode == CallerMode::Token && callers.tokens.is_empty() {
            return Err(fail(
                "callers.token",
                "mode = \"token\" needs at least one [[callers.token]] entry (name, sha256)".into(),
            ));
        }
        if callers.mode != CallerMode::Mtls && callers.allow.is_some() {
            return Err(fail(
                "callers.allow",
                "allow lists certificate identities and only applies with mode = \"mtls\"".into(),
            ));
        }
        let mut names = std::collections::HashMap::new();
        let mut digests = std::collections::HashMap::new();
        for (i, entry) in callers.tokens.iter().enumerate() {
            let key = format!("callers.token[{i}]");
            let name = entry.name.trim();
            if name.is_empty() || name != entry.name || name.chars().any(char::is_control) {
                return Err(fail(
                    &format!("{key}.name"),
                    format!(
                        "`{}` is not a caller name: use non-empty text without surrounding spaces",
                        entry.name.escape_debug()
                    ),
                ));
            }
            if let Some(first) = names.insert(name, i) {
                return Err(fail(
                    &format!("{key}.name"),
                    format!("`{name}` is also the name of callers.token[{first}]"),
                ));
            }
            if let Some(first) = digests.insert(entry.sha256, i) {
                return Err(fail(
                    &format!("{key}.sha256"),
                    format!(
                        "caller `{name}` has the same token digest as callers.token[{first}] (`{}`); each caller needs its own token",
                        callers.tokens[first].name
                    ),
                ));
            }
            let overrides = entry.rate.is_some() || entry.burst.is_some();
            let complete = entry.rate.is_some() && entry.burst.is_some();
            if overrides && !complete && self.rate_limit.per_caller.is_none() {
                return Err(fail(
                    &key,
                    format!(
                        "caller `{name}` sets only one of rate and burst, and there is no [rate_limit.per_caller] to take the other from; set both"
                    ),
                ));
            }
        }
        if let Some(allow) = &callers.allow {
            if allow.is_empty() {
                return Err(fail(
                    "callers.allow",
                    "an empty allow list would refuse every caller; remove it to allow every certificate from listen.client_ca".into(),
                ));
            }
        }
        Ok(())
    }

    /// The limit for one token caller: its own `rate`/`burst`, the rest from `per_caller`.
    pub fn token_caller_limit(&self, entry: &TokenCaller) -> Option<RateLimit> {
        let base = self.rate_limit.per_caller;
        match (entry.rate, entry.burst, base) {
            (None, None, _) => None,
            (Some(rate), Some(burst), _) => Some(RateLimit { rate, burst }),
            (rate, burst, Some(base)) => Some(RateLimit {
                rate: rate.unwrap_or(base.rate),
                burst: burst.unwrap_or(base.burst),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("gateway.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.listen.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.admin.addr.to_string(), "127.0.0.1:9090");
        assert_eq!(config.upstream.url.authority.host(), "app.datafold.com");
        assert_eq!(config.api_key, ApiKeySource::Env("DATAFOLD_API_KEY".into()));
        assert_eq!(config.limits.max_body_bytes, 65536);
        assert_eq!(config.limits.shutdown_grace, Duration::from_secs(30));
        assert!(config.rate_limit.global.is_none());
    }

    #[test]
    fn rates_parse_per_second_minute_and_hour() {
        for (text, interval) in [
            ("10/s", Duration::from_millis(100)),
            ("600/min", Duration::from_millis(100)),
            ("3600/h", Duration::from_secs(1)),
        ] {
            let rate: Rate = text.parse().unwrap();
            assert_eq!(rate.replenish_interval(), interval, "{text}");
            assert_eq!(format!("{rate:?}"), text);
        }
        for bad in ["0/s", "10", "10/day", "-1/s", "x/min"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let err = parse("[rate_limit.global]\nrate = \"1/s\"\nburst = 1\nburts = 2\n").unwrap_err();
        assert!(err.starts_with("gateway.toml: rate_limit.global"), "{err}");
        assert!(err.contains("burts"), "{err}");
    }

    #[test]
    fn bad_rate_is_named_with_its_path() {
        let err = parse("[rate_limit.per_caller]\nrate = \"5/day\"\nburst = 1\n").unwrap_err();
        assert!(err.contains("rate_limit.per_caller.rate"), "{err}");
        assert!(err.contains("5/day"), "{err}");
    }

    #[test]
    fn upstream_must_be_https() {
        let err = parse("[upstream]\nurl = \"http://app.datafold.com\"\n").unwrap_err();
        assert!(err.contains("upstream.url"), "{err}");
        assert!(err.contains("https://"), "{err}");
    }

    #[test]
    fn upstream_prefix_is_kept_without_trailing_slash() {
        let url: UpstreamUrl = "https://datafold.example.com:8443/datafold/"
            .parse()
            .unwrap();
        assert_eq!(
            url.target("/api/v1/data_sources/1/test".into()).unwrap(),
            "/datafold/api/v1/data_sources/1/test"
        );
        assert_eq!(url.authority.host(), "datafold.example.com");
    }

    #[test]
    fn api_key_takes_exactly_one_source() {
        let file = parse("[api_key]\nfile = \"/run/secrets/key\"\n").unwrap();
        assert_eq!(file.api_key, ApiKeySource::File("/run/secrets/key".into()));
        let both = parse("[api_key]\nfile = \"/k\"\nenv = \"K\"\n").unwrap_err();
        assert!(
            both.contains("api_key") && both.contains("not both"),
            "{both}"
        );
        let none = parse("[api_key]\n").unwrap_err();
        assert!(none.contains("api_key"), "{none}");
    }

    #[test]
    fn absurd_sizes_and_durations_are_refused_by_name() {
        let err = parse("[limits]\nmax_concurrent_requests = 4611686018427387904\n").unwrap_err();
        assert!(err.contains("limits.max_concurrent_requests"), "{err}");
        let err = parse("[limits]\nidle_timeout = \"500000000000years\"\n").unwrap_err();
        assert!(err.contains("limits.idle_timeout"), "{err}");
        let err = parse("[rate_limit]\nmax_tracked_keys = 0\n").unwrap_err();
        assert!(err.contains("rate_limit.max_tracked_keys"), "{err}");
    }

    const DIGEST_A: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const DIGEST_B: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn token_config(entries: &[(&str, &str)]) -> String {
        let mut text = "[callers]\nmode = \"token\"\n".to_owned();
        for (name, digest) in entries {
            text.push_str(&format!(
                "[[callers.token]]\nname = \"{name}\"\nsha256 = \"{digest}\"\n"
            ));
        }
        text
    }

    #[test]
    fn token_entries_parse_with_their_overrides() {
        let text = token_config(&[("analytics", DIGEST_A)]) + "rate = \"120/min\"\nburst = 20\n";
        let config = parse(&text).unwrap();
        let entry = &config.callers.tokens[0];
        assert_eq!(entry.sha256, TokenDigest::of(b"abc"));
        let limit = config.token_caller_limit(entry).unwrap();
        assert_eq!(format!("{:?}", limit.rate), "120/min");
        assert_eq!(limit.burst.get(), 20);
    }

    #[test]
    fn duplicate_token_names_and_digests_name_both_entries() {
        let err = parse(&token_config(&[("a", DIGEST_A), ("a", DIGEST_B)])).unwrap_err();
        assert!(err.contains("callers.token[1].name"), "{err}");
        assert!(err.contains("callers.token[0]"), "{err}");
        let err = parse(&token_config(&[("a", DIGEST_A), ("b", DIGEST_A)])).unwrap_err();
        assert!(err.contains("callers.token[1].sha256"), "{err}");
        assert!(err.contains("`a`"), "{err}");
    }

    #[test]
    fn bad_digest_hex_is_named_with_its_entry() {
        for bad in ["abc", &DIGEST_A.replace('a', "g"), &format!("{DIGEST_A}00")] {
            let err = parse(&token_config(&[("a", bad)])).unwrap_err();
            assert!(err.contains("callers.token[0].sha256"), "{err}");
            assert!(err.contains("hash-token"), "{err}");
        }
    }

    #[test]
    fn a_token_pasted_as_a_digest_is_not_quoted_back() {
        let token = "dfgw_9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";
        let err = parse(&token_config(&[("a", token)])).unwrap_err();
        assert!(err.contains("callers.token[0].sha256"), "{err}");
        assert!(!err.contains(&token[5..20]), "{err}");
        let err = parse("[api_key]\nenv = \"dfk_live_SECRET_9a8b\"\n").unwrap_err();
        assert!(err.contains("api_key") && !err.contains("SECRET"), "{err}");
        let err = parse("[upstream]\nurl = \"https://u:hunter2@x.example\"\n").unwrap_err();
        assert!(
            err.contains("upstream.url") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn caller_modes_need_their_settings() {
        let err = parse("[callers]\nmode = \"token\"\n").unwrap_err();
        assert!(err.contains("callers.token"), "{err}");
        let err = parse("[callers]\nmode = \"mtls\"\n").unwrap_err();
        assert!(err.contains("client_ca"), "{err}");
        let err = parse(
            "[listen]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n[callers]\nmode = \"mtls\"\n",
        )
        .unwrap_err();
        assert!(err.contains("listen.client_ca"), "{err}");
        let err = parse("[listen]\ntls_cert = \"c.pem\"\n").unwrap_err();
        assert!(err.contains("listen.tls_key"), "{err}");
        let err = parse("[listen]\nclient_ca = \"ca.pem\"\n").unwrap_err();
        assert!(err.contains("listen.client_ca"), "{err}");
        let err = parse("[callers]\nallow = [\"a\"]\n").unwrap_err();
        assert!(err.contains("callers.allow"), "{err}");
        let ok = parse(
            "[listen]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nclient_ca = \"ca.pem\"\n[callers]\nmode = \"mtls\"\nallow = [\"analytics\"]\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn a_half_override_needs_per_caller_to_complete_it() {
        let text = token_config(&[("a", DIGEST_A)]) + "burst = 5\n";
        let err = parse(&text).unwrap_err();
        assert!(err.contains("callers.token[0]"), "{err}");
        let text = "[rate_limit.per_caller]\nrate = \"10/min\"\nburst = 2\n".to_owned() + &text;
        let config = parse(&text).unwrap();
        let limit = config
            .token_caller_limit(&config.callers.tokens[0])
            .unwrap();
        assert_eq!(
            (format!("{:?}", limit.rate).as_str(), limit.burst.get()),
            ("10/min", 5)
        );
    }

    #[test]
    fn hardening_defaults_are_on() {
        let config = parse("").unwrap();
        assert_eq!(config.limits.body_read_timeout, Duration::from_secs(10));
        assert_eq!(config.limits.max_response_bytes, 1024 * 1024);
        let unauthenticated = config.rate_limit.unauthenticated;
        assert_eq!(format!("{:?}", unauthenticated.rate), "10/s");
        assert_eq!(unauthenticated.burst.get(), 20);
        let config = parse("[rate_limit.unauthenticated]\nrate = \"1/min\"\nburst = 3\n").unwrap();
        assert_eq!(config.rate_limit.unauthenticated.burst.get(), 3);
        // Changed, not switched off: there is no empty form of it.
        let err = parse("[rate_limit.unauthenticated]\n").unwrap_err();
        assert!(err.contains("rate_limit.unauthenticated"), "{err}");
    }

    #[test]
    fn header_lists_refuse_credentials_and_connection_headers_by_entry() {
        let ok = parse(
            "[upstream]\nforward_headers = [\"X-Team\"]\nreturn_headers = [\"X-Datafold-Trace\"]\n",
        )
        .unwrap();
        assert_eq!(ok.upstream.forward_headers[0].0, "x-team");
        for (text, key) in [
            (
                "forward_headers = [\"x-team\", \"Authorization\"]",
                "upstream.forward_headers[1]",
            ),
            (
                "forward_headers = [\"cookie\"]",
                "upstream.forward_headers[0]",
            ),
            (
                "forward_headers = [\"X-Api-Key\"]",
                "upstream.forward_headers[0]",
            ),
            (
                "forward_headers = [\"connection\"]",
                "upstream.forward_headers[0]",
            ),
            (
                "return_headers = [\"set-cookie\"]",
                "upstream.return_headers[0]",
            ),
            (
                "return_headers = [\"Transfer-Encoding\"]",
                "upstream.return_headers[0]",
            ),
            (
                "return_headers = [\"bad header\"]",
                "upstream.return_headers",
            ),
        ] {
            let err = parse(&format!("[upstream]\n{text}\n")).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn zero_timeouts_are_refused() {
        let err = parse("[upstream]\ntimeout = \"0s\"\n").unwrap_err();
        assert!(err.contains("upstream.timeout"), "{err}");
    }
}
