//! The cluster: one pool per node, the lag monitor and the router, built
//! once and shared (cheaply cloned) by every session and service.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::connect::Connector;
use crate::error::{Error, Result};
use crate::model::policy::Consistency;
use crate::model::topology::{Role, Topology};
use crate::monitor::{LagMonitor, MonitorConfig, MonitorTarget};
use crate::routing::{LoadBalance, Router};

/// One PostgreSQL server and its connection pool.
pub struct Node {
    /// The node's name (`primary`, `replica1`, … unless set).
    pub name: String,
    /// Its connection pool.
    pub pool: Pool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("name", &self.name).finish()
    }
}

pub(crate) struct Inner {
    pub(crate) nodes: Vec<Node>,
    pub(crate) monitor: LagMonitor,
    pub(crate) router: Router,
    pub(crate) policy: Consistency,
    pub(crate) retry_on_empty: bool,
    pub(crate) wait_poll: Duration,
}

/// A primary and its replicas, with lag-aware routing.
///
/// Cloning is cheap (an `Arc`). Build one with [`Cluster::builder`], then
/// open [`Session`](crate::Session)s ([`Cluster::session`]) or wrap it in a [`RouterService`](crate::RouterService).
///
/// ```no_run
/// # async fn demo() -> Result<(), lagrouter::Error> {
/// use std::time::Duration;
/// use lagrouter::{Cluster, Consistency};
///
/// let cluster = Cluster::builder()
///     .primary("host=10.0.0.1 user=app password=secret dbname=app")
///     .replica("host=10.0.0.2 user=app password=secret dbname=app")
///     .policy(Consistency::read_your_writes(Duration::from_millis(100)))
///     .build()
///     .await?;
/// let mut session = cluster.session();
/// session.execute("INSERT INTO notes(body) VALUES ($1)", &[&"hello"]).await?;
/// // Served by a replica that has replayed the insert, or by the primary.
/// let row = session.query_one("SELECT count(*) FROM notes", &[]).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.inner.nodes)
            .field("policy", &self.inner.policy)
            .finish()
    }
}

impl Cluster {
    /// Starts building a cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// The nodes, in configuration order (index 0 is the configured primary).
    pub fn nodes(&self) -> &[Node] {
        &self.inner.nodes
    }

    /// The latest topology snapshot.
    pub fn topology(&self) -> Arc<Topology> {
        self.inner.monitor.snapshot()
    }

    /// The lag monitor.
    pub fn monitor(&self) -> &LagMonitor {
        &self.inner.monitor
    }

    /// The default consistency policy.
    pub fn policy(&self) -> Consistency {
        self.inner.policy
    }

    /// The name of node `i`.
    pub fn node_name(&self, i: usize) -> &str {
        self.inner.nodes.get(i).map_or("?", |n| n.name.as_str())
    }
}

/// Anything that names a node: a libpq-style connection string or a
/// `tokio_postgres::Config`.
pub trait IntoNodeConfig {
    /// Converts into a `tokio_postgres::Config`.
    fn into_node_config(self) -> Result<tokio_postgres::Config>;
}

impl IntoNodeConfig for tokio_postgres::Config {
    fn into_node_config(self) -> Result<tokio_postgres::Config> {
        Ok(self)
    }
}

impl IntoNodeConfig for &str {
    fn into_node_config(self) -> Result<tokio_postgres::Config> {
        self.parse()
            .map_err(|e| Error::Config(format!("invalid connection string: {e}")))
    }
}

impl IntoNodeConfig for String {
    fn into_node_config(self) -> Result<tokio_postgres::Config> {
        self.as_str().into_node_config()
    }
}

/// Builder for a [`Cluster`].
pub struct ClusterBuilder {
    nodes: Vec<(String, Role, Result<tokio_postgres::Config>)>,
    pool_size: usize,
    pool_timeout: Duration,
    connector: Connector,
    monitor: MonitorConfig,
    policy: Consistency,
    balance: LoadBalance,
    retry_on_empty: bool,
    wait_poll: Duration,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            nodes: Vec::new(),
            pool_size: 16,
            pool_timeout: Duration::from_secs(5),
            connector: Connector::default(),
            monitor: MonitorConfig::default(),
            policy: Consistency::default(),
            balance: LoadBalance::default(),
            retry_on_empty: false,
            wait_poll: Duration::from_millis(2),
        }
    }
}

