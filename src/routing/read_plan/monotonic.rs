//! Monotonic reads without a position probe after every read: where the
//! session's last read ran ([`LastRead`]), the floor it leaves, and the
//! read that stays on its node until that floor is known (see
//! ARCHITECTURE.md, "Monotonic reads").

use std::time::Instant;

use super::{
    Consistency, ConsistencyToken, FallbackReason, Lsn, Position, ReadPlan, Route, Router, Run,
    Served, Step, Topology,
};
use crate::routing::ReadContext;

/// Where a session's previous read ran: what keeps its next read from
/// going back in time without reading the node's position after every
/// read.
///
/// Drivers record it when a read's result stands (at the end of its last
/// statement) and mark it [covered](LastRead::covered) when a write's
/// token is captured (a commit position read on the primary after the read
/// covers whatever the read saw). The engine then decides (see ARCHITECTURE.md, "Monotonic reads"):
///
/// * once the monitor has sampled the node with a probe sent after
///   `ended`, in the same `epoch`, that sample is a **floor**: a position
///   at or after everything the read saw. The next read may go to any node
///   known (or checked) to have reached it;
/// * before that, the read **stays** on the same node, whose replay only
///   moves forward within an epoch; if that node cannot serve it, the
///   primary does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastRead {
    /// The node that served it.
    pub node: usize,
    /// The node's [`epoch`](crate::model::topology::NodeState::epoch) when
    /// the read was routed.
    pub epoch: u64,
    /// An instant after the read's last statement took its snapshot (when
    /// the driver saw its end).
    pub ended: Instant,
    /// The node's position read on the read's connection after it
    /// ([`Run::capture`]): a floor at once.
    pub captured: Option<Lsn>,
    /// Where the next read should go once the floor is known
    /// ([`Served::next`]).
    pub next: Option<usize>,
}

impl LastRead {
    /// The read served as `served`, ended at `ended`.
    pub fn new(served: &Served, ended: Instant) -> Self {
        LastRead {
            node: served.node,
            epoch: served.epoch,
            ended,
            captured: None,
            next: served.next,
        }
    }

    /// A write's token, read after this read, covers it: no floor, but the
    /// next read prefers the same node (its connections have the
    /// session's statements prepared, and they are revalidated there as
    /// on a direct connection).
    pub fn covered(self) -> Self {
        LastRead {
            captured: Some(Lsn(0)),
            next: Some(self.node),
            ..self
        }
    }

    /// With the position the driver read after the statement on the same
    /// connection (`None`: none was read).
    pub fn with_floor(self, captured: Option<Lsn>) -> Self {
        LastRead { captured, ..self }
    }

    /// The floor for the session's next read, when `topo` has one: the
    /// node's position from a monitor probe sent after the read ended, in
    /// the read's epoch (replay only moves forward within one, so that
    /// position is at or after the read's snapshot).
    pub fn floor(&self, topo: &Topology) -> Option<Lsn> {
        if self.captured.is_some() {
            return self.captured;
        }
        let n = topo.nodes.get(self.node)?;
        if n.epoch != self.epoch || n.sampled_at.is_none_or(|s| s <= self.ended) {
            return None;
        }
        n.lsn
    }

    /// [`LastRead::floor`] as a token (labelled with the node's timeline
    /// when the monitor knows it, else the cluster's).
    pub fn floor_token(&self, topo: &Topology) -> Option<ConsistencyToken> {
        let lsn = self.floor(topo)?;
        Position {
            in_recovery: topo.primary != Some(self.node),
            lsn: Some(lsn),
            timeline: topo.nodes[self.node].timeline,
        }
        .token(topo)
    }

    /// Whether a position read on the node now still bounds what the read
    /// saw: the node is in the read's epoch (replay only moves forward
    /// within one).
    pub fn same_epoch(&self, topo: &Topology) -> bool {
        topo.nodes
            .get(self.node)
            .is_some_and(|n| n.epoch == self.epoch)
    }
}

