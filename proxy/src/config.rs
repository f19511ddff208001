//! The proxy's TOML configuration.
//!
//! Every section and key is documented below with its default; unknown keys
//! anywhere are errors (a misspelt key must not silently fall back to a
//! default). Durations are strings such as `"250ms"`, `"2s"`, `"10m"` or
//! `"1h30m"` (units `ns`, `us`, `ms`, `s`, `m`, `h`, `d`; `"0"` is zero).
//!
//! A complete, commented example is [`EXAMPLE_TOML`];
//! [`Config::from_toml_str`] parses and validates a configuration and
//! [`Config::load`] reads one from a file.
#![warn(missing_docs)]

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A complete, commented example configuration showing every key with its
/// default (it parses and validates as is).
pub const EXAMPLE_TOML: &str = r#"# lagrouter-proxy configuration

[proxy]
listen = "127.0.0.1:6432"          # PostgreSQL protocol listener
admin_listen = "127.0.0.1:9930"    # HTTP: /metrics /health /status
max_client_connections = 10000     # client sockets, logged in or not
client_login_timeout = "60s"       # startup and authentication must finish within this
shutdown_timeout = "30s"           # graceful shutdown grace period
client_idle_timeout = "0s"         # 0 = never close idle clients
idle_transaction_timeout = "0s"    # 0 = never close clients idle inside a transaction
client_write_timeout = "30s"       # close a client that reads nothing for this long; 0 = never

[routing]
policy = "read-your-writes"        # read-your-writes | bounded-staleness | eventual | primary | primary-after-write
max_wait = "100ms"                 # how long a token-gated read waits for a replica
then = "primary"                   # after max_wait: primary | error
max_lag = "1s"                     # bounded-staleness only
primary_window = "2s"              # primary-after-write only
monitor_interval = "100ms"         # replica lag polling period
probe_timeout = "2s"               # a node that does not answer a probe this long is ejected
retry_on_replica_error = true      # retry reads on the primary after SQLSTATE 25006

# Optional: lets clients use TLS (sslmode=require).
# [tls]
# cert = "server.crt"              # relative paths: relative to this file
# key = "server.key"

[[nodes]]                          # exactly one primary
name = "primary"
host = "127.0.0.1"
port = 5432
role = "primary"

[[nodes]]                          # any number of replicas
name = "replica1"
host = "127.0.0.1"
port = 5433
role = "replica"
# pool_size = 40                   # overrides pool.size for this node

[pool]
size = 20                          # per node per (user, database)
min_idle = 0                       # idle connections kept open per pool, opened ahead of demand
checkout_timeout = "5s"
connect_timeout = "5s"
server_idle_timeout = "10m"        # close connections idle this long (down to min_idle); 0 = never

[[users]]
name = "app"
password = "secret"                # plain text, SCRAM-SHA-256$... verifier or md5... hash
auth = "scram-sha-256"             # scram-sha-256 | md5 | trust
# server_user = "app"              # backend credentials; default: name / password
# server_password = "secret"
"#;

/// Longest accepted duration anywhere in the configuration (one year).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// An error loading or validating the configuration. Messages name the
/// offending key; parse errors keep TOML's line and column.
///
/// `Debug` prints the same text as `Display` (TOML's own `Debug` would dump
/// the whole file, passwords included).
#[derive(thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The text is not valid TOML, has an unknown key, or a value of the
    /// wrong type or format. The message includes the line and column.
    #[error("{}{source}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Parse {
        /// The file, when loaded from one.
        path: Option<PathBuf>,
        /// TOML's error (with line, column and the offending key).
        source: toml::de::Error,
    },
    /// No `[[nodes]]` entry has `role = "primary"`.
    #[error("no node has role = \"primary\" (exactly one [[nodes]] entry must be the primary)")]
    NoPrimary,
    /// More than one node has `role = "primary"`.
    #[error("more than one node has role = \"primary\": {}", names.join(", "))]
    MultiplePrimaries {
        /// The names of the primaries.
        names: Vec<String>,
    },
    /// Two entries of a list share a name.
    #[error("duplicate name {name:?} in [[{section}]]")]
    DuplicateName {
        /// `nodes` or `users`.
        section: &'static str,
        /// The repeated name.
        name: String,
    },
    /// A TLS certificate or key file does not exist or cannot be read.
    #[error("`{key}`: cannot read {}: {source}", path.display())]
    TlsFile {
        /// `tls.cert` or `tls.key`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// The key, e.g. `routing.monitor_interval` or `nodes[1].port`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[proxy]`: listeners and client limits. Optional; all keys default.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// `[routing]`: the consistency policy. Optional; all keys default.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `[tls]`: optional. When present, clients may upgrade to TLS
    /// (`SSLRequest`); when absent, the proxy refuses SSL and clients fall
    /// back to plain connections (or fail, with `sslmode=require`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// `[[nodes]]`: the PostgreSQL servers. Exactly one must have
    /// `role = "primary"`; any number of replicas.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// `[pool]`: backend connection pools. Optional; all keys default.
    #[serde(default)]
    pub pool: PoolConfig,
    /// `[[users]]`: who may connect, and with which backend credentials. At
    /// least one.
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

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
        }
    }
}

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

