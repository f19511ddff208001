//! One monitor round: the next [`Topology`] from the previous one and the
//! probe results (roles, primary election, positions, lag, health), and the
//! gauges published from it.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::MonitorConfig;
use super::history::LsnHistory;
use super::node_probe::{NodeMeta, Probe};
use crate::metrics::{
    NODE_EJECTIONS_TOTAL, NODE_HEALTHY, PRIMARY_CHANGES_TOTAL, REPLICA_LAG_BYTES,
    REPLICA_LAG_SECONDS,
};
use crate::model::token::ClusterId;
use crate::model::topology::{Role, Topology};

/// The next snapshot from `prev` and this round's probe results: `None` for
/// a node whose probe is still running (it keeps its previous state, and
/// is neither re-admitted nor used as a fresh primary position).
pub(super) fn build_snapshot(
    prev: &Topology,
    metas: &[NodeMeta],
    results: Vec<Option<Result<Probe, String>>>,
    history: &mut LsnHistory,
    config: &MonitorConfig,
    now: Instant,
) -> Topology {
    let mut next = prev.clone();
    next.generation += 1;
    next.taken_at = now;

    // Roles and positions.
    for (i, r) in results.iter().enumerate() {
        let node = &mut next.nodes[i];
        let Some(r) = r else { continue };
        match r {
            Ok(p) => {
                node.role = if p.in_recovery {
                    Role::Replica
                } else {
                    Role::Primary
                };
                node.lsn = p.lsn;
                node.sampled_at = Some(p.sent);
                if p.timeline.is_some() {
                    node.timeline = p.timeline;
                }
                node.last_error = None;
            }
            Err(e) => {
                if node.healthy || node.last_error.as_deref() != Some(e) {
                    warn!(node = %node.name, error = %e, "probe failed");
                }
                if node.healthy {
                    metrics::counter!(NODE_EJECTIONS_TOTAL).increment(1);
                }
                node.healthy = false;
                node.role = Role::Unknown;
                node.last_error = Some(e.clone());
                node.epoch += 1;
            }
        }
    }

    // Which node is the primary: keep the current one while it answers as a
    // primary and no other node answers as one on a later timeline;
    // otherwise follow the node that now does (a promotion), the highest
    // timeline first.
    let answers_as_primary = |i: usize| match &results[i] {
        Some(r) => r.as_ref().is_ok_and(|p| !p.in_recovery),
        None => prev.nodes[i].role == Role::Primary && prev.nodes[i].healthy,
    };
    let timeline = |i: usize| next.nodes[i].timeline.unwrap_or(0);
    let best = (0..results.len())
        .filter(|&i| answers_as_primary(i))
        .max_by_key(|&i| (timeline(i), std::cmp::Reverse(i)));
    let keep_current = prev
        .primary
        .is_some_and(|p| answers_as_primary(p) && best.is_none_or(|b| timeline(b) <= timeline(p)));
    if !keep_current {
        if let Some(new) = best.filter(|&b| Some(b) != prev.primary) {
            info!(from = ?prev.primary.map(|p| &prev.nodes[p].name), to = %next.nodes[new].name, "primary changed");
            metrics::counter!(PRIMARY_CHANGES_TOTAL).increment(1);
        }
        // Without any node answering as primary, keep pointing at the old
        // one while it is unreachable: writes then fail fast with a
        // connection error. One that answers as a standby is no primary.
        let demoted = prev
            .primary
            .is_some_and(|p| matches!(&results[p], Some(Ok(r)) if r.in_recovery));
        if demoted && best.is_none() {
            warn!(node = ?prev.primary.map(|p| &prev.nodes[p].name), "the primary is in recovery and no node answers as primary");
        }
        next.primary = best.or(if demoted { None } else { prev.primary });
    }
    // Any other node answering as a primary is not ours to route to.
    for (i, node) in next.nodes.iter_mut().enumerate() {
        if node.role == Role::Primary && Some(i) != next.primary {
            node.role = Role::Unknown;
            node.healthy = false;
            node.last_error = Some("also answers as a primary (split brain?)".into());
        }
    }

    // Primary position and identity (kept as they were while the primary's
    // probe is still running).
    let primary_pending = next.primary.is_some_and(|p| results[p].is_none());
    if !primary_pending {
        next.primary_lsn = None;
    }
    if let Some(p) = next.primary {
        if matches!(results[p], Some(Ok(_))) {
            next.primary_lsn = next.nodes[p].lsn;
            if let Some(lsn) = next.primary_lsn {
                history.push(now, lsn);
            }
            let sysid = metas[p].system_identifier;
            let tli = next.nodes[p].timeline;
            if let (Some(system_identifier), Some(timeline)) = (sysid, tli) {
                next.cluster = Some(ClusterId {
                    system_identifier,
                    timeline,
                });
            }
            if let Some(seg) = metas[p].wal_segment_size {
                next.wal_segment_size = seg;
            }
            next.timeline_history = match (&metas[p].history, tli) {
                (Some((read_for, entries)), Some(t)) if *read_for == t => entries.clone(),
                _ => Vec::new(),
            };
        }
    }

    // Lag and health. A node whose probe is still running gets its lag
    // recomputed from its last known position, but its health unchanged.
    for (i, r) in results.iter().enumerate() {
        if matches!(r, Some(Err(_))) {
            continue;
        }
        let pending = r.is_none();
        let was_healthy = prev.nodes[i].healthy;
        let node = &mut next.nodes[i];
        if Some(i) == next.primary {
            node.lag_bytes = Some(0);
            node.lag = Some(Duration::ZERO);
            if !pending {
                node.healthy = true;
            }
            continue;
        }
        if node.role != Role::Replica {
            // A second primary (ejected above): no lag, and not healthy.
            node.lag_bytes = None;
            node.lag = None;
            continue;
        }
        match (node.lsn, next.primary_lsn) {
            (Some(replayed), Some(primary)) => {
                node.lag_bytes = Some(primary.bytes_after(replayed));
                node.lag = history.lag(replayed, now);
            }
            _ => {
                node.lag_bytes = None;
                node.lag = None;
            }
        }
        if pending {
            continue;
        }
        // Re-admission: after an ejection a replica must have caught up
        // (or the primary be unknown, so nothing to compare with).
        node.healthy = was_healthy
            || prev.generation == 0
            || next.primary_lsn.is_none()
            || node.lag.is_some_and(|l| l <= config.readmit_max_lag);
        if node.healthy && !was_healthy && prev.generation > 0 {
            info!(node = %node.name, "node re-admitted");
        }
    }
    debug!(generation = next.generation, primary = ?next.primary, "topology updated");
    next
}

