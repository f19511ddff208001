//! The client: a [`Cluster`] (pools, monitor, router) and the [`Session`]s
//! that run statements on it with read-your-writes and monotonic reads.

mod cluster;
pub(crate) mod exec;
mod session;

pub use cluster::{Cluster, ClusterBuilder, IntoNodeConfig, Node};
pub use exec::{FallbackReason, ServedBy};
pub use session::{Session, Transaction};
