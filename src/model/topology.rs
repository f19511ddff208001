//! A point-in-time view of the cluster: which node is the primary, how far
//! each replica has replayed, which nodes are healthy.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::lsn::{DEFAULT_WAL_SEGMENT_SIZE, Lsn};
use crate::model::token::{ClusterId, ConsistencyToken};

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
    /// When the monitor sent the probe that read [`NodeState::lsn`]: the
    /// node's position was at least `lsn` at some instant after this one.
    #[serde(skip)]
    pub sampled_at: Option<Instant>,
    /// Increases whenever the node is seen failing (a failed probe, or a
    /// failure a query reported): positions observed in one epoch say
    /// nothing about the node after a restart, which can bring a replica
    /// back at an earlier replay position.
    pub epoch: u64,
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
            sampled_at: None,
            epoch: 0,
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
    /// The primary's timeline history: `(timeline, switch point)` for every
    /// ancestor of its current timeline, i.e. the WAL position up to which
    /// each earlier timeline is part of the primary's history. Read from the
    /// primary's `.history` file when its timeline is above 1; empty on
    /// timeline 1, or when the file could not be read (the monitor's user
    /// needs superuser, `pg_read_server_files` or `EXECUTE` on
    /// `pg_read_file(text)`).
    pub timeline_history: Vec<(u32, Lsn)>,
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
            timeline_history: Vec::new(),
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

    /// Whether `token` stands for writes that are not in the current
    /// primary's history: writes acknowledged by a former primary on an
    /// earlier timeline and lost in a failover (asynchronous replication).
    ///
    /// Returns the last position of the token's timeline that the current
    /// history contains (its switch point), or — when the switch point is
    /// unknown — the primary's current position, which is at or past it.
    /// `None` when the token is not known to be lost: it belongs to the
    /// current (or a later) timeline, or lies at or before the switch point.
    ///
    /// A token of the current timeline that is ahead of the primary is
    /// detected on the primary itself (see [`crate::Error::TokenAhead`]).
    pub fn token_lost(&self, token: &ConsistencyToken) -> Option<Lsn> {
        let current = self.cluster?;
        if token.cluster.system_identifier != current.system_identifier
            || token.cluster.timeline >= current.timeline
        {
            return None;
        }
        match self
            .timeline_history
            .iter()
            .find(|(tli, _)| *tli == token.cluster.timeline)
        {
            Some(&(_, switch)) => (token.lsn > switch).then_some(switch),
            // The new timeline starts at the switch point, so a position of
            // the old timeline beyond the primary's current one cannot be in
            // its history.
            None => self.primary_lsn.filter(|&p| token.lsn > p),
        }
    }

    /// The replay position of node `i` if it is a healthy replica.
    pub fn replica_lsn(&self, i: usize) -> Option<Lsn> {
        self.nodes
            .get(i)
            .filter(|n| n.is_serving_replica())
            .and_then(|n| n.lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(timeline: u32, primary_lsn: u64, history: &[(u32, u64)]) -> Topology {
        let mut t = Topology::initial(vec![NodeState::new("p", Role::Primary)]);
        t.cluster = Some(ClusterId {
            system_identifier: 42,
            timeline,
        });
        t.primary_lsn = Some(Lsn(primary_lsn));
        t.timeline_history = history.iter().map(|&(t, l)| (t, Lsn(l))).collect();
        t
    }

    #[test]
    fn tokens_past_the_switch_point_of_their_timeline_are_lost() {
        let t = topo(3, 10_000, &[(1, 1_000), (2, 5_000)]);
        let tok = |lsn, tli| ConsistencyToken::new(Lsn(lsn), 42, tli);
        assert_eq!(t.token_lost(&tok(999, 1)), None);
        assert_eq!(t.token_lost(&tok(1_000, 1)), None);
        // Behind the primary's position, but past the end of timeline 1.
        assert_eq!(t.token_lost(&tok(1_001, 1)), Some(Lsn(1_000)));
        assert_eq!(t.token_lost(&tok(4_000, 2)), None);
        assert_eq!(t.token_lost(&tok(5_001, 2)), Some(Lsn(5_000)));
        // The current timeline, a later one, or another cluster: no verdict.
        assert_eq!(t.token_lost(&tok(20_000, 3)), None);
        assert_eq!(t.token_lost(&tok(20_000, 4)), None);
        assert_eq!(
            t.token_lost(&ConsistencyToken::new(Lsn(9_999_999), 7, 1)),
            None
        );
    }

    #[test]
    fn without_history_only_tokens_ahead_of_the_primary_are_known_lost() {
        let t = topo(2, 10_000, &[]);
        let tok = |lsn| ConsistencyToken::new(Lsn(lsn), 42, 1);
        assert_eq!(t.token_lost(&tok(10_000)), None);
        assert_eq!(t.token_lost(&tok(10_001)), Some(Lsn(10_000)));
        let mut unknown = t.clone();
        unknown.primary_lsn = None;
        assert_eq!(unknown.token_lost(&tok(10_001)), None);
        let mut t1 = topo(1, 10, &[]);
        t1.timeline_history.clear();
        assert_eq!(t1.token_lost(&tok(10_001)), None);
    }
}
