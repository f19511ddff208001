//! [`ConsistencyLayer`]: a default consistency policy for the requests
//! through a [`RouterService`](crate::RouterService).

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::service::Request;
use crate::model::policy::Consistency;

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
