//! The routing decision: which node may serve a read, from a topology
//! snapshot alone (no I/O, no locks).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::model::lsn::Lsn;
use crate::model::policy::Consistency;
use crate::model::topology::Topology;

/// How reads are spread over eligible replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalance {
    /// Take eligible replicas in turn.
    #[default]
    RoundRobin,
    /// Take the eligible replica with the fewest requests in flight.
    LeastOutstanding,
}

/// Where a read should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A replica that, by the snapshot, already satisfies the request.
    Replica(usize),
    /// The most advanced replica, which has not reached the token in the
    /// snapshot: check its position in the same round trip as the read.
    ReplicaIfCaughtUp(usize),
    /// The primary.
    Primary,
}

/// What routing needs to know about one read besides the policy.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadContext<'a> {
    /// The position the read must see (read-your-writes / monotonic reads).
    pub token: Option<Lsn>,
    /// When the session last wrote (for [`Consistency::PrimaryAfterWrite`]).
    pub last_write: Option<Instant>,
    /// Nodes not to use (already failed for this request).
    pub exclude: &'a [usize],
}

/// Picks nodes for reads, spreading load over eligible replicas.
#[derive(Debug)]
pub struct Router {
    strategy: LoadBalance,
    next: AtomicUsize,
    outstanding: Box<[AtomicUsize]>,
}

