//! The background task that watches replication lag and node health.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::connect::Connector;
use crate::error::describe;
use crate::lsn::Lsn;
use crate::token::ClusterId;
use crate::topology::{NodeState, Role, Topology};

/// One node for the monitor to watch.
#[derive(Clone)]
pub struct MonitorTarget {
    /// The node's name (used in metrics and logs).
    pub name: String,
    /// The role the node is configured with.
    pub role: Role,
    /// How to reach it.
    pub config: tokio_postgres::Config,
}

/// Settings of the [`LagMonitor`].
#[derive(Clone, Debug)]
pub struct MonitorConfig {
    /// Time between two probes of every node (default 100 ms).
    pub interval: Duration,
    /// Bound on one probe, connection included (default 2 s).
    pub probe_timeout: Duration,
    /// A replica ejected after a failure is re-admitted once it answers and
    /// its lag is at most this (default 1 s).
    pub readmit_max_lag: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            interval: Duration::from_millis(100),
            probe_timeout: Duration::from_secs(2),
            readmit_max_lag: Duration::from_secs(1),
        }
    }
}

/// Watches every node's WAL position, role and health in the background,
/// and publishes [`Topology`] snapshots that routing reads without blocking.
///
/// Replica lag in time is computed from a history of the primary's WAL
/// positions: a replica that has replayed up to `L` misses at most the
/// writes made since the last moment the primary was at or below `L`. This
/// stays correct when the primary is idle (no false lag) and does not depend
/// on clocks agreeing between hosts.
///
/// The task stops when the `LagMonitor` is dropped.
pub struct LagMonitor {
    shared: Arc<Shared>,
    rx: watch::Receiver<Arc<Topology>>,
    task: JoinHandle<()>,
}

struct Shared {
    tx: watch::Sender<Arc<Topology>>,
    wake: Notify,
    /// The last query failure reported per node (see
    /// [`LagMonitor::report_failure`]): a probe round that started before
    /// it must not re-admit the node.
    failures: std::sync::Mutex<Vec<Option<(Instant, String)>>>,
}

impl LagMonitor {
    /// Starts watching `targets`. The first snapshot holds the configured
    /// roles with every node unhealthy until probed; use
    /// [`LagMonitor::first_probe`] to wait for the first real one.
    pub fn spawn(targets: Vec<MonitorTarget>, config: MonitorConfig, connector: Connector) -> Self {
        let initial = Topology::initial(
            targets
                .iter()
                .map(|t| NodeState::new(t.name.clone(), t.role))
                .collect(),
        );
        let (tx, rx) = watch::channel(Arc::new(initial));
        let shared = Arc::new(Shared {
            tx,
            wake: Notify::new(),
            failures: std::sync::Mutex::new(vec![None; targets.len()]),
        });
        let task = tokio::spawn(run(targets, config, connector, shared.clone()));
        LagMonitor { shared, rx, task }
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Topology> {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Topology>> {
        self.rx.clone()
    }

    /// Asks for a probe now rather than at the next interval.
    pub fn refresh(&self) {
        self.shared.wake.notify_one();
    }

    /// Waits until the first probe round has been published, or `timeout`.
    pub async fn first_probe(&self, timeout: Duration) {
        let mut rx = self.rx.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|t| t.generation > 0)).await;
    }

    /// Waits until `pred` holds for a published snapshot, up to `timeout`.
    /// Returns the snapshot that satisfied it.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Topology) -> bool,
    ) -> Option<Arc<Topology>> {
        let mut rx = self.rx.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|t| pred(t))).await {
            Ok(Ok(t)) => Some(t.clone()),
            _ => None,
        }
    }

    /// Ejects node `index` at once after a query failed on it; it is
    /// re-admitted by a later successful probe (one that started after the
    /// failure).
    pub fn report_failure(&self, index: usize, error: &str) {
        if let Some(slot) = self
            .shared
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            *slot = Some((Instant::now(), error.to_string()));
        }
        let mut ejected = false;
        self.shared.tx.send_if_modified(|topo| {
            let Some(node) = topo.nodes.get(index) else {
                return false;
            };
            if !node.healthy {
                return false;
            }
            let mut next = (**topo).clone();
            next.nodes[index].healthy = false;
            next.nodes[index].last_error = Some(error.to_string());
            next.generation += 1;
            *topo = Arc::new(next);
            ejected = true;
            true
        });
        if ejected {
            warn!(node = index, error, "node ejected after a failed query");
            metrics::counter!("lagrouter_node_ejections_total").increment(1);
            self.refresh();
        }
    }
}

