//! The value types everything else is built on: WAL positions, consistency
//! tokens, routing policies and topology snapshots. No I/O.

pub mod lsn;
pub mod policy;
pub mod token;
pub mod topology;

pub use lsn::Lsn;
pub use policy::{Consistency, Fallback};
pub use token::{ClusterId, ConsistencyToken, SharedToken, TokenError, TokenHolder};
pub use topology::{NodeState, Role, Topology};
