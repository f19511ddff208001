//! Graceful shutdown of a running proxy.

use std::sync::atomic::Ordering;

use tracing::{info, warn};

use super::handle::ProxyHandle;

impl ProxyHandle {
    /// Graceful shutdown: stops accepting, lets sessions finish their
    /// current transaction (idle ones are closed at once) for up to
    /// `proxy.shutdown_timeout`, then closes everything.
    pub async fn shutdown(mut self) {
        let timeout = self.shared.settings().config.proxy.shutdown_timeout;
        let _ = self.shutdown_tx.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let gone = self.shared.clients_gone.notified();
            if self.shared.clients.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, gone).await.is_err() {
                warn!(
                    clients = self.shared.clients.load(Ordering::SeqCst),
                    "shutdown timeout: closing remaining sessions"
                );
                break;
            }
        }
        let remaining: Vec<_> = self
            .shared
            .sessions
            .lock()
            .expect("sessions lock")
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in remaining {
            h.abort();
        }
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        self.shared.workers.stop();
        self.shared.pools.close_idle();
        info!("lagrouter-proxy stopped");
    }
}
