//! Per-proxy counters for the admin console's `SHOW STATS`: per node and
//! read policy, lock-free. The Prometheus metrics ([`crate::metrics`]) are
//! process-wide; these belong to one proxy, so two proxies in a process (as
//! in tests) each report their own.
#![warn(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lagrouter::Consistency;
use lagrouter::routing::{FallbackReason, Served};

/// The policies, in `SHOW STATS` order.
pub const POLICIES: [&str; 5] = [
    "read_your_writes",
    "bounded_staleness",
    "eventual",
    "primary_after_write",
    "primary",
];

/// The fallback reasons, in `SHOW STATS` column order.
pub const FALLBACK_REASONS: [FallbackReason; 6] = [
    FallbackReason::WaitTimeout,
    FallbackReason::NoReplica,
    FallbackReason::EmptyResult,
    FallbackReason::ReadOnly,
    FallbackReason::RecoveryConflict,
    FallbackReason::ReplicaError,
];

/// The `SHOW STATS` column of each fallback reason, in
/// [`FALLBACK_REASONS`] order.
pub const FALLBACK_COLUMNS: [&str; 6] = [
    "fallbacks_wait_timeout",
    "fallbacks_no_replica",
    "fallbacks_empty_result",
    "fallbacks_read_only",
    "fallbacks_recovery_conflict",
    "fallbacks_replica_error",
];

fn policy_index(p: &Consistency) -> usize {
    match p {
        Consistency::ReadYourWrites { .. } => 0,
        Consistency::BoundedStaleness(_) => 1,
        Consistency::Eventual => 2,
        Consistency::PrimaryAfterWrite(_) => 3,
        Consistency::Primary => 4,
    }
}

fn reason_index(r: FallbackReason) -> usize {
    FALLBACK_REASONS
        .iter()
        .position(|x| *x == r)
        .unwrap_or(FALLBACK_REASONS.len() - 1)
}

/// Counters of one node under one policy.
#[derive(Default)]
struct Cell {
    statements: AtomicU64,
    reads: AtomicU64,
    replica_reads: AtomicU64,
    writes: AtomicU64,
    fallbacks: [AtomicU64; 6],
    token_waits: AtomicU64,
    token_wait_us: AtomicU64,
}

/// One row of `SHOW STATS`: a node under a policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsRow {
    /// Node index.
    pub node: usize,
    /// Policy label ([`POLICIES`]).
    pub policy: &'static str,
    /// Statements sent to the node (each counted once).
    pub statements: u64,
    /// Reads whose result came from the node.
    pub reads: u64,
    /// Of those, reads served by the node as a replica.
    pub replica_reads: u64,
    /// Units sent to the node as writes.
    pub writes: u64,
    /// Reads that came to the node instead of a replica, by reason
    /// ([`FALLBACK_REASONS`] order).
    pub fallbacks: [u64; 6],
    /// Reads that waited for a replica to reach their token.
    pub token_waits: u64,
    /// Their total wait, in microseconds.
    pub token_wait_us: u64,
}

/// The counters of one proxy.
pub struct Stats {
    cells: Vec<Cell>,
    tokens_ahead: AtomicU64,
}

impl Stats {
    /// Counters for `nodes` nodes.
    pub fn new(nodes: usize) -> Self {
        Stats {
            cells: (0..nodes * POLICIES.len())
                .map(|_| Cell::default())
                .collect(),
            tokens_ahead: AtomicU64::new(0),
        }
    }

    fn cell(&self, node: usize, policy: &Consistency) -> Option<&Cell> {
        self.cells.get(node * POLICIES.len() + policy_index(policy))
    }

