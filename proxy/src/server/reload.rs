//! Reloading the configuration of a running proxy (SIGHUP, the console's
//! `RELOAD`, or [`ProxyHandle::reload`]); the work is
//! [`Shared::reload`](super::Shared::reload).

use std::path::PathBuf;

use super::error::ProxyError;
use super::handle::ProxyHandle;
use crate::config::Config;

impl ProxyHandle {
    /// Applies a new configuration: routing policy and timings (except the
    /// monitor interval and probe timeout), users, pool sizes and timeouts,
    /// TLS files, client limits and console users. Nodes and listen
    /// addresses are kept as started.
    pub fn reload(&self, config: Config) -> Result<(), ProxyError> {
        self.shared.reload(config)
    }

    /// Re-reads the configuration file given to
    /// [`ProxyHandle::set_config_path`] and applies it (SIGHUP, `RELOAD`).
    pub fn reload_from_file(&self) -> Result<PathBuf, ProxyError> {
        self.shared.reload_from_file()
    }

    /// Tells the proxy which file its configuration came from, so that the
    /// admin console's `RELOAD` can read it again.
    pub fn set_config_path(&self, path: impl Into<PathBuf>) {
        *self.shared.config_path.lock().expect("config path") = Some(path.into());
    }

    /// Resolves when the admin console asked for a shutdown (`SHUTDOWN`);
    /// the caller then runs [`ProxyHandle::shutdown`].
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shared.shutdown_request.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}
