//! [`ProxyHandle`]: a running proxy, its addresses and state. Reload and
//! shutdown are in [`super::reload`] and [`super::shutdown`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::shared::Shared;
use crate::config::Config;

/// A running proxy.
pub struct ProxyHandle {
    /// The state shared with the sessions.
    pub(super) shared: Arc<Shared>,
    /// The PostgreSQL protocol listener's address.
    pub(super) local_addr: SocketAddr,
    /// The admin endpoint's address.
    pub(super) admin_addr: SocketAddr,
    /// Set to `true` to begin shutdown.
    pub(super) shutdown_tx: watch::Sender<bool>,
    /// The listener, admin, gauge and pool maintenance tasks.
    pub(super) tasks: Vec<JoinHandle<()>>,
}

/// Dropping the handle without [`ProxyHandle::shutdown`] ends the worker
/// threads, and the sessions on them, at once.
impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.shared.workers.stop();
    }
}

impl ProxyHandle {
    /// The PostgreSQL protocol listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin endpoint's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The latest topology snapshot.
    pub fn topology(&self) -> Arc<lagrouter::Topology> {
        self.shared.monitor.snapshot()
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.shared.settings().config.clone()
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        self.shared.status_json()
    }

    /// Client sessions currently open.
    pub fn clients(&self) -> usize {
        self.shared.clients.load(Ordering::SeqCst)
    }
}
