//! Faults of a running [`PgCluster`] other than stopping servers: freezing
//! a node, and cutting it off the network (Docker backend).

use crate::backend::Link;
use crate::{HarnessError, NodeIndex, PgCluster};

impl PgCluster {
    /// Freezes `node` like a host that hangs without closing connections
    /// (a paused VM): connections stay open and nothing answers; new
    /// connections are accepted but never served. The local backend stops
    /// every process of the server with `SIGSTOP`; the Docker backend
    /// pauses the container (`docker pause`, the cgroup freezer).
    /// [`PgCluster::thaw_node`] resumes it; dropping the cluster also
    /// removes a frozen node.
    pub async fn freeze_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.freeze_node(node, true).await
    }

    /// Resumes a node frozen by [`PgCluster::freeze_node`].
    pub async fn thaw_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.freeze_node(node, false).await
    }

    /// Cuts `node` off the network while its server keeps running
    /// (`docker network disconnect` from every network): the other nodes
    /// cannot reach it (nor it them), and its published port refuses new
    /// connections while those open through it are closed. Undo with
    /// [`PgCluster::reconnect_node`]. Docker backend only; the local
    /// backend returns [`HarnessError::BackendUnavailable`].
    pub async fn isolate_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.set_link(node, Link::Isolated).await
    }

    /// Cuts `node` off the other nodes but not off clients: it leaves the
    /// cluster's replication network, so standbys lose (or, for a standby,
    /// it loses) the WAL stream, while connections through its published
    /// port keep working. On the primary this is a partition between it
    /// and its replicas. Undo with [`PgCluster::reconnect_node`]. Docker
    /// backend only.
    pub async fn partition_from_peers(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.set_link(node, Link::ClientsOnly).await
    }

    /// Restores the network links cut by [`PgCluster::isolate_node`] or
    /// [`PgCluster::partition_from_peers`] (a no-op on a connected node).
    /// Standbys reconnect to their upstream on their own (within
    /// `wal_retrieve_retry_interval`, 200 ms) and catch up. Docker backend
    /// only.
    pub async fn reconnect_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.set_link(node, Link::Connected).await
    }

    /// The `key=value` label that every container and network of this
    /// cluster carries on the Docker backend (`None` on the local one),
    /// e.g. for `docker ps -a --filter label=…` to check that none remain
    /// after the cluster is dropped.
    pub fn docker_label(&self) -> Option<String> {
        self.backend.cluster_label()
    }
}