impl ReadPlan {
    /// Routes a read that stays on `node`, where the session's last read
    /// ran and whose floor is not known yet: there when it can serve the
    /// read in the same epoch (checked or waited for when the token is
    /// ahead of it), else on the primary, which has everything any replica
    /// has replayed.
    pub(super) fn stay_on(
        &mut self,
        topo: &Topology,
        router: &Router,
        node: usize,
        now: Instant,
    ) -> Step {
        let same_epoch = self
            .req
            .last_read
            .zip(topo.nodes.get(node))
            .is_some_and(|(last, n)| last.epoch == n.epoch);
        let Some(n) = topo.nodes.get(node).filter(|_| same_epoch) else {
            return self.leave_stay(topo);
        };
        let usable = !self.exclude.contains(&node);
        if usable && topo.primary == Some(node) && n.healthy {
            return self.on_primary(topo);
        }
        if self.usable_replica(topo, node) {
            // Would the router rather use a replica that is further ahead?
            // Then read the position here after the statement, so that the
            // next read can move there.
            let cx = ReadContext {
                token: self.need,
                last_write: self.req.last_write,
                exclude: &self.exclude,
            };
            self.next = match router.route(topo, &self.req.policy, &cx) {
                Route::Replica(m) | Route::ReplicaIfCaughtUp(m)
                    if m != node && n.lsn.is_some() && topo.nodes[m].lsn > n.lsn =>
                {
                    Some(m)
                }
                _ => None,
            };
            let run = Run {
                node,
                primary: false,
                check: None,
                verify: None,
                retryable: true,
                capture: self.next.is_some(),
            };
            return match self.need {
                Some(need) if n.lsn.is_none_or(|l| l < need) => {
                    if self.checked {
                        self.wait(topo, node, need, now)
                    } else {
                        self.checked = true;
                        self.run(
                            topo,
                            Run {
                                check: Some(need),
                                ..run
                            },
                        )
                    }
                }
                _ => self.run(topo, run),
            };
        }
        self.leave_stay(topo)
    }

    /// The read on `m`, where the session's last read wanted to go next,
    /// when it can serve it: known to have what the read needs, or as far
    /// ahead as any usable replica (then checked in the round trip).
    pub(super) fn preferred(&mut self, topo: &Topology, m: usize) -> Option<Step> {
        if !self.usable_replica(topo, m) {
            return None;
        }
        let lsn = topo.nodes[m].lsn;
        let run = Run {
            node: m,
            primary: false,
            check: None,
            verify: None,
            retryable: true,
            capture: false,
        };
        match self.need {
            Some(need) if lsn.is_none_or(|l| l < need) => {
                let best = topo
                    .serving_replicas()
                    .filter(|&i| self.usable_replica(topo, i))
                    .filter_map(|i| topo.nodes[i].lsn)
                    .max();
                if self.checked || lsn.is_none() || lsn < best {
                    return None;
                }
                self.checked = true;
                Some(self.run(
                    topo,
                    Run {
                        check: Some(need),
                        ..run
                    },
                ))
            }
            _ => Some(self.run(topo, run)),
        }
    }

    /// Whether replica `node` may serve this read: healthy, not failed for
    /// it, and fresh enough for bounded staleness.
    pub(super) fn usable_replica(&self, topo: &Topology, node: usize) -> bool {
        topo.nodes.get(node).is_some_and(|n| {
            n.is_serving_replica()
                && !self.exclude.contains(&node)
                && match self.req.policy {
                    Consistency::BoundedStaleness(max_lag) => n.lag.is_some_and(|l| l <= max_lag),
                    _ => true,
                }
        })
    }

    /// The node of the last read cannot serve this one and no floor is
    /// known: the primary.
    fn leave_stay(&mut self, topo: &Topology) -> Step {
        if self.fallback.is_none() {
            self.fallback = Some(FallbackReason::NoReplica);
        }
        self.on_primary(topo)
    }
}
