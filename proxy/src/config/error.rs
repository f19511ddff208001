//! [`ConfigError`]: what can go wrong loading or validating a
//! configuration.

use std::fmt;
use std::path::PathBuf;

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

pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}
