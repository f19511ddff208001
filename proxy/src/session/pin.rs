//! Pinning: session-bound state (temporary objects, `LISTEN`, session
//! advisory locks, `WITH HOLD` cursors, SQL `PREPARE`, settings the proxy
//! cannot replay) ties the client to its server connection, in either
//! protocol and inside transactions too. After a statement that may have
//! released such state (`UNLISTEN`, `CLOSE`, `pg_advisory_unlock*`,
//! `DROP`, `DISCARD`, `DEALLOCATE`, `RESET`), the server is asked once, at
//! the next idle moment, whether any is left; if none is, the session goes
//! back to transaction pooling.

use postgres_protocol::message::frontend;
use tracing::{debug, info};

use crate::classify::{PinReason, StatementKind, may_release_session_state};
use crate::metrics as m;
use crate::wire;

use super::{Flow, Pooling, Session};

/// Counts what session-bound state the server connection still has.
const SESSION_STATE_SQL: &str = "SELECT \
    (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) \
  + (SELECT count(*) FROM pg_catalog.pg_listening_channels()) \
  + (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable) \
  + (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
  + (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema())";

/// What keeps a pinned session pinned, besides what the server reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Sticky {
    /// Only server-side objects: the session unpins when they are gone.
    #[default]
    No,
    /// A setting the proxy cannot replay (`set_config(…, false)`, an
    /// unsupported `SET` form): pinned until `RESET ALL` / `DISCARD ALL`.
    Settings,
}

impl Session {
    /// Pins the session to its held connection for `reason` (a statement
    /// that creates session-bound state was sent).
    pub(super) fn pin(&mut self, reason: PinReason) {
        if !reason.is_session_scoped() {
            return;
        }
        if matches!(reason, PinReason::SetConfig | PinReason::UnsupportedSet) {
            self.sticky = Sticky::Settings;
        }
        if self.pooling == Pooling::Transaction {
            info!(
                pid = self.pid,
                reason = reason.as_str(),
                "session pinned to the primary"
            );
            metrics::counter!(m::PINNED_SESSIONS_TOTAL).increment(1);
        }
        self.pooling = Pooling::Pinned;
    }

    /// Notes a statement sent on a pinned session: one that may release
    /// session state gets the server asked at the next idle moment.
    pub(super) fn note_pinned_statement(&mut self, sql: &str, kinds: &[StatementKind]) {
        if self.pooling != Pooling::Pinned {
            return;
        }
        if kinds.iter().any(|k| {
            matches!(
                k,
                StatementKind::Discard | StatementKind::Reset { name: None }
            )
        }) {
            self.sticky = Sticky::No;
        }
        if may_release_session_state(sql) {
            self.pin_recheck = true;
        }
    }

    /// At an idle moment of a pinned session after a statement that may
    /// have released session state: asks the server what is left, and
    /// unpins when nothing is.
    pub(super) async fn recheck_pin(&mut self) -> Flow {
        self.pin_recheck = false;
        if self.sticky != Sticky::No {
            return Ok(());
        }
        let Some(h) = self.backend.as_mut() else {
            return Ok(());
        };
        let to_client = &mut self.client.wbuf;
        let _ = frontend::query(SESSION_STATE_SQL, &mut h.conn.wbuf);
        let mut left: Option<i64> = None;
        let mut failed = false;
        let result: Result<(), crate::backend::BackendError> = async {
            h.conn.flush().await?;
            loop {
                let f = h.conn.read_frame().await?;
                match f.tag {
                    // A notification for the client.
                    b'A' => to_client.extend_from_slice(&f.bytes),
                    b'D' => {
                        left = wire::data_row_texts(&f)
                            .first()
                            .cloned()
                            .flatten()
                            .and_then(|v| v.parse().ok())
                    }
                    b'E' => failed = true,
                    b'Z' => return Ok(()),
                    _ => {}
                }
            }
        }
        .await;
        if let Err(e) = result {
            return self.backend_failed(e).await;
        }
        debug!(
            pid = self.pid,
            ?left,
            failed,
            "session state of a pinned session"
        );
        if !failed && left == Some(0) {
            info!(pid = self.pid, "session unpinned: no session state left");
            self.pooling = Pooling::Transaction;
        }
        Ok(())
    }
}
