//! Prepared statements: what the session knows about each
//! ([`StmtInfo`]), their proxy-global names (the same SQL and parameter
//! types get the same name on every backend connection), and re-parsing a
//! statement on a connection that lacks it.

use std::sync::{Arc, Mutex};

use postgres_protocol::message::frontend;

use crate::classify::Classification;
use crate::wire::{self as protocol, PgError};

use super::Session;
use super::local::LocalStmt;
use super::pipeline::{Expect, Held};

/// What the session knows about one prepared statement.
#[derive(Debug)]
pub(super) struct StmtInfo {
    pub(super) sql: Arc<str>,
    pub(super) types: Arc<[u32]>,
    /// Proxy-global name: the same SQL and parameter types get the same
    /// name on every backend connection.
    pub(super) global: String,
    pub(super) class: Arc<Classification>,
    pub(super) local: Option<LocalStmt>,
}

/// The statement texts a session classified last, so that the messages of
/// one batch (and the next batches of a client repeating itself) are
/// classified once.
#[derive(Debug, Default)]
pub(super) struct Recent {
    /// The last text classified, and its classification.
    pub(super) class: Mutex<Option<(Arc<str>, Arc<Classification>)>>,
    /// The last statement prepared.
    pub(super) info: Mutex<Option<Arc<StmtInfo>>>,
}

impl Recent {
    /// The last text classified (the lock is never contended: one task).
    pub(super) fn class(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(Arc<str>, Arc<Classification>)>> {
        self.class.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last statement prepared.
    pub(super) fn info(&self) -> std::sync::MutexGuard<'_, Option<Arc<StmtInfo>>> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) fn global_name(sql: &str, types: &[u32]) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: stable within the process, which is all the
    // names need (they live as long as backend connections).
    let mut h = std::hash::DefaultHasher::new();
    sql.hash(&mut h);
    types.hash(&mut h);
    format!("lagrouter_s_{:016x}_{}", h.finish(), sql.len())
}

impl Session {
    pub(super) fn stmt_info(&self, name: &str) -> Option<Arc<StmtInfo>> {
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            self.prepared.get(name).cloned()
        }
    }

    pub(super) fn make_info(
        &self,
        sql: &Arc<str>,
        types: &Arc<[u32]>,
    ) -> Result<Arc<StmtInfo>, PgError> {
        // Clients re-parse the same text over and over (the unnamed
        // statement above all): the last one is reused.
        if let Some(last) = self.recent.info().as_ref() {
            if *last.sql == **sql && *last.types == **types {
                return Ok(last.clone());
            }
        }
        let class = self.classify(sql);
        let local = Self::local_stmt(sql, &class)?;
        let info = Arc::new(StmtInfo {
            sql: sql.clone(),
            types: types.clone(),
            global: global_name(sql, types),
            class,
            local,
        });
        *self.recent.info() = Some(info.clone());
        Ok(info)
    }
}

/// Makes sure the held backend has `info` prepared (as the unnamed
/// statement, or under its global name) before a Bind or Describe uses it.
pub(super) fn ensure_prepared(h: &mut Held, info: &StmtInfo, unnamed: bool) {
    if unnamed {
        if !h.unnamed_ok {
            inject_parse(h, info, None);
        }
    } else if !h.conn.prepared.contains(&info.global) {
        inject_parse(h, info, Some(info.global.clone()));
    }
}

/// Re-parses a client's statement on a backend that lacks it.
pub(super) fn inject_parse(h: &mut Held, info: &StmtInfo, global: Option<String>) {
    let name = global.as_deref().unwrap_or("");
    if frontend::parse(
        name,
        &info.sql,
        info.types.iter().copied(),
        &mut h.conn.wbuf,
    )
    .is_err()
    {
        return;
    }
    match &global {
        Some(g) => {
            h.conn.prepared.insert(g.clone());
        }
        None => h.unnamed_ok = true,
    }
    h.queue.push_back(Expect::Injected { global });
}

pub(super) fn no_such_statement(name: &str) -> PgError {
    PgError::error(
        "26000",
        format!("prepared statement \"{name}\" does not exist"),
    )
}

pub(super) fn malformed(what: &str) -> PgError {
    PgError::error(
        protocol::SQLSTATE_PROTOCOL_VIOLATION,
        format!("malformed {what} message"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_names_depend_on_sql_and_types() {
        assert_eq!(
            global_name("SELECT $1", &[23]),
            global_name("SELECT $1", &[23])
        );
        assert_ne!(
            global_name("SELECT $1", &[23]),
            global_name("SELECT $1", &[25])
        );
        assert_ne!(global_name("SELECT 1", &[]), global_name("SELECT 2", &[]));
    }
}
