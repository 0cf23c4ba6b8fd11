//! Puts the Datafold key on the request, after removing every credential the caller sent.
//!
//! The caller's `Authorization`, `Cookie` and `Proxy-Authorization` are removed first, all of
//! their values, so that nothing the caller sends can replace or ride along with the key.

use std::task::{Context, Poll};

use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
use http::Request;
use tower::{Layer, Service};

use crate::secret::SharedKey;

#[derive(Debug, Clone)]
pub struct InjectApiKeyLayer {
    key: SharedKey,
}

impl InjectApiKeyLayer {
    pub fn new(key: SharedKey) -> Self {
        Self { key }
    }
}

impl<S> Layer<S> for InjectApiKeyLayer {
    type Service = InjectApiKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectApiKey {
            inner,
            key: self.key.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct InjectApiKey<S> {
    inner: S,
    key: SharedKey,
}

impl<S, B> Service<Request<B>> for InjectApiKey<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let headers = request.headers_mut();
        for name in [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION] {
            headers.remove(name);
        }
        headers.insert(AUTHORIZATION, self.key.load().header_value().clone());
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::ApiKey;
    use crate::test_support::Recorder;
    use crate::Body;
    use secrecy::SecretString;
    use tower::ServiceExt;

    const KEY: &str = "dfk_test_0a1b2c3d";

    #[tokio::test]
    async fn caller_authorization_is_replaced() {
        let recorder = Recorder::default();
        let key = ApiKey::from_secret(&SecretString::from(KEY.to_owned())).unwrap();
        let key = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(key));
        let service = InjectApiKeyLayer::new(key).layer(recorder.service());
        let request = Request::builder()
            .header(AUTHORIZATION, "Key stolen-or-guessed")
            .header(AUTHORIZATION, "Bearer second")
            .header(COOKIE, "session=abc")
            .header(PROXY_AUTHORIZATION, "Basic eDp5")
            .header("x-other", "kept")
            .body(Body::default())
            .unwrap();
        service.oneshot(request).await.unwrap();
        let headers = recorder.last_headers();
        let auth: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, [&format!("Key {KEY}")]);
        assert!(auth[0].is_sensitive());
        assert!(headers.get(COOKIE).is_none());
        assert!(headers.get(PROXY_AUTHORIZATION).is_none());
        assert_eq!(headers["x-other"], "kept");
    }
}
