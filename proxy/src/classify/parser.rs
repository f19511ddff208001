//! Classification with the SQL parser: splitting off oversized input to the
//! keyword fallback, parsing (on a grown stack when needed) and mapping each
//! parsed statement to a [`StatementKind`].

use std::ops::Range;

use sqlparser::ast::{
    CopySource, CopyTarget, DiscardObject, Expr, Reset, Statement, TransactionAccessMode,
    TransactionMode, Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::fallback::fallback_kind;
use super::query::classify_query;
use super::scan::scan;
use super::set::{classify_set, guc_name};
use super::types::{Classification, PinReason, RouteHint, StatementKind};
use super::{MAX_PARSE_BYTES, MAX_PARSE_STATEMENTS};

/// Stack reserved for parsing, walking and dropping a statement tree, per
/// byte of input (debug builds need about 64 in the worst case).
const STACK_PER_INPUT_BYTE: usize = 256;

const DIALECT: PostgreSqlDialect = PostgreSqlDialect {};

pub(super) fn classify_slow(sql: &str) -> Classification {
    let scan = scan(sql);
    let statements = if sql.len() > MAX_PARSE_BYTES || scan.pieces.len() > MAX_PARSE_STATEMENTS {
        scan.pieces
            .iter()
            .map(|r| fallback_kind(&sql[r.clone()]))
            .collect()
    } else {
        // sqlparser guards its own recursion, but walking and dropping the
        // tree recurse once per nesting level (a `1+1+…` chain nests once
        // per two bytes). Make sure there is ample stack, growing it on the
        // heap when the caller's (e.g. a tokio worker's) is short.
        let need = sql
            .len()
            .saturating_mul(STACK_PER_INPUT_BYTE)
            .max(64 * 1024);
        stacker::maybe_grow(need, need, || parse_all(sql, &scan.pieces))
    };
    Classification {
        statements,
        hint: if reads_standby_state(sql) {
            Some(RouteHint::Primary)
        } else {
            scan.hint
        },
        token: scan.token,
        consistency: scan.consistency,
    }
}

/// Settings a hot standby reports differently from the primary
/// (`transaction_read_only` is always on there): a statement that names
/// one (`SHOW transaction_read_only`, `current_setting('in_hot_standby')`,
/// …) runs on the primary, so that an autocommit session sees what a
/// direct connection would.
const STANDBY_STATE: &[&str] = &["transaction_read_only", "in_hot_standby"];

fn reads_standby_state(sql: &str) -> bool {
    STANDBY_STATE.iter().any(|name| {
        sql.as_bytes()
            .windows(name.len())
            .any(|w| w.eq_ignore_ascii_case(name.as_bytes()))
    })
}

fn parse_all(sql: &str, pieces: &[Range<usize>]) -> Vec<StatementKind> {
    if pieces.is_empty() {
        return Vec::new();
    }
    match Parser::parse_sql(&DIALECT, sql) {
        Ok(stmts) => stmts.iter().map(classify_statement).collect(),
        Err(_) if pieces.len() == 1 => vec![fallback_kind(&sql[pieces[0].clone()])],
        Err(_) => pieces
            .iter()
            .flat_map(|r| {
                let piece = &sql[r.clone()];
                match Parser::parse_sql(&DIALECT, piece) {
                    Ok(stmts) => stmts.iter().map(classify_statement).collect(),
                    Err(_) => vec![fallback_kind(piece)],
                }
            })
            .collect(),
    }
}

fn classify_statement(stmt: &Statement) -> StatementKind {
    use StatementKind as K;
    match stmt {
        Statement::Query(q) => classify_query(q),
        Statement::Insert { .. }
        | Statement::Update { .. }
        | Statement::Delete { .. }
        | Statement::Merge { .. }
        | Statement::Truncate { .. }
        | Statement::Call { .. }
        | Statement::Vacuum { .. }
        | Statement::Analyze { .. }
        | Statement::Grant { .. }
        | Statement::Revoke { .. }
        | Statement::GrantRole { .. }
        | Statement::RevokeRole { .. }
        | Statement::Deny { .. }
        | Statement::AlterDefaultPrivileges { .. }
        | Statement::Comment { .. }
        | Statement::RefreshMaterializedView { .. }
        | Statement::NOTIFY { .. }
        | Statement::CreateIndex { .. }
        | Statement::CreateRole { .. }
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateFunction { .. }
        | Statement::CreateTrigger { .. }
        | Statement::CreateProcedure { .. }
        | Statement::CreateType { .. }
        | Statement::CreateDomain { .. }
        | Statement::CreateExtension { .. }
        | Statement::CreatePolicy { .. }
        | Statement::CreateUser { .. }
        | Statement::AlterTable { .. }
        | Statement::AlterSchema { .. }
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::AlterFunction { .. }
        | Statement::AlterType { .. }
        | Statement::AlterRole { .. }
        | Statement::AlterPolicy { .. }
        | Statement::AlterUser { .. }
        | Statement::Drop { .. }
        | Statement::DropFunction { .. }
        | Statement::DropDomain { .. }
        | Statement::DropProcedure { .. }
        | Statement::DropPolicy { .. }
        | Statement::DropExtension { .. }
        | Statement::DropTrigger { .. } => K::Write,
        Statement::CreateTable(ct) => temp_or_write(ct.temporary),
        Statement::CreateView(cv) => temp_or_write(cv.temporary),
        Statement::CreateSequence { temporary, .. } => temp_or_write(*temporary),
        Statement::StartTransaction { modes, .. } => K::TransactionBegin {
            read_only: read_only_mode(modes).unwrap_or(false),
        },
        Statement::Commit { .. } => K::TransactionEnd,
        Statement::Rollback { savepoint, .. } => {
            if savepoint.is_some() {
                K::Savepoint
            } else {
                K::TransactionEnd
            }
        }
        Statement::Savepoint { .. } | Statement::ReleaseSavepoint { .. } => K::Savepoint,
        Statement::Set(set) => classify_set(set),
        Statement::Reset(r) => match &r.reset {
            Reset::ALL => K::Reset { name: None },
            Reset::SessionAuthorization => K::Reset {
                name: Some("session_authorization".to_owned()),
            },
            Reset::ConfigurationParameter(name) => K::Reset {
                name: Some(guc_name(name)),
            },
        },
        Statement::Discard { object_type } => match object_type {
            DiscardObject::ALL => K::Discard,
            _ => K::Other,
        },
        Statement::ShowVariable { .. } => K::Show,
        Statement::LISTEN { .. } => K::SessionPinning(PinReason::Listen),
        // Stops notifications the session may get: on a pinned session it runs
        // there; on any other backend there is nothing to stop.
        Statement::UNLISTEN { .. } => K::Other,
        Statement::Prepare { .. } => K::SessionPinning(PinReason::SqlPrepare),
        Statement::Lock(_) => K::SessionPinning(PinReason::Lock),
        Statement::Declare { stmts, .. } => {
            let mut kind = K::Read;
            for d in stmts {
                let k = if d.hold == Some(true) {
                    K::SessionPinning(PinReason::HoldCursor)
                } else if let Some(q) = &d.for_query {
                    classify_query(q)
                } else {
                    K::Other
                };
                kind = worst(kind, k);
            }
            kind
        }
        Statement::Fetch { .. } | Statement::Close { .. } => K::Read,
        Statement::Copy {
            source, to, target, ..
        } => {
            if !*to {
                return match target {
                    CopyTarget::Stdin => K::SessionPinning(PinReason::Copy),
                    _ => K::Write,
                };
            }
            if !matches!(target, CopyTarget::Stdout) {
                return K::Write; // server-side file or program
            }
            match source {
                CopySource::Table { .. } => K::Read,
                CopySource::Query(q) => classify_query(q),
            }
        }
        Statement::Explain {
            analyze,
            statement,
            options,
            ..
        } => {
            let analyze = *analyze
                || options.as_ref().is_some_and(|opts| {
                    opts.iter().any(|o| {
                        o.name.value.eq_ignore_ascii_case("analyze") && option_enabled(&o.arg)
                    })
                });
            if !analyze {
                return K::Read;
            }
            match classify_statement(statement) {
                K::Read => K::Read,
                pin @ K::SessionPinning(_) => pin,
                _ => K::Write,
            }
        }
        Statement::ExplainTable { .. } => K::Read,
        other => {
            // Rare statements: decide by the leading keyword of their
            // canonical text.
            let text = other.to_string();
            let first = text.split_ascii_whitespace().next().unwrap_or("");
            const WRITE_WORDS: &[&str] = &[
                "CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT", "REFRESH", "TRUNCATE",
                "SECURITY", "REINDEX", "CLUSTER", "IMPORT", "RENAME",
            ];
            if WRITE_WORDS.iter().any(|w| first.eq_ignore_ascii_case(w)) {
                K::Write
            } else {
                K::Other
            }
        }
    }
}

fn temp_or_write(temporary: bool) -> StatementKind {
    if temporary {
        StatementKind::SessionPinning(PinReason::TempTable)
    } else {
        StatementKind::Write
    }
}

/// `READ ONLY` (`Some(true)`), `READ WRITE` (`Some(false)`) or neither; the
/// last one given wins.
pub(super) fn read_only_mode(modes: &[TransactionMode]) -> Option<bool> {
    modes.iter().rev().find_map(|m| match m {
        TransactionMode::AccessMode(TransactionAccessMode::ReadOnly) => Some(true),
        TransactionMode::AccessMode(TransactionAccessMode::ReadWrite) => Some(false),
        TransactionMode::IsolationLevel(_) => None,
    })
}

/// Whether an `EXPLAIN (OPTION [arg])` option is on.
fn option_enabled(arg: &Option<Expr>) -> bool {
    match arg {
        None => true,
        Some(Expr::Value(v)) => match &v.value {
            Value::Boolean(b) => *b,
            Value::Number(n, _) => n != "0",
            Value::SingleQuotedString(s) => truthy(s),
            _ => true,
        },
        Some(Expr::Identifier(id)) => truthy(&id.value),
        Some(_) => true,
    }
}

fn truthy(s: &str) -> bool {
    !["false", "off", "0", "no", "f", "n"]
        .iter()
        .any(|f| s.eq_ignore_ascii_case(f))
}

/// The more restrictive of two kinds for a single statement: a pin beats a
/// write beats anything else.
pub(super) fn worst(a: StatementKind, b: StatementKind) -> StatementKind {
    fn rank(k: &StatementKind) -> u8 {
        match k {
            StatementKind::SessionPinning(_) => 3,
            StatementKind::Write => 2,
            StatementKind::Other => 1,
            _ => 0,
        }
    }
    if rank(&b) > rank(&a) { b } else { a }
}