/// `[tls]`: the proxy's server certificate for client connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain (leaf first). Required. A
    /// relative path is resolved against the configuration file's directory
    /// by [`Config::load`].
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1). Required.
    /// Resolved like `cert`.
    pub key: PathBuf,
}

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

/// How the proxy authenticates a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// `"scram-sha-256"` (default): SCRAM-SHA-256; `password` is plain text
    /// or a `SCRAM-SHA-256$…` verifier.
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// `"md5"`: MD5 challenge; `password` is plain text or an `md5…` hash of
    /// password and user name.
    Md5,
    /// `"trust"`: no password asked.
    Trust,
}

/// What form a user's `password` is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordKind {
    /// Plain text.
    Plain,
    /// A SCRAM verifier, `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    ScramVerifier,
    /// An MD5 hash, `md5` followed by 32 hex digits (of password + user
    /// name).
    Md5Hash,
}

/// `[[users]]`: a user clients may log in as.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user name clients log in with. Required, unique.
    pub name: String,
    /// The client password: plain text, a `SCRAM-SHA-256$…` verifier (as in
    /// `pg_authid.rolpassword`) or an `md5…` hash. Required unless `auth =
    /// "trust"`.
    #[serde(default)]
    pub password: String,
    /// `"scram-sha-256"` (default), `"md5"` or `"trust"`.
    #[serde(default)]
    pub auth: AuthMethod,
    /// The user the proxy logs in to PostgreSQL as. Default: `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_user: Option<String>,
    /// The password the proxy uses with PostgreSQL. Default: `password` when
    /// that is plain text (required otherwise, unless the servers trust the
    /// proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_password: Option<String>,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .field("auth", &self.auth)
            .field("server_user", &self.server_user)
            .field(
                "server_password",
                &self.server_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl UserConfig {
    /// What form `password` is in.
    pub fn password_kind(&self) -> PasswordKind {
        password_kind(&self.password)
    }

    /// The backend user name: `server_user`, else `name`.
    pub fn effective_server_user(&self) -> &str {
        self.server_user.as_deref().unwrap_or(&self.name)
    }

    /// The backend password: `server_password`, else `password` when it is
    /// plain text and not empty, else `None`.
    pub fn effective_server_password(&self) -> Option<&str> {
        match &self.server_password {
            Some(p) => Some(p),
            None if self.password_kind() == PasswordKind::Plain && !self.password.is_empty() => {
                Some(&self.password)
            }
            None => None,
        }
    }
}

fn password_kind(p: &str) -> PasswordKind {
    if p.starts_with("SCRAM-SHA-256$") {
        PasswordKind::ScramVerifier
    } else if p.len() == 35 && p.starts_with("md5") && p[3..].bytes().all(|b| b.is_ascii_hexdigit())
    {
        PasswordKind::Md5Hash
    } else {
        PasswordKind::Plain
    }
}

impl Config {
    /// Parses and validates a configuration (relative TLS paths are taken
    /// relative to the current directory).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config = Self::parse(text, None)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file. Relative TLS paths
    /// are resolved against the file's directory.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, Some(path))?;
        if let (Some(tls), Some(dir)) = (&mut config.tls, path.parent()) {
            for p in [&mut tls.cert, &mut tls.key] {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.map(Path::to_owned),
            source,
        })
    }

    /// Checks the configuration: exactly one primary, unique non-empty
    /// names, sane sizes and durations, TLS files readable when set.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // proxy
        if self.proxy.max_client_connections == 0 {
            return Err(invalid(
                "proxy.max_client_connections",
                "must be at least 1",
            ));
        }
        if self.proxy.admin_listen == self.proxy.listen && self.proxy.listen.port() != 0 {
            return Err(invalid(
                "proxy.admin_listen",
                format!("must differ from proxy.listen ({})", self.proxy.listen),
            ));
        }
        check_duration("proxy.shutdown_timeout", self.proxy.shutdown_timeout, false)?;
        check_duration(
            "proxy.client_login_timeout",
            self.proxy.client_login_timeout,
            true,
        )?;
        check_duration(
            "proxy.client_idle_timeout",
            self.proxy.client_idle_timeout,
            false,
        )?;
        check_duration(
            "proxy.idle_transaction_timeout",
            self.proxy.idle_transaction_timeout,
            false,
        )?;
        check_duration(
            "proxy.client_write_timeout",
            self.proxy.client_write_timeout,
            false,
        )?;

        // routing
        let r = &self.routing;
        check_duration("routing.max_wait", r.max_wait, false)?;
        check_duration("routing.max_lag", r.max_lag, false)?;
        check_duration("routing.primary_window", r.primary_window, false)?;
        check_duration("routing.monitor_interval", r.monitor_interval, true)?;
        check_duration("routing.probe_timeout", r.probe_timeout, true)?;
        if r.monitor_interval > Duration::from_secs(3600) {
            return Err(invalid(
                "routing.monitor_interval",
                "must be at most 1h (lag would be observed too rarely)",
            ));
        }

        // tls
        if let Some(tls) = &self.tls {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if path.as_os_str().is_empty() {
                    return Err(invalid(key, "must not be empty"));
                }
                std::fs::File::open(path).map_err(|source| ConfigError::TlsFile {
                    key,
                    path: path.clone(),
                    source,
                })?;
            }
        }

        // nodes
        if self.nodes.is_empty() {
            return Err(ConfigError::NoPrimary);
        }
        let mut names = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.name.trim().is_empty() {
                return Err(invalid(format!("nodes[{i}].name"), "must not be empty"));
            }
            if !names.insert(n.name.as_str()) {
                return Err(ConfigError::DuplicateName {
                    section: "nodes",
                    name: n.name.clone(),
                });
            }
            if n.host.trim().is_empty() {
                return Err(invalid(format!("nodes[{i}].host"), "must not be empty"));
            }
            if n.port == 0 {
                return Err(invalid(format!("nodes[{i}].port"), "must not be 0"));
            }
            if n.pool_size == Some(0) {
                return Err(invalid(
                    format!("nodes[{i}].pool_size"),
                    "must be at least 1",
                ));
            }
        }
        let primaries: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.role == NodeRole::Primary)
            .map(|n| n.name.clone())
            .collect();
        match primaries.len() {
            0 => return Err(ConfigError::NoPrimary),
            1 => {}
            _ => return Err(ConfigError::MultiplePrimaries { names: primaries }),
        }

        // pool
        let p = &self.pool;
        if p.size == 0 {
            return Err(invalid("pool.size", "must be at least 1"));
        }
        if p.min_idle > p.size {
            return Err(invalid(
                "pool.min_idle",
                format!("must not exceed pool.size ({})", p.size),
            ));
        }
        check_duration("pool.checkout_timeout", p.checkout_timeout, true)?;
        check_duration("pool.connect_timeout", p.connect_timeout, true)?;
        check_duration("pool.server_idle_timeout", p.server_idle_timeout, false)?;

        // users
        if self.users.is_empty() {
            return Err(invalid("users", "at least one [[users]] entry is required"));
        }
        let mut names = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() {
                return Err(invalid(format!("users[{i}].name"), "must not be empty"));
            }
            if !names.insert(u.name.as_str()) {
                return Err(ConfigError::DuplicateName {
                    section: "users",
                    name: u.name.clone(),
                });
            }
            let key = |k: &str| format!("users[{i}].{k}");
            match (u.auth, u.password_kind()) {
                (AuthMethod::Trust, _) => {}
                (_, _) if u.password.is_empty() => {
                    return Err(invalid(key("password"), "required unless auth = \"trust\""));
                }
                (AuthMethod::ScramSha256, PasswordKind::Md5Hash) => {
                    return Err(invalid(
                        key("password"),
                        "an md5 hash cannot verify SCRAM-SHA-256; use auth = \"md5\" or a plain password / SCRAM verifier",
                    ));
                }
                (AuthMethod::Md5, PasswordKind::ScramVerifier) => {
                    return Err(invalid(
                        key("password"),
                        "a SCRAM verifier cannot verify md5; use auth = \"scram-sha-256\" or a plain password / md5 hash",
                    ));
                }
                (AuthMethod::ScramSha256, PasswordKind::ScramVerifier) => {
                    check_scram_verifier(&u.password).map_err(|m| invalid(key("password"), m))?;
                }
                _ => {}
            }
            if u.server_user.as_deref() == Some("") {
                return Err(invalid(key("server_user"), "must not be empty"));
            }
        }
        Ok(())
    }

    /// The primary node (the first with `role = "primary"`).
    pub fn primary(&self) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.role == NodeRole::Primary)
    }

    /// The replica nodes, in configuration order.
    pub fn replicas(&self) -> impl Iterator<Item = &NodeConfig> {
        self.nodes.iter().filter(|n| n.role == NodeRole::Replica)
    }

    /// The user entry for a client user name.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Serialises the configuration back to TOML.
    pub fn to_toml_string(&self) -> String {
        // Every field type serialises to TOML; a failure would be a bug.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialise configuration: {e}\n"))
    }

    /// The configuration of the embedded demo mode: the given primary and
    /// replicas (named `primary`, `replica1`, `replica2`, …), one user
    /// authenticated with SCRAM-SHA-256 whose credentials are also used
    /// with the servers, and defaults everywhere else.
    pub fn demo(
        primary: (String, u16),
        replicas: Vec<(String, u16)>,
        user: &str,
        password: &str,
    ) -> Config {
        let mut nodes = vec![NodeConfig {
            name: "primary".to_owned(),
            host: primary.0,
            port: primary.1,
            role: NodeRole::Primary,
            pool_size: None,
        }];
        nodes.extend(
            replicas
                .into_iter()
                .enumerate()
                .map(|(i, (host, port))| NodeConfig {
                    name: format!("replica{}", i + 1),
                    host,
                    port,
                    role: NodeRole::Replica,
                    pool_size: None,
                }),
        );
        Config {
            proxy: ProxyConfig::default(),
            routing: RoutingConfig::default(),
            tls: None,
            nodes,
            pool: PoolConfig::default(),
            users: vec![UserConfig {
                name: user.to_owned(),
                password: password.to_owned(),
                auth: AuthMethod::ScramSha256,
                server_user: None,
                server_password: None,
            }],
        }
    }
}

