//! Why the proxy could not start or reload.

use std::net::SocketAddr;

/// Why the proxy could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::frontend::tls::TlsError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A user's stored password cannot be used with its method.
    #[error("user {user}: {message}")]
    User {
        /// The user.
        user: String,
        /// What is wrong.
        message: String,
    },
    /// The worker threads could not be started.
    #[error("cannot start the worker threads: {0}")]
    Workers(#[source] std::io::Error),
    /// `RELOAD` without a configuration file (demo mode).
    #[error("the proxy was started without a configuration file; there is nothing to reload")]
    NoConfigFile,
}
