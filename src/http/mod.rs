//! HTTP token propagation: read-your-writes across the requests of one user,
//! whichever service instance and connection serves them.
//!
//! A web service behind a load balancer runs many instances: a user's write
//! and their next page load hit different instances, pools and connections.
//! [`ConsistencyTokenLayer`] carries the user's [`ConsistencyToken`](crate::ConsistencyToken) from one
//! request to the next in a cookie (for browsers) and/or a response header
//! (for API clients):
//!
//! 1. it reads the token from the request header `x-lagrouter-token` or the
//!    cookie `lagrouter_token` (names configurable), ignoring anything that
//!    is not a valid token of this cluster;
//! 2. it hands it to the handler in a [`TokenCell`] request extension; the
//!    handler opens its [`Session`](crate::Session) from the cell ([`TokenCell::session`])
//!    and writes the session's token back ([`TokenCell::absorb`]);
//! 3. after the handler returns it writes the token back to the client
//!    (header and/or `Set-Cookie`) when it changed.
//!
//! Tokens from clients are untrusted. Garbage, tokens of another cluster and
//! (with [`ConsistencyTokenLayer::signing_key`]) unsigned or badly signed
//! tokens are treated as absent, logged at `debug` and counted in
//! `lagrouter_http_rejected_tokens_total{reason}`; they never fail the
//! request.
//!
//! Without a signing key a client can present a token of this cluster from
//! the future; reads carrying it wait for replicas in vain and then fail
//! with [`Error::TokenAhead`](crate::Error::TokenAhead) on the primary.
//! Handlers can recover with [`TokenCell::clear`] and a fresh session (see
//! `examples/axum_app.rs`); with [`ConsistencyTokenLayer::signing_key`] such
//! tokens cannot be made.
//!
//! ```no_run
//! use axum::{Extension, Router, extract::State, routing::post};
//! use lagrouter::Cluster;
//! use lagrouter::http::{ConsistencyTokenLayer, TokenCell};
//!
//! async fn create(
//!     State(cluster): State<Cluster>,
//!     Extension(cell): Extension<TokenCell>,
//!     body: String,
//! ) -> String {
//!     let mut session = cell.session(&cluster);
//!     let result = session.execute("INSERT INTO notes(body) VALUES ($1)", &[&body]).await;
//!     cell.absorb(&session); // the response carries the new token
//!     match result {
//!         Ok(_) => "ok".into(),
//!         Err(e) => e.to_string(),
//!     }
//! }
//!
//! fn app(cluster: Cluster) -> Router {
//!     Router::new()
//!         .route("/notes", post(create))
//!         .with_state(cluster.clone())
//!         .layer(ConsistencyTokenLayer::new().cluster(cluster))
//! }
//! ```
//!
//! The layer is a plain [`tower::Layer`] over `http::Request<B>` →
//! `http::Response<B2>`, so it works with hyper (through
//! `hyper_util::service::TowerToHyperService`) and any other tower-based
//! server as well; [`ConsistencyTokenLayer::read_token`] and
//! [`ConsistencyTokenLayer::write_token`] serve frameworks without tower.

mod cell;
mod future;
mod layer;
mod service;
mod signer;
#[cfg(test)]
mod tests;

pub use cell::TokenCell;
pub use future::ConsistencyTokenFuture;
pub use layer::{
    ConsistencyTokenLayer, DEFAULT_COOKIE_MAX_AGE, DEFAULT_COOKIE_NAME, DEFAULT_HEADER_NAME,
    REJECTED_TOKENS_METRIC, TokenRejection,
};
pub use service::ConsistencyTokenService;
