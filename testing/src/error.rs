//! The harness error type.

use std::io;
use std::time::Duration;

use crate::{BACKEND_ENV, NodeIndex};

/// Errors of the test harness. Messages carry the failing command's output
/// or the tail of the server log so that test failures are diagnosable.
///
/// `Debug` prints the same multi-line text as `Display`, so that
/// `.unwrap()` / `.expect()` in tests show readable server logs.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// `LAGROUTER_TEST_BACKEND` holds an unknown value.
    #[error("invalid {BACKEND_ENV} value {value:?} (expected docker, local or auto)")]
    InvalidBackend {
        /// The rejected value.
        value: String,
    },
    /// The requested backend cannot run here (feature missing, no engine,
    /// no PostgreSQL binaries, operation not supported by the backend).
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// A builder option has an unusable value.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The node index is out of range.
    #[error("node {node} does not exist (the cluster has {count} nodes)")]
    NoSuchNode {
        /// The requested node.
        node: NodeIndex,
        /// Number of nodes in the cluster.
        count: usize,
    },
    /// The operation does not fit the node's current state (for example
    /// promoting a node that is not a standby).
    #[error("node {node}: {message}")]
    InvalidState {
        /// The node concerned.
        node: NodeIndex,
        /// What is wrong.
        message: String,
    },
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An external command (initdb, pg_basebackup, ...) failed.
    #[error("`{command}` failed ({status})\n--- output ---\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status description.
        status: String,
        /// Its combined stdout and stderr.
        output: String,
    },
    /// A server did not come up.
    #[error("node {node} failed to start: {message}\n--- server log tail ---\n{log_tail}")]
    Startup {
        /// The node concerned.
        node: NodeIndex,
        /// What went wrong.
        message: String,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// Connecting to or querying a node failed.
    #[error("node {node}: {context}: {source}\n--- server log tail ---\n{log_tail}")]
    Postgres {
        /// The node concerned.
        node: NodeIndex,
        /// What was being done.
        context: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// A condition was not reached in time.
    #[error("timed out after {timeout:?} waiting for {what}\n{detail}")]
    Timeout {
        /// The awaited condition.
        what: String,
        /// The deadline that passed.
        timeout: Duration,
        /// Last observed state and log tail.
        detail: String,
    },
    /// The container engine reported an error.
    #[error("docker: {0}")]
    Docker(String),
}

impl std::fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}