pub(super) fn publish_metrics(topo: &Topology) {
    for n in &topo.nodes {
        let name = n.name.clone();
        metrics::gauge!(NODE_HEALTHY, "node" => name.clone()).set(if n.healthy {
            1.0
        } else {
            0.0
        });
        if let Some(b) = n.lag_bytes {
            metrics::gauge!(REPLICA_LAG_BYTES, "node" => name.clone()).set(b as f64);
        }
        if let Some(l) = n.lag {
            metrics::gauge!(REPLICA_LAG_SECONDS, "node" => name).set(l.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::model::lsn::Lsn;
    use crate::model::topology::NodeState;
    use crate::monitor::MonitorTarget;
    use crate::monitor::node_probe::NodeProbe;

    fn probes(n: usize) -> Vec<NodeProbe> {
        (0..n)
            .map(|i| NodeProbe {
                target: MonitorTarget {
                    name: format!("n{i}"),
                    role: if i == 0 { Role::Primary } else { Role::Replica },
                    config: tokio_postgres::Config::new(),
                },
                client: None,
                meta: NodeMeta {
                    system_identifier: Some(42),
                    ..NodeMeta::default()
                },
            })
            .collect()
    }

    fn primary(lsn: u64, timeline: u32) -> Result<Probe, String> {
        Ok(Probe {
            in_recovery: false,
            lsn: Some(Lsn(lsn)),
            timeline: Some(timeline),
            sent: Instant::now(),
        })
    }

    fn replica(lsn: u64) -> Result<Probe, String> {
        Ok(Probe {
            in_recovery: true,
            lsn: Some(Lsn(lsn)),
            timeline: None,
            sent: Instant::now(),
        })
    }

    fn down() -> Result<Probe, String> {
        Err("connection refused".into())
    }

    /// Runs one round on top of `prev` and returns the new snapshot.
    fn round(
        prev: &Topology,
        probes: &[NodeProbe],
        results: Vec<Result<Probe, String>>,
    ) -> Topology {
        round_pending(prev, probes, results.into_iter().map(Some).collect())
    }

    /// Like [`round`], with `None` for a probe still running.
    fn round_pending(
        prev: &Topology,
        probes: &[NodeProbe],
        results: Vec<Option<Result<Probe, String>>>,
    ) -> Topology {
        let mut h = LsnHistory {
            samples: VecDeque::new(),
        };
        let metas: Vec<NodeMeta> = probes.iter().map(|p| p.meta.clone()).collect();
        build_snapshot(
            prev,
            &metas,
            results,
            &mut h,
            &MonitorConfig::default(),
            Instant::now(),
        )
    }

    #[test]
    fn a_failed_probe_starts_a_new_epoch_and_positions_keep_their_sample_time() {
        let (probes, t1) = three_nodes();
        let before = Instant::now();
        let t2 = round(&t1, &probes, vec![primary(300, 1), replica(300), down()]);
        assert_eq!(t2.nodes[2].epoch, t1.nodes[2].epoch + 1);
        assert_eq!(t2.nodes[1].epoch, t1.nodes[1].epoch);
        assert!(t2.nodes[1].sampled_at.is_some_and(|s| s >= before));
        // A probe still running keeps the last sample and its time.
        let t3 = round_pending(&t2, &probes, vec![Some(primary(400, 1)), None, None]);
        assert_eq!(t3.nodes[1].sampled_at, t2.nodes[1].sampled_at);
        assert_eq!(t3.nodes[2].epoch, t2.nodes[2].epoch);
    }

    #[test]
    fn a_node_whose_probe_is_still_running_keeps_its_state() {
        let (probes, t1) = three_nodes();
        // Replica 2 hangs: the others are updated, it keeps its position
        // (its lag grows with the primary) and stays healthy until its
        // probe fails.
        let t2 = round_pending(
            &t1,
            &probes,
            vec![Some(primary(300, 1)), Some(replica(300)), None],
        );
        assert_eq!(t2.primary_lsn, Some(Lsn(300)));
        assert_eq!(t2.nodes[1].lsn, Some(Lsn(300)));
        assert_eq!(t2.nodes[2].lsn, Some(Lsn(100)));
        assert_eq!(t2.nodes[2].lag_bytes, Some(200));
        assert!(t2.nodes[2].healthy);
        let t3 = round(&t2, &probes, vec![primary(300, 1), replica(300), down()]);
        assert!(!t3.nodes[2].healthy);
        // Still hanging after the failure: not re-admitted on old data.
        let t4 = round_pending(
            &t3,
            &probes,
            vec![Some(primary(300, 1)), Some(replica(300)), None],
        );
        assert!(!t4.nodes[2].healthy);
        // The primary hangs: it stays the primary with its last position.
        let t5 = round_pending(&t4, &probes, vec![None, Some(replica(300)), None]);
        assert_eq!(t5.primary, Some(0));
        assert_eq!(t5.primary_lsn, Some(Lsn(300)));
        assert!(t5.nodes[0].healthy);
        assert_eq!(t5.cluster, t4.cluster);
    }

    fn three_nodes() -> (Vec<NodeProbe>, Topology) {
        let probes = probes(3);
        let t0 = Topology::initial(
            probes
                .iter()
                .map(|p| NodeState::new(p.target.name.clone(), p.target.role))
                .collect(),
        );
        let t1 = round(
            &t0,
            &probes,
            vec![primary(100, 1), replica(100), replica(100)],
        );
        assert_eq!(t1.primary, Some(0));
        assert!(t1.nodes.iter().all(|n| n.healthy));
        (probes, t1)
    }

    #[test]
    fn promoted_replica_becomes_the_primary() {
        let (mut probes, t1) = three_nodes();
        // The primary is down, nobody promoted yet: keep pointing at it.
        let t2 = round(&t1, &probes, vec![down(), replica(100), replica(100)]);
        assert_eq!(t2.primary, Some(0));
        assert!(!t2.nodes[0].healthy);
        assert!(t2.nodes[1].healthy && t2.nodes[2].healthy);
        // Node 1 is promoted (timeline 2).
        probes[1].meta.history = Some((2, vec![(1, Lsn(100))]));
        let t3 = round(&t2, &probes, vec![down(), primary(200, 2), replica(150)]);
        assert_eq!(t3.primary, Some(1));
        assert_eq!(t3.nodes[1].role, Role::Primary);
        assert!(t3.nodes[1].healthy);
        assert_eq!(t3.primary_lsn, Some(Lsn(200)));
        assert_eq!(t3.cluster.map(|c| c.timeline), Some(2));
        assert_eq!(t3.timeline_history, vec![(1, Lsn(100))]);
        assert_eq!(t3.nodes[2].lag_bytes, Some(50));
        // The old primary comes back as a primary on the old timeline: it
        // is not routed to.
        let t4 = round(
            &t3,
            &probes,
            vec![primary(300, 1), primary(210, 2), replica(210)],
        );
        assert_eq!(t4.primary, Some(1));
        assert!(!t4.nodes[0].healthy);
        assert_eq!(t4.nodes[0].role, Role::Unknown);
    }

    #[test]
    fn a_later_timeline_wins_even_while_the_old_primary_answers() {
        let (probes, t1) = three_nodes();
        let t2 = round(
            &t1,
            &probes,
            vec![primary(100, 1), primary(120, 2), replica(100)],
        );
        assert_eq!(t2.primary, Some(1));
        assert!(!t2.nodes[0].healthy);
        assert!(
            t2.nodes[0]
                .last_error
                .as_deref()
                .unwrap()
                .contains("split brain")
        );
    }

    #[test]
    fn a_primary_that_answers_as_a_standby_is_dropped() {
        let (probes, t1) = three_nodes();
        let t2 = round(&t1, &probes, vec![replica(100), replica(100), replica(100)]);
        assert_eq!(t2.primary, None);
        assert_eq!(t2.nodes[0].role, Role::Replica);
        assert!(t2.nodes[1].healthy);
    }
}
