//! `[pool]`: backend connection pools.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::duration_str;

/// `[pool]`: backend connection pools (one per node per user and
/// database).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most backend connections per node per (user, database). Default
    /// `20`.
    pub size: usize,
    /// Idle connections kept open per pool. Default `0`.
    pub min_idle: usize,
    /// How long a query waits for a free backend connection before failing
    /// with SQLSTATE 53300. Default `"5s"`.
    #[serde(with = "duration_str")]
    pub checkout_timeout: Duration,
    /// Timeout for opening (and authenticating) a backend connection.
    /// Default `"5s"`.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// Close backend connections idle this long (above `min_idle`). `"0s"`
    /// disables it. Default `"10m"`.
    #[serde(with = "duration_str")]
    pub server_idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 20,
            min_idle: 0,
            checkout_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            server_idle_timeout: Duration::from_secs(600),
        }
    }
}
