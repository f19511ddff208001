//! Queries: locking clauses, data-modifying CTEs, `SELECT … INTO` and
//! functions known to write or to pin the session.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName, Query, Select, SetExpr,
    Statement, TableFactor, Value, Visit, Visitor,
};

use super::parser::worst;
use super::types::{PinReason, StatementKind};

pub(super) fn classify_query(q: &Query) -> StatementKind {
    let mut v = QueryVisitor {
        kind: StatementKind::Read,
    };
    let _ = q.visit(&mut v);
    v.kind
}

struct QueryVisitor {
    kind: StatementKind,
}

impl QueryVisitor {
    fn raise(&mut self, k: StatementKind) -> ControlFlow<()> {
        self.kind = worst(std::mem::replace(&mut self.kind, StatementKind::Read), k);
        if matches!(self.kind, StatementKind::SessionPinning(_)) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn function(&mut self, name: &ObjectName, args: &[FunctionArg]) -> ControlFlow<()> {
        let Some(last) = name.0.last().and_then(|p| p.as_ident()) else {
            return ControlFlow::Continue(());
        };
        match function_effect(&last.value.to_ascii_lowercase(), args) {
            StatementKind::Read => ControlFlow::Continue(()),
            k => self.raise(k),
        }
    }
}

fn setexpr_has_dml(e: &SetExpr) -> bool {
    match e {
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::SetOperation { left, right, .. } => {
            setexpr_has_dml(left) || setexpr_has_dml(right)
        }
        _ => false,
    }
}

impl Visitor for QueryVisitor {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if !q.locks.is_empty() || setexpr_has_dml(&q.body) {
            return self.raise(StatementKind::Write);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &Select) -> ControlFlow<()> {
        match &s.into {
            Some(into) if into.temporary => {
                self.raise(StatementKind::SessionPinning(PinReason::TempTable))
            }
            Some(_) => self.raise(StatementKind::Write),
            None => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        match s {
            Statement::Insert { .. }
            | Statement::Update { .. }
            | Statement::Delete { .. }
            | Statement::Merge { .. } => self.raise(StatementKind::Write),
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            let args: &[FunctionArg] = match &f.args {
                FunctionArguments::List(l) => &l.args,
                _ => &[],
            };
            return self.function(&f.name, args);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        match t {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => self.function(name, &args.args),
            TableFactor::Function { name, args, .. } => self.function(name, args),
            _ => ControlFlow::Continue(()),
        }
    }
}

/// What calling the function `name` (lower-cased, unqualified) implies.
fn function_effect(name: &str, args: &[FunctionArg]) -> StatementKind {
    const WRITES: &[&str] = &[
        "nextval",
        "setval",
        "currval",
        "lastval",
        "pg_notify",
        "txid_current",
        "txid_current_if_assigned",
        "pg_current_xact_id",
        "pg_current_xact_id_if_assigned",
        "pg_current_wal_lsn",
        "pg_current_wal_insert_lsn",
        "pg_current_wal_flush_lsn",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_logical_emit_message",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
        "pg_cancel_backend",
        "pg_terminate_backend",
        "loread",
        "lowrite",
    ];
    const ADVISORY: &[&str] = &[
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    ];
    // Releasing never needs the session's own backend: a session that holds
    // a lock is pinned already, and on any other backend there is nothing
    // to release (asyncpg's pool runs `pg_advisory_unlock_all()` on every
    // release).
    const UNLOCK: &[&str] = &[
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
    ];
    if name.starts_with("lo_") || WRITES.contains(&name) || UNLOCK.contains(&name) {
        return StatementKind::Write;
    }
    if ADVISORY.contains(&name) {
        return StatementKind::SessionPinning(PinReason::AdvisoryLock);
    }
    if name == "set_config" {
        // set_config(name, value, is_local): a literal `true` is
        // transaction-local and harmless anywhere.
        let is_local = match args.get(2) {
            Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) => match &v.value {
                Value::Boolean(b) => *b,
                Value::SingleQuotedString(s) => ["t", "true", "on", "yes", "y", "1"]
                    .iter()
                    .any(|t| s.eq_ignore_ascii_case(t)),
                _ => false,
            },
            _ => false,
        };
        return if is_local {
            StatementKind::Read
        } else {
            StatementKind::SessionPinning(PinReason::SetConfig)
        };
    }
    StatementKind::Read
}
