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

use http::uri::{Authority, Scheme};
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Where callers connect. Loopback by default: the sidecar case.
    pub addr: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
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
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            url: UpstreamUrl::from_str("https://app.datafold.com").expect("default URL is valid"),
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
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
    /// The full upstream URI for a gateway path such as `/api/v1/data_sources/1/test`.
    pub fn join(&self, path: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.prefix, path))
            .build()
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
            return Err(format!("`{s}` must not carry user information"));
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
            } if !name.is_empty() => Ok(Self::Env(name)),
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Callers {
    pub mode: CallerMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallerMode {
    /// Anyone who can reach the listener; identity is the peer IP address.
    #[default]
    Open,
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
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            max_tracked_keys: 100_000,
            global: None,
            per_caller: None,
            per_data_source: None,
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
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            file: PathBuf::from("audit.jsonl"),
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            max_concurrent_requests: 1024,
        }
    }
}

/// Upper bounds: far beyond any sensible setting, low enough that nothing overflows.
const MAX_BODY_BYTES: usize = 1 << 30;
const MAX_CONCURRENT_REQUESTS: usize = 1_000_000;
const MAX_TRACKED_KEYS: usize = 100_000_000;
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
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses configuration text; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError {
                file: path.to_owned(),
                key: (key != ".").then_some(key),
                message: e.into_inner().to_string().trim_end().to_owned(),
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
                "rate_limit.max_tracked_keys",
                self.rate_limit.max_tracked_keys,
                MAX_TRACKED_KEYS,
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
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            fail(
                "log.level",
                format!("`{}` is not a log filter: {e}", self.log.level),
            )
        })?;
        Ok(())
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
            url.join("/api/v1/data_sources/1/test").unwrap().to_string(),
            "https://datafold.example.com:8443/datafold/api/v1/data_sources/1/test"
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

    #[test]
    fn zero_timeouts_are_refused() {
        let err = parse("[upstream]\ntimeout = \"0s\"\n").unwrap_err();
        assert!(err.contains("upstream.timeout"), "{err}");
    }
}
