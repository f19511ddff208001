//! `[routing]`: the consistency policy for reads.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::duration_str;

/// The routing policy for reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// `"read-your-writes"` (default): a read carrying a token (from
    /// `SET lagrouter.min_token`, a comment hint, or the session's own
    /// writes) goes only to a replica that has replayed up to it, waiting up
    /// to `max_wait`, then `then`. Reads without a token use any healthy
    /// replica.
    #[default]
    ReadYourWrites,
    /// `"bounded-staleness"`: a replica at most `max_lag` behind, else the
    /// primary (tokens are honoured too).
    BoundedStaleness,
    /// `"eventual"`: any healthy replica, however far behind.
    Eventual,
    /// `"primary"`: everything goes to the primary.
    Primary,
    /// `"primary-after-write"`: the primary for `primary_window` after the
    /// session's last write, replicas otherwise (a time heuristic, kept for
    /// comparison).
    PrimaryAfterWrite,
}

/// `[routing]`: how reads are routed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// One of `"read-your-writes"`, `"bounded-staleness"`, `"eventual"`,
    /// `"primary"`, `"primary-after-write"`. Default `"read-your-writes"`.
    pub policy: Policy,
    /// How long a token-gated read waits for a replica to catch up before
    /// applying `then`. Default `"100ms"`.
    #[serde(with = "duration_str")]
    pub max_wait: Duration,
    /// What a token-gated read does when no replica caught up within
    /// `max_wait`: `"primary"` (serve it there, the default) or `"error"`
    /// (fail the query).
    pub then: lagrouter::Fallback,
    /// For `bounded-staleness`: the most a replica may lag. Default `"1s"`.
    #[serde(with = "duration_str")]
    pub max_lag: Duration,
    /// For `primary-after-write`: how long after a write the session reads
    /// from the primary. Default `"2s"`.
    #[serde(with = "duration_str")]
    pub primary_window: Duration,
    /// How often replica positions and lag are polled. Default `"100ms"`.
    #[serde(with = "duration_str")]
    pub monitor_interval: Duration,
    /// How long one probe of a node (connection included) may take before
    /// the node is ejected as unreachable; it bounds how long a hung node
    /// keeps receiving reads. Default `"2s"`. Needs a restart to change.
    #[serde(with = "duration_str")]
    pub probe_timeout: Duration,
    /// Retry a read on the primary when a replica rejects it as a write
    /// (SQLSTATE 25006) or fails before returning rows. Default `true`.
    pub retry_on_replica_error: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: Policy::ReadYourWrites,
            max_wait: Duration::from_millis(100),
            then: lagrouter::Fallback::Primary,
            max_lag: Duration::from_secs(1),
            primary_window: Duration::from_secs(2),
            monitor_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_secs(2),
            retry_on_replica_error: true,
        }
    }
}

impl RoutingConfig {
    /// The policy as the routing library's [`lagrouter::Consistency`].
    pub fn consistency(&self) -> lagrouter::Consistency {
        use lagrouter::Consistency as C;
        match self.policy {
            Policy::ReadYourWrites => C::ReadYourWrites {
                max_wait: self.max_wait,
                then: self.then,
            },
            Policy::BoundedStaleness => C::BoundedStaleness(self.max_lag),
            Policy::Eventual => C::Eventual,
            Policy::Primary => C::Primary,
            Policy::PrimaryAfterWrite => C::PrimaryAfterWrite(self.primary_window),
        }
    }
}
