//! Controls of a running [`PgCluster`]: pausing and delaying replay,
//! stopping, crashing and restarting nodes, promotion, rejoining, and
//! waiting for replay positions. Freezing and network faults are in
//! `faults.rs`.

use std::time::{Duration, Instant};

use lagrouter::Lsn;
use lagrouter::model::lsn::DEFAULT_WAL_SEGMENT_SIZE;

use crate::cluster::Role;
use crate::{ERROR_LOG_LINES, HarnessError, NodeIndex, POLL_INTERVAL, PgCluster};

impl PgCluster {
    /// Pauses WAL replay (`pg_wal_replay_pause()`) and waits until
    /// `pg_get_wal_replay_pause_state()` reports `paused`.
    pub async fn pause_replay(&self, node: NodeIndex) -> Result<(), HarnessError> {
        let client = self.control(node).await?;
        self.exec(node, &client, "SELECT pg_wal_replay_pause()")
            .await?;
        self.wait_value(
            node,
            &client,
            "SELECT pg_get_wal_replay_pause_state()",
            "paused",
            "replay to pause",
            Duration::from_secs(30),
        )
        .await
    }

    /// Resumes WAL replay (`pg_wal_replay_resume()`) and waits until the
    /// pause state is `not paused`.
    pub async fn resume_replay(&self, node: NodeIndex) -> Result<(), HarnessError> {
        let client = self.control(node).await?;
        self.exec(node, &client, "SELECT pg_wal_replay_resume()")
            .await?;
        self.wait_value(
            node,
            &client,
            "SELECT pg_get_wal_replay_pause_state()",
            "not paused",
            "replay to resume",
            Duration::from_secs(30),
        )
        .await
    }

    /// Sets `recovery_min_apply_delay` (millisecond precision) with
    /// `ALTER SYSTEM` and `pg_reload_conf()`, then waits until the server
    /// reports the new value. `Duration::ZERO` removes the delay.
    pub async fn set_apply_delay(&self, node: NodeIndex, d: Duration) -> Result<(), HarnessError> {
        let ms = d.as_millis();
        if ms > i32::MAX as u128 {
            return Err(HarnessError::InvalidConfig(format!(
                "apply delay {d:?} is too large"
            )));
        }
        self.set_config(
            node,
            "recovery_min_apply_delay",
            &format!("{ms}ms"),
            &ms.to_string(),
        )
        .await
    }

    /// Stops standby `node` from receiving WAL (an empty
    /// `primary_conninfo`) and waits until its WAL receiver is gone: what
    /// the primary writes from now on exists only there, as with an
    /// asynchronous standby cut off just before a failover.
    /// [`PgCluster::promote`] points it at the new primary again.
    pub async fn stop_wal_receiver(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.set_config(node, "primary_conninfo", "", "").await?;
        let client = self.control(node).await?;
        self.wait_value(
            node,
            &client,
            "SELECT count(*)::text FROM pg_stat_wal_receiver",
            "0",
            "the WAL receiver to stop",
            Duration::from_secs(30),
        )
        .await
    }

