//! The allow-list: only the two connection-test endpoints get past this layer.
//!
//! The path is parsed once, here, into a [`Route`] carried in the request's extensions for the
//! layers after it. Everything else is answered here and never reaches Datafold: other paths
//! 404, a known path with another method 405 (with `Allow`), an id that is not an integer 422 in
//! Datafold's own validation shape. Paths are matched exactly as sent, without normalising:
//! empty segments (`//`, a trailing slash), dot segments and percent-encoded separators are 404,
//! so no spelling of a forbidden endpoint can slip through. An HTTP/1.1 request without `Host`
//! is malformed, and answered 400 here.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::HOST;
use http::{Method, Request, Response, Version};
use tower::{Layer, Service};

use super::{record_fact, refuse, Fact, Refuse, Stamped};
use crate::audit::AuditFacts;
use crate::error::BadInteger;
use crate::{error, Body};

const PREFIX: &str = "/api/v1/data_sources/";

/// One of the two forwarded endpoints, with its parsed path parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /api/v1/data_sources/{data_source_id}/test`
    TestConnection { data_source_id: i64 },
    /// `GET /api/v1/data_sources/test/{job_id}`
    TestResult { job_id: i64 },
}

impl Route {
    /// The route's name in audit records.
    pub fn name(&self) -> &'static str {
        match self {
            Self::TestConnection { .. } => "test_connection",
            Self::TestResult { .. } => "test_result",
        }
    }

    /// The path sent upstream, rebuilt from the parsed id so that what is forwarded is exactly
    /// what is audited.
    pub fn upstream_path(&self) -> String {
        match self {
            Self::TestConnection { data_source_id } => format!("{PREFIX}{data_source_id}/test"),
            Self::TestResult { job_id } => format!("{PREFIX}test/{job_id}"),
        }
    }
}

/// What a request's method and path come to.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched {
    Route(Route),
    /// Right shape, but the id is not an integer that fits an id; names the parameter.
    InvalidId {
        route: &'static str,
        param: &'static str,
        why: BadInteger,
    },
    MethodNotAllowed {
        allow: &'static str,
    },
    NotFound,
}

/// Matches a method and raw path (no query) against the two endpoints.
pub fn match_route(method: &Method, path: &str) -> Matched {
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return Matched::NotFound;
    };
    let Some((first, second)) = rest.split_once('/').filter(|(_, s)| !s.contains('/')) else {
        return Matched::NotFound;
    };
    if [first, second].iter().any(|s| !is_plain_segment(s)) {
        return Matched::NotFound;
    }
    let starts_test = second == "test"; // {data_source_id}/test
    let reads_result = first == "test"; // test/{job_id}
    if *method == Method::POST && starts_test {
        return match parse_id(first) {
            Ok(data_source_id) => Matched::Route(Route::TestConnection { data_source_id }),
            Err(why) => Matched::InvalidId {
                route: "test_connection",
                param: "data_source_id",
                why,
            },
        };
    }
    if *method == Method::GET && reads_result {
        return match parse_id(second) {
            Ok(job_id) => Matched::Route(Route::TestResult { job_id }),
            Err(why) => Matched::InvalidId {
                route: "test_result",
                param: "job_id",
                why,
            },
        };
    }
    match (starts_test, reads_result) {
        (true, true) => Matched::MethodNotAllowed { allow: "GET, POST" },
        (true, false) => Matched::MethodNotAllowed { allow: "POST" },
        (false, true) => Matched::MethodNotAllowed { allow: "GET" },
        (false, false) => Matched::NotFound,
    }
}

/// An id as Rust spells an `i64` (optional sign, decimal digits), or why it is not one.
fn parse_id(segment: &str) -> Result<i64, BadInteger> {
    segment.parse().map_err(|e: std::num::ParseIntError| {
        use std::num::IntErrorKind;
        match e.kind() {
            IntErrorKind::PosOverflow => BadInteger::TooLarge,
            IntErrorKind::NegOverflow => BadInteger::TooSmall,
            _ => BadInteger::NotInteger,
        }
    })
}

/// A segment that means only itself: not empty, not `.`/`..`, no percent-encoding of a
/// separator or dot that a server further on might decode.
fn is_plain_segment(segment: &str) -> bool {
    if segment.is_empty() || segment == "." || segment == ".." {
        return false;
    }
    // Without a copy: a segment holds a `%` only when something is encoded in it.
    !segment.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                [w[1], w[2].to_ascii_lowercase()],
                [b'2', b'f' | b'e'] | [b'5', b'c'] | [b'0', b'0']
            )
    })
}

impl Fact for Route {
    fn record(self, facts: &mut AuditFacts) {
        facts.route = Some(self.name());
        match self {
            Self::TestConnection { data_source_id } => facts.data_source_id = Some(data_source_id),
            Self::TestResult { job_id } => facts.job_id = Some(job_id),
        }
    }
}

/// The route name of a request refused for an invalid id.
struct RouteName(&'static str);

impl Fact for RouteName {
    fn record(self, facts: &mut AuditFacts) {
        facts.route = Some(self.0);
    }
}

/// Refuses everything but the two endpoints; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct AllowRoutesLayer;

impl<S> Layer<S> for AllowRoutesLayer {
    type Service = AllowRoutes<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AllowRoutes { inner }
    }
}

