//! The value types of the configuration file: each parses from its text once, checks what can
//! be checked of it alone, and prints back the way it was written (`check-config`).

use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// See [`Upstream::http2`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Http2Mode {
    #[default]
    Auto,
    Never,
    Always,
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
    /// The mode as the config spells it (`open`, `token`, `mtls`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Token => "token",
            Self::Mtls => "mtls",
        }
    }
}

impl CallerMode {
    /// Whether callers prove who they are (and so may own jobs).
    pub fn is_authenticated(self) -> bool {
        !matches!(self, Self::Open)
    }
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

/// A count from 1 to `MAX`, checked as the file is read, so that code using it has neither a
/// zero to guard against nor a bound to check again.
#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Count<const MAX: usize>(NonZeroUsize);

impl<const MAX: usize> Count<MAX> {
    /// `n`, if it is within 1..=MAX.
    pub const fn new(n: usize) -> Option<Self> {
        match NonZeroUsize::new(n) {
            Some(n) if n.get() <= MAX => Some(Self(n)),
            _ => None,
        }
    }

    pub const fn get(self) -> NonZeroUsize {
        self.0
    }
}

impl<const MAX: usize> fmt::Debug for Count<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for Count<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = usize::deserialize(d)?;
        Self::new(n).ok_or_else(|| serde::de::Error::custom(format!("must be between 1 and {MAX}")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub rate: Rate,
    pub burst: NonZeroU32,
}

/// `N/s`, `N/min` or `N/h`: N requests admitted per unit of time on average. At most one
/// request per nanosecond, so that the time to earn one back is never zero.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    // Not public: a `Rate` is made by parsing, which checks the bound above.
    pub(super) count: NonZeroU32,
    pub(super) per: Per,
}

/// The unit of time of a [`Rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    Second,
    Minute,
    Hour,
}

impl Per {
    pub fn duration(self) -> Duration {
        match self {
            Self::Second => Duration::from_secs(1),
            Self::Minute => Duration::from_secs(60),
            Self::Hour => Duration::from_secs(3600),
        }
    }
}

impl Rate {
    /// Requests admitted per [`per`](Rate::per).
    pub fn count(&self) -> NonZeroU32 {
        self.count
    }

    pub fn per(&self) -> Per {
        self.per
    }

    /// The time it takes to earn back one request; never zero.
    pub fn replenish_interval(&self) -> Duration {
        self.per.duration() / self.count.get()
    }
}

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per {
            Per::Second => "s",
            Per::Minute => "min",
            Per::Hour => "h",
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
            "s" | "sec" | "second" => Per::Second,
            "min" | "minute" => Per::Minute,
            "h" | "hour" => Per::Hour,
            _ => return Err(bad()),
        };
        if per.duration().as_nanos() < u128::from(count.get()) {
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn counts_refuse_zero_and_past_their_bound_by_key() {
        let parse = |text: &str| {
            crate::config::Config::parse(std::path::Path::new("gateway.toml"), text)
                .map_err(|e| e.to_string())
        };
        for text in ["max_tracked_jobs = 0", "max_tracked_jobs = 100000001"] {
            let err = parse(&format!("[callers]\n{text}\n")).unwrap_err();
            // Checked as the file is read, so the message says where, as for any value TOML
            // reads but the gateway refuses.
            assert_eq!(
                err,
                "gateway.toml: callers.max_tracked_jobs: line 2, column 20: must be between 1 and 100000000",
            );
        }
        let config = parse("[runtime]\nworkers = 3\n[callers]\nmax_tracked_jobs = 7\n").unwrap();
        assert_eq!(config.runtime.worker_count().get(), 3);
        assert_eq!(config.callers.max_tracked_jobs.get().get(), 7);
        let printed = config.redacted_toml();
        assert!(printed.contains("workers = 3"), "{printed}");
        assert!(printed.contains("max_tracked_jobs = 7"), "{printed}");
    }
}
