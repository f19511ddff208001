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

mod duration;
mod error;
mod example;
mod nodes;
mod pool;
mod proxy;
mod routing;
mod users;
mod validate;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use duration::{MAX_DURATION, format_duration, parse_duration};
pub use error::ConfigError;
pub use example::EXAMPLE_TOML;
pub use nodes::{NodeConfig, NodeRole};
pub use pool::PoolConfig;
pub use proxy::{ProxyConfig, TlsConfig};
pub use routing::{Policy, RoutingConfig, Transactions, format_consistency, parse_consistency};
pub use users::{AuthMethod, PasswordKind, UserConfig};

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
    /// with the servers and who may use the admin console, and defaults
    /// everywhere else.
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
            proxy: ProxyConfig {
                admin_users: vec![user.to_owned()],
                ..ProxyConfig::default()
            },
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
                consistency: None,
            }],
        }
    }
}
