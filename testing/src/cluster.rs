//! [`PgCluster`]: the running cluster, its nodes and addresses, and the
//! helpers its controls share.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lagrouter::Lsn;

use crate::backend::ClusterBackend;
use crate::spec::{connect_config, quote_conn_value, quote_literal, replication_conninfo};
use crate::{
    BackendKind, ERROR_LOG_LINES, HarnessError, NodeIndex, POLL_INTERVAL, PgClusterBuilder,
};

/// The role a node currently has in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The current primary.
    Primary,
    /// A standby following `upstream`'s conninfo.
    Standby {
        /// The node its `primary_conninfo` points at.
        upstream: NodeIndex,
    },
    /// A former primary replaced by a promotion (not a standby).
    Retired,
}

#[derive(Debug)]
pub(crate) struct Topology {
    pub(crate) roles: Vec<Role>,
}

impl Topology {
    pub(crate) fn primary(&self) -> NodeIndex {
        self.roles
            .iter()
            .position(|r| *r == Role::Primary)
            .expect("a cluster always has a primary")
    }
}

/// A running PostgreSQL primary with streaming-replication standbys.
///
/// `PgCluster` is `Send + Sync`; share it through `Arc` if tasks need it.
/// Dropping it stops every server (immediate shutdown, escalating to
/// `SIGKILL`) and deletes the data, also while a panic unwinds.
pub struct PgCluster {
    pub(crate) backend: Box<dyn ClusterBackend>,
    pub(crate) topology: Mutex<Topology>,
    pub(crate) user: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("PgCluster");
        d.field("backend", &self.backend.kind());
        let nodes: Vec<String> = (0..self.node_count())
            .map(|n| format!("{}:{}", self.backend.host(n), self.backend.port(n)))
            .collect();
        d.field("nodes", &nodes);
        d.field("topology", &*self.topo());
        d.finish()
    }
}

impl PgCluster {
    /// Starts a primary with `replicas` standbys with default settings;
    /// same as `PgCluster::builder().replicas(replicas).start()`.
    pub async fn start(replicas: usize) -> Result<PgCluster, HarnessError> {
        PgCluster::builder().replicas(replicas).start().await
    }

    /// A builder with the defaults: one replica, backend from the
    /// environment, user `postgres` / `postgres`, `scram-sha-256`.
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    /// The backend running this cluster.
    pub fn backend(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Number of nodes (primary plus replicas, including stopped ones).
    pub fn node_count(&self) -> usize {
        self.backend.node_count()
    }

    /// The current primary (changes after [`PgCluster::promote`]).
    pub fn primary(&self) -> NodeIndex {
        self.topo().primary()
    }

    /// The current standbys, running or stopped, in index order. A former
    /// primary replaced by a promotion is not listed until it is rejoined
    /// with [`PgCluster::rejoin_as_standby`].
    pub fn replicas(&self) -> Vec<NodeIndex> {
        self.topo()
            .roles
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Role::Standby { .. }))
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether the node's server is running (not stopped or killed).
    pub fn is_running(&self, node: NodeIndex) -> bool {
        self.check(node).is_ok() && self.backend.is_running(node)
    }

