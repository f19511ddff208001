//! The settings that can change on reload: the configuration snapshot,
//! the read policy, users prepared for authentication and the client TLS
//! acceptor, built (and validated) from a [`Config`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lagrouter::Consistency;
use tokio_rustls::TlsAcceptor;

use super::error::ProxyError;
use crate::backend::PoolSettings;
use crate::config::{AuthMethod, Config, PasswordKind};
use crate::frontend::auth::ScramVerifier;

/// A configured user, prepared for authentication.
#[derive(Clone, Debug)]
pub struct UserEntry {
    /// Client user name.
    pub name: String,
    /// Authentication method.
    pub auth: AuthMethod,
    /// The configured password (plain text or md5 hash) for md5.
    pub password: String,
    /// SCRAM verifier for `scram-sha-256`.
    pub scram: Option<ScramVerifier>,
    /// Backend user.
    pub server_user: String,
    /// Backend password.
    pub server_password: Option<String>,
    /// The user's default read policy (`users[].consistency`), if set.
    pub consistency: Option<Consistency>,
}

/// Settings that can change on reload.
pub struct Settings {
    /// The configuration they come from.
    pub config: Config,
    /// The read policy.
    pub policy: Consistency,
    /// Users by name.
    pub users: HashMap<String, Arc<UserEntry>>,
    /// TLS for clients, when configured.
    pub tls: Option<TlsAcceptor>,
}

impl Settings {
    /// Validates `config` and prepares its users and TLS; `previous`
    /// lends SCRAM verifiers of unchanged users.
    pub fn build(config: Config, previous: Option<&Settings>) -> Result<Settings, ProxyError> {
        config.validate()?;
        let mut users = HashMap::new();
        for u in &config.users {
            // Reuse the verifier of an unchanged user (PBKDF2 is slow).
            let reuse = previous
                .and_then(|p| p.users.get(&u.name))
                .filter(|e| e.password == u.password && e.auth == u.auth)
                .and_then(|e| e.scram.clone());
            let scram = match (u.auth, u.password_kind()) {
                (AuthMethod::ScramSha256, PasswordKind::ScramVerifier) => Some(
                    ScramVerifier::parse(&u.password).map_err(|e| ProxyError::User {
                        user: u.name.clone(),
                        message: e.to_string(),
                    })?,
                ),
                (AuthMethod::ScramSha256, PasswordKind::Plain) => {
                    Some(reuse.unwrap_or_else(|| ScramVerifier::from_password(&u.password)))
                }
                (AuthMethod::ScramSha256, PasswordKind::Md5Hash) => {
                    return Err(ProxyError::User {
                        user: u.name.clone(),
                        message: "an md5 hash cannot be used with scram-sha-256".into(),
                    });
                }
                (AuthMethod::Md5, PasswordKind::ScramVerifier) => {
                    return Err(ProxyError::User {
                        user: u.name.clone(),
                        message: "a SCRAM verifier cannot be used with md5".into(),
                    });
                }
                _ => None,
            };
            users.insert(
                u.name.clone(),
                Arc::new(UserEntry {
                    name: u.name.clone(),
                    auth: u.auth,
                    password: u.password.clone(),
                    scram,
                    server_user: u.effective_server_user().to_string(),
                    server_password: u.effective_server_password().map(str::to_string),
                    consistency: u
                        .consistency
                        .as_deref()
                        .and_then(|c| crate::config::parse_consistency(c, &config.routing).ok()),
                }),
            );
        }
        let tls = match &config.tls {
            Some(t) => Some(TlsAcceptor::from(crate::frontend::tls::load_server_config(
                &t.cert, &t.key,
            )?)),
            None => None,
        };
        Ok(Settings {
            policy: config.routing.consistency(),
            users,
            tls,
            config,
        })
    }

    /// The pools' settings.
    pub fn pool_settings(&self) -> PoolSettings {
        let p = &self.config.pool;
        PoolSettings {
            size: p.size,
            node_sizes: self.config.nodes.iter().map(|n| n.pool_size).collect(),
            min_idle: p.min_idle,
            checkout_timeout: p.checkout_timeout,
            connect_timeout: p.connect_timeout,
            idle_timeout: p.server_idle_timeout,
            max_lifetime: Duration::ZERO,
        }
    }
}
