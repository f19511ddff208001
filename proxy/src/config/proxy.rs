//! `[proxy]` (listeners and client limits) and `[tls]` (the certificate
//! offered to clients).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::duration_str;

/// `[proxy]`: listeners and client limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address the PostgreSQL protocol listener binds. Default
    /// `"127.0.0.1:6432"`.
    pub listen: SocketAddr,
    /// Address of the HTTP admin endpoint (`/metrics`, `/health`,
    /// `/status`). Default `"127.0.0.1:9930"`.
    pub admin_listen: SocketAddr,
    /// Most simultaneous client connections, counting those still logging
    /// in; further clients are refused with SQLSTATE 53300. Default
    /// `10000`.
    pub max_client_connections: usize,
    /// How long a client may take to finish startup and authentication
    /// before it is disconnected (08006). Default `"60s"`.
    #[serde(with = "duration_str")]
    pub client_login_timeout: Duration,
    /// How long a graceful shutdown (SIGTERM/SIGINT) waits for clients to
    /// finish before closing them. Default `"30s"`.
    #[serde(with = "duration_str")]
    pub shutdown_timeout: Duration,
    /// Close client connections idle (between queries, outside a
    /// transaction) for this long. `"0s"` (the default) disables it.
    #[serde(with = "duration_str")]
    pub client_idle_timeout: Duration,
    /// Close client connections idle inside a transaction (holding a
    /// server connection) for this long, with SQLSTATE 25P03; the server
    /// rolls the transaction back. `"0s"` (the default) disables it, as
    /// PgBouncer's `idle_transaction_timeout`.
    #[serde(with = "duration_str")]
    pub idle_transaction_timeout: Duration,
    /// Close a client connection when replies for it cannot be written for
    /// this long (the client stopped reading). Its server connection is
    /// discarded, so a stalled client holds one for at most this long.
    /// Default `"30s"`; `"0s"` disables it.
    #[serde(with = "duration_str")]
    pub client_write_timeout: Duration,
    /// Users (names from `[[users]]`) who may use the admin console: connect
    /// to the database `lagrouter` (or `pgbouncer`) and run every console
    /// command. Reloadable. Default: none (the console is closed).
    pub admin_users: Vec<String>,
    /// Users who may connect to the admin console and run its `SHOW`
    /// commands only. Reloadable. Default: none.
    pub stats_users: Vec<String>,
    /// Threads that run client sessions, each with its own event loop; a
    /// session and the server connections it uses stay on one thread. `0`
    /// (the default): half the CPUs, at least one, which leaves room for
    /// servers or clients on the same host; on a host of its own, set it
    /// to the number of cores. Needs a restart.
    pub workers: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9930)),
            max_client_connections: 10_000,
            client_login_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            client_idle_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            client_write_timeout: Duration::from_secs(30),
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            workers: 0,
        }
    }
}

/// `[tls]`: the proxy's server certificate for client connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain (leaf first). Required. A
    /// relative path is resolved against the configuration file's directory
    /// by [`Config::load`](super::Config::load).
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1). Required.
    /// Resolved like `cert`.
    pub key: PathBuf,
}