    /// Client configuration for `node`: host, port, user, password and
    /// database `postgres`, with a 10 s connect timeout.
    ///
    /// # Panics
    /// When `node` is out of range.
    pub fn config(&self, node: NodeIndex) -> tokio_postgres::Config {
        self.assert_node(node);
        let mut c = tokio_postgres::Config::new();
        c.host(self.backend.host(node))
            .port(self.backend.port(node))
            .user(&self.user)
            .password(&self.password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// libpq connection string for `node`:
    /// `host=127.0.0.1 port=... user=postgres password=... dbname=postgres`.
    ///
    /// # Panics
    /// When `node` is out of range.
    pub fn connection_string(&self, node: NodeIndex) -> String {
        self.assert_node(node);
        format!(
            "host={} port={} user={} password={} dbname=postgres",
            quote_conn_value(&self.backend.host(node)),
            self.backend.port(node),
            quote_conn_value(&self.user),
            quote_conn_value(&self.password)
        )
    }

    /// The node's data directory (local backend only).
    pub fn data_dir(&self, node: NodeIndex) -> Option<std::path::PathBuf> {
        self.check(node).ok()?;
        self.backend.data_dir(node)
    }

    /// Connects to `node` with [`PgCluster::config`] and spawns the
    /// connection task on the current runtime.
    pub async fn connect(&self, node: NodeIndex) -> Result<tokio_postgres::Client, HarnessError> {
        self.check(node)?;
        connect_config(&self.config(node))
            .await
            .map_err(|e| self.pg_err(node, "connect", e))
    }
}

impl PgCluster {
    // ----- internals -----

    pub(crate) fn topo(&self) -> std::sync::MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn check(&self, node: NodeIndex) -> Result<(), HarnessError> {
        let count = self.node_count();
        if node < count {
            Ok(())
        } else {
            Err(HarnessError::NoSuchNode { node, count })
        }
    }

    pub(crate) fn assert_node(&self, node: NodeIndex) {
        if let Err(e) = self.check(node) {
            panic!("{e}");
        }
    }

    pub(crate) fn pg_err(
        &self,
        node: NodeIndex,
        context: &str,
        e: tokio_postgres::Error,
    ) -> HarnessError {
        HarnessError::Postgres {
            node,
            context: context.to_string(),
            source: e,
            log_tail: self.log_tail(node, ERROR_LOG_LINES),
        }
    }

    pub(crate) fn timeout(
        &self,
        node: NodeIndex,
        what: &str,
        timeout: Duration,
        state: String,
    ) -> HarnessError {
        HarnessError::Timeout {
            what: what.to_string(),
            timeout,
            detail: format!(
                "last state: {state}\n--- node {node} log tail ---\n{}",
                self.log_tail(node, ERROR_LOG_LINES)
            ),
        }
    }

    /// A connection for the harness' own queries.
    pub(crate) async fn control(
        &self,
        node: NodeIndex,
    ) -> Result<tokio_postgres::Client, HarnessError> {
        self.check(node)?;
        let config = self
            .backend
            .control_config(node)
            .unwrap_or_else(|| self.config(node));
        connect_config(&config)
            .await
            .map_err(|e| self.pg_err(node, "connect", e))
    }

    pub(crate) async fn exec(
        &self,
        node: NodeIndex,
        client: &tokio_postgres::Client,
        sql: &str,
    ) -> Result<(), HarnessError> {
        client
            .batch_execute(sql)
            .await
            .map_err(|e| self.pg_err(node, sql, e))
    }

    pub(crate) async fn query_lsn(
        &self,
        node: NodeIndex,
        client: &tokio_postgres::Client,
        sql: &str,
    ) -> Result<Option<Lsn>, HarnessError> {
        let row = client
            .query_one(sql, &[])
            .await
            .map_err(|e| self.pg_err(node, sql, e))?;
        let text: Option<String> = row.get(0);
        text.map(|t| {
            t.parse::<Lsn>().map_err(|_| HarnessError::InvalidState {
                node,
                message: format!("cannot parse LSN {t:?} returned by `{sql}`"),
            })
        })
        .transpose()
    }

    /// Replay position on a standby, flush position on a primary.
    pub(crate) async fn applied_lsn(
        &self,
        node: NodeIndex,
        client: &tokio_postgres::Client,
    ) -> Result<Option<Lsn>, HarnessError> {
        self.query_lsn(
            node,
            client,
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_flush_lsn() END)::text",
        )
        .await
    }

    /// `ALTER SYSTEM SET name = value`, reload, and wait until
    /// `pg_settings.setting` equals `expect`.
    pub(crate) async fn set_config(
        &self,
        node: NodeIndex,
        name: &str,
        value: &str,
        expect: &str,
    ) -> Result<(), HarnessError> {
        let client = self.control(node).await?;
        self.exec(
            node,
            &client,
            &format!("ALTER SYSTEM SET {name} = {}", quote_literal(value)),
        )
        .await?;
        self.exec(node, &client, "SELECT pg_reload_conf()").await?;
        self.wait_value(
            node,
            &client,
            &format!(
                "SELECT setting FROM pg_settings WHERE name = {}",
                quote_literal(name)
            ),
            expect,
            &format!("{name} to become {expect:?} after reload"),
            Duration::from_secs(30),
        )
        .await
    }

    /// Polls `sql` (one text value) on `node` until it returns `want`, for
    /// up to `timeout`; the error names `what` and the last value seen.
    pub(crate) async fn wait_value(
        &self,
        node: NodeIndex,
        client: &tokio_postgres::Client,
        sql: &str,
        want: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let row = client
                .query_one(sql, &[])
                .await
                .map_err(|e| self.pg_err(node, sql, e))?;
            let current: String = row.get(0);
            if current == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(
                    node,
                    what,
                    timeout,
                    format!("{sql} returned {current:?}"),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Points standby `node` at `upstream` and records it.
    pub(crate) async fn repoint(
        &self,
        node: NodeIndex,
        upstream: NodeIndex,
    ) -> Result<(), HarnessError> {
        let conninfo = self.replication_conninfo(node, upstream);
        self.set_config(node, "primary_conninfo", &conninfo, &conninfo)
            .await?;
        if let Role::Standby { upstream: u } = &mut self.topo().roles[node] {
            *u = upstream;
        }
        Ok(())
    }

    /// `primary_conninfo` for `node` streaming from `upstream`.
    pub(crate) fn replication_conninfo(&self, node: NodeIndex, upstream: NodeIndex) -> String {
        replication_conninfo(
            &self.backend.peer_address(upstream),
            &self.user,
            &self.password,
            node,
        )
    }
}
