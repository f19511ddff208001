//! # lagrouter
//!
//! Replication-lag-aware routing for PostgreSQL: writes go to the primary,
//! reads go to a replica that is fresh enough, and a session always sees its
//! own writes ("read-your-writes") and never goes back in time ("monotonic
//! reads").
//!
//! The guarantee is carried by a [`ConsistencyToken`]: the WAL position
//! (LSN) of the session's last commit, captured in the same round trip as
//! the write. A read carrying a token is served only by a replica whose
//! `pg_last_wal_replay_lsn()` has reached it; routing waits briefly for one
//! (checking the replica's position in the same round trip as the read) and
//! otherwise falls back to the primary.
//!
//! ```no_run
//! use std::time::Duration;
//! use lagrouter::{Cluster, Consistency};
//!
//! # async fn demo() -> Result<(), lagrouter::Error> {
//! let cluster = Cluster::builder()
//!     .primary("host=db-primary user=app password=secret dbname=app")
//!     .replica("host=db-replica-1 user=app password=secret dbname=app")
//!     .replica("host=db-replica-2 user=app password=secret dbname=app")
//!     .policy(Consistency::read_your_writes(Duration::from_millis(100)))
//!     .build()
//!     .await?;
//!
//! let mut session = cluster.session();
//! session
//!     .execute("INSERT INTO notes(id, body) VALUES ($1, $2)", &[&1i32, &"hi"])
//!     .await?;
//! // Never stale: a replica that replayed the insert, or the primary.
//! let row = session.query_one("SELECT body FROM notes WHERE id = $1", &[&1i32]).await?;
//! let body: &str = row.get(0);
//!
//! // Carry the guarantee to the next HTTP request of this user:
//! let token: String = session.token().map(|t| t.to_string()).unwrap_or_default();
//! # let _ = (body, token);
//! # Ok(()) }
//! ```
//!
//! The same routing is available as a [`tower::Service`](::tower::Service)
//! ([`RouterService`]) with [`tower`] layers for policies and token
//! tracking, and the test harness that starts real primary/replica clusters
//! is the `lagrouter-testing` crate.

#![warn(missing_docs)]

// Dependency order, each module using only modules listed above it:
// model ← error ← probe, connect ← monitor; error ← routing (the read
// engine); all of these ← client
// ← tower, http. `metrics` (names and descriptions only) is a leaf.
pub mod model;

pub mod error;
pub mod metrics;
pub mod probe;

pub mod connect;
pub mod monitor;
pub mod routing;

pub mod client;

#[cfg(feature = "http")]
pub mod http;
pub mod tower;

pub use client::{
    Cluster, ClusterBuilder, FallbackReason, IntoNodeConfig, Node, ServedBy, Session, Transaction,
};
pub use connect::Connector;
pub use error::{Error, Result};
pub use model::{
    ClusterId, Consistency, ConsistencyToken, Fallback, Lsn, NodeState, Role, SharedToken,
    TokenError, TokenHolder, Topology,
};
pub use monitor::{LagMonitor, MonitorConfig, MonitorTarget};
pub use routing::{LoadBalance, ReadContext, Route, Router};
pub use tower::{ConsistencyLayer, Intent, Request, Response, RouterService, TokenTrackingLayer};

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
