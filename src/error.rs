//! Typed errors that keep the server's SQLSTATE.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::model::lsn::Lsn;
use crate::model::token::TokenError;

/// Everything that can go wrong while routing or running a statement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database returned an error (its SQLSTATE is kept, see [`Error::code`]).
    #[error("{node}: {}", describe(.source))]
    Db {
        /// The node that answered.
        node: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// No connection to a node could be had: it cannot be reached (within
    /// the connect and pool timeouts), or every pooled connection stayed busy
    /// for the pool timeout ([`Error::is_pool_exhausted`]).
    #[error("{node}: cannot get a connection: {message}")]
    Connect {
        /// The node.
        node: String,
        /// What the pool said.
        message: String,
    },
    /// A consistency token could not be used.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The token names a WAL position the current primary has not reached:
    /// either it was forged, or the writes it stands for were lost in a
    /// failover (asynchronous replication). Also returned, before any node
    /// is tried, for a token of an earlier timeline that lies past the point
    /// where the current primary's history left that timeline: its writes
    /// were lost even if the new timeline has since passed its position.
    #[error(
        "consistency token {token} is ahead of the primary ({primary}): the writes it stands for may have been lost in a failover"
    )]
    TokenAhead {
        /// The token's position.
        token: Lsn,
        /// The primary's current position or, for a token of an earlier
        /// timeline, the last position of that timeline in the primary's
        /// history (its switch point).
        primary: Lsn,
    },
    /// No replica reached the token within the policy's `max_wait` and the
    /// policy says not to fall back to the primary.
    #[error("no replica reached {token} within {waited:?}")]
    WaitTimeout {
        /// The position waited for.
        token: Lsn,
        /// How long it waited.
        waited: Duration,
    },
    /// No node can serve the request (no primary known, or every eligible
    /// node is down).
    #[error("no node available: {0}")]
    Unavailable(String),
    /// A configuration error.
    #[error("configuration error: {0}")]
    Config(String),
}

/// SQLSTATE used for [`Error::WaitTimeout`] (`query_canceled`, as a
/// statement timeout).
pub const SQLSTATE_WAIT_TIMEOUT: &str = "57014";

/// A driver error with its cause: tokio-postgres' own `Display` says only
/// "db error" or "error connecting to server".
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

/// How the message of an [`Error::Connect`] for an exhausted pool starts.
pub(crate) const POOL_EXHAUSTED: &str = "connection pool exhausted";

impl Error {
    pub(crate) fn db(node: &str, source: tokio_postgres::Error) -> Self {
        Error::Db {
            node: node.to_string(),
            source,
        }
    }

    /// The SQLSTATE of the error: the server's own for database errors, and
    /// the nearest standard code for lagrouter's own errors (`08006` when a
    /// node cannot be reached, `57014` for a wait timeout, `22023` for a bad
    /// token, `55000` for a token ahead of the primary).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Db { source, .. } => match source.code() {
                Some(c) => Some(c.code()),
                None if source.is_closed() => Some(SqlState::CONNECTION_FAILURE.code()),
                None => None,
            },
            Error::Connect { .. } | Error::Unavailable(_) => {
                Some(SqlState::CONNECTION_FAILURE.code())
            }
            Error::Token(_) => Some(SqlState::INVALID_PARAMETER_VALUE.code()),
            Error::TokenAhead { .. } => Some(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE.code()),
            Error::WaitTimeout { .. } => Some(SQLSTATE_WAIT_TIMEOUT),
            Error::Config(_) => Some(SqlState::INVALID_PARAMETER_VALUE.code()),
        }
    }

    /// The driver error, when the database answered.
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            Error::Db { source, .. } => source.as_db_error(),
            _ => None,
        }
    }

    /// True when the statement tried to write on a replica (`25006`).
    pub fn is_read_only_violation(&self) -> bool {
        self.code() == Some(SqlState::READ_ONLY_SQL_TRANSACTION.code())
    }

    /// True for a hot-standby recovery conflict: the query was cancelled to
    /// let replay proceed, and can run elsewhere.
    pub fn is_recovery_conflict(&self) -> bool {
        self.failure() == Failure::RecoveryConflict
    }

    /// What this error means for routing, by the read engine's one
    /// classification ([`Failure::classify`]).
    pub fn failure(&self) -> Failure {
        match self {
            Error::Connect { .. } if self.is_pool_exhausted() => Failure::PoolExhausted,
            Error::Connect { .. } => Failure::Connection,
            Error::Db { source, .. } => match source.as_db_error() {
                Some(db) => Failure::classify(db.code().code(), db.message(), db.detail()),
                // Closed, I/O, or a protocol error: the connection is gone.
                None => Failure::Connection,
            },
            _ => Failure::Statement,
        }
    }

    /// True when no pooled connection became free within the pool timeout
    /// (an [`Error::Connect`], SQLSTATE `08006`): the node is busy, not
    /// known to be down, so lagrouter does not eject it.
    pub fn is_pool_exhausted(&self) -> bool {
        matches!(self, Error::Connect { message, .. } if message.starts_with(POOL_EXHAUSTED))
    }

    /// True when the node could not be reached or the connection broke, so
    /// the statement may be retried elsewhere (reads only).
    pub fn is_connection_error(&self) -> bool {
        matches!(self.failure(), Failure::Connection | Failure::PoolExhausted)
    }
}

/// Why a node failed a step, as far as routing cares. Made from a SQLSTATE by
/// [`Failure::classify`], so the library and the proxy agree on every code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 25006 on a replica: the statement writes; or 0A000 "… during
    /// recovery": it reads what a hot standby cannot (unlogged or
    /// temporary relations). Either way it runs on the primary.
    ReadOnly,
    /// Cancelled (or disconnected) by a hot-standby recovery conflict: the
    /// statement can run elsewhere.
    RecoveryConflict,
    /// The node could not be reached, the connection broke, or the server is
    /// shutting down (class 08, 57P01–57P03, no answer).
    Connection,
    /// No pooled connection became free in time: the node is busy, not down.
    PoolExhausted,
    /// The monitor ejected the node while the step was in flight (it stopped
    /// answering probes).
    Ejected,
    /// Any other error: the statement's own (syntax, constraint, …).
    Statement,
}

impl Failure {
    /// Classifies a server error from its SQLSTATE, message and detail.
    pub fn classify(code: &str, message: &str, detail: Option<&str>) -> Failure {
        let conflict = message.contains("conflict with recovery")
            || detail.is_some_and(|d| d.contains("conflict with recovery"));
        match code {
            "25006" => Failure::ReadOnly,
            "0A000" if message.ends_with("during recovery") => Failure::ReadOnly,
            // Cancelled statements (40001, or 40P01 for a buffer-pin
            // deadlock) and sessions terminated for a conflict (57P01,
            // 57P04 when the database was dropped).
            "40001" | "40P01" | "57P01" | "57P04" | "57014" if conflict => {
                Failure::RecoveryConflict
            }
            c if c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03") => {
                Failure::Connection
            }
            _ => Failure::Statement,
        }
    }

    /// Whether the node is ejected (reported to the monitor) after this
    /// failure, whatever the statement: only when it looks down.
    pub fn ejects_node(self) -> bool {
        self == Failure::Connection
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
