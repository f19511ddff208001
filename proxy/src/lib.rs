//! Library surface of the lagrouter proxy.
//!
//! Modules, lowest layer first (each uses only those before it):
//! [`metrics`], [`stats`], [`wire`], [`classify`], [`config`], [`router`];
//! [`backend`]; [`frontend`]'s `auth` and `tls`; [`server`]'s `settings`
//! and `shared`; [`frontend`]'s `conn` and `startup`; [`session`] and [`console`]; and
//! [`server`]'s `listen`, which starts the proxy. [`demo`] starts a local
//! cluster for it.

pub mod classify;
pub mod config;
pub mod metrics;
pub mod stats;
pub mod wire;

pub mod backend;
pub mod console;
#[cfg(feature = "demo")]
pub mod demo;
pub mod frontend;
pub mod server;
pub mod session;

/// The wire protocol module under its former name.
pub use wire as protocol;
