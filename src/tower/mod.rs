//! Lag-aware routing as a `tower::Service` ([`RouterService`]) and the
//! `tower::Layer`s around it: a default consistency policy
//! ([`ConsistencyLayer`]) and session-style token tracking
//! ([`TokenTrackingLayer`]).

mod consistency;
mod service;
mod token_tracking;

pub use crate::model::token::SharedToken;
pub use consistency::{ConsistencyLayer, ConsistencyService};
pub use service::{Intent, Param, Request, Response, ResponseFuture, RouterService};
pub use token_tracking::{TokenTracking, TokenTrackingFuture, TokenTrackingLayer};
