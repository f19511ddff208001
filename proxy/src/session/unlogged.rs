//! Reads of unlogged relations go to the primary (a hot standby refuses
//! them): the database's list comes from the shared catalog cache
//! ([`crate::server::catalog`]), loaded from the primary only when a DDL
//! made it stale, so an ordinary read costs a lookup, not a query.
//! (Temporary relations need nothing here: creating one pins the session
//! to the primary.)

use std::sync::Arc;

use tracing::{debug, warn};

use crate::server::catalog::{UNLOGGED_SQL, Unlogged};
use crate::wire::ClientMessage;

use super::Session;

impl Session {
    /// Whether the read unit `batch` names an unlogged relation.
    pub(super) async fn reads_unlogged(&mut self, batch: &[ClientMessage]) -> bool {
        let unlogged = match self.shared.catalog.unlogged(&self.status.database) {
            Some(u) => u,
            None => self.load_unlogged().await,
        };
        if unlogged.names.is_empty() {
            return false;
        }
        batch.iter().any(|m| match m {
            ClientMessage::Query { sql, .. } | ClientMessage::Parse { sql, .. } => {
                unlogged.named_in(sql)
            }
            ClientMessage::Bind { stmt, .. } => self
                .stmt_info(stmt)
                .is_some_and(|i| unlogged.named_in(&i.sql)),
            _ => false,
        })
    }

    /// Loads the database's unlogged relations from the primary. When the
    /// primary cannot answer, the list is taken as empty until it is due
    /// again (the read engine still moves a refused read to the primary).
    async fn load_unlogged(&mut self) -> Arc<Unlogged> {
        let catalog = &self.shared.catalog;
        let epoch = catalog.epoch();
        let mut names = Vec::new();
        if let Some(primary) = self.topology().primary {
            match self.checkout(primary).await {
                Ok(mut conn) => match conn.simple_query(UNLOGGED_SQL).await {
                    Ok(rows) => {
                        names = rows
                            .into_iter()
                            .filter_map(|r| r.into_iter().next().flatten())
                            .map(|n| n.to_lowercase())
                            .collect();
                        conn.release();
                    }
                    Err(e) => warn!(error = %e, "cannot list the unlogged relations"),
                },
                Err(e) => warn!(error = %e, "cannot list the unlogged relations"),
            }
        }
        debug!(database = %self.status.database, ?names, "unlogged relations");
        self.shared
            .catalog
            .set_unlogged(&self.status.database, epoch, names)
    }
}
