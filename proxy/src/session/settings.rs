//! Session settings: `SET`/`RESET`/`DISCARD` made by the client are
//! recorded when the server confirms them, replayed as a prelude on
//! whichever backend serves the next statement, and undone when the
//! transaction they were made in rolls back.
//!
//! The session's settings are kept as an `Arc` and copied on write: the
//! startup settings and the current ones are one map until the client
//! changes one, and sessions that log in with the same startup settings
//! (an application's clients, with its `application_name`) share one map.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::backend::BackendConn;
use crate::classify::{Classification, StatementKind, reset_statement_sql, set_statement_sql};
use crate::wire::TxnStatus;

use super::pipeline::Action;

use super::Session;

/// Settings by name → the SQL that applies them.
pub(super) type SettingMap = BTreeMap<String, String>;

/// The session's settings and the held connection's applied settings as
/// they were before the first setting change since the last transaction
/// boundary: what a rollback returns them to.
pub(super) struct BeforeTxn {
    /// The session's settings.
    pub(super) desired: Arc<SettingMap>,
    /// The held connection's applied settings.
    pub(super) applied: SettingMap,
}

/// Most distinct startup settings kept for sharing.
const SHARED_STARTUP_MAX: usize = 64;

/// Startup settings in use, shared between the sessions that have them.
static SHARED_STARTUP: Mutex<Vec<Arc<SettingMap>>> = Mutex::new(Vec::new());

/// `settings` as a shared map: the one another session logged in with, if
/// equal, so that idle clients of one application keep one copy. (Called
/// once per login; at most [`SHARED_STARTUP_MAX`] maps are kept, those no
/// session uses any more dropped first.)
pub(super) fn shared_startup(settings: SettingMap) -> Arc<SettingMap> {
    let mut shared = SHARED_STARTUP.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(found) = shared.iter().find(|m| ***m == settings) {
        return found.clone();
    }
    if shared.len() >= SHARED_STARTUP_MAX {
        shared.retain(|m| Arc::strong_count(m) > 1);
        if shared.len() >= SHARED_STARTUP_MAX {
            shared.remove(0);
        }
    }
    let map = Arc::new(settings);
    shared.push(map.clone());
    map
}

impl Session {
    /// The client's `ReadyForQuery` reports `status`: when the session is
    /// idle after a failed or rolled-back transaction, the server undid
    /// that transaction's `SET`s, and so does the proxy's record of them.
    pub(super) fn settings_at_ready(&mut self, status: TxnStatus) {
        let h = self.backend.as_mut().expect("held");
        match status {
            TxnStatus::Idle => {
                let before = self.settings_before_txn.take();
                if let (true, Some(before)) = (std::mem::take(&mut h.txn_failed), before) {
                    // Rolled back: the server undid this transaction's SETs.
                    self.desired = before.desired;
                    h.conn.applied = before.applied;
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
            self.settings_before_txn = Some(Box::new(BeforeTxn {
                desired: self.desired.clone(),
                applied,
            }));
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
                Arc::make_mut(&mut self.desired).insert(name, sql);
            }
            StatementKind::Reset { name: Some(name) } => {
                // (Copied on write only when it changes.)
                let startup = self.startup_desired.get(&name);
                if self.desired.get(&name) != startup {
                    let desired = Arc::make_mut(&mut self.desired);
                    match startup {
                        Some(v) => desired.insert(name.clone(), v.clone()),
                        None => desired.remove(&name),
                    };
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(app: &str) -> SettingMap {
        SettingMap::from([(
            "application_name".to_string(),
            set_statement_sql("application_name", app),
        )])
    }

    #[test]
    fn equal_startup_settings_are_shared_and_copied_on_write() {
        let a = shared_startup(settings("shared-startup-test"));
        let b = shared_startup(settings("shared-startup-test"));
        assert!(Arc::ptr_eq(&a, &b), "one map for equal startup settings");
        let other = shared_startup(settings("shared-startup-test-other"));
        assert!(!Arc::ptr_eq(&a, &other));
        let mut changed = b.clone();
        Arc::make_mut(&mut changed).insert("search_path".into(), "SET search_path TO x".into());
        assert_eq!(
            *a,
            settings("shared-startup-test"),
            "a change is the session's own"
        );
        assert_eq!(changed.len(), 2);
    }

    #[test]
    fn shared_startup_settings_are_bounded() {
        // (None held: maps no session uses go first, so the other test's,
        // held, are not evicted.)
        for i in 0..2 * SHARED_STARTUP_MAX {
            shared_startup(settings(&format!("bounded-test-{i}")));
        }
        let n = SHARED_STARTUP.lock().unwrap().len();
        assert!(n <= SHARED_STARTUP_MAX, "{n} maps kept");
    }
}