impl Drop for LagMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one probe found.
struct Probe {
    in_recovery: bool,
    lsn: Option<Lsn>,
    timeline: Option<u32>,
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text, \
     CASE WHEN pg_is_in_recovery() THEN NULL \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END";

/// The timeline history file of timeline `$1` (needs superuser,
/// `pg_read_server_files` or `EXECUTE` on `pg_read_file(text)`).
const HISTORY_SQL: &str =
    "SELECT pg_read_file('pg_wal/' || upper(lpad(to_hex($1::int), 8, '0')) || '.history')";

const IDENTITY_SQL: &str = "SELECT (SELECT system_identifier FROM pg_control_system())::text, \
     (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')";

struct NodeProbe {
    target: MonitorTarget,
    client: Option<tokio_postgres::Client>,
    system_identifier: Option<u64>,
    wal_segment_size: Option<u64>,
    /// The timeline history read from this node while it was a primary:
    /// `(its timeline, entries)`; the entries are empty when the file could
    /// not be read. Read once per timeline and connection.
    history: Option<(u32, Vec<(u32, Lsn)>)>,
}

/// Parses a timeline history file: one `parent_tli<TAB>switch_lsn<TAB>reason`
/// line per ancestor timeline. Unparsable lines are skipped.
fn parse_timeline_history(text: &str) -> Vec<(u32, Lsn)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut fields = line.split_whitespace();
            let tli = fields.next()?.parse().ok()?;
            let lsn = fields.next()?.parse().ok()?;
            Some((tli, lsn))
        })
        .collect()
}

impl NodeProbe {
    async fn probe(&mut self, connector: &Connector, timeout: Duration) -> Result<Probe, String> {
        match tokio::time::timeout(timeout, self.probe_inner(connector)).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => {
                self.client = None;
                Err(e)
            }
            Err(_) => {
                self.client = None;
                Err(format!("probe timed out after {timeout:?}"))
            }
        }
    }

    async fn probe_inner(&mut self, connector: &Connector) -> Result<Probe, String> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = connector
                .connect(&self.target.config)
                .await
                .map_err(|e| describe(&e))?;
            let row = client
                .query_one(IDENTITY_SQL, &[])
                .await
                .map_err(|e| describe(&e))?;
            self.system_identifier = row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok());
            self.wal_segment_size = row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok());
            self.history = None;
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        let row = client
            .query_one(PROBE_SQL, &[])
            .await
            .map_err(|e| describe(&e))?;
        let in_recovery: bool = row.get(0);
        let lsn = row
            .get::<_, Option<&str>>(1)
            .and_then(|s| s.parse::<Lsn>().ok());
        let timeline = row.get::<_, Option<i32>>(2).map(|t| t as u32);
        if let Some(tli) = timeline.filter(|&t| t > 1 && !in_recovery) {
            if self.history.as_ref().is_none_or(|(t, _)| *t != tli) {
                let entries = match client.query_one(HISTORY_SQL, &[&(tli as i32)]).await {
                    Ok(row) => {
                        let entries = parse_timeline_history(row.get::<_, &str>(0));
                        info!(node = %self.target.name, timeline = tli, ?entries, "timeline history read");
                        entries
                    }
                    Err(e) if e.is_closed() => return Err(describe(&e)),
                    Err(e) => {
                        warn!(
                            node = %self.target.name,
                            timeline = tli,
                            error = %describe(&e),
                            "cannot read the timeline history; writes lost in a failover are \
                             detected only while ahead of the primary's position"
                        );
                        Vec::new()
                    }
                };
                self.history = Some((tli, entries));
            }
        }
        Ok(Probe {
            in_recovery,
            lsn,
            timeline,
        })
    }
}

/// History of the primary's WAL positions, for lag in time.
struct LsnHistory {
    samples: VecDeque<(Instant, Lsn)>,
}