fn check_duration(key: &str, d: Duration, nonzero: bool) -> Result<(), ConfigError> {
    if nonzero && d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    if d > MAX_DURATION {
        return Err(invalid(key, "must be at most 365d"));
    }
    Ok(())
}

/// Checks the shape `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
fn check_scram_verifier(v: &str) -> Result<(), String> {
    let bad = || {
        "malformed SCRAM verifier: expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
            .to_owned()
    };
    let rest = v.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
    let (iter_salt, keys) = rest.split_once('$').ok_or_else(bad)?;
    let (iters, salt) = iter_salt.split_once(':').ok_or_else(bad)?;
    let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
    let iters: u32 = iters.parse().map_err(|_| bad())?;
    let b64 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    };
    if iters == 0 || !b64(salt) || !b64(stored) || !b64(server) {
        return Err(bad());
    }
    Ok(())
}

/// Parses a duration such as `"250ms"`, `"2s"`, `"1h30m"`, `"1.5s"` or
/// `"0"`. Units: `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let err = || {
        format!(
            "invalid duration {text:?}: expected a number with a unit, e.g. \"250ms\", \"2s\", \"10m\", \"1h30m\""
        )
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err());
    }
    let mut total: u128 = 0; // nanoseconds
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let num = &rest[..num_end];
        rest = rest[num_end..].trim_start();
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = rest[unit_end..].trim_start();
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" | "sec" | "secs" => 1_000_000_000,
            "m" | "min" | "mins" => 60_000_000_000,
            "h" | "hr" | "hrs" => 3_600_000_000_000,
            "d" | "day" | "days" => 86_400_000_000_000,
            _ => return Err(err()),
        };
        let nanos = match num.split_once('.') {
            None => num.parse::<u128>().map_err(|_| err())?.checked_mul(scale),
            Some((int, frac)) => {
                if frac.is_empty() || frac.len() > 9 || frac.contains('.') {
                    return Err(err());
                }
                let int: u128 = if int.is_empty() {
                    0
                } else {
                    int.parse().map_err(|_| err())?
                };
                let frac_val: u128 = frac.parse().map_err(|_| err())?;
                let frac_nanos = frac_val * scale / 10u128.pow(frac.len() as u32);
                int.checked_mul(scale)
                    .and_then(|v| v.checked_add(frac_nanos))
            }
        };
        total = nanos
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
    }
    let secs = u64::try_from(total / 1_000_000_000)
        .map_err(|_| format!("duration {text:?} is too large"))?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Formats a duration the way [`parse_duration`] reads it, choosing the
