//! `tower::Layer`s around [`RouterService`](crate::RouterService): a default
//! consistency policy, and session-style token tracking.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use pin_project::pin_project;
use tower::{Layer, Service};

use crate::policy::Consistency;
use crate::service::{Request, Response};
use crate::token::ConsistencyToken;

/// Sets the consistency policy of requests that do not name one.
#[derive(Clone, Copy, Debug)]
pub struct ConsistencyLayer {
    policy: Consistency,
}

impl ConsistencyLayer {
    /// Requests without a policy get `policy`.
    pub fn new(policy: Consistency) -> Self {
        ConsistencyLayer { policy }
    }
}

impl<S> Layer<S> for ConsistencyLayer {
    type Service = ConsistencyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ConsistencyService {
            inner,
            policy: self.policy,
        }
    }
}

/// The service made by [`ConsistencyLayer`].
#[derive(Clone, Debug)]
pub struct ConsistencyService<S> {
    inner: S,
    policy: Consistency,
}

impl<S: Service<Request>> Service<Request> for ConsistencyService<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> S::Future {
        req.consistency.get_or_insert(self.policy);
        self.inner.call(req)
    }
}

/// A token shared by every request through a [`TokenTrackingLayer`]:
/// reads carry it, and each response advances it.
#[derive(Clone, Debug, Default)]
pub struct SharedToken(Arc<Mutex<Option<ConsistencyToken>>>);

impl SharedToken {
    /// Starts from `token`.
    pub fn new(token: Option<ConsistencyToken>) -> Self {
        SharedToken(Arc::new(Mutex::new(token)))
    }

    /// The current token.
    pub fn get(&self) -> Option<ConsistencyToken> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges `token` in (keeps the newer).
    pub fn observe(&self, token: Option<ConsistencyToken>) {
        let Some(t) = token else { return };
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(g.map_or(t, |cur| cur.max(t)));
    }
}

/// Gives a stack of services session semantics: every request carries the
/// shared token (unless it has a newer one) and every response advances it.
#[derive(Clone, Debug, Default)]
pub struct TokenTrackingLayer {
    token: SharedToken,
}

impl TokenTrackingLayer {
    /// Tracks into `token`.
    pub fn new(token: SharedToken) -> Self {
        TokenTrackingLayer { token }
    }
}

impl<S> Layer<S> for TokenTrackingLayer {
    type Service = TokenTracking<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TokenTracking {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service made by [`TokenTrackingLayer`].
#[derive(Clone, Debug)]
pub struct TokenTracking<S> {
    inner: S,
    token: SharedToken,
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
        let shared = self.token.get();
        req.token = match (req.token, shared) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        TokenTrackingFuture {
            inner: self.inner.call(req),
            token: self.token.clone(),
        }
    }
}

/// Response future of [`TokenTracking`].
#[pin_project]
#[derive(Debug)]
pub struct TokenTrackingFuture<F> {
    #[pin]
    inner: F,
    token: SharedToken,
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
