//! Recording fakes for the layers' unit tests.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, Method, Request, Response};
use tower::{Service, ServiceExt};

use crate::Body;

/// An inner service that answers 200 and remembers what reached it.
#[derive(Clone, Default)]
pub struct Recorder {
    seen: Arc<Mutex<Vec<Request<()>>>>,
}

impl Recorder {
    pub fn service<B: Send + 'static>(
        &self,
    ) -> impl Service<Request<B>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone
    {
        let seen = self.seen.clone();
        tower::service_fn(move |request: Request<B>| {
            let (parts, _) = request.into_parts();
            seen.lock().unwrap().push(Request::from_parts(parts, ()));
            std::future::ready(Ok::<_, Infallible>(Response::new(Body::default())))
        })
    }

    pub fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last_headers(&self) -> HeaderMap {
        self.seen
            .lock()
            .unwrap()
            .last()
            .expect("a call")
            .headers()
            .clone()
    }

    pub fn last_extension<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.seen
            .lock()
            .unwrap()
            .last()?
            .extensions()
            .get::<T>()
            .cloned()
    }
}

/// Sends one empty-bodied HTTP/1.1 request (with its `Host`) through `service`.
pub async fn call<S>(service: S, method: Method, path: &str) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "gateway.test")
        .body(Body::default())
        .unwrap();
    service.oneshot(request).await.unwrap()
}
