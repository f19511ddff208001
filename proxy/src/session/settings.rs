//! Session settings: `SET`/`RESET`/`DISCARD` made by the client are
//! recorded when the server confirms them, replayed as a prelude on
//! whichever backend serves the next statement, and undone when the
//! transaction they were made in rolls back.

use std::collections::BTreeMap;

use crate::backend::BackendConn;
use crate::classify::{Classification, StatementKind, reset_statement_sql, set_statement_sql};
use crate::wire::TxnStatus;

use super::pipeline::Action;

use super::Session;

impl Session {
    /// The client's `ReadyForQuery` reports `status`: when the session is
    /// idle after a failed or rolled-back transaction, the server undid
    /// that transaction's `SET`s, and so does the proxy's record of them.
    pub(super) fn settings_at_ready(&mut self, status: TxnStatus) {
        let h = self.backend.as_mut().expect("held");
        match status {
            TxnStatus::Idle => {
                let before = self.settings_before_txn.take();
                if let (true, Some((desired, applied))) =
                    (std::mem::take(&mut h.txn_failed), before)
                {
                    // Rolled back: the server undid this transaction's SETs.
                    self.desired = desired;
                    h.conn.applied = applied;
                }
            }
            // Recovered (ROLLBACK TO SAVEPOINT): the transaction goes on.
            TxnStatus::InTransaction => h.txn_failed = false,
            _ => {}
        }
    }

    /// A transaction committed: its settings are now the session's.
    pub(super) fn settings_at_boundary(&mut self) {
        self.settings_before_txn = None;
        if let Some(h) = &mut self.backend {
            h.txn_failed = false;
        }
    }

    /// Records a successful `SET`/`RESET`/`DISCARD` so it is replayed on
    /// whichever backend serves the next statement.
    pub(super) fn apply_setting(&mut self, kind: StatementKind) {
        if self.settings_before_txn.is_none()
            && matches!(
                kind,
                StatementKind::Set { local: false, .. }
                    | StatementKind::Reset { .. }
                    | StatementKind::Discard
            )
        {
            let applied = self
                .backend
                .as_ref()
                .map(|h| h.conn.applied.clone())
                .unwrap_or_default();
            self.settings_before_txn = Some((self.desired.clone(), applied));
        }
        let h = self.backend.as_mut();
        match kind {
            StatementKind::Set {
                name,
                value,
                local: false,
            } => {
                let sql = set_statement_sql(&name, &value);
                if let Some(h) = h {
                    h.conn.applied.insert(name.clone(), sql.clone());
                }
                self.desired.insert(name, sql);
            }
            StatementKind::Reset { name: Some(name) } => {
                match self.startup_desired.get(&name) {
                    Some(v) => self.desired.insert(name.clone(), v.clone()),
                    None => self.desired.remove(&name),
                };
                if let Some(h) = h {
                    h.conn.applied.remove(&name);
                }
            }
            StatementKind::Reset { name: None } => {
                self.desired = self.startup_desired.clone();
                if let Some(h) = h {
                    h.conn.applied.clear();
                }
            }
            StatementKind::Discard => {
                self.desired = self.startup_desired.clone();
                self.prepared.clear();
                self.unnamed = None;
                if let Some(h) = h {
                    h.conn.applied.clear();
                    h.conn.prepared.clear();
                    h.conn.probe_prepared = false;
                }
            }
            _ => {}
        }
    }
}

impl Session {
    /// Records what a setting change did to the held connection alone (its
    /// run was discarded, to be retried elsewhere).
    pub(super) fn apply_setting_on_conn(&mut self, kind: StatementKind) {
        let Some(h) = self.backend.as_mut() else {
            return;
        };
        match kind {
            StatementKind::Set {
                name,
                value,
                local: false,
            } => {
                h.conn
                    .applied
                    .insert(name.clone(), set_statement_sql(&name, &value));
            }
            StatementKind::Reset { name: Some(name) } => {
                h.conn.applied.remove(&name);
            }
            StatementKind::Reset { name: None } => h.conn.applied.clear(),
            StatementKind::Discard => {
                h.conn.applied.clear();
                h.conn.prepared.clear();
                h.conn.probe_prepared = false;
            }
            _ => {}
        }
    }
}

/// Settings changes a statement makes, applied when it succeeds.
pub(super) fn setting_actions(class: &Classification) -> Vec<Action> {
    class
        .statements
        .iter()
        .filter(|k| {
            matches!(
                k,
                StatementKind::Set { local: false, .. }
                    | StatementKind::Reset { .. }
                    | StatementKind::Discard
            )
        })
        .cloned()
        .map(Action::Setting)
        .collect()
}

/// The statements that bring `conn` to the session's settings.
pub(super) fn prelude_sql(
    desired: &BTreeMap<String, String>,
    conn: &BackendConn,
) -> Option<String> {
    let mut sql = String::new();
    for (k, v) in desired {
        if conn.applied.get(k) != Some(v) {
            sql.push_str(v);
            sql.push_str(";\n");
        }
    }
    for k in conn.applied.keys() {
        if !desired.contains_key(k) {
            sql.push_str(&reset_statement_sql(Some(k)));
            sql.push_str(";\n");
        }
    }
    (!sql.is_empty()).then_some(sql)
}
