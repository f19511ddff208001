//! The background task that watches replication lag and node health.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::connect::Connector;
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
    /// re-admitted by a later successful probe.
    pub fn report_failure(&self, index: usize, error: &str) {
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

const IDENTITY_SQL: &str = "SELECT (SELECT system_identifier FROM pg_control_system())::text, \
     (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')";

struct NodeProbe {
    target: MonitorTarget,
    client: Option<tokio_postgres::Client>,
    system_identifier: Option<u64>,
    wal_segment_size: Option<u64>,
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
                .map_err(|e| e.to_string())?;
            let row = client
                .query_one(IDENTITY_SQL, &[])
                .await
                .map_err(|e| e.to_string())?;
            self.system_identifier = row
                .get::<_, Option<String>>(0)
                .and_then(|s| s.parse().ok());
            self.wal_segment_size = row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok());
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        let row = client
            .query_one(PROBE_SQL, &[])
            .await
            .map_err(|e| e.to_string())?;
        let in_recovery: bool = row.get(0);
        let lsn = row
            .get::<_, Option<&str>>(1)
            .and_then(|s| s.parse::<Lsn>().ok());
        let timeline = row.get::<_, Option<i32>>(2).map(|t| t as u32);
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
        let results = futures_util::future::join_all(
            probes
                .iter_mut()
                .map(|p| p.probe(&connector, config.probe_timeout)),
        )
        .await;
        let now = Instant::now();
        let prev = shared.tx.borrow().clone();
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
    // primary; otherwise follow the node that now does (a promotion), the
    // highest timeline first.
    let answers_as_primary = |i: usize| results[i].as_ref().is_ok_and(|p| !p.in_recovery);
    let current_ok = prev.primary.is_some_and(answers_as_primary);
    if !current_ok {
        let candidate = (0..results.len())
            .filter(|&i| answers_as_primary(i))
            .max_by_key(|&i| (next.nodes[i].timeline.unwrap_or(0), std::cmp::Reverse(i)));
        if let Some(new) = candidate.filter(|&c| Some(c) != prev.primary) {
            info!(from = ?prev.primary.map(|p| &prev.nodes[p].name), to = %next.nodes[new].name, "primary changed");
            metrics::counter!("lagrouter_primary_changes_total").increment(1);
        }
        // Without any node answering as primary, keep pointing at the old
        // one: writes then fail fast with a connection error.
        next.primary = candidate.or(prev.primary);
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
        metrics::gauge!("lagrouter_node_healthy", "node" => name.clone())
            .set(if n.healthy { 1.0 } else { 0.0 });
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
