//! Prepared statements: what the session knows about each
//! ([`StmtInfo`]), their proxy-global names (the same SQL, parameter
//! types and schema epoch get the same name on every backend connection),
//! re-parsing a statement on a connection that lacks it, and `DEALLOCATE`.
//!
//! A client's statements are its own: `Close`, `DEALLOCATE name` and
//! `DEALLOCATE ALL` forget the client's names only (the backend statements
//! stay, shared by every client that prepares the same SQL). A statement
//! prepared after a DDL gets a new global name (the schema epoch is part
//! of it), so it never runs on a plan a backend cached before the DDL;
//! one prepared before keeps its name, and the server revalidates it as it
//! would on a direct connection (re-planned, or `cached plan must not
//! change result type`).

use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes};
use postgres_protocol::message::frontend;

use crate::classify::{Classification, PinReason, StatementKind};
use crate::wire::{self as protocol, Frame, PgError};

use super::local::LocalStmt;
use super::pipeline::{Expect, Held};
use super::{Pooling, Session};

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
    /// A `DEALLOCATE ALL` the server runs (pinned session): it drops the
    /// proxy's statements on that connection too.
    pub(super) deallocates_all: bool,
    /// The SQL as the client sent it, when its bytes differ from `sql` (a
    /// client encoding other than UTF-8): what a re-parse sends.
    pub(super) raw_sql: Option<Bytes>,
}

/// The statement text a session classified last, so that the messages of
/// one batch (and the next batches of a client repeating itself) are
/// classified once.
#[derive(Debug, Default)]
pub(super) struct Recent {
    /// The last text classified, and its classification.
    pub(super) class: Mutex<Option<(Arc<str>, Arc<Classification>)>>,
}

impl Recent {
    /// The last text classified (the lock is never contended: one task).
    pub(super) fn class(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(Arc<str>, Arc<Classification>)>> {
        self.class.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The name a statement has on backends: `lagrouter_s_<hash>_<len>_<epoch>`.
pub(super) fn global_name(sql: &str, types: &[u32], epoch: u64) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: stable within the process, which is all the
    // names need (they live as long as backend connections).
    let mut h = std::hash::DefaultHasher::new();
    sql.hash(&mut h);
    types.hash(&mut h);
    format!("lagrouter_s_{:016x}_{}_{epoch}", h.finish(), sql.len())
}

impl Session {
    pub(super) fn stmt_info(&self, name: &str) -> Option<Arc<StmtInfo>> {
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            self.prepared.get(name).cloned()
        }
    }

    /// What the session knows about the statement of a `Parse` (`frame`:
    /// the message, to keep SQL in a client encoding other than UTF-8).
    pub(super) fn make_info(
        &self,
        sql: &Arc<str>,
        types: &Arc<[u32]>,
        frame: Option<(&str, &Frame)>,
    ) -> Result<Arc<StmtInfo>, PgError> {
        let class = self.classify(sql);
        reserved_prepare(sql, &class)?;
        let mut local = Self::local_stmt(sql, &class)?;
        if local.is_none() {
            local = self
                .local_deallocate(sql, &class)
                .map(LocalStmt::Deallocate);
        }
        let deallocates_all = local.is_none() && deallocates_all(sql, &class);
        Ok(Arc::new(StmtInfo {
            sql: sql.clone(),
            types: types.clone(),
            global: global_name(sql, types, self.shared.catalog.epoch()),
            class,
            local,
            deallocates_all,
            raw_sql: frame.and_then(|(name, f)| raw_sql(name, sql, f)),
        }))
    }

    /// The target of a `DEALLOCATE` the proxy answers itself: one of the
    /// client's protocol-level statements, or all of them. In a pinned
    /// session, `DEALLOCATE ALL` and names the client prepared with SQL
    /// `PREPARE` go to the server.
    pub(super) fn local_deallocate(
        &self,
        sql: &str,
        class: &Classification,
    ) -> Option<Option<String>> {
        if !matches!(class.statements.as_slice(), [StatementKind::Other]) {
            return None;
        }
        let target = deallocate_target(sql)?;
        let by_server = match &target {
            None => self.pooling == Pooling::Pinned,
            Some(name) => !self.prepared.contains_key(name) && self.pooling == Pooling::Pinned,
        };
        (!by_server).then_some(target)
    }

    /// Forgets the client's statement `name` (or all of them); returns the
    /// command tag.
    pub(super) fn run_deallocate(&mut self, name: Option<&str>) -> Result<&'static str, PgError> {
        match name {
            None => {
                self.prepared.clear();
                Ok("DEALLOCATE ALL")
            }
            Some(n) if self.prepared.remove(n).is_some() => Ok("DEALLOCATE"),
            Some(n) => Err(no_such_statement(n)),
        }
    }