/// largest unit that represents it exactly (`"250ms"`, `"2s"`, `"10m"`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    for (unit, scale) in [
        ("d", 86_400_000_000_000u128),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if nanos % scale == 0 {
            return format!("{}{unit}", nanos / scale);
        }
    }
    format!("{nanos}ns")
}

/// Serde adapter for durations written as strings (`"250ms"`).
mod duration_str {
    use super::{format_duration, parse_duration};
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\", \"2s\" or \"10m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                parse_duration(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let ok = |s: &str, d: Duration| assert_eq!(parse_duration(s), Ok(d), "{s}");
        ok("0", Duration::ZERO);
        ok("0s", Duration::ZERO);
        ok("250ms", Duration::from_millis(250));
        ok("2s", Duration::from_secs(2));
        ok(" 10m ", Duration::from_secs(600));
        ok("1h30m", Duration::from_secs(5400));
        ok("1h 30m 5s", Duration::from_secs(5405));
        ok("1.5s", Duration::from_millis(1500));
        ok(".5s", Duration::from_millis(500));
        ok("100us", Duration::from_micros(100));
        ok("100µs", Duration::from_micros(100));
        ok("7ns", Duration::from_nanos(7));
        ok("2d", Duration::from_secs(172_800));
        for bad in [
            "",
            "s",
            "5",
            "5x",
            "ms5",
            "-1s",
            "1..5s",
            "1.s",
            "1e3ms",
            "five",
            "5 s s",
            "1.1234567891s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
        assert!(
            parse_duration("99999999999999999999999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_duration("999999999999999999999d").is_err());
    }

    #[test]
    fn durations_format_round_trip() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(2),
            Duration::from_secs(600),
            Duration::from_secs(86_400),
            Duration::from_micros(3),
            Duration::from_nanos(1_000_000_007),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_millis(100)), "100ms");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
    }

    #[test]
    fn password_kinds() {
        assert_eq!(password_kind("secret"), PasswordKind::Plain);
        assert_eq!(
            password_kind("md5e5e28d0bbdf7ecf1f7c4e4e1d8a3d6f3"),
            PasswordKind::Md5Hash
        );
        assert_eq!(password_kind("md5short"), PasswordKind::Plain);
        assert_eq!(
            password_kind("SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"),
            PasswordKind::ScramVerifier
        );
        assert!(check_scram_verifier("SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy").is_ok());
        assert!(check_scram_verifier("SCRAM-SHA-256$x:c2FsdA==$a:b").is_err());
        assert!(check_scram_verifier("SCRAM-SHA-256$4096:$a:b").is_err());
        assert!(check_scram_verifier("SCRAM-SHA-256$4096:salt").is_err());
    }

    #[test]
    fn user_debug_redacts_passwords() {
        let u = UserConfig {
            name: "app".into(),
            password: "hunter2".into(),
            auth: AuthMethod::ScramSha256,
            server_user: None,
            server_password: Some("hunter3".into()),
        };
        let s = format!("{u:?}");
        assert!(!s.contains("hunter"), "{s}");
    }
}
