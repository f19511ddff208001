//! The server side: connections from the proxy to PostgreSQL nodes
//! ([`conn`]) and their per-node pools ([`pool`]); [`home`] tells which
//! worker thread's event loop a connection's socket is registered with. Depends only on
//! [`crate::wire`] and [`crate::metrics`].
#![warn(missing_docs)]

pub mod conn;
pub mod home;
pub mod pool;

pub use conn::{BackendConn, BackendError, BackendTarget, CancelTarget, send_cancel};
pub use pool::{
    IdleServer, NodePool, PoolError, PoolKey, PoolSettings, PoolStats, PooledConn, Pools,
};