    /// Fast shutdown of `node` (`SIGINT`); waits for the server to exit.
    /// On Docker the server is the container's main process, so its
    /// container stops too: its address leaves the cluster's network and
    /// its published port refuses connections.
    pub async fn stop_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.stop_node(node).await
    }

    /// Crashes `node` (immediate shutdown, `SIGQUIT`); waits for the server
    /// to exit and its port to refuse connections. On Docker its container
    /// stops as well.
    pub async fn kill_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.kill_node(node).await
    }

    /// Restarts a stopped or killed node on the same port and waits until it
    /// accepts connections. A standby whose upstream was replaced by a
    /// promotion while it was down is repointed to the current primary.
    ///
    /// The Docker backend starts the node's container again, publishing the
    /// same host port.
    pub async fn start_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        if self.backend.is_running(node) {
            return Err(HarnessError::InvalidState {
                node,
                message: "already running".into(),
            });
        }
        self.backend.start_node(node).await?;
        let (role, primary) = {
            let t = self.topo();
            (t.roles[node], t.primary())
        };
        if let Role::Standby { upstream } = role {
            if upstream != primary {
                self.repoint(node, primary).await?;
            }
        }
        Ok(())
    }

    /// Promotes the standby `node` (`pg_promote(true)`), waits until it left
    /// recovery, makes it [`PgCluster::primary`] and repoints every other
    /// running standby's `primary_conninfo` to it (stopped standbys are
    /// repointed by [`PgCluster::start_node`]). The former primary is left
    /// as it is; stop it first for a clean failover.
    pub async fn promote(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        let role = self.topo().roles[node];
        if !matches!(role, Role::Standby { .. }) {
            return Err(HarnessError::InvalidState {
                node,
                message: format!("cannot promote a node that is not a standby ({role:?})"),
            });
        }
        let client = self.control(node).await?;
        let row = client
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .map_err(|e| self.pg_err(node, "pg_promote()", e))?;
        let promoted: bool = row.get(0);
        if !promoted {
            return Err(HarnessError::InvalidState {
                node,
                message: format!(
                    "pg_promote() returned false\n--- server log tail ---\n{}",
                    self.log_tail(node, ERROR_LOG_LINES)
                ),
            });
        }
        self.wait_value(
            node,
            &client,
            "SELECT pg_is_in_recovery()::text",
            "false",
            "the promoted node to leave recovery",
            Duration::from_secs(60),
        )
        .await?;
        let followers: Vec<NodeIndex> = {
            let mut t = self.topo();
            let old = t.primary();
            t.roles[old] = Role::Retired;
            t.roles[node] = Role::Primary;
            t.roles
                .iter()
                .enumerate()
                .filter(|(_, r)| matches!(r, Role::Standby { .. }))
                .map(|(i, _)| i)
                .collect()
        };
        for f in followers {
            if self.backend.is_running(f) {
                self.repoint(f, node).await?;
            }
        }
        Ok(())
    }

    /// Turns a former primary (replaced by [`PgCluster::promote`]) into a
    /// standby of the current primary: stops it if running, runs
    /// `pg_rewind` against the current primary, configures streaming from
    /// it and starts it. On Docker, `pg_rewind` runs in a helper container
    /// that shares the node's data volume.
    pub async fn rejoin_as_standby(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        let (role, primary) = {
            let t = self.topo();
            (t.roles[node], t.primary())
        };
        if role != Role::Retired {
            return Err(HarnessError::InvalidState {
                node,
                message: format!("only a former primary can be rejoined ({role:?})"),
            });
        }
        if self.backend.is_running(node) {
            self.backend.stop_node(node).await?;
        }
        // pg_rewind reads the source's timeline from pg_control, which a
        // freshly promoted server only updates at its next checkpoint.
        let source = self.control(primary).await?;
        self.exec(primary, &source, "CHECKPOINT").await?;
        self.backend.rewind_node(node, primary).await?;
        self.backend.start_node(node).await?;
        self.topo().roles[node] = Role::Standby { upstream: primary };
        Ok(())
    }

    /// `pg_last_wal_replay_lsn()` of `node`: `None` on a node that never
    /// was in recovery.
    pub async fn replay_lsn(&self, node: NodeIndex) -> Result<Option<Lsn>, HarnessError> {
        let client = self.control(node).await?;
        self.query_lsn(node, &client, "SELECT pg_last_wal_replay_lsn()::text")
            .await
    }

    /// `pg_current_wal_insert_lsn()` of the current primary.
    pub async fn current_lsn(&self) -> Result<Lsn, HarnessError> {
        let node = self.primary();
        let client = self.control(node).await?;
        self.query_lsn(node, &client, "SELECT pg_current_wal_insert_lsn()::text")
            .await?
            .ok_or_else(|| HarnessError::InvalidState {
                node,
                message: "pg_current_wal_insert_lsn() returned NULL".into(),
            })
    }

    /// `pg_current_wal_flush_lsn()` of the current primary.
    pub async fn flush_lsn(&self) -> Result<Lsn, HarnessError> {
        let node = self.primary();
        let client = self.control(node).await?;
        self.query_lsn(node, &client, "SELECT pg_current_wal_flush_lsn()::text")
            .await?
            .ok_or_else(|| HarnessError::InvalidState {
                node,
                message: "pg_current_wal_flush_lsn() returned NULL".into(),
            })
    }

    /// The standby that received the most WAL, once every standby has
    /// replayed what it received: the one to promote after the primary is
    /// lost, which the others can then follow. Each wait is bounded by
    /// `timeout`.
    pub async fn most_advanced_replica(
        &self,
        timeout: Duration,
    ) -> Result<NodeIndex, HarnessError> {
        let mut best: Option<(NodeIndex, Lsn)> = None;
        for r in self.replicas() {
            let client = self.control(r).await?;
            let received = self
                .query_lsn(r, &client, "SELECT pg_last_wal_receive_lsn()::text")
                .await?
                .ok_or_else(|| HarnessError::InvalidState {
                    node: r,
                    message: "pg_last_wal_receive_lsn() returned NULL".into(),
                })?;
            self.wait_for_replay(r, received, timeout).await?;
            if best.is_none_or(|(_, l)| received > l) {
                best = Some((r, received));
            }
        }
        best.map(|(r, _)| r)
            .ok_or_else(|| HarnessError::InvalidState {
                node: self.primary(),
                message: "the cluster has no replica".into(),
            })
    }

    /// Polls until `node` has replayed up to `lsn`, failing after `timeout`.
    ///
    /// `lsn` is first passed through [`Lsn::round_to_record_boundary`], so
    /// a value from [`PgCluster::current_lsn`] that points just past a page
    /// header is reachable. On a node that is not in recovery (the primary)
    /// its flush position counts as replayed.
    pub async fn wait_for_replay(
        &self,
        node: NodeIndex,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        self.check(node)?;
        let target = lsn.round_to_record_boundary(DEFAULT_WAL_SEGMENT_SIZE);
        let deadline = Instant::now() + timeout;
        let mut client: Option<tokio_postgres::Client> = None;
        let mut last = String::from("nothing observed yet");
        loop {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match self.control(node).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        last = format!("connect failed: {e}");
                        client = None;
                    }
                }
            }
            if let Some(c) = &client {
                match self.applied_lsn(node, c).await {
                    Ok(Some(applied)) if applied >= target => return Ok(()),
                    Ok(applied) => {
                        last = format!(
                            "replayed {}",
                            applied.map_or_else(|| "NULL".to_string(), |l| l.to_string())
                        )
                    }
                    Err(e) => {
                        last = format!("query failed: {e}");
                        client = None;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(
                    node,
                    &format!("node {node} to replay {target}"),
                    timeout,
                    last,
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until every running standby has replayed the primary's current
    /// flush position (read once at the start).
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        let target = self.flush_lsn().await?;
        for node in self.replicas() {
            if !self.backend.is_running(node) {
                continue;
            }
            let left = timeout.saturating_sub(started.elapsed());
            self.wait_for_replay(node, target, left).await?;
        }
        Ok(())
    }

    /// The last `lines` lines of the node's server log (for diagnostics).
    pub fn log_tail(&self, node: NodeIndex, lines: usize) -> String {
        if self.check(node).is_err() {
            return String::new();
        }
        self.backend.log_tail(node, lines)
    }
}