    /// Counts `statements` statements sent to `node`, as a write unit when
    /// `write`.
    pub fn sent(&self, node: usize, policy: &Consistency, statements: usize, write: bool) {
        if let Some(c) = self.cell(node, policy) {
            c.statements.fetch_add(statements as u64, Ordering::Relaxed);
            if write {
                c.writes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a read the engine reported done.
    pub fn served(&self, policy: &Consistency, s: &Served) {
        let Some(c) = self.cell(s.node, policy) else {
            return;
        };
        c.reads.fetch_add(1, Ordering::Relaxed);
        if !s.primary {
            c.replica_reads.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(f) = s.fallback {
            c.fallbacks[reason_index(f)].fetch_add(1, Ordering::Relaxed);
        }
        if s.token_wait {
            self.waited(s.node, policy, s.waited);
        }
    }

    /// Counts a read sent to `node` (the primary) instead of a replica,
    /// that then runs as a write.
    pub fn fallback(&self, node: usize, policy: &Consistency, reason: FallbackReason) {
        if let Some(c) = self.cell(node, policy) {
            c.fallbacks[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a token wait on `node` (also one that ended in an error).
    pub fn waited(&self, node: usize, policy: &Consistency, waited: Duration) {
        if let Some(c) = self.cell(node, policy) {
            c.token_waits.fetch_add(1, Ordering::Relaxed);
            c.token_wait_us
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// Counts a read refused with 55000 (its token is ahead of the primary).
    pub fn token_ahead(&self) {
        self.tokens_ahead.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads refused with 55000 since start.
    pub fn tokens_ahead(&self) -> u64 {
        self.tokens_ahead.load(Ordering::Relaxed)
    }

    /// Every row with at least one count, by node then policy.
    pub fn rows(&self) -> Vec<StatsRow> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.cells
            .iter()
            .enumerate()
            .map(|(i, c)| StatsRow {
                node: i / POLICIES.len(),
                policy: POLICIES[i % POLICIES.len()],
                statements: get(&c.statements),
                reads: get(&c.reads),
                replica_reads: get(&c.replica_reads),
                writes: get(&c.writes),
                fallbacks: std::array::from_fn(|k| get(&c.fallbacks[k])),
                token_waits: get(&c.token_waits),
                token_wait_us: get(&c.token_wait_us),
            })
            .filter(|r| r.statements + r.reads + r.writes + r.token_waits > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(node: usize, primary: bool, fallback: Option<FallbackReason>) -> Served {
        Served {
            node,
            primary,
            fallback,
            waited: Duration::from_millis(3),
            token_wait: fallback == Some(FallbackReason::WaitTimeout),
            epoch: 0,
            next: None,
        }
    }

    #[test]
    fn counts_land_in_their_node_and_policy() {
        let s = Stats::new(3);
        let ryw = Consistency::read_your_writes(Duration::from_millis(100));
        s.sent(0, &ryw, 2, true);
        s.sent(1, &Consistency::Eventual, 1, false);
        s.served(&Consistency::Eventual, &served(1, false, None));
        s.served(&ryw, &served(0, true, Some(FallbackReason::WaitTimeout)));
        s.served(&ryw, &served(0, true, Some(FallbackReason::ReadOnly)));
        let rows = s.rows();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let primary = &rows[0];
        assert_eq!((primary.node, primary.policy), (0, "read_your_writes"));
        assert_eq!((primary.statements, primary.writes), (2, 1));
        assert_eq!((primary.reads, primary.replica_reads), (2, 0));
        assert_eq!(primary.fallbacks, [1, 0, 0, 1, 0, 0]);
        assert_eq!((primary.token_waits, primary.token_wait_us), (1, 3000));
        let replica = &rows[1];
        assert_eq!((replica.node, replica.policy), (1, "eventual"));
        assert_eq!((replica.reads, replica.replica_reads), (1, 1));
    }

    #[test]
    fn out_of_range_nodes_are_ignored() {
        let s = Stats::new(1);
        s.sent(5, &Consistency::Eventual, 1, false);
        assert!(s.rows().is_empty());
    }

    #[test]
    fn fallback_columns_follow_the_reasons() {
        for (r, c) in FALLBACK_REASONS.iter().zip(FALLBACK_COLUMNS) {
            assert_eq!(c, format!("fallbacks_{}", r.label()));
        }
    }

    #[test]
    fn labels_match_the_policies() {
        for p in [
            Consistency::read_your_writes(Duration::ZERO),
            Consistency::Eventual,
            Consistency::Primary,
            Consistency::BoundedStaleness(Duration::ZERO),
            Consistency::PrimaryAfterWrite(Duration::ZERO),
        ] {
            assert_eq!(POLICIES[policy_index(&p)], p.label());
        }
    }
}
