//! Reloading the configuration of a running proxy.

use std::sync::Arc;

use tracing::{info, warn};

use super::error::ProxyError;
use super::handle::ProxyHandle;
use super::settings::Settings;
use crate::config::Config;

impl ProxyHandle {
    /// Applies a new configuration: routing policy and timings (except the
    /// monitor interval and probe timeout), users, pool sizes and timeouts,
    /// TLS files and client limits. Nodes and listen addresses are kept as
    /// started.
    pub fn reload(&self, config: Config) -> Result<(), ProxyError> {
        let old = self.shared.settings();
        let mut config = config;
        if config.nodes != old.config.nodes {
            warn!("reload: [[nodes]] changes need a restart and are ignored");
            config.nodes = old.config.nodes.clone();
        }
        if config.proxy.listen != old.config.proxy.listen
            || config.proxy.admin_listen != old.config.proxy.admin_listen
        {
            warn!("reload: listen address changes need a restart and are ignored");
            config.proxy.listen = old.config.proxy.listen;
            config.proxy.admin_listen = old.config.proxy.admin_listen;
        }
        let settings = Settings::build(config, Some(&old))?;
        self.shared.pools.reconfigure(settings.pool_settings());
        *self.shared.settings.write().expect("settings lock") = Arc::new(settings);
        info!("configuration reloaded");
        Ok(())
    }
}