    /// The server dropped every prepared statement of the held connection
    /// (`DEALLOCATE ALL` in a pinned session): the client's and the
    /// proxy's own.
    pub(super) fn deallocated_all(&mut self) {
        self.prepared.clear();
        if let Some(h) = &mut self.backend {
            h.conn.prepared.clear();
            h.conn.probe_prepared = false;
            h.unnamed_ok = false;
        }
    }
}

/// Whether `sql` is a `DEALLOCATE ALL`.
pub(super) fn deallocates_all(sql: &str, class: &Classification) -> bool {
    matches!(class.statements.as_slice(), [StatementKind::Other])
        && deallocate_target(sql) == Some(None)
}

/// SQL `PREPARE` of a name the proxy uses itself (`lagrouter_…`): refused
/// (42939), so that the client's and the proxy's statements never collide.
pub(super) fn reserved_prepare(sql: &str, class: &Classification) -> Result<(), PgError> {
    if class.pin_reason() != Some(PinReason::SqlPrepare) {
        return Ok(());
    }
    let mut words = sql.split_whitespace();
    let reserved = words
        .find(|w| w.eq_ignore_ascii_case("prepare"))
        .and_then(|_| words.next())
        .is_some_and(|name| {
            name.trim_matches('"')
                .to_ascii_lowercase()
                .starts_with("lagrouter_")
        });
    if reserved {
        return Err(PgError::error(
            "42939",
            "prepared statement names starting with \"lagrouter_\" are reserved by lagrouter-proxy",
        ));
    }
    Ok(())
}

/// `DEALLOCATE [PREPARE] name | ALL` → `Some(Some(name))` / `Some(None)`.
pub(super) fn deallocate_target(sql: &str) -> Option<Option<String>> {
    let s = sql.trim().trim_end_matches(';').trim();
    let mut words = s.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut w = words.next()?;
    if w.eq_ignore_ascii_case("prepare") {
        w = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if w.eq_ignore_ascii_case("all") {
        return Some(None);
    }
    let name = if w.starts_with('"') && w.ends_with('"') && w.len() >= 2 {
        w[1..w.len() - 1].replace("\"\"", "\"")
    } else {
        w.to_ascii_lowercase()
    };
    Some(Some(name))
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

/// The SQL bytes of a `Parse` frame for statement `name` when they
/// differ from `sql` (the stand-in text of a non-UTF-8 client encoding,
/// which has the same length).
fn raw_sql(name: &str, sql: &str, frame: &Frame) -> Option<Bytes> {
    let start = 5 + name.len() + 1;
    let raw = frame.bytes.get(start..start + sql.len())?;
    (raw != sql.as_bytes()).then(|| Bytes::copy_from_slice(raw))
}

/// Re-parses a client's statement on a backend that lacks it.
pub(super) fn inject_parse(h: &mut Held, info: &StmtInfo, global: Option<String>) {
    let name = global.as_deref().unwrap_or("");
    match &info.raw_sql {
        Some(raw) => {
            let w = &mut h.conn.wbuf;
            let len = 4 + name.len() + 1 + raw.len() + 1 + 2 + 4 * info.types.len();
            let Ok(len) = i32::try_from(len) else { return };
            w.put_u8(b'P');
            w.put_i32(len);
            w.put_slice(name.as_bytes());
            w.put_u8(0);
            w.put_slice(raw);
            w.put_u8(0);
            w.put_i16(info.types.len() as i16);
            for t in info.types.iter() {
                w.put_u32(*t);
            }
        }
        None => {
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
        }
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
            global_name("SELECT $1", &[23], 0),
            global_name("SELECT $1", &[23], 0)
        );
        assert_ne!(
            global_name("SELECT $1", &[23], 0),
            global_name("SELECT $1", &[25], 0)
        );
        assert_ne!(
            global_name("SELECT 1", &[], 0),
            global_name("SELECT 2", &[], 0)
        );
        assert_ne!(
            global_name("SELECT 1", &[], 0),
            global_name("SELECT 1", &[], 1)
        );
    }

    #[test]
    fn deallocate_is_recognised() {
        assert_eq!(deallocate_target("DEALLOCATE s1"), Some(Some("s1".into())));
        assert_eq!(
            deallocate_target("deallocate prepare \"S1\";"),
            Some(Some("S1".into()))
        );
        assert_eq!(deallocate_target("DEALLOCATE ALL"), Some(None));
        assert_eq!(deallocate_target("SELECT 1"), None);
    }
}
