//! `[[nodes]]`: the PostgreSQL servers and their roles.

use serde::{Deserialize, Serialize};

use super::pool::PoolConfig;

/// A node's configured role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    /// `"primary"`: takes writes.
    Primary,
    /// `"replica"`: a hot standby serving reads.
    Replica,
}

impl From<NodeRole> for lagrouter::Role {
    fn from(r: NodeRole) -> Self {
        match r {
            NodeRole::Primary => lagrouter::Role::Primary,
            NodeRole::Replica => lagrouter::Role::Replica,
        }
    }
}

/// `[[nodes]]`: one PostgreSQL server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique name, used in metrics labels, logs and `/status`. Required.
    pub name: String,
    /// Host name or IP address. Required.
    pub host: String,
    /// TCP port. Default `5432`.
    #[serde(default = "default_port")]
    pub port: u16,
    /// `"primary"` or `"replica"`. Required.
    pub role: NodeRole,
    /// Overrides `pool.size` for this node. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
}

fn default_port() -> u16 {
    5432
}

impl NodeConfig {
    /// The pool size for this node: `pool_size`, else `pool.size`.
    pub fn effective_pool_size(&self, pool: &PoolConfig) -> usize {
        self.pool_size.unwrap_or(pool.size)
    }
}
