//! Consistency policies: how fresh a read must be.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What to do when no replica becomes fresh enough in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Serve the read from the primary (always fresh).
    #[default]
    Primary,
    /// Fail with [`Error::WaitTimeout`](crate::Error::WaitTimeout).
    Error,
}

/// How fresh a read must be, per cluster (default) or per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum Consistency {
    /// Always read from the primary (strong consistency).
    Primary,
    /// Read-your-writes: a read carrying a token is served only by a replica
    /// that has replayed up to it; it waits up to `max_wait` for one, then
    /// applies `then`. A read without a token may use any healthy replica.
    ReadYourWrites {
        /// How long to wait for a replica to reach the token.
        #[serde(with = "duration_ms")]
        max_wait: Duration,
        /// What to do after `max_wait`.
        then: Fallback,
    },
    /// Serve from a replica whose data is at most this stale, else the
    /// primary. Tokens are honoured as well.
    BoundedStaleness(#[serde(with = "duration_ms")] Duration),
    /// Any healthy replica, however far behind (tokens are ignored).
    Eventual,
    /// Read from the primary for this long after the session's last write,
    /// from any replica otherwise: the time-window heuristic Rails uses, kept
    /// for comparison. It does not look at lag and can return stale data
    /// when a replica lags longer than the window.
    PrimaryAfterWrite(#[serde(with = "duration_ms")] Duration),
}

impl Default for Consistency {
    /// `ReadYourWrites` with a 100 ms wait and primary fallback.
    fn default() -> Self {
        Consistency::read_your_writes(Duration::from_millis(100))
    }
}

impl Consistency {
    /// `ReadYourWrites` with `max_wait` and primary fallback.
    pub const fn read_your_writes(max_wait: Duration) -> Self {
        Consistency::ReadYourWrites {
            max_wait,
            then: Fallback::Primary,
        }
    }

    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Consistency::Primary => "primary",
            Consistency::ReadYourWrites { .. } => "read_your_writes",
            Consistency::BoundedStaleness(_) => "bounded_staleness",
            Consistency::Eventual => "eventual",
            Consistency::PrimaryAfterWrite(_) => "primary_after_write",
        }
    }

    /// Whether this policy honours consistency tokens.
    pub fn uses_token(&self) -> bool {
        matches!(
            self,
            Consistency::ReadYourWrites { .. } | Consistency::BoundedStaleness(_)
        )
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
