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

/// What the snapshot needs of a node besides its probe result: identity
/// and timeline history, as of the node's latest probe.
#[derive(Clone, Default)]
struct NodeMeta {
    system_identifier: Option<u64>,
    wal_segment_size: Option<u64>,
    /// The timeline history read from this node while it was a primary:
    /// `(its timeline, entries)`; the entries are empty when the file could
    /// not be read. Read once per timeline and connection.
    history: Option<(u32, Vec<(u32, Lsn)>)>,
}

/// A probe's outcome, handed from the node's probe task to the round.
struct Outcome {
    /// When the probe started (a query failure reported after this makes
    /// a success meaningless).
    started: Instant,
    result: Result<Probe, String>,
    meta: NodeMeta,
}

struct NodeProbe {
    target: MonitorTarget,
    client: Option<tokio_postgres::Client>,
    meta: NodeMeta,
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
    /// Probes in its own task, so that a node that hangs holds up nobody:
    /// the round goes on without it (keeping its previous state) until its
    /// probe times out.
    fn spawn_probe(
        probe: &Arc<tokio::sync::Mutex<NodeProbe>>,
        connector: &Arc<Connector>,
        timeout: Duration,
    ) -> JoinHandle<Outcome> {
        let (probe, connector) = (probe.clone(), connector.clone());
        tokio::spawn(async move {
            let mut p = probe.lock().await;
            let started = Instant::now();
            let result = p.probe(&connector, timeout).await;
            Outcome {
                started,
                result,
                meta: p.meta.clone(),
            }
        })
    }

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
            self.meta.system_identifier =
                row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok());
            self.meta.wal_segment_size =
                row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok());
            self.meta.history = None;
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
        // A primary's insert position just past a WAL page header is where
        // no record can end: an idle replica never reports it, and would
        // look behind (and lag ever more in time) until the next write.
        let lsn = match lsn {
            Some(l) if !in_recovery => Some(
                l.round_to_record_boundary(
                    self.meta
                        .wal_segment_size
                        .unwrap_or(crate::lsn::DEFAULT_WAL_SEGMENT_SIZE),
                ),
            ),
            other => other,
        };
        let timeline = row.get::<_, Option<i32>>(2).map(|t| t as u32);
        if let Some(tli) = timeline.filter(|&t| t > 1 && !in_recovery) {
            if self.meta.history.as_ref().is_none_or(|(t, _)| *t != tli) {
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
                self.meta.history = Some((tli, entries));
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

/// How long a round waits for slow probes after the first round: at least
/// this, at most the interval. A probe still running then is collected by a
/// later round.
const MIN_ROUND_WAIT: Duration = Duration::from_millis(50);

async fn run(
    targets: Vec<MonitorTarget>,
    config: MonitorConfig,
    connector: Connector,
    shared: Arc<Shared>,
) {
    let connector = Arc::new(connector);
    let probes: Vec<Arc<tokio::sync::Mutex<NodeProbe>>> = targets
        .into_iter()
        .map(|target| {
            Arc::new(tokio::sync::Mutex::new(NodeProbe {
                target,
                client: None,
                meta: NodeMeta::default(),
            }))
        })
        .collect();
    // Aborts the probe tasks when the monitor stops.
    struct AbortOnDrop(Vec<Option<JoinHandle<Outcome>>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            for h in self.0.iter().flatten() {
                h.abort();
            }
        }
    }
    let mut pending = AbortOnDrop(probes.iter().map(|_| None).collect());
    let mut metas: Vec<NodeMeta> = vec![NodeMeta::default(); probes.len()];
    let mut history = LsnHistory {
        samples: VecDeque::new(),
    };
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.wake.notified() => {}
        }
        let round_start = Instant::now();
        for (slot, probe) in pending.0.iter_mut().zip(&probes) {
            if slot.is_none() {
                *slot = Some(NodeProbe::spawn_probe(
                    probe,
                    &connector,
                    config.probe_timeout,
                ));
            }
        }
        // The first round waits for every node (each probe is bounded by
        // the probe timeout); later ones only as long as an interval.
        let wait = if first {
            config.probe_timeout + Duration::from_millis(100)
        } else {
            config.interval.max(MIN_ROUND_WAIT)
        };
        let deadline = tokio::time::Instant::from_std(round_start + wait);
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(probes.len());
        for slot in pending.0.iter_mut() {
            let outcome = match slot.as_mut() {
                Some(handle) => match tokio::time::timeout_at(deadline, handle).await {
                    Ok(Ok(o)) => Some(o),
                    Ok(Err(e)) => Some(Outcome {
                        started: round_start,
                        result: Err(format!("probe task failed: {e}")),
                        meta: NodeMeta::default(),
                    }),
                    Err(_) => None,
                },
                None => None,
            };
            if outcome.is_some() {
                *slot = None;
            }
            outcomes.push(outcome);
        }
        if outcomes.iter().all(Option::is_none) {
            continue;
        }
        first = false;
        let now = Instant::now();
        let prev = shared.tx.borrow().clone();
        let mut results: Vec<Option<Result<Probe, String>>> = Vec::with_capacity(outcomes.len());
        {
            let failures = shared.failures.lock().unwrap_or_else(|p| p.into_inner());
            for (i, o) in outcomes.into_iter().enumerate() {
                results.push(o.map(|o| {
                    if o.result.is_ok() || o.meta.system_identifier.is_some() {
                        metas[i] = o.meta;
                    }
                    // A query failed on a replica after this probe started:
                    // the probe may have run just before the failure, so it
                    // does not count.
                    match (&failures[i], o.result) {
                        (Some((at, error)), Ok(_))
                            if *at >= o.started && prev.primary != Some(i) =>
                        {
                            Err(error.clone())
                        }
                        (_, r) => r,
                    }
                }));
            }
        }
        let next = build_snapshot(&prev, &metas, results, &mut history, &config, now);
        publish_metrics(&next);
        shared.tx.send_replace(Arc::new(next));
    }
}

/// The next snapshot from `prev` and this round's probe results: `None` for
/// a node whose probe is still running (it keeps its previous state, and
/// is neither re-admitted nor used as a fresh primary position).
fn build_snapshot(
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
            metrics::counter!("lagrouter_primary_changes_total").increment(1);
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
