//! [`TokenTracking`], the service made by
//! [`TokenTrackingLayer`](super::TokenTrackingLayer).

use std::task::{Context, Poll};

use tower::Service;

use super::TokenTrackingFuture;
use crate::model::token::{SharedToken, TokenHolder};
use crate::tower::service::{Request, Response};

/// The service made by [`TokenTrackingLayer`](super::TokenTrackingLayer).
#[derive(Clone, Debug)]
pub struct TokenTracking<S> {
    pub(super) inner: S,
    pub(super) token: SharedToken,
}

impl<S> Service<Request> for TokenTracking<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = TokenTrackingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let mut token = TokenHolder::new(req.token);
        token.observe(self.token.get());
        req.token = token.get();
        TokenTrackingFuture {
            inner: self.inner.call(req),
            token: self.token.clone(),
        }
    }
}