const HISTORY_LEN: usize = 4096;

impl LsnHistory {
    fn push(&mut self, at: Instant, lsn: Lsn) {
        if let Some(&(_, last)) = self.samples.back() {
            if lsn < last {
                // A new primary with a lower position (failover): start over.
                self.samples.clear();
            }
        }
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back((at, lsn));
    }

    /// Upper bound on the staleness of a node that replayed up to `replayed`.
    fn lag(&self, replayed: Lsn, now: Instant) -> Option<Duration> {
        let &(_, newest) = self.samples.back()?;
        if replayed >= newest {
            return Some(Duration::ZERO);
        }
        // The last time the primary was still at or below `replayed`: every
        // write the replica misses was made after it.
        match self.samples.iter().rev().find(|(_, l)| *l <= replayed) {
            Some(&(t, _)) => Some(now.saturating_duration_since(t)),
            None => self
                .samples
                .front()
                .map(|&(t, _)| now.saturating_duration_since(t)),
        }
    }
}

async fn run(
    targets: Vec<MonitorTarget>,
    config: MonitorConfig,
    connector: Connector,
    shared: Arc<Shared>,
) {
    let mut probes: Vec<NodeProbe> = targets
        .into_iter()
        .map(|target| NodeProbe {
            target,
            client: None,
            system_identifier: None,
            wal_segment_size: None,
            history: None,
        })
        .collect();
    let mut history = LsnHistory {
        samples: VecDeque::new(),
    };
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.wake.notified() => {}
        }
        let round_start = Instant::now();
        let mut results = futures_util::future::join_all(
            probes
                .iter_mut()
                .map(|p| p.probe(&connector, config.probe_timeout)),
        )
        .await;
        let now = Instant::now();
        let prev = shared.tx.borrow().clone();
        // A query failed on a replica while this round was under way: the
        // probe may have run just before the failure, so it does not count.
        {
            let failures = shared.failures.lock().unwrap_or_else(|p| p.into_inner());
            for (i, f) in failures.iter().enumerate() {
                if let Some((at, error)) = f {
                    if *at >= round_start && prev.primary != Some(i) && results[i].is_ok() {
                        results[i] = Err(error.clone());
                    }
                }
            }
        }
        let next = build_snapshot(&prev, &probes, results, &mut history, &config, now);
        publish_metrics(&next);
        shared.tx.send_replace(Arc::new(next));
    }
}

