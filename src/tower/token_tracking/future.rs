//! [`TokenTrackingFuture`], the response future of
//! [`TokenTracking`](super::TokenTracking).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project::pin_project;

use crate::model::token::SharedToken;
use crate::tower::service::Response;

/// Response future of [`TokenTracking`](super::TokenTracking).
#[pin_project]
#[derive(Debug)]
pub struct TokenTrackingFuture<F> {
    #[pin]
    pub(super) inner: F,
    pub(super) token: SharedToken,
}

impl<F, E> Future for TokenTrackingFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Ok(resp) = &out {
            this.token.observe(resp.token);
        }
        Poll::Ready(out)
    }
}
