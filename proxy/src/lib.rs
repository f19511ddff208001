//! Library surface of the lagrouter proxy.

pub mod admin;
pub mod classify;
pub mod config;
pub mod tls;

pub mod auth;
pub mod backend;
#[cfg(feature = "demo")]
pub mod demo;
pub mod frontend;
pub mod pool;
pub mod protocol;
pub mod router;
pub mod server;
pub mod session;
