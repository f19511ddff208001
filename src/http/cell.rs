//! [`TokenCell`]: the per-request token the layer shares with the handler.

use crate::client::{Cluster, Session};
use crate::model::token::SharedToken;

/// The per-request token, shared between the layer and the handler.
///
/// [`ConsistencyTokenService`](super::ConsistencyTokenService) inserts one into every request's extensions,
/// seeded with the client's (validated) token. Handlers take it with axum's
/// `Extension<TokenCell>` (or `request.extensions().get::<TokenCell>()`),
/// open their [`Session`] from it and write the session's token back; after
/// the handler the layer sends the newest token to the client.
///
/// Without the layer there is no cell: axum's `Extension<TokenCell>`
/// then rejects the request (500), so install the layer on every route
/// whose handlers take the cell.
///
/// Cloning is cheap and clones share the token. Tokens only move forward:
/// [`TokenCell::observe`] keeps the newer of the current and the given one
/// (only [`TokenCell::clear`] goes back).
///
/// It is the crate's [`SharedToken`] (also used by
/// [`TokenTrackingLayer`](crate::TokenTrackingLayer)), with two methods for
/// handlers: [`TokenCell::session`] and [`TokenCell::absorb`].
pub type TokenCell = SharedToken;

/// Handler helpers of [`TokenCell`] (feature `http`).
impl SharedToken {
    /// A new session of `cluster` resuming from the cell's token: its reads
    /// see everything this client wrote or read before.
    /// Its reads capture their positions, so that the token handed back to
    /// the client covers them.
    pub fn session(&self, cluster: &Cluster) -> Session {
        let session = cluster.session().capture_read_positions(true);
        match self.get() {
            Some(t) => session.with_token(t),
            None => session,
        }
    }

    /// Merges the session's token in (call after the session's last
    /// statement, also when it failed: earlier statements may have written).
    pub fn absorb(&self, session: &Session) {
        self.observe(session.token());
    }
}
