//! Statements the proxy answers itself: `SET`/`RESET lagrouter.min_token`,
//! `SHOW lagrouter.token`, empty queries, `DEALLOCATE` of protocol-level
//! statements, and extended-protocol messages on such statements; and the
//! session's consistency token they read and write.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use lagrouter::{Consistency, ConsistencyToken};

use crate::classify::{Classification, StatementKind};
use crate::config::{format_consistency, format_duration, parse_consistency, parse_duration};
use crate::metrics as m;
use crate::wire::{self as protocol, ClientMessage, PgError};

use super::Session;
use super::prepared::reserved_prepare;

/// The parameter status carrying the session's token, and the name
/// `SHOW lagrouter.token` answers.
pub const TOKEN_PARAMETER: &str = "lagrouter.token";

/// The setting clients use to pass a token in (`SET lagrouter.min_token`).
pub const MIN_TOKEN_SETTING: &str = "lagrouter.min_token";

/// The session's read policy (`SET lagrouter.consistency`).
pub const CONSISTENCY_SETTING: &str = "lagrouter.consistency";
/// The session's read-your-writes wait (`SET lagrouter.max_wait`).
pub const MAX_WAIT_SETTING: &str = "lagrouter.max_wait";

/// A statement the proxy answers itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum LocalStmt {
    SetMinToken(String),
    ResetMinToken,
    ShowToken,
    /// `SET lagrouter.consistency` / `lagrouter.max_wait` (name, value).
    Set(&'static str, String),
    /// `RESET` of one of those.
    Reset(&'static str),
    /// `SHOW` of one of those.
    Show(&'static str),
    /// `DEALLOCATE name` / `DEALLOCATE ALL` of the client's protocol-level
    /// statements (see `Session::local_deallocate`).
    Deallocate(Option<String>),
    Empty,
}

/// The session settings besides the token, by name.
fn session_setting(name: &str) -> Option<&'static str> {
    [CONSISTENCY_SETTING, MAX_WAIT_SETTING]
        .into_iter()
        .find(|s| *s == name)
}

impl Session {
    pub(super) fn classify(&self, sql: &Arc<str>) -> Arc<Classification> {
        if let Some((text, class)) = self.recent.class().as_ref() {
            if **text == **sql {
                return class.clone();
            }
        }
        let class = self.shared.classifier.classify(sql);
        *self.recent.class() = Some((sql.clone(), class.clone()));
        class
    }

    /// Recognises statements the proxy answers itself.
    pub(super) fn local_stmt(
        sql: &str,
        class: &Classification,
    ) -> Result<Option<LocalStmt>, PgError> {
        let is_lagrouter = |k: &StatementKind| match k {
            StatementKind::Set { name, .. } => name.starts_with("lagrouter."),
            StatementKind::Reset { name: Some(name) } => name.starts_with("lagrouter."),
            _ => false,
        };
        let show = show_lagrouter(sql);
        if class.statements.is_empty() {
            return Ok(Some(LocalStmt::Empty));
        }
        let n_local = class.statements.iter().filter(|k| is_lagrouter(k)).count();
        if n_local == 0 && show.is_none() {
            return Ok(None);
        }
        if class.statements.len() > 1 {
            return Err(PgError::error(
                "0A000",
                "lagrouter settings must be sent as a statement of their own",
            ));
        }
        if let Some(name) = show {
            return match name.as_str() {
                TOKEN_PARAMETER | MIN_TOKEN_SETTING => Ok(Some(LocalStmt::ShowToken)),
                other => match session_setting(other) {
                    Some(s) => Ok(Some(LocalStmt::Show(s))),
                    None => Err(unknown_setting(&name)),
                },
            };
        }
        match &class.statements[0] {
            StatementKind::Set { name, value, .. } if name == MIN_TOKEN_SETTING => {
                Ok(Some(LocalStmt::SetMinToken(value.clone())))
            }
            StatementKind::Reset { name: Some(name) } if name == MIN_TOKEN_SETTING => {
                Ok(Some(LocalStmt::ResetMinToken))
            }
            StatementKind::Set { name, value, .. } if session_setting(name).is_some() => Ok(Some(
                LocalStmt::Set(session_setting(name).unwrap_or_default(), value.clone()),
            )),
            StatementKind::Reset { name: Some(name) } if session_setting(name).is_some() => Ok(
                Some(LocalStmt::Reset(session_setting(name).unwrap_or_default())),
            ),
            StatementKind::Set { name, .. } | StatementKind::Reset { name: Some(name) } => {
                Err(unknown_setting(name))
            }
            _ => Ok(None),
        }
    }

    /// Applies a token given by the client (setting or comment).
    pub(super) fn accept_token(&mut self, text: &str) -> Result<(), PgError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        let token = ConsistencyToken::decode(text).map_err(|e| {
            PgError::error("22023", format!("invalid lagrouter token: {e}"))
                .with_hint("Pass the value of the lagrouter.token parameter status (or SHOW lagrouter.token) unchanged.")
        })?;
        if let Some(cluster) = self.topology().cluster {
            token
                .check_cluster(&cluster)
                .map_err(|e| PgError::error("22023", format!("invalid lagrouter token: {e}")))?;
        }
        self.token.observe(Some(token));
        metrics::counter!(m::TOKENS_ACCEPTED_TOTAL).increment(1);
        Ok(())
    }

    /// The read policy of this session: its own (`SET
    /// lagrouter.consistency`), else the configured one; with `SET
    /// lagrouter.max_wait` applied to read-your-writes.
    pub(super) fn session_policy(&self) -> Consistency {
        let mut p = self.consistency.unwrap_or_else(|| self.settings().policy);
        if let (Some(w), Consistency::ReadYourWrites { max_wait, .. }) = (self.max_wait, &mut p) {
            *max_wait = w;
        }
        p
    }

    /// Sets (`Some`) or resets (`None`) `lagrouter.consistency` or
    /// `lagrouter.max_wait`; a malformed value is 22023 and changes nothing.
    fn set_session_setting(&mut self, name: &str, value: Option<&str>) -> Result<(), PgError> {
        let invalid = |e: String| {
            PgError::error(
                "22023",
                format!("invalid value for parameter \"{name}\": {e}"),
            )
        };
        match (name, value) {
            (CONSISTENCY_SETTING, Some(v)) => {
                let routing = &self.settings().config.routing;
                self.consistency = Some(parse_consistency(v, routing).map_err(invalid)?);
            }
            (CONSISTENCY_SETTING, None) => self.consistency = self.status.entry.consistency,
            (_, Some(v)) => self.max_wait = Some(parse_duration(v).map_err(invalid)?),
            (_, None) => self.max_wait = None,
        }
        Ok(())
    }

    /// The value `SHOW` gives for `lagrouter.consistency` (the effective
    /// policy, as `SET` takes it) or `lagrouter.max_wait`.
    fn show_session_setting(&self, name: &str) -> String {
        let policy = self.session_policy();
        if name == CONSISTENCY_SETTING {
            return format_consistency(&policy);
        }
        format_duration(match policy {
            Consistency::ReadYourWrites { max_wait, .. } => max_wait,
            _ => self
                .max_wait
                .unwrap_or(self.settings().config.routing.max_wait),
        })
    }

    /// Runs a local statement (Execute time); returns the reply messages.
    pub(super) fn run_local(
        &mut self,
        stmt: &LocalStmt,
        extended: bool,
    ) -> Result<Vec<Bytes>, PgError> {
        let mut out = BytesMut::new();
        match stmt {
            LocalStmt::SetMinToken(v) => {
                let v = v.clone();
                self.accept_token(&v)?;
                protocol::command_complete("SET", &mut out);
            }
            LocalStmt::ResetMinToken => protocol::command_complete("RESET", &mut out),
            LocalStmt::ShowToken => {
                if !extended {
                    protocol::text_row_description(TOKEN_PARAMETER, &mut out);
                }
                let t = self.token.get().map(|t| t.encode()).unwrap_or_default();
                protocol::text_data_row(&t, &mut out);
                protocol::command_complete("SHOW", &mut out);
            }
            LocalStmt::Set(name, value) => {
                self.set_session_setting(name, Some(value))?;
                protocol::command_complete("SET", &mut out);
            }
            LocalStmt::Reset(name) => {
                self.set_session_setting(name, None)?;
                protocol::command_complete("RESET", &mut out);
            }
            LocalStmt::Show(name) => {
                if !extended {
                    protocol::text_row_description(name, &mut out);
                }
                protocol::text_data_row(&self.show_session_setting(name), &mut out);
                protocol::command_complete("SHOW", &mut out);
            }
            LocalStmt::Deallocate(target) => {
                let tag = self.run_deallocate(target.as_deref())?;
                protocol::command_complete(tag, &mut out);
            }
            LocalStmt::Empty => out.extend_from_slice(&protocol::empty_message(b'I')),
        }
        Ok(vec![out.freeze()])
    }

    /// `Describe` reply for a local statement.
    pub(super) fn describe_local(stmt: &LocalStmt, statement: bool) -> Vec<Bytes> {
        let mut v = Vec::new();
        if statement {
            v.push(protocol::no_parameters());
        }
        match stmt {
            LocalStmt::ShowToken => {
                let mut b = BytesMut::new();
                protocol::text_row_description(TOKEN_PARAMETER, &mut b);
                v.push(b.freeze());
            }
            LocalStmt::Show(name) => {
                let mut b = BytesMut::new();
                protocol::text_row_description(name, &mut b);
                v.push(b.freeze());
            }
            _ => v.push(protocol::empty_message(b'n')),
        }
        v
    }

    /// Handles a simple query the proxy answers itself (lagrouter
    /// settings, empty queries, `DEALLOCATE` of protocol-level statements).
    /// `None` when the query must go to a server.
    pub(super) fn local_query(
        &mut self,
        sql: &str,
        class: &Classification,
    ) -> Option<Result<Vec<Bytes>, PgError>> {
        if let Some(t) = &class.token {
            if let Err(e) = self.accept_token(t) {
                return Some(Err(e));
            }
        }
        match Self::local_stmt(sql, class) {
            Ok(Some(stmt)) => return Some(self.run_local(&stmt, false)),
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        if let Err(e) = reserved_prepare(sql, class) {
            return Some(Err(e));
        }
        let target = self.local_deallocate(sql, class)?;
        Some(self.run_local(&LocalStmt::Deallocate(target), false))
    }

    /// Whether an extended-protocol message can be answered without a
    /// server (used to answer all-local batches directly).
    pub(super) fn is_local_ext(&self, msg: &ClientMessage) -> bool {
        match msg {
            ClientMessage::Parse { sql, .. } => {
                let class = self.classify(sql);
                !matches!(Self::local_stmt(sql, &class), Ok(None))
                    || self.local_deallocate(sql, &class).is_some()
            }
            ClientMessage::Bind { stmt, .. } => {
                self.stmt_info(stmt).is_some_and(|i| i.local.is_some())
            }
            ClientMessage::Describe {
                kind: b'S', name, ..
            } => self.stmt_info(name).is_some_and(|i| i.local.is_some()),
            ClientMessage::Describe { name, .. } | ClientMessage::Execute { portal: name, .. } => {
                self.local_portals.contains_key(name)
            }
            ClientMessage::Close {
                kind: b'S', name, ..
            } => !name.is_empty(),
            ClientMessage::Close { name, .. } => self.local_portals.contains_key(name),
            ClientMessage::Sync { .. } | ClientMessage::Flush { .. } => true,
            ClientMessage::Query { .. } => false,
        }
    }

    /// Whether every message of a batch can be answered without a server,
    /// following statements and portals the batch itself defines.
    pub(super) fn batch_is_local(&self, batch: &[ClientMessage]) -> bool {
        let mut stmts: HashMap<&str, bool> = HashMap::new();
        let mut portals: HashMap<&str, bool> = HashMap::new();
        for msg in batch {
            let local = match msg {
                ClientMessage::Parse { name, .. } => {
                    let l = self.is_local_ext(msg);
                    stmts.insert(name, l);
                    l
                }
                ClientMessage::Bind { portal, stmt, .. } => {
                    let l = stmts
                        .get(stmt.as_str())
                        .copied()
                        .unwrap_or_else(|| self.is_local_ext(msg));
                    portals.insert(portal, l);
                    l
                }
                ClientMessage::Describe {
                    kind: b'S', name, ..
                } => stmts
                    .get(name.as_str())
                    .copied()
                    .unwrap_or_else(|| self.is_local_ext(msg)),
                ClientMessage::Describe { name, .. }
                | ClientMessage::Execute { portal: name, .. } => portals
                    .get(name.as_str())
                    .copied()
                    .unwrap_or_else(|| self.is_local_ext(msg)),
                other => self.is_local_ext(other),
            };
            if !local {
                return false;
            }
        }
        true
    }

    /// Replies for a message that needs no server, or `None`. Effects on
    /// the session are applied. An error means: report it and skip to Sync.
    pub(super) fn local_ext(&mut self, msg: &ClientMessage) -> Option<Result<Vec<Bytes>, PgError>> {
        match msg {
            ClientMessage::Parse {
                name, sql, types, ..
            } => {
                let info = match self.make_info(sql, types, None) {
                    Ok(i) => i,
                    Err(e) => return Some(Err(e)),
                };
                info.local.as_ref()?;
                if let Some(t) = &info.class.token {
                    if let Err(e) = self.accept_token(&t.clone()) {
                        return Some(Err(e));
                    }
                }
                if name.is_empty() {
                    self.unnamed = Some(info);
                    if let Some(h) = &mut self.backend {
                        h.unnamed_ok = false;
                    }
                } else {
                    self.prepared.insert(name.clone(), info);
                }
                Some(Ok(vec![protocol::empty_message(b'1')]))
            }
            ClientMessage::Bind { portal, stmt, .. } => {
                let info = self.stmt_info(stmt)?;
                let local = info.local.clone()?;
                self.local_portals.insert(portal.clone(), local);
                Some(Ok(vec![protocol::empty_message(b'2')]))
            }
            ClientMessage::Describe {
                kind: b'S', name, ..
            } => {
                let info = self.stmt_info(name)?;
                let local = info.local.as_ref()?;
                Some(Ok(Self::describe_local(local, true)))
            }
            ClientMessage::Describe { name, .. } => {
                let local = self.local_portals.get(name)?;
                Some(Ok(Self::describe_local(local, false)))
            }
            ClientMessage::Execute { portal, .. } => {
                let local = self.local_portals.get(portal)?.clone();
                Some(self.run_local(&local, true))
            }
            ClientMessage::Close {
                kind: b'S', name, ..
            } if !name.is_empty() => {
                // Only the client's name goes: the backend statement is
                // shared and stays prepared.
                self.prepared.remove(name);
                Some(Ok(vec![protocol::empty_message(b'3')]))
            }
            ClientMessage::Close { name, .. } => {
                self.local_portals.remove(name)?;
                Some(Ok(vec![protocol::empty_message(b'3')]))
            }
            _ => None,
        }
    }
}

/// Whether `sql` starts with `keyword` (ASCII, any case) after blanks: a
/// cheap test before the statement is looked at more closely.
fn starts_with_keyword(sql: &str, keyword: &str) -> bool {
    let b = sql.trim_ascii_start().as_bytes();
    b.len() >= keyword.len() && b[..keyword.len()].eq_ignore_ascii_case(keyword.as_bytes())
}

/// `SHOW lagrouter.*` → the setting name.
pub(super) fn show_lagrouter(sql: &str) -> Option<String> {
    if !starts_with_keyword(sql, "show") {
        return None;
    }
    let s = sql.trim().trim_end_matches(';').trim();
    let mut words = s.split_whitespace();
    let first = words.next()?;
    let name = words.next()?;
    if !first.eq_ignore_ascii_case("show") || words.next().is_some() {
        return None;
    }
    let name = name.trim_matches('"').to_ascii_lowercase();
    name.starts_with("lagrouter.").then_some(name)
}

pub(super) fn unknown_setting(name: &str) -> PgError {
    PgError::error(
        "42704",
        format!("unrecognized configuration parameter \"{name}\""),
    )
    .with_hint("lagrouter-proxy knows lagrouter.min_token (SET) and lagrouter.token (SHOW).")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_is_recognised() {
        assert_eq!(
            show_lagrouter("SHOW lagrouter.token;"),
            Some("lagrouter.token".into())
        );
        assert_eq!(
            show_lagrouter("show  LAGROUTER.TOKEN"),
            Some("lagrouter.token".into())
        );
        assert_eq!(show_lagrouter("SHOW search_path"), None);
    }
}
