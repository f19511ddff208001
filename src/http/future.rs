//! [`ConsistencyTokenFuture`], the response future of
//! [`ConsistencyTokenService`](super::ConsistencyTokenService): writes a
//! changed token back to the client.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::http::Response;
use pin_project::pin_project;

use super::{ConsistencyTokenLayer, TokenCell};
use crate::model::token::ConsistencyToken;

#[derive(Debug)]
pub(super) struct WriteBack {
    pub(super) cell: TokenCell,
    pub(super) initial: Option<ConsistencyToken>,
    pub(super) layer: ConsistencyTokenLayer,
}

/// Response future of [`ConsistencyTokenService`](super::ConsistencyTokenService).
#[pin_project]
#[derive(Debug)]
pub struct ConsistencyTokenFuture<F> {
    #[pin]
    pub(super) inner: F,
    pub(super) write_back: Option<WriteBack>,
}

impl<F, ResBody, E> Future for ConsistencyTokenFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(wb) = this.write_back.take() {
            let token = wb.cell.get();
            if token != wb.initial {
                match token {
                    Some(t) => wb.layer.write_token(response.headers_mut(), &t),
                    None => wb.layer.clear_token(response.headers_mut()),
                }
            }
        }
        Poll::Ready(Ok(response))
    }
}