fn build_snapshot(
    prev: &Topology,
    probes: &[NodeProbe],
    results: Vec<Result<Probe, String>>,
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
        match r {
            Ok(p) => {
                node.role = if p.in_recovery {
                    Role::Replica
                } else {
                    Role::Primary
                };
                node.lsn = p.lsn;
                if p.timeline.is_some() {
                    node.timeline = p.timeline;
                }
                node.last_error = None;
            }
            Err(e) => {
                if node.healthy || node.last_error.as_deref() != Some(e) {
                    warn!(node = %node.name, error = %e, "probe failed");
                }
                node.healthy = false;
                node.role = Role::Unknown;
                node.last_error = Some(e.clone());
            }
        }
    }

    // Which node is the primary: keep the current one while it answers as a
    // primary and no other node answers as one on a later timeline;
    // otherwise follow the node that now does (a promotion), the highest
    // timeline first.
    let answers_as_primary = |i: usize| results[i].as_ref().is_ok_and(|p| !p.in_recovery);
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
            metrics::counter!("lagrouter_primary_changes_total").increment(1);
        }
        // Without any node answering as primary, keep pointing at the old
        // one while it is unreachable: writes then fail fast with a
        // connection error. One that answers as a standby is no primary.
        let demoted = prev
            .primary
            .is_some_and(|p| results[p].as_ref().is_ok_and(|r| r.in_recovery));
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

    // Primary position and identity.
    next.primary_lsn = None;
    if let Some(p) = next.primary {
        if results[p].is_ok() {
            next.primary_lsn = next.nodes[p].lsn;
            if let Some(lsn) = next.primary_lsn {
                history.push(now, lsn);
            }
            let sysid = probes[p].system_identifier;
            let tli = next.nodes[p].timeline;
            if let (Some(system_identifier), Some(timeline)) = (sysid, tli) {
                next.cluster = Some(ClusterId {
                    system_identifier,
                    timeline,
                });
            }
            if let Some(seg) = probes[p].wal_segment_size {
                next.wal_segment_size = seg;
            }
            next.timeline_history = match (&probes[p].history, tli) {
                (Some((read_for, entries)), Some(t)) if *read_for == t => entries.clone(),
                _ => Vec::new(),
            };
        }
    }

    // Lag and health.
    for (i, r) in results.iter().enumerate() {
        if r.is_err() {
            continue;
        }
        let was_healthy = prev.nodes[i].healthy;
        let node = &mut next.nodes[i];
        if Some(i) == next.primary {
            node.lag_bytes = Some(0);
            node.lag = Some(Duration::ZERO);
            node.healthy = true;
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

fn publish_metrics(topo: &Topology) {
    for n in &topo.nodes {
        let name = n.name.clone();
        metrics::gauge!("lagrouter_node_healthy", "node" => name.clone()).set(if n.healthy {
            1.0
        } else {
            0.0
        });
        if let Some(b) = n.lag_bytes {
            metrics::gauge!("lagrouter_replica_lag_bytes", "node" => name.clone()).set(b as f64);
        }
        if let Some(l) = n.lag {
            metrics::gauge!("lagrouter_replica_lag_seconds", "node" => name).set(l.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_zero_when_caught_up_and_bounded_otherwise() {
        let t0 = Instant::now();
        let mut h = LsnHistory {
            samples: VecDeque::new(),
        };
        h.push(t0, Lsn(100));
        h.push(t0 + Duration::from_millis(100), Lsn(100));
        h.push(t0 + Duration::from_millis(200), Lsn(300));
        let now = t0 + Duration::from_millis(250);
        assert_eq!(h.lag(Lsn(300), now), Some(Duration::ZERO));
        assert_eq!(h.lag(Lsn(400), now), Some(Duration::ZERO));
        // Replayed 100: the primary was last at 100 at t0+100ms.
        assert_eq!(h.lag(Lsn(100), now), Some(Duration::from_millis(150)));
        // Older than all history: bounded by the oldest sample.
        assert_eq!(h.lag(Lsn(50), now), Some(Duration::from_millis(250)));
    }

    fn probes(n: usize) -> Vec<NodeProbe> {
        (0..n)
            .map(|i| NodeProbe {
                target: MonitorTarget {
                    name: format!("n{i}"),
                    role: if i == 0 { Role::Primary } else { Role::Replica },
                    config: tokio_postgres::Config::new(),
                },
                client: None,
                system_identifier: Some(42),
                wal_segment_size: None,
                history: None,
            })
            .collect()
    }

    fn primary(lsn: u64, timeline: u32) -> Result<Probe, String> {
        Ok(Probe {
            in_recovery: false,
            lsn: Some(Lsn(lsn)),
            timeline: Some(timeline),
        })
    }

    fn replica(lsn: u64) -> Result<Probe, String> {
        Ok(Probe {
            in_recovery: true,
            lsn: Some(Lsn(lsn)),
            timeline: None,
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
        let mut h = LsnHistory {
            samples: VecDeque::new(),
        };
        build_snapshot(
            prev,
            probes,
            results,
            &mut h,
            &MonitorConfig::default(),
            Instant::now(),
        )
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
        probes[1].history = Some((2, vec![(1, Lsn(100))]));
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

    #[test]
    fn timeline_history_is_parsed() {
        let text = "1\t0/3000060\tno recovery target specified\n\n\
                    2\t1/A0000D8\tbefore 2024-01-01 00:00:00+00\n";
        assert_eq!(
            parse_timeline_history(text),
            vec![(1, Lsn(0x300_0060)), (2, Lsn(0x1_0A00_00D8))]
        );
        assert!(parse_timeline_history("garbage\n").is_empty());
    }

    #[test]
    fn history_restarts_when_position_goes_back() {
        let t0 = Instant::now();
        let mut h = LsnHistory {
            samples: VecDeque::new(),
        };
        h.push(t0, Lsn(500));
        h.push(t0, Lsn(10));
        assert_eq!(h.samples.len(), 1);
    }
}
