//! The checks that need more than one value at a time, or a bound: ranges, settings that only
//! make sense together, and the headers an allow-list may never name. Each failure names the key.

use std::path::Path;
use std::time::Duration;

use super::{CallerMode, Config, ConfigError};

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
const MAX_CONNECTIONS_PER_WORKER: usize = 10_000;
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

impl Config {
    pub(super) fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| ConfigError::Invalid {
            file: path.to_owned(),
            key: key.to_owned(),
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
                "upstream.max_connections_per_worker",
                self.upstream.max_connections_per_worker,
                MAX_CONNECTIONS_PER_WORKER,
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
        if let Some(word) = bare_target(&self.log.level) {
            return Err(fail(
                "log.level",
                format!(
                    "`{word}` is not a level: use one of trace, debug, info, warn, error, off \
                     (or target=level); a bare word is read as a module name and would turn \
                     every other log line off"
                ),
            ));
        }
        Ok(())
    }

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
}

/// The first directive of a log filter that is a bare word but not a level (`verbose`): a
/// tracing filter takes it for a module name, enables only that, and so logs nothing at all.
fn bare_target(filter: &str) -> Option<&str> {
    filter
        .split(',')
        .map(str::trim)
        .filter(|directive| !directive.is_empty() && !directive.contains(['=', '[']))
        .find(|word| {
            word.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{parse, token_config, DIGEST_A, DIGEST_B};

    #[test]
    fn a_log_level_that_is_a_bare_word_is_refused_by_name() {
        for level in ["verbose", "info,chatty"] {
            let err = parse(&format!("[log]\nlevel = {level:?}\n")).unwrap_err();
            assert!(err.contains("log.level"), "{err}");
            assert!(err.contains("is not a level"), "{err}");
        }
        for level in ["info", "WARN", "datafold_gateway=debug,info", "off"] {
            assert!(
                parse(&format!("[log]\nlevel = {level:?}\n")).is_ok(),
                "{level}"
            );
        }
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
    fn duplicate_token_names_and_digests_name_both_entries() {
        let err = parse(&token_config(&[("a", DIGEST_A), ("a", DIGEST_B)])).unwrap_err();
        assert!(err.contains("callers.token[1].name"), "{err}");
        assert!(err.contains("callers.token[0]"), "{err}");
        let err = parse(&token_config(&[("a", DIGEST_A), ("b", DIGEST_A)])).unwrap_err();
        assert!(err.contains("callers.token[1].sha256"), "{err}");
        assert!(err.contains("`a`"), "{err}");
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
