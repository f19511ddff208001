//! [`TokenTrackingLayer`].

use tower::Layer;

use super::TokenTracking;
use crate::model::token::SharedToken;

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
