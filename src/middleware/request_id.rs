//! Keeps a caller's `x-request-id` only when it is a sane token.
//!
//! tower-http's `SetRequestId` generates an id when the header is missing; this step, just
//! before it, removes an id that is too long or holds characters that could forge log or audit
//! lines, so that a fresh one is generated in its place.

use http::{HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

pub const X_REQUEST_ID: &str = "x-request-id";

/// Longest caller-supplied request id kept.
const MAX_LEN: usize = 128;

/// Removes the caller's request id unless it is 1–128 characters of `[A-Za-z0-9._:-]`.
pub fn drop_unusable_request_id<B>(mut request: Request<B>) -> Request<B> {
    let mut ids = request.headers().get_all(X_REQUEST_ID).iter();
    let usable = match (ids.next(), ids.next()) {
        (Some(value), None) => is_sane(value),
        _ => false,
    };
    if !usable {
        request.headers_mut().remove(X_REQUEST_ID);
    }
    request
}

fn is_sane(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Makes a random (v4) UUID request id, written straight into its header value: tower-http's
/// `MakeRequestUuid` formats a `String` first and parses it into the value after.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeUuid;

impl MakeRequestId for MakeUuid {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        HeaderValue::from_str(id).ok().map(RequestId::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(values: &[&str]) -> Option<String> {
        let mut request = Request::new(());
        for v in values {
            request
                .headers_mut()
                .append(X_REQUEST_ID, HeaderValue::from_str(v).unwrap());
        }
        drop_unusable_request_id(request)
            .headers()
            .get(X_REQUEST_ID)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn sane_request_id_is_kept() {
        assert_eq!(
            kept(&["ci-run_42.7:abc"]).as_deref(),
            Some("ci-run_42.7:abc")
        );
    }

    #[test]
    fn unsafe_or_ambiguous_request_id_is_dropped() {
        assert_eq!(kept(&["has space"]), None);
        assert_eq!(kept(&["\"quoted\""]), None);
        assert_eq!(kept(&[&"a".repeat(129)]), None);
        assert_eq!(kept(&["one", "two"]), None);
    }

    #[test]
    fn made_ids_are_fresh_lowercase_uuids_that_pass_the_sanity_check() {
        let request = Request::new(());
        let mut make = MakeUuid;
        let one = make.make_request_id(&request).unwrap();
        let two = make.make_request_id(&request).unwrap();
        let text = one.header_value().to_str().unwrap();
        let parsed = uuid::Uuid::parse_str(text).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(text, text.to_ascii_lowercase());
        assert!(is_sane(one.header_value()));
        assert_ne!(one.header_value(), two.header_value());
    }
}