#[derive(Debug, Clone)]
pub struct AllowRoutes<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for AllowRoutes<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Refuse<Stamped<S::Future, Route>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // HTTP/1.1 requires it (RFC 9112, 3.2); a request without it came from no real client.
        if request.version() == Version::HTTP_11 && !request.headers().contains_key(HOST) {
            return refuse(error::bad_request(
                "an HTTP/1.1 request must carry a Host header",
            ));
        }
        let route = match match_route(request.method(), request.uri().path()) {
            Matched::Route(route) => route,
            Matched::InvalidId { route, param, why } => {
                let mut response = error::invalid_integer(param, why);
                record_fact(&mut response, RouteName(route));
                return refuse(response);
            }
            Matched::MethodNotAllowed { allow } => return refuse(error::method_not_allowed(allow)),
            Matched::NotFound => return refuse(error::not_found()),
        };
        request.extensions_mut().insert(route);
        Either::Right(Stamped::new(self.inner.call(request), route))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{call, Recorder};

    #[test]
    fn the_two_endpoints_parse_their_ids() {
        assert_eq!(
            match_route(&Method::POST, "/api/v1/data_sources/42/test"),
            Matched::Route(Route::TestConnection { data_source_id: 42 })
        );
        assert_eq!(
            match_route(&Method::GET, "/api/v1/data_sources/test/-7"),
            Matched::Route(Route::TestResult { job_id: -7 })
        );
        assert_eq!(
            match_route(&Method::POST, "/api/v1/data_sources/+9/test"),
            Matched::Route(Route::TestConnection { data_source_id: 9 })
        );
    }

    #[test]
    fn non_integer_ids_name_their_parameter() {
        for id in ["abc", "1.5", "", " 1"] {
            let path = format!("/api/v1/data_sources/{id}/test");
            let matched = match_route(&Method::POST, &path);
            if id.is_empty() {
                assert_eq!(matched, Matched::NotFound, "{path}");
            } else {
                assert_eq!(
                    matched,
                    Matched::InvalidId {
                        route: "test_connection",
                        param: "data_source_id",
                        why: BadInteger::NotInteger,
                    },
                    "{path}"
                );
            }
        }
        assert_eq!(
            match_route(&Method::GET, "/api/v1/data_sources/test/x1"),
            Matched::InvalidId {
                route: "test_result",
                param: "job_id",
                why: BadInteger::NotInteger,
            }
        );
    }

    #[test]
    fn integers_out_of_range_say_which_bound_they_cross() {
        assert_eq!(
            match_route(
                &Method::POST,
                "/api/v1/data_sources/99999999999999999999/test"
            ),
            Matched::InvalidId {
                route: "test_connection",
                param: "data_source_id",
                why: BadInteger::TooLarge,
            }
        );
        assert_eq!(
            match_route(
                &Method::GET,
                "/api/v1/data_sources/test/-9223372036854775809"
            ),
            Matched::InvalidId {
                route: "test_result",
                param: "job_id",
                why: BadInteger::TooSmall,
            }
        );
        assert_eq!(
            match_route(
                &Method::GET,
                "/api/v1/data_sources/test/9223372036854775807"
            ),
            Matched::Route(Route::TestResult { job_id: i64::MAX })
        );
    }

    #[test]
    fn other_methods_are_told_what_is_allowed() {
        assert_eq!(
            match_route(&Method::GET, "/api/v1/data_sources/1/test"),
            Matched::MethodNotAllowed { allow: "POST" }
        );
        assert_eq!(
            match_route(&Method::DELETE, "/api/v1/data_sources/test/1"),
            Matched::MethodNotAllowed { allow: "GET" }
        );
        assert_eq!(
            match_route(&Method::PUT, "/api/v1/data_sources/test/test"),
            Matched::MethodNotAllowed { allow: "GET, POST" }
        );
    }

    #[test]
    fn lookalike_and_forbidden_paths_are_not_found() {
        for path in [
            "/api/v1/data_sources",
            "/api/v1/data_sources/1",
            "/api/v1/data_sources/1/query",
            "/api/v1/data_sources/1/test/",
            "/api/v1/data_sources//1/test",
            "/api/v1/data_sources/1//test",
            "/api/v1//data_sources/1/test",
            "/api/v1/data_sources/../test",
            "/api/v1/data_sources/./test",
            "/api/v1/data_sources/1%2Ftest",
            "/api/v1/data_sources/1%2f..%2fquery/test",
            "/api/v1/data_sources/test/1/extra",
            "/api/v1/audit_logs",
            "/API/v1/data_sources/1/test",
            "/",
        ] {
            assert_eq!(
                match_route(&Method::POST, path),
                Matched::NotFound,
                "{path}"
            );
        }
    }

    #[tokio::test]
    async fn refused_routes_never_reach_the_inner_service() {
        let recorder = Recorder::default();
        let service = AllowRoutesLayer.layer(recorder.service());
        let response = call(
            service.clone(),
            Method::POST,
            "/api/v1/data_sources/1/query",
        )
        .await;
        assert_eq!(response.status(), 404);
        let response = call(service.clone(), Method::GET, "/api/v1/data_sources/1/test").await;
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()["allow"], "POST");
        let response = call(service, Method::POST, "/api/v1/data_sources/x/test").await;
        assert_eq!(response.status(), 422);
        assert_eq!(recorder.calls(), 0);
    }

    #[tokio::test]
    async fn allowed_route_is_passed_on_with_its_parsed_id() {
        let recorder = Recorder::default();
        let service = AllowRoutesLayer.layer(recorder.service());
        let response = call(service, Method::POST, "/api/v1/data_sources/42/test").await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            recorder.last_extension::<Route>(),
            Some(Route::TestConnection { data_source_id: 42 })
        );
        let facts = response.extensions().get::<AuditFacts>().unwrap();
        assert_eq!(facts.route, Some("test_connection"));
        assert_eq!(facts.data_source_id, Some(42));
    }
}
