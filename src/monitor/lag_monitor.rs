//! The [`LagMonitor`]: the background task that probes every node each
//! interval and publishes [`Topology`] snapshots.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::warn;

use super::history::LsnHistory;
use super::node_probe::{NodeMeta, NodeProbe, Outcome, Probe};
use super::snapshot::{build_snapshot, publish_metrics};
use crate::connect::Connector;
use crate::metrics::NODE_EJECTIONS_TOTAL;
use crate::model::topology::{NodeState, Role, Topology};

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
    ///
    /// Also registers the descriptions of the library's metrics
    /// ([`metrics::describe`](crate::metrics::describe)) with the metrics
    /// recorder installed at that time.
    pub fn spawn(targets: Vec<MonitorTarget>, config: MonitorConfig, connector: Connector) -> Self {
        crate::metrics::describe();
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
            next.nodes[index].epoch += 1;
            next.generation += 1;
            *topo = Arc::new(next);
            ejected = true;
            true
        });
        if ejected {
            warn!(node = index, error, "node ejected after a failed query");
            metrics::counter!(NODE_EJECTIONS_TOTAL).increment(1);
            self.refresh();
        }
    }
}

impl Drop for LagMonitor {
    fn drop(&mut self) {
        self.task.abort();
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
