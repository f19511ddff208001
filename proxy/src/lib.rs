//! Library surface of the lagrouter proxy.

pub mod admin;
pub mod classify;
pub mod config;
pub mod tls;
