//! [`ConsistencyTokenService`], the service made by
//! [`ConsistencyTokenLayer`].

use std::task::{Context, Poll};

use ::http::Request;
use ::http::Response;
use tower::{Layer, Service};

use super::future::WriteBack;
use super::{ConsistencyTokenFuture, ConsistencyTokenLayer, TokenCell};

/// The service made by [`ConsistencyTokenLayer`]: seeds a [`TokenCell`]
/// extension from the request and writes a changed token to the response.
#[derive(Clone, Debug)]
pub struct ConsistencyTokenService<S> {
    pub(super) inner: S,
    pub(super) layer: ConsistencyTokenLayer,
}

impl<S> ConsistencyTokenService<S> {
    /// Wraps `inner` with `layer`'s configuration.
    pub fn new(inner: S, layer: &ConsistencyTokenLayer) -> Self {
        layer.layer(inner)
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ConsistencyTokenService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ConsistencyTokenFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let initial = self.layer.read_token(req.headers());
        let cell = TokenCell::new(initial);
        req.extensions_mut().insert(cell.clone());
        ConsistencyTokenFuture {
            inner: self.inner.call(req),
            write_back: Some(WriteBack {
                cell,
                initial,
                layer: self.layer.clone(),
            }),
        }
    }
}
