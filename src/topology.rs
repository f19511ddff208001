//! A point-in-time view of the cluster: which node is the primary, how far
//! each replica has replayed, which nodes are healthy.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lsn::{DEFAULT_WAL_SEGMENT_SIZE, Lsn};
use crate::token::ClusterId;

/// What a node is, as last observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Accepts writes (`pg_is_in_recovery()` is false).
    Primary,
    /// A hot standby replaying WAL.
    Replica,
    /// Not yet observed, or unreachable.
    Unknown,
}

/// The last observed state of one node.
#[derive(Clone, Debug, Serialize)]
pub struct NodeState {
    /// The node's configured name.
    pub name: String,
    /// Role as last observed (the configured role until the first probe).
    pub role: Role,
    /// False while the node is ejected (probe or query failed).
    pub healthy: bool,
    /// `pg_last_wal_replay_lsn()` for replicas, `pg_current_wal_insert_lsn()`
    /// for the primary.
    pub lsn: Option<Lsn>,
    /// Bytes of WAL the replica has yet to replay (0 for the primary).
    pub lag_bytes: Option<u64>,
    /// Upper bound on how stale the replica's data is.
    #[serde(serialize_with = "ser_opt_duration")]
    pub lag: Option<Duration>,
    /// The node's timeline when known.
    pub timeline: Option<u32>,
    /// The last probe or query error while unhealthy.
    pub last_error: Option<String>,
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

impl NodeState {
    /// A node not yet probed.
    pub fn new(name: impl Into<String>, role: Role) -> Self {
        NodeState {
            name: name.into(),
            role,
            healthy: false,
            lsn: None,
            lag_bytes: None,
            lag: None,
            timeline: None,
            last_error: None,
        }
    }

    /// True for a healthy replica.
    pub fn is_serving_replica(&self) -> bool {
        self.healthy && self.role == Role::Replica
    }
}

/// A snapshot of the whole cluster, published by the
/// [`LagMonitor`](crate::LagMonitor) and read by routing without locks.
#[derive(Clone, Debug, Serialize)]
pub struct Topology {
    /// Every node, in configuration order (index 0 is the configured primary).
    pub nodes: Vec<NodeState>,
    /// Index of the current primary, if one is known.
    pub primary: Option<usize>,
    /// The primary's insert position at the last probe.
    pub primary_lsn: Option<Lsn>,
    /// The cluster identity (system identifier and the primary's timeline).
    pub cluster: Option<ClusterId>,
    /// `wal_segment_size` in bytes.
    pub wal_segment_size: u64,
    /// Increases with every published snapshot.
    pub generation: u64,
    /// When this snapshot was taken.
    #[serde(skip)]
    pub taken_at: Instant,
}

impl Topology {
    /// The initial view before the first probe: the configured roles,
    /// optimistically healthy so that the first requests can be served.
    pub fn initial(nodes: Vec<NodeState>) -> Self {
        let primary = nodes.iter().position(|n| n.role == Role::Primary);
        Topology {
            nodes,
            primary,
            primary_lsn: None,
            cluster: None,
            wal_segment_size: DEFAULT_WAL_SEGMENT_SIZE,
            generation: 0,
            taken_at: Instant::now(),
        }
    }

    /// Indices of the healthy replicas.
    pub fn serving_replicas(&self) -> impl Iterator<Item = usize> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_serving_replica())
            .map(|(i, _)| i)
    }

    /// The replay position of node `i` if it is a healthy replica.
    pub fn replica_lsn(&self, i: usize) -> Option<Lsn> {
        self.nodes
            .get(i)
            .filter(|n| n.is_serving_replica())
            .and_then(|n| n.lsn)
    }
}