impl ClusterBuilder {
    /// The primary (required, exactly once).
    pub fn primary(mut self, config: impl IntoNodeConfig) -> Self {
        self.nodes
            .push(("primary".into(), Role::Primary, config.into_node_config()));
        self
    }

    /// A replica, named `replicaN`.
    pub fn replica(self, config: impl IntoNodeConfig) -> Self {
        let n = self.nodes.iter().filter(|n| n.1 == Role::Replica).count() + 1;
        self.named_replica(format!("replica{n}"), config)
    }

    /// A replica with a name of your choice.
    pub fn named_replica(mut self, name: impl Into<String>, config: impl IntoNodeConfig) -> Self {
        self.nodes
            .push((name.into(), Role::Replica, config.into_node_config()));
        self
    }

    /// Connections per node pool (default 16).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long to wait for a pooled connection (default 5 s).
    pub fn pool_timeout(mut self, timeout: Duration) -> Self {
        self.pool_timeout = timeout;
        self
    }

    /// TLS settings (default: none).
    pub fn connector(mut self, connector: Connector) -> Self {
        self.connector = connector;
        self
    }

    /// The default consistency policy (default: read-your-writes, 100 ms).
    pub fn policy(mut self, policy: Consistency) -> Self {
        self.policy = policy;
        self
    }

    /// How reads are spread over replicas (default: round robin).
    pub fn load_balance(mut self, balance: LoadBalance) -> Self {
        self.balance = balance;
        self
    }

    /// Probe interval of the lag monitor (default 100 ms).
    pub fn monitor_interval(mut self, interval: Duration) -> Self {
        self.monitor.interval = interval;
        self
    }

    /// All lag monitor settings.
    pub fn monitor_config(mut self, config: MonitorConfig) -> Self {
        self.monitor = config;
        self
    }

    /// Retry reads that find no row on the primary (`query_opt` /
    /// `query_one`), for data a replica may not have yet (default off).
    pub fn retry_on_empty(mut self, on: bool) -> Self {
        self.retry_on_empty = on;
        self
    }

    /// Poll interval while waiting for a replica to reach a token
    /// (default 2 ms, doubling up to 8x).
    pub fn wait_poll(mut self, poll: Duration) -> Self {
        self.wait_poll = poll.max(Duration::from_micros(100));
        self
    }

    /// Creates the pools, starts the monitor and waits for its first probe
    /// (bounded by the probe timeout). Unreachable nodes do not fail the
    /// build: they start ejected.
    pub async fn build(self) -> Result<Cluster> {
        let primaries = self.nodes.iter().filter(|n| n.1 == Role::Primary).count();
        if primaries != 1 {
            return Err(Error::Config(format!(
                "a cluster needs exactly one primary, got {primaries}"
            )));
        }
        let mut nodes = Vec::new();
        let mut targets = Vec::new();
        // The primary first, so that node 0 is the configured primary.
        let mut specs = self.nodes;
        specs.sort_by_key(|n| n.1 != Role::Primary);
        for (name, role, config) in specs {
            let mut config = config?;
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(self.monitor.probe_timeout);
            }
            let pool = self
                .connector
                .pool(config.clone(), self.pool_size, Some(self.pool_timeout))
                .map_err(|e| Error::Config(format!("{name}: {e}")))?;
            targets.push(MonitorTarget {
                name: name.clone(),
                role,
                config,
            });
            nodes.push(Node { name, pool });
        }
        let monitor = LagMonitor::spawn(targets, self.monitor.clone(), self.connector.clone());
        monitor
            .first_probe(self.monitor.probe_timeout + Duration::from_millis(500))
            .await;
        let router = Router::new(nodes.len(), self.balance);
        Ok(Cluster {
            inner: Arc::new(Inner {
                nodes,
                monitor,
                router,
                policy: self.policy,
                retry_on_empty: self.retry_on_empty,
                wait_poll: self.wait_poll,
            }),
        })
    }
}
