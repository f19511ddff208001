//! [`Config::validate`]: the checks beyond what parsing enforces.

use std::collections::HashSet;
use std::time::Duration;

use super::error::invalid;
use super::routing::parse_consistency;
use super::users::check_scram_verifier;
use super::{AuthMethod, Config, ConfigError, MAX_DURATION, NodeRole, PasswordKind};

impl Config {
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
            if let Some(c) = &u.consistency {
                parse_consistency(c, &self.routing).map_err(|m| invalid(key("consistency"), m))?;
            }
        }
        // The console's users log in with their [[users]] credentials.
        for (list, users) in [
            ("proxy.admin_users", &self.proxy.admin_users),
            ("proxy.stats_users", &self.proxy.stats_users),
        ] {
            for (i, name) in users.iter().enumerate() {
                if !names.contains(name.as_str()) {
                    return Err(invalid(
                        format!("{list}[{i}]"),
                        format!(
                            "{name:?} is not a [[users]] name (console users log in with those credentials)"
                        ),
                    ));
                }
            }
        }
        Ok(())
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