impl Router {
    /// A router for `nodes` nodes.
    pub fn new(nodes: usize, strategy: LoadBalance) -> Self {
        Router {
            strategy,
            next: AtomicUsize::new(0),
            outstanding: (0..nodes).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Decides where a read goes.
    pub fn route(&self, topo: &Topology, policy: &Consistency, cx: &ReadContext<'_>) -> Route {
        let usable = |i: usize| !cx.exclude.contains(&i);
        match *policy {
            Consistency::Primary => Route::Primary,
            Consistency::Eventual => self.pick(topo, |i, _| usable(i)),
            Consistency::PrimaryAfterWrite(window) => {
                if cx.last_write.is_some_and(|w| w.elapsed() < window) {
                    Route::Primary
                } else {
                    self.pick(topo, |i, _| usable(i))
                }
            }
            Consistency::ReadYourWrites { .. } => match cx.token {
                None => self.pick(topo, |i, _| usable(i)),
                Some(t) => match self.pick(topo, |i, lsn| usable(i) && lsn.is_some_and(|l| l >= t))
                {
                    Route::Primary => topo
                        .serving_replicas()
                        .filter(|&i| usable(i))
                        .max_by_key(|&i| topo.nodes[i].lsn)
                        .map_or(Route::Primary, Route::ReplicaIfCaughtUp),
                    r => r,
                },
            },
            Consistency::BoundedStaleness(max_lag) => {
                let fresh = |i: usize| usable(i) && topo.nodes[i].lag.is_some_and(|l| l <= max_lag);
                match self.pick(topo, |i, lsn| {
                    fresh(i) && cx.token.is_none_or(|t| lsn.is_some_and(|l| l >= t))
                }) {
                    // The token is usually just past the snapshot (a session's
                    // last read advanced it): check the most advanced fresh
                    // replica in the read's round trip rather than give up.
                    Route::Primary if cx.token.is_some() => topo
                        .serving_replicas()
                        .filter(|&i| fresh(i))
                        .max_by_key(|&i| topo.nodes[i].lsn)
                        .map_or(Route::Primary, Route::ReplicaIfCaughtUp),
                    r => r,
                }
            }
        }
    }

    /// Chooses one healthy replica for which `eligible(index, lsn)` holds.
    fn pick(&self, topo: &Topology, eligible: impl Fn(usize, Option<Lsn>) -> bool) -> Route {
        let ok = |i: usize| topo.nodes[i].is_serving_replica() && eligible(i, topo.nodes[i].lsn);
        match self.strategy {
            LoadBalance::RoundRobin => {
                let count = (0..topo.nodes.len()).filter(|&i| ok(i)).count();
                if count == 0 {
                    return Route::Primary;
                }
                let k = self.next.fetch_add(1, Ordering::Relaxed) % count;
                (0..topo.nodes.len())
                    .filter(|&i| ok(i))
                    .nth(k)
                    .map_or(Route::Primary, Route::Replica)
            }
            LoadBalance::LeastOutstanding => {
                let n = topo.nodes.len().max(1);
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
                (0..topo.nodes.len())
                    .map(|k| (start + k) % n)
                    .filter(|&i| ok(i))
                    .min_by_key(|&i| self.load(i))
                    .map_or(Route::Primary, Route::Replica)
            }
        }
    }

    fn load(&self, i: usize) -> usize {
        self.outstanding
            .get(i)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts a request in flight on node `i` until the guard drops.
    pub fn track(&self, i: usize) -> InFlight<'_> {
        if let Some(c) = self.outstanding.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        InFlight {
            router: self,
            node: i,
        }
    }
}

/// A request in flight on a node (see [`Router::track`]).
#[derive(Debug)]
pub struct InFlight<'a> {
    router: &'a Router,
    node: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.router.outstanding.get(self.node) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::topology::{NodeState, Role};

    /// A primary at 1000 (node 0), then replicas `(lsn, lag_ms, healthy)`.
    pub(in crate::routing) fn topo(replicas: &[(u64, u64, bool)]) -> Topology {
        let mut nodes = vec![NodeState::new("p", Role::Primary)];
        nodes[0].healthy = true;
        nodes[0].lsn = Some(Lsn(1000));
        for (k, &(lsn, lag_ms, healthy)) in replicas.iter().enumerate() {
            let mut n = NodeState::new(format!("r{k}"), Role::Replica);
            n.healthy = healthy;
            n.lsn = Some(Lsn(lsn));
            n.lag = Some(Duration::from_millis(lag_ms));
            nodes.push(n);
        }
        let mut t = Topology::initial(nodes);
        t.primary_lsn = Some(Lsn(1000));
        t
    }

    const RYW: Consistency = Consistency::read_your_writes(Duration::from_millis(50));

    #[test]
    fn token_selects_only_caught_up_replicas() {
        let t = topo(&[(900, 10, true), (1000, 0, true)]);
        let r = Router::new(3, LoadBalance::RoundRobin);
        let cx = ReadContext {
            token: Some(Lsn(950)),
            ..Default::default()
        };
        for _ in 0..10 {
            assert_eq!(r.route(&t, &RYW, &cx), Route::Replica(2));
        }
    }

    #[test]
    fn no_caught_up_replica_means_check_the_most_advanced() {
        let t = topo(&[(900, 10, true), (950, 5, true), (990, 1, false)]);
        let r = Router::new(4, LoadBalance::RoundRobin);
        let cx = ReadContext {
            token: Some(Lsn(1000)),
            ..Default::default()
        };
        assert_eq!(r.route(&t, &RYW, &cx), Route::ReplicaIfCaughtUp(2));
        let cx = ReadContext {
            token: Some(Lsn(1000)),
            exclude: &[2],
            ..Default::default()
        };
        assert_eq!(r.route(&t, &RYW, &cx), Route::ReplicaIfCaughtUp(1));
    }

    #[test]
    fn no_healthy_replica_means_primary() {
        let t = topo(&[(1000, 0, false)]);
        let r = Router::new(2, LoadBalance::RoundRobin);
        for p in [RYW, Consistency::Eventual, Consistency::Primary] {
            assert_eq!(r.route(&t, &p, &ReadContext::default()), Route::Primary);
        }
    }

    #[test]
    fn round_robin_spreads_reads() {
        let t = topo(&[(1000, 0, true), (1000, 0, true), (1000, 0, true)]);
        let r = Router::new(4, LoadBalance::RoundRobin);
        let mut seen = [0; 4];
        for _ in 0..30 {
            match r.route(&t, &Consistency::Eventual, &ReadContext::default()) {
                Route::Replica(i) => seen[i] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, [0, 10, 10, 10]);
    }

    #[test]
    fn least_outstanding_avoids_busy_replica() {
        let t = topo(&[(1000, 0, true), (1000, 0, true)]);
        let r = Router::new(3, LoadBalance::LeastOutstanding);
        let _busy = r.track(1);
        for _ in 0..5 {
            assert_eq!(
                r.route(&t, &Consistency::Eventual, &ReadContext::default()),
                Route::Replica(2)
            );
        }
    }

    #[test]
    fn bounded_staleness_excludes_lagging_replica() {
        let t = topo(&[(500, 5_000, true), (990, 20, true)]);
        let r = Router::new(3, LoadBalance::RoundRobin);
        let p = Consistency::BoundedStaleness(Duration::from_millis(100));
        for _ in 0..10 {
            assert_eq!(r.route(&t, &p, &ReadContext::default()), Route::Replica(2));
        }
        let p = Consistency::BoundedStaleness(Duration::from_millis(10));
        assert_eq!(r.route(&t, &p, &ReadContext::default()), Route::Primary);
    }

    #[test]
    fn bounded_staleness_checks_a_fresh_replica_for_a_newer_token() {
        let t = topo(&[(500, 5_000, true), (990, 20, true)]);
        let r = Router::new(3, LoadBalance::RoundRobin);
        let p = Consistency::BoundedStaleness(Duration::from_millis(100));
        let cx = ReadContext {
            token: Some(Lsn(995)),
            ..Default::default()
        };
        // Replica 1 is too stale whatever its position; replica 2 is fresh
        // enough but not known to have the token: check it.
        assert_eq!(r.route(&t, &p, &cx), Route::ReplicaIfCaughtUp(2));
        let cx = ReadContext {
            token: Some(Lsn(995)),
            exclude: &[2],
            ..Default::default()
        };
        assert_eq!(r.route(&t, &p, &cx), Route::Primary);
    }

    #[test]
    fn primary_after_write_window() {
        let t = topo(&[(0, 60_000, true)]);
        let r = Router::new(2, LoadBalance::RoundRobin);
        let p = Consistency::PrimaryAfterWrite(Duration::from_secs(60));
        let cx = ReadContext {
            last_write: Some(Instant::now()),
            ..Default::default()
        };
        assert_eq!(r.route(&t, &p, &cx), Route::Primary);
        assert_eq!(r.route(&t, &p, &ReadContext::default()), Route::Replica(1));
    }

    #[test]
    fn eventual_ignores_token() {
        let t = topo(&[(10, 60_000, true)]);
        let r = Router::new(2, LoadBalance::RoundRobin);
        let cx = ReadContext {
            token: Some(Lsn(1000)),
            ..Default::default()
        };
        assert_eq!(r.route(&t, &Consistency::Eventual, &cx), Route::Replica(1));
    }
}
