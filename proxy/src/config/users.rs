//! `[[users]]`: who may connect, how they authenticate and which backend
//! credentials the proxy uses for them.

use std::fmt;

use serde::{Deserialize, Serialize};

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
    /// This user's default read policy, as `SET lagrouter.consistency`
    /// takes it (e.g. `"bounded-staleness 1s"`). Default: `routing.policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
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
            .field("consistency", &self.consistency)
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

/// Checks the shape `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
pub(super) fn check_scram_verifier(v: &str) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            consistency: None,
        };
        let s = format!("{u:?}");
        assert!(!s.contains("hunter"), "{s}");
    }
}
