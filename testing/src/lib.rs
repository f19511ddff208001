//! PostgreSQL primary/replica test harness.
//!
//! [`PgCluster`] starts a throw-away streaming-replication cluster (one
//! primary, any number of hot standbys) and offers the controls the
//! lagrouter tests need: pausing and delaying WAL replay, stopping, crashing
//! and restarting nodes, promoting a standby, and waiting for replay
//! positions.
//!
//! Two backends exist:
//!
//! * [`BackendKind::Local`] runs the PostgreSQL server binaries found through
//!   `PG_BIN` or `pg_config --bindir` as child processes, each cluster in its
//!   own temporary directory and on OS-assigned ports. When the test runs as
//!   root the servers run as the unprivileged `postgres` OS user.
//! * [`BackendKind::Docker`] (cargo feature `docker`) runs one container
//!   per node from the image [`docker_image`] names: by default
//!   `lagrouter/postgres:15`, built on this machine from Debian's packages
//!   by `testing/scripts/build-pg-image.sh` (no registry needed; the
//!   harness runs the script when the image is missing), or any image with
//!   the PostgreSQL server binaries and a `postgres` user, such as the
//!   official `postgres:15` (`LAGROUTER_PG_IMAGE=postgres:15`). The
//!   harness runs `initdb`, `pg_basebackup` and the server itself, never the
//!   image's entrypoint. Nodes replicate over a network of their own, so
//!   [`PgCluster::isolate_node`] and [`PgCluster::partition_from_peers`]
//!   can cut them off.
//!
//! Without an explicit [`PgClusterBuilder::backend`] call the backend comes
//! from the `LAGROUTER_TEST_BACKEND` environment variable (`docker`, `local`
//! or `auto`); `auto` (the default) picks Docker when the `docker` feature is
//! compiled in, an engine answers and the image is present or can be built,
//! else the local binaries (see [`default_backend`]). A forced backend that
//! cannot start is an error, never replaced by the other.
//!
//! Dropping a [`PgCluster`] stops every server it started (also while a
//! panic unwinds) and removes its files.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use lagrouter_testing::PgCluster;
//!
//! let cluster = PgCluster::start(1).await?;
//! let primary = cluster.connect(cluster.primary()).await?;
//! primary.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await?;
//! let lsn = cluster.current_lsn().await?;
//! cluster.wait_for_replay(1, lsn, Duration::from_secs(10)).await?;
//! let replica = cluster.connect(1).await?;
//! assert_eq!(replica.query("SELECT id FROM t", &[]).await?.len(), 1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

use std::time::Duration;

mod backend;
mod builder;
mod cluster;
mod controls;
#[cfg(feature = "docker")]
mod docker;
mod engine;
mod error;
mod faults;
mod local;
mod report;
mod spec;

pub use backend::{BackendKind, BackendRequest, default_backend, resolve_backend};
pub use builder::PgClusterBuilder;
pub use cluster::PgCluster;
pub use engine::{
    DEFAULT_DOCKER_IMAGE, PG_IMAGE_ENV, docker_engine_reachable, docker_image, docker_image_present,
};
pub use error::HarnessError;
pub use report::report;

// Crate-internal items the backends (`local`, `docker`) reach as `super::…`.
pub(crate) use backend::{BoxFut, ClusterBackend};
pub(crate) use spec::{
    ClusterSpec, connect_config, io_err, probe, quote_conf, quote_conn_value, quote_ident,
    quote_literal, replication_conninfo,
};

/// Index of a node in a [`PgCluster`]: `0` is the initial primary,
/// `1..=n` are the replicas in creation order.
pub type NodeIndex = usize;

/// Name of the environment variable that selects the default backend.
pub const BACKEND_ENV: &str = "LAGROUTER_TEST_BACKEND";

/// Whether this build contains the Docker backend (cargo feature `docker`).
pub const DOCKER_BACKEND_COMPILED: bool = cfg!(feature = "docker");

/// How long a node may take to accept connections after it was started.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between polls while awaiting a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Lines of server log attached to error messages.
const ERROR_LOG_LINES: usize = 40;

// `PgCluster` is shared between tasks and threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PgCluster>();
    assert_send_sync::<PgClusterBuilder>();
    assert_send_sync::<HarnessError>();
};
