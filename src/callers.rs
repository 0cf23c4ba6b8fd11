//! Who is calling: the callers the config knows (`[callers]`), and how a request is matched to
//! one of them. The layer that asks, and refuses strangers, is `middleware/caller.rs`.
//!
//! - `open` (the sidecar case: only the app next to the gateway can reach its loopback
//!   listener): the caller is its peer IP address.
//! - `token`: `Authorization: Bearer <token>`, whose SHA-256 digest must be one configured in
//!   `[[callers.token]]`; the caller is that entry's name. Digests are compared in constant time,
//!   against every entry. A missing or unknown token gets 401.
//! - `mtls`: the TLS handshake already checked the client certificate against
//!   `listen.client_ca`; the caller is the name the server read from it ([`Peer::tls_identity`]).
//!   An identity outside `callers.allow` gets 403.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::{CallerMode, Callers, TokenDigest};

/// The connection a request came in on; inserted by the server into every request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The address and port as text, made once per connection for the audit records.
    pub addr_text: Arc<str>,
    /// The IP address as text, made once per connection.
    pub ip: Arc<str>,
    /// The name in the client certificate verified during the TLS handshake, if any.
    pub tls_identity: Option<Arc<str>>,
    /// Asks the connection to close once the answer in flight is sent.
    close: Arc<tokio::sync::Notify>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            addr_text: addr.to_string().into(),
            ip: addr.ip().to_string().into(),
            tls_identity: None,
            close: Arc::default(),
        }
    }

    /// The address block strangers from this peer are counted by: its IPv4 address, or the /64
    /// of its IPv6 address (one host's usual allocation: counting single IPv6 addresses would let
    /// one client be a new stranger at every request).
    pub fn block(&self) -> IpAddr {
        match self.addr.ip().to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
            v4 => v4,
        }
    }

    /// Closes the connection after the answer in flight (HTTP/1: no keep-alive; HTTP/2: GOAWAY).
    pub fn close_connection(&self) {
        self.close.notify_one();
    }

    /// Resolves once [`close_connection`](Self::close_connection) was called for this connection.
    pub async fn closing(&self) {
        self.close.notified().await;
    }

    pub fn with_tls_identity(mut self, identity: Option<String>) -> Self {
        self.tls_identity = identity.map(Arc::from);
        self
    }
}

/// The caller's identity: the name rate limits and the audit trail know it by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerId(pub Arc<str>);

/// The callers in effect; SIGHUP swaps in a new book, requests in flight keep theirs.
pub type SharedCallers = Arc<ArcSwap<CallerBook>>;

/// The callers the gateway knows, made once from `[callers]`.
pub struct CallerBook {
    mode: CallerMode,
    /// Token entries by the first 8 bytes of their digest; see [`CallerBook::token_caller`].
    tokens: HashMap<[u8; 8], Vec<(TokenDigest, CallerId)>>,
    allow: Option<HashSet<Arc<str>>>,
    owners_only: bool,
}

/// Names only: the digests stay out of logs too.
impl std::fmt::Debug for CallerBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerBook")
            .field("mode", &self.mode)
            .field(
                "tokens",
                &self
                    .tokens
                    .values()
                    .flatten()
                    .map(|(_, id)| &id.0)
                    .collect::<Vec<_>>(),
            )
            .field("allow", &self.allow)
            .finish()
    }
}

impl CallerBook {
    pub fn new(callers: &Callers) -> Self {
        Self {
            mode: callers.mode,
            tokens: callers
                .tokens
                .iter()
                .fold(HashMap::new(), |mut tokens, entry| {
                    let caller = CallerId(entry.name.as_str().into());
                    tokens
                        .entry(digest_prefix(&entry.sha256))
                        .or_insert_with(Vec::new)
                        .push((entry.sha256, caller));
                    tokens
                }),
            allow: callers
                .allow
                .as_ref()
                .map(|names| names.iter().map(|n| Arc::from(n.as_str())).collect()),
            owners_only: callers.mode.is_authenticated() && !callers.share_results,
        }
    }

    pub fn mode(&self) -> CallerMode {
        self.mode
    }

    /// Whether a result poll must come from the caller that started the job.
    pub fn owners_only(&self) -> bool {
        self.owners_only
    }

    /// Whether the config names every caller this book lets in: then names may be labels.
    pub fn lists_callers(&self) -> bool {
        match self.mode {
            CallerMode::Open => false,
            CallerMode::Token => true,
            CallerMode::Mtls => self.allow.is_some(),
        }
    }

    /// Who sent a request with these headers over this connection, or the answer refusing it.
    pub fn identify(&self, headers: &HeaderMap, peer: Option<&Peer>) -> Result<CallerId, Refusal> {
        match self.mode {
            CallerMode::Open => Ok(CallerId(
                peer.map_or_else(|| Arc::from("unknown"), |p| p.ip.clone()),
            )),
            CallerMode::Token => {
                let token = bearer_token(headers)?;
                self.token_caller(&TokenDigest::of(token))
                    .cloned()
                    .ok_or(Refusal::Unauthorized(
                        "the bearer token is not known to the gateway",
                    ))
            }
            CallerMode::Mtls => {
                let Some(identity) = peer.and_then(|p| p.tls_identity.clone()) else {
                    return Err(Refusal::Unauthorized(
                        "the client certificate names neither a DNS name nor a common name",
                    ));
                };
                let caller = CallerId(identity);
                match &self.allow {
                    Some(allow) if !allow.contains(&caller.0) => Err(Refusal::Forbidden(caller)),
                    _ => Ok(caller),
                }
            }
        }
    }

    /// The entry whose digest is `digest`. The first 8 bytes of the digest pick the entries to
    /// look at (with a thousand callers, comparing against each would cost more than the rest
    /// of the request), and each of those is compared whole, in constant time. The timing can
    /// only tell whether some entry's digest starts like the token's, which says nothing
    /// about a token without a SHA-256 preimage.
    fn token_caller(&self, digest: &TokenDigest) -> Option<&CallerId> {
        let mut found = None;
        for (known, caller) in self.tokens.get(&digest_prefix(digest))? {
            if bool::from(known.0.ct_eq(&digest.0)) {
                found = Some(caller);
            }
        }
        found
    }
}

fn digest_prefix(digest: &TokenDigest) -> [u8; 8] {
    let mut prefix = [0; 8];
    prefix.copy_from_slice(&digest.0[..8]);
    prefix
}

pub enum Refusal {
    /// 401: no credentials, or ones the gateway does not know.
    Unauthorized(&'static str),
    /// 403: a known identity that `callers.allow` leaves out.
    Forbidden(CallerId),
}

/// The token of the request's single `Authorization: Bearer` header.
fn bearer_token(headers: &HeaderMap) -> Result<&[u8], Refusal> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(Refusal::Unauthorized(
            "send exactly one Authorization: Bearer <token> header",
        ));
    };
    let value = value.as_bytes();
    let token = match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => value[7..].trim_ascii(),
        _ => {
            return Err(Refusal::Unauthorized(
                "the Authorization header must be Bearer <token>",
            ))
        }
    };
    if token.is_empty() {
        return Err(Refusal::Unauthorized("the bearer token is empty"));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_are_counted_by_ipv4_address_or_ipv6_64() {
        let block = |addr: &str| Peer::new(addr.parse().unwrap()).block().to_string();
        assert_eq!(block("203.0.113.9:4000"), "203.0.113.9");
        assert_eq!(
            block("[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:4000"),
            "2001:db8:1:2::"
        );
        assert_eq!(block("[::ffff:203.0.113.9]:4000"), "203.0.113.9");
    }
}
