//! The configuration file, parsed once at start into typed settings.
//!
//! Every section and key has a default except the ones a deployment must decide; unknown keys are
//! an error so that a typo (`[rate_limit.globl]`) cannot silently switch a limit off. Errors name
//! the file and the key path (`rate_limit.global.rate`) and say what is wrong with it.
//!
//! This file holds the sections as read from TOML and the entry points ([`Config::load`],
//! [`Config::parse`]); `values` the value types each key parses into, and `validate` the checks
//! that need more than one value, or a bound.

mod validate;
mod values;

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use values::{
    ApiKeySource, CallerMode, Count, HeaderName, Http2Mode, LogFormat, OnAuditFailure, Per, Rate,
    RateLimit, TokenDigest, UpstreamUrl,
};

/// Bounds carried in their keys' types ([`Count`]); the others are checked in `validate`.
const MAX_TRACKED_JOBS: usize = 100_000_000;
const MAX_WORKERS: usize = 1024;

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
    pub workers: Option<Count<MAX_WORKERS>>,
}

impl Runtime {
    /// How many workers to run: `workers`, or one per core the process may use.
    pub fn worker_count(&self) -> NonZeroUsize {
        self.workers.map_or_else(
            || std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            Count::get,
        )
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
    pub max_tracked_jobs: Count<MAX_TRACKED_JOBS>,
}

const DEFAULT_MAX_TRACKED_JOBS: Count<MAX_TRACKED_JOBS> = match Count::new(100_000) {
    Some(count) => count,
    None => panic!("the default is within the bound"),
};

impl Default for Callers {
    fn default() -> Self {
        Self {
            mode: CallerMode::Open,
            tokens: Vec::new(),
            allow: None,
            share_results: false,
            max_tracked_jobs: DEFAULT_MAX_TRACKED_JOBS,
        }
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
                    per: Per::Second,
                },
                burst: NonZeroU32::new(20).expect("not zero"),
            },
        }
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
    /// A file holding a secret key: records are then linked with HMAC-SHA256 under it instead
    /// of plain SHA-256, so that whoever can write the audit file but not read this cannot forge
    /// a chain that verifies. Read at start and on SIGHUP.
    pub integrity_key_file: Option<PathBuf>,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            file: PathBuf::from("audit.jsonl"),
            stdout: false,
            on_failure: OnAuditFailure::Refuse,
            integrity_key_file: None,
        }
    }
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

/// A configuration problem, naming the file and, where there is one, the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Missing, not a regular file, too large, or not UTF-8.
    #[error("{}: cannot read the configuration file: {problem}", file.display())]
    Unreadable { file: PathBuf, problem: String },
    /// Not TOML: there is no key to name, only a position.
    #[error("{}: {message}", file.display())]
    Syntax { file: PathBuf, message: String },
    /// A key that does not exist, or a value its key cannot have.
    #[error("{}: {key}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The key at fault, as a path (`rate_limit.global.rate`), if the problem has one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } => Some(key),
            Self::Unreadable { .. } | Self::Syntax { .. } => None,
        }
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        // Not `read_to_string`: a FIFO or a device in the file's place must not hang or
        // exhaust the gateway.
        let cannot_read = |problem: &str| ConfigError::Unreadable {
            file: path.to_owned(),
            problem: problem.to_owned(),
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
            let file = path.to_owned();
            if key == "." {
                ConfigError::Syntax { file, message }
            } else {
                ConfigError::Invalid { file, key, message }
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
}

impl Config {
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

    pub(super) fn parse(text: &str) -> Result<Config, String> {
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

    pub(super) const DIGEST_A: &str =
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    pub(super) const DIGEST_B: &str =
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    pub(super) fn token_config(entries: &[(&str, &str)]) -> String {
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
}
