//! The Datafold API key: loaded once, held as a ready-made sensitive header value.
//!
//! The key is never printed: `Debug` is redacted, load errors name the variable or file but not
//! the contents, and the header value is marked sensitive so that HPACK never indexes it and
//! tower-http's trace layer shows it as `Sensitive`.

use std::fmt;
use std::path::PathBuf;

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};

use crate::config::ApiKeySource;
use crate::files;

/// The key in effect; a reload swaps in a new one. A request takes its copy of the header when
/// the key is set on it, so requests in flight finish with the key they started with.
pub type SharedKey = std::sync::Arc<arc_swap::ArcSwap<ApiKey>>;

/// The `Authorization: Key <key>` header value the gateway sends upstream.
#[derive(Clone)]
pub struct ApiKey {
    header: HeaderValue,
}

impl ApiKey {
    /// Reads the key from its configured source. Trailing newlines (as `echo` and most secret
    /// stores leave them) are not part of the key.
    pub fn load(source: &ApiKeySource) -> Result<Self, KeyError> {
        let raw = match source {
            ApiKeySource::Env(name) => match std::env::var(name) {
                Ok(value) => SecretString::from(value),
                Err(std::env::VarError::NotPresent) => {
                    return Err(KeyError::EnvNotSet { name: name.clone() })
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(KeyError::EnvNotUtf8 { name: name.clone() })
                }
            },
            ApiKeySource::File(path) => {
                // Not `read_to_string`: a FIFO or a device in the key's place must not hang
                // or exhaust the gateway.
                let contents =
                    files::read_regular(path, files::KEY_FILE_CAP).map_err(KeyError::File)?;
                files::warn_if_readable_by_others(path, &contents);
                match String::from_utf8(contents.bytes) {
                    Ok(value) => SecretString::from(value),
                    Err(_) => return Err(KeyError::FileNotUtf8 { path: path.clone() }),
                }
            }
        };
        Self::from_secret(&raw).map_err(|problem| KeyError::Unusable {
            from: source.clone(),
            problem,
        })
    }

    /// Builds the header from a key; the error says what is wrong without quoting the key.
    pub fn from_secret(raw: &SecretString) -> Result<Self, KeyProblem> {
        let key = raw.expose_secret().trim_end_matches(['\n', '\r']);
        if key.trim().is_empty() {
            return Err(KeyProblem::Empty);
        }
        if key.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
            return Err(KeyProblem::NotHeaderText);
        }
        let mut header =
            HeaderValue::try_from(format!("Key {key}")).map_err(|_| KeyProblem::NotHeaderValue)?;
        header.set_sensitive(true);
        Ok(Self { header })
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.header
    }

    /// Whether two keys are the same key (to tell a real rotation from a touched file).
    pub fn same_as(&self, other: &Self) -> bool {
        self.header.as_bytes() == other.header.as_bytes()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

pub(crate) fn describe(source: &ApiKeySource) -> String {
    match source {
        ApiKeySource::Env(name) => format!("api_key.env: environment variable {name}"),
        ApiKeySource::File(path) => format!("api_key.file: {}", path.display()),
    }
}

/// Why the key could not be loaded. Names the variable or the file, never holds the key: the
/// variants keep only where the key was to come from and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `api_key.env` names a variable that is not set.
    #[error("api_key.env: environment variable {name} is not set")]
    EnvNotSet { name: String },
    /// `api_key.env` names a variable whose value is not UTF-8.
    #[error("api_key.env: environment variable {name} is not valid UTF-8")]
    EnvNotUtf8 { name: String },
    /// `api_key.file` cannot be read (missing, not a regular file, too large, unreadable).
    #[error("api_key.file: {0}")]
    File(#[source] files::FileError),
    /// `api_key.file` was read but is not UTF-8 text.
    #[error("api_key.file: cannot read {}: stream did not contain valid UTF-8", path.display())]
    FileNotUtf8 { path: PathBuf },
    /// The variable or file was read, but what it holds cannot be the key.
    #[error("{}: {problem}", describe(from))]
    Unusable {
        from: ApiKeySource,
        #[source]
        problem: KeyProblem,
    },
}

/// What is wrong with a key that was read; says so without quoting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    /// Nothing but whitespace (after the trailing newlines, which are not part of the key).
    #[error("the API key is empty")]
    Empty,
    /// Whitespace or bytes outside printable ASCII, which a header cannot carry as they are.
    #[error("the API key contains whitespace or characters not allowed in a header")]
    NotHeaderText,
    /// `Key <key>` is refused as a header value.
    #[error("the API key is not a valid header value")]
    NotHeaderValue,
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dfk_live_8c1e4b2a9f";

    #[test]
    fn header_is_key_scheme_and_sensitive() {
        let key = ApiKey::from_secret(&SecretString::from(format!("{KEY}\n"))).unwrap();
        assert_eq!(key.header_value(), &format!("Key {KEY}"));
        assert!(key.header_value().is_sensitive());
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let key = ApiKey::from_secret(&SecretString::from(KEY.to_owned())).unwrap();
        let shown = format!("{key:?} {:?}", key.header_value());
        assert!(!shown.contains(KEY), "{shown}");
    }

    #[test]
    fn empty_or_blank_key_is_refused() {
        for raw in ["", "\n", "  \r\n"] {
            assert!(ApiKey::from_secret(&SecretString::from(raw.to_owned())).is_err());
        }
    }

    #[test]
    fn missing_file_error_names_the_file() {
        let source = ApiKeySource::File("/nonexistent/datafold-key".into());
        let err = ApiKey::load(&source).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/datafold-key"), "{err}");
    }

    #[test]
    fn bad_key_error_does_not_quote_it() {
        let err = ApiKey::from_secret(&SecretString::from(format!("{KEY} extra"))).unwrap_err();
        assert_eq!(err, KeyProblem::NotHeaderText);
        // The whole way a key file is loaded, with the key inside a value that is refused.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datafold-key");
        std::fs::write(&path, format!("{KEY} extra\n")).unwrap();
        let err = ApiKey::load(&ApiKeySource::File(path.clone())).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(shown.contains(&*path.to_string_lossy()), "{shown}");
        assert!(!shown.contains(KEY), "{shown}");
    }
}
