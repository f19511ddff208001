//! Session semantics for a stack of services: every request carries a
//! [`SharedToken`](crate::SharedToken) and every response advances it.

mod future;
mod layer;
mod service;

pub use future::TokenTrackingFuture;
pub use layer::TokenTrackingLayer;
pub use service::TokenTracking;
